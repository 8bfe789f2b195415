"""The batch subscriber's checks and ordering, driven without a feed parent.

Frames are real batch frames, signed by a sequencer key with the real codec, handed to the
subscription's ``on_frame`` as its links would; no feed socket is opened. The numbers a
frame shows missing are read from range endpoints, here an aiohttp app on 127.0.0.1 that
answers ``GET /feed/range`` from a dict, as a node's would, and misbehaves on demand
(refuses, answers empty, cut or with a stranger's frame). Its ``/feed`` is absent, so the
subscription's links only retry in the background.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypedDict, Unpack

import pytest
from aiohttp import web

from chainrelay.batches.frame import encode_frame, encode_range, sign_batch
from chainrelay.clients.batchsubscriber import BatchSubscription, Checked, FeedBatch
from chainrelay.clients.feed import range_url
from chainrelay.errors import BackfillFailed, ConfigError
from chainrelay.tree.frame import HEADER_LEN, KIND_BLOCK, Signer, encode, keccak
from tests.lab.procs import until
from tests.lab.timing import SECOND

STREAM = "arbitrum/batches"
CHAIN = 42161
SEQUENCER = Signer(keccak(b"sequencer key"))
STRANGER = Signer(keccak(b"someone else's key"))
TRUST = ["0x" + SEQUENCER.address.hex()]


class Timeouts(TypedDict):
    retry_delay: float
    retry_max: float
    connect_timeout: float


class Changes(TypedDict, total=False):
    """What a test here sets of BatchSubscription's arguments beside the defaults below."""

    from_seq: int | None
    max_payload_bytes: int
    queue_batches: int
    range_rounds: int


FAST: Timeouts = {"retry_delay": 0.02, "retry_max": 0.05, "connect_timeout": 2 * SECOND}


def payload_of(seq: int) -> bytes:
    """768 bytes lz4 cannot shrink (a batch is most often compressed already): the frame
    carries the payload as it came."""
    return b"".join(keccak(b"batch %d/%d" % (seq, i)) for i in range(24))


def frame_of(
    seq: int,
    *,
    key: Signer = SEQUENCER,
    stream: str = STREAM,
    chain_id: int = CHAIN,
    payload: bytes | None = None,
) -> bytes:
    data = payload_of(seq) if payload is None else payload
    return encode_frame(
        chain_id=chain_id,
        stream=stream,
        seq=seq,
        payload=data,
        signature=sign_batch(key, chain_id, stream, seq, data),
        origin_us=1,
    )


def subscription(
    urls: list[str] | None = None,
    *,
    trust: Sequence[str] = TRUST,
    chain_id: int | None = CHAIN,
    **kw: Unpack[Changes],
) -> BatchSubscription:
    return BatchSubscription(
        urls or ["ws://127.0.0.1:9/feed"], STREAM, trust=trust, chain_id=chain_id, **FAST, **kw
    )


def checked(batch: Checked | None) -> Checked:
    """A queued batch, not a gap's marker."""
    assert batch is not None, "a gap queued where a batch was expected"
    return batch


def queued(sub: BatchSubscription) -> list[int]:
    return [checked(q.batch).seq for q in sub.queue]


# --- checks of each frame --------------------------------------------------------------------
def test_frames_in_order_are_queued_with_their_payload_and_signer() -> None:
    sub = subscription(from_seq=5)
    link = sub.links[0]
    for seq in range(5, 9):
        sub.on_frame(link, frame_of(seq))
    assert queued(sub) == [5, 6, 7, 8]
    assert checked(sub.queue[0].batch).payload == payload_of(5)
    assert checked(sub.queue[0].batch).signer == TRUST[0]
    assert sub.accepted_next == 9 and not sub.dropped and sub.duplicates == 0


