"""A relay tree in the region lab: anvil and an origin in one place, relays and leaves in
others, every parent link through a delay link of its own round trip.

Each node runs in a namespace of its own (the origin shares anvil's), listening on
``0.0.0.0:NODE_PORT`` there; a child reaches each candidate parent through a delay link
started inside the child's namespace, so its parent URL (and the JSON-RPC endpoint it sends
misses to) is ``ws://127.0.0.1:<link port>/feed``. A node's ``region`` is the tag in its
``[tree]`` config (what parent choice reads), not its namespace. The test process reaches a
node through ``Region.expose`` (``TreeNode.url``) and follows a node's feed with a
``chainrelay subscribe`` process started inside that node's namespace (``Subscriber``),
whose JSON lines a reader thread collects. Each node's config and log, and each subscriber's
lines and stderr, stay in ``tmp`` for a look after a failure.

Usage::

    with RegionLab(procs) as lab, Tree(lab, tmp_path) as tree:
        anvil = await tree.chain("eu")
        origin = tree.origin("origin", "eu")
        relay = tree.node("relay", "us")
        tree.parent(relay, origin, rtt_ms=80)
        await tree.start(origin)
        await tree.start(relay)
        sub = tree.subscribe(relay, "bsc/blocks")
        await sub.wait_count(5, 10 * SECOND)

Nodes start in the order given to ``start``; a node must start after at least one of its
parents serves (it asks a parent for the chain id before it serves). ``close()`` stops the
subscribers and joins their readers; the lab then stops every process by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from eth_account import Account

from chainrelay.devnet import find_anvil
from tests.lab.batches import CHAIN_ID, batches_toml, streams_toml
from tests.lab.netns import Region, RegionLab
from tests.lab.procs import fetch_metrics, until
from tests.lab.timing import SECOND

# Every node listens on this port inside its own namespace: one number for every node keeps
# configs and logs legible, and a restarted node comes back where its children look for it.
NODE_PORT = 8600
# The public port serves /metrics and the full /health (what the lab reads); the origin
# and an ingress share anvil's namespace, where one admin port would be taken twice.
SERVER = {"listen": f"0.0.0.0:{NODE_PORT}", "admin_listen": ""}
ANVIL_PORT = 8545
# A fixed, test-only origin key: its address is what every other node and subscriber trusts.
ORIGIN_KEY = "0x" + "5a" * 32
ORIGIN_ADDRESS: str = Account.from_key(ORIGIN_KEY).address
# A node start loads web3 and eth-account and waits for its first head: a few seconds alone,
# more with seven starting at once on two cores.
NODE_READY_TIMEOUT = 40 * SECOND
ANVIL_READY_TIMEOUT = 20 * SECOND
# A subscriber process stops by itself after this long, even if nobody stops it: longer than
# any tree test runs, scaled like every other deadline so a slowed run does not cut it short.
SUBSCRIBER_MAX_SECONDS = 300 * SECOND
# A stopped process gets this long to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5 * SECOND


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _table(name: str, keys: Mapping[str, object], *, array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return head + "\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items())


@dataclass(eq=False)
class TreeNode:
    """One chainrelay node of the tree, in its namespace ``place``."""

    tree: Tree
    name: str
    place: Region
    region: str
    text: str  # its config, completed by Tree.parent
    config_path: Path
    log_path: Path
    parents: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its JSON-RPC endpoint, for the test process."""
        return self.place.url(NODE_PORT)

    @property
    def feed_url(self) -> str:
        """Its feed, for a process inside its namespace."""
        return f"ws://127.0.0.1:{NODE_PORT}/feed"

    def start(self) -> None:
        """Start the process (again, after ``kill``): same config, same port."""
        self.config_path.write_text(self.text)
        log = self.log_path.open("ab")
        try:
            self.proc = self.place.spawn(
                [sys.executable, "-m", "chainrelay", "--log-level", "INFO", "serve",
                 "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        finally:
            log.close()

    def kill(self) -> None:
        """SIGKILL the process by PID and reap it: a crash, not a shutdown."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    async def wait_ready(self, timeout: float = NODE_READY_TIMEOUT) -> None:
        """Until ``/health`` answers 200 (a fresh head and a healthy upstream)."""
        url = self.url + "/health"

        async def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node {self.name} exited:\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with aiohttp.ClientSession() as s, s.get(url) as r:
                    return r.status == 200
            return False

        try:
            await until(healthy, timeout, f"node {self.name} to be healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    async def metrics(self) -> dict[str, float]:
        """Its Prometheus samples as {"name{labels}": value} (see ``chain.metric``)."""
        return await fetch_metrics(self.url)


class Subscriber:
    """A ``chainrelay subscribe`` process; ``blocks`` holds its JSON lines as they come."""

    def __init__(
        self, proc: subprocess.Popen[bytes], name: str, record: Path, stderr_path: Path
    ) -> None:
        self.proc = proc
        self.name = name
        self.record = record  # every line as printed, for a look after a failure
        self.stderr_path = stderr_path
        self.blocks: list[dict[str, Any]] = []
        self.bad_lines: list[bytes] = []
        self._reader = threading.Thread(target=self._read, name=f"sub-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Ends at EOF: when the process exits, by itself or stopped.
        assert self.proc.stdout is not None
        with contextlib.suppress(OSError, ValueError), self.record.open("ab") as record:
            for line in self.proc.stdout:
                record.write(line)
                record.flush()
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.bad_lines.append(line)
                    continue
                self.blocks.append(doc)  # list.append is atomic: the test reads it live

    @property
    def numbers(self) -> list[int]:
        return [int(b["number"]) for b in list(self.blocks)]

    @property
    def seqs(self) -> list[int]:
        """The sequence numbers of a batch stream's lines, as printed."""
        return [int(b["seq"]) for b in list(self.blocks)]

    async def wait_count(self, count: int, timeout: float) -> None:
        """Until it has printed ``count`` blocks."""
        await until(
            lambda: self._check(lambda: len(self.blocks) >= count),
            timeout,
            f"{count} blocks at {self.name}",
        )

    async def wait_number(self, number: int, timeout: float) -> None:
        """Until it has printed block ``number`` or a later one."""

        def past() -> bool:
            got = self.numbers
            return bool(got) and got[-1] >= number

        await until(lambda: self._check(past), timeout, f"block {number} at {self.name}")

    def _check(self, done: Callable[[], bool]) -> bool:
        """``done()``, or a failure at once if the process has exited short of it."""
        if done():
            return True
        if self.proc.poll() is None:
            return False
        # Lines it printed before exiting may still be in the pipe: read them all, then ask
        # again before calling it a failure.
        self._reader.join(STOP_TIMEOUT)
        if done():
            return True
        raise AssertionError(
            f"subscriber {self.name} exited ({self.proc.returncode}) after "
            f"{len(self.blocks)} blocks; stderr:\n{self.stderr_tail()}"
        )

    def stderr_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        """SIGTERM by PID (SIGKILL if it lingers), then join the reader."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(STOP_TIMEOUT)


class Tree:
    """Builds a relay tree in ``lab``; configs and logs go to ``tmp``."""

    def __init__(self, lab: RegionLab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.nodes: dict[str, TreeNode] = {}
        self.subscribers: list[Subscriber] = []
        self.anvil_place: Region | None = None

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the subscribers and join their readers; the lab stops the rest."""
        for sub in self.subscribers:
            sub.stop()

    async def chain(self, place: str, *, chain_id: int = 56, block_time: float = 1.0) -> str:
        """Start anvil in a new namespace ``place``; its URL for the test process."""
        region = self.lab.add_region(place)
        self.anvil_place = region
        region.spawn(
            [find_anvil(), "--host", "127.0.0.1", "--port", str(ANVIL_PORT),
             "--chain-id", str(chain_id), "--block-time", str(block_time), "--silent"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        url = region.url(ANVIL_PORT)

        async def answers() -> bool:
            body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
                    return r.status == 200
            return False

        await until(answers, ANVIL_READY_TIMEOUT, "anvil")
        return url

    def origin(
        self,
        name: str,
        region: str,
        *,
        key: str = ORIGIN_KEY,
        tree_extra: Mapping[str, object] | None = None,
    ) -> TreeNode:
        """The origin, beside anvil (its upstream, over loopback: no delay)."""
        assert self.anvil_place is not None, "chain() first"
        tree = {"region": region, "key": key, **(tree_extra or {})}
        text = (
            _table("server", SERVER)
            + "\n"
            + _table("tree", tree)
            + "\n[[upstreams]]\n"
            + f'name = "anvil"\nurl = "ws://127.0.0.1:{ANVIL_PORT}"\n'
        )
        return self._add(name, self.anvil_place, region, text)

    def ingress(self, name: str, region: str, extra: str) -> TreeNode:
        """A node beside anvil (its upstream, over loopback) without a signing key: an
        ingress for batch streams when ``extra`` holds its ``[batches]`` tables."""
        assert self.anvil_place is not None, "chain() first"
        text = (
            _table("server", SERVER)
            + "\n"
            + _table("tree", {"region": region})
            + "\n[[upstreams]]\n"
            + f'name = "anvil"\nurl = "ws://127.0.0.1:{ANVIL_PORT}"\n\n'
            + extra
        )
        return self._add(name, self.anvil_place, region, text)

    def node(
        self,
        name: str,
        region: str,
        *,
        trust: Sequence[str] = (ORIGIN_ADDRESS,),
        tree_extra: Mapping[str, object] | None = None,
    ) -> TreeNode:
        """A relay or leaf in a new namespace ``name``; give it candidate parents with
        ``parent`` before it starts (two nodes may be each other's candidates)."""
        place = self.lab.add_region(name)
        tree = {"region": region, "trust": list(trust), **(tree_extra or {})}
        text = _table("server", SERVER) + "\n" + _table("tree", tree)
        return self._add(name, place, region, text)

    def parent(self, child: TreeNode, parent: TreeNode, rtt_ms: float) -> None:
        """Make ``parent`` a candidate of ``child``, ``rtt_ms`` away: a delay link inside
        the child's namespace carries its feed and its JSON-RPC misses."""
        host, port = self.lab.link(child.place, parent.place, NODE_PORT, rtt_ms)
        child.text += "\n" + _table(
            "tree.parents",
            {"name": parent.name, "region": parent.region, "url": f"ws://{host}:{port}/feed"},
            array=True,
        )
        child.parents.append(parent.name)

    def _add(self, name: str, place: Region, region: str, text: str) -> TreeNode:
        if name in self.nodes:
            raise ValueError(f"node {name} exists")
        node = TreeNode(
            self, name, place, region, text, self.tmp / f"{name}.toml", self.tmp / f"{name}.log"
        )
        self.nodes[name] = node
        return node

    async def start(self, *nodes: TreeNode, timeout: float = NODE_READY_TIMEOUT) -> None:
        """Start ``nodes`` together and wait until every one is healthy."""
        for node in nodes:
            node.start()
        for node in nodes:
            await node.wait_ready(timeout)

    def subscribe(
        self,
        node: TreeNode,
        stream: str,
        *,
        from_block: int | None = None,
        label: str = "",
        max_seconds: float = SUBSCRIBER_MAX_SECONDS,
        trust: str = ORIGIN_ADDRESS,
    ) -> Subscriber:
        """``chainrelay subscribe`` to ``node``'s feed, from inside its namespace, trusting
        the origin (a batch stream: ``trust`` its sequencer); live only unless
        ``from_block`` (a batch stream: the first seq)."""
        argv = [sys.executable, "-m", "chainrelay", "--log-level", "WARNING", "subscribe",
                node.feed_url, "--stream", stream, "--trust", trust,
                "--max-seconds", str(max_seconds)]  # fmt: skip
        if from_block is not None:
            argv += ["--from", str(from_block)]
        name = label or f"{node.name}-sub{len(self.subscribers)}"
        err_path = self.tmp / f"{name}.err"
        err = err_path.open("ab")
        try:
            proc = node.place.spawn(argv, stdout=subprocess.PIPE, stderr=err)
        finally:
            err.close()
        sub = Subscriber(proc, name, self.tmp / f"{name}.jsonl", err_path)
        self.subscribers.append(sub)
        return sub


# --- the batch region tree ----------------------------------------------------------------------
# Round trips, ms: relay b sits nearer the ingress and the leaves than relay c, so b is most
# leaves' first copy, the one a kill takes away.
RTT_INGRESS_B, RTT_INGRESS_C = 40.0, 60.0
RTT_B_LEAF, RTT_C_LEAF = 20.0, 40.0
# Probes and reconnects quick enough for a short run.
BATCH_TREE_EXTRA = {
    "probe_interval": 1.0,
    "retry_delay": 0.1,
    "retry_max": 1.0,
    "ping_interval": 1.0,
}


async def batch_tree(
    tree: Tree, *, sequencer: str, api_key: str, leaves: int, timeout: float
) -> tuple[TreeNode, list[TreeNode], list[TreeNode]]:
    """Start a batch stream's region tree, the one ``tests/system/test_batch_tree.py`` checks
    and ``benchmarks/batch_e2e.py`` times: an ingress beside anvil (region a, its log in
    ``tree.tmp``, pushed to with ``api_key``), relays b and c as its children, and
    ``leaves`` leaves with both relays as parents; (ingress, [b, c], leaves). The stream is
    signed by ``sequencer``; no node needs a ``[tree] trust`` (every batch is checked
    against the stream's sequencers)."""
    await tree.chain("a", chain_id=CHAIN_ID)
    ingress = tree.ingress(
        "ingress",
        "a",
        batches_toml(sequencer, log=tree.tmp / "ingress.sqlite", api_keys=[api_key]),
    )
    b = tree.node("relayb", "b", trust=(), tree_extra=BATCH_TREE_EXTRA)
    c = tree.node("relayc", "c", trust=(), tree_extra=BATCH_TREE_EXTRA)
    tree.parent(b, ingress, RTT_INGRESS_B)
    tree.parent(c, ingress, RTT_INGRESS_C)
    leaf_nodes = []
    for i in range(1, leaves + 1):
        leaf = tree.node(f"leaf{i}", f"l{i}", trust=(), tree_extra=BATCH_TREE_EXTRA)
        tree.parent(leaf, b, RTT_B_LEAF)
        tree.parent(leaf, c, RTT_C_LEAF)
        leaf_nodes.append(leaf)
    for node in (b, c, *leaf_nodes):
        node.text += streams_toml(sequencer)
    await tree.start(ingress, timeout=timeout)
    await tree.start(b, c, timeout=timeout)
    await tree.start(*leaf_nodes, timeout=timeout)
    return ingress, [b, c], leaf_nodes
