"""Durable-ack latency and throughput of one ingress node, against floors without durability.

Real processes on one host clock:

* anvil (chain id 42161) as every node's upstream;
* ``disk``: a ``chainrelay serve --config`` with ``[batches]``, its durable log (sqlite3
  WAL, ``synchronous=FULL``, group commit) in a directory under /tmp, on the machine's disk;
* ``shm``: the same node, log on tmpfs (/dev/shm): the same work, every fsync free;
* ``floor``: ``batch_floor.py``, the ingress's own session class (``PushSession``)
  answering each push at once (no key, signature, rules or log);
* with ``--against COMMIT``, ``disk at COMMIT``: the disk node of that older commit, run
  from its own tree (``common.checkout``), so two commits compare side by side in one run;
* the pusher, this script in ``load`` mode, in its own process: it signs every push message
  before it connects (signing is the sequencer's cost, not the ingress's), then pipelines
  them over one WebSocket on ``/batches``.

Per run, each target in turn (the order rotates between runs), three phases:

* ``open 2 KB``: warm-up, then a fixed rate (1,000 batches/s for 10 s, no window): ack
  latency p50 / p99 / max from each push's scheduled time to the moment the pusher reads
  its ack, so a stall of the pusher or the node counts against every push due during it
  (coordinated omission); the same from the actual send beside it, and the pusher's own
  lag behind the schedule;
* ``closed 2 KB`` and ``closed 100 KB``: at most ``--window`` unacknowledged pushes:
  sustained acked batches/s and MB/s (payload bytes), first measured send to last ack.

The node's CPU per batch (user + system, all threads, from /proc) is taken over each phase.
Medians over ``--runs`` runs, ratios to the floors. The disk's fsync cost is measured first
by a tiny loop (4 KB write + fsync) in the log's directory.

After the runs, the disk node runs again under cProfile (its event-loop thread; the log's
writer thread is not profiled) through one closed-loop 2 KB phase: its top costs per
acknowledged batch end the section. ``--profile`` runs only that, and prints it.

    python -m benchmarks.batch_ack [--runs 3] [--window 256] [--profile] [--against COMMIT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pstats
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop
from eth_account import Account
from websockets.asyncio.client import connect

from benchmarks import common
from chainrelay.batches.frame import PUSH, Push, encode_push, sign_batch
from chainrelay.devnet import free_port
from chainrelay.tree.frame import Signer

STREAM = "arbitrum/batches"
CHAIN_ID = 42161
API_KEY = "batch-ack-bench-key"
SECTION = "batch_ack"
KB = 1024

# The goals (see batch_common): p99 ack at 1,000 batches/s, acked 2 KB batches/s.
GOAL_P99_MS = 5.0
GOAL_RATE = 5000.0
OPEN_RATE = 1000.0
OPEN_SECONDS = 10.0
# Enough closed-loop pushes for several seconds at the goal rate, few enough to sign quickly.
CLOSED_SMALL = 20_000
CLOSED_LARGE = 1_000
# Pushes before the clock starts: connections, caches and the log's first pages warm.
WARM_SMALL = 500
WARM_LARGE = 50
# A load that has not finished in this long is stuck: the script stops it.
LOAD_TIMEOUT = 180.0
BUDGET_SECONDS = 1500
# What ``--against``'s fourth target (a third of the runs' work again) adds to the budget.
AGAINST_SECONDS = 500
FSYNC_LOOPS = 300


@dataclass(frozen=True)
class Phase:
    name: str
    mode: str  # "open" or "closed"
    size: int
    count: int
    warm: int


PHASES = (
    Phase("open 2 KB", "open", 2 * KB, int(OPEN_RATE * OPEN_SECONDS), WARM_SMALL),
    Phase("closed 2 KB", "closed", 2 * KB, CLOSED_SMALL, WARM_SMALL),
    Phase("closed 100 KB", "closed", 100 * KB, CLOSED_LARGE, WARM_LARGE),
)


# --- the pusher (its own process) --------------------------------------------------------
def push_messages(key: bytes, first_seq: int, count: int, size: int) -> list[bytes]:
    """Signed push messages ``first_seq ..``: incompressible payloads (sequencers send them
    compressed), each different (the seq in its first bytes)."""
    signer = Signer(key)
    block = os.urandom(size)
    out = []
    for seq in range(first_seq, first_seq + count):
        payload = struct.pack(">Q", seq) + block[8:]
        sig = sign_batch(signer, CHAIN_ID, STREAM, seq, payload)
        out.append(encode_push(Push(PUSH, STREAM, seq, sig, payload)))
    return out


async def push_load(
    url: str,
    msgs: list[bytes],
    first_seq: int,
    *,
    mode: str,
    rate: float,
    window: int,
    warm: int,
    signal_pid: int = 0,
) -> dict[str, Any]:
    """Push ``msgs`` (the first ``warm`` unmeasured), at ``rate`` or ``window`` in flight.

    Open loop: each ack is timed from its push's scheduled time (``due``), so a stall of the
    pusher, its socket or the node delays every push scheduled during it and shows in the
    percentiles (no coordinated omission); no window holds a scheduled push back. The
    time from the actual send is kept beside it. Closed loop: due is the send."""
    n = len(msgs)
    if mode == "open":
        window = n
    due = [0.0] * n
    sent = [0.0] * n
    acked = [0.0] * n
    state = {"inflight": 0, "answers": 0, "errors": 0}
    first_error: list[Any] = []
    room = asyncio.Event()
    warmed = asyncio.Event()
    done = asyncio.Event()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with connect(
        url, additional_headers=headers, max_size=None, compression=None, ping_interval=None
    ) as ws:

        async def read() -> None:
            async for m in ws:
                t = time.perf_counter()
                doc = orjson.loads(m)
                i = doc["seq"] - first_seq
                if doc["type"] == "ack":
                    acked[i] = t
                else:
                    state["errors"] += 1
                    if not first_error:
                        first_error.append(doc)
                state["inflight"] -= 1
                state["answers"] += 1
                if state["inflight"] < window:
                    room.set()
                if state["answers"] == warm:
                    warmed.set()
                if state["answers"] == n:
                    done.set()
                    return

        reader = asyncio.create_task(read())

        async def send(i: int) -> None:
            while state["inflight"] >= window:
                room.clear()
                await room.wait()
            state["inflight"] += 1
            sent[i] = time.perf_counter()
            if not due[i]:
                due[i] = sent[i]
            await ws.send(msgs[i])

        for i in range(warm):
            await send(i)
        if warm:
            await asyncio.wait_for(warmed.wait(), LOAD_TIMEOUT)
        if signal_pid:
            os.kill(signal_pid, signal.SIGUSR1)
        cpu0 = time.process_time()
        lag = 0.0
        t0 = time.perf_counter()
        for i in range(warm, n):
            if mode == "open":
                due[i] = t0 + (i - warm) / rate
                ahead = due[i] - time.perf_counter()
                if ahead > 0:
                    await asyncio.sleep(ahead)
                lag = max(lag, time.perf_counter() - due[i])
            await send(i)
        await asyncio.wait_for(done.wait(), LOAD_TIMEOUT)
        cpu = time.process_time() - cpu0
        if signal_pid:
            os.kill(signal_pid, signal.SIGUSR2)
        reader.cancel()
    measured = [(acked[i] - due[i]) * 1e3 for i in range(warm, n) if acked[i]]
    from_send = [(acked[i] - sent[i]) * 1e3 for i in range(warm, n) if acked[i]]
    count = len(measured)
    elapsed = max(acked[warm:]) - due[warm] if count else float("nan")
    size = len(msgs[0]) - 109 if msgs else 0
    return {
        "acked": count,
        "errors": state["errors"],
        "first_error": first_error[0] if first_error else None,
        "p50": common.quantile(measured, 0.5),
        "p99": common.quantile(measured, 0.99),
        "max": max(measured) if measured else float("nan"),
        "p50_send": common.quantile(from_send, 0.5),
        "p99_send": common.quantile(from_send, 0.99),
        "rate": count / elapsed,
        "mbps": count * size / elapsed / 1e6,
        "lag_ms": lag * 1e3,
        "pusher_cpu_us": cpu / max(1, n - warm) * 1e6,
    }


def load_main(args: argparse.Namespace) -> None:
    msgs = push_messages(bytes.fromhex(args.key), args.first_seq, args.count, args.size)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(
            push_load(
                args.url,
                msgs,
                args.first_seq,
                mode=args.mode,
                rate=args.rate,
                window=args.window,
                warm=args.warm,
                signal_pid=args.signal_pid,
            )
        )
    print(orjson.dumps(result).decode())


# --- the targets ---------------------------------------------------------------------------
def ingress_toml(log: Path, sequencer: str) -> str:
    return (
        f'[batches]\nlog = "{log}"\napi_keys = ["{API_KEY}"]\n\n'
        f'[[batches.streams]]\nname = "{STREAM}"\nchain_id = {CHAIN_ID}\n'
        f'sequencers = ["{sequencer}"]\n'
    )


# Runs a node with a profiler that SIGUSR1 turns on and SIGUSR2 turns off and writes out
# (argv: the profile's path, then the CLI's arguments): only the measured pushes count,
# not the start, the imports or the warm-up.
_PROFILED_NODE = """
import cProfile, signal, sys
from chainrelay.cli import main
path = sys.argv[1]
prof = cProfile.Profile()
def stop(*_):
    prof.disable()
    prof.dump_stats(path)
signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
signal.signal(signal.SIGUSR2, stop)
sys.exit(main(sys.argv[2:]))
"""


class ProfiledRelay(common.Relay):
    """The same node with ``_PROFILED_NODE``'s profiler (its event-loop thread)."""

    profile_path: Path = Path()

    def start(self, poke: Any = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="chainrelay-bench-")
        path = Path(self._tmp.name) / "relay.toml"
        path.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n{self._no_admin_line}\n{self.toml}\n\n'
            f'[[upstreams]]\nname = "anvil"\nurl = "{self.upstream}"\n'
        )
        cmd = [sys.executable, "-c", _PROFILED_NODE, str(self.profile_path)]
        cmd += ["--log-level", "WARNING", "serve", "--config", str(path)]
        self.log = tempfile.TemporaryFile(prefix="chainrelay-bench-log-")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root)
        self._wait_ready(poke)


@dataclass
class Target:
    name: str
    url: str
    pid: int
    next_seq: int = 0


def scaled(phase: Phase, scale: float) -> Phase:
    """``phase`` with ``scale`` times its pushes (a quick look at a smaller load)."""
    return Phase(
        phase.name,
        phase.mode,
        phase.size,
        max(1, int(phase.count * scale)),
        max(1, int(phase.warm * scale)),
    )


