"""A bursty dapp load on a busy BSC-like chain: the node direct, a warm relay, a cold relay.

anvil (chain id 56) mines a block a second, and ``devnet.BusyTraffic`` fills every block
with 100 to 200 ERC-20 transfers: 6 BenchToken contracts (a plain ERC-20, its Solidity
source beside its bytecode in ``chainrelay/devnet.py``), 200 unlocked sender accounts,
recipients drawn from 4,000 addresses, sent as one JSON-RPC batch right after each block.

50 users fire in lockstep bursts: every user starts one call at the same instant, all the
answers are awaited, then the next burst. A burst starts right after each new block (as
dapps refresh on a new head) and then every ``--interval`` seconds until the next block,
never before the previous burst's last answer. Each call is drawn from this mix (``MIX``):

* 32% ``eth_call`` at "latest": ``balanceOf`` of a random holder on a random token (mostly
  unique arguments)
* 31% ``eth_getTransactionReceipt`` of a random transfer of the last 100 blocks (blocks from
  before a relay started among them)
* 12% ``eth_getLogs``: a token's Transfer logs over a 20-block window, explicit numbers,
  ending at the head the target last answered or a block or two below it
* 9% ``eth_blockNumber``, 6% ``eth_chainId``, 4% ``eth_getBlockByNumber("latest", true)``
* 3% ``eth_getTransactionByHash`` (as receipts), 3% ``eth_getBalance`` of a sender at
  "latest"

Each target is reached through its own counting proxy (``tests/lab/counting_proxy.py``),
so upstream calls are counted on the wire, the relay's own (head tracking, following
blocks) included:

* *direct*: the users talk to a proxy in front of anvil: 1.00 upstream call per client call
  by construction, and it pays the same proxy hop as a relay's upstream calls;
* *warm*: a relay started before the chain's ``--history`` busy blocks were made, read
  lightly (``eth_blockNumber`` and the latest block with its transactions, once a second,
  one user) whenever it is not under the burst load;
* *cold*: a fresh relay started just before each of its phases; the calls of its start
  count in its phase.

This tree's relays declare anvil one node (``head_by_number``): their reads pinned to its
head go by number, as a node's operator would set it; an older commit's run as they are.

The phases run interleaved in rounds (direct, warm, cold in each round); figures are
medians over rounds. With ``--against COMMIT`` a warm and a cold relay of that commit (run
from its own tree: ``common.checkout``) take their turns in each round too. The relay's
event-loop lag p99 is read from its ``chainrelay_event_loop_lag_seconds`` histogram
(``n/a`` when the relay has none).

    python -m benchmarks.dapp_burst [--users 50] [--rounds 3] [--seconds 20]
        [--interval 0.25] [--history 100] [--transport ws|http] [--against COMMIT]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from benchmarks import common
from chainrelay.devnet import (
    TRANSFER_TOPIC,
    Anvil,
    BusyTraffic,
    balance_of_data,
    deploy_tokens,
    rpc,
    rpc_batch,
)

# Calls of the mix and their weights (percent).
MIX: tuple[tuple[str, int], ...] = (
    ("eth_call", 32),
    ("eth_getTransactionReceipt", 31),
    ("eth_getLogs", 12),
    ("eth_blockNumber", 9),
    ("eth_chainId", 6),
    ("eth_getBlockByNumber", 4),
    ("eth_getTransactionByHash", 3),
    ("eth_getBalance", 3),
)
METHODS = [m for m, _ in MIX]
WEIGHTS = [w for _, w in MIX]
# The chain: unlocked accounts sending, tokens, addresses receiving, transfers a block.
ACCOUNTS = 200
TOKENS = 6
RECIPIENTS = 4_000
PER_BLOCK = (100, 200)
MINTED = 10**30
# Receipts and transactions asked for are of the last this many blocks.
TX_BLOCKS = 100
# eth_getLogs spans this many blocks, ending this many blocks below the target's head
# (drawn uniformly: most dapps ask up to the head they know, some a block or two behind).
LOGS_BLOCKS = 20
LOGS_END_BEHIND = (0, 0, 0, 1, 2)
# The light reader of a warm relay: one poll (two calls) this often while it is not loaded.
LIGHT_SECONDS = 1.0
# A call not answered in this long counts as an error.
CALL_TIMEOUT = 10.0
# Seconds a phase may take beyond its load: snapshots, a cold relay's start and stop.
PHASE_OVERHEAD = 5.0
# Calls at "latest" that read the chain's state with the mix's own arguments.
LATEST_STATE = ("eth_call", "eth_getBalance")
# How often this process checks its own event loop's lag while the users run.
LOAD_LAG_TICK = 0.01
# Goals.
GOAL_WARM_UPSTREAM = 0.35
GOAL_COLD_UPSTREAM = 0.45
GOAL_P99_VS_DIRECT = 0.5
GOAL_LOOP_LAG_MS = 2.0
LAG_HISTOGRAM = "chainrelay_event_loop_lag_seconds"
# The relay's config beyond its listen address and upstream: the chain, nothing tuned.
RELAY_TOML = "[chain]\nchain_id = 56\n"
# anvil is one node: reads pinned to its head go by number (README, "How answers are
# cached"). Only for this tree's relays: an older commit may not know the key.
UPSTREAM_TOML = "head_by_number = true\n"


# --- a light HTTP/1.1 client ---------------------------------------------------------------
class Conn:
    """One user's keep-alive HTTP/1.1 connection: a body out, the answer's bytes back.

    Much lighter than an HTTP library, so that the client's own work on the 50 answers of
    a burst adds as little as it can to the latencies it measures."""

    def __init__(self, url: str) -> None:
        m = re.fullmatch(r"http://([^:/]+):(\d+)/?", url)
        if m is None:
            raise ValueError(f"expected http://HOST:PORT, got {url}")
        self.host, self.port = m.group(1), int(m.group(2))
        self.head = (
            f"POST / HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """(HTTP status, body) of one POST; the connection is reopened when it was closed."""
        if self.reader is None or self.writer is None or self.reader.at_eof():
            self.close()
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, limit=1 << 20
            )
        reader, writer = self.reader, self.writer
        try:
            writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            status = int(head[9:12])
            if b"transfer-encoding: chunked" in head:
                data = await self._chunked(reader)
            else:
                m = re.search(rb"content-length:\s*(\d+)", head)
                if m is None:
                    raise OSError("answer without a length")
                data = await reader.readexactly(int(m.group(1)))
        except BaseException:
            self.close()
            raise
        if b"connection: close" in head:
            self.close()
        return status, data

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return b"".join(parts)
            parts.append(chunk[:-2])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --- what the users know of the chain -----------------------------------------------------
@dataclass
class World:
    traffic: BusyTraffic
    tokens: list[str]
    senders: list[str]
    holders: list[str]  # senders and recipients: who balanceOf asks about


@dataclass
class Target:
    """One target of the load: ``kind`` is direct, warm or cold."""

    name: str
    kind: str
    proxy: str  # its counting proxy's URL
    root: Path = common.ROOT  # the tree a relay of it runs
    relay: common.Relay | None = None  # a warm relay; a cold one while its phase runs
    proxy_pid: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by the load or the reader
    light_calls: int = 0
    light_errors: int = 0


@dataclass
class Phase:
    """One target's load phase: what the users saw, what the proxy counted."""

    target: str
    round: int
    seconds: float = 0.0
    bursts: int = 0
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    empty: collections.Counter[str] = field(default_factory=collections.Counter)
    latency: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    upstream: collections.Counter[str] = field(default_factory=collections.Counter)
    start_upstream: int = 0  # a cold relay's calls before its first client call
    relay_cpu: float | None = None  # % of one core
    lag_p99_ms: float | None = None
    lag_note: str = "n/a"
    cpu: dict[str, float] = field(default_factory=dict)  # context: anvil, load, machine
    first_errors: list[str] = field(default_factory=list)
    # (method, params, block) of the calls at "latest" whose answer is the chain's state
    # (balanceOf, balances): a cache keyed by block must ask upstream once for each.
    latest_keys: set[tuple[str, str, int]] = field(default_factory=set)
    load_lag: list[float] = field(default_factory=list)  # this process's loop lag, seconds

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def per_call(self) -> float:
        return sum(self.upstream.values()) / self.total if self.total else math.nan

    def all_latency(self) -> list[float]:
        return [x for xs in self.latency.values() for x in xs]


