"""The subscription service without sockets: a session stand-in records what would be sent.

Pair tier: the asyncio service driven in memory against a stand-in session and feed (the
decisions it delegates are proved sans-I/O in tests/protocol/test_fanout.py). Covers what
the system tests can only see by chance: a notification never overtakes the answer that
announces its subscription, removed logs come oldest block first, one encoding per
block is shared by every subscriber, a connection's notifications of one block go out in
one write, and every limit answers -32005. What the service writes is parsed back by
websockets' own client protocol, so every frame it splices is proved a valid final text
frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from chainrelay.access.identity import Identity
from chainrelay.chain.events import BlockEvent
from chainrelay.config import FiltersConfig, SubscriptionsConfig
from chainrelay.metrics import Metrics
from chainrelay.server.ws import WsSession
from chainrelay.subscriptions import registry as subs_proto
from chainrelay.subscriptions import service as subs_mod
from chainrelay.subscriptions.service import Connection, SubscriptionService
from chainrelay.wire.jsonrpc import Answer
from tests.lab.timing import SECOND

TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
OTHER = "0x" + "77" * 32


class FakeFeed:
    def __init__(self) -> None:
        self.listeners: list[Callable[[list[BlockEvent]], None]] = []
        self.head_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.pending: list[Callable[[str], None]] = []

    def add_listener(self, fn: Callable[[list[BlockEvent]], None]) -> None:
        self.listeners.append(fn)

    def remove_listener(self, fn: Callable[[list[BlockEvent]], None]) -> None:
        self.listeners.remove(fn)

    def add_head_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.head_listeners.append(fn)

    def remove_head_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.head_listeners.remove(fn)

    def add_pending_listener(self, fn: Callable[[str], None]) -> None:
        self.pending.append(fn)

    def remove_pending_listener(self, fn: Callable[[str], None]) -> None:
        self.pending.remove(fn)

    def emit(self, events: list[BlockEvent]) -> None:
        for fn in list(self.listeners):
            fn(events)

    def emit_head(self, header: dict[str, Any]) -> None:
        for fn in list(self.head_listeners):
            fn(header)


class FakeTransport:
    def __init__(self, ip: str) -> None:
        self.ip = ip

    def get_extra_info(self, name: str) -> Any:
        return (self.ip, 40000) if name == "peername" else None


class FakeSession:
    """Stands in for ``ws.WsSession``: what the service writes is read by a websockets
    client protocol, as a client would, and kept message by message."""

    def __init__(self, ip: str = "10.0.0.1", who: Identity | None = None) -> None:
        self.transport = FakeTransport(ip)
        self.who = who or Identity(ip)  # what the front door found: a key, else the address
        self.sent: list[bytes] = []
        self.writes = 0
        self.aborted = asyncio.Event()
        self.close: tuple[int, str] | None = None
        self.client = ClientProtocol(parse_uri("ws://relay.test/"), state=State.OPEN)

    def send_frames(self, frames: bytes) -> None:
        self.writes += 1
        self.client.receive_data(frames)
        for ev in self.client.events_received():
            assert isinstance(ev, Frame), ev
            assert ev.opcode is Opcode.TEXT and ev.fin, ev
            self.sent.append(bytes(ev.data))
        assert self.client.parser_exc is None
        assert self.client.data_to_send() == []  # nothing for the client to answer or close

    def abort(self) -> None:
        self.aborted.set()

    def close_now(self, code: int, reason: str) -> None:
        self.close = (code, reason)


def subscribe(conn: Connection, params: list[Any], announce: bool = True) -> str:
    answer = conn.call("eth_subscribe", params)
    assert answer.error is None, answer.error
    assert answer.result is not None
    if announce:
        conn.answered(b'{"jsonrpc":"2.0","id":1,"result":' + answer.result + b"}")
    return str(orjson.loads(answer.result))


def log(n: int, index: int, topic: str = TOPIC) -> dict[str, Any]:
    return {
        "address": "0x" + "11" * 20,
        "topics": [topic],
        "data": "0x",
        "blockHash": f"0x{n:064x}",
        "blockNumber": hex(n),
        "logIndex": hex(index),
        "removed": False,
    }


def event(n: int, logs: list[dict[str, Any]], removed: bool = False) -> BlockEvent:
    header = {"number": hex(n), "hash": f"0x{n:064x}"}
    if removed:
        logs = [{**x, "removed": True} for x in logs]
    return BlockEvent(n, header["hash"], header, {}, logs, removed)


def results(session: FakeSession, sub_id: str) -> list[Any]:
    out = []
    for raw in session.sent:
        doc = orjson.loads(raw)
        if doc.get("params", {}).get("subscription") == sub_id:
            out.append(doc["params"]["result"])
    return out


@pytest.fixture
def setup() -> tuple[SubscriptionService, FakeFeed]:
    feed = FakeFeed()
    return SubscriptionService(feed, Metrics()), feed  # type: ignore[arg-type]


def test_notifications_wait_for_the_answer_that_announces_them(
    setup: tuple[SubscriptionService, FakeFeed],
) -> None:
    svc, feed = setup
    session = FakeSession()
    conn = svc.open(session)  # type: ignore[arg-type]
    sub_id = subscribe(conn, ["newHeads"], announce=False)
    feed.emit([event(5, [])])  # a block lands while the answer is still being written
    assert session.sent == []
    conn.answered(b'{"jsonrpc":"2.0","id":1,"result":"' + sub_id.encode() + b'"}')
    feed.emit([event(6, [])])
    assert [h["number"] for h in results(session, sub_id)] == ["0x5", "0x6"]


def test_removed_logs_oldest_block_first_in_log_order_then_the_new_chain(
    setup: tuple[SubscriptionService, FakeFeed],
) -> None:
    svc, feed = setup
    session = FakeSession()
    conn = svc.open(session)  # type: ignore[arg-type]
    sub_id = subscribe(conn, ["logs", {"topics": [TOPIC]}])
    old7, old8 = [log(7, 0), log(7, 1)], [log(8, 2), log(8, 3, OTHER), log(8, 4)]
    feed.emit([event(7, old7), event(8, old8)])
    new7 = [log(7, 0)]
    # The feed hands removed blocks newest first; geth emits them oldest first.
    feed.emit([event(8, old8, removed=True), event(7, old7, removed=True), event(7, new7)])
    got = [
        (int(x["blockNumber"], 16), int(x["logIndex"], 16), x["removed"])
        for x in results(session, sub_id)
    ]
    assert got == [
        (7, 0, False),
        (7, 1, False),
        (8, 2, False),
        (8, 4, False),  # the OTHER-topic log matches no filter
        (7, 0, True),
        (7, 1, True),
        (8, 2, True),
        (8, 4, True),
        (7, 0, False),
    ]


def test_one_encoding_per_block_for_every_subscriber(
    setup: tuple[SubscriptionService, FakeFeed], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, feed = setup
    sessions = [FakeSession() for _ in range(200)]
    ids = [subscribe(svc.open(s), ["newHeads"]) for s in sessions]  # type: ignore[arg-type]
    encodes = 0
    real = orjson.dumps

    def counting(obj: Any, *args: Any, **kw: Any) -> bytes:
        nonlocal encodes
        encodes += 1
        return real(obj, *args, **kw)

    monkeypatch.setattr(subs_mod.orjson, "dumps", counting)
    feed.emit([event(9, [])])
    monkeypatch.undo()
    assert encodes == 1
    for s, sub_id in zip(sessions, ids, strict=True):
        (only,) = s.sent
        assert only == (
            b'{"jsonrpc":"2.0","method":"eth_subscription","params":{"subscription":"'
            + sub_id.encode()
            + b'","result":{"number":"0x9","hash":"'
            + f"0x{9:064x}".encode()
            + b'"}}}'
        )


def error_code(conn: Connection, params: list[Any]) -> int:
    answer = conn.call("eth_subscribe", params)
    assert answer.error is not None
    return int(orjson.loads(answer.error)["code"])


def test_limits_per_connection_address_and_node() -> None:
    feed = FakeFeed()
    cfg = SubscriptionsConfig(max_per_connection=2, max_per_ip=3, max_total=4)
    svc = SubscriptionService(feed, Metrics(), cfg)  # type: ignore[arg-type]
    a = svc.open(FakeSession("10.0.0.1"))  # type: ignore[arg-type]
    b = svc.open(FakeSession("10.0.0.1"))  # type: ignore[arg-type]
    c = svc.open(FakeSession("10.0.0.2"))  # type: ignore[arg-type]
    d = svc.open(FakeSession("10.0.0.3"))  # type: ignore[arg-type]
    subscribe(a, ["newHeads"])
    subscribe(a, ["newHeads"])
    assert error_code(a, ["newHeads"]) == -32005  # per connection
    subscribe(b, ["newHeads"])
    assert error_code(b, ["newHeads"]) == -32005  # per address
    subscribe(c, ["newHeads"])
    assert error_code(d, ["newHeads"]) == -32005  # per node
    c.closed(False)
    subscribe(d, ["newHeads"])  # room again once a connection went away
    assert svc.total == 4


def test_subscriptions_count_per_identity_a_key_apart_from_its_address() -> None:
    # One address (a NAT, a proxy's clients) with two keys: two clients; one key from two
    # addresses: one client. The front door names each (``WsSession.who``).
    feed = FakeFeed()
    cfg = SubscriptionsConfig(max_per_ip=2, max_log_filters_per_ip=1)
    svc = SubscriptionService(feed, Metrics(), cfg)  # type: ignore[arg-type]
    alice, bob = Identity("key:alice", key="alice"), Identity("key:bob", key="bob")
    a1 = svc.open(FakeSession("10.0.0.1", alice))  # type: ignore[arg-type]
    a2 = svc.open(FakeSession("10.0.0.2", alice))  # type: ignore[arg-type]
    b = svc.open(FakeSession("10.0.0.1", bob))  # type: ignore[arg-type]
    anon = svc.open(FakeSession("10.0.0.1"))  # type: ignore[arg-type]
    subscribe(a1, ["newHeads"])
    subscribe(a2, ["logs", {"address": "0x" + "11" * 20}])
    answer = a2.call("eth_subscribe", ["newHeads"])
    assert answer.error is not None
    message = orjson.loads(answer.error)["message"]
    assert "at most 2 subscriptions per client (its API key, or its address)" in message
    assert error_code(a1, ["logs", {"address": "0x" + "22" * 20}]) == -32005  # its 1 filter
    for conn in (b, anon):  # the same address, other clients: untouched by alice's
        subscribe(conn, ["newHeads"])
        subscribe(conn, ["logs", {"address": "0x" + "22" * 20}])
    assert svc.per_ip == {"key:alice": 2, "key:bob": 2, "10.0.0.1": 2}


def test_closing_unsubscribes_everything_and_stops_following_the_feed(
    setup: tuple[SubscriptionService, FakeFeed],
) -> None:
    svc, feed = setup
    conn = svc.open(FakeSession())  # type: ignore[arg-type]
    subscribe(conn, ["newHeads"])
    subscribe(conn, ["logs"])
    subscribe(conn, ["newPendingTransactions"])
    subscribe(conn, ["syncing"])
    assert feed.listeners and feed.pending
    conn.closed(False)
    assert svc.total == 0 and not svc.per_ip
    assert feed.listeners == [] and feed.pending == []


def not_found(answer: Any) -> bool:
    # geth's answer to an unknown id (anvil answers false instead; BSC runs geth).
    return answer.result is None and orjson.loads(answer.error) == {
        "code": -32000,
        "message": "subscription not found",
    }


def test_unsubscribe_answers_true_once(setup: tuple[SubscriptionService, FakeFeed]) -> None:
    svc, feed = setup
    conn = svc.open(FakeSession())  # type: ignore[arg-type]
    other = svc.open(FakeSession())  # type: ignore[arg-type]
    sub_id = subscribe(conn, ["newHeads"])
    assert not_found(other.call("eth_unsubscribe", [sub_id]))
    assert conn.call("eth_unsubscribe", [sub_id]).result == b"true"
    assert not_found(conn.call("eth_unsubscribe", [sub_id]))
    assert feed.listeners == []
    bad = conn.call("eth_unsubscribe", [])
    assert bad.error is not None and orjson.loads(bad.error)["code"] == -32602


async def test_a_slow_reader_is_counted_and_dropped_after_its_grace() -> None:
    feed = FakeFeed()
    metrics = Metrics()
    cfg = SubscriptionsConfig(slow_close_grace=0.0)
    svc = SubscriptionService(feed, metrics, cfg)  # type: ignore[arg-type]
    session = FakeSession()
    conn = svc.open(session)  # type: ignore[arg-type]
    subscribe(conn, ["newHeads"])
    conn.closed(True)
    assert svc.total == 0
    assert not session.aborted.is_set()  # the reader gets its grace to take the close frame
    await asyncio.wait_for(session.aborted.wait(), SECOND)
    assert b"chainrelay_slow_subscriber_disconnects_total 1.0" in metrics.render()


def test_subscribers_sharing_a_filter_each_get_its_logs(
    setup: tuple[SubscriptionService, FakeFeed],
) -> None:
    svc, feed = setup
    sessions = [FakeSession() for _ in range(3)]
    conns = [svc.open(s) for s in sessions]  # type: ignore[arg-type]
    same = [subscribe(c, ["logs", {"topics": [TOPIC]}]) for c in conns[:2]]
    other = subscribe(conns[2], ["logs", {"topics": [[OTHER, TOPIC]]}])
    only_other = subscribe(conns[2], ["logs", {"topics": [OTHER]}])
    feed.emit([event(3, [log(3, 0), log(3, 1, OTHER), log(3, 2)])])
    for s, sub_id in zip(sessions[:2], same, strict=True):
        assert [x["logIndex"] for x in results(s, sub_id)] == ["0x0", "0x2"]
    assert [x["logIndex"] for x in results(sessions[2], other)] == ["0x0", "0x1", "0x2"]
    assert [x["logIndex"] for x in results(sessions[2], only_other)] == ["0x1"]
    conns[0].call("eth_unsubscribe", [same[0]])
    feed.emit([event(4, [log(4, 0)])])
    assert len(results(sessions[0], same[0])) == 2  # nothing after unsubscribing
    assert len(results(sessions[1], same[1])) == 3


def test_a_head_announced_early_is_not_sent_again_with_its_logs(
    setup: tuple[SubscriptionService, FakeFeed],
) -> None:
    svc, feed = setup
    session = FakeSession()
    conn = svc.open(session)  # type: ignore[arg-type]
    heads = subscribe(conn, ["newHeads"])
    logs = subscribe(conn, ["logs", {"topics": [TOPIC]}])
    head = {"number": "0xa", "hash": f"0x{10:064x}"}
    feed.emit_head(head)  # the head is adopted: out at once, before its block is fetched
    assert results(session, heads) == [head] and results(session, logs) == []
    early = event(10, [log(10, 0)])
    feed.emit([BlockEvent(10, early.hash, early.header, {}, early.logs, False, True)])
    feed.emit([event(11, [log(11, 0)])])  # not announced early: its head comes with it
    assert numbers_of(results(session, heads)) == [10, 11]
    assert [x["blockNumber"] for x in results(session, logs)] == ["0xa", "0xb"]


def numbers_of(heads: list[Any]) -> list[int]:
    return [int(h["number"], 16) for h in heads]


def test_a_connections_notifications_of_one_block_go_out_in_one_write(
    setup: tuple[SubscriptionService, FakeFeed],
) -> None:
    svc, feed = setup
    busy, quiet = FakeSession(), FakeSession("10.0.0.2")
    conn = svc.open(busy)  # type: ignore[arg-type]
    heads = subscribe(conn, ["newHeads"])
    logs = subscribe(conn, ["logs", {"topics": [TOPIC]}])
    alone = subscribe(svc.open(quiet), ["newHeads"])  # type: ignore[arg-type]
    feed.emit([event(3, [log(3, 0), log(3, 1), log(3, 2)]), event(4, [log(4, 0)])])
    assert busy.writes == 1  # both blocks' notifications of its three subscriptions
    assert quiet.writes == 2  # its only subscription: each block's head as it is built
    assert numbers_of(results(busy, heads)) == [3, 4]
    assert numbers_of(results(quiet, alone)) == [3, 4]
    order = [orjson.loads(m)["params"]["subscription"] for m in busy.sent]
    assert order == [heads, logs, logs, logs, heads, logs]  # each block's head, then its logs


class RecordingTransport:
    """What a WsSession writes, and a send buffer the test sets."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.buffered = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str) -> Any:
        return ("10.0.0.9", 40000) if name == "peername" else None

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def upgraded_session(max_send_buffer: int) -> tuple[WsSession, RecordingTransport, ClientProtocol]:
    """A server session and a client protocol past a handshake in which the client offered
    permessage-deflate (as browsers and websockets' own client do)."""
    transport = RecordingTransport()
    session = WsSession(
        transport,  # type: ignore[arg-type]
        lambda body, _who: body,
        max_send_buffer=max_send_buffer,
    )
    client = ClientProtocol(
        parse_uri("ws://relay.test/"),
        extensions=[ClientPerMessageDeflateFactory()],
        max_size=None,
    )
    request = client.connect()
    assert "permessage-deflate" in request.headers["Sec-WebSocket-Extensions"]
    client.send_request(request)
    assert session.accept(b"".join(client.data_to_send()))
    client.receive_data(bytes(transport.written))
    transport.written.clear()
    (response,) = client.events_received()
    assert isinstance(response, Response)
    assert response.status_code == 101
    assert "Sec-WebSocket-Extensions" not in response.headers
    assert client.state is State.OPEN and client.extensions == []
    return session, transport, client


