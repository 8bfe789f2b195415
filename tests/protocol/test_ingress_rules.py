"""The ingress rules of a batch stream (chainrelay.batches.rules.StreamRules): each
verdict by example, then a state machine that pushes true, duplicate, conflicting and
out-of-order batches through commits, failed commits (of all that is in flight, or of what
follows a committed part) and restarts, and checks that what is accepted is always a prefix
of the sequencer's true stream, and that the sequencer's retry always ends with the whole
stream durable, once each. No I/O."""

from __future__ import annotations

import pytest
from eth_utils import keccak
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from chainrelay.batches.rules import Decision, StreamRules, Verdict


def true_hash(seq: int) -> bytes:
    """The hash of the payload the sequencer signed for ``seq``."""
    return keccak(b"true batch %d" % seq)


def forged_hash(seq: int, n: int = 0) -> bytes:
    """Another payload for ``seq`` (a faulty sequencer, or two of them)."""
    return keccak(b"other batch %d %d" % (seq, n))


def accept_all(rules: StreamRules, seqs: range) -> None:
    for s in seqs:
        assert rules.decide(s, true_hash(s)) == Decision(Verdict.ACCEPT, s + 1)


# --- each verdict ----------------------------------------------------------------------------
def test_a_new_stream_accepts_its_first_number_then_each_next() -> None:
    rules = StreamRules(first_seq=100)
    assert rules.next == 100
    accept_all(rules, range(100, 110))
    assert rules.next == 110
    assert rules.hash_of(105) == true_hash(105)


def test_duplicate_of_an_accepted_batch() -> None:
    rules = StreamRules(0)
    accept_all(rules, range(3))
    for s in (0, 1, 2, 2, 0):
        assert rules.decide(s, true_hash(s)) == Decision(Verdict.DUPLICATE, 3)
    assert rules.next == 3


def test_conflict_for_an_accepted_number_keeps_the_first_payload() -> None:
    rules = StreamRules(0)
    accept_all(rules, range(3))
    assert rules.decide(1, forged_hash(1)) == Decision(Verdict.CONFLICT, 3)
    assert rules.hash_of(1) == true_hash(1)
    assert rules.decide(1, true_hash(1)).verdict is Verdict.DUPLICATE


def test_gap_names_the_next_expected_number_and_changes_nothing() -> None:
    rules = StreamRules(5)
    assert rules.decide(7, true_hash(7)) == Decision(Verdict.GAP, 5)
    assert rules.decide(6, true_hash(6)) == Decision(Verdict.GAP, 5)
    assert rules.next == 5 and rules.hash_of(7) is None
    accept_all(rules, range(5, 7))
    assert rules.decide(2**63 - 1, true_hash(0)) == Decision(Verdict.GAP, 7)


def test_before_start() -> None:
    rules = StreamRules(10)
    assert rules.decide(9, true_hash(9)) == Decision(Verdict.BEFORE_START, 10)
    assert rules.decide(0, true_hash(0)) == Decision(Verdict.BEFORE_START, 10)
    accept_all(rules, range(10, 12))
    assert rules.decide(9, true_hash(9)) == Decision(Verdict.BEFORE_START, 12)


def test_numbers_older_than_recent_are_the_logs_to_tell() -> None:
    rules = StreamRules(0, recent=2)
    accept_all(rules, range(5))
    assert [rules.hash_of(s) is not None for s in range(5)] == [False, False, False, True, True]
    assert rules.decide(3, true_hash(3)).verdict is Verdict.DUPLICATE  # still held
    for s in (0, 2):
        assert rules.decide(s, true_hash(s)) == Decision(Verdict.LOOKUP, 5)
        assert rules.decide(s, forged_hash(s)) == Decision(Verdict.LOOKUP, 5)
    assert rules.decide_known(2, true_hash(2), true_hash(2)) == Decision(Verdict.DUPLICATE, 5)
    assert rules.decide_known(2, forged_hash(2), true_hash(2)) == Decision(Verdict.CONFLICT, 5)
    # The log lost it (it was never acknowledged): the sequencer resends from next.
    assert rules.decide_known(2, true_hash(2), None) == Decision(Verdict.GAP, 5)
    assert rules.next == 5


def test_recent_must_be_positive_and_next_not_before_first() -> None:
    with pytest.raises(ValueError):
        StreamRules(0, recent=0)
    with pytest.raises(ValueError):
        StreamRules(10, next_seq=9)
    assert StreamRules(10, next_seq=10).next == 10


# --- restarts --------------------------------------------------------------------------------
def test_restored_from_an_empty_log_starts_at_first() -> None:
    rules = StreamRules.restored(7, [])
    assert rules.next == 7
    assert rules.decide(7, true_hash(7)).verdict is Verdict.ACCEPT


