"""The feed session rules, objects in and objects out: the backlog's bounds, where a
resuming child starts, what a cursor sends and when it is lagging, dedup, positions, and
the control messages. The central property: replay then live gives each child exactly the
frames appended from its start, with no gap and no duplicate. No sockets."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.protocol import State
from websockets.server import ServerProtocol

from chainrelay.tree.hub import close_reason
from chainrelay.tree.session import (
    CLOSE_BAD_HELLO,
    MAX_CONTROL_BYTES,
    MAX_HELLO_STREAMS,
    POSITION_END,
    PROTOCOL_VERSION,
    Backlog,
    ControlError,
    Cursor,
    Dedup,
    Gap,
    Positions,
    Want,
    encode_bye,
    encode_error,
    encode_hello,
    encode_welcome,
    parse_control,
    parse_held,
    parse_hello,
    welcome_entry,
)

UNBOUNDED = 1 << 60


def raw(n: int, size: int = 100) -> bytes:
    """A frame's bytes: unique per ``n``, so a duplicate or a swap shows."""
    tag = b"frame %d;" % n
    return (tag * (size // len(tag) + 1))[:size] if size >= len(tag) else tag[:size]


def identity(n: int) -> bytes:
    return n.to_bytes(32, "big")


def filled(
    positions: list[int], max_frames: int = 100, max_bytes: int = UNBOUNDED, size: int = 100
) -> Backlog:
    b = Backlog(max_frames, max_bytes)
    for i, p in enumerate(positions):
        b.append(p, identity(i), raw(i, size))
    return b


def replay(backlog: Backlog, seq: int) -> list[int]:
    """Positions a child starting at ``seq`` is sent, in order."""
    cursor = Cursor(seq, UNBOUNDED, UNBOUNDED)
    sent = cursor.take(backlog, UNBOUNDED)
    by_raw = {e.raw: e.position for e in backlog.entries}
    return [by_raw[r] for r in sent]


# --- backlog bounds ---------------------------------------------------------------------------
@pytest.mark.parametrize(("frames", "nbytes"), [(0, 10), (10, 0), (-1, 10)])
def test_a_backlog_holds_at_least_one_frame(frames: int, nbytes: int) -> None:
    with pytest.raises(ValueError):
        Backlog(frames, nbytes)


@given(
    st.integers(1, 10),
    st.integers(1, 600),
    st.lists(st.integers(0, 300), max_size=60),
)
@settings(max_examples=300, deadline=None)
def test_backlog_never_exceeds_either_bound_but_for_one_oversized_frame(
    max_frames: int, max_bytes: int, sizes: list[int]
) -> None:
    b = Backlog(max_frames, max_bytes)
    appended: list[bytes] = []
    for i, size in enumerate(sizes):
        assert b.append(i, identity(i), raw(i, size)) == i
        appended.append(raw(i, size))
        held = [e.raw for e in b.entries]
        assert len(held) <= max_frames
        assert b.bytes <= max_bytes or len(held) == 1
        assert b.bytes == sum(map(len, held))
        # The newest frames, as many as both bounds allow: only the oldest are dropped.
        assert held == appended[len(appended) - len(held) :]
        if len(held) < len(appended):
            one_more = appended[len(appended) - len(held) - 1 :]
            assert len(one_more) > max_frames or sum(map(len, one_more)) > max_bytes
        assert (b.next_seq, b.base_seq) == (i + 1, i + 1 - len(held))
        assert b.appended_bytes == sum(map(len, appended))
        for seq in range(-1, i + 3):
            e = b.get(seq)
            if b.base_seq <= seq <= i:
                assert e is not None and (e.seq, e.raw) == (seq, appended[seq])
            else:
                assert e is None


def test_a_single_frame_larger_than_the_byte_bound_is_kept_alone() -> None:
    b = filled([1, 2], max_bytes=250)
    b.append(3, identity(3), raw(3, 1000))
    assert [e.position for e in b.entries] == [3] and b.bytes == 1000
    b.append(4, identity(4), raw(4, 100))
    assert [e.position for e in b.entries] == [4] and b.bytes == 100


def test_an_empty_backlog_has_no_positions_and_starts_at_its_next_seq() -> None:
    b = Backlog(5, 1000)
    assert (len(b), b.oldest_position, b.newest_position, b.base_seq) == (0, None, None, 0)
    b.append(7, identity(7), raw(7))
    b.trim_below(8)
    assert (len(b), b.oldest_position, b.newest_position, b.bytes) == (0, None, None, 0)
    assert b.base_seq == b.next_seq == 1


def test_oldest_and_newest_positions_hold_through_a_reorg() -> None:
    b = filled([10, 11, 12, 11, 12, 13])
    assert (b.oldest_position, b.newest_position) == (10, 13)
    b = filled([12, 13, 11])
    assert (b.oldest_position, b.newest_position) == (11, 13)


def test_trim_below_drops_confirmed_frames_from_the_front_only() -> None:
    b = filled([10, 11, 12, 11, 12, 13])
    b.trim_below(12)
    # The reorged 11 stays: it follows a frame that is kept, and seqs stay consecutive.
    assert [e.position for e in b.entries] == [12, 11, 12, 13]
    assert b.base_seq == 2 and b.bytes == 400
    assert (entry := b.get(3)) is not None and entry.position == 11
    behind = Cursor(1, UNBOUNDED, UNBOUNDED)
    assert behind.lagging(b) and behind.take(b, UNBOUNDED) == []


# --- resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("from_position", "last"), [(None, None), (0, None), (10**6, None), (None, 0), (None, 5)]
)
def test_resuming_from_an_empty_backlog_is_live_without_a_gap(
    from_position: int | None, last: int | None
) -> None:
    b = Backlog(2, UNBOUNDED)
    assert b.resume(from_position, last) == (0, None)
    for i in range(5):
        b.append(i, identity(i), raw(i))
    b.trim_below(10)
    assert b.resume(from_position, last) == (5, None)


def test_resume_last_replays_the_last_frames_held() -> None:
    b = filled(list(range(100, 110)), max_frames=6)  # seqs 4..9 held
    assert b.resume(None, 0) == (10, None)
    assert b.resume(None, 1) == (9, None)
    assert b.resume(None, 6) == (4, None)
    assert b.resume(None, 7) == (4, None)
    assert b.resume(None, 10**6) == (4, None)
    assert replay(b, b.resume(None, 3)[0]) == [107, 108, 109]


def test_resume_with_neither_is_live() -> None:
    b = filled(list(range(100, 110)))
    assert b.resume(None, None) == (10, None)
    assert replay(b, 10) == []


def test_resume_from_a_position_held_replays_from_it() -> None:
    b = filled(list(range(100, 110)), max_frames=6)  # positions 104..109 held
    start, gap = b.resume(106, None)
    assert gap is None and replay(b, start) == [106, 107, 108, 109]
    assert b.resume(104, None) == (4, None)
    assert b.resume(110, None) == (10, None)  # caught up: live
    assert b.resume(500, None) == (10, None)  # ahead of this parent: live


def test_resume_from_before_the_backlog_names_the_gap_to_backfill() -> None:
    b = filled(list(range(100, 110)), max_frames=6)
    start, gap = b.resume(100, None)
    assert (start, gap) == (4, Gap(100, 104))
    assert replay(b, start) == [104, 105, 106, 107, 108, 109]
    assert b.resume(0, None) == (4, Gap(0, 104))
    assert b.resume(103, None) == (4, Gap(103, 104))


def test_resume_into_a_hole_of_the_backlog_starts_after_it() -> None:
    # The parent itself missed 7 and 8: the child learns it from the frame at 9.
    b = filled([5, 6, 9, 10])
    start, gap = b.resume(7, None)
    assert gap is None and replay(b, start) == [9, 10]
    positions = Positions(7)
    assert positions.gap_before(9) == Gap(7, 9)


@pytest.mark.parametrize(
    ("from_position", "expected"),
    [(11, [11, 12, 11, 12, 13]), (12, [12, 11, 12, 13]), (13, [13]), (14, [])],
)
def test_resume_across_a_reorg_replays_the_new_branch(
    from_position: int, expected: list[int]
) -> None:
    b = filled([10, 11, 12, 11, 12, 13])
    start, gap = b.resume(from_position, None)
    assert gap is None and replay(b, start) == expected


def test_resume_before_a_backlog_whose_oldest_frame_is_a_reorg() -> None:
    b = filled([10, 11, 12, 13, 11, 12], max_frames=3)  # holds 13, 11, 12
    assert b.resume(9, None) == (3, Gap(9, 11))
    assert b.resume(11, None) == (3, None)
    assert replay(b, 3) == [13, 11, 12]
    assert b.resume(12, None) == (3, None)
    assert b.resume(14, None) == (6, None)


@given(
    st.lists(st.integers(0, 30), min_size=1, max_size=40),
    st.integers(1, 40),
    st.integers(0, 35),
)
@settings(max_examples=400, deadline=None)
def test_resume_from_never_skips_a_frame_at_or_after_the_position(
    positions: list[int], max_frames: int, from_position: int
) -> None:
    b = filled(positions, max_frames=max_frames)
    held = [e.position for e in b.entries]
    start, gap = b.resume(from_position, None)
    sent = replay(b, start)
    if from_position < min(held):
        assert gap == Gap(from_position, min(held)) and sent == held
        return
    assert gap is None
    # Every frame the child may lack is sent, and it is sent nothing before the first one.
    first = next((i for i, p in enumerate(held) if p >= from_position), len(held))
    assert sent == held[first:]


# --- cursor -----------------------------------------------------------------------------------
def test_take_writes_within_the_budget_and_at_least_one_frame() -> None:
    b = filled(list(range(10)))  # 100 bytes each
    c = Cursor(0, UNBOUNDED, UNBOUNDED)
    assert c.take(b, 250) == [raw(0), raw(1)] and c.seq == 2
    assert c.take(b, 0) == [raw(2)] and c.seq == 3
    assert c.take(b, 99) == [raw(3)]
    assert c.take(b, 300) == [raw(4), raw(5), raw(6)]
    assert c.take(b, UNBOUNDED) == [raw(7), raw(8), raw(9)] and c.seq == 10
    assert c.take(b, UNBOUNDED) == [] and c.seq == 10
    b.append(10, identity(10), raw(10))
    assert c.take(b, 1) == [raw(10)]


def test_a_cursor_past_the_backlog_is_lagging_and_takes_nothing() -> None:
    b = filled(list(range(3)), max_frames=3)
    c = Cursor(0, UNBOUNDED, UNBOUNDED)
    assert not c.lagging(b)
    b.append(3, identity(3), raw(3))
    assert c.lagging(b)
    assert c.take(b, UNBOUNDED) == [] and c.seq == 0  # never skips what was dropped


def test_a_cursor_is_lagging_once_more_frames_are_due_than_its_queue_holds() -> None:
    b = filled([])
    c = Cursor(0, 3, UNBOUNDED)
    for i in range(3):
        b.append(i, identity(i), raw(i))
        assert not c.lagging(b)
    b.append(3, identity(3), raw(3))
    assert c.lagging(b)
    c.take(b, 100)
    assert not c.lagging(b)


def test_a_cursor_is_lagging_once_more_bytes_are_due_than_its_queue_holds() -> None:
    b = filled([])
    c = Cursor(0, UNBOUNDED, 300)
    for i in range(3):
        b.append(i, identity(i), raw(i))
        assert not c.lagging(b)  # exactly 300 due is within the bound
    b.append(3, identity(3), raw(3, 1))
    assert c.lagging(b)
    c.take(b, 0)
    assert not c.lagging(b)  # 201 due


def test_a_caught_up_cursor_is_not_lagging() -> None:
    b = filled(list(range(5)), max_frames=2)
    c = Cursor(5, 0, 0)
    assert not c.lagging(b) and c.take(b, UNBOUNDED) == []


def test_replaying_the_backlog_does_not_count_against_the_queue() -> None:
    b = filled(list(range(50)), max_frames=100)
    c = Cursor.at(b, b.base_seq, 3, 350)
    assert not c.lagging(b)  # 50 frames, 5000 bytes due, all of them replay
    for i in range(50, 53):
        b.append(i, identity(i), raw(i))
    assert not c.lagging(b)  # 3 live frames, 300 bytes: within both bounds
    b.append(53, identity(53), raw(53, 60))
    assert c.lagging(b)  # 4 live frames, 360 bytes


def test_a_replaying_cursor_is_lagging_by_live_bytes_alone() -> None:
    b = filled(list(range(50)), max_frames=100)
    c = Cursor.at(b, 0, UNBOUNDED, 250)
    for i in range(50, 52):
        b.append(i, identity(i), raw(i))
    assert not c.lagging(b)
    b.append(52, identity(52), raw(52, 51))
    assert c.lagging(b)


def test_a_cursor_that_caught_up_counts_from_its_own_place() -> None:
    b = filled(list(range(5)))
    c = Cursor.at(b, 0, 2, UNBOUNDED)
    c.take(b, UNBOUNDED)
    for i in range(5, 7):
        b.append(i, identity(i), raw(i))
    assert not c.lagging(b)
    c.take(b, UNBOUNDED)
    for i in range(7, 10):
        b.append(i, identity(i), raw(i))
    assert c.lagging(b)  # 3 due since its place, though only 3 of 5 are live since it began


def test_a_replaying_cursor_whose_frames_are_dropped_is_lagging() -> None:
    b = filled(list(range(5)), max_frames=5)
    c = Cursor.at(b, 0, UNBOUNDED, UNBOUNDED)
    b.append(5, identity(5), raw(5))
    assert c.lagging(b)


# --- the no-gap, no-duplicate property of replay then live --------------------------------
@dataclass
class Child:
    cursor: Cursor
    start: int
    got: list[bytes] = field(default_factory=list)
    closed: bool = False


def expected_start(log: list[tuple[int, bytes]], base: int, mode: str, arg: int) -> int:
    """Where a child must start, from the appended log alone (seq = index in the log)."""
    n = len(log)
    if mode == "live":
        return n
    if mode == "last":
        return max(base, n - arg)
    held = range(base, n)
    if held and arg < min(log[i][0] for i in held):
        return base
    return next((i for i in held if log[i][0] >= arg), n)


@given(st.data())
@settings(max_examples=250, deadline=None)
def test_replay_then_live_sends_each_child_exactly_the_appended_frames(data: st.DataObject) -> None:
    roomy = data.draw(st.booleans(), "roomy")
    if roomy:
        b = Backlog(UNBOUNDED, UNBOUNDED)
    else:
        b = Backlog(data.draw(st.integers(1, 12)), data.draw(st.integers(50, 1500)))
    log: list[tuple[int, bytes]] = []
    children: list[Child] = []
    position = data.draw(st.integers(0, 5))
    steps = data.draw(st.lists(st.sampled_from(["append", "append", "take", "start"]), max_size=80))
    for step in steps:
        if step == "append":
            # Mostly the next position; sometimes a jump ahead or a reorg back.
            position = max(0, position + data.draw(st.sampled_from([1, 1, 1, 3, 0, -1, -2])))
            frame = raw(len(log), data.draw(st.integers(1, 200)))
            b.append(position, identity(len(log)), frame)
            log.append((position, frame))
        elif step == "start":
            mode = data.draw(st.sampled_from(["from", "last", "live"]))
            arg = data.draw(st.integers(0, position + 3))
            start, _ = b.resume(arg if mode == "from" else None, arg if mode == "last" else None)
            assert start == expected_start(log, b.base_seq, mode, arg)
            if roomy:
                cursor = Cursor.at(b, start, UNBOUNDED, UNBOUNDED)
            else:
                cursor = Cursor.at(
                    b, start, data.draw(st.integers(1, 10)), data.draw(st.integers(1, 2000))
                )
            children.append(Child(cursor, start))
        elif children:
            child = children[data.draw(st.integers(0, len(children) - 1))]
            pump(child, b, data.draw(st.integers(0, 600)))
    for child in children:
        while not child.closed and child.cursor.seq < b.next_seq:
            assert pump(child, b, UNBOUNDED) or child.closed, "a child that is not lagging stalled"
        assert child.got == [f for _, f in log[child.start : child.start + len(child.got)]]
        if not child.closed:
            assert child.got == [f for _, f in log[child.start :]]
        if roomy:
            assert not child.closed


def pump(child: Child, backlog: Backlog, budget: int) -> int:
    """What a parent does for one child when it may write: close it if lagging, else send.
    Returns the frames sent."""
    if child.closed:
        return 0
    if child.cursor.lagging(backlog):
        child.closed = True
        return 0
    sent = child.cursor.take(backlog, budget)
    child.got += sent
    assert child.cursor.seq == child.start + len(child.got)
    return len(sent)


# --- dedup ------------------------------------------------------------------------------------
def test_dedup_lets_the_first_copy_through() -> None:
    d = Dedup(4)
    assert d.add(b"a") and b"a" in d
    assert not d.add(b"a") and b"a" in d
    assert b"b" not in d


def test_dedup_forgets_identities_past_its_window() -> None:
    d = Dedup(3)
    for x in (b"a", b"b", b"c"):
        assert d.add(x)
    assert not d.add(b"a")
    assert d.add(b"d")  # the window moves past a
    assert b"a" not in d and d.add(b"a")
    assert not d.add(b"c") and not d.add(b"d")


def test_a_parent_replaying_a_window_of_frames_brings_none_back_as_new() -> None:
    d = Dedup(64)
    ids = [identity(i) for i in range(64)]
    assert all(d.add(i) for i in ids)
    assert not any(d.add(i) for i in ids)


@given(st.integers(1, 6), st.lists(st.integers(0, 10), max_size=80))
@settings(max_examples=300, deadline=None)
def test_dedup_remembers_the_last_identities_first_seen(window: int, seen: list[int]) -> None:
    d = Dedup(window)
    recent: deque[int] = deque(maxlen=window)
    for x in seen:
        new = x not in recent
        assert d.add(identity(x)) is new
        if new:
            recent.append(x)
        assert all(identity(r) in d for r in recent)
        assert sum(identity(y) in d for y in range(11)) == len(recent)


# --- positions --------------------------------------------------------------------------------
def test_positions_before_any_delivery_see_no_gap_and_no_reorg() -> None:
    p = Positions()
    assert p.gap_before(10**9) is None and not p.is_reorg(0)


def test_positions_name_the_gap_before_a_frame_ahead() -> None:
    p = Positions()
    p.delivered(10)
    assert p.next == 11
    assert p.gap_before(11) is None
    assert p.gap_before(12) == Gap(11, 12)
    assert p.gap_before(20) == Gap(11, 20)
    assert not p.is_reorg(11) and not p.is_reorg(20)


def test_positions_see_a_frame_at_or_below_a_delivered_one_as_a_reorg() -> None:
    p = Positions()
    p.delivered(10)
    assert p.is_reorg(10) and p.is_reorg(3)
    assert p.gap_before(10) is None
    p.delivered(9)  # the new branch's 9: the next expected goes back with it
    assert p.next == 10 and not p.is_reorg(10) and p.gap_before(10) is None


# --- control messages ---------------------------------------------------------------------------
wants_strategy = st.lists(
    st.tuples(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=32),
        st.sampled_from(["from", "last", "live"]),
        st.integers(0, POSITION_END - 1),
    ),
    min_size=1,
    max_size=MAX_HELLO_STREAMS,
    unique_by=lambda t: t[0],
)