def test_a_number_already_taken_is_a_duplicate_whichever_parent_sends_it() -> None:
    sub = subscription(["ws://127.0.0.1:9/feed", "ws://127.0.0.1:10/feed"], from_seq=0)
    a, b = sub.links
    for seq in range(3):
        sub.on_frame(a, frame_of(seq))
    for seq in range(3):
        sub.on_frame(b, frame_of(seq))  # the other parent's copies
    sub.on_frame(a, frame_of(1))  # a replay after a reconnect
    assert queued(sub) == [0, 1, 2]
    assert sub.duplicates == 4 and not sub.dropped


def test_below_from_seq_is_a_duplicate() -> None:
    sub = subscription(from_seq=10)
    sub.on_frame(sub.links[0], frame_of(9))
    assert queued(sub) == [] and sub.duplicates == 1


def test_frames_of_another_stream_kind_or_chain_are_dropped_and_counted() -> None:
    sub = subscription(from_seq=0)
    link = sub.links[0]
    sub.on_frame(link, frame_of(0, stream="other/batches"))
    sub.on_frame(link, frame_of(0, chain_id=56))
    block = encode(
        SEQUENCER, kind=KIND_BLOCK, stream=STREAM, position=0, identity=keccak(b"h"), plain=b"{}"
    )
    sub.on_frame(link, block)
    sub.on_frame(link, b"\x01\x02garbage")
    assert queued(sub) == []
    assert sub.dropped == {"stream": 1, "chain": 1, "kind": 1, "truncated": 1}
    sub.on_frame(link, frame_of(0))
    assert queued(sub) == [0]


def test_any_chain_is_taken_when_none_is_named() -> None:
    sub = subscription(from_seq=0, chain_id=None)
    sub.on_frame(sub.links[0], frame_of(0, chain_id=56))
    assert queued(sub) == [0]


def test_untrusted_forged_and_unreadable_signatures_are_dropped_and_counted() -> None:
    sub = subscription(from_seq=0)
    link = sub.links[0]
    sub.on_frame(link, frame_of(0, key=STRANGER))
    good = bytearray(frame_of(0))
    good[HEADER_LEN + 3] ^= 0x01  # a relay on the way altered the payload
    sub.on_frame(link, bytes(good))
    unreadable = bytearray(frame_of(0))
    unreadable[-1] = 7  # no such recovery id
    sub.on_frame(link, bytes(unreadable))
    assert queued(sub) == []
    assert sub.dropped == {"untrusted": 2, "signature": 1}
    assert sub.accepted_next == 0  # none of them counts as taken
    sub.on_frame(link, frame_of(0))
    assert queued(sub) == [0]


def test_without_trust_any_signer_is_taken_and_named() -> None:
    sub = subscription(from_seq=0, trust=())
    sub.on_frame(sub.links[0], frame_of(0, key=STRANGER))
    assert queued(sub) == [0]
    assert sub.signers == {"0x" + STRANGER.address.hex()}


def test_an_oversized_payload_is_dropped() -> None:
    sub = subscription(from_seq=0, max_payload_bytes=100)
    sub.on_frame(sub.links[0], frame_of(0, payload=b"x" * 50))
    sub.on_frame(sub.links[0], frame_of(1, payload=bytes(range(200))))
    assert queued(sub) == [0] and sub.dropped == {"payload": 1}


def test_live_start_takes_the_first_frame_and_then_only_later_ones() -> None:
    sub = subscription()
    link = sub.links[0]
    assert sub._wants()[0].from_position is None
    sub.on_frame(link, frame_of(40))
    sub.on_frame(link, frame_of(39))
    sub.on_frame(link, frame_of(43))  # past next: queued, 41..42 fetched before it
    assert queued(sub) == [40, 43] and sub.duplicates == 1
    assert sub._wants()[0].from_position == 44


def test_a_full_queue_drops_until_drained_then_links_resume_from_the_first_not_queued() -> None:
    sub = subscription(from_seq=0, queue_batches=3)
    link = sub.links[0]
    for seq in range(5):
        sub.on_frame(link, frame_of(seq))
    assert queued(sub) == [0, 1, 2] and sub.dropped == {"overflow": 2}
    sub.queue.clear()
    sub._resync()
    sub.on_frame(link, frame_of(3))  # still the old session's frames: ignored
    assert queued(sub) == [] and sub.dropped == {"overflow": 3}
    assert sub._wants()[0].from_position == 3


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        BatchSubscription([], STREAM)
    with pytest.raises(ConfigError):
        BatchSubscription("ws://127.0.0.1:9/feed", STREAM, from_seq=-1)
    with pytest.raises(ConfigError):
        BatchSubscription("ws://127.0.0.1:9/feed", STREAM, trust=["0x1234"])