def run_load(
    target: Target, key: bytes, phase: Phase, window: int, *, profile: bool = False
) -> dict[str, Any]:
    """One phase against one target, the pusher in its own process."""
    cmd = ["load", "--url", target.url, "--key", key.hex(), "--first-seq", str(target.next_seq)]
    cmd += ["--count", str(phase.warm + phase.count), "--size", str(phase.size)]
    cmd += ["--mode", phase.mode, "--rate", str(OPEN_RATE), "--window", str(window)]
    cmd += ["--warm", str(phase.warm)]
    if profile:
        cmd += ["--signal-pid", str(target.pid)]
    proc = common.spawn(
        "benchmarks.batch_ack", *cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    cpu_before = common.cpu_seconds(target.pid)
    try:
        out, err = proc.communicate(timeout=LOAD_TIMEOUT + 60)
    finally:
        common.stop_process(proc)
    cpu = common.cpu_seconds(target.pid) - cpu_before
    if proc.returncode != 0:
        raise RuntimeError(f"pusher failed ({proc.returncode}): {err.decode()[-2000:]}")
    target.next_seq += phase.warm + phase.count
    result: dict[str, Any] = orjson.loads(out.decode().strip().splitlines()[-1])
    # Includes signing-free warm-up and idle time: an upper bound per batch.
    result["node_cpu_us"] = cpu / (phase.warm + phase.count) * 1e6
    return result


def fsync_cost(directory: Path, loops: int = FSYNC_LOOPS) -> tuple[float, float]:
    """Median and p99 µs of a 4 KB append + fsync in ``directory``."""
    times = []
    fd, path = tempfile.mkstemp(dir=directory, prefix="fsync-probe-")
    try:
        block = os.urandom(4096)
        for _ in range(loops):
            t = time.perf_counter()
            os.write(fd, block)
            os.fsync(fd)
            times.append((time.perf_counter() - t) * 1e6)
    finally:
        os.close(fd)
        os.unlink(path)
    return common.quantile(times, 0.5), common.quantile(times, 0.99)


# --- the report ----------------------------------------------------------------------------
def med(results: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def verdict(values: list[float], goal: float, *, below: bool, unit: str, fmt: str) -> str:
    """``values`` against ``goal``: met only when the median meets it, and how many runs
    did, so one lucky run cannot carry the verdict."""
    mid = statistics.median(values)
    ok = [v for v in values if (v <= goal if below else v >= goal)]
    sign = "≤" if below else "≥"
    spread = " / ".join(fmt.format(v) for v in (min(values), mid, max(values))) + unit
    runs = f"{len(ok)} of {len(values)} runs {sign} {fmt.format(goal)}{unit}"
    if (mid <= goal) if below else (mid >= goal):
        state = "met" if len(ok) == len(values) else "median met"
    else:
        state = "NOT met"
    return f"{spread} ({state}: median {fmt.format(mid)}{unit}, {runs})"


def disk_of(directory: Path) -> str:
    """The block device under ``directory`` and its kernel driver (virtio_blk: a disk the
    hypervisor emulates, whose fsync the host may absorb in its cache)."""
    dev = os.stat(directory).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not node.exists():
        return "a device without a block node"
    try:
        name = node.resolve().name
        parent = node / ".." if (node / "partition").exists() else node
        driver = (parent / "device" / "driver").resolve().name
    except OSError:
        return "unknown device"
    return f"/dev/{name} ({driver})"


def report(
    results: dict[tuple[str, str], list[dict[str, Any]]],
    targets: list[str],
    m: dict[str, str],
    fsync: dict[str, tuple[float, float]],
    runs: int,
    window: int,
    disk_device: str,
    load_end: str,
) -> str:
    rows = []
    for phase in PHASES:
        for t in targets:
            rs = results[(phase.name, t)]
            rows.append(
                [
                    phase.name,
                    t,
                    f"{sum(r['acked'] for r in rs):,}",
                    str(sum(r["errors"] for r in rs)),
                    f"{med(rs, 'rate'):,.0f}",
                    f"{med(rs, 'mbps'):.1f}",
                    f"{med(rs, 'p50'):.2f}",
                    f"{med(rs, 'p99'):.2f}",
                    f"{med(rs, 'max'):.2f}",
                    (
                        f"{med(rs, 'p50_send'):.2f} / {med(rs, 'p99_send'):.2f}"
                        if phase.mode == "open"
                        else "-"
                    ),
                    f"{med(rs, 'node_cpu_us'):.0f}" if t != "floor" else "-",
                    f"{med(rs, 'pusher_cpu_us'):.0f}",
                ]
            )
    header = [
        "phase",
        "target",
        "acked",
        "errors",
        "acked/s",
        "MB/s",
        "ack p50 ms",
        "p99 ms",
        "max ms",
        "from send p50 / p99 ms",
        "node CPU µs/batch",
        "pusher CPU µs/batch",
    ]
    ratios = []
    for phase in PHASES:
        disk = results[(phase.name, "disk")]
        parts = []
        for t in targets[1:]:
            other = results[(phase.name, t)]
            if phase.mode == "open":
                parts.append(f"p50 {med(disk, 'p50') / med(other, 'p50'):.1f}x {t}'s")
                parts.append(f"p99 {med(disk, 'p99') / med(other, 'p99'):.1f}x")
            else:
                parts.append(f"{med(disk, 'rate') / med(other, 'rate'):.2f}x {t}'s batches/s")
        ratios.append(f"{phase.name}: disk " + ", ".join(parts))
    lags = [r["lag_ms"] for t in targets for r in results[(PHASES[0].name, t)]]
    p99s = [r["p99"] for r in results[(PHASES[0].name, "disk")]]
    rates = [r["rate"] for r in results[(PHASES[1].name, "disk")]]
    goals = (
        f"Goals (disk, min / median / max of {runs} runs): p99 ack (from the scheduled time) "
        f"at {OPEN_RATE:,.0f}/s "
        + verdict(p99s, GOAL_P99_MS, below=True, unit=" ms", fmt="{:.2f}")
        + "; closed-loop 2 KB acked/s "
        + verdict(rates, GOAL_RATE, below=False, unit="/s", fmt="{:,.0f}")
        + "."
    )
    fs = "; ".join(f"{k} {v[0]:.0f} µs median, {v[1]:.0f} µs p99" for k, v in fsync.items())
    return (
        "## Durable-ack latency and throughput (`batch_ack.py`)\n\n"
        f"{common.machine_line(m)}\n\n"
        f"anvil (chain 42161) + one ingress node (`chainrelay serve`, `[batches]`); the pusher "
        f"in its own process signs every push before the clock and pipelines them over one "
        f"WebSocket. *disk*: the log in /tmp, on {disk_device}: a virtio disk the hypervisor "
        f"emulates, whose fsync is likely absorbed by the host's cache, so the disk figures "
        f"are for this VM (a bare-metal SSD's fsync is usually 0.05-2 ms); *shm*: the same "
        f"node, log on tmpfs (fsync free); *floor*: `batch_floor.py`, the ingress's own "
        f"session class (`PushSession`: a loop turn's answers in one write) acking each push "
        f"at once (no checks, no log). Open loop {OPEN_RATE:,.0f} batches/s for "
        f"{OPEN_SECONDS:g} s, no window: each ack is timed from its push's scheduled time, "
        f"so a stall of the pusher or the node counts against every push due during it "
        f"(the time from the actual send is beside it; the pusher's worst lag behind its "
        f"schedule per run: median {statistics.median(lags):.2f} ms, worst "
        f"{max(lags):.2f} ms). Closed loop {window} in flight. Medians of {runs} runs, "
        f"targets in rotating order; load average at the end {load_end}. Node CPU: user + "
        f"system of the node process over the phase (warm-up included) per batch. "
        f"fsync (4 KB append + fsync, {FSYNC_LOOPS} loops): {fs}.\n\n"
        + common.table(header, rows)
        + "\n\n"
        + "Ratios: "
        + "; ".join(ratios)
        + ".\n\n"
        + goals
        + "\n"
    )


def write_results(body: str, path: Path = common.RESULTS) -> None:
    """Replace this script's section of RESULTS.md, or add it at the end."""
    begin, end = f"<!-- BEGIN {SECTION} -->", f"<!-- END {SECTION} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text()
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


# --- the orchestration -----------------------------------------------------------------------
def profile_report(path: Path, batches: int, top: int = 25) -> str:
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    lines = [
        f"event-loop thread: {total / batches * 1e6:.1f} µs own time per acked batch "
        f"({batches:,} batches, warm-up excluded)",
        f"{'tottime µs/batch':>17} {'cum µs/batch':>13} {'calls/batch':>12}  function",
    ]
    ranked = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in ranked:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}({fn})" if line else fn
        lines.append(
            f"{tt / batches * 1e6:17.2f} {ct / batches * 1e6:13.2f} {nc / batches:12.2f}  {where}"
        )
    return "\n".join(lines)


def profile(args: argparse.Namespace, key: bytes, address: str, upstream: str) -> str:
    """The profile of the disk node under the closed-loop 2 KB load, as text."""
    with tempfile.TemporaryDirectory(prefix="batch-ack-prof-") as tmp:
        node = ProfiledRelay(upstream, ingress_toml(Path(tmp) / "log.sqlite", address))
        node.profile_path = Path(tmp) / "ingress.prof"
        node.start()
        try:
            assert node.proc is not None
            target = Target("disk", f"ws://127.0.0.1:{node.port}/batches", node.proc.pid)
            phase = scaled(PHASES[1], args.scale)
            r = run_load(target, key, phase, args.window, profile=True)
            until_file(node.profile_path)
        finally:
            node.stop()
        head = f"closed 2 KB under cProfile: {r['rate']:,.0f} acked/s, errors {r['errors']}"
        text = head + "\n" + profile_report(node.profile_path, phase.count)
        print(text, flush=True)
        if args.profile_out:
            Path(args.profile_out).write_bytes(node.profile_path.read_bytes())
        return text


def bench(args: argparse.Namespace) -> None:
    common.budget(BUDGET_SECONDS + (AGAINST_SECONDS if args.against else 0))
    account = Account.create()
    key, address = bytes(account.key), account.address
    m = common.machine()
    anvil = common.start_anvil(block_time=1.0, chain_id=CHAIN_ID)
    stack = contextlib.ExitStack()
    try:
        if args.profile:
            profile(args, key, address, anvil.ws_url)
            return
        disk_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="batch-ack-")))
        shm_dir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="batch-ack-", dir="/dev/shm"))
        )
        fsync = {"disk (/tmp)": fsync_cost(disk_dir), "tmpfs (/dev/shm)": fsync_cost(shm_dir)}
        print("fsync:", fsync, flush=True)
        nodes = [("disk", disk_dir, common.ROOT), ("shm", shm_dir, common.ROOT)]
        if args.against:
            older_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="batch-ack-")))
            older = common.commit_name(args.against)
            nodes.append(
                (f"disk at {older}", older_dir, stack.enter_context(common.checkout(args.against)))
            )
        targets: list[Target] = []
        for name, d, root in nodes:
            node = common.Relay(anvil.ws_url, ingress_toml(d / "log.sqlite", address), root=root)
            stack.callback(node.stop)
            node.start()
            assert node.proc is not None
            targets.append(Target(name, f"ws://127.0.0.1:{node.port}/batches", node.proc.pid))
        port = free_port()
        floor = common.spawn("benchmarks.batch_floor", "--port", str(port))
        stack.callback(common.stop_process, floor)
        _wait_port(port)
        targets.append(Target("floor", f"ws://127.0.0.1:{port}/batches", floor.pid))

        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for run in range(args.runs):
            for phase in PHASES:
                order = targets[run % len(targets) :] + targets[: run % len(targets)]
                for t in order:
                    r = run_load(t, key, scaled(phase, args.scale), args.window)
                    results.setdefault((phase.name, t.name), []).append(r)
                    print(
                        f"run {run + 1} {phase.name:>13} {t.name:>5}: {r['rate']:8,.0f}/s "
                        f"{r['mbps']:6.1f} MB/s p50 {r['p50']:6.2f} p99 {r['p99']:6.2f} "
                        f"max {r['max']:6.2f} ms errors {r['errors']} node "
                        f"{r['node_cpu_us']:.0f} µs/batch lag {r['lag_ms']:.1f} ms",
                        flush=True,
                    )
                    if r["first_error"]:
                        print("  first error:", r["first_error"], flush=True)
        load_end = " ".join(f"{x:.2f}" for x in os.getloadavg())
        body = report(
            results,
            [t.name for t in targets],
            m,
            fsync,
            args.runs,
            args.window,
            disk_of(disk_dir),
            load_end,
        )
        if not args.no_profile:
            stack.close()  # the profiled node runs alone
            body += (
                "\nWhere the node's event-loop thread spends a push (`--profile`: cProfile "
                "over the measured closed-loop 2 KB pushes, after the runs above; not the "
                "log's writer thread; the profiler roughly doubles Python call costs, so read "
                "shares, and the unprofiled node CPU per batch in the table):\n\n```\n"
                + profile(args, key, address, anvil.ws_url)
                + "\n```\n"
            )
        print(body)
        if not args.no_write:
            write_results(body)
    finally:
        stack.close()
        anvil.stop()


