"""One abusive client among 100 well-behaved dapps: what the rate limits per identity save.

anvil (chain id 56) mines a block a second. 100 dapp users, each from its own loopback
address (127.0.1.x: its own identity), call the relay about twice a second with think time
between calls, from a dapp mix (``DAPP_MIX``: the head, balances, the latest block, an
eth_call, a short eth_getLogs window). One abuser (127.0.2.1) sends 20x its tier's budget
in eth_call misses (each with fresh arguments: an upstream call each when admitted),
open loop, whatever it is answered, from a process of its own (its load never delays the
users' own event loop, where their latencies are timed).

Three phases of ``--seconds`` each, the same relay config but for the limits:

* *quiet*: the dapp users alone, limits on ([tiers.default] rate, burst below);
* *abuse*: the users and the abuser, limits on;
* *abuse, no limits*: the same against a relay with limits off.

The three run in turn, ``--rounds`` times: a users' p99 of a few milliseconds on a shared
2-core machine moves by tens of percent from one phase to the next, so each round's
abuse/quiet ratio is taken and the median of them is what the goal is judged by.

Reported: the users' p50/p99 latency per phase, all rounds pooled (goal: the median of
the rounds' abuse/quiet p99 ratios within 1.2x), and the abuser's calls: sent, admitted
(200), refused (429), the cost admitted against its budget (burst + rate x seconds, in
every round) and the upstream calls the relay made beyond the quiet phase's.

    python -m benchmarks.abuse [--seconds 15] [--rounds 3] [--users 100] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import re
import statistics
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks import common
from chainrelay import defaults
from chainrelay.devnet import DEV_ACCOUNTS

RATE = 50.0  # tokens a second per identity
BURST = 100.0
ABUSE_FACTOR = 20  # the abuser asks this many times its budget
THINK = 0.5  # seconds between one user's calls (jittered ±50%)
GOAL_P99 = 1.2
LIMITS_TOML = f"[tiers.default]\nrate = {RATE}\nburst = {BURST}\n"
# The relay believes its head while anvil mines a block a second.
RELAY_TOML = ""
# (weight, method): the dapp mix; params are made per call (``dapp_call``).
DAPP_MIX = [
    (30, "eth_blockNumber"),
    (30, "eth_getBalance"),
    (10, "eth_chainId"),
    (15, "eth_getBlockByNumber"),
    (10, "eth_call"),
    (5, "eth_getLogs"),
]
ABUSER_COST = defaults.RATE_METHOD_COSTS["eth_call"]
# Keep-alive connections the abuser pipelines its calls over.
ABUSER_CONNECTIONS = 4


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    user_errors: int = 0
    user_refused: int = 0
    abuser_sent: int = 0
    abuser_ok: int = 0
    abuser_refused: int = 0
    abuser_other: int = 0
    upstream_calls: float = 0.0
    seconds: float = 0.0
    # The relay's own share of the tail: its CPU (share of one core), its event loop's lag
    # p99 (its own histogram, this phase's samples), and how busy the whole machine was
    # (share of all its CPUs): the users' p99 is timed in a process of its own.
    relay_cpu: float = 0.0
    loop_lag_p99_ms: float = 0.0
    machine_busy: float = 0.0


def dapp_call(rng: random.Random, echo: str, head: int, n: int) -> bytes:
    method = rng.choices([m for _, m in DAPP_MIX], [w for w, _ in DAPP_MIX])[0]
    params: list[Any]
    if method == "eth_getBalance":
        params = [rng.choice(DEV_ACCOUNTS), "latest"]
    elif method == "eth_getBlockByNumber":
        params = ["latest", False]
    elif method == "eth_call":
        params = [{"to": echo, "data": common.word(rng.randrange(8))}, "latest"]
    elif method == "eth_getLogs":
        lo = max(0, head - 10)
        params = [{"fromBlock": hex(lo), "toBlock": hex(lo + 5)}]
    else:
        params = []
    return common.request_body(method, params, n)


async def user(i: int, url: str, echo: str, head: list[int], stop: float, phase: Phase) -> None:
    rng = random.Random(i)
    connector = aiohttp.TCPConnector(local_addr=(f"127.0.1.{i + 1}", 0), limit=1)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as s:
        await asyncio.sleep(rng.random() * THINK)
        n = 0
        while time.monotonic() < stop:
            n += 1
            body = dapp_call(rng, echo, head[0], n)
            t0 = time.perf_counter()
            try:
                async with s.post(url, data=body) as r:
                    data = await r.read()
                    status = r.status
            except aiohttp.ClientError:
                phase.user_errors += 1
                continue
            phase.latencies.append(time.perf_counter() - t0)
            if status == 429:
                phase.user_refused += 1
            elif status != 200 or b'"error"' in data:
                phase.user_errors += 1
            await asyncio.sleep(THINK * (0.5 + rng.random()))


_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


class _Counted(asyncio.Protocol):
    """One of the abuser's keep-alive connections: requests written pipelined, answers
    counted by status as they come back (a head, then its Content-Length of body)."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.owed = 0
        self.settled = asyncio.Event()  # nothing owed (set again at each last answer)
        self.settled.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.transport.write(request)
        self.owed += 1
        self.settled.clear()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[: end + 2]
            found = _LENGTH.search(head)
            size = end + 4 + (int(found.group(1)) if found is not None else 0)
            if len(self.buf) < size:
                return
            self.buf = self.buf[size:]
            self._answered(int(head[9:12]))

    def _answered(self, status: int) -> None:
        if status == 200:
            self.phase.abuser_ok += 1
        elif status == 429:
            self.phase.abuser_refused += 1
        else:
            self.phase.abuser_other += 1
        self.owed -= 1
        if not self.owed:
            self.settled.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase.abuser_other += self.owed
        self.owed = 0
        self.settled.set()