@given(wants_strategy, st.booleans())
@settings(deadline=None)
def test_hello_round_trips(spec: list[tuple[str, str, int]], as_text: bool) -> None:
    wants = [
        Want(name, n if how == "from" else None, n if how == "last" else None)
        for name, how, n in spec
    ]
    data = encode_hello(wants)
    assert parse_hello(data.decode() if as_text else data).wants == wants


def hello(**fields: Any) -> bytes:
    msg: dict[str, Any] = {
        "type": "hello",
        "version": PROTOCOL_VERSION,
        "streams": [{"stream": "bsc/blocks"}],
    }
    msg.update(fields)
    return orjson.dumps({k: v for k, v in msg.items() if v is not DROP})


DROP = object()


def one(**entry: Any) -> bytes:
    return hello(streams=[{"stream": "bsc/blocks", **entry}])


MALFORMED_HELLOS: dict[str, bytes | str] = {
    "empty": b"",
    "not json": b"hello",
    "truncated json": hello()[:-1],
    "invalid utf-8": b'{"type":"hello\xff"}',
    "lone surrogate": '{"type":"hello\ud800"}',
    "array": b"[]",
    "string": b'"hello"',
    "number": b"1",
    "null": b"null",
    "deeply nested": b"[" * 2000 + b"]" * 2000,
    "too large": hello(pad=" " * MAX_CONTROL_BYTES),
    "no type": hello(type=DROP),
    "type welcome": hello(type="welcome"),
    "type not a string": hello(type=["hello"]),
    "no version": hello(version=DROP),
    "version 0": hello(version=0),
    "version 2": hello(version=2),
    "version string": hello(version="1"),
    "version true": hello(version=True),
    "version float": hello(version=1.0),
    "version null": hello(version=None),
    "no streams": hello(streams=DROP),
    "streams null": hello(streams=None),
    "streams object": hello(streams={"stream": "bsc/blocks"}),
    "streams string": hello(streams="bsc/blocks"),
    "streams empty": hello(streams=[]),
    "streams too many": hello(streams=[{"stream": f"s{i}"} for i in range(MAX_HELLO_STREAMS + 1)]),
    "entry a string": hello(streams=["bsc/blocks"]),
    "entry null": hello(streams=[None]),
    "entry a list": hello(streams=[["bsc/blocks"]]),
    "entry without stream": hello(streams=[{"from": 1}]),
    "stream a number": hello(streams=[{"stream": 1}]),
    "stream null": hello(streams=[{"stream": None}]),
    "stream named twice": hello(streams=[{"stream": "a"}, {"stream": "b"}, {"stream": "a"}]),
    "from negative": one(**{"from": -1}),
    "from float": one(**{"from": 1.0}),
    "from string": one(**{"from": "1"}),
    "from hex string": one(**{"from": "0x1"}),
    "from true": one(**{"from": True}),
    "from false": one(**{"from": False}),
    "from list": one(**{"from": [1]}),
    "from 2**64": hello().replace(b'"bsc/blocks"}', b'"bsc/blocks","from":18446744073709551616}'),
    "from 2**64-1": one(**{"from": 2**64 - 1}),
    "from 2**63": one(**{"from": POSITION_END}),
    "from 1e400": hello().replace(b'"bsc/blocks"}', b'"bsc/blocks","from":1e400}'),
    "last 2**63": one(last=POSITION_END),
    "max_frame_bytes 2**63": hello(max_frame_bytes=POSITION_END),
    "max_frame_bytes negative": hello(max_frame_bytes=-1),
    "max_frame_bytes string": hello(max_frame_bytes="1"),
    "stream empty": hello(streams=[{"stream": ""}]),
    "stream of 33 characters": hello(streams=[{"stream": "s" * 33}]),
    "stream not ASCII": hello(streams=[{"stream": "blöcks"}]),
    "stream of 120 wide characters": hello(streams=[{"stream": "é" * 120}]),
    "stream with a blank": hello(streams=[{"stream": "bsc blocks"}]),
    "stream with a NUL": hello(streams=[{"stream": "bsc\x00"}]),
    "last negative": one(last=-1),
    "last float": one(last=0.5),
    "last true": one(last=True),
    "last string": one(last="5"),
    "from and last": one(**{"from": 1, "last": 1}),
}


