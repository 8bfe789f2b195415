"""The subscription service without sockets: a session stand-in records what would be sent.

Covers what the system tests can only see by chance: a notification never overtakes the
answer that announces its subscription, removed logs come newest first, one encoding per
block is shared by every subscriber, and every limit answers -32005.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from chainrelay.config import SubscriptionsConfig
from chainrelay.services import subscriptions as subs_mod
from chainrelay.services.blocks import BlockEvent
from chainrelay.services.metrics import Metrics
from chainrelay.services.subscriptions import Connection, SubscriptionService
from tests.lab.timing import SECOND

TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
OTHER = "0x" + "77" * 32


class FakeFeed:
    def __init__(self) -> None:
        self.listeners: list[Callable[[list[BlockEvent]], None]] = []
        self.pending: list[Callable[[str], None]] = []

    def add_listener(self, fn: Callable[[list[BlockEvent]], None]) -> None:
        self.listeners.append(fn)

    def remove_listener(self, fn: Callable[[list[BlockEvent]], None]) -> None:
        self.listeners.remove(fn)

    def add_pending_listener(self, fn: Callable[[str], None]) -> None:
        self.pending.append(fn)

    def remove_pending_listener(self, fn: Callable[[str], None]) -> None:
        self.pending.remove(fn)

    def emit(self, events: list[BlockEvent]) -> None:
        for fn in list(self.listeners):
            fn(events)


class FakeTransport:
    def __init__(self, ip: str) -> None:
        self.ip = ip

    def get_extra_info(self, name: str) -> Any:
        return (self.ip, 40000) if name == "peername" else None


class FakeSession:
    def __init__(self, ip: str = "10.0.0.1") -> None:
        self.transport = FakeTransport(ip)
        self.sent: list[bytes] = []
        self.aborted = asyncio.Event()

    def send(self, payload: bytes) -> None:
        self.sent.append(payload)

    def abort(self) -> None:
        self.aborted.set()


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


def test_removed_logs_newest_block_first_then_the_new_chain(
    setup: tuple[SubscriptionService, FakeFeed],
) -> None:
    svc, feed = setup
    session = FakeSession()
    conn = svc.open(session)  # type: ignore[arg-type]
    sub_id = subscribe(conn, ["logs", {"topics": [TOPIC]}])
    old7, old8 = [log(7, 0), log(7, 1)], [log(8, 2), log(8, 3, OTHER), log(8, 4)]
    feed.emit([event(7, old7), event(8, old8)])
    new7 = [log(7, 0)]
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
        (8, 4, True),
        (8, 2, True),
        (7, 1, True),
        (7, 0, True),
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


def test_unsubscribe_answers_true_once(setup: tuple[SubscriptionService, FakeFeed]) -> None:
    svc, feed = setup
    conn = svc.open(FakeSession())  # type: ignore[arg-type]
    other = svc.open(FakeSession())  # type: ignore[arg-type]
    sub_id = subscribe(conn, ["newHeads"])
    assert other.call("eth_unsubscribe", [sub_id]).result == b"false"
    assert conn.call("eth_unsubscribe", [sub_id]).result == b"true"
    assert conn.call("eth_unsubscribe", [sub_id]).result == b"false"
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
