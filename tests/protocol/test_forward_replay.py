"""Requests forwarded uncached, sent again by their bytes (``ForwardReplay``): a repeat of
a POST forwarded at this head, its id aside, goes upstream as the relay first encoded it,
with no parsing of its head or body, and its answer comes back under its own id. Only an
id of the same length, at the same head, for a client that may call the method. No
sockets: the upstream is a real ``HttpUpstream`` whose one connection is a recording
transport, answered by hand."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import HeadConfig, LimitsConfig, PoolConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc.cache import MemoryCache
from chainrelay.rpc.service import RpcService
from chainrelay.server.http import HttpProtocol, HttpServer, Routes
from chainrelay.upstreams.httplink import HttpLink, LinkPool, Waiter
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import HttpUpstream
from tests.protocol.test_http_fast_path import RecordingTransport, answers, post
from tests.protocol.test_rpc_hits import ADDR, head_at

RESULT = b'"0x56bc75e2d63"'


class Link(RecordingTransport):
    def abort(self) -> None:
        self.closed = True


class NoPlainPost(HttpProtocol):
    """A connection whose requests must never reach ``_plain_post`` (nor httptools)."""

    def _plain_post(self, data: bytes, split: tuple[bytes, bytes] | None = None) -> bool:
        raise AssertionError("the request took the usual path")

    def _feed(self, data: bytes) -> None:
        raise AssertionError("the request went to httptools")


class Node:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.upstream = HttpUpstream("u", "http://node.example:8545/", timeout=5, connections=1)
        pool = UpstreamPool([self.upstream], PoolConfig(), self.metrics)
        self.head = HeadTracker(pool, PROFILES["devnet"], self.metrics, HeadConfig())
        self.head.confirmed_at = float("inf")
        head_at(self.head.view, 100)
        limits = LimitsConfig()
        self.rpc = RpcService(
            MemoryCache(1 << 20, 1 << 16), pool, self.head, self.metrics, 56, limits
        )
        routes = Routes(self.rpc.handle, lambda: (200, b"{}"), lambda: b"", replayer=self.rpc)
        self.server = HttpServer(routes, limits, self.metrics, None)
        links = self.upstream._links = LinkPool(
            self.upstream.target, size=1, depth=1, keepalive=60.0, max_answer_bytes=1 << 20
        )
        self.link = HttpLink(links)
        self.wire = Link()
        self.link.connection_made(self.wire)
        links.links.add(self.link)
        links.idle.append(self.link)

    def ask(self, conn: HttpProtocol, id_: object) -> bytes:
        """Send ``id_``'s balance call on ``conn`` and answer it; what the upstream was sent
        for it."""
        before = len(self.wire.out)
        self.send(conn, id_)
        sent = bytes(self.wire.out[before:])
        assert sent, "nothing went upstream"
        self.answer()
        return sent

    def send(self, conn: HttpProtocol, id_: object) -> None:
        body = orjson.dumps(
            {"jsonrpc": "2.0", "id": id_, "method": "eth_getBalance", "params": [ADDR, "pending"]}
        )
        conn.data_received(post(body))

    def answer(self) -> None:
        """The upstream's answer to the oldest call on its connection."""
        answer = b'{"jsonrpc":"2.0","id":1,"result":%b}' % RESULT
        self.link.data_received(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(answer), answer)
        )


class CountedPlainPost(HttpProtocol):
    """A connection that counts the requests that took the usual path."""

    usual = 0

    def _plain_post(self, data: bytes, split: tuple[bytes, bytes] | None = None) -> bool:
        CountedPlainPost.usual += 1
        return super()._plain_post(data, split)


def connect(node: Node, cls: type[HttpProtocol] = HttpProtocol) -> tuple[HttpProtocol, Link]:
    conn = cls(node.server)
    transport = Link()
    conn.connection_made(transport)
    return conn, transport


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_a_repeat_goes_upstream_as_first_sent_and_comes_back_under_its_own_id() -> None:
    node = Node()
    conn, transport = connect(node)
    first = node.ask(conn, 7)
    await settle()
    assert len(node.server.forwards) == 1
    fast, fast_out = connect(node, NoPlainPost)
    repeats = []
    for i in (8, 9):  # each once the one before was answered (else it waits its turn)
        repeats.append(node.ask(fast, i))
        await settle()
    assert repeats == [first, first]  # the relay's own request, id 1 on its connection
    got = answers(transport.out) + answers(fast_out.out)
    assert [a.doc["id"] for a in got] == [7, 8, 9]
    assert all(a.body.endswith(b',"result":' + RESULT + b"}") for a in got)
    assert len({a.request_id for a in got}) == 3  # each its own X-Request-Id


@pytest.mark.parametrize("why", ["another id length", "another head"])
async def test_a_repeat_that_cannot_be_sent_again_takes_the_usual_path(why: str) -> None:
    node = Node()
    conn, transport = connect(node, CountedPlainPost)
    node.ask(conn, 7)
    await settle()
    CountedPlainPost.usual = 0
    new_id: object = 8
    if why == "another id length":
        new_id = 10
    else:
        head_at(node.head.view, 101)
        node.head.view.generation += 1
    before = node.upstream.calls
    node.ask(conn, new_id)
    await settle()
    got = answers(transport.out)
    assert [a.doc["id"] for a in got] == [7, new_id]
    assert got[1].doc["result"] == orjson.loads(RESULT)
    assert node.upstream.calls == before + 1
    assert CountedPlainPost.usual == 1


async def forwarded_once(node: Node) -> tuple[HttpProtocol, Link]:
    """A balance call forwarded and answered, so that its repeats are forward replays; a
    new connection (``NoPlainPost``) to send them on."""
    conn, _ = connect(node)
    node.ask(conn, 7)
    await settle()
    return connect(node, NoPlainPost)


async def test_a_repeats_answer_is_written_in_the_upstreams_read_not_a_loop_turn_later() -> None:
    node = Node()
    fast, fast_out = await forwarded_once(node)
    node.ask(fast, 8)  # the upstream's answer is read inside: no turn of the loop after it
    got = answers(fast_out.out)
    assert [a.doc["id"] for a in got] == [8]
    assert got[0].body.endswith(b',"result":' + RESULT + b"}")
    assert not fast._queue
    await settle()
    # Measured as any forwarded call is: the first and its repeat, both passed.
    assert node.metrics._requests[("eth_getBalance", "pass")] == [2]


async def test_a_repeat_whose_client_left_before_its_answer_writes_nothing() -> None:
    node = Node()
    fast, fast_out = await forwarded_once(node)
    node.send(fast, 8)
    assert len(fast._queue) == 1
    fast_out.close()
    fast.connection_lost(None)
    node.answer()
    await settle()
    assert answers(fast_out.out) == []
    assert node.upstream.calls == 2  # asked once more, and nothing retried


async def test_a_repeat_answered_inside_its_own_send_is_still_written() -> None:
    node = Node()
    fast, fast_out = await forwarded_once(node)
    raw = b'{"jsonrpc":"2.0","id":1,"result":%b}' % RESULT

    def answered_at_once(head: bytes, tail: bytes, waiter: Waiter) -> bool:
        waiter.set_result(raw)  # as no real link does: the answer before the send returns
        return True

    node.upstream.send_now = answered_at_once  # type: ignore[method-assign]
    node.send(fast, 8)
    got = answers(fast_out.out)
    assert [a.doc["id"] for a in got] == [8] and not fast._queue