async def abuser(url: str, echo: str, stop: float, phase: Phase) -> None:
    """Open loop: ABUSE_FACTOR x the budget's calls a second, answered or not, pipelined
    on a few keep-alive connections with no HTTP client library: an abuser spends almost
    no CPU of its own, so what the users feel is the relay's doing, not a client's load
    on a shared machine."""
    per_second = ABUSE_FACTOR * RATE / ABUSER_COST
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(ABUSER_CONNECTIONS):
        _, conn = await loop.create_connection(
            lambda: _Counted(phase), host, port, local_addr=("127.0.2.1", 0)
        )
        conns.append(conn)
    started = time.monotonic()
    n = 0
    while time.monotonic() < stop:
        due = started + n / per_second
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        n += 1
        data = common.word(10**6 + n)  # fresh arguments: a miss each
        body = common.request_body("eth_call", [{"to": echo, "data": data}, "latest"], n)
        conn = conns[n % len(conns)]
        phase.abuser_sent += 1
        if conn.transport is None or conn.transport.is_closing():
            phase.abuser_other += 1
            continue
        conn.send(
            b"POST / HTTP/1.1\r\nHost: %b\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (host.encode(), len(body), body)
        )
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            for c in conns:
                await c.settled.wait()
    for c in conns:
        phase.abuser_other += c.owed
        if c.transport is not None:
            c.transport.close()


def abuser_process(url: str, echo: str, stop: float, out: multiprocessing.SimpleQueue[Any]) -> None:
    """``abuser`` in a process of its own; its counts are put on ``out``."""
    phase = Phase("abuser")
    asyncio.run(abuser(url, echo, stop, phase))
    out.put((phase.abuser_sent, phase.abuser_ok, phase.abuser_refused, phase.abuser_other))


async def follow_head(url: str, head: list[int], stop: float) -> None:
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < stop:
            body = common.request_body("eth_blockNumber", [], 1)
            async with s.post(url, data=body) as r:
                head[0] = int(orjson.loads(await r.read())["result"], 16)
            await asyncio.sleep(0.5)