class Users:
    """The users of one phase, each with a connection of its own to the target."""

    def __init__(self, url: str, world: World, phase: Phase, count: int, seed: int) -> None:
        self.world = world
        self.phase = phase
        self.conns = [Conn(url) for _ in range(count)]
        self.rngs = [random.Random(seed * 1_000 + i) for i in range(count)]
        self.head = world.traffic.head  # as the target last answered it
        self.ids = 0

    def params(self, method: str, rng: random.Random) -> list[Any]:
        w = self.world
        if method == "eth_call":
            call = {"to": rng.choice(w.tokens), "data": balance_of_data(rng.choice(w.holders))}
            return [call, "latest"]
        if method in ("eth_getTransactionReceipt", "eth_getTransactionByHash"):
            top = w.traffic.head - 1  # its transfers are in: they were sent a block before
            blocks = w.traffic.mined(top - TX_BLOCKS + 1, top)
            return [rng.choice(w.traffic.sent[rng.choice(blocks)])]
        if method == "eth_getLogs":
            end = self.head - rng.choice(LOGS_END_BEHIND)
            flt = {
                "fromBlock": hex(max(0, end - LOGS_BLOCKS + 1)),
                "toBlock": hex(end),
                "address": rng.choice(w.tokens),
                "topics": [TRANSFER_TOPIC],
            }
            return [flt]
        if method == "eth_getBlockByNumber":
            return ["latest", True]
        if method == "eth_getBalance":
            return [rng.choice(w.senders), "latest"]
        return []

    async def call(self, i: int) -> None:
        rng = self.rngs[i]
        method = rng.choices(METHODS, WEIGHTS)[0]
        params = self.params(method, rng)
        self.ids += 1
        body = common.request_body(method, params, self.ids)
        phase = self.phase
        if method in LATEST_STATE:
            phase.latest_keys.add((method, str(params), self.world.traffic.head))
        problem = None
        data = b""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                status, data = await self.conns[i].post(body)
            if status != 200:
                problem = f"HTTP {status}: {data[:200]!r}"
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            problem = repr(exc)
        phase.latency[method].append(time.perf_counter() - started)
        phase.calls[method] += 1
        if problem is None:
            doc = orjson.loads(data)
            if not isinstance(doc, dict) or "error" in doc or "result" not in doc:
                problem = str(doc)[:200]
            else:
                self._read(method, doc["result"])
        if problem is not None:
            phase.errors[method] += 1
            if len(phase.first_errors) < 5:
                phase.first_errors.append(f"{method}{str(params)[:120]}: {problem}")

    def _read(self, method: str, result: Any) -> None:
        """Follow the head the target answers; count a transaction it does not know."""
        if method == "eth_blockNumber" and isinstance(result, str):
            self.head = max(self.head, int(result, 16))
        elif method == "eth_getBlockByNumber" and isinstance(result, dict):
            self.head = max(self.head, int(result["number"], 16))
        elif result is None:
            self.phase.empty[method] += 1

    async def burst(self) -> None:
        await asyncio.gather(*(self.call(i) for i in range(len(self.conns))))

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


