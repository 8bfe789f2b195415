"""Event-loop lag of a relay taking in a 1 MB block every second, and nothing else to do.

anvil (chain id 56) mines a block a second (``--block-time 1``, its block gas limit raised
with ``--gas-limit``), and ``devnet.BusyTraffic`` fills every block with 1,000 to 1,500
ERC-20 transfers (``--txs``): BenchToken contracts, twice as many unlocked sender accounts
as transfers in the fullest block (``--accounts``), recipients drawn from 4,000 addresses,
one JSON-RPC batch sent right after each block. A block with its transactions is about
1 MB of JSON, its receipts about twice that (the run measures both: anvil's answers to
``eth_getBlockByNumber(n, true)`` and ``eth_getBlockReceipts(n)``, in bytes).

The relay under test follows every block (``[subscriptions] follow_blocks = "always"``:
it fetches each block and its receipts, warms its cache and holds the logs), its upstream
anvil over WebSocket (``--transport http``: over HTTP). One light reader per relay asks it
for the latest block with its transactions and three of its receipts once a second; no
burst load: what is measured is the block intake alone.

How late its event loop gets: every relay runs under ``benchmarks.lag_probe``, a timer due
every 5 ms on its loop whose lateness is kept in a histogram, with the garbage
collector's pauses by generation: one instrument for a relay of any commit, also from
before the relay had its own ``chainrelay_event_loop_lag_seconds`` (that one, when the
relay has it, is read too, as a cross-check). Per relay: lag p50 / p99 (interpolated
within a bucket), max (the bound of the highest bucket with a sample), the share of
samples over 2 ms, GC pauses by generation (how many, the highest bucket), its CPU, the
blocks it followed (its head's advance) and its block feed troubles. Beside it, *lag on
CPU*: the same timer's lateness as far as the relay's own thread was running meanwhile (see
``benchmarks.lag_probe``: an upper bound of the lag its own work causes; the rest is the
kernel running other processes), and the same probe on an idle event loop in a process of
its own (``LAG_PROBE_IDLE``): the machine's floor, how late a process that does nothing is
woken on a machine this busy.

With ``--against COMMIT`` a relay of that commit (``common.checkout``) follows the same
chain at the same time as this tree's: both take in the same blocks, side by side, on the
same machine (the two compete for its CPUs with anvil and the traffic driver alike).

With ``--pin`` the relays and the idle loop run on the machine's last CPU, anvil and this
script on the others (``common.pin``; section ``intake_lag_pinned``): on a machine of 2
CPUs, anvil mining full blocks keeps both busy, and a process sharing them is woken late
by the kernel whatever it runs (the idle loop's floor shows how late). Pinned, the lag is
the relays' own work, as on a node that does not share its CPUs with the chain's.

    python -m benchmarks.intake_lag [--seconds 150] [--warmup 20] [--txs 1000-1500]
        [--transport ws|http] [--against COMMIT] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import uvloop

from benchmarks import common
from benchmarks.dapp_burst import LAG_HISTOGRAM, Conn, histogram_quantile, lag_buckets
from chainrelay.devnet import Anvil, BusyTraffic, deploy_tokens, rpc, rpc_batch

GC_HISTOGRAM = "chainrelay_gc_pause_seconds"
LAG_CPU_HISTOGRAM = "chainrelay_event_loop_lag_cpu_seconds"
TOKENS = 4
RECIPIENTS = 4_000
MINTED = 10**30
# 1,500 transfers of at most ~52,000 gas each are 78 M gas; a token deployment that mints
# to 3,000 holders is ~91 M gas. anvil's default limit is 30 M.
GAS_LIMIT = 300_000_000
# Sender accounts per transfer of the fullest block: a sender is used again about two
# blocks later, once its last transfer is mined (anvil gives an unlocked account's next
# transaction the nonce of its mined state: one sent again while the last is pending
# replaces it, or is refused as an underpriced replacement).
SENDERS_PER_TRANSFER = 2
# A token's init code carries its holders (32 bytes each): 3,000 of them pass EIP-3860's
# 48 KiB init code limit, which anvil ties to its code size limit (twice it).
CODE_SIZE_LIMIT = 0x10000
# The light reader: the latest block, then this many of its receipts, once a second.
READER_SECONDS = 1.0
READER_RECEIPTS = 3
CALL_TIMEOUT = 10.0
# Blocks whose sizes are measured (evenly spread over the window), after it.
SIZE_SAMPLES = 15
GOAL_LAG_P99_MS = 2.0
RELAY_TOML = '[chain]\nchain_id = 56\n\n[subscriptions]\nfollow_blocks = "always"\n'


@dataclass
class Target:
    name: str
    root: Path
    relay: common.Relay
    probe: Path
    reader_calls: int = 0
    reader_errors: int = 0
    reader_first_errors: list[str] = field(default_factory=list)


@dataclass
class Snapshot:
    at: float
    probe: dict[str, float]
    own: dict[str, float]  # the relay's /metrics
    cpu: float  # the relay's CPU seconds

    @classmethod
    async def take(cls, t: Target) -> Snapshot:
        assert t.relay.proc is not None
        own = await asyncio.to_thread(t.relay.metrics)
        probe = common.parse_metrics(t.probe.read_text()) if t.probe.exists() else {}
        return cls(time.monotonic(), probe, own, common.cpu_seconds(t.relay.proc.pid))


@dataclass
class Result:
    name: str
    seconds: float
    samples: float
    p50_ms: float | None
    p99_ms: float | None
    p99_past: bool
    max_ms: float | None  # bound of the highest bucket with a sample; inf: past the last
    over_2ms: float | None
    cpu_p99_ms: float | None  # lag on CPU (see the module's docstring)
    cpu_over_2ms: float | None
    gc: dict[str, tuple[float, float | None]]  # generation: (pauses, highest bucket)
    own_p99: str  # the relay's own histogram, as a cross-check
    cpu: float  # % of one core
    blocks: float
    problems: float
    reader: str


def highest_bucket(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The bound of the highest bucket that gained an observation between the snapshots
    (inf: past the last finite bound); None when nothing was observed."""
    les = sorted(after)
    below = 0.0
    top = None
    for le in les:
        cum = after[le] - before.get(le, 0.0)
        if cum > below:
            top = le
        below = cum
    return top


