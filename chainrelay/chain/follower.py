"""The block follower: every new canonical block fetched once, in chain order, for everyone
who follows blocks on this node (eth_subscribe clients, eth_newFilter filters, the relay
tree's origin).

After each head change the follower fetches the full block and its receipts
(``chain.fetch``), one block at a time, warms the memory cache with what they answer
(``chain.warm``), and hands listeners each block as soon as it is fetched: first the
blocks a reorg removed (newest first, logs marked removed) together with the first new
block, then each further new block (oldest first). What to retract and fetch is decided
by ``chain.blockorder`` against the head tracker's canonical chain, which the tracker
links by parent hash across missed heads and reconnected head streams. Head listeners get
pushed headers ahead of the fetch (``chain.announce``).

One block never stops the follower: a failure while warming the cache is logged and
counted, never in the way of delivery; a block no upstream serves after
``feed_block_passes`` passes is given up (logged, counted in
``chainrelay_block_feed_problems``) and the follower moves on. For reorgs it keeps only
each delivered block's number, hash and logs, and only above the finalized block.

Whether it follows at all is ``chain.followmode``'s decision; the logs of the blocks it
delivers are held for eth_getLogs (``chain.logstore``); pending transactions come from their
own upstream stream (``chain.pending``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from typing import Any

from chainrelay import defaults
from chainrelay.chain.announce import HeadAnnouncer
from chainrelay.chain.blockorder import DeliveredChain
from chainrelay.chain.events import (
    BlockEvent,
    BlockListener,
    FetchedListener,
    HeadListener,
    kept,
    removed,
)
from chainrelay.chain.fetch import BlockFetcher, FollowerReads, RawBlock, Unavailable
from chainrelay.chain.fill import RECEIPT, BlockFiller
from chainrelay.chain.followmode import FOLLOWER_SERVED, FollowMode
from chainrelay.chain.head import Header, HeadTracker
from chainrelay.chain.logstore import Held, LogStore, held_logs_steps
from chainrelay.chain.offers import OfferedBlocks
from chainrelay.chain.pending import PendingListener, PendingStream
from chainrelay.chain.warm import CacheWarmer
from chainrelay.chain.windowfill import WindowFill
from chainrelay.config import SubscriptionsConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc.cache import MemoryCache
from chainrelay.server.peer import detached
from chainrelay.slices import drive, let_go
from chainrelay.upstreams.pool import UpstreamPool

log = logging.getLogger(__name__)

# Logs made ready for the log store between two looks at the slice's clock (~0.1 ms).
HELD_STEP = 64


class BlockFollower:
    def __init__(
        self,
        pool: UpstreamPool,
        head: HeadTracker,
        cache: MemoryCache,
        metrics: Metrics,
        cfg: SubscriptionsConfig,
        *,
        window: int,
        offered_max_bytes: int,
        reads: FollowerReads | None = None,
        logs: LogStore | None = None,
    ) -> None:
        """``cfg``: when to follow and how hard to try a block; ``window``: ``[head]``'s
        reorg window; ``offered_max_bytes``: what the relay tree's offered blocks may hold;
        ``reads``: the RPC pipeline, which the follower reads through (clients join its calls);
        ``logs``: where the delivered and filled blocks' logs are held (one of the default
        size if not given)."""
        self.pool = pool
        self.head = head
        self.metrics = metrics
        self.cfg = cfg
        self.mode = FollowMode(cfg.follow, cfg.follow_recent_blocks)
        self.offers = OfferedBlocks(window, offered_max_bytes)
        self.fetcher = BlockFetcher(pool, head, metrics, self.offers, cfg, reads=reads)
        self.warmer = CacheWarmer(head, cache, metrics)
        self.logs = logs if logs is not None else LogStore(head.view, defaults.CACHE_LOGS_BYTES)
        self.filler = (
            BlockFiller(
                head,
                self.warmer,
                reads,
                metrics,
                max_fills=cfg.max_block_fills,
                remembered=cfg.filled_blocks_remembered,
                on_logs=self._hold_filled,
            )
            if reads is not None
            else None
        )
        # The recent window behind each run's first block, filled when clients read there.
        self.window = WindowFill(
            cfg.fill_window_blocks if self.filler is not None else 0, cfg.fill_window_after_misses
        )
        self.heads = HeadAnnouncer()
        self.pending = PendingStream(pool, metrics, max_message=cfg.pending_max_message)
        # Failed passes per block (number, hash) not delivered yet.
        self._passes: dict[tuple[int, str], int] = {}
        # Hashes of the blocks fetched lately (a window's worth) or under way: the follower
        # warms their cache itself, so a client's miss there fills nothing (a fill would read
        # and decode the block's receipts again, a second 2 MB, for nothing).
        self._taken: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._holding: set[asyncio.Task[None]] = set()
        self.order: DeliveredChain[BlockEvent] = DeliveredChain(window)
        self._listeners: list[BlockListener] = []
        self._fetched_listeners: list[FetchedListener] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._started = False

    # --- listeners -------------------------------------------------------------------
    def add_listener(self, fn: BlockListener) -> None:
        """Call ``fn`` with each head change's events; ``fn`` must return at once."""
        self._listeners.append(fn)
        self._follow()

    def remove_listener(self, fn: BlockListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)
        if not self._wanted():
            self._unfollow()

    def add_fetched_listener(self, fn: FetchedListener) -> None:
        """Call ``fn`` with each block as fetched, with its raw answers (the relay tree's
        origin publishes them); ``fn`` must return at once."""
        self._fetched_listeners.append(fn)

    def add_head_listener(self, fn: HeadListener) -> None:
        """Call ``fn`` with each new head's pushed payload as soon as the head is adopted
        (see ``chain.announce``); ``fn`` must return at once. Only while the follower
        follows blocks (a block listener is there): the fetch keeps heads in order."""
        self.heads.add_listener(fn)

    def remove_head_listener(self, fn: HeadListener) -> None:
        self.heads.remove_listener(fn)

    @property
    def pending_available(self) -> bool:
        """Whether pending transactions can be followed (a WebSocket upstream is there)."""
        return self.pending.available

    def add_pending_listener(self, fn: PendingListener) -> None:
        """Call ``fn`` with each pending transaction hash the upstream stream reports."""
        self.pending.add_listener(fn)

    def remove_pending_listener(self, fn: PendingListener) -> None:
        self.pending.remove_listener(fn)

    # --- what others hand in or ask --------------------------------------------------
    def offer(self, block: dict[str, Any], block_raw: bytes, receipts_raw: bytes | None) -> None:
        """A block and its receipts from elsewhere than this node's upstreams (a relay tree
        frame): when the head reaches it, the follower takes it with no upstream call."""
        self.offers.offer(block, block_raw, receipts_raw)

    def fill(self, method: str, number: int, block_hash: str) -> None:
        """Called by the RPC pipeline when a client's receipt or transaction read went
        upstream and named its block: the rest of that block is brought in
        (``chain.fill``)."""
        if self.filler is not None and block_hash not in self._taken:
            self.filler.note(method, number, block_hash)
        if method == RECEIPT:
            self.note_unheld(number, number)

    def note_unheld(self, low: int, high: int) -> None:
        """Called when a client's read of blocks ``low``..``high`` found data this node does
        not hold (a receipt that went upstream, an eth_getLogs window reaching blocks whose
        logs are not held): the first such read of the window behind this run's first
        block has that window's receipts filled (``chain.windowfill``)."""
        numbers = self.window.due(low, high)
        if numbers is not None and self.filler is not None:
            self.filler.fill_window(numbers, self._taken.__contains__, self.cfg.fill_window_at_once)

    def note_miss(self, method: str) -> None:
        """Called by the RPC pipeline on a cache miss of ``method``: a read of block data
        makes an automatic follower follow at once, for ``follow_recent`` blocks (reads that
        hit are counted at each head instead: ``FollowMode.note_reads``)."""
        if not self.mode.note_miss(method, self.head.view.number):
            return
        worker = self._worker
        if worker is None or worker.done():
            self._follow()

    def _wanted(self) -> bool:
        return self.mode.wanted(bool(self._listeners), self.head.view.number)

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        self.head.listeners.append(self._on_head)
        if self.mode.always or self._listeners:
            self._follow()
        self.pending.start()

    async def stop(self) -> None:
        self._started = False
        with contextlib.suppress(ValueError):
            self.head.listeners.remove(self._on_head)
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
        pending = self.pending.stop()
        tasks = [t for t in (worker, pending) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.filler is not None:
            await self.filler.stop()

    def _follow(self, after: tuple[int, str] | None = None) -> None:
        """Start following with the block after ``after`` (number, hash; default: the head
        now)."""
        if not self._started or (self._worker is not None and not self._worker.done()):
            return
        # Listeners get the blocks after the head they joined at, as from a node's newHeads.
        view = self.head.view
        number, block_hash = after if after is not None else (view.number, view.hash)
        self.order.start_after(number)
        self.heads.reset(number, block_hash)
        self.window.following_after(number)
        self._worker = detached(self._run(), name="block-feed")

    def _unfollow(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def _on_head(self, added: list[Header], gone: list[Header]) -> None:
        # Called inside the head tracker's update: a wake-up for the worker, and at most one
        # early header for head listeners (one pass, no await).
        self._wake.set()
        worker = self._worker
        if self.mode.auto:
            self.mode.note_reads(self.metrics.answered(FOLLOWER_SERVED), self.head.view.number)
            if not self._wanted():
                if worker is not None:
                    self._unfollow()  # nobody listens and no client read a block for a while
                return
            if worker is None or worker.done():
                # Clients read what an earlier run warmed: from the first block just added.
                first = added[0] if added and not gone else None
                self._follow((first.number - 1, first.parent_hash) if first else None)
                worker = self._worker
        if len(added) == 1 and not gone and self.heads.listeners:
            if worker is not None and not worker.done():
                h = added[0]
                self.heads.announce(h, self.head.pushed.get(h.hash))

    # --- the worker ------------------------------------------------------------------
    async def _run(self) -> None:
        behind = False
        while True:
            if behind:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.cfg.feed_fetch_retry_delay)
            else:
                await self._wake.wait()
            self._wake.clear()
            try:
                behind = not await self._catch_up()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("block feed failed; retrying at the next head")
                behind = True

    async def _catch_up(self) -> bool:
        """Deliver until the delivered chain is the canonical chain, each block as soon as
        it is fetched; False: a block could not be fetched yet (tried again shortly)."""
        while True:
            view = self.head.view
            self.order.prune_final(view.finalized)
            step = self.order.step(view.canonical, view.number)
            if step.skipped:
                log.warning(
                    "block feed fell %d block(s) behind its window: never delivered",
                    step.skipped,
                )
                self.metrics.feed_problems.labels("gap").inc(step.skipped)
            events = [removed(ev) for ev in step.retract]
            complete = True
            for number, block_hash in step.fetch:
                self._take(block_hash)
                try:
                    event, raw = await self.fetcher.fetch(number, block_hash)
                except Unavailable:
                    self._taken.pop(block_hash, None)  # a client's miss may fill it
                    if self._give_up(number, block_hash):
                        continue
                    complete = False
                    break
                if self.head.view.canonical.get(number) != block_hash:
                    break  # the chain moved while we fetched: step again
                if not self.order.links(number, event.block.get("parentHash", "")):
                    complete = False  # the tracker has not linked this fork yet
                    break
                self._passes.pop((number, block_hash), None)
                await self.warmer.warm(event, raw)
                # Its logs made ready for the log store and the reorg window, in slices.
                held = await drive(held_logs_steps(event.logs, block_hash, HELD_STEP))
                if self.head.view.canonical.get(number) != block_hash:
                    break  # reorged away while the cache was warmed: step again
                for fetched in self._fetched_listeners:
                    try:
                        fetched(event, raw.block, raw.receipts_raw)
                    except Exception:
                        log.exception("fetched-block listener failed")
                if self.heads.delivered(number, block_hash):
                    event = dataclasses.replace(event, announced=True)
                # What a reorg needs of it, no more: the block and header are big. Its logs'
                # JSON is the held logs' joined: the same bytes as encoding them again.
                logs_raw = None
                if held is not None:
                    logs_raw = b"[" + b",".join(raw for _, _, raw in held[0]) + b"]"
                self.order.delivered(number, block_hash, kept(event, logs_raw))
                events.append(event)
                self._deliver(events, {block_hash: held})
                events = []
                # What the block was decoded into, freed a slice at a time rather than all
                # at once when these names are bound again (unless a listener holds it).
                decoded = _decoded(event, raw)
                del event, raw
                await let_go(decoded)
            else:
                if events:
                    self._deliver(events)
                return True
            if events:
                self._deliver(events)
            if not complete:
                return False

    def _take(self, block_hash: str) -> None:
        taken = self._taken
        taken[block_hash] = None
        taken.move_to_end(block_hash)
        while len(taken) > self.order.window:
            taken.popitem(last=False)

    def _hold_filled(self, number: int, block_hash: str, logs: list[dict[str, Any]]) -> None:
        """The logs of a block a client's miss filled, held in slices (``LogStore.hold`` of
        ~3,000 logs at once is ~3.5 ms)."""
        task = detached(self._hold_sliced(number, block_hash, logs), name="hold-filled-logs")
        self._holding.add(task)
        task.add_done_callback(self._holding.discard)

    async def _hold_sliced(self, number: int, block_hash: str, logs: list[dict[str, Any]]) -> None:
        ready = await drive(held_logs_steps(logs, block_hash, HELD_STEP))
        if ready is not None:
            self.logs.hold(number, block_hash, logs, ready)

    def _give_up(self, number: int, block_hash: str) -> bool:
        """Count a failed pass over a block; after ``feed_block_passes`` of them, record it as
        delivered without telling listeners, so the blocks after it are not held forever."""
        key = (number, block_hash)
        passes = self._passes[key] = self._passes.get(key, 0) + 1
        if len(self._passes) > self.order.window:
            del self._passes[next(iter(self._passes))]
        if passes < self.cfg.feed_block_passes:
            return False
        del self._passes[key]
        log.error(
            "block %d %s: no upstream gave it in %d passes; given up, listeners skip it",
            number,
            block_hash,
            passes,
        )
        self.metrics.feed_problems.labels("block_given_up").inc()
        self.heads.passed_over(number, block_hash)
        self.order.delivered(number, block_hash, BlockEvent(number, block_hash, {}, {}, [], False))
        return True

    def _deliver(
        self, events: list[BlockEvent], ready: dict[str, Held | None] | None = None
    ) -> None:
        self.logs.note(events, ready)
        for fn in list(self._listeners):
            try:
                fn(events)
            except Exception:
                log.exception("block listener failed")


def _decoded(event: BlockEvent, raw: RawBlock) -> list[list[Any]]:
    """The large lists a fetched block was decoded into: its transactions, its receipts
    (with their logs), the event's logs."""
    txs = event.block.get("transactions")
    return [x for x in (txs, raw.receipts, event.logs) if isinstance(x, list)]