@pytest.mark.parametrize("data", list(MALFORMED_HELLOS.values()), ids=list(MALFORMED_HELLOS))
def test_a_malformed_hello_is_a_control_error(data: bytes | str) -> None:
    with pytest.raises(ControlError) as exc:
        parse_hello(data)
    assert exc.value.code == CLOSE_BAD_HELLO


@pytest.mark.parametrize(
    "data",
    [
        hello(streams=[{"stream": f"s{i}"} for i in range(MAX_HELLO_STREAMS)]),
        one(**{"from": POSITION_END - 1}),
        one(last=POSITION_END - 1),
        hello(max_frame_bytes=POSITION_END - 1),
        hello(streams=[{"stream": "s" * 32}]),
        hello(streams=[{"stream": "!~"}]),
        one(**{"from": 0}),
        one(last=0),
        one(**{"from": None, "last": 3}),
        one(extra="ignored"),
        hello(extra={"nested": [1, 2]}),
    ],
)
def test_a_well_formed_hello_at_the_limits_is_accepted(data: bytes) -> None:
    assert parse_hello(data).wants


def test_a_hello_of_exactly_the_control_limit_is_accepted() -> None:
    base = hello(pad="")
    exact = hello(pad=" " * (MAX_CONTROL_BYTES - len(base)))
    assert len(exact) == MAX_CONTROL_BYTES
    assert parse_hello(exact).wants == [Want("bsc/blocks")]
    with pytest.raises(ControlError):
        parse_hello(hello(pad=" " * (MAX_CONTROL_BYTES - len(base) + 1)))