async def bursts(users: Users, traffic: BusyTraffic, seconds: float, interval: float) -> int:
    """Lockstep bursts for ``seconds``: one right after each new block, then one every
    ``interval`` until the next, never before the last answer of the one before; how many."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    seen = traffic.head
    next_at = loop.time()
    count = 0
    while True:
        wait = min(next_at, end) - loop.time()
        if traffic.head == seen and wait > 0:
            await traffic.wait_head(seen, wait)
        if loop.time() >= end:
            return count
        seen = traffic.head
        started = loop.time()
        await users.burst()
        count += 1
        next_at = started + interval


async def loop_lag(samples: list[float]) -> None:
    """This process's own event-loop lag (how late a short sleep wakes) until cancelled:
    whatever the client adds to the latencies it measures while it handles a burst."""
    while True:
        start = time.perf_counter()  # not loop.time(): uvloop's clock counts whole ms
        await asyncio.sleep(LOAD_LAG_TICK)  # the probe itself, not a wait for a condition
        samples.append(time.perf_counter() - start - LOAD_LAG_TICK)


# --- measuring around a phase -------------------------------------------------------------
async def counts(proxy: str) -> collections.Counter[str]:
    raw = await asyncio.to_thread(common.http_get, proxy + "/counts")
    return collections.Counter({k: int(v) for k, v in orjson.loads(raw).items()})


async def metrics(relay: common.Relay) -> dict[str, float]:
    return await asyncio.to_thread(relay.metrics)


def lag_buckets(samples: dict[str, float]) -> dict[float, float]:
    """The event-loop lag histogram's cumulative buckets {le: count} (empty when absent)."""
    out: dict[float, float] = {}
    for key, value in samples.items():
        name, _, labels = key.partition("{")
        if name != LAG_HISTOGRAM + "_bucket":
            continue
        m = re.search(r'le="([^"]+)"', labels)
        if m is not None:
            le = float(m.group(1))
            out[le] = out.get(le, 0.0) + value
    return out


