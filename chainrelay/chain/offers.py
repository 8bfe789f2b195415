"""Blocks handed to the follower whole, from elsewhere than this node's upstreams (a relay
tree frame): when the head reaches one, the fetch takes it from here with no upstream call.

Held for the reorg window only, and bounded in bytes: the oldest offer goes first.
"""

from __future__ import annotations

from typing import Any

from chainrelay import defaults

# (eth_getBlockByHash(h, true) parsed, its raw result, eth_getBlockReceipts' raw result or None)
Offer = tuple[dict[str, Any], bytes, bytes | None]


class OfferedBlocks:
    def __init__(self, window: int, max_bytes: int = defaults.OFFERED_MAX_BYTES) -> None:
        self.window = window
        self.max_bytes = max_bytes
        self.blocks: dict[str, Offer] = {}  # by block hash, oldest first
        self.bytes = 0  # their raw bytes, bounded by max_bytes

    def offer(self, block: dict[str, Any], block_raw: bytes, receipts_raw: bytes | None) -> None:
        """A block and its receipts as an upstream answered them (``block_raw``:
        eth_getBlockByHash(h, true)'s result; ``receipts_raw``: eth_getBlockReceipts' or
        None). A block without a hash, or offered already, is ignored."""
        block_hash = block.get("hash")
        if not isinstance(block_hash, str) or block_hash in self.blocks:
            return
        offered = self.blocks
        offered[block_hash] = (block, block_raw, receipts_raw)
        self.bytes += _offer_size(block_raw, receipts_raw)
        while offered and (len(offered) > self.window or self.bytes > self.max_bytes):
            self.take(next(iter(offered)))

    def take(self, block_hash: str) -> Offer | None:
        """The block offered with ``block_hash``, no longer held; None if none was."""
        got = self.blocks.pop(block_hash, None)
        if got is not None:
            self.bytes -= _offer_size(got[1], got[2])
        return got


def _offer_size(block_raw: bytes, receipts_raw: bytes | None) -> int:
    # The parsed block held beside the raw bytes costs a few times as much again; the bound
    # counts raw bytes, which are what a frame delivers.
    return len(block_raw) + (len(receipts_raw) if receipts_raw is not None else 0)