def gc_buckets(samples: dict[str, float]) -> dict[str, dict[float, float]]:
    """The GC pause histogram's cumulative buckets by generation."""
    out: dict[str, dict[float, float]] = {}
    for key, value in samples.items():
        name, _, labels = key.partition("{")
        if name != GC_HISTOGRAM + "_bucket":
            continue
        fields = dict(part.split("=", 1) for part in labels.rstrip("}").split(","))
        generation = fields["generation"].strip('"')
        out.setdefault(generation, {})[float(fields["le"].strip('"'))] = value
    return out


def buckets_of(samples: dict[str, float], name: str) -> dict[float, float]:
    """The cumulative buckets {le: count} of histogram ``name`` (empty when absent)."""
    out: dict[float, float] = {}
    for key, value in samples.items():
        metric, _, labels = key.partition("{")
        if metric == name + "_bucket":
            le = labels.partition('le="')[2].partition('"')[0]
            out[float(le)] = out.get(float(le), 0.0) + value
    return out


def lag_of(
    before: dict[float, float], after: dict[float, float]
) -> tuple[float, tuple[float, bool] | None, tuple[float, bool] | None, float | None]:
    """Samples, p50, p99 and the share over 2 ms of a lag histogram between snapshots."""
    total = after.get(math.inf, 0.0) - before.get(math.inf, 0.0)
    under = after.get(0.002, 0.0) - before.get(0.002, 0.0)
    return (
        total,
        histogram_quantile(0.5, before, after),
        histogram_quantile(0.99, before, after),
        (total - under) / total if total else None,
    )


class LagFields(typing.TypedDict):
    """A ``Result``'s fields read off a loop-lag histogram."""

    samples: float
    p50_ms: float | None
    p99_ms: float | None
    p99_past: bool
    max_ms: float | None
    over_2ms: float | None


def lag_fields(before: dict[float, float], after: dict[float, float]) -> LagFields:
    """A ``Result``'s loop-lag fields from a lag histogram's buckets at a window's ends."""
    total, p50, p99, over = lag_of(before, after)
    return {
        "samples": total,
        "p50_ms": None if p50 is None else p50[0] * 1e3,
        "p99_ms": None if p99 is None else p99[0] * 1e3,
        "p99_past": p99 is not None and p99[1],
        "max_ms": None if (top := highest_bucket(before, after)) is None else top * 1e3,
        "over_2ms": over,
    }


