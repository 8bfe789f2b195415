"""Batch streams through the relay tree's hub, a few nodes at a time: parents' ``FeedHub``s
serving children over in-memory links (``tests.pair.feedpair``), frames made as an ingress
makes them (``batchframe.encode_frame`` carrying the sequencer's ``sign_batch`` signature).

What a relay must do with a batch stream: pass each batch on once and strictly in seq
order whichever parent sent it first; wait ``order_wait`` for a batch no parent sent, then
fetch it (``fetch_range``) or, when nobody has it, pass over it and count that; never
forward a batch its stream's sequencers did not sign; answer ``range`` from its backlog;
take a sequencer's ``confirmed`` (trim, pass it down, tell new children) and refuse a
forged one; and count its children's ``held`` for acknowledgements that wait for relays.
``FeedLink`` (the child side) is dialled into a hub through ``MemoryDialer``: no socket.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from chainrelay.batches import frame as batchframe
from chainrelay.batches.order import BatchOrder
from chainrelay.metrics import Metrics
from chainrelay.tree import frame as feedframe
from chainrelay.tree.frame import HEADER, HEADER_LEN, Frame, Signer, keccak
from chainrelay.tree.hub import FeedChild, FeedHub
from chainrelay.tree.link import HELD_INTERVAL, FeedLink
from chainrelay.tree.session import CLOSE_BAD_HELLO, Want, encode_held
from chainrelay.tree.streams import BatchSpec, BatchStream
from chainrelay.wire.wsframes import binary_header
from tests.lab.procs import until
from tests.lab.timing import SECOND
from tests.pair.feedpair import MemoryDialer, Pair, connect

S = "arbitrum/batches"
OTHER = "arbitrum/batches-b"
CHAIN = 42161
SEQUENCER = Signer(keccak(b"chainrelay test sequencer"))
STRANGER = Signer(keccak(b"chainrelay test stranger"))
ORIGIN_US = 1_700_000_000_000_000  # fixed: the same seq always makes the same frame bytes
PAYLOAD_BYTES = 300
BIG = 1 << 30
WAIT = 5 * SECOND


def payload(seq: int) -> bytes:
    # Incompressible and of one size: frames are stored as they came, all the same length,
    # and a flipped byte is a flipped payload byte (not a broken lz4 block).
    return random.Random(seq).randbytes(PAYLOAD_BYTES)


def batch(
    seq: int,
    *,
    signer: Signer = SEQUENCER,
    chain_id: int = CHAIN,
    stream: str = S,
) -> bytes:
    body = payload(seq)
    return batchframe.encode_frame(
        chain_id=chain_id,
        stream=stream,
        seq=seq,
        payload=body,
        signature=batchframe.sign_batch(signer, chain_id, stream, seq, body),
        origin_us=ORIGIN_US,
    )


FRAMES = {n: batch(n) for n in range(40)}


def node(streams: tuple[str, ...] = (S,), **kw: Any) -> FeedHub:
    specs = [BatchSpec(name, CHAIN, frozenset({SEQUENCER.address}), **kw) for name in streams]
    return FeedHub([], Metrics(), batches=specs)


def relay_node(**kw: Any) -> FeedHub:
    """A relay that has nothing yet and starts at seq 0."""
    h = node(**kw)
    h.start_batches_at(S, 0)
    return h


def batch_stream(h: FeedHub) -> BatchStream:
    st = h.streams[S]
    assert isinstance(st, BatchStream)
    return st


def order_of(h: FeedHub) -> BatchOrder[Frame]:
    return batch_stream(h).order


def counted(h: FeedHub, outcome: str, stream: str = S) -> float:
    return float(h.metrics.feed_frames.labels(stream, outcome)._value.get())


def gaps(h: FeedHub, outcome: str) -> float:
    return float(h.metrics.batch_gaps.labels(S, outcome)._value.get())


def closes(h: FeedHub, reason: str) -> float:
    return float(h.metrics.feed_child_closes.labels(reason)._value.get())


async def welcomed(*pairs: Pair) -> None:
    await until(lambda: all(p.child.welcome for p in pairs), WAIT, "every child's welcome")


async def has(p: Pair, n: int) -> None:
    await until(lambda: len(p.child.frames) >= n, WAIT, f"{n} frames")


def seqs(raws: list[bytes]) -> list[int]:
    return [feedframe.decode(r, len(r)).position for r in raws]


def inject(p: Pair, raw: bytes) -> None:
    """Bytes a faulty parent puts on the wire as one binary message, past its hub."""
    p.to_child.writelines((binary_header(len(raw)), raw))


def texts(p: Pair, kind: str) -> list[dict[str, Any]]:
    return [t for t in p.child.texts if t.get("type") == kind]


Fetcher = Callable[[str, int, int], Awaitable[list[bytes]]]


def range_fetcher(source: FeedHub, calls: list[tuple[str, int, int, float]]) -> Fetcher:
    """What a node's parents' range endpoints would answer, read from ``source``'s backlog."""

    async def fetch(stream: str, start: int, end: int) -> list[bytes]:
        calls.append((stream, start, end, asyncio.get_running_loop().time()))
        return source.range(stream, start, end - start, BIG) or []

    return fetch