def histogram_quantile(
    q: float, before: dict[float, float], after: dict[float, float]
) -> tuple[float, bool] | None:
    """The ``q`` quantile of the observations between two snapshots of cumulative buckets,
    interpolated within its bucket as Prometheus does; (value, True) when it lies past the
    last finite bucket (value is then that bucket's bound). None without observations."""
    les = sorted(after)
    cum = [after[le] - before.get(le, 0.0) for le in les]
    if not cum or cum[-1] <= 0:
        return None
    rank = q * cum[-1]
    lo, below = 0.0, 0.0
    for le, c in zip(les, cum, strict=True):
        if c >= rank:
            if math.isinf(le):
                return lo, True
            share = (rank - below) / (c - below) if c > below else 1.0
            return lo + (le - lo) * share, False
        lo, below = le, c
    return lo, True


@dataclass
class Snapshot:
    at: float
    upstream: collections.Counter[str]
    cpu: dict[str, float]
    lag: dict[float, float] | None

    @classmethod
    async def take(cls, target: Target, pids: dict[str, int]) -> Snapshot:
        """Now: the target's proxy counts, its relay's lag buckets, and the CPU seconds of
        ``pids`` (every process of the run), this process ("load") and the machine."""
        upstream = await counts(target.proxy)
        lag = None if target.relay is None else lag_buckets(await metrics(target.relay))
        cpu = {name: common.cpu_seconds(pid) for name, pid in pids.items()}
        cpu["load"] = time.process_time()
        cpu["machine"] = common.busy_cpu_seconds()
        return cls(time.monotonic(), upstream, cpu, lag)


def processes(anvil_pid: int, targets: list[Target]) -> dict[str, int]:
    """Every process of the run by name: anvil, each target's proxy and live relay."""
    pids = {"anvil": anvil_pid}
    for t in targets:
        pids["proxy " + t.name] = t.proxy_pid
        if t.relay is not None and t.relay.proc is not None:
            pids["relay " + t.name] = t.relay.proc.pid
    return pids


async def run_phase(
    target: Target, rnd: int, world: World, args: argparse.Namespace, lab: Lab
) -> Phase:
    phase = Phase(target.name, rnd)
    async with target.lock:  # the warm relay's light reader waits meanwhile
        if target.kind == "cold":
            before_start = await counts(target.proxy)
            target.relay = relay = relay_of(target, args)
            STARTED.append(relay)
            await asyncio.to_thread(relay.start)
        try:
            pids = processes(lab.anvil_pid, lab.targets)
            first = await Snapshot.take(target, pids)
            if target.kind == "cold":
                phase.start_upstream = sum((first.upstream - before_start).values())
                first.upstream = before_start
            url = target.relay.url if target.relay is not None else target.proxy
            users = Users(url, world, phase, args.users, rnd)
            watch = asyncio.create_task(loop_lag(phase.load_lag))
            # The client's garbage collector waits for the end of the phase: a full
            # collection stops this loop for tens of ms, which every call then in flight
            # would count as the target's latency. The answers it parses hold no cycles.
            gc.disable()
            try:
                phase.bursts = await bursts(users, world.traffic, args.seconds, args.interval)
            finally:
                gc.enable()
                watch.cancel()
                users.close()
            last = await Snapshot.take(target, pids)
            gc.collect()
        finally:
            if target.kind == "cold" and target.relay is not None:
                await asyncio.to_thread(target.relay.stop)
                target.relay = None
    phase.seconds = last.at - first.at
    phase.upstream = last.upstream - first.upstream
    used = {k: 100.0 * (last.cpu[k] - first.cpu[k]) / phase.seconds for k in first.cpu}
    ours = sum(v for k, v in used.items() if k != "machine")
    phase.cpu = {
        "anvil": used["anvil"],
        "proxy": used["proxy " + target.name],
        "load": used["load"],
        "run": ours,
        "other": max(0.0, used["machine"] - ours),
    }
    phase.relay_cpu = used.get("relay " + target.name)
    if first.lag is not None and last.lag:
        q = histogram_quantile(0.99, first.lag, last.lag)
        if q is None:
            phase.lag_note = "no samples"
        else:
            value, past = q
            phase.lag_p99_ms = value * 1000
            phase.lag_note = f"> {value * 1000:.1f} ms" if past else f"{value * 1000:.2f} ms"
    return phase