# --- range answers, sans-I/O --------------------------------------------------------------
def test_range_answer_takes_consecutive_checked_frames_from_start() -> None:
    sub = subscription(from_seq=0)
    body = encode_range([frame_of(n) for n in range(10, 15)])
    got = sub.range_answer(body, 10, 100)
    assert [b.seq for b in got] == [10, 11, 12, 13, 14]
    assert [b.seq for b in sub.range_answer(body, 10, 2)] == [10, 11]
    assert got[2].payload == payload_of(12)


def test_range_answer_keeps_the_good_prefix_before_a_jump_or_a_bad_frame() -> None:
    sub = subscription(from_seq=0)
    jump = encode_range([frame_of(10), frame_of(11), frame_of(13)])
    assert [b.seq for b in sub.range_answer(jump, 10, 100)] == [10, 11]
    stranger = encode_range([frame_of(10), frame_of(11, key=STRANGER), frame_of(12)])
    assert [b.seq for b in sub.range_answer(stranger, 10, 100)] == [10]
    wrong_start = encode_range([frame_of(11)])
    assert sub.range_answer(wrong_start, 10, 100) == []
    cut = encode_range([frame_of(10)])[:-5]
    assert sub.range_answer(cut, 10, 100) == []
    assert sub.range_answer(b"", 10, 100) == []
    assert sub.dropped == {"range_seq": 2, "untrusted": 1, "range": 1}


def test_range_url_is_the_feed_nodes_http_port() -> None:
    url = range_url("ws://10.0.0.1:8545/feed", "arbitrum/batches", 7, 100)
    assert url == "http://10.0.0.1:8545/feed/range?stream=arbitrum%2Fbatches&from=7&limit=100"
    assert range_url("wss://a.example/feed", "x", 0, 1).startswith("https://a.example/feed/range")