def test_spliced_frames_pass_a_client_that_offered_compression() -> None:
    session, transport, client = upgraded_session(max_send_buffer=1024)
    frames = subs_proto.NotificationFrames(b'{"number":"0x1"}')
    session.send_frames(frames.frame(b"0x01") + frames.frame(b"0x02"))
    session.send(b'{"jsonrpc":"2.0","id":7,"result":true}')  # an answer, websockets' path
    session.send_frames(frames.frame(b"0x03"))
    client.receive_data(bytes(transport.written))
    got = [bytes(f.data) for f in client.events_received() if isinstance(f, Frame)]
    assert got == [
        subs_proto.encode_notification(b"0x01", b'{"number":"0x1"}'),
        subs_proto.encode_notification(b"0x02", b'{"number":"0x1"}'),
        b'{"jsonrpc":"2.0","id":7,"result":true}',
        subs_proto.encode_notification(b"0x03", b'{"number":"0x1"}'),
    ]


def test_spliced_frames_respect_the_send_bound_and_the_closing_state() -> None:
    session, transport, client = upgraded_session(max_send_buffer=1024)
    frame = subs_proto.NotificationFrames(b"1").frame(b"0x01")
    transport.buffered = 1025  # the reader has fallen behind
    session.send_frames(frame)
    assert session.slow
    session.send_frames(frame)  # closing: nothing more goes out behind the close frame
    client.receive_data(bytes(transport.written))
    (close,) = client.events_received()
    assert isinstance(close, Frame) and close.opcode is Opcode.CLOSE
    assert int.from_bytes(close.data[:2], "big") == 1013


