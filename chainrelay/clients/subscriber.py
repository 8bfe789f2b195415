"""Following one chain's blocks from relay tree nodes: the subscriber library.

``subscribe(urls, "bsc/blocks")`` yields each new block once, in order, with no gap and no
duplicate across reconnects and parent failures::

    from chainrelay.clients.subscriber import subscribe

    async for block in subscribe(["ws://a:8545/feed", "ws://b:8545/feed"], "bsc/blocks",
                                 trust=["0xOriginAddress"]):
        print(block.number, block.hash, block.tx_count, block.latency_ms)

``Subscription`` is the same with its counters in reach (``dropped``, ``duplicates``,
``backfilled``, ``signers``), and ``async with`` to close it.

Each URL is one parent, held by its own ``FeedLink``; the first copy of a block wins.
Every frame is checked before it is queued: shape, stream, signer (one of ``trust``; any
signer when ``trust`` is empty, reported in ``FeedBlock.origin``); it is unpacked within
``max_payload_bytes`` when the consumer takes it. A frame that fails is counted in
``dropped`` by reason and never raised: a parent that forwards garbage costs a counter,
not the subscription (a trusted frame whose payload fails leaves a gap, backfilled). A frame
below the first position wanted (``from_block``, else the first block received) is
``stale``: a parent may forward frames it took in late, and a block never delivered
cannot be reorged; a new block at a height already delivered is a reorg.

Positions a parent cannot send (a frame past the next position expected; a welcome's
``gap`` is only logged, since the frame after it shows the same gap, signed) are fetched
over JSON-RPC from that parent's HTTP endpoint (the same host and port, path ``/``),
one block at a time as the consumer takes them, and yielded with ``verified=False``
before the frame that revealed them; another parent's endpoint is tried when that one
fails, and ``BackfillFailed`` ends the subscription when none can give them, rather than
skip them.

Frames wait in a bounded queue for the consumer. A consumer that falls that far behind is
resynchronised: new frames are dropped (``dropped["overflow"]``) until the queue is empty,
then every link reconnects and its parent replays from the first position not yet queued.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO

import orjson

from chainrelay import defaults as d
from chainrelay.clients.feed import (
    FeedSubscription,
    in_rounds,
    print_items,
    rpc_url,
    signer_address,
)
from chainrelay.clients.feed import feed_url as feed_url  # where it was first imported from
from chainrelay.errors import ConfigError
from chainrelay.tree.frame import (
    KIND_BLOCK,
    Frame,
    FrameError,
    decode,
    signer,
    split_block_payload,
    unpack,
)
from chainrelay.tree.link import FeedLink
from chainrelay.tree.session import Dedup, Gap, Positions, Want

log = logging.getLogger(__name__)

# Every limit is in chainrelay.defaults, with its reason; the keywords of Subscription
# override them.
MAX_FRAME_BYTES = d.TREE_MAX_FRAME_BYTES
MAX_PAYLOAD_BYTES = d.TREE_MAX_PAYLOAD_BYTES
DEDUP_ENTRIES = d.TREE_DEDUP_ENTRIES
STALE_POSITIONS = d.TREE_STALE_POSITIONS
QUEUE_BLOCKS = d.SUBSCRIBER_QUEUE_BLOCKS
QUEUE_BYTES = d.SUBSCRIBER_QUEUE_BYTES
CONNECT_TIMEOUT = d.TREE_CONNECT_TIMEOUT
RETRY_DELAY = d.TREE_RETRY_DELAY
RETRY_MAX = d.TREE_RETRY_MAX
PING_INTERVAL = d.TREE_PING_INTERVAL
BACKFILL_TIMEOUT = d.SUBSCRIBER_BACKFILL_TIMEOUT
BACKFILL_ROUNDS = d.SUBSCRIBER_BACKFILL_ROUNDS


@dataclass(frozen=True, slots=True)
class FeedBlock:
    """One block as the subscriber hands it over."""

    number: int
    hash: str
    tx_count: int
    latency_ms: float | None  # origin's publication to arrival here; None when backfilled
    verified: bool  # False only for blocks backfilled over JSON-RPC
    reorg: bool  # a new block at a height already delivered
    block: dict[str, Any]
    receipts: list[Any] | None
    origin: str | None  # the frame's signer, 0x-address; None when backfilled


@dataclass(slots=True)
class _Queued:
    """A checked frame (still compressed) waiting for the consumer."""

    link: FeedLink
    frame: Frame
    origin: str  # the frame's signer, 0x-address
    arrived_us: int
    size: int


def _tx_count(block: dict[str, Any]) -> int:
    txs = block.get("transactions")
    return len(txs) if isinstance(txs, list) else 0


class Subscription(FeedSubscription[FeedBlock, _Queued]):
    """Blocks of ``stream`` from the nodes at ``urls``; iterate it once (``async for``),
    close it with ``aclose()`` or ``async with``."""

    unit = "blocks"

    def __init__(
        self,
        urls: str | Sequence[str],
        stream: str,
        *,
        from_block: int | None = None,
        trust: Sequence[str] = (),
        backfill: bool = True,
        # Limits
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        dedup_entries: int = DEDUP_ENTRIES,
        stale_positions: int = STALE_POSITIONS,
        queue_blocks: int = QUEUE_BLOCKS,
        queue_bytes: int = QUEUE_BYTES,
        # Timeouts
        connect_timeout: float = CONNECT_TIMEOUT,
        retry_delay: float = RETRY_DELAY,
        retry_max: float = RETRY_MAX,
        ping_interval: float = PING_INTERVAL,
        backfill_timeout: float = BACKFILL_TIMEOUT,
        backfill_rounds: int = BACKFILL_ROUNDS,
    ) -> None:
        if from_block is not None and from_block < 0:
            raise ConfigError(f"from_block must be >= 0: {from_block}")
        super().__init__(
            urls,
            stream,
            queue_items=queue_blocks,
            queue_bytes=queue_bytes,
            max_frame_bytes=max_frame_bytes,
            connect_timeout=connect_timeout,
            retry_delay=retry_delay,
            retry_max=retry_max,
            ping_interval=ping_interval,
        )
        self.trust = frozenset(signer_address(a) for a in trust)
        self.backfill = backfill
        self.max_frame_bytes = max_frame_bytes
        self.max_payload_bytes = max_payload_bytes
        self.stale_positions = stale_positions
        self.backfill_timeout = backfill_timeout
        self.backfill_rounds = backfill_rounds
        self.backfilled = 0  # blocks fetched over JSON-RPC
        self._seen = Dedup(dedup_entries)  # queued or delivered: later copies are dropped
        self._delivered = Dedup(dedup_entries)  # yielded, frames and backfilled blocks alike
        self._positions = Positions(from_block)
        self._high: int | None = None  # highest position delivered
        self._accepted_next = from_block  # first position after the last one queued
        self._last_identity: bytes | None = None  # the last frame queued, for resuming
        self._floor = from_block  # nothing below it is wanted (first block queued if None)

    # --- the consumer side ----------------------------------------------------------------
    async def _hand_over(self, item: _Queued) -> AsyncIterator[FeedBlock]:
        block = self._open(item)
        if block is None:
            return  # dropped and counted; its height is backfilled as a gap
        if not self._delivered.add(bytes.fromhex(block.hash[2:])):
            self.duplicates += 1  # backfilled while this copy waited in the queue
            return
        gap = self._positions.gap_before(block.number)
        if gap is not None and self.backfill:
            async for b in self._backfill(item.link, gap):
                yield b
        if self._high is not None and block.number <= self._high:
            # Every height up to the highest delivered one is replaced after a
            # reorg, not only the first: next-expected alone would miss the rest.
            block = replace(block, reorg=True)
        self._deliver(block.number)
        yield block

    def _deliver(self, position: int) -> None:
        self._positions.delivered(position)
        if self._high is None or position > self._high:
            self._high = position

    def _resume_point(self) -> str:
        return "their backlogs"

    # --- the links' side: called from their read loops, never blocking -------------------
    def _wants(self) -> list[Want]:
        after = self._last_identity if self._accepted_next is not None else None
        return [Want(self.stream, from_position=self._accepted_next, after=after)]

    def _on_gap(self, link: FeedLink, stream: str, gap: Gap) -> None:
        # Only said, not signed: what is backfilled is what the next frame's signed position
        # shows missing (``Positions.gap_before``), so a parent that lies about its backlog
        # cannot send the subscriber after blocks that do not exist.
        log.info(
            "%s: blocks %d..%d are past its backlog; backfilled once a frame follows",
            link.name,
            gap.start,
            gap.end - 1,
        )

    def on_frame(self, link: FeedLink, raw: bytes) -> None:
        arrived_us = time.time_ns() // 1000
        if self._refused(link):
            return
        try:
            frame = decode(raw, self.max_frame_bytes)
        except FrameError as exc:
            self._drop(link, exc.reason, exc)
            return
        if frame.stream != self.stream:
            self._drop(link, "stream", frame.stream)
            return
        if frame.kind != KIND_BLOCK:
            self._drop(link, "kind", frame.kind)
            return
        if frame.identity in self._seen:
            self.duplicates += 1
            return
        position = frame.position
        floor, ahead = self._floor, self._accepted_next
        if floor is not None and (
            position < floor or (ahead is not None and position + self.stale_positions < ahead)
        ):
            # Below what was asked for, or past any reorg: a parent's replay of frames it
            # took in late, never a block this subscriber lacks.
            self._drop(link, "stale", position)
            return
        if self._full():
            return
        try:
            origin = signer(frame)
        except FrameError as exc:
            self._drop(link, exc.reason, exc)
            return
        if self.trust and origin not in self.trust:
            self._drop(link, "untrusted", "0x" + origin.hex())
            return
        self._seen.add(frame.identity)
        self._last_identity = frame.identity
        origin_hex = "0x" + origin.hex()
        self.signers.add(origin_hex)
        if floor is None:
            self._floor = position
        if self._accepted_next is None or position >= self._accepted_next:
            self._accepted_next = position + 1
        # Unpacked by the consumer: the read loop stays quick (a parent says bye to a
        # child that reads slowly) and the queue holds compressed bytes.
        self._enqueue(_Queued(link, frame, origin_hex, arrived_us, len(raw)))

    def _open(self, item: _Queued) -> FeedBlock | None:
        """The block of a queued frame, unpacked within ``max_payload_bytes``; None (and
        counted) for a payload that does not unpack or is not a block and its receipts."""
        frame = item.frame
        try:
            plain = unpack(frame, self.max_payload_bytes)
            block_json, receipts_json = split_block_payload(plain)
            block = orjson.loads(block_json)
            receipts = orjson.loads(receipts_json)
        except FrameError as exc:
            self._drop(item.link, exc.reason, exc)
            return None
        except orjson.JSONDecodeError as exc:
            self._drop(item.link, "payload", exc)
            return None
        if not isinstance(block, dict) or not isinstance(receipts, list | None):
            self._drop(item.link, "payload", "block is not an object or receipts not a list")
            return None
        return FeedBlock(
            number=frame.position,
            hash="0x" + frame.identity.hex(),
            tx_count=_tx_count(block),
            latency_ms=(item.arrived_us - frame.origin_us) / 1000,
            verified=True,
            reorg=False,
            block=block,
            receipts=receipts,
            origin=item.origin,
        )

    # --- backfill over JSON-RPC -----------------------------------------------------------
    async def _backfill(self, first: FeedLink, gap: Gap) -> AsyncIterator[FeedBlock]:
        """The blocks of ``gap``, in order, from ``first``'s endpoint or another link's."""
        log.info("backfilling blocks %d..%d over JSON-RPC", gap.start, gap.end - 1)
        for n in range(gap.start, gap.end):
            block, receipts = await self._fetch(first, n)
            h = block["hash"]
            identity = bytes.fromhex(h[2:])
            self._seen.add(identity)
            reorg = self._high is not None and n <= self._high
            self._deliver(n)
            if not self._delivered.add(identity):
                self.duplicates += 1  # a height a reorg left as it was
                continue
            self.backfilled += 1
            yield FeedBlock(n, h, _tx_count(block), None, False, reorg, block, receipts, None)

    async def _fetch(self, first: FeedLink, n: int) -> tuple[dict[str, Any], list[Any] | None]:
        return await in_rounds(
            [first] + [link for link in self.links if link is not first],
            lambda link: self._fetch_from(rpc_url(link.url), n),
            rounds=self.backfill_rounds,
            retry_delay=self.retry_delay,
            retry_max=self.retry_max,
            failed=f"block {n} could not be fetched",
        )

    async def _fetch_from(self, url: str, n: int) -> tuple[dict[str, Any], list[Any] | None]:
        """Block ``n`` with its transactions, and its receipts (None if the node has none),
        in one JSON-RPC batch. ``ValueError`` for an answer without the block."""
        http = self._session()
        tag = hex(n)
        body = orjson.dumps(
            [
                {
                    "jsonrpc": "2.0",
                    "id": 0,
                    "method": "eth_getBlockByNumber",
                    "params": [tag, True],
                },
                {"jsonrpc": "2.0", "id": 1, "method": "eth_getBlockReceipts", "params": [tag]},
            ]
        )
        headers = {"Content-Type": "application/json"}
        async with (
            asyncio.timeout(self.backfill_timeout),
            http.post(url, data=body, headers=headers) as resp,
        ):
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            raw = await resp.content.read(self.max_payload_bytes + 1)
            while len(raw) <= self.max_payload_bytes and not resp.content.at_eof():
                more = await resp.content.read(self.max_payload_bytes + 1 - len(raw))
                if not more:
                    break
                raw += more
        if len(raw) > self.max_payload_bytes:
            raise ValueError(f"answer larger than {self.max_payload_bytes} bytes")
        answers = orjson.loads(raw)  # JSONDecodeError is a ValueError
        if not isinstance(answers, list):
            raise ValueError(f"not a batch answer: {raw[:200]!r}")
        by_id = {a["id"]: a for a in answers if isinstance(a, dict) and a.get("id") in (0, 1)}
        block = by_id.get(0, {}).get("result")
        if not isinstance(block, dict):
            raise ValueError(f"no block {n}: {by_id.get(0)!r:.200}")
        h, number = block.get("hash"), block.get("number")
        if not isinstance(h, str) or len(h) != 66 or not isinstance(number, str):
            raise ValueError(f"block {n} answered as {number!r} {h!r}")
        if int(number, 16) != n:  # int() and fromhex() raise ValueError for non-hex
            raise ValueError(f"block {n} answered as block {number}")
        bytes.fromhex(h[2:])
        receipts = by_id.get(1, {}).get("result")
        return block, receipts if isinstance(receipts, list) else None


def subscribe(
    urls: str | Sequence[str],
    stream: str,
    *,
    from_block: int | None = None,
    trust: Sequence[str] = (),
    max_frame_bytes: int = MAX_FRAME_BYTES,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    backfill: bool = True,
) -> AsyncGenerator[FeedBlock, None]:
    """Each block of ``stream`` once, in order, from the nodes at ``urls`` (see the module
    docstring); closing the generator stops every link."""
    return Subscription(
        urls,
        stream,
        from_block=from_block,
        trust=trust,
        max_frame_bytes=max_frame_bytes,
        max_payload_bytes=max_payload_bytes,
        backfill=backfill,
    ).closing()


async def print_blocks(
    urls: Sequence[str],
    stream: str,
    *,
    from_block: int | None = None,
    trust: Sequence[str] = (),
    count: int | None = None,
    max_seconds: float | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """``chainrelay subscribe``: one JSON line per block on ``out``, until ``count`` blocks
    or ``max_seconds``; warnings and the drop counters on ``err``. Returns the exit code."""
    sub = Subscription(urls, stream, from_block=from_block, trust=trust)
    return await print_items(
        sub,
        "blocks",
        _block_line,
        lambda b: b.origin,
        trusted=bool(trust),
        count=count,
        max_seconds=max_seconds,
        out=out,
        err=err,
    )


def _block_line(b: FeedBlock) -> dict[str, object]:
    """One block as ``chainrelay subscribe`` prints it."""
    return {
        "number": b.number,
        "hash": b.hash,
        "txs": b.tx_count,
        "latency_ms": None if b.latency_ms is None else round(b.latency_ms, 3),
        "verified": b.verified,
        "reorg": b.reorg,
    }
