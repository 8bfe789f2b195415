"""Following one L2 batch stream from relay tree nodes: the batch subscriber library.

``subscribe_batches(urls, "arbitrum/batches", from_seq=0)`` yields every batch once, in
sequence order, with no gap and no duplicate across reconnects and parent failures::

    from chainrelay.clients.batchsubscriber import subscribe_batches

    async for b in subscribe_batches(["ws://a:8545/feed", "ws://b:8545/feed"],
                                     "arbitrum/batches", from_seq=0,
                                     trust=["0xSequencerAddress"]):
        print(b.seq, len(b.payload), b.signer, b.fetched)

``BatchSubscription`` is the same with its counters in reach (``dropped`` by reason,
``duplicates``, ``fetched``, ``signers``), and ``async with`` to close it.

Each URL is one parent, held by its own ``FeedLink`` and asked (hello ``from``) for the
first number not yet taken, or for the live stream when no ``from_seq`` is given and none
was taken yet. Every frame is checked as it arrives, before it is queued: shape, stream,
batch kind, chain id (when ``chain_id`` is given), number (one already taken from any
parent is a ``duplicate``: counted, dropped), and the sequencer's signature over chain id,
stream, number and payload (``batchframe.open_frame``) by one of ``trust`` (any signer when
``trust`` is empty). A frame that fails is counted in ``dropped`` by reason, never raised:
a parent that forwards garbage costs a counter, not the subscription. The sequencer's
signature travels with the frame, so no relay on the way needs to be trusted.

The consumer gets number ``next`` and only it. A frame past ``next`` shows numbers
``[next, seq)`` no parent sent (the parent's backlog did not reach back that far, or it lost
them); they are read from ``GET /feed/range`` of that parent's node (same host and port),
which serves them from its backlog, an ingress node's durable log, or its own parents,
then from the other parents' nodes, in pages, each frame checked as above and the numbers
consecutive. They are yielded (``fetched=True``) before the frame that showed them. An
answer that is empty, refused or broken sends the request to the next node, in rounds with
a doubling back-off; when no node can give them the subscription ends with
``BackfillFailed`` rather than skip them. A welcome's ``gap`` (numbers the parent holds no
more, e.g. trimmed after a confirmation) is read from the range endpoints at once, before
the replay that follows it: a quiet stream may send no frame to show it. The word is not
signed, but every fetched batch is; a gap that no node can fill is only logged.

Checked batches wait in a bounded queue (count and payload bytes). A consumer that falls
that far behind is resynchronised: new frames are dropped (``dropped["overflow"]``) until
the queue is empty, then every link reconnects and its parent replays from the first
number not yet queued.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TextIO

from chainrelay import defaults as d
from chainrelay.batches.frame import decode_range, frame_chain_id, open_frame
from chainrelay.clients.feed import (
    FeedSubscription,
    in_rounds,
    print_items,
    range_url,
    signer_address,
)
from chainrelay.errors import BackfillFailed, ConfigError
from chainrelay.tree.frame import KIND_BATCH, Frame, FrameError, decode, keccak
from chainrelay.tree.link import FeedLink
from chainrelay.tree.session import Gap, Want

log = logging.getLogger(__name__)

# Every limit is in chainrelay.defaults, with its reason; the keywords of BatchSubscription
# override them.
MAX_FRAME_BYTES = d.TREE_MAX_FRAME_BYTES
MAX_PAYLOAD_BYTES = d.BATCH_SUBSCRIBER_MAX_PAYLOAD_BYTES
QUEUE_BATCHES = d.BATCH_SUBSCRIBER_QUEUE_BATCHES
QUEUE_BYTES = d.BATCH_SUBSCRIBER_QUEUE_BYTES
RANGE_FRAMES = d.BATCH_RANGE_MAX_FRAMES
RANGE_MAX_BYTES = d.BATCH_SUBSCRIBER_RANGE_MAX_BYTES
RANGE_TIMEOUT = d.BATCH_RANGE_TIMEOUT
RANGE_ROUNDS = d.SUBSCRIBER_BACKFILL_ROUNDS
CONNECT_TIMEOUT = d.TREE_CONNECT_TIMEOUT
RETRY_DELAY = d.TREE_RETRY_DELAY
RETRY_MAX = d.TREE_RETRY_MAX
PING_INTERVAL = d.TREE_PING_INTERVAL


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """One batch as the subscriber hands it over."""

    seq: int
    payload: bytes
    signer: str  # the sequencer that signed it, 0x-address
    latency_ms: float | None  # ingress's acceptance to arrival here; None when fetched
    fetched: bool  # True: read from a node's range endpoint, not sent down a link


@dataclass(frozen=True, slots=True)
class Checked:
    """A batch frame that passed every check: its number, payload and signer."""

    seq: int
    payload: bytes
    signer: str
    origin_us: int


class BatchCheck:
    """The checks every batch frame passes, from a link or a range answer alike: shape,
    stream, kind, chain id, and the sequencer's signature by a trusted key. Sans-I/O."""

    def __init__(
        self,
        stream: str,
        *,
        trust: frozenset[bytes],
        chain_id: int | None,
        max_frame_bytes: int,
        max_payload_bytes: int,
    ) -> None:
        self.stream = stream
        self.trust = trust
        self.chain_id = chain_id
        self.max_frame_bytes = max_frame_bytes
        self.max_payload_bytes = max_payload_bytes

    def frame(self, raw: bytes) -> Frame:
        """The frame's header, checked but for its signature; ``FrameError`` (its
        ``reason`` is the counter's name) for a frame not of this stream's batches."""
        frame = decode(raw, self.max_frame_bytes)
        if frame.stream != self.stream:
            raise FrameError("stream", frame.stream)
        if frame.kind != KIND_BATCH:
            raise FrameError("kind", str(frame.kind))
        chain_id = frame_chain_id(frame)  # FrameError("identity") for a block's hash
        if self.chain_id is not None and chain_id != self.chain_id:
            raise FrameError("chain", str(chain_id))
        return frame

    def open(self, frame: Frame) -> Checked:
        """The batch in ``frame``, its signature checked; ``FrameError`` for a payload that
        does not unpack (``payload``), a signature that recovers no key (``signature``), or
        one whose key is not trusted (``untrusted``: an unknown sequencer, or a batch
        altered on the way, whose digest recovers some other key)."""
        address, payload = open_frame(frame, self.max_payload_bytes)
        if self.trust and address not in self.trust:
            raise FrameError("untrusted", "0x" + address.hex())
        return Checked(frame.position, payload, "0x" + address.hex(), frame.origin_us)


