"""Sans-I/O pieces of eth_subscribe: params, ids, notification bytes and frames, and the block order
bookkeeping that makes the feed gap-free and duplicate-free across missed heads and reorgs."""

from __future__ import annotations

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from chainrelay.chain.blockorder import DeliveredChain
from chainrelay.errors import InvalidParams, MethodNotFound
from chainrelay.subscriptions import registry as proto
from chainrelay.subscriptions.filtertable import new_id as filters_new_id

TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


# --- params and encoding ---------------------------------------------------------------
def test_subscribe_kinds_parse() -> None:
    assert proto.parse_subscribe(["newHeads"]).kind == "newHeads"
    assert proto.parse_subscribe(["newPendingTransactions"]).kind == "newPendingTransactions"
    assert proto.parse_subscribe(["syncing"]).kind == "syncing"
    req = proto.parse_subscribe(["logs", {"topics": [TOPIC]}])
    assert req.kind == "logs" and req.filter is not None
    assert req.filter.matches({"topics": [TOPIC], "address": "0x" + "11" * 20})
    assert not req.filter.matches({"topics": ["0x" + "00" * 32]})
    # A logs subscription without a filter object takes every log.
    bare = proto.parse_subscribe(["logs"])
    assert bare.filter is not None and bare.filter.matches({"topics": []})


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ([], InvalidParams),
        ({}, InvalidParams),
        ([7], InvalidParams),
        (["newBlocks"], MethodNotFound),
        (["newHeads", {"x": 1}], InvalidParams),
        (["logs", {"topics": "nope"}], InvalidParams),
        (["logs", {"address": "0x12"}], InvalidParams),
        (["logs", {}, 1], InvalidParams),
    ],
)
def test_subscribe_refuses_bad_params(params: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        proto.parse_subscribe(params)


def test_unknown_kind_is_answered_like_geth() -> None:
    with pytest.raises(MethodNotFound) as exc:
        proto.parse_subscribe(["bogus"])
    assert exc.value.code == -32601
    assert exc.value.message == 'no "bogus" subscription in eth namespace'


def test_unsubscribe_params() -> None:
    assert proto.parse_unsubscribe(["0xabc"]) == "0xabc"
    for bad in ([], [1], ["0x1", "0x2"], "0x1"):
        with pytest.raises(InvalidParams):
            proto.parse_unsubscribe(bad)


def test_ids_look_like_geths() -> None:
    # geth's encodeID trims leading zeros; filter ids and subscription ids share the helper.
    sub_id = proto.new_id(bytes(range(16)))
    assert sub_id == "0x102030405060708090a0b0c0d0e0f"
    assert proto.new_id(b"\xab" * proto.ID_BYTES) == "0x" + "ab" * proto.ID_BYTES
    assert proto.new_id(bytes(proto.ID_BYTES)) == "0x0"
    assert proto.new_id(bytes(range(16))) == filters_new_id(lambda n: bytes(range(n)))


@pytest.mark.parametrize(
    "flt",
    [
        {"fromBlock": "pending"},
        {"toBlock": "pending"},
        {"fromBlock": "earliest"},
        {"fromBlock": "0x1"},
        {"fromBlock": "0x1", "toBlock": "0x5"},
        {"toBlock": "finalized"},
        {"blockHash": "0x" + "11" * 32},
    ],
)
def test_logs_subscriptions_refuse_anything_but_new_logs(flt: dict[str, str]) -> None:
    with pytest.raises(InvalidParams):
        proto.parse_subscribe(["logs", flt])


def test_logs_subscriptions_at_latest_share_the_filter_of_no_range() -> None:
    plain = proto.parse_subscribe(["logs", {"topics": [TOPIC]}]).filter
    latest = {"fromBlock": "latest", "toBlock": "latest", "topics": [TOPIC]}
    assert proto.parse_subscribe(["logs", latest]).filter == plain


def test_logs_subscriptions_take_the_bounds_given() -> None:
    addrs = ["0x" + f"{i:040x}" for i in range(1, 4)]
    proto.parse_subscribe(["logs", {"address": addrs}])
    with pytest.raises(InvalidParams):
        proto.parse_subscribe(["logs", {"address": addrs}], max_addresses=2)
    with pytest.raises(InvalidParams):
        proto.parse_subscribe(["logs", {"topics": [[TOPIC, TOPIC]]}], max_topics_per_position=1)


def test_pending_takes_geths_full_tx_flag() -> None:
    hashes = proto.parse_subscribe(["newPendingTransactions", False])
    assert hashes.kind == proto.PENDING and not hashes.full
    assert not proto.parse_subscribe(["newPendingTransactions"]).full
    full = proto.parse_subscribe(["newPendingTransactions", True])
    assert full.kind == proto.PENDING and full.full
    with pytest.raises(InvalidParams):
        proto.parse_subscribe(["newPendingTransactions", {"full": True}])


def test_notification_is_spliced_byte_for_byte() -> None:
    result = orjson.dumps({"number": "0x1", "hash": "0x" + "ab" * 32})
    got = proto.encode_notification(b"0x01", result)
    want = orjson.dumps(
        {
            "jsonrpc": "2.0",
            "method": "eth_subscription",
            "params": {"subscription": "0x01", "result": orjson.loads(result)},
        }
    )
    assert got == want


# Message sizes at each edge of the frame header's length encodings (7, 16 and 64 bits).
@pytest.mark.parametrize("size", [125, 126, 65_535, 65_536, 70_000])
@pytest.mark.parametrize("sub_id", [b"0x01", b"0x" + b"ab" * 16])
def test_notification_frames_parse_as_one_final_text_message(size: int, sub_id: bytes) -> None:
    base = len(proto.encode_notification(sub_id, b'""'))
    result = orjson.dumps("x" * (size - base))
    assert len(proto.encode_notification(sub_id, result)) == size
    frames = proto.NotificationFrames(result)
    client = ClientProtocol(parse_uri("ws://relay.test/"), state=State.OPEN, max_size=None)
    other = b"0x" + b"ef" * 16
    client.receive_data(frames.frame(sub_id) + frames.frame(other) + frames.frame(sub_id))
    events = client.events_received()
    got = [f for f in events if isinstance(f, Frame)]
    assert len(got) == len(events), events
    assert [(f.opcode, f.fin) for f in got] == [(Opcode.TEXT, True)] * 3
    assert [bytes(f.data) for f in got] == [
        proto.encode_notification(i, result) for i in (sub_id, other, sub_id)
    ]
    assert client.parser_exc is None and client.data_to_send() == []


# --- block order -----------------------------------------------------------------------
def chain(fork: str, lo: int, hi: int) -> dict[int, str]:
    return {n: f"{fork}{n}" for n in range(lo, hi + 1)}


def deliver(order: DeliveredChain[str], fetch: list[tuple[int, str]]) -> list[str]:
    for n, h in fetch:
        order.delivered(n, h, h)
    return [h for _, h in fetch]


def test_blocks_after_the_start_are_fetched_in_order_once() -> None:
    order: DeliveredChain[str] = DeliveredChain(window=64)
    order.start_after(5)
    step = order.step(chain("a", 0, 8), 8)
    assert step.retract == [] and step.fetch == [(6, "a6"), (7, "a7"), (8, "a8")]
    deliver(order, step.fetch)
    again = order.step(chain("a", 0, 8), 8)
    assert again.retract == [] and again.fetch == []  # nothing twice


def test_missed_heads_are_filled_in_without_gap() -> None:
    order: DeliveredChain[str] = DeliveredChain(window=64)
    order.start_after(5)
    deliver(order, order.step(chain("a", 0, 6), 6).fetch)
    # The head jumped from 6 to 11 (skipped numbers, or a reconnected head stream).
    step = order.step(chain("a", 0, 11), 11)
    assert [n for n, _ in step.fetch] == [7, 8, 9, 10, 11]


def test_a_fetch_left_undone_is_asked_again_not_skipped() -> None:
    order: DeliveredChain[str] = DeliveredChain(window=64)
    order.start_after(5)
    step = order.step(chain("a", 0, 9), 9)
    deliver(order, step.fetch[:1])  # block 7 could not be fetched yet
    assert [n for n, _ in order.step(chain("a", 0, 9), 9).fetch] == [7, 8, 9]


def test_reorg_retracts_newest_first_then_fetches_the_new_chain() -> None:
    order: DeliveredChain[str] = DeliveredChain(window=64)
    order.start_after(4)
    deliver(order, order.step(chain("a", 0, 8), 8).fetch)
    new = {**chain("a", 0, 6), **chain("b", 7, 9)}
    step = order.step(new, 9)
    assert step.retract == ["a8", "a7"]
    assert step.fetch == [(7, "b7"), (8, "b8"), (9, "b9")]
    deliver(order, step.fetch)
    assert order.hash_at(6) == "a6" and order.hash_at(9) == "b9"


def test_reorg_to_a_shorter_chain_retracts_past_the_head() -> None:
    order: DeliveredChain[str] = DeliveredChain(window=64)
    order.start_after(4)
    deliver(order, order.step(chain("a", 0, 8), 8).fetch)
    # The tracker forgets the numbers a shorter chain no longer has.
    new = {**chain("a", 0, 6), **chain("b", 7, 7)}
    step = order.step(new, 7)
    assert step.retract == ["a8", "a7"] and step.fetch == [(7, "b7")]


def test_reorg_of_every_delivered_block_starts_the_new_chain_at_the_fork() -> None:
    order: DeliveredChain[str] = DeliveredChain(window=64)
    order.start_after(4)
    deliver(order, order.step(chain("a", 0, 6), 6).fetch)
    step = order.step({**chain("a", 0, 4), **chain("b", 5, 6)}, 6)
    assert step.retract == ["a6", "a5"] and step.fetch == [(5, "b5"), (6, "b6")]


def test_blocks_outside_the_canonical_window_are_left_alone() -> None:
    order: DeliveredChain[str] = DeliveredChain(window=4)
    order.start_after(0)
    deliver(order, order.step(chain("a", 0, 10), 10).fetch)
    assert len(order) <= 4  # bounded by the window
    # The tracker keeps only its own window: numbers it dropped are no reorg.
    step = order.step(chain("a", 8, 11), 11)
    assert step.retract == [] and step.fetch == [(11, "a11")]


def test_catch_up_never_reaches_below_the_window() -> None:
    order: DeliveredChain[str] = DeliveredChain(window=3)
    order.start_after(0)
    deliver(order, order.step(chain("a", 0, 1), 1).fetch)
    step = order.step(chain("a", 0, 20), 20)
    assert [n for n, _ in step.fetch] == [18, 19, 20]


def test_links_checks_the_parent_of_the_next_block() -> None:
    order: DeliveredChain[str] = DeliveredChain(window=8)
    order.start_after(0)
    deliver(order, [(1, "a1")])
    assert order.links(2, "a1")
    assert not order.links(2, "b1")
    assert order.links(5, "anything")  # its parent was never delivered


# --- config ------------------------------------------------------------------------------
def test_subscriptions_section_is_strict_and_defaults_from_one_place() -> None:
    from chainrelay import defaults
    from chainrelay.config import loads
    from chainrelay.errors import ConfigError

    base = '[[upstreams]]\nurl = "ws://127.0.0.1:8545"\n'
    cfg = loads(base)
    assert cfg.subscriptions.max_per_connection == defaults.MAX_SUBSCRIPTIONS_PER_CONNECTION
    assert cfg.subscriptions.follow_blocks_always is defaults.FOLLOW_BLOCKS_ALWAYS
    cfg = loads("[subscriptions]\nmax_per_ip = 7\nfollow_blocks_always = true\n" + base)
    assert cfg.subscriptions.max_per_ip == 7 and cfg.subscriptions.follow_blocks_always
    with pytest.raises(ConfigError, match=r"subscriptions\.max_per_conection"):
        loads("[subscriptions]\nmax_per_conection = 1\n" + base)
    with pytest.raises(ConfigError, match=r"subscriptions\.max_total"):
        loads("[subscriptions]\nmax_total = 0\n" + base)