def ingress_with(n: int) -> FeedHub:
    h = node()
    for seq in range(n):
        h.publish(FRAMES[seq])
    return h


# --- order across two parents -----------------------------------------------------------
async def test_two_parents_missing_different_batches_reach_the_child_once_each_in_order() -> None:
    a, b = node(), node()
    relay = relay_node(order_wait=60 * SECOND)  # every missing batch comes from the other
    child = connect(relay, [Want(S, from_position=0)])
    pa = connect(a, [Want(S, from_position=0)], hub=relay)
    pb = connect(b, [Want(S, from_position=0)], hub=relay)
    await welcomed(child, pa, pb)
    for n in range(10):
        if n not in (3, 7):
            a.publish(FRAMES[n])
        if n != 5:
            b.publish(FRAMES[n])
    await has(child, 10)
    assert child.child.frames == [FRAMES[n] for n in range(10)]
    assert counted(relay, "accepted") == 10
    assert counted(relay, "duplicate") == 8 + 9 - 10
    assert gaps(relay, "skipped") == gaps(relay, "fetched") == 0

    # A reconnects from 0 and replays its whole backlog: nothing new reaches the child.
    pa.to_parent.close()
    await pa.child.lost.wait()
    again = connect(a, [Want(S, from_position=0)], hub=relay)
    await until(lambda: len(again.child.frames) == 8, WAIT, "a's replay")
    assert counted(relay, "duplicate") == 7 + 8
    a.publish(FRAMES[10])
    b.publish(FRAMES[10])
    await has(child, 11)
    assert child.child.frames == [FRAMES[n] for n in range(11)]
    assert seqs([e.raw for e in relay.streams[S].backlog.entries]) == list(range(11))


async def test_batches_from_one_parent_a_turn_apart_pass_as_the_other_fills_each_hole() -> None:
    a, b = node(), node()
    relay = relay_node(order_wait=60 * SECOND)
    child = connect(relay, [Want(S, from_position=0)])
    pa = connect(a, [Want(S, from_position=0)], hub=relay)
    pb = connect(b, [Want(S, from_position=0)], hub=relay)
    await welcomed(child, pa, pb)

    def relay_has_from_a(n: int) -> bool:
        return len(pa.child.frames) == n - n // 3

    def child_has_up_to(n: int) -> bool:
        return len(child.child.frames) >= min(n + 3, 20)

    for n in range(20):
        if n % 3:
            a.publish(FRAMES[n])
            await until(functools.partial(relay_has_from_a, n), WAIT, f"a's {n}")
    assert child.child.frames == [] and order_of(relay).next == 0  # 0 was never sent
    for n in range(0, 20, 3):
        b.publish(FRAMES[n])
        await until(functools.partial(child_has_up_to, n), WAIT, f"up to {n}")
    assert child.child.frames == [FRAMES[n] for n in range(20)]