def test_from_and_last_are_read_as_sent() -> None:
    data = hello(streams=[{"stream": "a", "from": 7}, {"stream": "b", "last": 3}, {"stream": "c"}])
    assert parse_hello(data).wants == [Want("a", 7), Want("b", None, 3), Want("c")]


def test_a_hello_starts_a_session_the_welcome_describes() -> None:
    b = filled(list(range(100, 110)), max_frames=6)  # 104..109 held
    wants = parse_hello(encode_hello([Want("bsc/blocks", from_position=101)])).wants
    start, gap = b.resume(wants[0].from_position, wants[0].last)
    msg = parse_control(encode_welcome([welcome_entry(wants[0], b, gap)]))
    assert msg == {
        "type": "welcome",
        "streams": [{"stream": "bsc/blocks", "oldest": 104, "newest": 109, "gap": [101, 104]}],
    }
    assert replay(b, start) == list(range(104, 110))


def test_a_welcome_without_a_gap_has_no_gap_key_and_an_empty_backlog_no_positions() -> None:
    b = filled([5, 6])
    msg = parse_control(encode_welcome([welcome_entry(Want("x", last=1), b, None)]))
    assert msg["streams"] == [{"stream": "x", "oldest": 5, "newest": 6}]
    empty = parse_control(encode_welcome([welcome_entry(Want("y"), Backlog(1, 1), None)]))
    assert empty["streams"] == [{"stream": "y", "oldest": None, "newest": None}]


