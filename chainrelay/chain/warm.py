"""Warming the memory cache with a block's data: the block (full and light, by hash and by
number), its transactions and its receipts, under the keys ``policy.plan`` gives a client's
same request, so a dapp's reads right after a new block are hits from the first one.

Used for each block the follower fetched (``warm``), and for the parts of a block that a
client's miss brought in (``chain.fill``: ``warm_block``, ``warm_receipts``). A block of a
thousand transactions is a few thousand entries: they are stored a slice of the event loop
at a time (``slices.Slicer``), the loop free between slices, so clients waiting on it are
not held up by the whole block at once. Each slice first checks that the block is still one
the node can vouch for (canonical, or final), and an entry keyed by number is stored only
under the hash of the block it came from. A transaction or receipt is stored as the exact
JSON the upstream sent for it when the answer was decoded piecewise (``Answer.parts``),
else encoded again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from chainrelay.chain.events import BlockEvent
from chainrelay.chain.fetch import RawBlock, light_block
from chainrelay.chain.head import HeadTracker
from chainrelay.metrics import Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import MemoryCache, stored_entry
from chainrelay.slices import Slicer

log = logging.getLogger(__name__)

# Entries stored between two looks at the slice's clock: ~0.1 ms of work (planning an
# entry's key and storing it: 2-5 µs; encoding a transaction or receipt again, when its
# exact JSON is not at hand: ~5 µs more).
WARM_STEP = 16

# (method, params, the answer's raw bytes, or the decoded answer to encode)
Put = tuple[str, list[Any], bytes | None, Any]


class CacheWarmer:
    def __init__(self, head: HeadTracker, cache: MemoryCache, metrics: Metrics) -> None:
        self.head = head
        self.cache = cache
        self.metrics = metrics

    async def warm(self, ev: BlockEvent, raw: RawBlock) -> None:
        """Store what a dapp asks right after a new block. Never in the way of delivery: a
        failure is logged and counted, and the reads go upstream as misses."""
        puts = self._block_puts(ev.number, ev.block, raw)
        if raw.receipts is not None and raw.receipts_raw is not None:
            receipts = self._receipt_puts(
                ev.number, raw.receipts, raw.receipts_raw, raw.receipt_parts
            )
            puts = itertools.chain(puts, receipts)
        await self._warm(ev.number, ev.hash, puts)

    async def warm_block(
        self,
        number: int,
        block_hash: str,
        block: dict[str, Any],
        block_raw: bytes,
        parts: list[bytes] | None = None,
    ) -> None:
        """A full block (eth_getBlockByHash(h, true)) and each of its transactions
        (``parts``: their exact JSON, in order, when at hand)."""
        raw = RawBlock(block_raw, light_block(block), None, None, parts)
        await self._warm(number, block_hash, self._block_puts(number, block, raw))

    async def warm_receipts(
        self,
        number: int,
        block_hash: str,
        receipts: list[dict[str, Any]],
        receipts_raw: bytes,
        parts: list[bytes] | None = None,
    ) -> None:
        """A block's receipts (eth_getBlockReceipts) and each transaction's (``parts``:
        their exact JSON, in order, when at hand)."""
        puts = self._receipt_puts(number, receipts, receipts_raw, parts)
        await self._warm(number, block_hash, puts)

    def _block_puts(self, n: int, block: dict[str, Any], raw: RawBlock) -> Iterator[Put]:
        h = str(block.get("hash"))
        yield "eth_getBlockByHash", [h, True], raw.block, None
        yield "eth_getBlockByHash", [h, False], None, raw.light
        # Keyed by hash, so "latest" (resolved by the head) and the number share this entry.
        yield "eth_getBlockByNumber", [hex(n), True], raw.block, None
        yield "eth_getBlockByNumber", [hex(n), False], None, raw.light
        txs = block.get("transactions") or ()
        parts = _aligned(raw.tx_parts, txs)
        for i, tx in enumerate(txs):
            if isinstance(tx, dict) and isinstance(tx.get("hash"), str):
                part = parts[i] if parts is not None else None
                yield "eth_getTransactionByHash", [tx["hash"]], part, tx

    def _receipt_puts(
        self,
        n: int,
        receipts: list[dict[str, Any]],
        receipts_raw: bytes,
        parts: list[bytes] | None = None,
    ) -> Iterator[Put]:
        yield "eth_getBlockReceipts", [hex(n)], receipts_raw, None
        aligned = _aligned(parts, receipts)
        for i, r in enumerate(receipts):
            tx_hash = r.get("transactionHash")
            if isinstance(tx_hash, str):
                part = aligned[i] if aligned is not None else None
                yield "eth_getTransactionReceipt", [tx_hash], part, r

    async def _warm(self, n: int, h: str, puts: Iterable[Put]) -> None:
        try:
            slicer = Slicer()
            step = 0
            for method, params, value, decoded in puts:
                if step == 0 and not self.vouched(n, h):
                    return  # reorged away meanwhile: its data answers nothing now
                self._put(
                    method, params, value if value is not None else orjson.dumps(decoded), n, h
                )
                step += 1
                if step == WARM_STEP:
                    step = 0
                    await slicer.pause()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("block %d %s: warming the cache failed", n, h)
            self.metrics.feed_problems.labels("warm_failed").inc()
        finally:
            self.metrics.cache_bytes.set(self.cache.bytes)

    def vouched(self, n: int, h: str) -> bool:
        """Block ``n`` ``h`` is canonical as far as the head knows (in its window), or
        final: what the node can vouch for, and so serve."""
        view = self.head.view
        known = view.canonical.get(n)
        return known == h if known is not None else 0 <= n <= view.finalized

    def _put(self, method: str, params: list[Any], value: bytes, n: int, h: str) -> None:
        view = self.head.view
        p = policy.plan(method, params, view)
        if p.block_hash is not None and p.block_hash != h:
            return  # keyed by number, and that number names another block now
        how = policy.store_decision(
            p,
            value,
            None,
            None,  # the block is known: nothing to decode (receipts were checked on arrival)
            view,
            self.head.profile.block_time,
            block=(n, h),
        )
        if how is not None:
            self.cache.put(how.key, stored_entry(value, how))


def _aligned(parts: list[bytes] | None, items: Sequence[Any]) -> list[bytes] | None:
    """``parts`` when they are one per item (the exact JSON of each), else None."""
    return parts if parts is not None and len(parts) == len(items) else None