def test_held_notifications_past_the_count_bound_close_the_connection() -> None:
    feed = FakeFeed()
    metrics = Metrics()
    cfg = SubscriptionsConfig(max_held_notifications=3)
    svc = SubscriptionService(feed, metrics, cfg)  # type: ignore[arg-type]
    session = FakeSession()
    conn = svc.open(session)  # type: ignore[arg-type]
    subscribe(conn, ["newHeads"], announce=False)  # its answer never goes out
    for n in range(3):
        feed.emit([event(n, [])])
    assert session.close is None and conn.held.count == 3
    feed.emit([event(3, [])])
    assert session.close == (subs_mod.CLOSE_POLICY_VIOLATION, subs_mod.HELD_OVERFLOW_REASON)
    assert conn.held.count == 0 and session.sent == []
    assert b"chainrelay_held_notification_overflows_total 1.0" in metrics.render()


def test_held_notifications_past_the_byte_bound_close_the_connection() -> None:
    feed = FakeFeed()
    cfg = SubscriptionsConfig(max_held_bytes=1000)
    svc = SubscriptionService(feed, Metrics(), cfg)  # type: ignore[arg-type]
    session = FakeSession()
    conn = svc.open(session)  # type: ignore[arg-type]
    subscribe(conn, ["logs"], announce=False)
    feed.emit([event(1, [log(1, 0)])])
    assert session.close is None and 0 < conn.held.bytes < 1000
    feed.emit([event(2, [log(2, i) for i in range(5)])])
    assert session.close is not None and session.close[0] == subs_mod.CLOSE_POLICY_VIOLATION