async def run_phase(
    name: str, relay: common.Relay, echo: str, users: int, seconds: float, with_abuser: bool
) -> Phase:
    phase = Phase(name)
    url = relay.url + "/"
    m0 = relay.metrics()
    up0 = common.metric(m0, "chainrelay_upstream_calls_total")
    assert relay.proc is not None
    cpu0, busy0 = common.cpu_seconds(relay.proc.pid), common.busy_cpu_seconds()
    head = [0]
    started = time.monotonic()
    stop = started + seconds
    jobs = [follow_head(url, head, stop)]
    jobs += [user(i, url, echo, head, stop, phase) for i in range(users)]
    proc = None
    if with_abuser:
        # Spawned, not forked: a fork would inherit this running event loop. time.monotonic
        # is one clock across the processes of a host.
        ctx = multiprocessing.get_context("spawn")
        out: multiprocessing.SimpleQueue[Any] = ctx.SimpleQueue()
        proc = ctx.Process(target=abuser_process, args=(url, echo, stop, out))
        proc.start()
    await asyncio.gather(*jobs)
    phase.seconds = time.monotonic() - started
    if proc is not None:
        await asyncio.get_running_loop().run_in_executor(None, proc.join, 30)
        if out.empty():
            raise RuntimeError(f"the abuser's process ended with {proc.exitcode}, no counts")
        counts = out.get()
        phase.abuser_sent, phase.abuser_ok, phase.abuser_refused, phase.abuser_other = counts
    m1 = relay.metrics()
    phase.upstream_calls = common.metric(m1, "chainrelay_upstream_calls_total") - up0
    phase.relay_cpu = (common.cpu_seconds(relay.proc.pid) - cpu0) / phase.seconds
    phase.machine_busy = (common.busy_cpu_seconds() - busy0) / phase.seconds / (os.cpu_count() or 1)
    phase.loop_lag_p99_ms = lag_p99_ms(m0, m1)
    return phase


def lag_p99_ms(before: dict[str, float], after: dict[str, float]) -> float:
    """The p99 of the event-loop lag samples taken between two reads of the relay's
    metrics: the upper bound of the first histogram bucket holding 99% of them."""
    name = "chainrelay_event_loop_lag_seconds_bucket"
    buckets = []
    for key, value in after.items():
        if key.startswith(name + "{") and 'le="' in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    total = buckets[-1][1]
    return next(le for le, n in buckets if n >= 0.99 * total) * 1000


def pooled(phases: list[Phase]) -> Phase:
    """One phase of every round's ``phases`` of one name: their calls and counts summed."""
    out = Phase(phases[0].name)
    for p in phases:
        out.latencies += p.latencies
        out.user_errors += p.user_errors
        out.user_refused += p.user_refused
        out.abuser_sent += p.abuser_sent
        out.abuser_ok += p.abuser_ok
        out.abuser_refused += p.abuser_refused
        out.abuser_other += p.abuser_other
        out.upstream_calls += p.upstream_calls
        out.seconds += p.seconds
    n = len(phases)
    out.relay_cpu = sum(p.relay_cpu for p in phases) / n
    out.machine_busy = sum(p.machine_busy for p in phases) / n
    out.loop_lag_p99_ms = statistics.median(p.loop_lag_p99_ms for p in phases)
    return out


def p99_ms(p: Phase) -> float:
    return common.quantile([x * 1000 for x in p.latencies], 0.99)