@dataclass(slots=True)
class _Queued:
    """A checked batch waiting for the consumer."""

    link: FeedLink
    batch: Checked | None  # None: a parent's word that [next, gap_end) is past its backlog
    arrived_us: int
    size: int
    gap_end: int = 0


class BatchSubscription(FeedSubscription[FeedBatch, _Queued]):
    """Batches of ``stream`` from the nodes at ``urls``; iterate it once (``async for``),
    close it with ``aclose()`` or ``async with``."""

    noun = "batch subscriber"
    unit = "batches"

    def __init__(
        self,
        urls: str | Sequence[str],
        stream: str,
        *,
        from_seq: int | None = None,
        trust: Sequence[str] = (),
        chain_id: int | None = None,
        # Limits
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        queue_batches: int = QUEUE_BATCHES,
        queue_bytes: int = QUEUE_BYTES,
        range_frames: int = RANGE_FRAMES,
        range_max_bytes: int = RANGE_MAX_BYTES,
        # Timeouts
        connect_timeout: float = CONNECT_TIMEOUT,
        retry_delay: float = RETRY_DELAY,
        retry_max: float = RETRY_MAX,
        ping_interval: float = PING_INTERVAL,
        range_timeout: float = RANGE_TIMEOUT,
        range_rounds: int = RANGE_ROUNDS,
    ) -> None:
        if from_seq is not None and from_seq < 0:
            raise ConfigError(f"from_seq must be >= 0: {from_seq}")
        if range_frames < 1 or range_rounds < 1:
            raise ConfigError("range_frames and range_rounds must be >= 1")
        super().__init__(
            urls,
            stream,
            queue_items=queue_batches,
            queue_bytes=queue_bytes,
            max_frame_bytes=max_frame_bytes,
            connect_timeout=connect_timeout,
            retry_delay=retry_delay,
            retry_max=retry_max,
            ping_interval=ping_interval,
        )
        self.check = BatchCheck(
            stream,
            trust=frozenset(signer_address(a) for a in trust),
            chain_id=chain_id,
            max_frame_bytes=max_frame_bytes,
            max_payload_bytes=max_payload_bytes,
        )
        self.range_frames = range_frames
        self.range_max_bytes = range_max_bytes
        self.range_timeout = range_timeout
        self.range_rounds = range_rounds
        self.fetched = 0  # batches read from range endpoints
        # The links' side: the first number not yet queued (None: live, nothing taken yet).
        self.accepted_next = from_seq
        # The consumer's side: the number it gets next (None: the first one queued).
        self.next = from_seq

    # --- the consumer side ----------------------------------------------------------------
    async def _hand_over(self, item: _Queued) -> AsyncIterator[FeedBatch]:
        b = item.batch
        if b is None:
            async for fetched in self._fill_said(item.link, item.gap_end):
                yield fetched
            return
        if self.next is None:
            self.next = b.seq
        if b.seq < self.next:
            self.duplicates += 1  # fetched while this copy waited in the queue
            return
        if b.seq > self.next:
            async for fetched in self._fill(item.link, b.seq):
                yield fetched
        self.next = b.seq + 1
        yield FeedBatch(b.seq, b.payload, b.signer, (item.arrived_us - b.origin_us) / 1000, False)

    def _resume_point(self) -> str:
        return f"seq {self.accepted_next}"

    # --- the links' side: called from their read loops, never blocking -------------------
    def _wants(self) -> list[Want]:
        return [Want(self.stream, from_position=self.accepted_next)]

    def _on_gap(self, link: FeedLink, stream: str, gap: Gap) -> None:
        log.info(
            "%s: batches %d..%d are past its backlog; fetched from range endpoints",
            link.name,
            gap.start,
            gap.end - 1,
        )
        # In the queue's order: the consumer reads them before the replay that follows.
        self._enqueue(_Queued(link, None, 0, 0, gap.end))

    async def _fill_said(self, link: FeedLink, end: int) -> AsyncIterator[FeedBatch]:
        """Batches up to ``end`` that a parent said it no longer holds (a quiet stream
        may send no frame to show the gap). The word is not signed, the batches are: a
        range that gives nothing is only logged, and the next frame decides."""
        if self.next is None or self.next >= end:
            return
        try:
            async for fetched in self._fill(link, end):
                yield fetched
        except BackfillFailed as exc:
            log.warning(
                "batches %d..%d a parent said were past its backlog: %s", self.next, end - 1, exc
            )

    def on_frame(self, link: FeedLink, raw: bytes) -> None:
        """Check one frame from ``link`` and queue its batch, or count why not (a
        ``FeedLink`` callback; public so the checks can be driven without sockets)."""
        arrived_us = time.time_ns() // 1000
        if self._refused(link):
            return
        try:
            frame = self.check.frame(raw)
        except FrameError as exc:
            self._drop(link, exc.reason, exc)
            return
        if self.accepted_next is not None and frame.position < self.accepted_next:
            self.duplicates += 1  # taken already, from this parent or another
            return
        if self._full():
            return
        try:
            batch = self.check.open(frame)
        except FrameError as exc:
            self._drop(link, exc.reason, exc)
            return
        self.signers.add(batch.signer)
        # Past the next number: the consumer fetches the ones between before this one.
        self.accepted_next = batch.seq + 1
        self._enqueue(_Queued(link, batch, arrived_us, len(batch.payload)))

    # --- numbers no link sent, from range endpoints -----------------------------------------
    async def _fill(self, first: FeedLink, end: int) -> AsyncIterator[FeedBatch]:
        """Batches ``[next, end)`` in order, from ``first``'s node or the other links'
        nodes, page by page; ``BackfillFailed`` when no node gives the next one."""
        assert self.next is not None
        log.info("fetching batches %d..%d from range endpoints", self.next, end - 1)
        order = [first] + [link for link in self.links if link is not first]
        while self.next < end:
            got = await self._page(order, self.next, min(end - self.next, self.range_frames))
            for batch in got:
                self.next = batch.seq + 1
                self.fetched += 1
                yield FeedBatch(batch.seq, batch.payload, batch.signer, None, True)

    async def _page(self, order: list[FeedLink], start: int, limit: int) -> list[Checked]:
        """At least one checked batch from ``start`` on (at most ``limit``), from the first
        node in ``order`` that gives one, in rounds over them all."""

        async def attempt(link: FeedLink) -> list[Checked]:
            body = await self._get(range_url(link.url, self.stream, start, limit))
            got = self.range_answer(body, start, limit)
            if not got:  # its bad frames are counted already; the next node may have them
                raise ValueError(f"nothing usable at {start}")
            return got

        return await in_rounds(
            order,
            attempt,
            rounds=self.range_rounds,
            retry_delay=self.retry_delay,
            retry_max=self.retry_max,
            failed=f"{self.stream} batch {start} could not be fetched",
        )

    def range_answer(self, body: bytes, start: int, limit: int) -> list[Checked]:
        """The checked batches of a range answer from ``start`` on, consecutive, at most
        ``limit``: its longest good prefix (a bad frame or a jump ends it, counted)."""
        try:
            raws = decode_range(body, self.check.max_frame_bytes)
        except FrameError as exc:
            self._drop(None, exc.reason, exc)
            return []
        out: list[Checked] = []
        for raw in raws[:limit]:
            try:
                frame = self.check.frame(raw)
                if frame.position != start + len(out):
                    raise FrameError("range_seq", f"{frame.position}, {start + len(out)} wanted")
                out.append(self.check.open(frame))
            except FrameError as exc:
                self._drop(None, exc.reason, exc)
                break
        return out

    async def _get(self, url: str) -> bytes:
        """A range answer's body; ``ValueError`` for anything but a 200 within the size
        bound."""
        async with asyncio.timeout(self.range_timeout), self._session().get(url) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}: {(await resp.content.read(300))!r}")
            raw = bytearray()
            while len(raw) <= self.range_max_bytes:
                more = await resp.content.read(self.range_max_bytes + 1 - len(raw))
                if not more:
                    break
                raw += more
        if len(raw) > self.range_max_bytes:
            raise ValueError(f"range answer larger than {self.range_max_bytes} bytes")
        return bytes(raw)