@dataclass
class Lab:
    """The processes of the run: anvil and the targets (their proxies and relays)."""

    anvil_pid: int
    targets: list[Target]


# Every relay started, so that each is stopped whatever ends the run.
STARTED: list[common.Relay] = []


def stop_relays() -> None:
    for relay in STARTED:
        relay.stop()


def relay_of(target: Target, args: argparse.Namespace) -> common.Relay:
    extra = UPSTREAM_TOML if target.root == common.ROOT else ""
    return common.Relay(upstream_url(target, args), RELAY_TOML, target.root, upstream_toml=extra)


def upstream_url(target: Target, args: argparse.Namespace) -> str:
    """The relay's upstream: its counting proxy, over WebSocket or HTTP."""
    return target.proxy.replace("http://", "ws://") if args.transport == "ws" else target.proxy


async def light_reader(target: Target, stop: asyncio.Event) -> None:
    """One user polling a warm relay: the head and the latest block, once a second, while
    the relay is not under the burst load (``target.lock``)."""
    assert target.relay is not None
    conn = Conn(target.relay.url)
    bodies = [
        common.request_body("eth_blockNumber", [], 1),
        common.request_body("eth_getBlockByNumber", ["latest", True], 2),
    ]
    try:
        while not stop.is_set():
            async with target.lock:
                for body in bodies:
                    target.light_calls += 1
                    try:
                        async with asyncio.timeout(CALL_TIMEOUT):
                            status, data = await conn.post(body)
                        doc = orjson.loads(data)
                        if status != 200 or not isinstance(doc, dict) or "error" in doc:
                            target.light_errors += 1
                    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                        target.light_errors += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LIGHT_SECONDS)
    finally:
        conn.close()


@dataclass
class Chain:
    """What the run made of the chain, for the report."""

    blocks: int = 0
    per_block: list[int] = field(default_factory=list)
    driver_errors: int = 0
    driver_first_errors: list[str] = field(default_factory=list)


def _check(task: asyncio.Task[None]) -> None:
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise RuntimeError(f"traffic driver stopped: {task.exception()!r}")


async def measure(
    args: argparse.Namespace, anvil: Anvil, targets: list[Target]
) -> tuple[list[Phase], Chain]:
    """Make the busy chain, start the warm relays before its history, then run the phases."""
    async with aiohttp.ClientSession() as session:
        senders = [str(a) for a in await rpc(session, anvil.url, "eth_accounts", [])]
        tokens = await deploy_tokens(session, anvil.url, TOKENS, senders, MINTED)
    rng = random.Random(7)
    recipients = [f"0x{rng.getrandbits(160):040x}" for _ in range(RECIPIENTS)]
    traffic = BusyTraffic(anvil.url, anvil.ws_url, senders, tokens, recipients, per_block=PER_BLOCK)
    world = World(traffic, tokens, senders, senders + recipients)
    for target in targets:
        if target.kind == "warm":
            target.relay = relay_of(target, args)
            STARTED.append(target.relay)
            await asyncio.to_thread(target.relay.start)
    assert anvil.proc is not None
    lab = Lab(anvil.proc.pid, targets)
    stop = asyncio.Event()
    driver = asyncio.create_task(traffic.run(stop))
    readers = [asyncio.create_task(light_reader(t, stop)) for t in targets if t.kind == "warm"]
    phases: list[Phase] = []
    try:
        first = await traffic.wait_head(0, 10.0)
        if first == 0:
            _check(driver)
            raise RuntimeError("no head from anvil's newHeads in 10 s")
        print(f"making {args.history} busy blocks of history from block {first}", flush=True)
        while traffic.head < first + args.history:
            _check(driver)
            await traffic.wait_head(traffic.head, 5.0)
        for rnd in range(args.rounds):
            for target in targets:
                phase = await run_phase(target, rnd, world, args, lab)
                _check(driver)
                phases.append(phase)
                print(phase_line(phase), flush=True)
        last = traffic.head
    finally:
        stop.set()
        for task in readers:
            task.cancel()
        await asyncio.gather(driver, *readers, return_exceptions=True)
    chain = Chain(last - first, [], traffic.errors, traffic.first_errors)
    async with aiohttp.ClientSession() as session:
        calls = [("eth_getBlockTransactionCountByNumber", [hex(n)]) for n in range(first + 1, last)]
        for answer in await rpc_batch(session, anvil.url, calls):
            if "result" in answer:
                chain.per_block.append(int(answer["result"], 16))
    return phases, chain