def report(m: dict[str, str], rounds: list[list[Phase]], args: argparse.Namespace) -> str:
    quiet, abuse, free = (pooled([r[i] for r in rounds]) for i in range(3))
    rows = []
    for p in (quiet, abuse, free):
        ms = sorted(x * 1000 for x in p.latencies)
        rows.append(
            [
                p.name,
                f"{len(ms):,}",
                f"{common.quantile(ms, 0.5):.2f}",
                f"**{common.quantile(ms, 0.99):.2f}**",
                f"{p.user_refused} / {p.user_errors}",
                f"{p.abuser_sent:,} / {p.abuser_ok:,} / {p.abuser_refused:,}"
                if p.abuser_sent
                else "-",
                f"{p.upstream_calls:,.0f}",
                f"{p.relay_cpu:.0%}",
                f"{p.loop_lag_p99_ms:.1f}",
                f"{p.machine_busy:.0%}",
            ]
        )
    ratios = sorted(p99_ms(r[1]) / p99_ms(r[0]) for r in rounds)
    free_ratios = sorted(p99_ms(r[2]) / p99_ms(r[0]) for r in rounds)
    ratio = statistics.median(ratios)
    free_ratio = statistics.median(free_ratios)
    # The abuser's budget holds in every round (each its own 20x flood against a bucket
    # that had refilled in the rounds' other phases).
    within = all(
        r[1].abuser_ok * ABUSER_COST <= (BURST + RATE * r[1].seconds) * 1.0001 for r in rounds
    )
    budget = len(rounds) * BURST + RATE * abuse.seconds
    cost = abuse.abuser_ok * ABUSER_COST
    extra_upstream = abuse.upstream_calls - quiet.upstream_calls * abuse.seconds / quiet.seconds
    return "\n".join(
        [
            "## One abuser among 100 dapps (`abuse.py`)",
            "",
            common.machine_line(m),
            "",
            f"{args.users} dapp users (one identity each) calling about every {THINK} s "
            f"from a dapp mix; one abuser sending {ABUSE_FACTOR}x its budget in eth_call "
            f"misses ({ABUSE_FACTOR * RATE / ABUSER_COST:.0f} calls/s, cost {ABUSER_COST:g} "
            f"each); [tiers.default] rate = {RATE:g}, burst = {BURST:g}; "
            f"{args.seconds:g} s per phase, the three phases in turn {len(rounds)} times "
            "(the table pools the rounds); anvil mining a block a second.",
            "",
            common.table(
                [
                    "phase",
                    "user calls",
                    "user p50 ms",
                    "user p99 ms",
                    "user 429 / errors",
                    "abuser sent / 200 / 429",
                    "upstream calls",
                    "relay CPU",
                    "relay loop lag p99 ms",
                    "machine busy",
                ],
                rows,
            ),
            "",
            f"- users' p99 with the abuser / without, median of the rounds: **{ratio:.2f}x** "
            f"({', '.join(f'{x:.2f}' for x in ratios)}; goal ≤ {GOAL_P99}x: "
            f"**{'met' if ratio <= GOAL_P99 else 'not met'}**); with limits off: "
            f"{free_ratio:.2f}x ({', '.join(f'{x:.2f}' for x in free_ratios)})",
            f"- the abuser's admitted cost: **{cost:,.0f}** of a budget of {budget:,.0f} "
            f"(burst {BURST:g} a round + {RATE:g}/s x {abuse.seconds:.1f} s): "
            f"**{'within' if within else 'over'}** in every round; upstream calls beyond "
            f"the quiet phases' (scaled to their length): {extra_upstream:,.0f} "
            f"(admitted abuser calls: {abuse.abuser_ok:,}); with limits off it was answered "
            f"{free.abuser_ok:,} times",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds per phase")
    ap.add_argument("--rounds", type=int, default=3, help="times the three phases run in turn")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    common.budget(int(90 + 3 * args.rounds * (args.seconds + 15)))
    m = common.machine()
    with contextlib.ExitStack() as stack:
        anvil = common.start_anvil(block_time=1.0)
        stack.callback(anvil.stop)
        setup = common.RpcClient(anvil.url)
        stack.callback(setup.close)
        echo = common.deploy(setup, common.echo_initcode())
        limited = common.Relay(anvil.ws_url, RELAY_TOML + LIMITS_TOML)
        stack.callback(limited.stop)
        limited.start()
        free = common.Relay(anvil.ws_url, RELAY_TOML + "[tiers.default]\nrate = 0\n")
        stack.callback(free.stop)
        free.start()
        rounds = []
        for _ in range(args.rounds):
            n, s = args.users, args.seconds
            rounds.append(
                [
                    asyncio.run(run_phase("quiet", limited, echo, n, s, False)),
                    asyncio.run(run_phase("abuse", limited, echo, n, s, True)),
                    asyncio.run(run_phase("abuse, no limits", free, echo, n, s, True)),
                ]
            )
    text = report(m, rounds, args)
    print(text)
    if not args.no_write:
        common.write_section("abuse", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