def floor_result(first: dict[str, float], last: dict[str, float], seconds: float) -> Result:
    """The idle loop's lag: the machine's floor."""
    return Result(
        name="idle loop (floor)",
        seconds=seconds,
        **lag_fields(lag_buckets(first), lag_buckets(last)),
        cpu_p99_ms=None,
        cpu_over_2ms=None,
        gc={},
        own_p99="",
        cpu=math.nan,
        blocks=math.nan,
        problems=math.nan,
        reader="",
    )


def summarize(t: Target, first: Snapshot, last: Snapshot) -> Result:
    _, _, cpu_p99, cpu_over = lag_of(
        buckets_of(first.probe, LAG_CPU_HISTOGRAM), buckets_of(last.probe, LAG_CPU_HISTOGRAM)
    )
    gc_before, gc_after = gc_buckets(first.probe), gc_buckets(last.probe)
    gc = {}
    for generation in sorted(gc_after):
        a, b = gc_after[generation], gc_before.get(generation, {})
        gc[generation] = (a[math.inf] - b.get(math.inf, 0.0), highest_bucket(b, a))
    own_before, own_after = lag_buckets(first.own), lag_buckets(last.own)
    own = histogram_quantile(0.99, own_before, own_after) if own_after else None
    if not own_after:
        own_text = "n/a (none)"
    elif own is None:
        own_text = "no samples"
    else:
        own_text = ("> " if own[1] else "") + f"{own[0] * 1e3:.2f} ms"
    seconds = last.at - first.at
    problems = sum(
        last.own[k] - first.own.get(k, 0.0)
        for k in last.own
        if k.startswith("chainrelay_block_feed_problems_total")
    )
    return Result(
        name=t.name,
        seconds=seconds,
        **lag_fields(lag_buckets(first.probe), lag_buckets(last.probe)),
        cpu_p99_ms=None if cpu_p99 is None else cpu_p99[0] * 1e3,
        cpu_over_2ms=cpu_over,
        gc=gc,
        own_p99=own_text,
        cpu=100.0 * (last.cpu - first.cpu) / seconds,
        blocks=last.own.get("chainrelay_head_block", 0.0)
        - first.own.get("chainrelay_head_block", 0.0),
        problems=problems,
        reader=f"{t.reader_calls} calls, {t.reader_errors} errors"
        + "".join(f" (`{e[:160]}`)" for e in t.reader_first_errors),
    )


async def reader(t: Target, stop: asyncio.Event) -> None:
    """A light client: the latest block with its transactions and a few of its receipts,
    once a second."""
    conn = Conn(t.relay.url)
    rng = random.Random(t.name)
    ids = 0

    async def call(method: str, params: list[object]) -> object:
        nonlocal ids
        ids += 1
        t.reader_calls += 1
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                status, data = await conn.post(common.request_body(method, params, ids))
            doc = orjson.loads(data)
            if status == 200 and isinstance(doc, dict) and "result" in doc:
                return doc["result"]
            problem = f"HTTP {status}: {data[:200]!r}"
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            problem = repr(exc)
        t.reader_errors += 1
        if len(t.reader_first_errors) < 3:
            t.reader_first_errors.append(f"{method}: {problem}")
        return None

    try:
        while not stop.is_set():
            block = await call("eth_getBlockByNumber", ["latest", True])
            txs = block.get("transactions", []) if isinstance(block, dict) else []
            for tx in rng.sample(txs, min(READER_RECEIPTS, len(txs))):
                await call("eth_getTransactionReceipt", [tx["hash"]])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), READER_SECONDS)
    finally:
        conn.close()


@dataclass
class Chain:
    blocks: int = 0
    seconds: float = 0.0
    per_block: list[int] = field(default_factory=list)
    block_bytes: list[int] = field(default_factory=list)
    receipts_bytes: list[int] = field(default_factory=list)
    anvil_cpu: float = 0.0
    load_cpu: float = 0.0
    other_cpu: float = 0.0
    driver_errors: int = 0
    driver_first_errors: list[str] = field(default_factory=list)
    floor: Result | None = None  # the idle loop's lag


async def raw_size(
    session: aiohttp.ClientSession, url: str, method: str, params: list[object]
) -> int:
    """Bytes of the JSON-RPC answer's ``result`` as the node sends it (the whole answer
    less its envelope, within a few bytes)."""
    body = common.request_body(method, params, 1)
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        return len(await r.read())


def _check(task: asyncio.Task[None]) -> None:
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise RuntimeError(f"traffic driver stopped: {task.exception()!r}")