def test_bye_and_error_parse_as_control_messages() -> None:
    assert parse_control(encode_bye("lagging")) == {"type": "bye", "reason": "lagging"}
    assert parse_control(encode_error('unknown stream "x"')) == {
        "type": "error",
        "message": 'unknown stream "x"',
    }


@pytest.mark.parametrize(
    "name",
    [
        "empty",
        "not json",
        "invalid utf-8",
        "lone surrogate",
        "array",
        "string",
        "number",
        "null",
        "deeply nested",
        "too large",
    ],
)
def test_a_malformed_control_message_is_a_control_error(name: str) -> None:
    with pytest.raises(ControlError):
        parse_control(MALFORMED_HELLOS[name])


# --- resuming after a reorg: ``after`` -------------------------------------------------------
def _ident(tag: str) -> bytes:
    return tag.encode().ljust(32, b"\x00")


def _backlog_of(*frames: tuple[int, str]) -> Backlog:
    b = Backlog(100, 10**9)
    for position, tag in frames:
        b.append(position, _ident(tag), tag.encode())
    return b


def _replay(b: Backlog, start: int) -> list[bytes]:
    return Cursor.at(b, start, 1000, 10**9).take(b, 10**9)


def test_resume_after_the_last_frame_taken_brings_a_reorg_below_from() -> None:
    b = _backlog_of((9, "a9"), (10, "a10"), (9, "b9"), (10, "b10"), (11, "b11"))
    # By position alone the reorg's b9 and b10 are skipped: they sit below ``from``.
    start, gap = b.resume(11, None)
    assert _replay(b, start) == [b"b11"] and gap is None
    start, gap = b.resume(11, None, _ident("a10"))
    assert _replay(b, start) == [b"b9", b"b10", b"b11"] and gap is None