# --- a batch no parent sends --------------------------------------------------------------
async def test_a_batch_no_parent_sends_is_fetched_after_order_wait_then_the_rest_follow() -> None:
    ingress = ingress_with(8)
    a, b = node(), node()
    wait = 0.2 * SECOND
    relay = relay_node(order_wait=wait)
    calls: list[tuple[str, int, int, float]] = []
    relay.fetch_range = range_fetcher(ingress, calls)
    child = connect(relay, [Want(S, from_position=0)])
    pa = connect(a, [Want(S, from_position=0)], hub=relay)
    pb = connect(b, [Want(S, from_position=0)], hub=relay)
    await welcomed(child, pa, pb)
    t0 = asyncio.get_running_loop().time()
    for n in range(8):
        if n != 3:
            a.publish(FRAMES[n])
            b.publish(FRAMES[n])
    await has(child, 8)
    assert child.child.frames == [FRAMES[n] for n in range(8)]
    assert [c[:3] for c in calls] == [(S, 3, 4)]
    assert calls[0][3] - t0 >= wait * 0.95  # not before the other parent had its chance
    assert gaps(relay, "fetched") == 1 and gaps(relay, "skipped") == 0
    assert counted(relay, "accepted") == 8


async def _nothing(_stream: str, _start: int, _end: int) -> list[bytes]:
    return []


async def _broken(_stream: str, _start: int, _end: int) -> list[bytes]:
    raise ConnectionRefusedError("no parent answers")


@pytest.mark.parametrize("fetch", [_nothing, _broken], ids=["empty", "failing"])
async def test_a_batch_nobody_has_is_passed_over_and_counted_skipped(fetch: Fetcher) -> None:
    a = node()
    relay = relay_node(order_wait=0.05 * SECOND)
    relay.fetch_range = fetch
    child = connect(relay, [Want(S, from_position=0)])
    pa = connect(a, [Want(S, from_position=0)], hub=relay)
    await welcomed(child, pa)
    for n in (0, 1, 2, 4, 5, 6):
        a.publish(FRAMES[n])
    await has(child, 6)
    assert seqs(child.child.frames) == [0, 1, 2, 4, 5, 6]
    assert gaps(relay, "skipped") == 1 and gaps(relay, "fetched") == 0
    # Its range endpoint says it lacks 3 (a client climbs further), serves on from 4.
    assert relay.range(S, 3, 10, BIG) is None
    assert relay.range(S, 4, 10, BIG) == [FRAMES[n] for n in (4, 5, 6)]
    # A late copy of 3 is behind the stream now: dropped, never sent out of order.
    a.publish(FRAMES[3])
    a.publish(FRAMES[7])
    await has(child, 7)
    assert seqs(child.child.frames) == [0, 1, 2, 4, 5, 6, 7]
    assert counted(relay, "duplicate") == 1


async def test_a_child_relay_fetches_what_its_parent_passed_over_from_further_up() -> None:
    ingress = ingress_with(8)
    a = node()
    relay = relay_node(order_wait=0.05 * SECOND)
    relay.fetch_range = _nothing  # its parents lack 3 too
    lower = relay_node(order_wait=0.05 * SECOND)
    calls: list[tuple[str, int, int, float]] = []
    lower.fetch_range = range_fetcher(ingress, calls)  # a range request that climbed
    leaf = connect(lower, [Want(S, from_position=0)])
    down = connect(relay, [Want(S, from_position=0)], hub=lower)
    up = connect(a, [Want(S, from_position=0)], hub=relay)
    await welcomed(leaf, down, up)
    for n in range(8):
        if n != 3:
            a.publish(FRAMES[n])
    await has(leaf, 8)
    assert seqs(down.child.frames) == [0, 1, 2, 4, 5, 6, 7]
    assert leaf.child.frames == [FRAMES[n] for n in range(8)]
    assert gaps(relay, "skipped") == 1 and gaps(lower, "fetched") == 1
    assert [c[:3] for c in calls] == [(S, 3, 4)]


# --- bounds ---------------------------------------------------------------------------
async def _held_full_relay() -> tuple[FeedHub, Pair, list[tuple[str, int, int, float]]]:
    """A relay that can hold 3 batches, fed 0-9 without 3 by one parent; order_wait is
    far off, so only a full gate can have started the fetch."""
    ingress = ingress_with(10)
    a = node()
    relay = relay_node(order_max_held=3, order_wait=60 * SECOND)
    calls: list[tuple[str, int, int, float]] = []
    relay.fetch_range = range_fetcher(ingress, calls)
    child = connect(relay, [Want(S, from_position=0)])
    pa = connect(a, [Want(S, from_position=0)], hub=relay)
    await welcomed(child, pa)
    for n in range(10):
        if n != 3:
            a.publish(FRAMES[n])
    await has(child, 7)
    return relay, child, calls


