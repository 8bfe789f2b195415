"""Warming the memory cache with each block the follower fetched: the block (full and
light, by hash and by number), its transactions and its receipts, under the keys
``policy.plan`` gives a client's same request, so a dapp's reads right after a new block
are hits from the first one.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from chainrelay.chain.events import BlockEvent
from chainrelay.chain.fetch import RawBlock
from chainrelay.chain.head import HeadTracker
from chainrelay.metrics import Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import Entry, MemoryCache
from chainrelay.rpc.policy import Finality

log = logging.getLogger(__name__)


class CacheWarmer:
    def __init__(self, head: HeadTracker, cache: MemoryCache, metrics: Metrics) -> None:
        self.head = head
        self.cache = cache
        self.metrics = metrics

    def warm(self, ev: BlockEvent, raw: RawBlock) -> None:
        """Store what a dapp asks right after a new block. Never in the way of delivery: a
        failure is logged and counted, and the reads go upstream as misses."""
        try:
            self._warm_cache(ev, raw)
        except Exception:
            log.exception("block %d %s: warming the cache failed", ev.number, ev.hash)
            self.metrics.feed_problems.labels("warm_failed").inc()

    def _warm_cache(self, ev: BlockEvent, raw: RawBlock) -> None:
        h, n = ev.hash, ev.number
        light_raw = orjson.dumps(raw.light)
        self._put("eth_getBlockByHash", [h, True], raw.block, n, h)
        self._put("eth_getBlockByHash", [h, False], light_raw, n, h)
        # Keyed by hash, so "latest" (resolved by the head) and the number share this entry.
        self._put("eth_getBlockByNumber", [hex(n), True], raw.block, n, h)
        self._put("eth_getBlockByNumber", [hex(n), False], light_raw, n, h)
        for tx in ev.block.get("transactions") or ():
            if isinstance(tx, dict) and isinstance(tx.get("hash"), str):
                self._put("eth_getTransactionByHash", [tx["hash"]], orjson.dumps(tx), n, h)
        if raw.receipts is not None and raw.receipts_raw is not None:
            self._put("eth_getBlockReceipts", [hex(n)], raw.receipts_raw, n, h)
            for r in raw.receipts:
                tx_hash = r.get("transactionHash")
                if isinstance(tx_hash, str):
                    self._put("eth_getTransactionReceipt", [tx_hash], orjson.dumps(r), n, h)
        self.metrics.cache_bytes.set(self.cache.bytes)

    def _put(self, method: str, params: list[Any], value: bytes, n: int, h: str) -> None:
        view = self.head.view
        p = policy.plan(method, params, view)
        if p.key is None or p.finality is Finality.REALTIME or p.finality is Finality.NEVER:
            return
        final = n <= view.finalized
        if value in (b"null", b"[]", b'"0x"') and not final:
            return  # the caching rules: empty answers only for final blocks
        a_num, a_hash = -1, None
        if not final and (p.block_hash is not None or p.validate_canonical):
            a_num, a_hash = n, h  # hidden once the block is reorged away, as rpc stores it
        self.cache.put(p.key, Entry(value, 0.0, a_num, a_hash))
