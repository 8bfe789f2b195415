"""Block frames from the relay tree, taken into this node as if an upstream pushed them.

Each accepted block frame is unpacked (bounded), its block and receipts offered to the
block follower (which then warms the cache with them, byte for byte, and tells eth_subscribe
clients and filters, with no upstream call) and its header pushed to the head tracker. A
frame for a new block at a height already seen is a reorg there, handled exactly as an
upstream's: the tracker links the fork by parent hash (headers of earlier frames need no
fetch), the follower retracts the old blocks, subscribers get removed logs.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from chainrelay.chain.events import geth_header
from chainrelay.chain.follower import BlockFollower
from chainrelay.chain.head import Header, HeadTracker
from chainrelay.metrics import Metrics
from chainrelay.tree import frame as feedframe
from chainrelay.tree.frame import Frame, FrameError
from chainrelay.upstreams.pool import UpstreamPool

log = logging.getLogger(__name__)


class FeedSource:
    def __init__(
        self,
        follower: BlockFollower,
        head: HeadTracker,
        pool: UpstreamPool,
        metrics: Metrics,
        *,
        max_payload_bytes: int,
    ) -> None:
        self.follower = follower
        self.head = head
        self.pool = pool
        self.metrics = metrics
        self.max_payload_bytes = max_payload_bytes

    def on_frame(self, frame: Frame, source: str) -> None:
        """``source``: the parent that sent it, whose upstream is then credited with the
        block (a miss for it goes where it is known to be)."""
        if frame.kind != feedframe.KIND_BLOCK:
            return
        try:
            block_raw, receipts_raw = feedframe.split_block_payload(
                feedframe.unpack(frame, self.max_payload_bytes)
            )
            block = orjson.loads(block_raw)
        except (FrameError, orjson.JSONDecodeError) as exc:
            self._bad(frame, str(exc))
            return
        if (
            not isinstance(block, dict)
            or block.get("hash") != "0x" + frame.identity.hex()
            or block.get("number") != hex(frame.position)
        ):
            self._bad(frame, "block does not match the frame's header")
            return
        self.follower.offer(block, block_raw, None if receipts_raw == b"null" else receipts_raw)
        # Its newHeads payload: the header the feeder sent ahead of it, if it came (kept
        # even when it could not be announced early: a worker's heads are then its
        # feeder's, whichever came first), else geth's header fields of the block.
        header = self.head.pushed.get(block["hash"]) or geth_header(block)
        # The tracker asks this upstream for parents it lacks (a gap): the parent that sent
        # the frame when it is one of the upstreams, else any live one.
        upstreams = self.pool.upstreams
        u = next((x for x in upstreams if x.name == source), None)
        if u is None:
            u = next((x for x in upstreams if x.healthy), upstreams[0])
        self.head.push_header(u, header)

    def on_head(self, header: dict[str, Any]) -> None:
        """A new head's header from the node's feeder worker, ahead of its block's frame:
        announced to this worker's newHeads subscribers now when it is the next head they
        are due (as the feeder announced it to its own); its block follows in a frame,
        whose event then comes marked announced."""
        h = Header.parse(header)
        if h is None:
            return
        # Kept as pushed: its block's frame then goes out with it, announced early or not.
        self.head.keep_pushed(h, header)
        announcer = self.follower.heads
        if announcer.listeners:  # as the follower's own announcing
            announcer.announce(h, header)

    def _bad(self, frame: Frame, why: str) -> None:
        # Signed by a trusted origin yet unusable: forwarded already, never applied here.
        self.metrics.feed_frames.labels(frame.stream, "payload").inc()
        log.warning("feed frame %s at %d unusable: %s", frame.stream, frame.position, why)