def until_file(path: Path, timeout: float = 30.0) -> None:
    """Wait for the profiler to have written ``path`` (after SIGUSR2)."""
    deadline = time.monotonic() + timeout
    size = -1
    while True:
        now = path.stat().st_size if path.exists() else -1
        if now > 0 and now == size:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no profile at {path} after {timeout}s")
        size = now
        time.sleep(0.2)


def _wait_port(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd")
    load = sub.add_parser("load", help="the pusher (run by the benchmark in its own process)")
    load.add_argument("--url", required=True)
    load.add_argument("--key", required=True)
    load.add_argument("--first-seq", type=int, required=True)
    load.add_argument("--count", type=int, required=True)
    load.add_argument("--size", type=int, required=True)
    load.add_argument("--mode", choices=("open", "closed"), required=True)
    load.add_argument("--rate", type=float, default=OPEN_RATE)
    load.add_argument("--window", type=int, default=256)
    load.add_argument("--warm", type=int, default=0)
    load.add_argument("--signal-pid", type=int, default=0, help="SIGUSR1/2 around the clock")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="only the profile, printed")
    parser.add_argument("--no-profile", action="store_true", help="runs without the profile")
    parser.add_argument("--profile-out", help="keep the cProfile file here")
    parser.add_argument("--scale", type=float, default=1.0, help="times the pushes per phase")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md")
    parser.add_argument("--against", metavar="COMMIT", help="also a disk node of this commit")
    args = parser.parse_args(argv)
    if args.cmd == "load":
        load_main(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