def test_distinct_log_filters_are_bounded_per_address_and_per_node() -> None:
    feed = FakeFeed()
    cfg = SubscriptionsConfig(max_log_filters=3, max_log_filters_per_ip=2)
    svc = SubscriptionService(feed, Metrics(), cfg)  # type: ignore[arg-type]
    a = svc.open(FakeSession("10.0.0.1"))  # type: ignore[arg-type]
    b = svc.open(FakeSession("10.0.0.2"))  # type: ignore[arg-type]
    topic = ["logs", {"topics": [TOPIC]}]
    other = ["logs", {"topics": [OTHER]}]
    subscribe(a, topic)
    subscribe(a, other)
    assert error_code(a, ["logs", {"address": "0x" + "22" * 20}]) == -32005  # per address
    subscribe(a, topic)  # a filter it holds already costs no more matching: accepted
    c = svc.open(FakeSession("10.0.0.3"))  # type: ignore[arg-type]
    subscribe(b, topic)  # shared with a: two distinct on the node so far
    subscribe(b, ["logs"])  # the third
    assert error_code(c, ["logs", {"address": "0x" + "33" * 20}]) == -32005  # per node
    subscribe(c, topic)  # one the node holds already
    a.closed(False)
    subscribe(c, ["logs", {"address": "0x" + "33" * 20}])  # room again: OTHER was a's only
    assert len(svc.routes.groups) == 3