async def test_more_held_than_order_max_held_is_counted_and_fetches_at_once() -> None:
    relay, child, calls = await _held_full_relay()
    assert child.child.frames[:7] == [FRAMES[n] for n in range(7)]
    assert counted(relay, "held_full") == 3  # 7, 8 and 9 came while 4-6 were held
    # At the first refusal: the hole and what was refused; then what was refused since.
    assert [c[:3] for c in calls] == [(S, 3, 8), (S, 8, 10)]
    assert gaps(relay, "fetched") == 2
    assert order_of(relay).held == {} and order_of(relay).held_bytes == 0


async def test_batches_refused_while_the_gate_was_full_follow_once_the_hole_is_filled() -> None:
    _relay, child, _calls = await _held_full_relay()
    await has(child, 10)
    assert child.child.frames == [FRAMES[n] for n in range(10)]


# --- frames that are not the sequencer's batch -------------------------------------------
def seq_moved(seq: int, to: int) -> bytes:
    """Batch ``seq``'s frame, correctly signed, with the header's position set to ``to``."""
    raw = FRAMES[seq]
    fields = list(HEADER.unpack_from(raw))
    fields[4] = to  # version, kind, flags, stream, position, identity, origin_us, length
    return HEADER.pack(*fields) + raw[HEADER_LEN:]


