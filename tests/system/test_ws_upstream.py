"""A WebSocket upstream: calls are bounded by the pool's timeout when the node goes silent,
and the link comes back by itself when the node (or a provider in front of it) drops it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from chainrelay.devnet import DEV_ACCOUNTS, Anvil
from tests.lab.counting_proxy import start_proxy
from tests.lab.procs import Procs, Relay, rpc, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

DEV_BALANCE = hex(10_000 * 10**18)
TIMEOUT = SECOND / 2  # the pool's per-call timeout in these tests
ATTEMPTS = 2
SILENT = "WebSocket upstream silent"  # the relay's log line when pings go unanswered


async def stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped: a thread busy on the
    other core can still answer for a moment after kill() returns."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:  # a thread that ended meanwhile
                continue
            if state != "T":
                return False
        return True

    await until(stopped, 5 * SECOND, f"process {pid} to stop")


async def test_silent_ws_node_costs_the_timeout_then_calls_succeed_again(
    anvil: Anvil, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    relay = await relay_factory(
        [anvil.ws_url], f"[pool]\ntimeout = {TIMEOUT}\nmax_attempts = {ATTEMPTS}\n"
    )
    call = ("eth_getBalance", [DEV_ACCOUNTS[2], "pending"])
    assert (await rpc(relay.url, *call))["result"] == DEV_BALANCE
    assert anvil.proc is not None
    await stop_process(anvil.proc.pid)  # connected and silent: a hung node
    try:
        started = time.monotonic()
        got = await asyncio.wait_for(rpc(relay.url, *call), 10 * SECOND)
        elapsed = time.monotonic() - started
    finally:
        os.kill(anvil.proc.pid, signal.SIGCONT)
    assert "result" not in got, got
    assert -32099 <= got["error"]["code"] <= -32000, got
    assert got["error"]["data"]["attempts"] == ATTEMPTS
    # Each attempt waited out its own timeout, and no longer.
    assert ATTEMPTS * TIMEOUT * 0.9 <= elapsed < ATTEMPTS * TIMEOUT + 2 * SECOND

    async def answers() -> bool:
        return bool((await rpc(relay.url, *call)).get("result") == DEV_BALANCE)

    await until(answers, 10 * SECOND, "the relay to answer through the node again")


async def test_dropped_ws_link_reconnects_without_failing_a_call(
    anvil: Anvil, procs: Procs, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    proxy = await start_proxy(procs, anvil.url)
    relay = await relay_factory([proxy.ws_url])

    async def linked() -> bool:
        return await proxy.open_websockets() >= 1

    await until(linked, 10 * SECOND, "the relay's WebSocket link through the proxy")
    calls = [("eth_getBalance", [acct, "pending"]) for acct in DEV_ACCOUNTS[:4]]
    for _ in range(3):
        await proxy.drop_websockets()
        for method, params in calls:
            got = await rpc(relay.url, method, params)
            assert got.get("result") == DEV_BALANCE, got
    # The head stream came back too: the relay follows new blocks after the drops.
    first = int((await rpc(relay.url, "eth_blockNumber"))["result"], 16)

    async def advanced() -> bool:
        return int((await rpc(relay.url, "eth_blockNumber"))["result"], 16) > first + 1

    await until(advanced, 10 * SECOND, "the relay's head to advance after the drops")


async def test_ws_link_to_a_silent_node_is_dropped_by_its_pings_then_restored(
    anvil: Anvil, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    ping = 0.3 * SECOND  # between pings in this test
    relay = await relay_factory(
        [anvil.ws_url], f"[pool]\ntimeout = {TIMEOUT}\nws_ping_interval = {ping}\n"
    )
    call = ("eth_getBalance", [DEV_ACCOUNTS[1], "pending"])
    # A live node answers every ping: several periods pass without a reconnection.
    live_until = time.monotonic() + 4 * ping
    while time.monotonic() < live_until:
        assert (await rpc(relay.url, *call))["result"] == DEV_BALANCE
    assert SILENT not in relay.log_path.read_text()
    assert anvil.proc is not None
    await stop_process(anvil.proc.pid)
    try:
        started = time.monotonic()
        await until(
            lambda: SILENT in relay.log_path.read_text(), 10 * SECOND, "the silent link's abort"
        )
        # At most two periods: the one whose ping goes unanswered, and the one after it.
        assert time.monotonic() - started < 2 * ping + 2 * SECOND
    finally:
        os.kill(anvil.proc.pid, signal.SIGCONT)

    async def answers() -> bool:
        return bool((await rpc(relay.url, *call)).get("result") == DEV_BALANCE)

    await until(answers, 10 * SECOND, "the relay to answer through a new link")


async def test_overlapping_calls_spread_over_more_ws_connections_with_anvils_answers(
    anvil: Anvil, procs: Procs, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    # The lab proxy reads a WebSocket's messages one after another and holds eth_getBalance
    # calls until released: calls that overlap one held on a connection are sent on others.
    proxy = await start_proxy(procs, anvil.url, hold=("eth_getBalance",))
    relay = await relay_factory([proxy.ws_url], extra="[pool]\nws_lanes = 3\n")

    async def linked() -> bool:
        return await proxy.open_websockets() >= 1

    await until(linked, 10 * SECOND, "the relay's WebSocket link through the proxy")
    accounts = DEV_ACCOUNTS[:6]
    calls = [
        asyncio.ensure_future(rpc(relay.url, "eth_getBalance", [a, "pending"], i))
        for i, a in enumerate(accounts)
    ]
    try:

        async def spread() -> bool:
            return await proxy.open_websockets() >= 3 and await proxy.held() >= 3

        await until(spread, 10 * SECOND, "calls held on three connections")
        assert await proxy.open_websockets() == 3  # no more than the lanes
        await proxy.release()
        got = await asyncio.wait_for(asyncio.gather(*calls), 10 * SECOND)
    finally:
        for c in calls:
            c.cancel()
    want = [
        await rpc(anvil.url, "eth_getBalance", [a, "pending"], i) for i, a in enumerate(accounts)
    ]
    assert got == want
    # The head stream stays on the first connection: the relay still follows new blocks.
    first = int((await rpc(relay.url, "eth_blockNumber"))["result"], 16)

    async def advanced() -> bool:
        return int((await rpc(relay.url, "eth_blockNumber"))["result"], 16) > first + 1

    await until(advanced, 10 * SECOND, "the relay's head to advance")
