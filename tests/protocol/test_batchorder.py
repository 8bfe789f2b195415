"""A relay's in-order gate for batch streams (chainrelay.batches.order.BatchOrder):
by example, then over generated interleavings of two parents' copies of a stream, each
missing some batches: what goes on is the stream, in order, once each. No I/O."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chainrelay.batches.order import BatchOrder, Missing

BIG = 1 << 30


def gate(start: int | None = 0, max_held: int = 1000, max_held_bytes: int = BIG) -> BatchOrder[int]:
    return BatchOrder(max_held=max_held, max_held_bytes=max_held_bytes, next=start)


def offer(order: BatchOrder[int], seq: int, size: int = 10) -> list[int] | None:
    return order.offer(seq, seq, size)


# --- by example ------------------------------------------------------------------------------
def test_in_order_batches_go_on_at_once() -> None:
    order = gate()
    assert [offer(order, s) for s in range(4)] == [[0], [1], [2], [3]]
    assert order.next == 4 and not order.held and order.held_bytes == 0


def test_held_until_the_hole_is_filled_then_all_go_on_in_order() -> None:
    order = gate()
    assert offer(order, 3) == []
    assert offer(order, 1) == []
    assert order.held_bytes == 20
    assert offer(order, 0) == [0, 1]
    assert offer(order, 2) == [2, 3]
    assert order.next == 4 and not order.held and order.held_bytes == 0


def test_copies_below_next_are_dropped() -> None:
    order = gate()
    offer(order, 0)
    offer(order, 1)
    assert offer(order, 0) == [] and offer(order, 1) == []
    assert order.next == 2
    assert not order.is_new(0) and not order.is_new(1) and order.is_new(2)


def test_a_copy_of_a_held_batch_is_not_new_and_refused() -> None:
    order = gate()
    assert offer(order, 2) == []
    assert not order.is_new(2)
    assert offer(order, 2) is None  # documented: already held (is_new drops it first)
    assert order.held_bytes == 10


def test_the_first_batch_sets_next_unless_the_start_is_named() -> None:
    order = gate(start=None)
    assert order.is_new(0) and order.missing() is None
    assert offer(order, 40) == [40]
    assert offer(order, 39) == []
    assert offer(order, 41) == [41]
    named = gate(start=38)
    assert offer(named, 40) == []
    assert named.missing() == Missing(38, 40)


def test_max_held_refuses_with_none() -> None:
    order = gate(max_held=2)
    assert offer(order, 2) == [] and offer(order, 3) == []
    assert offer(order, 5) is None
    assert offer(order, 1) is None  # past next too: held is full
    assert offer(order, 0) == [0]  # next always goes on
    assert offer(order, 1) == [1, 2, 3]
    assert offer(order, 5) == []  # room again


def test_max_held_bytes_refuses_with_none() -> None:
    order = gate(max_held_bytes=100)
    assert offer(order, 1, 60) == []
    assert offer(order, 2, 41) is None
    assert offer(order, 2, 40) == []
    assert offer(order, 3, 1) is None
    assert order.held_bytes == 100
    assert offer(order, 0, 500) == [0, 1, 2]  # next goes on whatever its size
    assert order.held_bytes == 0


def test_one_batch_is_held_even_past_the_bounds_so_the_hole_has_a_name() -> None:
    order = gate(max_held=0, max_held_bytes=10)
    assert offer(order, 5, 1000) == []
    assert order.missing() == Missing(0, 5)
    assert offer(order, 6, 1) is None


def test_missing() -> None:
    order = gate()
    assert order.missing() is None
    offer(order, 0)
    assert order.missing() is None
    offer(order, 7)
    offer(order, 4)
    assert order.missing() == Missing(1, 4)
    offer(order, 1)
    assert order.missing() == Missing(2, 4)
    offer(order, 2)
    offer(order, 3)
    assert order.missing() == Missing(5, 7)


def test_skip_passes_the_held_batches_on_up_to_the_next_hole() -> None:
    order = gate()
    offer(order, 0)
    for s in (3, 4, 7):
        offer(order, s)
    assert order.skip() == [3, 4]
    assert order.next == 5 and order.held_bytes == 10
    assert order.missing() == Missing(5, 7)
    assert offer(order, 1) == [] and offer(order, 2) == []  # given up on: dropped
    assert offer(order, 5) == [5]
    assert offer(order, 6) == [6, 7]
    assert offer(order, 8) == [8]
    assert order.skip() == [] and order.next == 9


def test_skip_with_nothing_held_changes_nothing() -> None:
    order = gate()
    offer(order, 0)
    assert order.skip() == []
    assert order.next == 1
    assert gate(start=None).skip() == []


# --- two parents -----------------------------------------------------------------------------
@st.composite
def two_parents(draw: st.DrawFn) -> tuple[int, list[int]]:
    """``n`` and the order in which a node gets batches 0..n from two parents: each parent
    sends its copy in order, each may lack some numbers, together they have them all."""
    n = draw(st.integers(0, 40))
    has = draw(st.lists(st.sampled_from(["a", "b", "ab"]), min_size=n + 1, max_size=n + 1))
    a = [s for s in range(n + 1) if "a" in has[s]]
    b = [s for s in range(n + 1) if "b" in has[s]]
    picks = draw(st.permutations([0] * len(a) + [1] * len(b)))
    out: list[int] = []
    for p in picks:
        out.append((a if p == 0 else b).pop(0))
    return n, out


@settings(max_examples=200, deadline=None)
@given(two_parents())
def test_two_parents_in_any_interleaving_give_the_stream_once_in_order(
    case: tuple[int, list[int]],
) -> None:
    n, arrivals = case
    order = gate(start=0)
    passed: list[int] = []
    for seq in arrivals:
        if not order.is_new(seq):
            continue  # a copy: the relay drops it unchecked
        got = offer(order, seq)
        assert got is not None
        passed += got
    assert passed == list(range(n + 1))
    assert not order.held and order.held_bytes == 0 and order.missing() is None


@settings(max_examples=200, deadline=None)
@given(two_parents())
def test_without_is_new_only_copies_of_held_batches_are_refused(
    case: tuple[int, list[int]],
) -> None:
    n, arrivals = case
    order = gate(start=0)
    passed: list[int] = []
    for seq in arrivals:
        held = seq in order.held
        got = offer(order, seq)
        assert (got is None) is held
        passed += got or []
    assert passed == list(range(n + 1))


@settings(max_examples=200, deadline=None)
@given(two_parents())
def test_a_gate_without_a_start_gives_the_stream_from_its_first_batch(
    case: tuple[int, list[int]],
) -> None:
    n, arrivals = case
    order = gate(start=None)
    passed: list[int] = []
    for seq in arrivals:
        if order.is_new(seq):
            passed += offer(order, seq) or []
    assert passed == list(range(arrivals[0], n + 1))


@settings(max_examples=200, deadline=None)
@given(
    two_parents(),
    st.integers(0, 4),
    st.integers(1, 60),
    st.lists(st.integers(1, 20), min_size=41, max_size=41),
)
def test_bounded_gate_never_passes_out_of_order_and_refuses_only_past_its_bounds(
    case: tuple[int, list[int]], max_held: int, max_held_bytes: int, sizes: list[int]
) -> None:
    """With tight bounds some batches are refused (a relay fetches them again): what goes
    on is still in order, once each, and a refusal is always for a number past ``next``
    while the held ones are at a bound."""
    _, arrivals = case
    order = gate(start=0, max_held=max_held, max_held_bytes=max_held_bytes)
    passed: list[int] = []
    for seq in arrivals:
        if not order.is_new(seq):
            continue
        assert order.next is not None
        nxt, held, held_bytes = order.next, len(order.held), order.held_bytes
        got = order.offer(seq, seq, sizes[seq])
        if got is None:
            assert seq > nxt and held >= 1
            assert held >= max_held or held_bytes + sizes[seq] > max_held_bytes
        else:
            passed += got
        assert order.held_bytes == sum(size for _, size in order.held.values())
        assert all(s > order.next for s in order.held)
    assert passed == list(range(len(passed)))
