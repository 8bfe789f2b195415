"""A WebSocket upstream: calls are bounded by the pool's timeout when the node goes silent,
and the link comes back by itself when the node (or a provider in front of it) drops it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from chainrelay.devnet import DEV_ACCOUNTS, Anvil
from tests.lab.counting_proxy import start_proxy
from tests.lab.procs import Procs, Relay, rpc, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

DEV_BALANCE = hex(10_000 * 10**18)
TIMEOUT = 0.5  # the pool's per-call timeout in these tests, seconds
ATTEMPTS = 2


async def test_silent_ws_node_costs_the_timeout_then_calls_succeed_again(
    anvil: Anvil, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    relay = await relay_factory(
        [anvil.ws_url], f"[pool]\ntimeout = {TIMEOUT}\nmax_attempts = {ATTEMPTS}\n"
    )
    call = ("eth_getBalance", [DEV_ACCOUNTS[2], "pending"])
    assert (await rpc(relay.url, *call))["result"] == DEV_BALANCE
    assert anvil.proc is not None
    os.kill(anvil.proc.pid, signal.SIGSTOP)  # connected and silent: a hung node
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
