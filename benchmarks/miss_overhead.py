"""Miss-path overhead at low load: what a relay adds to a call it must forward.

Sequential calls that are never cached (``eth_getBalance`` and ``eth_call`` at "pending")
go to anvil directly and through relays, each target on one keep-alive connection, one
call at a time, interleaved call by call (the order rotates) so drift hits every target
alike. Two relays run side by side: one follows anvil over HTTP, one over WebSocket.
A third target, ``miss_floor.py``, forwards the same calls over the same kind of hop
with no relay work: its overhead is what the extra loopback hop alone costs here.
For each call the target's time minus the direct time of the same iteration is recorded;
the table gives its p50 and p99, medians over several rounds. With ``--against COMMIT``
two relays of that older commit (run from its own tree: ``common.checkout``) take part
beside them, so two commits compare side by side in one run.

    python -m benchmarks.miss_overhead [--requests 2000] [--rounds 3] [--against COMMIT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import subprocess
import sys
import time
import typing
from collections.abc import Awaitable, Callable
from typing import Any

import httptools

from benchmarks import common
from chainrelay.devnet import DEV_ACCOUNTS
from chainrelay.upstreams.upstream import HttpUpstream

GOAL_P50_MS = 0.15
WARMUP = 200
FLOOR = "floor: forwarder, no relay work"


def calls(echo: str) -> dict[str, tuple[str, list[Any]]]:
    return {
        "eth_getBalance pending": ("eth_getBalance", [DEV_ACCOUNTS[1], "pending"]),
        "eth_call pending": ("eth_call", [{"to": echo, "data": common.word(7)}, "pending"]),
    }


def start_floor(upstream: str) -> tuple[subprocess.Popen[bytes], str]:
    """``miss_floor.py`` in its own process, forwarding to ``upstream``; (process, URL)."""
    port = common.free_port()
    url = f"http://127.0.0.1:{port}"

    def probe() -> None:
        client = common.RpcClient(url)
        try:
            client.call("eth_chainId", [])
        finally:
            client.close()

    args = ("--port", str(port), "--upstream", upstream.split("://", 1)[1])
    return common.start_server("benchmarks.miss_floor", args, probe), url


class _BareClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with no client library: a request written, its
    answer framed by httptools (the relay's own parser)."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        if self.done is not None:
            self.done.set_result(None)


def client_cpu(url: str, body: bytes, n: int) -> dict[str, float]:
    """CPU µs per call of an HTTP upstream client alone, in this process on uvloop:
    aiohttp's ClientSession set up as ``HttpUpstream`` set it up before it had its own
    client, ``HttpUpstream`` itself (``request``: its pool of keep-alive connections over
    httptools), and a bare asyncio Protocol on one keep-alive connection (what the hop
    costs with no client library)."""
    import aiohttp
    import uvloop

    host, port = url.split("://", 1)[1].rsplit(":", 1)
    request = (
        b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (f"{host}:{port}".encode(), len(body))
    ) + body

    async def timed(call: Callable[[], Awaitable[object]]) -> float:
        for _ in range(WARMUP):
            await call()
        started = time.thread_time()
        for _ in range(n):
            await call()
        return (time.thread_time() - started) / n * 1e6

    async def run() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        out: dict[str, float] = {}
        async with aiohttp.ClientSession(
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as session:

            async def post() -> bytes:
                async with session.post(url, data=body) as resp:
                    return await resp.read()

            out["aiohttp"] = await timed(post)
        upstream = HttpUpstream("bench", url, timeout=10.0, connections=1)
        await upstream.start()
        try:
            out["relay"] = await timed(lambda: upstream.request(body))
        finally:
            await upstream.stop()
        transport, bare = await loop.create_connection(_BareClient, host, int(port))
        try:

            async def exchange() -> None:
                bare.done = loop.create_future()
                transport.write(request)
                await bare.done

            out["bare"] = await timed(exchange)
        finally:
            transport.close()
        return out

    return uvloop.run(run())


def measure(clients: dict[str, common.RpcClient], body: bytes, n: int) -> dict[str, list[float]]:
    """``n`` iterations; each sends ``body`` once to every target, in a rotating order."""
    names = list(clients)
    orders = list(itertools.permutations(names))
    out: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for i in range(n):
        for name in orders[i % len(orders)]:
            c = clients[name]
            t0 = clock()
            c.raw(body)
            out[name].append((clock() - t0) / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="calls per target per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--against", metavar="COMMIT", help="also relays of this older commit")
    args = ap.parse_args(argv)
    common.budget(240 if args.against else 150)
    m = common.machine()
    rows: list[list[str]] = []
    summary: list[str] = []
    with contextlib.ExitStack() as stack:
        anvil = common.start_anvil(block_time=None)
        stack.callback(anvil.stop)
        setup = common.RpcClient(anvil.url)
        stack.callback(setup.close)
        echo = common.deploy(setup, common.echo_initcode())
        relays = {
            "relay (HTTP upstream)": (anvil.url, common.ROOT),
            "relay (WS upstream)": (anvil.ws_url, common.ROOT),
        }
        if args.against:
            root = stack.enter_context(common.checkout(args.against))
            base = common.commit_name(args.against)
            relays[f"relay at {base} (HTTP upstream)"] = (anvil.url, root)
            relays[f"relay at {base} (WS upstream)"] = (anvil.ws_url, root)
        started: dict[str, common.Relay] = {}
        for name, (upstream, tree) in relays.items():
            r = common.Relay(upstream, root=tree)
            stack.callback(r.stop)
            r.start(poke=lambda: setup.call("anvil_mine", ["0x1"]))
            started[name] = r
        floor_proc, floor_url = start_floor(anvil.url)
        stack.callback(common.stop_process, floor_proc)
        clients = {"direct": common.RpcClient(anvil.url), FLOOR: common.RpcClient(floor_url)}
        clients.update({name: common.RpcClient(r.url) for name, r in started.items()})
        for c in clients.values():
            stack.callback(c.close)
        for label, (method, params) in calls(echo).items():
            want = clients["direct"].call(method, params)
            for name in started:
                got = clients[name].call(method, params)
                if got != want:
                    raise RuntimeError(f"{name} {method}: {got!r} != anvil's {want!r}")
            body = common.request_body(method, params, 1)
            measure(clients, body, WARMUP)
            per_round: list[dict[str, Any]] = []
            for rnd in range(args.rounds):
                before = {n: r.metrics() for n, r in started.items()}
                cpu0 = {n: common.cpu_seconds(r.proc.pid) for n, r in started.items() if r.proc}
                floor_cpu0 = common.cpu_seconds(floor_proc.pid)
                gc.disable()
                try:
                    got_times = measure(clients, body, args.requests)
                finally:
                    gc.enable()
                cpu1 = {n: common.cpu_seconds(r.proc.pid) for n, r in started.items() if r.proc}
                stats: dict[str, Any] = {}
                direct = got_times["direct"]
                stats["direct"] = (common.median(direct), common.quantile(direct, 0.99))
                floor = got_times[FLOOR]
                floor_diff = [a - b for a, b in zip(floor, direct, strict=True)]
                stats[FLOOR] = {
                    "p50": common.median(floor),
                    "p99": common.quantile(floor, 0.99),
                    "d50": common.median(floor_diff),
                    "d99": common.quantile(floor_diff, 0.99),
                    "cpu_us": (common.cpu_seconds(floor_proc.pid) - floor_cpu0)
                    / args.requests
                    * 1e6,
                }
                for name, r in started.items():
                    after = r.metrics()
                    passed = common.metric(
                        after, "chainrelay_requests_total", outcome="pass"
                    ) - common.metric(before[name], "chainrelay_requests_total", outcome="pass")
                    if passed < args.requests:
                        raise RuntimeError(
                            f"{name}: only {passed:.0f}/{args.requests} calls were forwarded"
                        )
                    t = got_times[name]
                    diff = [a - b for a, b in zip(t, direct, strict=True)]
                    stats[name] = {
                        "p50": common.median(t),
                        "p99": common.quantile(t, 0.99),
                        "d50": common.median(diff),
                        "d99": common.quantile(diff, 0.99),
                        "cpu_us": (cpu1[name] - cpu0[name]) / args.requests * 1e6,
                    }
                    print(
                        f"{label:24s} round {rnd + 1} {name:22s} p50 {stats[name]['p50']:.3f} "
                        f"(direct {stats['direct'][0]:.3f}) overhead p50 "
                        f"{stats[name]['d50']:.3f} p99 {stats[name]['d99']:.3f} ms, relay CPU "
                        f"{stats[name]['cpu_us']:.0f} µs/call",
                        flush=True,
                    )
                per_round.append(stats)
            d50 = common.median([s["direct"][0] for s in per_round])
            d99 = common.median([s["direct"][1] for s in per_round])
            rows.append([label, "anvil direct", f"{d50:.3f}", f"{d99:.3f}", "", "", "", ""])
            for name in (FLOOR, *started):
                med = {
                    k: common.median([s[name][k] for s in per_round])
                    for k in ("p50", "p99", "d50", "d99", "cpu_us")
                }
                rows.append(
                    [
                        label,
                        name,
                        f"{med['p50']:.3f}",
                        f"{med['p99']:.3f}",
                        f"**{med['d50']:.3f}**",
                        f"{med['d99']:.3f}",
                        f"{med['p50'] / d50:.2f}x",
                        f"{med['cpu_us']:.0f}",
                    ]
                )
                if name == FLOOR:
                    floor_d50 = med["d50"]
                    continue
                verdict = "met" if med["d50"] <= GOAL_P50_MS else "not met"
                summary.append(
                    f"- {label}, {name}: overhead p50 {med['d50']:.3f} ms → goal "
                    f"≤ {GOAL_P50_MS} ms **{verdict}** (the hop alone: {floor_d50:.3f} ms; "
                    f"the relay's own work: {med['d50'] - floor_d50:.3f} ms)"
                )
        balance = calls(echo)["eth_getBalance pending"]
        cost = client_cpu(anvil.url, common.request_body(*balance, 1), args.requests)
        summary.append(
            "- the HTTP upstream client alone (in this process on uvloop, eth_getBalance "
            "pending to the same anvil, CPU per call): the relay's own (`HttpUpstream`, "
            f"httptools under an asyncio Protocol, pooled) **{cost['relay']:.0f} µs**, "
            f"aiohttp `ClientSession` (what it used before) {cost['aiohttp']:.0f} µs "
            f"({cost['relay'] / cost['aiohttp']:.2f}x), a bare asyncio Protocol on one "
            f"connection {cost['bare']:.0f} µs: the client adds "
            f"{cost['relay'] - cost['bare']:.0f} µs to a bare hop, aiohttp added "
            f"{cost['aiohttp'] - cost['bare']:.0f}"
        )
    text = "\n".join(
        [
            "## Miss-path overhead (`miss_overhead.py`)",
            "",
            common.machine_line(m),
            "",
            f"{args.requests} sequential calls per target per round, {args.rounds} rounds, one "
            "keep-alive `http.client` connection per target, interleaved call by call. "
            "Overhead = target time - direct time of the same iteration. Times in ms, medians "
            "over rounds. The floor (`miss_floor.py`: uvloop + httptools, one keep-alive "
            "upstream connection) forwards the same calls with no relay work: what the extra "
            "loopback hop alone costs. CPU µs/call is the target process's user + system time.",
            "",
            common.table(
                [
                    "call",
                    "target",
                    "p50",
                    "p99",
                    "overhead p50",
                    "overhead p99",
                    "p50 ratio",
                    "process CPU µs/call",
                ],
                rows,
            ),
            "",
            *summary,
        ]
    )
    print(text)
    if not args.no_write:
        common.write_section("miss_overhead", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