def phase_line(p: Phase) -> str:
    lat = p.all_latency()
    return (
        f"round {p.round + 1} {p.target:>12s}: {p.total} calls in {p.bursts} bursts "
        f"({p.total / p.seconds:.0f}/s), {sum(p.errors.values())} errors, "
        f"{p.per_call():.3f} upstream calls per call, p50 {common.median(lat) * 1e3:.1f} ms "
        f"p99 {common.quantile(lat, 0.99) * 1e3:.1f} ms max {max(lat, default=0) * 1e3:.1f} ms"
        + (f", relay CPU {p.relay_cpu:.0f}%" if p.relay_cpu is not None else "")
        + (f", loop lag p99 {p.lag_note}" if p.relay_cpu is not None else "")
        + f"; CPU of the run's processes {p.cpu['run']:.0f}%, of others {p.cpu['other']:.0f}%"
    )


# --- the report ---------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base > 0 else "-"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**pass**" if ok else "**fail**")


@dataclass
class Summary:
    """One target's phases, each figure a median over its rounds."""

    phases: list[Phase]

    def med(self, f: Any) -> float:
        return common.median([f(p) for p in self.phases])

    @property
    def per_call(self) -> float:
        return self.med(Phase.per_call)

    @property
    def p50(self) -> float:
        return self.med(lambda p: common.median(p.all_latency()))

    @property
    def p99(self) -> float:
        return self.med(lambda p: common.quantile(p.all_latency(), 0.99))

    @property
    def max(self) -> float:
        return self.med(lambda p: max(p.all_latency(), default=math.nan))

    @property
    def lag_ms(self) -> float | None:
        values = [p.lag_p99_ms for p in self.phases if p.lag_p99_ms is not None]
        return common.median(values) if values else None

    @property
    def lag_text(self) -> str:
        lag = self.lag_ms
        if lag is None:
            return self.phases[0].lag_note
        past = any(p.lag_note.startswith(">") for p in self.phases)
        return f"{lag:.2f} ms" + (" (past the last bucket)" if past else "")

    def method(self, method: str) -> tuple[float, float, float]:
        """(upstream calls of ``method`` per client call of it, p50, p99), medians."""
        per = self.med(
            lambda p: p.upstream[method] / p.calls[method] if p.calls[method] else math.nan
        )
        p50 = self.med(lambda p: common.median(p.latency[method]))
        p99 = self.med(lambda p: common.quantile(p.latency[method], 0.99))
        return per, p50, p99