def test_resume_after_a_depth_one_reorg_replays_the_replacing_frame() -> None:
    b = _backlog_of((10, "a10"), (10, "b10"))
    assert _replay(b, b.resume(11, None)[0]) == []
    assert _replay(b, b.resume(11, None, _ident("a10"))[0]) == [b"b10"]


def test_resume_after_a_frame_the_backlog_lacks_falls_back_to_from() -> None:
    b = _backlog_of((9, "a9"), (10, "a10"), (11, "a11"))
    assert _replay(b, b.resume(10, None, _ident("zz"))[0]) == [b"a10", b"a11"]
    # ``after`` never starts later than ``from`` would.
    assert _replay(b, b.resume(10, None, _ident("a11"))[0]) == [b"a10", b"a11"]


def test_after_travels_in_the_hello_and_goes_with_from_only() -> None:
    hello = parse_hello(encode_hello([Want("bsc/blocks", from_position=5, after=b"\x07" * 32)]))
    assert hello.wants == [Want("bsc/blocks", 5, None, b"\x07" * 32)]
    for bad in ('"0x12"', '"' + "0x" + "zz" * 32 + '"', "7"):
        with pytest.raises(ControlError):
            parse_hello(
                b'{"type":"hello","version":1,"streams":[{"stream":"s/b","from":1,"after":'
                + bad.encode()
                + b"}]}"
            )
    with pytest.raises(ControlError, match="after goes with from"):
        parse_hello(
            b'{"type":"hello","version":1,"streams":[{"stream":"s/b","after":"0x'
            + b"00" * 32
            + b'"}]}'
        )