def test_restored_continues_after_the_logs_last_batch() -> None:
    tail = [(s, true_hash(s)) for s in range(3, 9)]
    rules = StreamRules.restored(0, tail, recent=4)
    assert rules.next == 9
    assert [rules.hash_of(s) is not None for s in range(3, 9)] == [False] * 2 + [True] * 4
    assert rules.decide(8, true_hash(8)).verdict is Verdict.DUPLICATE
    assert rules.decide(8, forged_hash(8)).verdict is Verdict.CONFLICT
    assert rules.decide(4, true_hash(4)).verdict is Verdict.LOOKUP
    assert rules.decide(9, true_hash(9)).verdict is Verdict.ACCEPT


def test_restored_refuses_a_log_that_ends_before_the_first_number() -> None:
    with pytest.raises(ValueError):
        StreamRules.restored(10, [(3, true_hash(3))])


# --- rollback --------------------------------------------------------------------------------
def test_rollback_of_the_in_flight_part_expects_it_again() -> None:
    rules = StreamRules(0)
    accept_all(rules, range(6))
    rules.rollback(4)
    assert rules.next == 4
    assert rules.hash_of(3) == true_hash(3)
    assert rules.hash_of(4) is None and rules.hash_of(5) is None
    assert rules.decide(5, true_hash(5)) == Decision(Verdict.GAP, 4)
    # Never durable, never acknowledged: any payload may take the number now.
    assert rules.decide(4, forged_hash(4)) == Decision(Verdict.ACCEPT, 5)
    assert rules.decide(4, true_hash(4)).verdict is Verdict.CONFLICT


@pytest.mark.parametrize("at", [6, 7, 10**6])
def test_rollback_at_or_past_next_changes_nothing(at: int) -> None:
    rules = StreamRules(0)
    accept_all(rules, range(6))
    rules.rollback(at)
    assert rules.next == 6
    assert all(rules.hash_of(s) == true_hash(s) for s in range(6))


@pytest.mark.parametrize("at", [3, 0])
def test_rollback_to_or_below_first_empties_the_stream(at: int) -> None:
    rules = StreamRules(3)
    accept_all(rules, range(3, 6))
    rules.rollback(at)
    assert rules.next == 3
    assert all(rules.hash_of(s) is None for s in range(3, 6))
    assert rules.decide(3, forged_hash(3)).verdict is Verdict.ACCEPT


def test_rollback_of_an_empty_stream_changes_nothing() -> None:
    rules = StreamRules(3)
    rules.rollback(3)
    rules.rollback(0)
    assert rules.next == 3


def test_rollback_below_the_recent_window_then_lookup() -> None:
    rules = StreamRules(0, recent=2)
    accept_all(rules, range(6))
    rules.rollback(2)  # the durable log ends at 1, whose hash was pushed out already
    assert rules.next == 2
    assert rules.decide(1, true_hash(1)) == Decision(Verdict.LOOKUP, 2)
    accept_all(rules, range(2, 4))