def probe_file(path: Path) -> dict[str, float]:
    return common.parse_metrics(path.read_text()) if path.exists() else {}


async def measure(
    args: argparse.Namespace, anvil: Anvil, targets: list[Target], idle: Path
) -> tuple[list[Result], Chain]:
    async with aiohttp.ClientSession() as session:
        senders = [str(a) for a in await rpc(session, anvil.url, "eth_accounts", [])]
        print(f"deploying {TOKENS} tokens for {len(senders)} holders", flush=True)
        tokens = await deploy_tokens(session, anvil.url, TOKENS, senders, MINTED)
    rng = random.Random(7)
    recipients = [f"0x{rng.getrandbits(160):040x}" for _ in range(RECIPIENTS)]
    traffic = BusyTraffic(anvil.url, anvil.ws_url, senders, tokens, recipients, per_block=args.txs)
    for t in targets:
        await asyncio.to_thread(t.relay.start)
        if args.relay_cpus is not None:
            assert t.relay.proc is not None
            common.pin(t.relay.proc.pid, args.relay_cpus)
    stop = asyncio.Event()
    driver = asyncio.create_task(traffic.run(stop))
    readers = [asyncio.create_task(reader(t, stop)) for t in targets]
    chain = Chain()
    try:
        start_head = await traffic.wait_head(0, 10.0)
        if start_head == 0:
            _check(driver)
            raise RuntimeError("no head from anvil's newHeads in 10 s")
        print(f"warming up: {args.warmup} busy blocks from block {start_head}", flush=True)
        while traffic.head < start_head + args.warmup:
            _check(driver)
            await traffic.wait_head(traffic.head, 5.0)
        assert anvil.proc is not None
        anvil_cpu0, load_cpu0, machine0 = (
            common.cpu_seconds(anvil.proc.pid),
            time.process_time(),
            common.busy_cpu_seconds(),
        )
        first = [await Snapshot.take(t) for t in targets]
        idle0 = probe_file(idle)
        head0 = traffic.head
        print(f"measuring {args.seconds:g} s from block {head0}", flush=True)
        end = time.monotonic() + args.seconds
        while (left := end - time.monotonic()) > 0:
            _check(driver)
            await traffic.wait_head(traffic.head, min(left, 5.0))  # the window's length
        last = [await Snapshot.take(t) for t in targets]
        idle1 = probe_file(idle)
        head1 = traffic.head
        window = last[0].at - first[0].at
        chain.floor = floor_result(idle0, idle1, window)
        chain.anvil_cpu = 100 * (common.cpu_seconds(anvil.proc.pid) - anvil_cpu0) / window
        chain.load_cpu = 100 * (time.process_time() - load_cpu0) / window
        relays_cpu = sum(b.cpu - a.cpu for a, b in zip(first, last, strict=True))
        ours = chain.anvil_cpu + chain.load_cpu + 100 * relays_cpu / window
        chain.other_cpu = max(0.0, 100 * (common.busy_cpu_seconds() - machine0) / window - ours)
    finally:
        stop.set()
        await asyncio.gather(driver, *readers, return_exceptions=True)
    _check(driver)
    results = [summarize(t, a, b) for t, a, b in zip(targets, first, last, strict=True)]
    chain.blocks, chain.seconds = head1 - head0, window
    chain.driver_errors, chain.driver_first_errors = traffic.errors, traffic.first_errors
    blocks = list(range(head0 + 1, head1 + 1))
    async with aiohttp.ClientSession() as session:
        calls = [("eth_getBlockTransactionCountByNumber", [hex(n)]) for n in blocks]
        for answer in await rpc_batch(session, anvil.url, calls):
            if "result" in answer:
                chain.per_block.append(int(answer["result"], 16))
        step = max(1, len(blocks) // SIZE_SAMPLES)
        for n in blocks[::step][:SIZE_SAMPLES]:
            chain.block_bytes.append(
                await raw_size(session, anvil.url, "eth_getBlockByNumber", [hex(n), True])
            )
            chain.receipts_bytes.append(
                await raw_size(session, anvil.url, "eth_getBlockReceipts", [hex(n)])
            )
    return results, chain


# --- the report ---------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "> 1000"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _gc_text(gc: dict[str, tuple[float, float | None]]) -> str:
    parts = []
    for generation in ("0", "1", "2"):
        count, top = gc.get(generation, (0.0, None))
        top_text = "" if top is None else f" (≤ {_ms(top * 1e3)} ms)"
        if top is not None and math.isinf(top):
            top_text = " (> 1000 ms)"
        parts.append(f"{generation}: {count:.0f}{top_text}")
    return " · ".join(parts)


def _mb(values: list[int]) -> str:
    return f"{common.median(values) / 1e6:.2f} MB" if values else "n/a"


def verdict(r: Result) -> str:
    if r.p99_ms is None:
        return "n/a"
    return "**pass**" if r.p99_ms <= GOAL_LAG_P99_MS and not r.p99_past else "**fail**"


def report(m: dict[str, str], results: list[Result], chain: Chain, args: argparse.Namespace) -> str:
    per = sorted(chain.per_block)
    txs = (
        f"{per[0]} to {per[-1]} ERC-20 transfers a block (median {common.median(per):.0f})"
        if per
        else "no block made"
    )
    rate = chain.blocks / chain.seconds if chain.seconds else math.nan
    rows = [
        [
            r.name,
            f"{r.samples:.0f}",
            _ms(r.p50_ms),
            f"**{'> ' if r.p99_past else ''}{_ms(r.p99_ms)}**",
            ("≤ " if r.max_ms is not None and not math.isinf(r.max_ms) else "") + _ms(r.max_ms),
            "n/a" if r.over_2ms is None else f"{100 * r.over_2ms:.2f}%",
            _ms(r.cpu_p99_ms)
            + ("" if r.cpu_over_2ms is None else f" ({100 * r.cpu_over_2ms:.2f}%)"),
            _gc_text(r.gc),
            f"{r.cpu:.0f}%",
            f"{r.blocks:.0f}",
            f"{r.problems:.0f}",
            r.own_p99,
        ]
        for r in results
    ]
    if chain.floor is not None:
        f = chain.floor
        rows.append(
            [
                f.name,
                f"{f.samples:.0f}",
                _ms(f.p50_ms),
                f"{'> ' if f.p99_past else ''}{_ms(f.p99_ms)}",
                ("≤ " if f.max_ms is not None and not math.isinf(f.max_ms) else "") + _ms(f.max_ms),
                "n/a" if f.over_2ms is None else f"{100 * f.over_2ms:.2f}%",
                *["n/a"] * 6,
            ]
        )
    side = "at the same time, on the same chain" if len(results) > 1 else "alone (no `--against`)"
    lines = [
        "## Event-loop lag while 1 MB blocks arrive every second "
        f"(`intake_lag.py{' --pin' if args.relay_cpus is not None else ''}`)",
        "",
        common.machine_line(m),
        "",
        f"anvil, chain id 56, `--block-time 1`, `--gas-limit {args.gas_limit}`, "
        f"`--accounts {args.accounts}`: {chain.blocks} blocks in the {chain.seconds:.0f} s "
        f"window ({rate:.2f} a second), {txs}. Median sizes of {len(chain.block_bytes)} "
        f"of them: `eth_getBlockByNumber(n, true)` **{_mb(chain.block_bytes)}**, "
        f"`eth_getBlockReceipts(n)` **{_mb(chain.receipts_bytes)}**. Relays "
        f"({', '.join(r.name for r in results)}) follow every block "
        '(`follow_blocks = "always"`) through '
        f"{'WebSocket' if args.transport == 'ws' else 'HTTP'}, {side}, after "
        f"{args.warmup} busy blocks of warm-up; each has one light reader (the latest block "
        f"and {READER_RECEIPTS} of its receipts once a second) and no other load."
        + (
            ""
            if args.relay_cpus is None
            else f" Pinned (`--pin`): the relays and the idle loop on CPU "
            f"{min(args.relay_cpus)}, anvil and this script on the others: the lag is the "
            "relays' own, not anvil's taking their CPU."
        ),
        "",
        "Lag: how late a timer due every 5 ms fired on the relay's loop "
        "(`benchmarks/lag_probe.py`, the same in every relay), over the window; p50 and "
        "p99 interpolated within a bucket, max the bound of the highest bucket with a sample; "
        "*lag on CPU*: the lateness as far as the relay's own thread ran meanwhile (an upper "
        "bound of the lag its own work causes), p99 (share of samples over 2 ms); "
        "GC pauses by generation: how many (the highest bucket); relay CPU in % of one core; "
        "blocks: its head's advance; *own p99*: the relay's own "
        f"`{LAG_HISTOGRAM}` (coarser buckets), where it has one. *idle loop (floor)*: the "
        "same probe on an event loop doing nothing, in a process of its own: how late a "
        "process is woken on this machine meanwhile, whatever it runs.",
        "",
        common.table(
            [
                "relay",
                "lag samples",
                "lag p50 ms",
                "lag p99 ms",
                "lag max ms",
                "samples > 2 ms",
                "lag on CPU p99 ms",
                "GC pauses by generation",
                "relay CPU",
                "blocks",
                "feed troubles",
                "own p99",
            ],
            rows,
        ),
        "",
        "Goal:",
        "",
        *(
            f"- {r.name}: event-loop lag p99 ≤ {GOAL_LAG_P99_MS:g} ms: "
            f"{'> ' if r.p99_past else ''}{_ms(r.p99_ms)} ms → {verdict(r)}"
            for r in results
        ),
        "",
        f"CPU over the window, % of one core: anvil {chain.anvil_cpu:.0f}%, this script (the "
        f"traffic driver and the readers) {chain.load_cpu:.0f}%, the rest of the machine "
        f"{chain.other_cpu:.0f}%. Light readers: "
        + "; ".join(f"{r.name} {r.reader}" for r in results)
        + ".",
    ]
    if chain.driver_errors:
        lines += [
            "",
            f"Transfers anvil refused: {chain.driver_errors} "
            f"(first: `{chain.driver_first_errors[0][:160]}`).",
        ]
    return "\n".join(lines)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _txs(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=150.0, help="seconds measured")
    ap.add_argument("--warmup", type=int, default=20, help="busy blocks before measuring")
    ap.add_argument("--txs", type=_txs, default=(1000, 1500), help="transfers a block: LO-HI")
    ap.add_argument("--accounts", type=int, help="anvil's unlocked accounts (default: 2 HI)")
    ap.add_argument("--gas-limit", type=int, default=GAS_LIMIT, help="anvil's block gas limit")
    ap.add_argument("--transport", choices=("ws", "http"), default="ws", help="relay -> anvil")
    ap.add_argument("--against", metavar="COMMIT", help="also a relay of this older commit")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="relays and the idle loop on the last CPU, anvil and this script on the others",
    )
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    args.accounts = args.accounts or SENDERS_PER_TRANSFER * args.txs[1]
    common.budget(int(120 + 1.5 * args.warmup + args.seconds + 60))
    m = common.machine()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        ap.error("--pin needs 2 CPUs or more")
    # (the relays' CPUs, the load's): the load's are this process's from here on, and so
    # anvil's, which it starts
    pinned = ({cpus[-1]}, set(cpus[:-1])) if args.pin else None
    args.relay_cpus = None if pinned is None else pinned[0]
    if pinned is not None:
        os.sched_setaffinity(0, pinned[1])
    with contextlib.ExitStack() as stack:
        anvil = common.start_anvil(
            block_time=1.0,
            extra=[
                *("--accounts", str(args.accounts), "--gas-limit", str(args.gas_limit)),
                *("--code-size-limit", str(CODE_SIZE_LIMIT)),
            ],
        )
        stack.callback(anvil.stop)
        upstream = anvil.ws_url if args.transport == "ws" else anvil.url
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="intake-lag-")))
        roots = [("this tree", common.ROOT)]
        if args.against:
            base = stack.enter_context(common.checkout(args.against))
            roots.append((common.commit_name(args.against), base))
        targets = []
        for i, (name, root) in enumerate(roots):
            probe = tmp / f"probe-{i}.prom"
            env = {"LAG_PROBE_OUT": str(probe), "PYTHONPATH": str(common.ROOT)}
            relay = common.Relay(upstream, RELAY_TOML, root, module="benchmarks.lag_probe", env=env)
            stack.callback(relay.stop)
            targets.append(Target(name, root, relay, probe))
        idle = tmp / "probe-idle.prom"
        floor = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.lag_probe"],
            cwd=common.ROOT,
            env={**os.environ, "LAG_PROBE_OUT": str(idle), "LAG_PROBE_IDLE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        stack.callback(_stop, floor)
        if pinned is not None:
            common.pin(floor.pid, pinned[0])
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results, chain = runner.run(measure(args, anvil, targets, idle))
    text = report(m, results, chain, args)
    print(text)
    if not args.no_write:
        common.write_section("intake_lag" + ("_pinned" if args.pin else ""), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
