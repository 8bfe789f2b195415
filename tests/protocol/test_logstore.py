"""The block logs a node holds for eth_getLogs (chain/logstore.py), objects in, objects out:
which blocks are taken and kept, how a window is cut into held runs and sub-ranges to ask
upstream, when a held block may no longer answer (reorged, beyond the canonical window and
not final), and the byte bound. No sockets."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainrelay.chain.events import BlockEvent, removed
from chainrelay.chain.logstore import LogStore, Piece
from chainrelay.rpc.policy import HeadView
from chainrelay.subscriptions.logfilter import LogFilter

TOKEN = "0x5fbdb2315678afecb367f032d93f642f64180aa3"
OTHER = "0xe7f1725e7734ce288f8367e1bb143e90bb3f0512"
TRANSFER = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
APPROVAL = "0x8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925"
ALICE = "0x000000000000000000000000f39fd6e51aad88f6f4ce6ab8827279cfffb92266"
BOB = "0x00000000000000000000000070997970c51812dc3a010c7d01b50e0d17dc79c8"
ANY = LogFilter.parse({})


def block_hash(n: int, fork: str = "a") -> str:
    return "0x" + fork * 2 + f"{n:062x}"


def block_logs(n: int, fork: str = "a") -> list[dict[str, Any]]:
    """Two logs per block, as a node gives them: a Transfer of TOKEN and an Approval of
    OTHER, in log-index order (field order as anvil's)."""
    h = block_hash(n, fork)
    out = []
    for i, (address, topic) in enumerate(((TOKEN, TRANSFER), (OTHER, APPROVAL))):
        out.append(
            {
                "address": address,
                "topics": [topic, ALICE, BOB],
                "data": "0x" + f"{n * 10 + i:064x}",
                "blockHash": h,
                "blockNumber": hex(n),
                "blockTimestamp": hex(1_700_000_000 + n),
                "transactionHash": "0x" + f"{n * 10 + i:064x}",
                "transactionIndex": hex(i),
                "logIndex": hex(i),
                "removed": False,
            }
        )
    return out


class Chain:
    """A head tracker's view of a chain: head ``number``, the last ``window`` blocks
    canonical (hashes of ``fork``), final up to ``finalized``."""

    def __init__(self, number: int, finalized: int, window: int = 64) -> None:
        self.view = HeadView()
        self.window = window
        self.forks: dict[int, str] = {}
        self.move(number, finalized)

    def move(self, number: int, finalized: int | None = None) -> None:
        v = self.view
        v.number = number
        if finalized is not None:
            v.finalized = v.safe = finalized
        low = max(0, number - self.window + 1)
        v.canonical = {n: block_hash(n, self.forks.get(n, "a")) for n in range(low, number + 1)}
        v.numbers = {h: n for n, h in v.canonical.items()}
        v.hash = v.canonical[number]
        v.generation += 1

    def reorg(self, frm: int, fork: str) -> None:
        """Blocks ``frm`` and up replaced by blocks of ``fork``."""
        for n in range(frm, self.view.number + 1):
            self.forks[n] = fork
        self.move(self.view.number)


def held(chain: Chain, numbers: range | list[int], max_bytes: int = 1 << 30) -> LogStore:
    store = LogStore(chain.view, max_bytes)
    for n in numbers:
        assert store.hold(n, block_hash(n), block_logs(n)), n
    return store


def want(numbers: range | list[int], flt: LogFilter = ANY) -> list[bytes]:
    return [orjson.dumps(x) for n in numbers for x in block_logs(n) if flt.matches(x)]


def shape(pieces: list[Piece] | None) -> list[tuple[int, int, bool]] | None:
    """Each piece as (low, high, held)."""
    if pieces is None:
        return None
    return [(p.low, p.high, p.logs is not None) for p in pieces]


# --- windows -------------------------------------------------------------------------------
def test_a_window_inside_the_held_blocks_is_one_held_run_with_its_logs_in_order() -> None:
    chain = Chain(number=100, finalized=90)
    store = held(chain, range(80, 101))
    pieces = store.split(ANY, 85, 95, max_upstream=2)
    assert shape(pieces) == [(85, 95, True)]
    assert pieces is not None
    assert pieces[0].logs == want(range(85, 96))
    assert pieces[0].hashes == tuple(block_hash(n) for n in range(85, 96))


@pytest.mark.parametrize(
    "spec",
    [
        {"address": TOKEN},
        {"address": [OTHER.upper().replace("0X", "0x")]},
        {"topics": [APPROVAL]},
        {"topics": [None, ALICE]},
        {"topics": [[TRANSFER, APPROVAL], None, BOB]},
        {"topics": [None, None, None, None]},  # more positions than the logs have topics
        {"address": TOKEN, "topics": [APPROVAL]},
    ],
)
def test_the_held_logs_a_window_gets_are_those_its_filter_matches(spec: dict[str, Any]) -> None:
    chain = Chain(number=100, finalized=90)
    store = held(chain, range(90, 101))
    flt = LogFilter.parse(spec)
    pieces = store.split(flt, 90, 100, max_upstream=0)
    assert pieces is not None and pieces[0].logs == want(range(90, 101), flt)


def test_a_window_reaching_past_the_oldest_held_block_asks_upstream_for_that_part_only() -> None:
    chain = Chain(number=100, finalized=90)
    store = held(chain, range(90, 101))
    pieces = store.split(ANY, 80, 99, max_upstream=1)
    assert shape(pieces) == [(80, 89, False), (90, 99, True)]
    assert pieces is not None and pieces[1].logs == want(range(90, 100))


def test_blocks_not_held_in_the_middle_are_sub_ranges_up_to_the_bound() -> None:
    chain = Chain(number=100, finalized=90)
    store = held(chain, [*range(80, 85), *range(87, 93), *range(95, 101)])
    assert shape(store.split(ANY, 80, 100, max_upstream=2)) == [
        (80, 84, True),
        (85, 86, False),
        (87, 92, True),
        (93, 94, False),
        (95, 100, True),
    ]
    # One sub-range more than allowed: the window goes upstream whole.
    assert store.split(ANY, 80, 100, max_upstream=1) is None
    assert shape(store.split(ANY, 78, 90, max_upstream=2)) == [
        (78, 79, False),
        (80, 84, True),
        (85, 86, False),
        (87, 90, True),
    ]
    assert store.split(ANY, 78, 94, max_upstream=2) is None  # 78-79, 85-86, 93-94


def test_no_held_block_in_the_window_or_a_window_past_the_head_goes_upstream_whole() -> None:
    chain = Chain(number=100, finalized=90)
    store = held(chain, range(90, 101))
    assert store.split(ANY, 50, 89, max_upstream=2) is None
    assert store.split(ANY, 95, 101, max_upstream=2) is None
    assert store.split(ANY, 96, 95, max_upstream=2) is None


def test_a_block_by_hash_is_answered_while_it_is_held_and_canonical() -> None:
    chain = Chain(number=100, finalized=90)
    store = held(chain, range(95, 101))
    assert store.by_hash(LogFilter.parse({"address": OTHER}), block_hash(97)) == [
        orjson.dumps(block_logs(97)[1])
    ]
    assert store.by_hash(ANY, block_hash(94)) is None  # not held
    chain.reorg(97, "b")
    assert store.by_hash(ANY, block_hash(97)) is None
    assert store.by_hash(ANY, block_hash(96)) == want([96])


# --- reorgs and finality ---------------------------------------------------------------------
def test_a_reorged_block_is_never_used_and_is_dropped() -> None:
    chain = Chain(number=100, finalized=90)
    store = held(chain, range(90, 101))
    chain.reorg(98, "b")
    pieces = store.split(ANY, 90, 100, max_upstream=2)
    assert shape(pieces) == [(90, 97, True), (98, 100, False)]
    assert 98 not in store and 100 not in store
    # The new fork's blocks come in; the old ones' logs are never given again.
    for n in range(98, 101):
        assert store.hold(n, block_hash(n, "b"), block_logs(n, "b"))
    pieces = store.split(ANY, 96, 100, max_upstream=0)
    assert pieces is not None
    assert pieces[0].logs == want([96, 97]) + [
        orjson.dumps(x) for n in range(98, 101) for x in block_logs(n, "b")
    ]


def test_the_follower_s_events_hold_blocks_and_retractions_forget_them() -> None:
    chain = Chain(number=100, finalized=90)
    store = LogStore(chain.view, 1 << 30)
    events = [BlockEvent(n, block_hash(n), {}, {}, block_logs(n), False) for n in range(95, 101)]
    store.note(events)
    assert len(store) == 6
    chain.reorg(99, "b")
    store.note([removed(events[-1]), removed(events[-2])])
    store.note([BlockEvent(99, block_hash(99, "b"), {}, {}, block_logs(99, "b"), False)])
    assert sorted(n for n in range(90, 101) if n in store) == [95, 96, 97, 98, 99]
    assert store.by_hash(ANY, block_hash(99, "b")) is not None
    # A retraction of a block not held as that hash forgets nothing.
    store.forget(98, block_hash(98, "b"))
    assert 98 in store


def test_only_blocks_that_can_be_vouched_for_are_taken() -> None:
    chain = Chain(number=100, finalized=60, window=20)
    store = LogStore(chain.view, 1 << 30)
    assert not store.hold(95, block_hash(95, "b"), block_logs(95, "b"))  # another fork
    assert not store.hold(101, block_hash(101), block_logs(101))  # past the head
    assert not store.hold(70, block_hash(70), block_logs(70))  # beyond the window, not final
    assert store.hold(50, block_hash(50), block_logs(50))  # beyond the window, final
    logs = block_logs(96)
    logs[1] = {**logs[1], "blockHash": block_hash(95)}
    assert not store.hold(96, block_hash(96), logs)  # a log of another block
    assert not store.hold(96, block_hash(96), [{**logs[0], "topics": None}])
    assert store.hold(96, block_hash(96), block_logs(96))
    assert store.hold(97, block_hash(97), [])  # a block without logs answers too
    assert sorted(n for n in range(0, 101) if n in store) == [50, 96, 97]
    pieces = store.split(ANY, 96, 97, max_upstream=0)
    assert pieces is not None and pieces[0].logs == want([96])


def test_a_block_final_while_canonical_answers_beyond_the_window() -> None:
    chain = Chain(number=100, finalized=90, window=20)
    store = held(chain, range(81, 101))  # 81..90 final already, 91..100 not yet
    chain.move(130, finalized=120)  # 81..100 all left the window, all final by now
    assert shape(store.split(ANY, 81, 100, max_upstream=1)) == [(81, 90, True), (91, 100, False)]
    assert sorted(n for n in range(81, 101) if n in store) == list(range(81, 91))

    store = held(chain, range(111, 131))  # 111..120 final already; 121..130 not yet
    chain.move(140, finalized=125)  # 121..125 final now, and still in the window (121..140)
    assert store.split(ANY, 121, 140, max_upstream=1) is not None  # its next call seals them
    chain.move(160)
    assert shape(store.split(ANY, 111, 140, max_upstream=1)) == [
        (111, 125, True),
        (126, 140, False),
    ]
    assert 126 not in store  # left the window before finality: nobody can vouch for it


def test_a_held_block_replaced_before_finality_never_comes_back_beyond_the_window() -> None:
    chain = Chain(number=100, finalized=90, window=20)
    store = held(chain, range(95, 101))
    chain.reorg(96, "b")  # nobody asks in between: the store learns of it at its next call
    chain.move(110, finalized=100)  # 95..100 final, in the window: 95 is the one held
    assert shape(store.split(ANY, 95, 100, max_upstream=1)) == [(95, 95, True), (96, 100, False)]
    chain.move(140, finalized=130)
    assert shape(store.split(ANY, 95, 100, max_upstream=1)) == [(95, 95, True), (96, 100, False)]
    assert store.by_hash(ANY, block_hash(96)) is None
    assert store.by_hash(ANY, block_hash(95)) == want([95])

    # Replaced, and out of the window before the store is asked again: it cannot tell which
    # of them was replaced, so none answers.
    chain = Chain(number=100, finalized=90, window=20)
    store = held(chain, range(95, 101))
    chain.reorg(96, "b")
    chain.move(140, finalized=130)
    assert store.split(ANY, 95, 100, max_upstream=0) is None
    assert store.by_hash(ANY, block_hash(95)) is None
    assert len(store) == 0


def test_held_runs_are_vouched_for_again_after_the_sub_ranges_came_back() -> None:
    chain = Chain(number=100, finalized=90, window=20)
    store = held(chain, range(90, 101))
    pieces = store.split(ANY, 85, 100, max_upstream=1)
    assert pieces is not None and store.vouches(pieces)
    chain.move(101)
    assert store.vouches(pieces)  # a new head changes none of them
    chain.reorg(100, "b")
    assert not store.vouches(pieces)

    chain = Chain(number=100, finalized=80, window=20)
    store = held(chain, range(90, 101))
    pieces = store.split(ANY, 90, 95, max_upstream=0)
    assert pieces is not None
    chain.move(120)  # 90..95 left the window, not final: their word is gone
    assert not store.vouches(pieces)


# --- the byte bound --------------------------------------------------------------------------
def test_the_lowest_blocks_are_dropped_first_past_the_byte_bound() -> None:
    chain = Chain(number=100, finalized=90)
    one = held(chain, [90]).bytes
    store = held(chain, range(90, 101), max_bytes=5 * one + one // 2)
    assert len(store) == 5
    assert sorted(n for n in range(90, 101) if n in store) == list(range(96, 101))
    assert store.bytes <= store.max_bytes
    # A block held late but lower than all the others is the next to go.
    assert store.hold(60, block_hash(60), block_logs(60)) and 60 not in store
    assert shape(store.split(ANY, 93, 100, max_upstream=1)) == [(93, 95, False), (96, 100, True)]
    for n in range(96, 101):
        store.forget(n, block_hash(n))
    assert store.bytes == 0 and len(store) == 0


def test_a_block_larger_than_the_whole_store_is_not_taken() -> None:
    chain = Chain(number=100, finalized=90)
    one = held(chain, [90]).bytes
    store = held(chain, [99], max_bytes=one + 10)
    assert not store.hold(100, block_hash(100), block_logs(100) * 2)
    assert 99 in store and 100 not in store


def test_the_bytes_counted_follow_the_logs_held() -> None:
    chain = Chain(number=100, finalized=90)
    small = held(chain, [100]).bytes
    big_logs = block_logs(100) * 50
    for i, x in enumerate(big_logs):
        big_logs[i] = {**x, "logIndex": hex(i), "data": "0x" + "ff" * 512}
    big = LogStore(chain.view, 1 << 30)
    assert big.hold(100, block_hash(100), big_logs)
    json_bytes = sum(len(orjson.dumps(x)) for x in big_logs)
    assert json_bytes < big.bytes < 3 * json_bytes
    assert big.bytes > 40 * small


# --- a property: held runs and sub-ranges tile the window --------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    held_numbers=st.sets(st.integers(60, 100), max_size=41),
    low=st.integers(50, 100),
    span=st.integers(0, 50),
    max_upstream=st.integers(0, 4),
)
def test_pieces_tile_the_window_in_order_and_hold_exactly_its_matching_logs(
    held_numbers: set[int], low: int, span: int, max_upstream: int
) -> None:
    chain = Chain(number=100, finalized=90)
    store = held(chain, sorted(held_numbers))
    high = min(100, low + span)
    flt = LogFilter.parse({"topics": [TRANSFER]})
    pieces = store.split(flt, low, high, max_upstream)
    inside = held_numbers & set(range(low, high + 1))
    if pieces is None:
        holes = sum(
            1
            for n in range(low, high + 1)
            if n not in held_numbers and (n == low or n - 1 in held_numbers)
        )
        assert not inside or holes > max_upstream
        return
    assert pieces[0].low == low and pieces[-1].high == high
    for a, b in itertools.pairwise(pieces):
        assert b.low == a.high + 1
        assert (a.logs is None) != (b.logs is None)  # held runs and sub-ranges alternate
    assert sum(p.logs is None for p in pieces) <= max_upstream
    covered = {n for p in pieces if p.logs is not None for n in range(p.low, p.high + 1)}
    assert covered == inside
    logs = [raw for p in pieces if p.logs is not None for raw in p.logs]
    assert logs == want(sorted(inside), flt)


# --- a property: a held block's logs go to the filters geth's matching picks -------------------
TOPIC_POOL = [TRANSFER, APPROVAL, ALICE, BOB]
_position = st.one_of(
    st.none(),
    st.sampled_from(TOPIC_POOL),
    st.lists(st.one_of(st.none(), st.sampled_from(TOPIC_POOL)), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(
            st.sampled_from([TOKEN, OTHER]), st.lists(st.sampled_from(TOPIC_POOL), max_size=4)
        ),
        max_size=8,
    ),
    addresses=st.one_of(st.none(), st.lists(st.sampled_from([TOKEN, OTHER.upper()]), max_size=2)),
    positions=st.one_of(st.none(), st.lists(_position, max_size=4)),
)
def test_the_logs_a_filter_gets_from_a_held_block_are_those_geth_s_matching_picks(
    shapes: list[tuple[str, list[str]]],
    addresses: list[str] | None,
    positions: list[Any] | None,
) -> None:
    chain = Chain(number=100, finalized=90)
    logs = []
    for i, (address, topics) in enumerate(shapes):
        x = block_logs(100)[0]
        logs.append({**x, "address": address, "topics": topics, "logIndex": hex(i)})
    store = LogStore(chain.view, 1 << 30)
    assert store.hold(100, block_hash(100), logs)
    spec: dict[str, Any] = {}
    if addresses is not None:
        spec["address"] = [a.replace("0X", "0x") for a in addresses]
    if positions is not None:
        spec["topics"] = positions
    flt = LogFilter.parse(spec)
    pieces = store.split(flt, 100, 100, max_upstream=0)
    assert pieces is not None
    assert pieces[0].logs == [orjson.dumps(x) for x in logs if flt.matches(x)]
    assert store.by_hash(flt, block_hash(100)) == pieces[0].logs
