"""A WebSocket upstream's single calls spread over several connections while they overlap
(``WsUpstream`` lanes): the first connection while it is idle, else the one with the fewest
calls under way, one more opened beside them up to ``lanes``; subscriptions and their
unsubscribes on the first; a connection lost fails its own calls, and the first lost
closes the others. No sockets: each connection is a link joined by hand to websockets' own
server protocol object (``Pair``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.frames import Frame

from chainrelay.upstreams.upstream import TransportError
from chainrelay.upstreams.wslink import WsLink, WsUpstream
from tests.lab.procs import until
from tests.lab.timing import SECOND
from tests.protocol.test_ws_link import Pair


class Lanes(WsUpstream):
    """A WebSocket upstream whose further connections are pairs made here (or refused)."""

    def __init__(self, lanes: int) -> None:
        super().__init__("node", "ws://node.example/", timeout=5, connections=1, lanes=lanes)
        first = Pair(self)
        self._link = first.link
        self.pairs = [first]
        self.refuse = False

    async def _connect(
        self,
        on_message: Callable[[bytes], None] | None = None,
        on_lost: Callable[[WsLink], None] | None = None,
    ) -> WsLink:
        if self.refuse:
            raise TransportError("connect: refused")
        pair = Pair(self, on_message, on_lost)
        self.pairs.append(pair)
        return pair.link


def requests(pair: Pair) -> list[dict[str, Any]]:
    return [orjson.loads(e.data) for e in pair.server_reads() if isinstance(e, Frame)]


def answer(pair: Pair, doc: dict[str, Any], result: str) -> None:
    pair.server.send_text(b'{"jsonrpc":"2.0","id":%d,"result":"%s"}' % (doc["id"], result.encode()))
    pair.to_link(pair.server_bytes())


async def sent_on(pair: Pair) -> dict[str, Any]:
    got: list[dict[str, Any]] = []

    def read() -> bool:
        got.extend(requests(pair))
        return bool(got)

    await until(read, SECOND, "a request on the connection")
    (doc,) = got
    return doc


async def test_overlapping_calls_spread_over_connections_opened_up_to_the_lanes() -> None:
    up = Lanes(lanes=3)
    first = up.pairs[0]
    a = asyncio.ensure_future(up.call("eth_chainId", []))
    doc_a = await sent_on(first)  # the first, idle
    b = asyncio.ensure_future(up.call("eth_blockNumber", []))
    doc_b = await sent_on(first)  # the first still (the fewest), while another opens
    await until(lambda: len(up._extra) == 1, SECOND, "a second connection")
    c = asyncio.ensure_future(up.call("eth_gasPrice", []))
    doc_c = await sent_on(up.pairs[1])  # idle: taken at once
    d = asyncio.ensure_future(up.call("net_version", []))
    doc_d = await sent_on(up.pairs[1])  # 1 under way there, 2 on the first
    await until(lambda: len(up._extra) == 2, SECOND, "a third connection")
    e = asyncio.ensure_future(up.call("web3_clientVersion", []))
    doc_e = await sent_on(up.pairs[2])
    assert up.in_flight == 5
    f = asyncio.ensure_future(up.call("eth_chainId", []))
    doc_f = await sent_on(up.pairs[2])
    await asyncio.sleep(0)
    assert len(up.pairs) == 3 and not up._opening  # no more than the lanes
    for pair, doc, result in (
        (first, doc_a, "0x38"),
        (first, doc_b, "0x10"),
        (up.pairs[1], doc_c, "0x1"),
        (up.pairs[1], doc_d, "56"),
        (up.pairs[2], doc_e, "anvil"),
        (up.pairs[2], doc_f, "0x39"),
    ):
        answer(pair, doc, result)
    got = [(await call).result for call in (a, b, c, d, e, f)]
    assert got == [b'"0x38"', b'"0x10"', b'"0x1"', b'"56"', b'"anvil"', b'"0x39"']
    assert up.in_flight == 0 and not up._deadlines


async def test_subscriptions_and_their_unsubscribes_stay_on_the_first_connection() -> None:
    up = Lanes(lanes=2)
    first = up.pairs[0]
    busy = asyncio.ensure_future(up.call("eth_chainId", []))
    doc = await sent_on(first)
    await until(lambda: not up._opening, SECOND, "nothing opening")
    assert not up._extra  # opened only when a call finds the first busy
    other = asyncio.ensure_future(up.call("eth_blockNumber", []))
    await until(lambda: len(up._extra) == 1, SECOND, "a second connection")
    on_first = await sent_on(first)
    off = asyncio.ensure_future(up.call("eth_unsubscribe", ["0xab"]))
    unsub = await sent_on(first)  # the first, busy as it is, not the idle second
    assert unsub["method"] == "eth_unsubscribe"
    assert requests(up.pairs[1]) == []
    answer(first, doc, "0x38")
    answer(first, on_first, "0x10")
    first.server.send_text(b'{"jsonrpc":"2.0","id":%d,"result":true}' % unsub["id"])
    first.to_link(first.server_bytes())
    assert [(await x).result for x in (busy, other, off)] == [b'"0x38"', b'"0x10"', b"true"]


async def test_a_lost_connection_fails_its_own_calls_and_the_first_lost_closes_all() -> None:
    up = Lanes(lanes=2)
    first = up.pairs[0]
    on_first = asyncio.ensure_future(up.call("eth_chainId", []))
    await sent_on(first)
    also_first = asyncio.ensure_future(up.call("eth_blockNumber", []))
    await sent_on(first)
    await until(lambda: len(up._extra) == 1, SECOND, "a second connection")
    second = up.pairs[1]
    on_second = asyncio.ensure_future(up.call("eth_gasPrice", []))
    await sent_on(second)
    second.link.connection_lost(None)  # the second alone: its call fails, the others wait
    with pytest.raises(TransportError):
        await on_second
    assert not up._extra and not on_first.done() and not also_first.done()
    await until(lambda: not up._opening, SECOND, "nothing opening")
    third_call = asyncio.ensure_future(up.call("eth_gasPrice", []))
    await until(lambda: len(up._extra) == 1, SECOND, "another connection")
    await sent_on(first)  # sent while the first was the only one open
    on_third = asyncio.ensure_future(up.call("net_version", []))
    await sent_on(up.pairs[2])
    first.link.connection_lost(None)  # the first: every call fails, the others close
    for call in (on_first, also_first, third_call, on_third):
        with pytest.raises(TransportError):
            await call
    assert up._link is None and not up._extra and up.in_flight == 0
    assert up.pairs[2].transport.closed


async def test_a_connection_that_fails_to_open_is_not_tried_again_for_a_while() -> None:
    up = Lanes(lanes=3)
    up.refuse = True
    first = up.pairs[0]
    link = first.link
    calls = [asyncio.ensure_future(up.call("eth_chainId", []))]
    docs = [await sent_on(first)]
    calls.append(asyncio.ensure_future(up.call("eth_chainId", [])))
    docs.append(await sent_on(first))
    await until(lambda: not up._opening, SECOND, "the attempt to end")
    assert up._lanes_after > link.loop.time()
    calls.append(asyncio.ensure_future(up.call("eth_chainId", [])))
    docs.append(await sent_on(first))  # on the first, and no new attempt meanwhile
    assert not up._opening and not up._extra and len(up.pairs) == 1
    for doc in docs:
        answer(first, doc, "0x38")
    assert [(await call).result for call in calls] == [b'"0x38"'] * 3
