"""The relay tree's hub, two nodes at a time: parents' ``FeedHub``s serving children over
in-memory links (``tests.pair.feedpair``), each child a websockets client that does the
upgrade and hello and hands every binary message to its own node's ``FeedHub.accept``.

What a child must see: the parent's frames from its resume point, replay then live, with
no gap or duplicate between them; an explicit ``gap`` when it asks for more than the
backlog holds; one copy of each identity across two parents; bad frames dropped without
losing the link; ``bye`` and 4408 when it reads too slowly, and the rest when it resumes.
"""

from __future__ import annotations

import asyncio
import functools
import random
import tracemalloc
from collections.abc import Callable
from typing import Any

import lz4.block
import orjson
import pytest
from websockets.protocol import State

from chainrelay import defaults
from chainrelay.chain.follower import BlockFollower
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import HeadConfig, PoolConfig, SubscriptionsConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc.cache import MemoryCache
from chainrelay.tree import frame as feedframe
from chainrelay.tree.frame import KIND_BLOCK, Signer, block_payload, keccak
from chainrelay.tree.hub import FeedHub, HubLimits
from chainrelay.tree.intake import FeedSource
from chainrelay.tree.session import (
    CLOSE_BAD_HELLO,
    CLOSE_LAGGING,
    CLOSE_UNKNOWN_STREAM,
    PROTOCOL_VERSION,
    Want,
    encode_hello,
)
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import Upstream
from chainrelay.wire.wsframes import binary_header
from tests.lab.procs import until
from tests.lab.timing import SECOND
from tests.pair.feedpair import Pair, connect

STREAM = "devnet/blocks"
ORIGIN = Signer(keccak(b"chainrelay test origin"))
STRANGER = Signer(keccak(b"chainrelay test stranger"))
WAIT = 5 * SECOND


def block_hash(n: int, fork: int = 0) -> bytes:
    return keccak(f"block {n} fork {fork}".encode())


def block_json(n: int, fork: int = 0) -> bytes:
    tx = {
        "hash": "0x" + keccak(f"tx {n} {fork}".encode()).hex(),
        "from": "0x" + "11" * 20,
        "to": "0x" + "22" * 20,
        "value": hex(n * 1000),
        "input": "0x",
    }
    return orjson.dumps(
        {
            "number": hex(n),
            "hash": "0x" + block_hash(n, fork).hex(),
            "parentHash": "0x" + block_hash(n - 1).hex() if n else "0x" + "00" * 32,
            "timestamp": hex(1_700_000_000 + n),
            "transactions": [tx],
        }
    )


def frame(n: int, *, fork: int = 0, signer: Signer = ORIGIN, plain: bytes | None = None) -> bytes:
    """The block frame an origin publishes for block ``n`` (of fork ``fork``)."""
    if plain is None:
        plain = block_payload(block_json(n, fork), b"[]")
    return feedframe.encode(
        signer,
        kind=KIND_BLOCK,
        stream=STREAM,
        position=n,
        identity=block_hash(n, fork),
        plain=plain,
    )


def hub(trust: bool = True, **limits: int) -> FeedHub:
    return FeedHub(
        [STREAM], Metrics(), trust=[ORIGIN.address] if trust else [], limits=HubLimits(**limits)
    )


def counted(h: FeedHub, outcome: str, stream: str = STREAM) -> float:
    return float(h.metrics.feed_frames.labels(stream, outcome)._value.get())


def closes(h: FeedHub, reason: str) -> float:
    return float(h.metrics.feed_child_closes.labels(reason)._value.get())


async def welcomed(*pairs: Pair) -> None:
    await until(lambda: all(p.child.welcome for p in pairs), WAIT, "every child's welcome")


async def has(p: Pair, n: int, what: str = "frames") -> None:
    await until(lambda: len(p.child.frames) >= n, WAIT, f"{n} {what}")


def welcome_streams(p: Pair) -> list[dict[str, Any]]:
    welcome = p.child.welcome
    assert welcome is not None, "no welcome"
    return list(welcome["streams"])


def positions(raws: list[bytes]) -> list[int]:
    return [feedframe.decode(r, len(r)).position for r in raws]