def test_frames_larger_than_the_child_takes_are_passed_over() -> None:
    b = _backlog_of((1, "a"), (2, "big" + "x" * 100), (3, "c"))
    cursor = Cursor.at(b, 0, 1000, 10**9)
    cursor.max_frame = 10
    assert cursor.take(b, 10**9) == [b"a", b"c"]
    assert cursor.skipped == 1 and cursor.seq == b.next_seq


def test_max_frame_bytes_travels_in_the_hello() -> None:
    hello = parse_hello(encode_hello([Want("bsc/blocks")], max_frame_bytes=1 << 20))
    assert hello.max_frame_bytes == 1 << 20
    assert parse_hello(encode_hello([Want("bsc/blocks")])).max_frame_bytes is None
    with pytest.raises(ControlError):
        parse_hello(
            b'{"type":"hello","version":1,"max_frame_bytes":-1,"streams":[{"stream":"a/b"}]}'
        )


def test_a_hello_may_name_the_relay_node_and_a_bad_name_is_refused() -> None:
    hello = parse_hello(encode_hello([Want("arbitrum/batches")], node="chainrelay-0a1b2c3d"))
    assert hello.node == "chainrelay-0a1b2c3d"
    assert parse_hello(encode_hello([Want("arbitrum/batches")])).node is None
    for bad in ("", "x" * 65, "a b", 7):
        text = orjson.dumps(
            {"type": "hello", "version": 1, "streams": [{"stream": "a/b"}], "node": bad}
        )
        with pytest.raises(ControlError, match="node"):
            parse_hello(text)