def test_logs_filters_take_the_nodes_filter_bounds() -> None:
    feed = FakeFeed()
    svc = SubscriptionService(
        feed,  # type: ignore[arg-type]
        Metrics(),
        filters=FiltersConfig(max_addresses=2, max_topics_per_position=2),
    )
    conn = svc.open(FakeSession())  # type: ignore[arg-type]
    addrs = ["0x" + f"{i:040x}" for i in range(1, 4)]
    assert error_code(conn, ["logs", {"address": addrs}]) == -32602
    assert error_code(conn, ["logs", {"topics": [[TOPIC, OTHER, "0x" + "55" * 32]]}]) == -32602
    subscribe(conn, ["logs", {"address": addrs[:2], "topics": [[TOPIC, OTHER]]}])


class FakeUpstream:
    def __init__(self, is_ws: bool) -> None:
        self.is_ws = is_ws


class FakePool:
    def __init__(self, *upstreams: FakeUpstream) -> None:
        self.upstreams = list(upstreams)


def test_pending_transactions_without_a_websocket_upstream_are_refused() -> None:
    feed = FakeFeed()
    feed.pool = FakePool(FakeUpstream(False))  # type: ignore[attr-defined]
    svc = SubscriptionService(feed, Metrics())  # type: ignore[arg-type]
    conn = svc.open(FakeSession())  # type: ignore[arg-type]
    answer = conn.call("eth_subscribe", ["newPendingTransactions"])
    assert answer.error is not None
    err = orjson.loads(answer.error)
    assert err["code"] == -32000 and "not available from this node's upstreams" in err["message"]
    assert svc.total == 0 and feed.pending == []
    feed.pool.upstreams.append(FakeUpstream(True))  # type: ignore[attr-defined]
    subscribe(conn, ["newPendingTransactions"])
    assert feed.pending