# --- replay and live --------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
async def test_children_joining_while_the_parent_publishes_get_every_frame_from_their_start(
    seed: int,
) -> None:
    rnd = random.Random(seed)
    total, backlog = 120, 24
    size = len(frame(0))
    # A buffer of two frames: replay runs over many turns (resume_writing), live frames
    # arrive meanwhile; the queue bound is out of reach (no child may be dropped here).
    parent = hub(backlog_frames=backlog, child_buffer_bytes=2 * size, child_queue_frames=10_000)
    published: list[bytes] = []
    joins: list[tuple[Pair, int]] = []
    joined = asyncio.Event()

    async def children() -> None:
        for _ in range(10):
            for _ in range(rnd.randint(1, 25)):
                await asyncio.sleep(0)
            start = rnd.randint(0, len(published))  # at most one past the newest
            rate = rnd.choice([None, 3 * size, 8 * size])
            joins.append((connect(parent, [Want(STREAM, from_position=start)], rate=rate), start))
        joined.set()

    async def origin() -> None:
        # Past the last join by some frames: every child's hello meets a live stream.
        after = 0
        while len(published) < total or after < 20:
            after += joined.is_set()
            published.append(raw := frame(len(published)))
            parent.publish(raw)
            for _ in range(rnd.randint(1, 3)):
                await asyncio.sleep(0)

    await asyncio.gather(children(), origin())

    def caught_up_or_closed(p: Pair) -> bool:
        return p.child.frames[-1:] == published[-1:] or p.child.close_code is not None

    for p, _ in joins:
        await until(
            functools.partial(caught_up_or_closed, p),
            WAIT,
            "the last frame at every child",
        )
    for p, start in joins:
        assert p.child.close_code is None, f"child from {start} was closed"
        (entry,) = welcome_streams(p)
        got = p.child.frames
        first = positions(got[:1])[0]
        oldest = entry["oldest"]
        if oldest is not None and start < oldest:
            # Asked for more than the backlog held: told so, then sent the backlog on.
            assert entry["gap"] == [start, oldest]
            assert first == oldest
        else:
            assert "gap" not in entry
            assert first == start
        assert got == published[first:], f"child from {start}: a gap or duplicate"


async def test_a_replay_bigger_than_the_child_buffer_finishes_with_no_new_frame() -> None:
    size = len(frame(0))
    parent = hub(child_buffer_bytes=2 * size)
    published = [frame(n) for n in range(20)]
    for raw in published:
        parent.publish(raw)
    # The child reads a frame's worth a turn: the buffer fills and drains many times over,
    # and only the transport's resume_writing can keep the replay going.
    p = connect(parent, [Want(STREAM, from_position=0)], rate=size)
    await has(p, len(published))
    assert p.child.frames == published


async def test_last_k_replays_the_newest_k_then_goes_live() -> None:
    parent = hub()
    published = [frame(n) for n in range(10)]
    for raw in published:
        parent.publish(raw)
    p = connect(parent, [Want(STREAM, last=3)])
    await has(p, 3)
    assert p.child.welcome == {
        "type": "welcome",
        "streams": [{"stream": STREAM, "oldest": 0, "newest": 9}],
    }
    live = frame(10)
    parent.publish(live)
    await has(p, 4)
    assert p.child.frames == [*published[7:], live]


async def test_from_older_than_the_backlog_gets_a_gap_then_the_whole_backlog() -> None:
    parent = hub(backlog_frames=5)
    published = [frame(n) for n in range(10)]
    for raw in published:
        parent.publish(raw)
    p = connect(parent, [Want(STREAM, from_position=2)])
    await has(p, 5)
    assert p.child.welcome == {
        "type": "welcome",
        "streams": [{"stream": STREAM, "oldest": 5, "newest": 9, "gap": [2, 5]}],
    }
    parent.publish(live := frame(10))
    await has(p, 6)
    assert p.child.frames == [*published[5:], live]


async def test_from_newer_than_everything_is_live_only() -> None:
    parent = hub()
    for n in range(10):
        parent.publish(frame(n))
    p = connect(parent, [Want(STREAM, from_position=50)])
    await welcomed(p)
    assert welcome_streams(p) == [{"stream": STREAM, "oldest": 0, "newest": 9}]
    # Nothing was replayed: the first frame to arrive is the next one published.
    parent.publish(live := frame(10))
    await has(p, 1)
    assert p.child.frames == [live]


