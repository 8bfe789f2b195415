"""``chainrelay demo``: what makes chainrelay different, offline, in one command.

It starts, on loopback ports, each in a process (and process group) of its own:

    anvil (chain id 56, a block a second, transfers and ERC-20 logs sent by this process)
      ├── origin      eu       follows anvil, signs each block into one frame
      └── ingress     eu-west  takes the sequencer's signed batches, durable, then the tree's
           relay-us   us       parents: origin and ingress (first copy wins)
           relay-asia asia     parents: origin and ingress
             leaf-us   us      parents: relay-us and relay-asia
             leaf-asia asia    parents: relay-us and relay-asia
    sequencer (``chainrelay publish``) pushing batches to the ingress at a steady rate

with keys made by ``chainrelay keygen`` and an API key made here, all in a directory of
its own (a temp dir unless ``--dir``). Every node gets an explicit admin listener on a free
loopback port, whatever the default is, so each node's status page is known. Ctrl-C (or
SIGTERM) stops the sequencer first, then the leaves, relays, top nodes and anvil, each by
its process group (``serve --workers N`` supervises workers of its own), SIGKILL past a
grace period. A child that dies meanwhile stops the demo, with its log's tail.

``demo.json`` in that directory names every process, port and address, for scripts and
tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from chainrelay import devnet
from chainrelay.keygen import write_key

HOST = "127.0.0.1"
CHAIN_ID = 56
BLOCK_STREAM = "bsc/blocks"
BATCH_STREAM = "arbitrum/batches"
BATCH_CHAIN_ID = 42161
# Each batch's bytes: a small compressed Arbitrum batch; the point is the flow, not the load.
BATCH_SIZE = 512
# Batches the sequencer would push at most: more than any demo runs (a day at 2/s is
# 172,800); it is stopped long before.
BATCH_COUNT = 1_000_000_000
# A node's start loads web3 and eth-account and waits for a first head: a few seconds
# alone, more with several starting at once on two cores.
READY_TIMEOUT = 60.0
# How long a process gets after SIGTERM before its group is killed.
STOP_TIMEOUT = 5.0
# How often the demo looks for a child that died.
WATCH_INTERVAL = 0.5
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo dies, even by SIGKILL (Linux), so a
    killed demo leaves no node behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Proc:
    """One process of the demo."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                # A group of its own: the demo stops it and whatever it started (workers)
                # together, and a Ctrl-C in the terminal reaches the demo alone, which
                # stops everything in order.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal_group(self, sig: int) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""


@dataclass
class NodeSpec:
    """One relay node: its ports and where it sits."""

    name: str
    region: str
    port: int
    admin_port: int
    parents: list[NodeSpec] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def feed(self) -> str:
        return f"ws://{HOST}:{self.port}/feed"

    @property
    def status(self) -> str:
        return f"http://{HOST}:{self.admin_port}/status"