def report(
    m: dict[str, str],
    targets: list[Target],
    phases: list[Phase],
    chain: Chain,
    args: argparse.Namespace,
) -> str:
    s = {t.name: Summary([p for p in phases if p.target == t.name]) for t in targets}
    direct = s["direct"]
    rows = []
    for t in targets:
        x = s[t.name]
        relay = t.kind != "direct"
        rows.append(
            [
                t.name,
                f"{x.med(lambda p: p.total / p.seconds):.0f}",
                str(sum(sum(p.errors.values()) for p in x.phases)),
                f"**{x.per_call:.3f}** ({' / '.join(f'{p.per_call():.3f}' for p in x.phases)})",
                _ms(x.p50),
                f"**{_ms(x.p99)}**",
                _ms(x.max),
                _ratio(x.p50, direct.p50) if relay else "-",
                f"**{_ratio(x.p99, direct.p99)}**" if relay else "-",
                f"{x.med(lambda p: p.relay_cpu or 0.0):.0f}%" if relay else "-",
                x.lag_text if relay else "-",
            ]
        )
    method_rows = []
    for method, weight in MIX:
        row = [f"`{method}`", f"{weight}%"]
        for t in targets:
            per, p50, p99 = s[t.name].method(method)
            row.append(f"{per:.2f} · {_ms(p50)} / {_ms(p99)}")
        method_rows.append(row)
    seen: collections.Counter[str] = collections.Counter()
    for p in phases:
        seen.update(p.upstream)
    clients = {t.name: sum(p.total for p in s[t.name].phases) for t in targets}
    upstream_rows = []
    for method, _ in seen.most_common():
        row = [f"`{method}`"]
        for t in targets:
            n = sum(p.upstream[method] for p in s[t.name].phases)
            row.append(f"{n / clients[t.name]:.3f}" if n else "-")
        upstream_rows.append(row)
    return "\n".join(
        [
            "## Bursty dapp load on a busy BSC-like chain (`dapp_burst.py`)",
            "",
            common.machine_line(m),
            "",
            f"anvil, chain id 56, a block a second, {chain_summary(chain)}. {args.users} users "
            f"in lockstep bursts (one right after each block, then every {args.interval:g} s, "
            "each after the last answer of the one before); the mix in the script's docstring. "
            f"{args.rounds} rounds of {args.seconds:g} s per target, the targets in turn "
            f"({', '.join(t.name for t in targets)}); the warm relays saw {args.history} busy "
            "blocks before their first phase; relays reach anvil through "
            f"{'WebSocket' if args.transport == 'ws' else 'HTTP'}, each target through its own "
            "counting proxy. Medians over rounds (the upstream column lists the rounds).",
            "",
            common.table(
                [
                    "target",
                    "client calls/s",
                    "errors",
                    "upstream calls per client call",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "p50 vs direct",
                    "p99 vs direct",
                    "relay CPU",
                    "event-loop lag p99",
                ],
                rows,
            ),
            "",
            "Goals:",
            "",
            *goals(targets, s),
            "",
            "Per client method: upstream calls *of the same method* per client call · p50 / "
            "p99 ms (medians over rounds; a relay may answer a method with calls of another, "
            "listed below):",
            "",
            common.table(["method", "share"] + [t.name for t in targets], method_rows),
            "",
            "Upstream methods seen at each target's proxy, per client call (all rounds):",
            "",
            common.table(["upstream method"] + [t.name for t in targets], upstream_rows),
            "",
            "CPU over each phase, % of one core (medians): anvil, the target's proxy, *load* "
            "(this script: the users and the traffic driver), *run* (every process of the run: "
            "those, every proxy and relay), *other* (the rest of the machine, not ours); this "
            "script's loop lag: how late a 10 ms timer fired in it (its garbage collector held "
            "off during the load), a bound on what the client adds to the latencies:",
            "",
            *notes(targets, s, phases, chain),
        ]
    )


def chain_summary(chain: Chain) -> str:
    if not chain.per_block:
        return "no block made while measuring"
    xs = sorted(chain.per_block)
    return (
        f"{len(xs)} busy blocks of {xs[0]} to {xs[-1]} ERC-20 transfers (median "
        f"{common.median(xs):.0f}) on {TOKENS} tokens"
    )


def goals(targets: list[Target], s: dict[str, Summary]) -> list[str]:
    direct = s["direct"]
    lines = []
    for kind, goal in (("warm", GOAL_WARM_UPSTREAM), ("cold", GOAL_COLD_UPSTREAM)):
        for t in (t for t in targets if t.kind == kind):
            x = s[t.name].per_call
            lines.append(
                f"- {t.name}: upstream calls per client call ≤ {goal:g}: {x:.3f} → "
                f"{_verdict(x <= goal)}"
            )
    for t in (t for t in targets if t.kind != "direct"):
        r = s[t.name].p99 / direct.p99
        lines.append(
            f"- {t.name}: p99 ≤ {GOAL_P99_VS_DIRECT:g}x direct: {_ms(s[t.name].p99)} ms against "
            f"{_ms(direct.p99)} ms, {r:.2f}x → {_verdict(r <= GOAL_P99_VS_DIRECT)}"
        )
    for t in (t for t in targets if t.kind != "direct"):
        lag = s[t.name].lag_ms
        ok = None if lag is None else lag <= GOAL_LOOP_LAG_MS
        lines.append(
            f"- {t.name}: event-loop lag p99 ≤ {GOAL_LOOP_LAG_MS:g} ms: {s[t.name].lag_text} → "
            f"{_verdict(ok)}"
        )
    return lines