async def test_from_on_an_empty_backlog_is_live_only() -> None:
    parent = hub()
    p = connect(parent, [Want(STREAM, from_position=7)])
    await welcomed(p)
    assert welcome_streams(p) == [{"stream": STREAM, "oldest": None, "newest": None}]
    parent.publish(live := frame(7))
    await has(p, 1)
    assert p.child.frames == [live]


# --- two parents ------------------------------------------------------------------------
async def test_a_node_with_two_parents_keeps_and_forwards_the_first_copy_of_each_frame() -> None:
    a, b, node = hub(), hub(), hub()
    via_a = connect(a, [Want(STREAM)], hub=node)
    via_b = connect(b, [Want(STREAM)], hub=node)
    below = connect(node, [Want(STREAM)])
    await welcomed(via_a, via_b, below)
    n_frames = 12
    for n in range(n_frames):
        raw = frame(n)
        # Each parent gets every frame; which one is nearer changes block by block.
        first, second = (a, b) if n % 2 == 0 else (b, a)
        first.publish(raw)
        await asyncio.sleep(0)
        second.publish(raw)
    await has(via_a, n_frames)
    await has(via_b, n_frames)
    await has(below, n_frames)
    kept = [e.raw for e in node.streams[STREAM].backlog.entries]
    assert positions(kept) == list(range(n_frames))
    for n, raw in enumerate(kept):
        winner = via_a if n % 2 == 0 else via_b
        assert raw is winner.child.frames[n], f"frame {n}: not the first copy"
    assert below.child.frames == kept  # once each, in order
    assert counted(node, "accepted") == n_frames
    assert counted(node, "duplicate") == n_frames


async def test_a_reorg_reaches_children_and_frames_past_the_stale_window_do_not() -> None:
    parent, node = hub(), hub(stale_positions=3)
    p = connect(parent, [Want(STREAM)], hub=node)
    below = connect(node, [Want(STREAM)])
    await welcomed(p, below)
    # Blocks 0-9, then a fork replacing 8 and 9: new identities at positions already sent.
    sent = [frame(n) for n in range(10)] + [frame(8, fork=1), frame(9, fork=1)]
    # Then a copy of block 5 from another fork, more than 3 positions behind the newest.
    old = frame(5, fork=2)
    for raw in [*sent, old]:
        parent.publish(raw)
    await has(p, len(sent) + 1)
    await has(below, len(sent))
    assert below.child.frames == sent
    assert positions(below.child.frames)[-3:] == [9, 8, 9]
    assert counted(node, "stale") == 1
    parent.publish(last := frame(10, fork=1))
    await has(below, len(sent) + 1)
    assert below.child.frames[-1] == last


BATCHES = "devnet/batches"


def batch_frame(seq: int) -> bytes:
    return feedframe.encode(
        ORIGIN,
        kind=feedframe.KIND_BATCH,
        stream=BATCHES,
        position=seq,
        identity=feedframe.position_identity(seq),
        plain=orjson.dumps({"sequence": seq}),
    )


async def test_each_child_gets_the_streams_it_asked_for_from_its_own_point() -> None:
    parent = FeedHub([STREAM, BATCHES], Metrics())
    for n in range(4):
        parent.publish(frame(n))
        parent.publish(batch_frame(n))
    both = connect(parent, [Want(STREAM, from_position=2), Want(BATCHES, last=1)])
    blocks = connect(parent, [Want(STREAM)])
    await welcomed(both, blocks)
    assert welcome_streams(both) == [
        {"stream": STREAM, "oldest": 0, "newest": 3},
        {"stream": BATCHES, "oldest": 0, "newest": 3},
    ]
    parent.publish(frame(4))
    parent.publish(batch_frame(4))
    await has(both, 5)
    await has(blocks, 1)
    streams = [feedframe.decode(r, len(r)).stream for r in both.child.frames]
    assert [r for r, s in zip(both.child.frames, streams, strict=True) if s == STREAM] == [
        frame_at(parent, STREAM, n) for n in (2, 3, 4)
    ]
    assert [r for r, s in zip(both.child.frames, streams, strict=True) if s == BATCHES] == [
        frame_at(parent, BATCHES, n) for n in (3, 4)
    ]
    assert blocks.child.frames == [frame_at(parent, STREAM, 4)]