class Demo:
    """``await demo.run(stop)``: start everything, print how to use it, wait for ``stop``
    (or a child's death), stop everything. ``code`` is the exit code."""

    def __init__(
        self,
        *,
        workers: int = 1,
        block_time: float = 1.0,
        batch_rate: float = 2.0,
        directory: str | None = None,
    ) -> None:
        self.workers = workers
        self.block_time = block_time
        self.batch_rate = batch_rate
        self.keep = directory is not None
        self.dir = (
            Path(directory) if directory else Path(tempfile.mkdtemp(prefix="chainrelay-demo-"))
        )
        self.procs: list[Proc] = []
        self._traffic: asyncio.Task[None] | None = None
        self.code = 0

    # --- the parts ----------------------------------------------------------------------
    def _node_toml(self, spec: NodeSpec, *, tree: str, upstream: str | None, batches: str) -> str:
        lines = [
            "[server]",
            f'listen = "{HOST}:{spec.port}"',
            # Explicit, whatever the default: the demo prints every node's status page.
            f'admin_listen = "{HOST}:{spec.admin_port}"',
            "",
            "[chain]",
            'profile = "bsc"',
            "",
            "[tree]",
            f'region = "{spec.region}"',
            tree,
        ]
        for p in spec.parents:
            lines += [
                "",
                "[[tree.parents]]",
                f'name = "{p.name}"',
                f'region = "{p.region}"',
                f'url = "{p.feed}"',
            ]
        if upstream:
            lines += ["", "[[upstreams]]", 'name = "anvil"', f'url = "{upstream}"']
        return "\n".join(lines) + "\n" + batches

    def _serve(self, spec: NodeSpec, text: str, *, workers: int | None = None) -> Proc:
        path = self.dir / f"{spec.name}.toml"
        path.write_text(text)
        argv = [sys.executable, "-m", "chainrelay", "serve", "--config", str(path)]
        argv += ["--workers", str(workers or self.workers)]
        return Proc(spec.name, argv, self.dir / f"{spec.name}.log")

    def _start(self, *procs: Proc) -> None:
        for p in procs:
            p.start()
            self.procs.append(p)

    async def _ready(self, specs: list[NodeSpec], session: aiohttp.ClientSession) -> None:
        """Until every node's /health answers 200 (a fresh head, an upstream in rotation)."""
        by_name = {p.name: p for p in self.procs}
        deadline = time.monotonic() + READY_TIMEOUT
        waiting = list(specs)
        while waiting:
            for spec in list(waiting):
                proc = by_name[spec.name]
                if proc.exited() is not None:
                    raise DemoError(f"{spec.name} exited:\n{proc.tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with session.get(spec.url + "/health") as r:
                        if r.status == 200:
                            waiting.remove(spec)
            if waiting and time.monotonic() > deadline:
                names = ", ".join(s.name for s in waiting)
                raise DemoError(f"not ready after {READY_TIMEOUT:.0f} s: {names}")
            if waiting:
                await asyncio.sleep(0.2)  # polling a condition, with the deadline above

    async def _anvil_ready(self, url: str, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
        while True:
            proc = self.procs[0]
            if proc.exited() is not None:
                raise DemoError(f"anvil exited:\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.post(url, json=body) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise DemoError("anvil did not answer")
            await asyncio.sleep(0.1)

    # --- the run ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        quit_traffic = asyncio.Event()
        work = asyncio.create_task(self._run(stop, quit_traffic), name="demo")
        stopped = asyncio.create_task(stop.wait())
        try:
            # A Ctrl-C while the nodes start stops them at once, not once all are ready.
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()
        except DemoError as exc:
            print(f"chainrelay demo: {exc}", file=sys.stderr, flush=True)
            self.code = 1
        finally:
            stopped.cancel()
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, DemoError):
                await work
            quit_traffic.set()
            traffic = self._traffic
            if traffic is not None:
                traffic.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await traffic
            await self._stop_all()
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
            print("chainrelay demo: stopped", flush=True)

    async def _run(self, stop: asyncio.Event, quit_traffic: asyncio.Event) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        free = devnet.free_port
        origin_key, seq_key = self.dir / "origin.key", self.dir / "sequencer.key"
        for k in (origin_key, seq_key):
            k.unlink(missing_ok=True)  # a kept --dir from an earlier run
        origin_address = write_key(origin_key)
        sequencer = write_key(seq_key)
        api_key = secrets.token_urlsafe(24)
        (self.dir / "api.key").write_text(api_key + "\n")
        os.chmod(self.dir / "api.key", 0o600)

        anvil_port = free(HOST)
        anvil_url = f"http://{HOST}:{anvil_port}"
        anvil = Proc(
            "anvil",
            [devnet.find_anvil(), "--host", HOST, "--port", str(anvil_port),
             "--chain-id", str(CHAIN_ID), "--block-time", str(self.block_time), "--silent"],
            self.dir / "anvil.log",
        )  # fmt: skip

        def spec(name: str, region: str, *parents: NodeSpec) -> NodeSpec:
            return NodeSpec(name, region, free(HOST), free(HOST), list(parents))

        origin = spec("origin", "eu")
        ingress = spec("ingress", "eu-west")
        relays = [
            spec("relay-us", "us", origin, ingress),
            spec("relay-asia", "asia", origin, ingress),
        ]
        leaves = [spec("leaf-us", "us", *relays), spec("leaf-asia", "asia", *relays)]
        streams = (
            f'\n[[batches.streams]]\nname = "{BATCH_STREAM}"\nchain_id = {BATCH_CHAIN_ID}\n'
            f'sequencers = ["{sequencer}"]\n'
        )
        trust = f'trust = ["{origin_address}"]\nparents_k = 2'
        ws = f"ws://{HOST}:{anvil_port}"
        origin_proc = self._serve(
            origin,
            self._node_toml(
                origin, tree=f'key_file = "{origin_key}"', upstream=ws, batches=streams
            ),
        )
        log = self.dir / "ingress.sqlite"
        ingress_batches = f'\n[batches]\nlog = "{log}"\napi_keys = ["{api_key}"]\n' + streams
        ingress_proc = self._serve(
            ingress,
            self._node_toml(ingress, tree="", upstream=ws, batches=ingress_batches),
            workers=1,  # its durable log is written by one process
        )
        relay_procs = [
            self._serve(r, self._node_toml(r, tree=trust, upstream=None, batches=streams))
            for r in relays
        ]
        leaf_procs = [
            self._serve(lf, self._node_toml(lf, tree=trust, upstream=None, batches=streams))
            for lf in leaves
        ]
        publisher = Proc(
            "sequencer",
            [sys.executable, "-m", "chainrelay", "--log-level", "WARNING", "publish",
             f"ws://{HOST}:{ingress.port}", "--stream", BATCH_STREAM,
             "--chain-id", str(BATCH_CHAIN_ID), "--key-file", str(seq_key),
             "--count", str(BATCH_COUNT), "--size", str(BATCH_SIZE),
             "--rate", str(self.batch_rate)],
            self.dir / "sequencer.log",
            env={**os.environ, "CHAINRELAY_API_KEY": api_key},
        )  # fmt: skip

        print(f"chainrelay demo: starting in {self.dir}", flush=True)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            self._start(anvil)
            await self._anvil_ready(anvil_url, session)
            self._traffic = traffic = asyncio.create_task(
                devnet.traffic(anvil_url, quit_traffic), name="traffic"
            )
            self._start(origin_proc, ingress_proc)
            await self._ready([origin, ingress], session)
            # Batches flow before the relays link: each of their parents sends frames from
            # the first round, so neither is taken for a stalled one.
            self._start(publisher)
            self._start(*relay_procs)
            await self._ready(relays, session)
            self._start(*leaf_procs)
            await self._ready(leaves, session)
        nodes = [origin, ingress, *relays, *leaves]
        self._write_plan(nodes, anvil_url, origin_address, sequencer)
        print(self._banner(nodes, anvil_url, origin_address, sequencer), flush=True)
        await self._watch(stop, traffic)

    async def _watch(self, stop: asyncio.Event, traffic: asyncio.Task[None]) -> None:
        """Until ``stop``; a child that exits meanwhile (or the traffic failing) ends it."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL)
            for p in self.procs:
                if not stop.is_set() and p.exited() is not None:
                    raise DemoError(f"{p.name} exited ({p.exited()}):\n{p.tail()}")
            if traffic.done() and not traffic.cancelled() and traffic.exception() is not None:
                raise DemoError(f"the devnet traffic stopped: {traffic.exception()}")

    async def _stop_all(self) -> None:
        """Newest first (the sequencer, leaves, relays, top nodes, anvil): SIGTERM to each
        group, then SIGKILL to any still there after ``STOP_TIMEOUT``."""
        for p in reversed(self.procs):
            p.signal_group(signal.SIGTERM)
            for _ in range(int(STOP_TIMEOUT / 0.05)):  # polling an exit, up to the timeout
                if p.exited() is not None:
                    break
                await asyncio.sleep(0.05)
            p.signal_group(signal.SIGKILL)  # its workers too, if any outlived it
            if p.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(STOP_TIMEOUT)

    def _write_plan(
        self, nodes: list[NodeSpec], anvil_url: str, origin: str, sequencer: str
    ) -> None:
        plan = {
            "dir": str(self.dir),
            "anvil": anvil_url,
            "chainId": CHAIN_ID,
            "origin": origin,
            "sequencer": sequencer,
            "streams": {"blocks": BLOCK_STREAM, "batches": BATCH_STREAM},
            "nodes": {
                n.name: {
                    "url": n.url,
                    "feed": n.feed,
                    "admin": f"http://{HOST}:{n.admin_port}",
                    "parents": [p.name for p in n.parents],
                }
                for n in nodes
            },
            "pids": {p.name: p.pid for p in self.procs},
        }
        (self.dir / "demo.json").write_text(json.dumps(plan, indent=2) + "\n")

    def _banner(self, nodes: list[NodeSpec], anvil_url: str, origin: str, sequencer: str) -> str:
        leaf = nodes[-2]
        lines = [
            "",
            f"chainrelay demo: a relay tree on loopback, offline ({self.dir})",
            f"  anvil       {anvil_url}  chain id {CHAIN_ID}, a block every "
            f"{self.block_time:g} s with transfers and ERC-20 logs",
        ]
        for n in nodes:
            parents = ", ".join(p.name for p in n.parents) or "anvil"
            lines.append(f"  {n.name:<11} {n.url}  from {parents:<22} status {n.status}")
        lines += [
            f"  sequencer   {self.batch_rate:g} batches/s to the ingress, signed by {sequencer}",
            "",
            "dapps (web3.py, ethers, a wallet: chain id 56) at either leaf:",
            *(f"  {n.url}" for n in nodes if n.name.startswith("leaf")),
            "",
            "blocks and batches, in order, from a leaf:",
            f"  chainrelay subscribe {leaf.feed} --stream {BLOCK_STREAM} --trust {origin}",
            f"  chainrelay subscribe {leaf.feed} --stream {BATCH_STREAM} --from 0 "
            f"--trust {sequencer}",
            "",
            f"status page: {leaf.status}   (each node's is listed above)",
            "Ctrl-C stops everything.",
        ]
        return "\n".join(lines)


class DemoError(Exception):
    """The demo could not start or lost a part: said, then everything is stopped."""