# --- the state machine -----------------------------------------------------------------------
class IngressStream(RuleBasedStateMachine):
    """One stream at one ingress node, as a sequencer (possibly misbehaving, possibly
    pushing to two nodes) and the node's log see it.

    ``durable`` is what the log holds after a commit; ``in_flight`` what the rules accepted
    and the group commit has not made durable yet. A LOOKUP is answered from both: the node
    holds in-flight batches until their commit, so it can tell their hashes too."""

    @initialize(
        first=st.sampled_from([0, 1, 17, 2**62]),
        n=st.integers(1, 24),
        recent=st.integers(1, 6),
    )
    def start(self, first: int, n: int, recent: int) -> None:
        self.first, self.end, self.recent = first, first + n, recent
        self.stream_rules = StreamRules(first, recent=recent)
        self.durable: list[tuple[int, bytes]] = []
        self.in_flight: list[tuple[int, bytes]] = []
        self.conflicts = 0

    # The node's side.
    def accepted(self) -> list[tuple[int, bytes]]:
        return self.durable + self.in_flight

    def stored(self, seq: int) -> bytes | None:
        at = seq - self.first
        log = self.accepted()
        return log[at][1] if 0 <= at < len(log) else None

    def push(self, seq: int, payload_hash: bytes) -> Decision:
        """What the node answers: ``decide``, and the log's word when it says LOOKUP."""
        before = self.stream_rules.next
        decision = self.stream_rules.decide(seq, payload_hash)
        assert decision.expected == self.stream_rules.next
        if decision.verdict is Verdict.LOOKUP:
            assert self.first <= seq < before and self.stream_rules.hash_of(seq) is None
            assert self.stream_rules.next == before
            decision = self.stream_rules.decide_known(seq, payload_hash, self.stored(seq))
        if decision.verdict is Verdict.ACCEPT:
            assert seq == before and self.stored(seq) is None  # never two payloads for a seq
            self.in_flight.append((seq, payload_hash))
        else:
            assert self.stream_rules.next == before
        return decision

    # The sequencer's side.
    @rule(data=st.data())
    def push_true_batch(self, data: st.DataObject) -> None:
        """Any number of the true stream, in any order, repeats welcome."""
        nxt = self.stream_rules.next
        seq = data.draw(
            st.integers(self.first, self.end - 1)
            | st.just(min(nxt, self.end - 1))  # the stream moves on
            | st.integers(self.first, max(self.first, nxt - 1)),  # a retry: old numbers
            label="seq",
        )
        decision = self.push(seq, true_hash(seq))
        if seq == nxt:
            assert decision == Decision(Verdict.ACCEPT, nxt + 1)
        elif seq > nxt:
            assert decision == Decision(Verdict.GAP, nxt)
        else:
            assert decision == Decision(Verdict.DUPLICATE, nxt)

    @precondition(lambda self: self.accepted())
    @rule(data=st.data())
    def push_conflicting_batch(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(self.first, self.stream_rules.next - 1), label="seq")
        self.conflicts += 1
        decision = self.push(seq, forged_hash(seq, self.conflicts))
        assert decision == Decision(Verdict.CONFLICT, self.stream_rules.next)

    @rule(data=st.data(), forged=st.booleans())
    def push_past_next(self, data: st.DataObject, forged: bool) -> None:
        nxt = self.stream_rules.next
        seq = data.draw(st.integers(nxt + 1, nxt + 40), label="seq")
        decision = self.push(seq, forged_hash(seq) if forged else true_hash(seq))
        assert decision == Decision(Verdict.GAP, nxt)

    @precondition(lambda self: self.first > 0)
    @rule(data=st.data())
    def push_before_start(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(max(0, self.first - 40), self.first - 1), label="seq")
        decision = self.push(seq, true_hash(seq))
        assert decision == Decision(Verdict.BEFORE_START, self.stream_rules.next)

    @rule()
    def commit(self) -> None:
        self.durable += self.in_flight
        self.in_flight = []

    @rule()
    def commit_fails(self) -> None:
        self.stream_rules.rollback(self.first + len(self.durable))
        self.in_flight = []

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def commit_part_then_fail(self, data: st.DataObject) -> None:
        """Earlier groups commit, one fails: what was queued behind it fails with it (the
        log takes nothing that does not follow on), so the node rolls back at the first
        failed seq, which may be any of the in-flight ones."""
        done = data.draw(st.integers(0, len(self.in_flight) - 1), label="committed")
        self.durable += self.in_flight[:done]
        failed_at = self.in_flight[done][0]
        assert failed_at == self.first + len(self.durable)
        self.stream_rules.rollback(failed_at)
        self.in_flight = []
        assert self.stream_rules.next == failed_at
        assert self.stream_rules.hash_of(failed_at) is None

    @rule(data=st.data())
    def crash_and_restart(self, data: st.DataObject) -> None:
        """In-flight batches are lost; the rules come back from the log's last entries
        (as many as the node reads back, at least the last one)."""
        self.in_flight = []
        size = len(self.durable)
        keep = data.draw(st.integers(min(1, size), size), label="tail") if size else 0
        tail = self.durable[size - keep :]
        self.stream_rules = StreamRules.restored(self.first, tail, recent=self.recent)

    # What must always hold.
    @invariant()
    def accepted_is_a_prefix_of_the_true_stream(self) -> None:
        log = self.accepted()
        assert log == [(s, true_hash(s)) for s in range(self.first, self.first + len(log))]
        assert self.stream_rules.next == self.first + len(log) <= self.end

    @invariant()
    def held_hashes_are_the_accepted_ones_and_bounded(self) -> None:
        held = 0
        for s in range(self.first, self.stream_rules.next):
            h = self.stream_rules.hash_of(s)
            if h is not None:
                assert h == true_hash(s)
                held += 1
        assert held <= self.recent
        assert self.stream_rules.hash_of(self.stream_rules.next) is None

    def teardown(self) -> None:
        """The sequencer's retry: from the first number it has no ack for, in order to
        the end. Whatever happened before, the log ends as the true stream, once each."""
        if not hasattr(self, "rules"):
            return
        for s in range(self.first + len(self.durable), self.end):
            nxt = self.stream_rules.next
            decision = self.push(s, true_hash(s))
            expected = Verdict.ACCEPT if s == nxt else Verdict.DUPLICATE
            assert decision.verdict is expected, (s, decision)
        self.commit()
        assert self.durable == [(s, true_hash(s)) for s in range(self.first, self.end)]
        assert self.stream_rules.next == self.end


IngressStream.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_ingress_stream = IngressStream.TestCase