def frame_at(h: FeedHub, stream: str, position: int) -> bytes:
    (raw,) = [e.raw for e in h.streams[stream].backlog.entries if e.position == position]
    return raw


async def test_a_child_pinging_its_parent_gets_pongs_between_frames() -> None:
    parent = hub()
    p = connect(parent, [Want(STREAM)])
    await welcomed(p)
    for n in range(3):
        parent.publish(frame(n))
        p.child.ping(b"rtt %d" % n)
    await until(lambda: len(p.child.pongs) == 3, WAIT, "three pongs")
    assert p.child.pongs == [b"rtt 0", b"rtt 1", b"rtt 2"]
    await has(p, 3)


# --- bad frames -------------------------------------------------------------------------
def flip(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 0x01
    return bytes(b)


def inject(p: Pair, raw: bytes) -> None:
    """Bytes a faulty parent puts on the wire as one binary message, past its hub."""
    p.to_child.writelines((binary_header(len(raw)), raw))


async def test_a_child_drops_bad_frames_keeps_the_link_and_takes_good_copies_after_them() -> None:
    parent, node = hub(), hub()
    p = connect(parent, [Want(STREAM)], hub=node)
    await welcomed(p)
    good = frame(1)
    sig_at = len(good) - feedframe.SIGNATURE_LEN
    zero_r = good[:sig_at] + bytes(32) + good[sig_at + 32 :]
    bad_recovery = good[:-1] + b"\x07"
    version_2 = b"\x02" + good[1:]
    cases: list[tuple[str, bytes, Callable[[], float]]] = [
        ("untrusted", frame(1, signer=STRANGER), lambda: counted(node, "untrusted")),
        ("signature", zero_r, lambda: counted(node, "signature")),
        ("signature", bad_recovery, lambda: counted(node, "signature")),
        ("truncated", good[:-7], lambda: counted(node, "truncated", "other")),
        ("version", version_2, lambda: counted(node, "version", "other")),
        # A flipped bit in the payload or in s recovers some other key: not one trusted.
        (
            "payload bit",
            flip(good, feedframe.HEADER_LEN + 10),
            lambda: counted(node, "untrusted") + counted(node, "signature"),
        ),
        (
            "signature bit",
            flip(good, sig_at + 40),
            lambda: counted(node, "untrusted") + counted(node, "signature"),
        ),
    ]
    for what, bad, count in cases:
        before, seen = count(), len(p.child.frames)
        inject(p, bad)
        await has(p, seen + 1, what)
        assert count() == before + 1, what
        assert len(node.streams[STREAM].backlog) == 0, f"{what} was kept"
    # Nothing bad was marked seen: the genuine frame of the same block is still accepted,
    # over the same link.
    assert p.child.close_code is None and not p.child.lost.is_set()
    parent.publish(good)
    await has(p, len(cases) + 1, "the good frame")
    assert [e.raw for e in node.streams[STREAM].backlog.entries] == [good]
    assert counted(node, "accepted") == 1


class BlanketUpstream(Upstream):
    """An upstream that knows no block (every answer ``null``): the head tracker asks it
    for the blocks behind its first head and for finality; the frames never need it."""

    def __init__(self) -> None:
        super().__init__("blank", "memory://", timeout=1.0, connections=1)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        req_id = orjson.loads(body)["id"]
        return orjson.dumps({"jsonrpc": "2.0", "id": req_id, "result": None})


def lz4_bomb(plain_bytes: int) -> bytes:
    """A genuine lz4 block (size prefix included) that decompresses to ``plain_bytes``
    zeros from about ``plain_bytes / 255`` bytes: one literal, one long match, the five
    literals a block must end with."""
    match = plain_bytes - 1 - 5  # bytes the match copies
    extra = match - 4 - 15  # past what the token's nibble holds
    body = (
        b"\x1f\x00"  # token: 1 literal, match length 15+; the literal
        + b"\x01\x00"  # match offset 1: repeat the previous byte
        + b"\xff" * (extra // 255)
        + bytes((extra % 255,))
        + b"\x50"
        + bytes(5)  # last sequence: five literals
    )
    return plain_bytes.to_bytes(4, "little") + body


def raw_frame(n: int, payload: bytes, flags: int = feedframe.FLAG_LZ4) -> bytes:
    """A frame around ``payload`` as is, signed by the origin (what a buggy or hostile
    origin key could send)."""
    header = feedframe.HEADER.pack(
        feedframe.VERSION,
        KIND_BLOCK,
        flags,
        STREAM.encode(),
        n,
        block_hash(n),
        1_700_000_000_000_000,
        len(payload),
    )
    digest = keccak(feedframe.DOMAIN + header + keccak(payload))
    return header + payload + ORIGIN.sign(digest)


def test_the_bomb_builder_makes_real_bombs() -> None:
    small = lz4_bomb(1 << 20)
    assert len(small) < 5000
    assert lz4.block.decompress(small) == bytes(1 << 20)


class Node:
    """A child node whose frames go on to its block follower and head (``FeedSource``)."""

    def __init__(self, max_payload_bytes: int) -> None:
        metrics = Metrics()
        pool = UpstreamPool([BlanketUpstream()], PoolConfig(max_attempts=1), metrics)
        self.head = HeadTracker(pool, PROFILES["devnet"], metrics, HeadConfig())
        self.follower = BlockFollower(
            pool,
            self.head,
            MemoryCache(1 << 20, 1 << 16),
            metrics,
            SubscriptionsConfig(),
            window=defaults.REORG_WINDOW,
            offered_max_bytes=defaults.OFFERED_MAX_BYTES,
        )
        self.source = FeedSource(
            self.follower, self.head, pool, metrics, max_payload_bytes=max_payload_bytes
        )
        self.hub = FeedHub([STREAM], metrics, trust=[ORIGIN.address])
        self.hub.listeners.append(self.source.on_frame)

    def offered(self) -> list[str]:
        return list(self.follower.offers.blocks)


@pytest.mark.parametrize(
    "what",
    ["lz4 size prefix past the bound", "lz4 size prefix lying low", "hex unpacking past the bound"],
)
async def test_a_signed_frame_that_unpacks_too_big_is_forwarded_but_never_applied(
    what: str,
) -> None:
    bound = defaults.TREE_MAX_PAYLOAD_BYTES
    if what == "lz4 size prefix past the bound":
        payload = lz4_bomb(2 * bound)
        flags = feedframe.FLAG_LZ4
    elif what == "lz4 size prefix lying low":
        bomb = lz4_bomb(2 * bound)
        payload = (1000).to_bytes(4, "little") + bomb[4:]
        flags = feedframe.FLAG_LZ4
    else:
        # Hex packing halves "0x…" strings: a packed body within the bound whose text is not.
        bound = 1 << 20
        text = b"[" + b",".join([b'"0x' + b"00" * 2000 + b'"'] * 500) + b"]"
        packed = feedframe.pack_hex(text)
        assert len(packed) < bound and len(text) > 1.9 * bound
        payload = lz4.block.compress(packed, store_size=True)
        flags = feedframe.FLAG_LZ4 | feedframe.FLAG_HEXPACK
    node = Node(bound)
    parent = hub()
    below = connect(node.hub, [Want(STREAM)])
    p = connect(parent, [Want(STREAM)], hub=node.hub)
    await welcomed(p, below)
    bad = raw_frame(1, payload, flags)
    tracemalloc.start()
    try:
        parent.publish(bad)
        await has(below, 1, "the bomb forwarded")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Signed by the origin: the hub accepts and forwards it as it came; the node's own use
    # of it stops at the bound, before anything near it was allocated.
    assert below.child.frames == [bad]
    assert counted(node.hub, "accepted") == 1
    assert counted(node.hub, "payload") == 1
    if what.startswith("lz4"):
        # Decompressed, it would take twice the bound.
        assert peak < bound // 4, f"{peak} bytes allocated"
    assert node.offered() == []
    good = frame(2)
    parent.publish(good)
    await has(below, 2, "the good frame")
    assert node.offered() == ["0x" + block_hash(2).hex()]
    await until(lambda: node.head.view.number == 2, WAIT, "the head at the good frame's block")


# --- a slow child -----------------------------------------------------------------------
async def test_a_child_that_stops_reading_is_told_lagging_and_resumes_from_its_position() -> None:
    queue = 4
    size = len(frame(0))
    parent = hub(child_queue_frames=queue, child_buffer_bytes=2 * size)
    fast = [connect(parent, [Want(STREAM)]) for _ in range(2)]
    slow = connect(parent, [Want(STREAM)])
    await welcomed(slow, *fast)
    published = [frame(n) for n in range(3)]
    for raw in published:
        parent.publish(raw)
    await has(slow, 3)
    slow.stall()
    session = slow.session
    cursor = session.cursors[STREAM]
    n = len(published)
    backlog = parent.streams[STREAM].backlog
    behind = []
    while session.proto.state is State.OPEN:
        assert n < 100, "the slow child was never told it lags"
        published.append(raw := frame(n))
        parent.publish(raw)
        behind.append(backlog.next_seq - cursor.seq)
        n += 1
        await asyncio.sleep(0)
    # Closed by the frame that put it one past its queue, not before.
    assert behind[-2:] == [queue, queue + 1]
    assert closes(parent, "lagging") == 1
    assert slow.to_child.get_write_buffer_size() > 0  # still owed what it had been sent
    for _ in range(5):
        published.append(raw := frame(n))
        parent.publish(raw)
        n += 1
    for p in fast:
        await has(p, len(published))
        assert p.child.frames == published
        assert p.child.close_code is None
    slow.unstall()
    await asyncio.wait_for(slow.child.lost.wait(), WAIT)
    assert slow.child.texts[-1] == {"type": "bye", "reason": "lagging"}
    assert slow.child.close_code == CLOSE_LAGGING
    assert closes(parent, "lagging") == 1  # once, though its buffer drained after
    got = slow.child.frames
    assert got == published[: len(got)]  # what it read is a prefix: no gap, no duplicate
    again = connect(parent, [Want(STREAM, from_position=positions(got)[-1] + 1)])
    await has(again, len(published) - len(got), "the rest")
    assert got + again.child.frames == published
    assert "gap" not in welcome_streams(again)[0]


async def test_a_child_owed_more_bytes_than_its_queue_allows_is_told_lagging() -> None:
    size = len(frame(0))
    parent = hub(child_queue_frames=1000, child_queue_bytes=3 * size, child_buffer_bytes=size)
    p = connect(parent, [Want(STREAM)])
    other = connect(parent, [Want(STREAM)])
    await welcomed(p, other)
    p.stall()
    cursor = p.session.cursors[STREAM]
    backlog = parent.streams[STREAM].backlog
    owed = []
    n = 0
    while p.session.proto.state is State.OPEN:
        assert n < 50, "never told it lags"
        parent.publish(frame(n))
        n += 1
        entry = backlog.get(cursor.seq)
        owed.append(backlog.appended_bytes - entry.offset if entry else 0)
        await asyncio.sleep(0)  # the other child reads as frames come
    # Closed by the frame that put it past the bytes bound, not before.
    assert owed[-2] <= 3 * size < owed[-1]
    p.unstall()
    await asyncio.wait_for(p.child.lost.wait(), WAIT)
    assert p.child.close_code == CLOSE_LAGGING
    await has(other, n)


async def test_a_lagging_child_past_the_send_buffer_bound_is_still_told_lagging() -> None:
    size = len(frame(0))
    # The node's WebSocket send bound below what the feed lets a child's buffer hold.
    parent = hub(child_queue_frames=2, child_buffer_bytes=4 * size)
    p = connect(parent, [Want(STREAM)], max_send_buffer=2 * size)
    await welcomed(p)
    p.stall()
    n = 0
    while p.session.proto.state is State.OPEN:
        assert n < 50, "never told it lags"
        parent.publish(frame(n))
        n += 1
    assert p.to_child.get_write_buffer_size() > 2 * size
    p.unstall()
    await asyncio.wait_for(p.child.lost.wait(), WAIT)
    assert p.child.texts[-1] == {"type": "bye", "reason": "lagging"}
    assert p.child.close_code == CLOSE_LAGGING


# --- hellos and the children bound ------------------------------------------------------
@pytest.mark.parametrize(
    ("hello", "code"),
    [
        ([b"not json"], CLOSE_BAD_HELLO),
        (
            [
                orjson.dumps(
                    {
                        "type": "hello",
                        "version": PROTOCOL_VERSION + 1,
                        "streams": [{"stream": STREAM}],
                    }
                )
            ],
            CLOSE_BAD_HELLO,
        ),
        ([encode_hello([Want("bsc/blocks")])], CLOSE_UNKNOWN_STREAM),
        ([encode_hello([Want(STREAM)]), encode_hello([Want(STREAM)])], CLOSE_BAD_HELLO),
    ],
    ids=["not json", "wrong version", "unknown stream", "two hellos"],
)
async def test_a_bad_hello_gets_an_error_and_its_close_code(hello: list[bytes], code: int) -> None:
    parent = hub()
    p = connect(parent, hello=hello)
    await asyncio.wait_for(p.child.lost.wait(), WAIT)
    assert p.child.status == 101
    assert p.child.texts[-1]["type"] == "error"
    assert p.child.close_code == code
    # A second hello is refused after the first was served; a refused first gets no welcome.
    assert (p.child.welcome is not None) == (len(hello) == 2)
    assert parent.children == set() and parent.streams[STREAM].children == set()
    assert closes(parent, "unknown_stream" if code == CLOSE_UNKNOWN_STREAM else "bad_hello") == 1


async def test_max_children_refuses_the_upgrade_until_a_child_leaves() -> None:
    parent = hub(max_children=2)
    first, second = connect(parent, [Want(STREAM)]), connect(parent, [Want(STREAM)])
    await welcomed(first, second)
    third = connect(parent, [Want(STREAM)])
    await asyncio.wait_for(third.child.lost.wait(), WAIT)
    assert third.child.status == 503 and third.child.welcome is None
    assert closes(parent, "too_many_children") == 1
    assert len(parent.children) == 2
    first.to_parent.close()
    await until(lambda: len(parent.children) == 1, WAIT, "the first child gone")
    fourth = connect(parent, [Want(STREAM)])
    await welcomed(fourth)
    assert len(parent.children) == 2


# --- encoded once -----------------------------------------------------------------------
async def test_the_fan_out_writes_the_same_bytes_object_to_every_child() -> None:
    parent, node = hub(), hub()
    children = [connect(parent, [Want(STREAM)]) for _ in range(3)]
    relay = connect(parent, [Want(STREAM)], hub=node)
    grandchildren = [connect(node, [Want(STREAM)]) for _ in range(3)]
    await welcomed(*children, relay, *grandchildren)
    published = [frame(n) for n in range(4)]
    for raw in published:
        parent.publish(raw)
    for p in [*children, relay, *grandchildren]:
        await has(p, len(published))
    for raw in published:
        for p in [*children, relay]:
            assert any(chunk is raw for chunk in p.to_child.written)
    # The relay node forwards the one object it read, to each of its children.
    for got in relay.child.frames:
        for p in grandchildren:
            assert any(chunk is got for chunk in p.to_child.written)
            assert got in p.child.frames


async def test_a_feeders_fan_out_writes_the_nodes_other_workers_first() -> None:
    """Every child of the other workers waits for the frame too."""
    parent = hub()
    children = [connect(parent, [Want(STREAM)]) for _ in range(6)]
    siblings = [connect(parent, [Want(STREAM)], sibling=True) for _ in range(2)]
    await welcomed(*children, *siblings)
    order: list[str] = []
    for name, p in [*(("child", c) for c in children), *(("sibling", s) for s in siblings)]:
        write = p.to_child.writelines

        def recorded(list_of_data: Any, write: Any = write, name: str = name) -> None:
            order.append(name)
            write(list_of_data)

        p.to_child.writelines = recorded  # type: ignore[method-assign]
    parent.publish(frame(1))
    assert order == ["sibling"] * 2 + ["child"] * 6
    # The node's own workers are not counted among the tree's children.
    assert parent.metrics.feed_children.labels(STREAM)._value.get() == len(children)
    # A new head's header goes to them alone, ahead of its block's frame.
    header = {"number": "0x2", "hash": "0x" + block_hash(2).hex()}
    parent.announce_head(header)
    parent.publish(frame(2))
    for p in [*children, *siblings]:
        await has(p, 2)
    for p in siblings:
        assert [t for t in p.child.texts if t["type"] == "head"] == [
            {"type": "head", "header": header}
        ]
    for p in children:
        assert all(t["type"] != "head" for t in p.child.texts)
    for p in [*children, *siblings]:
        await has(p, 1)
    for p in siblings:
        p.to_parent.close()
    await until(lambda: not parent.siblings, WAIT, "the siblings to leave")
    assert len(parent.children) == len(children)


async def test_a_lagging_child_that_never_reads_the_close_is_dropped_after_the_close_timeout() -> (
    None
):
    size = len(frame(0))
    parent = hub(child_queue_frames=2, child_buffer_bytes=2 * size)
    p = connect(parent, [Want(STREAM)])
    await welcomed(p)
    p.session.close_timeout = 0.05
    p.stall()
    n = 0
    while p.session.proto.state is State.OPEN:
        assert n < 50, "never told it lags"
        parent.publish(frame(n))
        n += 1
        await asyncio.sleep(0)
    assert p.to_child.get_write_buffer_size() > 0  # owed bytes it will never read
    # Nothing more is done for it: the timer alone drops it, with what it was owed.
    await asyncio.wait_for(p.child.lost.wait(), WAIT)
    assert p.to_child.get_write_buffer_size() == 0
    assert parent.children == set()


async def test_a_child_that_never_says_hello_is_closed_and_frees_its_place() -> None:
    parent = FeedHub(
        [STREAM],
        Metrics(),
        trust=[ORIGIN.address],
        limits=HubLimits(hello_timeout=0.05, max_children=1),
    )
    silent = connect(parent, hello=[])
    await asyncio.wait_for(silent.child.lost.wait(), WAIT)
    assert silent.child.close_code == CLOSE_BAD_HELLO
    assert closes(parent, "no_hello") == 1
    assert parent.children == set()
    p = connect(parent, [Want(STREAM)])  # the place it held is free again
    await welcomed(p)


async def test_a_hello_or_a_closed_session_stops_the_hello_timer() -> None:
    # A pending timer holds its session: a connection gone within hello_timeout would
    # otherwise stay in memory that long, thousands of them at a high connection rate.
    parent = hub()
    served = connect(parent, [Want(STREAM)])
    refused = connect(parent, hello=[encode_hello([Want("bsc/blocks")])])
    await welcomed(served)
    await asyncio.wait_for(refused.child.lost.wait(), WAIT)
    for p in (served, refused):
        assert p.session._hello_timer is None


async def test_frames_of_unknown_streams_are_counted_under_one_label() -> None:
    parent = hub()
    for i in range(50):
        raw = feedframe.encode(
            ORIGIN,
            kind=feedframe.KIND_BLOCK,
            stream=f"junk{i}/blocks",
            position=i,
            identity=block_hash(i),
            plain=block_payload(block_json(i), b"[]"),
        )
        assert parent.accept(raw) is None
    assert counted(parent, "unknown_stream", "other") == 50
    assert len(parent._counters) == 1


async def test_blocks_offered_by_frames_are_bounded_in_bytes_oldest_dropped_first() -> None:
    node = Node(defaults.TREE_MAX_PAYLOAD_BYTES)
    sizes = [len(block_json(n)) + len(b"[]") for n in range(6)]
    node.follower.offers.max_bytes = sum(sizes[3:])  # room for the newest three exactly
    for n in range(6):
        assert node.hub.accept(frame(n)) is not None  # the head never reaches them here
    assert node.offered() == ["0x" + block_hash(n).hex() for n in (3, 4, 5)]
    assert node.follower.offers.bytes == sum(sizes[3:])