def test_full_pending_transactions_are_refused_with_no_way_to_read_them(
    setup: tuple[SubscriptionService, FakeFeed],
) -> None:
    svc, _ = setup  # no ``ask``: nothing to fetch a transaction with
    conn = svc.open(FakeSession())  # type: ignore[arg-type]
    assert error_code(conn, ["newPendingTransactions", True]) == -32602
    subscribe(conn, ["newPendingTransactions", False])
    assert svc.total == 1


class Reader:
    """Stands in for the node's pipeline: answers eth_getTransactionByHash when released."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.release = asyncio.Event()
        self._asked = asyncio.Condition()

    async def until_asked(self, n: int) -> None:
        async with asyncio.timeout(SECOND), self._asked:
            await self._asked.wait_for(lambda: len(self.asked) >= n)

    async def __call__(self, method: str, params: Any) -> Answer:
        assert method == "eth_getTransactionByHash"
        async with self._asked:
            self.asked.append(params[0])
            self._asked.notify_all()
        await self.release.wait()
        if params[0] == GONE:
            return Answer(b"null", None)
        return Answer(orjson.dumps({"hash": params[0], "nonce": "0x1"}), None)


GONE = "0x" + "99" * 32


async def test_full_pending_transactions_are_read_once_per_hash_for_every_subscriber() -> None:
    feed = FakeFeed()
    metrics = Metrics()
    reader = Reader()
    cfg = SubscriptionsConfig(pending_tx_fetches=2)
    svc = SubscriptionService(feed, metrics, cfg, ask=reader)  # type: ignore[arg-type]
    sessions = [FakeSession() for _ in range(3)]
    conns = [svc.open(s) for s in sessions]  # type: ignore[arg-type]
    full = [subscribe(c, ["newPendingTransactions", True]) for c in conns[:2]]
    hashes = subscribe(conns[2], ["newPendingTransactions"])
    one, two, three = ("0x" + f"{i:064x}" for i in (1, 2, 3))
    for tx_hash in (one, GONE, three):  # the third is past the bound of fetches under way
        for fn in list(feed.pending):
            fn(tx_hash)
    assert results(sessions[2], hashes) == [one, GONE, three]  # hashes go out at once
    await reader.until_asked(2)
    assert reader.asked == [one, GONE]  # one read per hash, whatever the subscribers
    reader.release.set()
    await asyncio.wait_for(asyncio.gather(*svc._fetches), SECOND)
    for session, sub_id in zip(sessions, full, strict=False):
        assert results(session, sub_id) == [{"hash": one, "nonce": "0x1"}]
    # the one skipped and the one gone by the time it was read
    assert b"chainrelay_pending_tx_skipped_total 2.0" in metrics.render()
    for tx_hash in (two,):
        for fn in list(feed.pending):
            fn(tx_hash)
    await asyncio.wait_for(asyncio.gather(*svc._fetches), SECOND)
    assert results(sessions[0], full[0])[-1]["hash"] == two
    for c in conns:
        c.closed(False)
    assert feed.pending == []