def flipped(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 0x01
    return bytes(b)


BAD = {
    "untrusted": [batch(4, signer=STRANGER), flipped(FRAMES[4], HEADER_LEN + 7)],
    "chain": [batch(4, chain_id=1)],
    "signature": [FRAMES[4][:-1] + b"\x09"],  # recovery id 9: no key made it
    "identity": [seq_moved(5, 4)],
}


async def test_batches_the_sequencer_did_not_sign_are_dropped_by_reason_never_forwarded() -> None:
    a = node()
    relay = relay_node(order_wait=60 * SECOND)
    child = connect(relay, [Want(S, from_position=0)])
    pa = connect(a, [Want(S, from_position=0)], hub=relay)
    await welcomed(child, pa)
    for n in range(4):
        a.publish(FRAMES[n])
    await has(child, 4)
    for raws in BAD.values():
        for raw in raws:
            inject(pa, raw)
    await until(
        lambda: all(counted(relay, why) == len(raws) for why, raws in BAD.items()),
        WAIT,
        "every bad frame counted",
    )
    # None of them took seq 4: the sequencer's own copy still goes on, on the same link.
    a.publish(FRAMES[4])
    a.publish(FRAMES[5])
    await has(child, 6)
    assert child.child.frames == [FRAMES[n] for n in range(6)]
    assert counted(relay, "accepted") == 6
    assert seqs([e.raw for e in relay.streams[S].backlog.entries]) == list(range(6))
    assert pa.child.close_code is None and not pa.child.lost.is_set()


# --- range ----------------------------------------------------------------------------
def test_range_answers_from_the_backlog_within_its_bounds() -> None:
    h = node(backlog_frames=20)
    for n in range(30):
        h.publish(FRAMES[n])
    size = len(FRAMES[0])
    assert h.streams[S].backlog.oldest_position == 10
    assert h.range(S, 10, 5, BIG) == [FRAMES[n] for n in range(10, 15)]  # from the start
    assert h.range(S, 17, 100, BIG) == [FRAMES[n] for n in range(17, 30)]  # middle to end
    assert h.range(S, 29, 100, BIG) == [FRAMES[29]]
    assert h.range(S, 30, 100, BIG) == []  # not reached yet
    assert h.range(S, 1000, 100, BIG) == []
    assert h.range(S, 9, 100, BIG) is None  # below the backlog
    assert h.range(S, 0, 100, BIG) is None
    assert h.range(S, 12, 100, 3 * size) == [FRAMES[n] for n in (12, 13, 14)]
    assert h.range(S, 12, 100, 3 * size - 1) == [FRAMES[12], FRAMES[13]]
    assert h.range(S, 12, 100, 1) == [FRAMES[12]]  # at least one, whatever max_bytes
    assert h.range(S, 12, 1, BIG) == [FRAMES[12]]


def test_range_of_a_stream_with_nothing_taken_in_yet_is_asked_further_up() -> None:
    assert node().range(S, 0, 10, BIG) is None
    assert relay_node().range(S, 0, 10, BIG) is None


# --- confirmed ------------------------------------------------------------------------
def confirmed_text(seq: int, signature: bytes) -> dict[str, Any]:
    return {"type": "confirmed", "stream": S, "seq": seq, "signature": "0x" + signature.hex()}


async def test_a_sequencers_confirmation_trims_reaches_children_and_new_children() -> None:
    relay = ingress_with(10)
    c1 = connect(relay, [Want(S, from_position=0)])
    c2 = connect(relay, [Want(S, from_position=8)])
    await has(c1, 10)
    await has(c2, 2)
    sig = batchframe.sign_confirmed(SEQUENCER, CHAIN, S, 6)
    assert relay.confirm(S, 6, sig) is True
    assert relay.streams[S].backlog.oldest_position == 6
    assert relay.range(S, 5, 10, BIG) is None
    assert relay.range(S, 6, 10, BIG) == [FRAMES[n] for n in range(6, 10)]
    await until(lambda: bool(texts(c1, "confirmed") and texts(c2, "confirmed")), WAIT, "both")
    assert texts(c1, "confirmed") == texts(c2, "confirmed") == [confirmed_text(6, sig)]
    # A child that comes later hears it right after its welcome, before any frame.
    c3 = connect(relay, [Want(S, from_position=9)])
    await has(c3, 1)
    assert [t["type"] for t in c3.child.texts] == ["welcome", "confirmed"]
    assert texts(c3, "confirmed") == [confirmed_text(6, sig)]


def forgeries(seq: int) -> dict[str, tuple[str, int, bytes]]:
    return {
        "stranger": (S, seq, batchframe.sign_confirmed(STRANGER, CHAIN, S, seq)),
        "other chain": (S, seq, batchframe.sign_confirmed(SEQUENCER, 1, S, seq)),
        "other seq": (S, seq, batchframe.sign_confirmed(SEQUENCER, CHAIN, S, seq + 1)),
        "garbage": (S, seq, b"\x00" * 65),
        "recovery id": (S, seq, b"\x01" * 64 + b"\x07"),
        "unknown stream": (
            "nowhere/batches",
            seq,
            batchframe.sign_confirmed(SEQUENCER, CHAIN, S, seq),
        ),
    }


@pytest.mark.parametrize("how", list(forgeries(0)))
async def test_a_forged_confirmation_is_refused_and_changes_nothing(how: str) -> None:
    relay = ingress_with(10)
    child = connect(relay, [Want(S, from_position=0)])
    await has(child, 10)
    sig = batchframe.sign_confirmed(SEQUENCER, CHAIN, S, 3)
    assert relay.confirm(S, 3, sig) is True
    stream, seq, forged = forgeries(8)[how]
    assert relay.confirm(stream, seq, forged) is False
    assert batch_stream(relay).confirmed == (3, sig)
    assert relay.streams[S].backlog.oldest_position == 3
    relay.publish(FRAMES[10])  # anything the forgery sent would be on the wire before it
    await has(child, 11)
    assert texts(child, "confirmed") == [confirmed_text(3, sig)]


async def test_a_forged_confirmation_below_the_confirmed_seq_is_refused() -> None:
    relay = ingress_with(10)
    assert relay.confirm(S, 6, batchframe.sign_confirmed(SEQUENCER, CHAIN, S, 6)) is True
    assert relay.confirm(S, 4, batchframe.sign_confirmed(STRANGER, CHAIN, S, 4)) is False


# --- held -----------------------------------------------------------------------------
def held_by(h: FeedHub, p: Pair) -> int | None:
    return batch_stream(h).held.get(p.session)


async def tell_held(h: FeedHub, p: Pair, position: int) -> None:
    p.child.send_text(encode_held(S, position))
    await until(lambda: (held_by(h, p) or -1) >= position, WAIT, f"held {position} noted")


async def test_wait_held_resolves_once_k_children_hold_the_seq() -> None:
    relay = ingress_with(10)
    c1, c2, c3 = (connect(relay, [Want(S, from_position=0)], node=f"relay{i}") for i in range(3))
    await welcomed(c1, c2, c3)
    fut = relay.wait_held(S, 5, 2)
    await tell_held(relay, c1, 5)
    await tell_held(relay, c2, 4)
    assert not fut.done()
    c1.child.send_text(encode_held(S, 3))  # behind what it said: ignored
    await tell_held(relay, c2, 6)
    assert await asyncio.wait_for(fut, WAIT) == 2
    assert held_by(relay, c1) == 5
    assert relay.wait_held(S, 5, 2).result() == 2  # already true: resolved at once

    # A child that leaves no longer counts.
    later = relay.wait_held(S, 7, 2)
    await tell_held(relay, c1, 7)
    gone = c1.session
    c1.to_parent.close()
    await until(lambda: gone not in relay.streams[S].children, WAIT, "c1 gone")
    assert gone not in batch_stream(relay).held
    await tell_held(relay, c2, 7)
    assert not later.done()
    await tell_held(relay, c3, 9)
    assert await asyncio.wait_for(later, WAIT) == 2

    # A subscriber (no node in its hello) never counts; two sessions of one relay count once.
    sub = connect(relay, [Want(S, from_position=0)])
    twin = connect(relay, [Want(S, from_position=0)], node="relay2")  # c3's name
    await welcomed(sub, twin)
    alone = relay.wait_held(S, 9, 2)
    sub.child.send_text(encode_held(S, 9))
    await tell_held(relay, twin, 9)
    assert held_by(relay, sub) is None
    assert not alone.done()  # relay2 holds 9 (twice); relay1 only 7
    alone.cancel()


MALFORMED = {
    "not json": b"{held",
    "no type": b'{"stream": "arbitrum/batches", "position": 5}',
    "position a string": b'{"type": "held", "stream": "arbitrum/batches", "position": "5"}',
    "position a bool": b'{"type": "held", "stream": "arbitrum/batches", "position": true}',
    "stream not asked for": b'{"type": "held", "stream": "arbitrum/batches-b", "position": 5}',
    "another kind": b'{"type": "confirmed", "stream": "arbitrum/batches", "seq": 5}',
}


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_a_malformed_control_message_closes_that_child_only(body: bytes) -> None:
    relay = node((S, OTHER))
    for n in range(3):
        relay.publish(FRAMES[n])
    bad, good = (connect(relay, [Want(S, from_position=0)], node=f"r{i}") for i in range(2))
    await has(bad, 3)
    await has(good, 3)
    fut = relay.wait_held(S, 2, 1)
    bad.child.send_text(body)
    await bad.child.lost.wait()
    assert bad.child.close_code == CLOSE_BAD_HELLO
    assert closes(relay, "bad_control") == 1
    assert not fut.done() and batch_stream(relay).held == {}
    relay.publish(FRAMES[3])
    await has(good, 4)
    assert good.child.frames == [FRAMES[n] for n in range(4)]
    await tell_held(relay, good, 3)
    assert await asyncio.wait_for(fut, WAIT) == 1


# --- FeedLink, dialled into a hub in memory ---------------------------------------------
class LinkRecorder:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.confirmed: list[tuple[str, int, bytes]] = []

    def on_frame(self, _link: FeedLink, raw: bytes) -> None:
        self.frames.append(raw)

    def on_confirmed(self, _link: FeedLink, stream: str, seq: int, sig: bytes) -> None:
        self.confirmed.append((stream, seq, sig))


def memory_link(
    monkeypatch: pytest.MonkeyPatch,
    parent: FeedHub,
    rec: LinkRecorder,
    streams: tuple[str, ...],
    dialer: MemoryDialer | None = None,
) -> FeedLink:
    dialer = dialer or MemoryDialer()
    url = dialer.add("parent.test", 80, parent)
    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", dialer.create_connection)
    return FeedLink(
        url,
        name="parent",
        wants=lambda: [Want(s, from_position=0) for s in streams],
        on_frame=rec.on_frame,
        on_confirmed=rec.on_confirmed,
        max_frame_bytes=1 << 20,
        connect_timeout=2 * SECOND,
        retry_delay=0.01,
        retry_max=0.05,
        ping_interval=1 * SECOND,
        node="relay-under-test",
    )


def record_held(monkeypatch: pytest.MonkeyPatch, h: FeedHub) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    note = h.note_held

    def recording(child: FeedChild, stream: str, position: int) -> None:
        seen.append((stream, position))
        note(child, stream, position)

    monkeypatch.setattr(h, "note_held", recording)
    return seen


async def test_feedlink_held_calls_within_the_interval_go_as_one_message_a_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parent = node((S, OTHER))
    for n in range(10):  # a child is never counted holding more than its parent sent
        parent.publish(FRAMES[n])
    seen = record_held(monkeypatch, parent)
    rec = LinkRecorder()
    link = memory_link(monkeypatch, parent, rec, (S, OTHER))
    await link.start()
    try:
        assert await link.wait_connected(WAIT)
        await until(lambda: rec.frames == [FRAMES[n] for n in range(10)], WAIT, "the replay")
        fut = parent.wait_held(S, 5, 1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for stream, position in ((S, 3), (OTHER, 1), (S, 4), (OTHER, 2), (S, 5)):
            link.held(stream, position)
        assert await asyncio.wait_for(fut, WAIT) == 1
        assert loop.time() - t0 >= HELD_INTERVAL * 0.9
        # One more, an interval later, on the same ordered connection: once it is noted,
        # everything sent before it has been too.
        await until(lambda: len(seen) >= 2, WAIT, "both streams' held")
        link.held(S, 9)
        await until(lambda: (S, 9) in seen, WAIT, "the next held")
        assert sorted(seen[:2]) == [(S, 5), (OTHER, 2)]
        assert seen[2:] == [(S, 9)]
    finally:
        await link.stop()


async def test_feedlink_hands_a_parents_confirmation_to_on_confirmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parent = ingress_with(5)
    sig = batchframe.sign_confirmed(SEQUENCER, CHAIN, S, 2)
    assert parent.confirm(S, 2, sig)  # before the link: it comes after the welcome
    rec = LinkRecorder()
    link = memory_link(monkeypatch, parent, rec, (S,))
    await link.start()
    try:
        await until(lambda: rec.confirmed == [(S, 2, sig)], WAIT, "the known confirmation")
        await until(lambda: len(rec.frames) == 3, WAIT, "frames 2-4")
        later = batchframe.sign_confirmed(SEQUENCER, CHAIN, S, 4)
        assert parent.confirm(S, 4, later)
        await until(lambda: len(rec.confirmed) == 2, WAIT, "the live confirmation")
        assert rec.confirmed == [(S, 2, sig), (S, 4, later)]
        assert rec.frames == [FRAMES[n] for n in range(2, 5)]
        assert link.sessions == 1 and link.connected
    finally:
        await link.stop()


async def test_a_relay_wired_as_a_node_tells_its_parent_what_it_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As app.py wires a relay: frames from the link go to its hub, the hub's ``on_held``
    goes to the link; its parent's acknowledgement waits resolve as batches pass."""
    parent = node()
    relay = relay_node()
    link = memory_link(monkeypatch, parent, LinkRecorder(), (S,))
    link.on_frame = lambda lk, raw: relay.accept(raw, lk.name)
    relay.on_held = link.held
    await link.start()
    try:
        assert await link.wait_connected(WAIT)
        first, last = parent.wait_held(S, 0, 1), parent.wait_held(S, 29, 1)
        beyond = parent.wait_held(S, 30, 1)
        for n in range(30):
            parent.publish(FRAMES[n])
        assert await asyncio.wait_for(first, WAIT) == 1
        assert await asyncio.wait_for(last, WAIT) == 1
        assert not beyond.done()
        assert seqs([e.raw for e in relay.streams[S].backlog.entries]) == list(range(30))
        assert list(batch_stream(parent).held.values()) == [29]
    finally:
        await link.stop()
        await parent.stop()
    assert beyond.cancelled()


async def test_a_relay_link_tells_a_reconnected_parent_what_it_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parent = node()
    relay = relay_node()
    dialer = MemoryDialer()
    link = memory_link(monkeypatch, parent, LinkRecorder(), (S,), dialer)
    link.on_frame = lambda lk, raw: relay.accept(raw, lk.name)
    relay.on_held = link.held
    await link.start()
    try:
        assert await link.wait_connected(WAIT)
        for n in range(5):
            parent.publish(FRAMES[n])
        assert await asyncio.wait_for(parent.wait_held(S, 4, 1), WAIT) == 1
        first = dialer.parents[0].transport
        assert first is not None
        first.close()  # the parent drops the session; the link dials again
        await until(lambda: link.sessions == 2 and link.connected, WAIT, "the second session")
        # The old session's word went with it; the link says it again on the new one.
        assert await asyncio.wait_for(parent.wait_held(S, 4, 1), WAIT) == 1
    finally:
        await link.stop()
        await parent.stop()
