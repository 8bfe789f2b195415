"""Reads that are never cached, forwarded straight to a WebSocket upstream (RpcService's
forwarding path): the node's answers come back byte for byte, errors included, and a link
lost mid-call sends the call back to the full path instead of failing the client."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import orjson
import pytest

from chainrelay.devnet import DEV_ACCOUNTS, Anvil
from tests.lab.chain import metric
from tests.lab.counting_proxy import start_proxy
from tests.lab.fault_upstream import start_fault_upstream
from tests.lab.procs import Procs, Relay, rpc, until
from tests.lab.timing import SECOND
from tests.system.test_ws_upstream import stop_process

pytestmark = pytest.mark.lab

DEV_BALANCE = hex(10_000 * 10**18)
# Creation code that reverts with one word of data (0x2a): PUSH1 42, PUSH1 0, MSTORE,
# PUSH1 32, PUSH1 0, REVERT.
REVERTS = "0x602a60005260206000fd"


def primary_and_fallback(primary: str, fallback: str) -> str:
    """``[[upstreams]]`` u0, the primary every call goes to first, and u1, its fallback."""
    return (
        f'\n[[upstreams]]\nname = "u0"\nurl = "{primary}"\n'
        f'\n[[upstreams]]\nname = "u1"\nurl = "{fallback}"\nrole = "fallback"\n'
    )


def body(id_: object, method: str, params: Sequence[object]) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": id_, "method": method, "params": params})


CALLS: list[tuple[str, list[object]]] = [
    ("eth_getBalance", [DEV_ACCOUNTS[1], "pending"]),
    ("eth_getTransactionCount", [DEV_ACCOUNTS[0], "pending"]),
    ("eth_call", [{"to": "0x00000000000000000000000000000000000000aa", "data": "0x"}, "pending"]),
    ("eth_call", [{"from": DEV_ACCOUNTS[0], "data": REVERTS}, "pending"]),
    ("eth_getCode", [DEV_ACCOUNTS[0], "pending"]),
]


async def test_forwarded_reads_are_the_nodes_answers_byte_for_byte(
    anvil: Anvil, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    relay = await relay_factory([anvil.ws_url])
    before = await relay.metrics()
    async with aiohttp.ClientSession() as s:

        async def post(url: str, data: bytes) -> bytes:
            async with s.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200
                return await r.read()

        errors = 0
        for id_ in (1, "a-string id", 2**40, None):
            for method, params in CALLS:
                request = body(id_, method, params)
                # Twice: the second call of a body finds its plan memoised for the head.
                for _ in range(2):
                    got = await post(relay.url, request)
                    expected = await post(anvil.url, request)
                    assert got == expected, (request, got, expected)
                errors += b'"error"' in got
    # The revert is the node's own error answer, passed through as it was.
    assert errors == 4
    after = await relay.metrics()
    passed = metric(after, "chainrelay_requests_total", outcome="pass") - metric(
        before, "chainrelay_requests_total", outcome="pass"
    )
    assert passed == 4 * len(CALLS) * 2
    upstream_calls = sum(
        metric(after, "chainrelay_upstream_calls_total", upstream="u0", outcome=o)
        - metric(before, "chainrelay_upstream_calls_total", upstream="u0", outcome=o)
        for o in ("ok", "error")
    )
    assert upstream_calls >= passed


async def test_link_lost_mid_call_falls_back_without_failing_the_client(
    anvil: Anvil, procs: Procs, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    # The lab proxy holds eth_getBalance calls until released: the relay's call is sent on
    # its link and waits there when the link is dropped under it.
    proxy = await start_proxy(procs, anvil.url, hold=("eth_getBalance",))
    relay = await relay_factory([proxy.ws_url])

    async def linked() -> bool:
        return await proxy.open_websockets() >= 1

    await until(linked, 10 * SECOND, "the relay's WebSocket link through the proxy")
    params = [DEV_ACCOUNTS[1], "pending"]
    # The same call under two ids: the second is a repeat, forwarded as it came (on the
    # link, behind the first: the proxy reads a WebSocket's messages one after another).
    first = asyncio.ensure_future(rpc(relay.url, "eth_getBalance", params, 1))
    calls = [first]
    try:

        async def held(n: int) -> bool:
            return await proxy.held() >= n

        await until(lambda: held(1), 10 * SECOND, "the first call to be held at the proxy")
        calls.append(asyncio.ensure_future(rpc(relay.url, "eth_getBalance", params, 2)))
        await proxy.drop_websockets()

        async def sent_again() -> bool:
            # The first ones are counted at arrival; the proxy may let them go with their
            # socket.
            counts = await proxy.counts()
            return counts.get("eth_getBalance", 0) >= 2 and await held(1)

        # The full path takes the calls up again, on a new link (held there too).
        await until(sent_again, 10 * SECOND, "the calls to be sent again")
        assert not any(c.done() for c in calls)
        await proxy.release()
        got = await asyncio.wait_for(asyncio.gather(*calls), 10 * SECOND)
    finally:
        for c in calls:
            c.cancel()
    assert got == [{"jsonrpc": "2.0", "id": i, "result": DEV_BALANCE} for i in (1, 2)]
    samples = await relay.metrics()
    assert (
        metric(samples, "chainrelay_requests_total", method="eth_getBalance", outcome="pass") == 2
    )
    assert metric(samples, "chainrelay_upstream_calls_total", outcome="transport_error") >= 1


async def test_a_hung_node_costs_the_same_attempts_through_the_forwarding_path(
    anvil: Anvil, procs: Procs, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    # The proxy counts every attempt that reaches it, and keeps answering the relay's
    # pings while the node behind it is stopped: each attempt waits out its timeout.
    attempts = 3
    proxy = await start_proxy(procs, anvil.url)
    relay = await relay_factory(
        [proxy.ws_url], f"[pool]\ntimeout = {0.3 * SECOND}\nmax_attempts = {attempts}\n"
    )
    params = [DEV_ACCOUNTS[1], "pending"]
    assert (await rpc(relay.url, "eth_getBalance", params))["result"] == DEV_BALANCE
    assert anvil.proc is not None
    await stop_process(anvil.proc.pid)
    try:
        await proxy.reset()
        got = await asyncio.wait_for(rpc(relay.url, "eth_getBalance", params, 2), 10 * SECOND)
        counts = await proxy.counts()
    finally:
        os.kill(anvil.proc.pid, signal.SIGCONT)
    assert -32099 <= got["error"]["code"] <= -32000, got
    # The forwarded attempt counts against the budget: no extra attempt, none unreported.
    assert got["error"]["data"]["attempts"] == attempts
    assert counts.get("eth_getBalance") == attempts, counts


async def post_raw(url: str, data: bytes) -> bytes:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=data, headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == 200
        return await r.read()


# Bodies whose bytes a node may read otherwise than the relay does; %d: the id. The relay
# decodes them and sends its own encoding, the first time and on every repeat.
ODD_BODIES = [
    # Spaced.
    b'{ "jsonrpc" : "2.0" , "id" : %d , "method" : "eth_getBalance" , '
    b'"params" : [ "' + DEV_ACCOUNTS[1].encode() + b'" , "pending" ] }',
    # A member JSON-RPC does not define.
    b'{"jsonrpc":"2.0","id":%d,"method":"eth_getBalance",'
    b'"params":["' + DEV_ACCOUNTS[1].encode() + b'","pending"],"extra":true}',
    # A key twice: the relay reads the last copy (an empty account in the first).
    b'{"jsonrpc":"2.0","id":%d,"method":"eth_getBalance",'
    b'"params":["0x00000000000000000000000000000000000000aa","pending"],'
    b'"params":["' + DEV_ACCOUNTS[1].encode() + b'","pending"]}',
]


@pytest.mark.parametrize("odd", ODD_BODIES, ids=["spaced", "extra_member", "duplicated_key"])
async def test_repeats_of_a_forwarded_call_are_sent_as_the_relay_encodes_it(
    odd: bytes,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    # No block unless asked: both calls are at one head, so the second is a repeat.
    node = await anvil_factory(chain_id=56, block_time=None)
    relay = await relay_factory([node.ws_url])
    params = [DEV_ACCOUNTS[1], "pending"]
    for id_ in (1, 2):
        got = await post_raw(relay.url, odd % id_)
        expected = await post_raw(node.url, body(id_, "eth_getBalance", params))
        assert got == expected, (id_, got)
    assert orjson.loads(got)["result"] == DEV_BALANCE


async def test_a_forwarded_call_that_failed_is_retried_on_another_upstream(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    procs: Procs,
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    # u0: a WebSocket node behind the lab proxy (which keeps answering the relay's pings
    # once the node is stopped), the primary, so calls are forwarded to it. u1: a healthy
    # node behind a proxy that delays every HTTP answer, the fallback.
    hung = await anvil_factory(chain_id=56, block_time=1.0)
    healthy = await anvil_factory(chain_id=56, block_time=1.0)
    hung_proxy = await start_proxy(procs, hung.url)
    slow_proxy = await start_proxy(procs, healthy.url, delay_ms=100)
    relay = await relay_factory(
        [],
        f"[pool]\ntimeout = {SECOND}\nmax_attempts = 2\nhedge = false\n"
        + primary_and_fallback(hung_proxy.ws_url, slow_proxy.url),
    )
    params = [DEV_ACCOUNTS[1], "pending"]
    assert (await rpc(relay.url, "eth_getBalance", params))["result"] == DEV_BALANCE
    assert hung.proc is not None
    await stop_process(hung.proc.pid)
    try:
        await hung_proxy.reset()
        await slow_proxy.reset()
        got = await asyncio.wait_for(rpc(relay.url, "eth_getBalance", params, 2), 10 * SECOND)
        hung_counts = await hung_proxy.counts()
        healthy_counts = await slow_proxy.counts()
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    assert got == {"jsonrpc": "2.0", "id": 2, "result": DEV_BALANCE}, got
    # Forwarded to the hung node once, then retried on the other one, not on it again.
    assert hung_counts.get("eth_getBalance") == 1, hung_counts
    assert healthy_counts.get("eth_getBalance") == 1, healthy_counts


async def test_garbage_from_a_fake_upstream_on_the_forwarding_path_is_retried_elsewhere(
    anvil: Anvil, procs: Procs, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    # u0 (a fake: no node answers garbage) answers every forwarded call with bytes laid out
    # like an answer under the call's id, that are not JSON; u1, the node behind a proxy
    # that delays its answers, is the fallback.
    fake = await start_fault_upstream(procs, "ws_garbage", anvil.url)
    slow_proxy = await start_proxy(procs, anvil.url, delay_ms=100)
    relay = await relay_factory(
        [],
        "[pool]\nmax_attempts = 2\nhedge = false\n"
        + primary_and_fallback(fake.url.replace("http", "ws", 1), slow_proxy.url),
    )
    params = [DEV_ACCOUNTS[1], "pending"]
    for id_ in (1, 2):  # the second call is a repeat at the same head, as likely as not
        got = await post_raw(relay.url, body(id_, "eth_getBalance", params))
        assert orjson.loads(got) == {"jsonrpc": "2.0", "id": id_, "result": DEV_BALANCE}, got
    assert await fake.fault_calls() >= 1
    samples = await relay.metrics()
    assert metric(samples, "chainrelay_upstream_calls_total", upstream="u0", outcome="ok") >= 1
