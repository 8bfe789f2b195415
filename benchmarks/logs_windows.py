"""Upstream eth_getLogs under a dapp's sliding windows: 20-block windows over the last ~100
blocks, the relay under test side by side with an earlier commit's.

anvil mines a block every ``--block-time`` seconds with ``devnet.traffic`` (transfers and
Transfer-log emitting calls) from before the relays start, so the chain has history none of
them followed; its "finalized" block is two behind the head, as BSC's fast finality makes
it. Each relay (following blocks always, its upstream a WebSocket through
``tests/lab/counting_proxy.py``), once per ``[head] reorg_window`` of ``--reorg-windows``,
gets the same load from simulated users, each polling once every ``--poll`` seconds
(jittered): eth_blockNumber, then eth_getLogs of the emitter's Transfer logs to the user's
account (one of ``--accounts``; the traffic pays three of them) over blocks ``to - 19 ..
to``, ``to`` a random 0..80 blocks below that head. A reorg window shorter
than that reach stands for windows that reach past it. One call in ``--check-every`` is
also asked of anvil directly, after the relay answered, and the two answers compared byte
for byte (the id aside).

Per window of ``--window`` seconds: client eth_getLogs, the eth_getLogs the proxy forwarded
(per 1,000 client calls) and the blocks they spanned (per client call), and the relay's CPU.
The first window starts with the relay's first head: every window reaches blocks it never
followed; later ones less and less.

    python -m benchmarks.logs_windows [--against main] [--reorg-windows 256,32] [--windows 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from benchmarks import common
from chainrelay.devnet import (
    DEV_ACCOUNTS,
    TRANSFER_TOPIC,
    Anvil,
    traffic,
    transfer_emitter_initcode,
)
from tests.lab.chain import topic_of

HEADERS = {"Content-Type": "application/json"}
SPAN = 20  # blocks per window
REACH = 80  # a window ends at most this many blocks below the head
TOML = '[subscriptions]\nfollow_blocks = "always"\n[head]\nreorg_window = {window}\n'


@dataclass
class Load:
    calls: int = 0
    errors: int = 0
    checked: int = 0
    mismatches: int = 0
    first_errors: list[str] = field(default_factory=list)


@dataclass
class Window:
    seconds: float
    client: int
    upstream: int
    blocks: int  # blocks the forwarded eth_getLogs spanned
    cpu: float
    head: int

    def per_1000(self) -> float:
        return 1000.0 * self.upstream / self.client if self.client else float("nan")


class Users:
    def __init__(
        self, relay: str, anvil: str, emitter: str, load: Load, check_every: int, accounts: int
    ) -> None:
        self.accounts = [topic_of(a) for a in DEV_ACCOUNTS] + [
            "0x" + f"{0xA11CE + i:064x}" for i in range(max(0, accounts - len(DEV_ACCOUNTS)))
        ]
        self.accounts = self.accounts[:accounts]
        self.relay = relay
        self.anvil = anvil
        self.emitter = emitter
        self.load = load
        self.check_every = check_every

    async def post(self, session: aiohttp.ClientSession, url: str, body: bytes) -> bytes:
        async with session.post(url, data=body, headers=HEADERS) as r:
            return await r.read()

    async def user(
        self, i: int, session: aiohttp.ClientSession, stop: asyncio.Event, poll: float
    ) -> None:
        rng = random.Random(i)
        load = self.load
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.random() * poll)
        while not stop.is_set():
            started = time.monotonic()
            head_body = common.request_body("eth_blockNumber", [], 1)
            head = orjson.loads(await self.post(session, self.relay, head_body)).get("result")
            if isinstance(head, str):
                top = max(0, int(head, 16) - rng.randint(0, REACH))
                flt = {
                    "fromBlock": hex(max(0, top - SPAN + 1)),
                    "toBlock": hex(top),
                    "address": self.emitter,
                    "topics": [TRANSFER_TOPIC, None, self.accounts[i % len(self.accounts)]],
                }
                body = common.request_body("eth_getLogs", [flt], 1)
                got = await self.post(session, self.relay, body)
                load.calls += 1
                if b'"error"' in got:
                    load.errors += 1
                    if len(load.first_errors) < 5:
                        load.first_errors.append(got.decode(errors="replace")[:200])
                elif load.calls % self.check_every == 0:
                    load.checked += 1
                    if got != await self.post(session, self.anvil, body):
                        load.mismatches += 1
            pause = poll * rng.uniform(0.8, 1.2) - (time.monotonic() - started)
            if pause > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)


async def _get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as r:
        return orjson.loads(await r.read())


async def drive(
    relay: common.Relay, counter_url: str, anvil_url: str, emitter: str, args: Any
) -> tuple[list[Window], Load]:
    load = Load()
    users = Users(relay.url + "/", anvil_url, emitter, load, args.check_every, args.accounts)
    stop = asyncio.Event()
    windows: list[Window] = []
    assert relay.proc is not None
    pid = relay.proc.pid
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        await session.post(counter_url + "/reset")
        tasks = [
            asyncio.create_task(users.user(i, session, stop, args.poll)) for i in range(args.users)
        ]
        try:
            for _ in range(args.windows):
                t0, n0, cpu0 = time.monotonic(), load.calls, common.cpu_seconds(pid)
                await asyncio.sleep(args.window)  # the load runs meanwhile: this is the window
                asked = await _get(session, counter_url + "/params?method=eth_getLogs")
                await session.post(counter_url + "/reset")
                head = relay.metrics().get("chainrelay_head_block", 0.0)
                windows.append(
                    Window(
                        seconds=time.monotonic() - t0,
                        client=load.calls - n0,
                        upstream=len(asked),
                        blocks=sum(_span(p) for p in asked),
                        cpu=common.cpu_seconds(pid) - cpu0,
                        head=int(head),
                    )
                )
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return windows, load


def _span(params: Any) -> int:
    try:
        flt = params[0]
        return int(flt["toBlock"], 16) - int(flt["fromBlock"], 16) + 1
    except (LookupError, TypeError, ValueError):
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="main", help="the earlier commit run side by side")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--accounts", type=int, default=40, help="distinct filters, one per account")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between a user's calls")
    ap.add_argument("--block-time", type=float, default=0.5)
    ap.add_argument("--history", type=int, default=120, help="blocks mined before a relay starts")
    ap.add_argument("--window", type=float, default=10.0, help="seconds per measured window")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument(
        "--reorg-windows", default="256,32", help="the relays' [head] reorg_window, each in turn"
    )
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    reorg_windows = [int(x) for x in args.reorg_windows.split(",")]
    per_target = args.window * args.windows + 15
    common.budget(int(60 + args.history * args.block_time + 2 * len(reorg_windows) * per_target))
    m = common.machine()
    against = common.commit_name(args.against)
    results: dict[str, tuple[list[Window], Load]] = {}
    with contextlib.ExitStack() as stack:
        loop = asyncio.new_event_loop()
        stack.callback(loop.close)
        anvil = Anvil(chain_id=56, block_time=args.block_time, extra=["--slots-in-an-epoch", "1"])
        anvil.start()
        stack.callback(anvil.stop)
        loop.run_until_complete(anvil.wait_ready(20.0))
        setup = common.RpcClient(anvil.url)
        stack.callback(setup.close)
        emitter = common.deploy(setup, transfer_emitter_initcode())
        stop = asyncio.Event()
        tx = loop.create_task(traffic(anvil.url, stop, interval=args.block_time, emitter=emitter))
        first = int(setup.call("eth_blockNumber", []), 16)
        while int(setup.call("eth_blockNumber", []), 16) < first + args.history:
            loop.run_until_complete(asyncio.sleep(0.2))
        old_root = stack.enter_context(common.checkout(args.against))
        targets = [(f"relay at {against}, window {w}", old_root, w) for w in reorg_windows] + [
            (f"relay, window {w}", common.ROOT, w) for w in reorg_windows
        ]
        # Side by side: each window size's two relays one after the other.
        targets.sort(key=lambda t: reorg_windows.index(t[2]))
        for name, root, window in targets:
            counter, counter_url = common.start_counter(anvil)
            upstream = counter_url.replace("http://", "ws://")
            relay = common.Relay(upstream, toml=TOML.format(window=window), root=root)
            try:
                relay.start()
                results[name] = loop.run_until_complete(
                    drive(relay, counter_url, anvil.url, emitter, args)
                )
            finally:
                relay.stop()
                common.stop_process(counter)
            for w in results[name][0]:
                print(
                    f"{name}: head {w.head}, {w.client} eth_getLogs, {w.upstream} upstream "
                    f"({w.per_1000():.0f}/1000, {w.blocks / max(1, w.client):.2f} blocks per "
                    f"call), relay CPU {w.cpu:.2f} s",
                    flush=True,
                )
        stop.set()
        loop.run_until_complete(tx)
    text = report(m, results, args)
    print(text)
    if not args.no_write:
        common.write_section("logs_windows", text)
    return 0


def report(m: dict[str, str], results: dict[str, tuple[list[Window], Load]], args: Any) -> str:
    rows = []
    for name, (windows, load) in results.items():
        for k, w in enumerate(windows):
            rows.append(
                [
                    name if k == 0 else "",
                    f"{k + 1}",
                    f"{w.client / w.seconds:.0f}",
                    f"**{w.per_1000():.0f}**",
                    f"{w.blocks / max(1, w.client):.2f}",
                    f"{1000 * w.cpu / max(1, w.client):.2f}",
                ]
            )
        rows.append(
            [
                "",
                "all",
                f"{load.errors} errors",
                f"**{1000 * sum(w.upstream for w in windows) / max(1, load.calls):.0f}**",
                f"{sum(w.blocks for w in windows) / max(1, load.calls):.2f}",
                f"{load.checked} checked, {load.mismatches} differ",
            ]
        )
    header = [
        "relay",
        f"window ({args.window:.0f} s)",
        "client eth_getLogs/s",
        "upstream eth_getLogs / 1000",
        "blocks asked upstream per call",
        "relay CPU ms per call",
    ]
    return "\n".join(
        [
            "## eth_getLogs over sliding windows (`logs_windows.py`)",
            "",
            common.machine_line(m),
            "",
            f"anvil with {args.block_time} s blocks, finalized 2 blocks behind its head, and"
            f" `devnet.traffic`; {args.history} blocks mined before the first relay starts;"
            f" {args.users} users, each every {args.poll} s:"
            f" eth_getLogs of the emitter's Transfer logs to the user's account (one of"
            f" {args.accounts}) over {SPAN} blocks ending 0..{REACH}"
            " blocks below the head. Each relay follows blocks always, with the `[head]`"
            " `reorg_window` its row names; upstream calls are"
            " counted by the proxy between it and anvil; every"
            f" {args.check_every}th answer is compared with anvil's, byte for byte.",
            "",
            common.table(header, rows),
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