def subscribe_batches(
    urls: str | Sequence[str],
    stream: str,
    *,
    from_seq: int | None = None,
    trust: Sequence[str] = (),
    chain_id: int | None = None,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> AsyncGenerator[FeedBatch, None]:
    """Each batch of ``stream`` once, in order, from the nodes at ``urls`` (see the module
    docstring); closing the generator stops every link."""
    return BatchSubscription(
        urls,
        stream,
        from_seq=from_seq,
        trust=trust,
        chain_id=chain_id,
        max_payload_bytes=max_payload_bytes,
    ).closing()


async def print_batches(
    urls: Sequence[str],
    stream: str,
    *,
    from_seq: int | None = None,
    trust: Sequence[str] = (),
    count: int | None = None,
    max_seconds: float | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """``chainrelay subscribe --stream X/batches``: one JSON line per batch on ``out``, until
    ``count`` batches or ``max_seconds``; warnings and the drop counters on ``err``.
    Returns the exit code."""
    sub = BatchSubscription(urls, stream, from_seq=from_seq, trust=trust)
    return await print_items(
        sub,
        "batches",
        _batch_line,
        lambda b: b.signer,
        trusted=bool(trust),
        count=count,
        max_seconds=max_seconds,
        out=out,
        err=err,
    )


def _batch_line(b: FeedBatch) -> dict[str, object]:
    """One batch as ``chainrelay subscribe`` prints it."""
    return {
        "seq": b.seq,
        "bytes": len(b.payload),
        "keccak": "0x" + keccak(b.payload).hex(),
        "signer": b.signer,
        "latency_ms": None if b.latency_ms is None else round(b.latency_ms, 3),
        "fetched": b.fetched,
    }