# --- what a child says after the hello, and what a refusal's close frame carries -------------
@pytest.mark.parametrize(
    "msg",
    [
        {"type": "held", "stream": "a/b", "position": -1},
        {"type": "held", "stream": "a/b", "position": POSITION_END},
        {"type": "held", "stream": "a/b", "position": 2**64},
        {"type": "held", "stream": "a/b", "position": True},
        {"type": "held", "stream": "a/b", "position": 1.0},
        {"type": "held", "stream": "a/b", "position": "1"},
        {"type": "held", "stream": 7, "position": 1},
        {"type": "held", "position": 1},
        {"type": "welcome", "stream": "a/b", "position": 1},
    ],
)
def test_a_malformed_held_is_a_control_error(msg: dict[str, Any]) -> None:
    with pytest.raises(ControlError) as exc:
        parse_held(msg)
    assert exc.value.code == CLOSE_BAD_HELLO


def test_held_at_the_limits_is_read_as_sent() -> None:
    assert parse_held({"type": "held", "stream": "a/b", "position": 0}) == ("a/b", 0)
    top = POSITION_END - 1
    assert parse_held({"type": "held", "stream": "a/b", "position": top}) == ("a/b", top)


@given(st.text(max_size=300))
def test_a_close_reason_fits_a_control_frame_whatever_the_message(message: str) -> None:
    reason = close_reason(message)
    assert len(reason.encode()) <= 123
    # The message's start, cut between characters (a lone surrogate sent as "?").
    assert message.encode(errors="replace").decode().startswith(reason)
    # What websockets sends: a close frame of code and reason, never "control frame too long".
    proto = ServerProtocol()
    proto.state = State.OPEN
    proto.send_close(CLOSE_BAD_HELLO, reason)
    assert proto.data_to_send()