# --- the consumer: fetched numbers before the frame that showed them ------------------------
class RangeNode:
    """``GET /feed/range`` on 127.0.0.1 from ``frames`` (seq -> raw frame), at most
    ``page`` frames an answer; ``mode`` makes it misbehave: "refuse" (404), "empty",
    "cut" (a body cut inside a frame), "stranger" (frames signed by another key)."""

    def __init__(self, frames: dict[int, bytes], page: int = 1000) -> None:
        self.frames = frames
        self.page = page
        self.mode = "ok"
        self.requests: list[tuple[int, int]] = []
        app = web.Application()
        app.router.add_get("/feed/range", self._range)
        self._runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> RangeNode:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"ws://127.0.0.1:{self._runner.addresses[0][1]}/feed"
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _range(self, request: web.Request) -> web.Response:
        assert request.query["stream"] == STREAM
        start, limit = int(request.query["from"]), int(request.query["limit"])
        self.requests.append((start, limit))
        if self.mode == "refuse":
            return web.json_response({"error": "no node holds it"}, status=404)
        if self.mode == "empty":
            return web.Response(body=b"", content_type="application/octet-stream")
        frames: list[bytes] = []
        n = start
        while n in self.frames and len(frames) < min(limit, self.page):
            frames.append(frame_of(n, key=STRANGER) if self.mode == "stranger" else self.frames[n])
            n += 1
        body = encode_range(frames)
        if self.mode == "cut":
            body = body[: len(body) // 2]
        return web.Response(body=body, content_type="application/octet-stream")


@pytest.fixture
async def nodes() -> AsyncIterator[list[RangeNode]]:
    made = [await RangeNode({n: frame_of(n) for n in range(200)}, page=16).start() for _ in "ab"]
    yield made
    for node in made:
        await node.stop()


async def take(sub: BatchSubscription, n: int) -> list[FeedBatch]:
    out: list[FeedBatch] = []
    async with asyncio.timeout(10 * SECOND):
        async for b in sub:
            out.append(b)
            if len(out) == n:
                break
    return out


async def test_numbers_a_frame_skips_are_fetched_in_pages_before_it(nodes: list[RangeNode]) -> None:
    a, _b = nodes
    sub = subscription([a.url], from_seq=3)
    sub.on_frame(sub.links[0], frame_of(3))
    sub.on_frame(sub.links[0], frame_of(60))  # 4..59 are missing
    sub.on_frame(sub.links[0], frame_of(61))
    try:
        got = await take(sub, 59)
    finally:
        await sub.aclose()
    assert [b.seq for b in got] == list(range(3, 62))
    assert [b.fetched for b in got] == [False] + [True] * 56 + [False, False]
    assert all(b.payload == payload_of(b.seq) for b in got)
    assert got[0].latency_ms is not None and got[1].latency_ms is None
    assert sub.fetched == 56
    assert a.requests[0] == (4, 56) and len(a.requests) == 4  # pages of 16


async def test_refused_empty_cut_or_stranger_answers_send_the_fetch_to_the_next_node(
    nodes: list[RangeNode],
) -> None:
    a, b = nodes
    for mode in ("refuse", "empty", "cut", "stranger"):
        a.mode = mode
        sub = subscription([a.url, b.url], from_seq=0)
        sub.on_frame(sub.links[0], frame_of(0))
        sub.on_frame(sub.links[0], frame_of(20))
        try:
            got = await take(sub, 21)
        finally:
            await sub.aclose()
        assert [x.seq for x in got] == list(range(21)), mode
        assert b.requests, mode
        b.requests.clear()


async def test_when_no_node_has_them_the_subscription_ends_rather_than_skip(
    nodes: list[RangeNode],
) -> None:
    a, b = nodes
    a.mode, b.mode = "refuse", "empty"
    sub = subscription([a.url, b.url], from_seq=0, range_rounds=3)
    sub.on_frame(sub.links[0], frame_of(0))
    sub.on_frame(sub.links[0], frame_of(5))
    seen: list[int] = []
    try:
        with pytest.raises(BackfillFailed, match="batch 1"):
            async with asyncio.timeout(10 * SECOND):
                async for x in sub:
                    seen.append(x.seq)
    finally:
        await sub.aclose()
    assert seen == [0]
    assert len(a.requests) == 3 and len(b.requests) == 3


async def test_a_fetch_resumes_where_a_short_answer_ended(nodes: list[RangeNode]) -> None:
    a, b = nodes
    for n in range(10, 200):
        del a.frames[n]  # a holds 0..9 only; b has the rest
    sub = subscription([a.url, b.url], from_seq=0)
    sub.on_frame(sub.links[0], frame_of(30))
    try:
        got = await take(sub, 31)
    finally:
        await sub.aclose()
    assert [x.seq for x in got] == list(range(31))
    assert a.requests[0] == (0, 30) and b.requests[0][0] == 10


async def test_frames_arriving_while_the_consumer_fetches_follow_in_order(
    nodes: list[RangeNode],
) -> None:
    a, _b = nodes
    sub = subscription([a.url], from_seq=0)
    link = sub.links[0]
    sub.on_frame(link, frame_of(50))
    got: list[int] = []

    async def consume() -> None:
        async for x in sub:
            got.append(x.seq)
            if x.seq == 99:
                return

    task = asyncio.create_task(consume())
    try:
        await until(lambda: len(got) > 5, 10 * SECOND, "the fetch to start")
        for n in range(51, 100):
            sub.on_frame(link, frame_of(n))
            sub.on_frame(link, frame_of(n - 1))  # a second copy of each
        async with asyncio.timeout(10 * SECOND):
            await task
    finally:
        task.cancel()
        await sub.aclose()
    assert got == list(range(100))
    assert sub.duplicates == 49