def notes(
    targets: list[Target], s: dict[str, Summary], phases: list[Phase], chain: Chain
) -> list[str]:
    out = []
    for t in targets:
        x = s[t.name]
        cpu = " · ".join(
            f"{k} {x.med(lambda p, k=k: p.cpu[k]):.0f}%"
            for k in ("anvil", "proxy", "load", "run", "other")
        )
        extra = []
        if t.kind == "cold":
            extra.append(
                f"its start made {x.med(lambda p: p.start_upstream):.0f} upstream calls (median; "
                "counted in its figures)"
            )
        if t.kind == "warm":
            n = t.light_calls
            extra.append(f"light reader {n} calls, {t.light_errors} errors")
        lag99 = x.med(lambda p: common.quantile(p.load_lag, 0.99))
        lag_max = x.med(lambda p: max(p.load_lag, default=math.nan))
        extra.append(f"this script's loop lag p99 {_ms(lag99)} ms, max {_ms(lag_max)} ms")
        empty = sum(sum(p.empty.values()) for p in x.phases)
        if empty:
            extra.append(f"{empty} transactions answered null")
        out.append(
            f"- {t.name}: {x.med(lambda p: p.bursts):.0f} bursts a phase; CPU, % of one core: "
            f"{cpu}" + ("; " + "; ".join(extra) if extra else "")
        )
        errors = [e for p in x.phases for e in p.first_errors][:3]
        if errors:
            out.append("  first errors: " + " | ".join(f"`{e}`" for e in errors))
    floor = common.median([len(p.latest_keys) / p.total for p in phases if p.total])
    out.append(
        f"- the floor: {floor:.3f} of every client call (median of the phases) is an "
        f'{" or ".join(LATEST_STATE)} at "latest" with arguments not yet asked at the '
        "chain's head of the moment. A relay that caches by block sends each of them upstream, "
        f"so {floor:.3f} upstream calls per client call is the least it can reach on this mix; "
        f"the warm goal ({GOAL_WARM_UPSTREAM:g}) leaves {GOAL_WARM_UPSTREAM - floor:+.3f} for "
        "every other call."
    )
    if chain.driver_errors:
        out.append(
            f"- the traffic driver's transfers refused by anvil: {chain.driver_errors} "
            f"(first: {chain.driver_first_errors[:1]})"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of load per phase")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between bursts")
    ap.add_argument("--history", type=int, default=100, help="busy blocks before the load")
    ap.add_argument("--transport", choices=("ws", "http"), default="ws", help="relay -> anvil")
    ap.add_argument("--against", metavar="COMMIT", help="also relays of this older commit")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    kinds = ["direct", "warm", "cold"]
    phases_count = args.rounds * (len(kinds) + (2 if args.against else 0))
    common.budget(int(60 + args.history + phases_count * (args.seconds + PHASE_OVERHEAD)))
    m = common.machine()
    with contextlib.ExitStack() as stack:
        stack.callback(stop_relays)
        anvil = common.start_anvil(block_time=1.0, extra=["--accounts", str(ACCOUNTS)])
        stack.callback(anvil.stop)
        targets = []
        names = list(kinds)
        roots = {k: common.ROOT for k in kinds}
        if args.against:
            base = stack.enter_context(common.checkout(args.against))
            short = common.commit_name(args.against)
            for kind in ("warm", "cold"):
                names.append(f"{kind}@{short}")
                roots[names[-1]] = base
        for name in names:
            proc, url = common.start_counter(anvil)
            stack.callback(common.stop_process, proc)
            targets.append(Target(name, name.split("@")[0], url, roots[name], proxy_pid=proc.pid))

        def run() -> tuple[list[Phase], Chain]:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(measure(args, anvil, targets))

        phases, chain = run()
    text = report(m, targets, phases, chain, args)
    print(text)
    if not args.no_write:
        common.write_section("dapp_burst", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
