"""The block feed: every new canonical block fetched once, in chain order, for everyone who
follows blocks on this node (eth_subscribe clients, eth_newFilter filters).

After each head change the feed fetches the full block and its receipts through the
upstream pool, one block at a time, warms the memory cache with what they answer, and hands
listeners each block as soon as it is fetched: first the blocks a reorg removed (newest
first, logs marked removed) together with the first new block, then each further new block
(oldest first). What to retract and fetch is decided by ``chain.blockorder`` against the
head tracker's canonical chain, which the tracker links by parent hash across missed heads
and reconnected head streams.

One block never stops the feed: a block whose receipts fail (any error, or an upstream
without ``eth_getBlockReceipts``, asked again every ``receipts_retry_blocks``) gets its logs
from ``eth_getLogs`` by block hash; a failure while warming the cache is logged and
counted, never in the way of delivery; a block no upstream serves after ``block_passes``
passes is given up (logged, counted in ``chainrelay_block_feed_problems``) and the feed
moves on. For reorgs the feed keeps only each delivered block's number, hash and logs, and
only above the finalized block.

Head listeners (the newHeads fan-out) need no fetch: a head the tracker adopts as the next
block after the last head they got, whose header an upstream pushed (``head.pushed``), is
announced to them at once, while its block and receipts are fetched; the block's event then
comes with ``announced`` set, for its logs. A head that is not the next one (a gap the
tracker walked back to fill, a reorg, a header only polled) waits for the fetch, so heads
go out in chain order, each once. The price: a client that asks for a block as soon as its
newHeads arrives may be answered before the feed has warmed the cache with it.

When the feed follows (``follow``): ``always``; ``never`` fetches only while someone
listens; ``auto`` (the default) also while clients' reads of block, transaction or receipt
data missed the cache within the last ``follow_recent`` blocks (``note_miss``, called by
the RPC pipeline on its miss path only). One eth_getBlockByHash and one
eth_getBlockReceipts per block then replace the per-transaction receipt misses and the
latest block's miss; a node nobody reads blocks from costs its upstreams only its head.

The feed's reads go through the RPC pipeline's cache and coalescer (``feed_call``) under
the keys a client's same request has, with the light block, the block by number and each
transaction's receipt derived from them as calls clients join: a client asking for the
block the moment its newHeads arrives rides on the feed's fetch.

A head's newHeads payload is the header its upstream pushed for that very block (by hash);
a head only polled gets geth's header form (``HEADER_FIELDS``), never the whole block.

Pending transaction hashes come from one ``eth_subscribe("newPendingTransactions")`` on a
WebSocket upstream, held while anyone listens, reconnected with a growing back-off when it
breaks or answers garbage. With no WebSocket upstream there is no such stream
(``pending_available`` is False).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import websockets

from chainrelay import defaults
from chainrelay.chain.blockorder import DeliveredChain
from chainrelay.chain.head import Header, HeadTracker
from chainrelay.config import FOLLOW_MODES
from chainrelay.errors import InvalidParams, UpstreamError
from chainrelay.metrics import Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import MemoryCache, stored_entry
from chainrelay.rpc.policy import HeadView
from chainrelay.server.peer import detached
from chainrelay.subscriptions.logfilter import LogFilter, logs_of_receipts
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import Upstream
from chainrelay.wire.jsonrpc import Answer

log = logging.getLogger(__name__)

# First back-off after the pending-transaction stream of a WebSocket upstream broke; it
# doubles with each failure in a row up to PENDING_RETRY_MAX, so a broken upstream is not
# hammered and a blip costs a second.
PENDING_RETRY_DELAY = 1.0
# Longest back-off of the pending stream: ten BSC blocks of pending hashes at most missed.
PENDING_RETRY_MAX = 30.0
# Error codes meaning "this upstream does not serve the method" (geth, erigon, providers).
_UNSUPPORTED = (-32601, -32604)
# The fields of a newHeads payload as geth sends it (RPCMarshalHeader; a Go map, so its
# keys come out sorted): what BSC nodes send, where no upstream pushed this block's header.
HEADER_FIELDS = tuple(
    sorted(
        (
            "baseFeePerGas",
            "blobGasUsed",
            "difficulty",
            "excessBlobGas",
            "extraData",
            "gasLimit",
            "gasUsed",
            "hash",
            "logsBloom",
            "miner",
            "mixHash",
            "nonce",
            "number",
            "parentBeaconBlockRoot",
            "parentHash",
            "receiptsRoot",
            "requestsHash",
            "sha3Uncles",
            "stateRoot",
            "timestamp",
            "transactionsRoot",
            "withdrawalsRoot",
        )
    )
)


@dataclass(frozen=True, slots=True)
class BlockEvent:
    number: int
    hash: str
    # The newHeads payload and eth_getBlockByHash(hash, true) as answered; both empty ({})
    # in removed events: the feed keeps only what a reorg needs (number, hash, logs).
    header: dict[str, Any]
    block: dict[str, Any]
    logs: list[dict[str, Any]]  # the block's logs in log-index order; "removed": True on removal
    removed: bool  # True: this block was reorged away
    announced: bool = False  # True: head listeners got this header before the block's fetch


# ``RpcService.feed_call``: (method, params, min_block, derived reads) -> the answer.
FeedCall = Callable[
    [str, list[Any], int, Sequence[tuple[str, list[Any], Callable[[Any], Any]]]], Awaitable[Answer]
]
# Reads the feed answers once it follows blocks: a miss on one of them means a client
# reads new blocks' data, which following would have made a hit.
FEED_SERVED = frozenset(
    {
        "eth_getBlockByNumber",
        "eth_getBlockByHash",
        "eth_getBlockReceipts",
        "eth_getTransactionByHash",
        "eth_getTransactionReceipt",
    }
)

BlockListener = Callable[[list[BlockEvent]], None]
# Called with each block the feed fetched (not the removed ones): its event and the bytes
# its upstream answered for the full block and its receipts (None: logs came another way).
FetchedListener = Callable[[BlockEvent, bytes, bytes | None], None]
# Called with a head's newHeads payload, as the upstream pushed it, ahead of its block.
HeadListener = Callable[[dict[str, Any]], None]
PendingListener = Callable[[str], None]


class _Unavailable(Exception):
    """No upstream could give this block now (not there yet, another fork, an error)."""


class BlockFeed:
    def __init__(
        self,
        pool: UpstreamPool,
        head: HeadTracker,
        cache: MemoryCache,
        metrics: Metrics,
        *,
        window: int = defaults.REORG_WINDOW,
        follow: str = defaults.FOLLOW_BLOCKS,
        follow_recent: int = defaults.FOLLOW_RECENT_BLOCKS,
        feed_call: FeedCall | None = None,
        fetch_retry_delay: float = defaults.FEED_FETCH_RETRY_DELAY,
        fetch_attempts: int = defaults.FEED_FETCH_ATTEMPTS,
        block_passes: int = defaults.FEED_BLOCK_PASSES,
        receipts_retry_blocks: int = defaults.FEED_RECEIPTS_RETRY_BLOCKS,
        pending_max_message: int = defaults.PENDING_MAX_MESSAGE,
        offered_max_bytes: int = defaults.OFFERED_MAX_BYTES,
    ) -> None:
        self.pool = pool
        self.head = head
        self.cache = cache
        self.metrics = metrics
        if follow not in FOLLOW_MODES:
            raise ValueError(f"follow must be one of {FOLLOW_MODES}")
        self.follow_always = follow == "always"
        self._auto = follow == "auto"
        self.follow_recent = follow_recent
        # Clients' misses keep an automatic feed following up to this block number.
        self._interest_until = -1
        self._call: FeedCall = feed_call or self._pool_call
        self.fetch_retry_delay = fetch_retry_delay
        self.fetch_attempts = fetch_attempts
        self.block_passes = block_passes
        self.receipts_retry_blocks = receipts_retry_blocks
        self.pending_max_message = pending_max_message
        # Failed passes per block (number, hash) not delivered yet.
        self._passes: dict[tuple[int, str], int] = {}
        self.order: DeliveredChain[BlockEvent] = DeliveredChain(window)
        self._listeners: list[BlockListener] = []
        self._pending_listeners: list[PendingListener] = []
        self._head_listeners: list[HeadListener] = []
        self._fetched_listeners: list[FetchedListener] = []
        # Blocks handed over whole (``offer``: a relay tree frame), by hash: the fetch takes
        # them from here instead of asking an upstream.
        self._offered: dict[str, tuple[dict[str, Any], bytes, bytes | None]] = {}
        self._offered_bytes = 0  # their raw bytes, bounded by offered_max_bytes
        self.offered_max_bytes = offered_max_bytes
        # number -> (hash, logs) of the blocks delivered lately (the reorg window): what
        # ``recent_logs`` answers eth_getLogs from.
        self._recent: dict[int, tuple[str, list[dict[str, Any]]]] = {}
        self._window = window
        # The last head whose header head listeners got, early or with its block: the next
        # head goes out early only if it is this one's child.
        self._heads_tip: tuple[int, str] = (-1, "")
        # number -> hash of heads announced early whose block is not delivered yet.
        self._announced: dict[int, str] = {}
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._pending_task: asyncio.Task[None] | None = None
        self._started = False
        # eth_getBlockReceipts is skipped below this block number: an upstream said it
        # lacks the method, and is asked again past it.
        self._receipts_from = -1

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

    def offer(self, block: dict[str, Any], block_raw: bytes, receipts_raw: bytes | None) -> None:
        """A block and its receipts as an upstream answered them (``block_raw``:
        eth_getBlockByHash(h, true)'s result; ``receipts_raw``: eth_getBlockReceipts' or
        None), from elsewhere than this node's upstreams: when the head reaches it, the
        feed takes it from here, with no upstream call. Held for the reorg window only."""
        block_hash = block.get("hash")
        if not isinstance(block_hash, str) or block_hash in self._offered:
            return
        offered = self._offered
        offered[block_hash] = (block, block_raw, receipts_raw)
        self._offered_bytes += _offer_size(block_raw, receipts_raw)
        while offered and (
            len(offered) > self._window or self._offered_bytes > self.offered_max_bytes
        ):
            self._take_offer(next(iter(offered)))

    def _take_offer(self, block_hash: str) -> tuple[dict[str, Any], bytes, bytes | None] | None:
        got = self._offered.pop(block_hash, None)
        if got is not None:
            self._offered_bytes -= _offer_size(got[1], got[2])
        return got

    def recent_logs(self, params: Any) -> bytes | None:
        """eth_getLogs answered from the blocks this feed delivered, as a JSON array, when
        every block of the range is one of them and still canonical; None (ask upstream)
        otherwise: a range reaching past them, "pending", a filter this node would refuse
        (the upstream's own error is the transparent answer), anything odd."""
        if not isinstance(params, list) or len(params) != 1:
            return None
        try:
            flt = LogFilter.parse(params[0])
        except InvalidParams:
            return None
        view = self.head.view
        recent = self._recent
        if flt.block_hash is not None:
            number = view.numbers.get(flt.block_hash)
            if number is None:
                return None
            low = high = number
        else:
            low_ = _resolve(flt.from_block, view)
            high_ = _resolve(flt.to_block, view)
            if low_ is None or high_ is None or low_ > high_ or high_ > view.number:
                return None
            low, high = low_, high_
        if high - low >= len(recent):
            return None
        out: list[dict[str, Any]] = []
        for n in range(low, high + 1):
            got = recent.get(n)
            if got is None or got[0] != view.canonical.get(n):
                return None
            out.extend(x for x in got[1] if flt.matches(x))
        return orjson.dumps(out)

    def note_miss(self, method: str) -> None:
        """Called by the RPC pipeline on a cache miss of ``method`` (never on a hit): a
        read of block data makes an automatic feed follow for ``follow_recent`` blocks."""
        if not self._auto or method not in FEED_SERVED:
            return
        self._interest_until = self.head.view.number + self.follow_recent
        worker = self._worker
        if worker is None or worker.done():
            self._follow()

    def _wanted(self) -> bool:
        return (
            self.follow_always
            or bool(self._listeners)
            or (self._auto and self.head.view.number <= self._interest_until)
        )

    def add_head_listener(self, fn: HeadListener) -> None:
        """Call ``fn`` with each new head's pushed payload as soon as the head is adopted
        (see the module docstring); ``fn`` must return at once. Only while the feed follows
        blocks (a block listener is there): the fetch is what keeps heads in order."""
        self._head_listeners.append(fn)

    def remove_head_listener(self, fn: HeadListener) -> None:
        with contextlib.suppress(ValueError):
            self._head_listeners.remove(fn)

    @property
    def pending_available(self) -> bool:
        """Whether pending transactions can be followed: only a WebSocket upstream has
        the stream."""
        return any(u.is_ws for u in self.pool.upstreams)

    def add_pending_listener(self, fn: PendingListener) -> None:
        """Call ``fn`` with each pending transaction hash the upstream stream reports."""
        self._pending_listeners.append(fn)
        if self._started and (self._pending_task is None or self._pending_task.done()):
            self._pending_task = detached(self._follow_pending(), name="pending")

    def remove_pending_listener(self, fn: PendingListener) -> None:
        with contextlib.suppress(ValueError):
            self._pending_listeners.remove(fn)
        if not self._pending_listeners and self._pending_task is not None:
            self._pending_task.cancel()
            self._pending_task = None

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._started = True
        self.head.listeners.append(self._on_head)
        if self.follow_always or self._listeners:
            self._follow()
        if self._pending_listeners:
            self._pending_task = detached(self._follow_pending(), name="pending")

    async def stop(self) -> None:
        self._started = False
        with contextlib.suppress(ValueError):
            self.head.listeners.remove(self._on_head)
        tasks = [t for t in (self._worker, self._pending_task) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._worker = self._pending_task = None

    def _follow(self) -> None:
        if not self._started or (self._worker is not None and not self._worker.done()):
            return
        # Listeners get the blocks after the head they joined at, as from a node's newHeads.
        view = self.head.view
        self.order.start_after(view.number)
        self._heads_tip = (view.number, view.hash)
        self._announced.clear()
        self._worker = detached(self._run(), name="block-feed")

    def _unfollow(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def _on_head(self, added: list[Header], removed: list[Header]) -> None:
        # Called inside the head tracker's update: a wake-up for the worker, and at most one
        # early header for head listeners (one pass, no await).
        self._wake.set()
        if self._auto and self._worker is not None and not self._wanted():
            self._unfollow()  # nobody listens and no client read a block for a while
            return
        if len(added) == 1 and not removed and self._head_listeners:
            self._announce(added[0])

    def _announce(self, h: Header) -> None:
        """Give head listeners ``h``'s pushed header now if it is the next head they are
        due; otherwise it goes out with its block, after the fetch."""
        payload = self.head.pushed.get(h.hash)
        if payload is None:
            return  # polled, not pushed: the fetch derives the header
        if self._heads_tip != (h.number - 1, h.parent_hash):
            return
        if self._worker is None or self._worker.done():
            return
        self._heads_tip = (h.number, h.hash)
        self._announced[h.number] = h.hash
        for fn in list(self._head_listeners):
            try:
                fn(payload)
            except Exception:
                log.exception("head listener failed")

    # --- the worker ------------------------------------------------------------------
    async def _run(self) -> None:
        behind = False
        while True:
            if behind:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.fetch_retry_delay)
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
            events = [_removed(ev) for ev in step.retract]
            complete = True
            for number, block_hash in step.fetch:
                try:
                    event, raw = await self._fetch(number, block_hash)
                except _Unavailable:
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
                self._warm(event, raw)
                for fetched in self._fetched_listeners:
                    try:
                        fetched(event, raw.block, raw.receipts_raw)
                    except Exception:
                        log.exception("fetched-block listener failed")
                if self._announced.pop(number, None) == block_hash:
                    event = dataclasses.replace(event, announced=True)
                else:
                    self._heads_tip = (number, block_hash)  # its header goes out with it
                # What a reorg needs of it, no more: the block and header are big.
                self.order.delivered(number, block_hash, _kept(event))
                events.append(event)
                self._deliver(events)
                events = []
            else:
                if events:
                    self._deliver(events)
                return True
            if events:
                self._deliver(events)
            if not complete:
                return False

    def _give_up(self, number: int, block_hash: str) -> bool:
        """Count a failed pass over a block; after ``block_passes`` of them, record it as
        delivered without telling listeners, so the blocks after it are not held forever."""
        key = (number, block_hash)
        passes = self._passes[key] = self._passes.get(key, 0) + 1
        if len(self._passes) > self.order.window:
            del self._passes[next(iter(self._passes))]
        if passes < self.block_passes:
            return False
        del self._passes[key]
        log.error(
            "block %d %s: no upstream gave it in %d passes; given up, listeners skip it",
            number,
            block_hash,
            passes,
        )
        self.metrics.feed_problems.labels("block_given_up").inc()
        self._announced.pop(number, None)
        self._heads_tip = (number, block_hash)
        self.order.delivered(number, block_hash, BlockEvent(number, block_hash, {}, {}, [], False))
        return True

    def _deliver(self, events: list[BlockEvent]) -> None:
        recent = self._recent
        for ev in events:
            if ev.removed:
                if recent.get(ev.number, ("",))[0] == ev.hash:
                    del recent[ev.number]
            else:
                recent[ev.number] = (ev.hash, ev.logs)
                while len(recent) > self._window:
                    del recent[min(recent)]
        for fn in list(self._listeners):
            try:
                fn(events)
            except Exception:
                log.exception("block listener failed")

    # --- fetching --------------------------------------------------------------------
    async def _fetch(self, number: int, block_hash: str) -> tuple[BlockEvent, _Raw]:
        for attempt in range(self.fetch_attempts):
            if attempt:
                await asyncio.sleep(self.fetch_retry_delay)
            if self.head.view.canonical.get(number) != block_hash:
                raise _Unavailable  # reorged away while we waited: the next step says what
            try:
                return await self._fetch_once(number, block_hash)
            except (_Unavailable, UpstreamError) as exc:
                log.debug("block %d %s not fetched (%s)", number, block_hash, exc)
        raise _Unavailable

    async def _fetch_once(self, number: int, block_hash: str) -> tuple[BlockEvent, _Raw]:
        offered = self._take_offer(block_hash)
        if offered is not None:
            got = self._from_offer(number, block_hash, *offered)
            if got is not None:
                return got
        # Client reads answered from this block, joined while it is fetched. By number
        # only while this block is the canonical one there (the key names that hash).
        derived: list[tuple[str, list[Any], Callable[[Any], Any]]] = [
            ("eth_getBlockByHash", [block_hash, False], _light_or_none),
        ]
        if self.head.view.canonical.get(number) == block_hash:
            derived += [
                ("eth_getBlockByNumber", [hex(number), True], _block_or_none),
                ("eth_getBlockByNumber", [hex(number), False], _light_or_none),
            ]
        answer = await self._call("eth_getBlockByHash", [block_hash, True], number, derived)
        block = answer.value
        if answer.error is not None or not isinstance(block, dict) or answer.result is None:
            raise _Unavailable("block")
        if block.get("hash") != block_hash:
            raise _Unavailable("another block")
        receipts, receipts_raw = await self._receipts(number, block_hash, block)
        if receipts is not None:
            logs = logs_of_receipts(receipts)
        else:
            got = await self.pool.call("eth_getLogs", [{"blockHash": block_hash}], number)
            if got.error is not None or not isinstance(got.value, list):
                raise _Unavailable("logs")
            logs = [x for x in got.value if isinstance(x, dict)]
        if any(x.get("blockHash") != block_hash for x in logs):
            raise _Unavailable("logs of another fork")
        light = _light(block)
        event = BlockEvent(number, block_hash, self._header(light), block, logs, False)
        return event, _Raw(answer.result, light, receipts, receipts_raw)

    def _from_offer(
        self,
        number: int,
        block_hash: str,
        block: dict[str, Any],
        block_raw: bytes,
        receipts_raw: bytes | None,
    ) -> tuple[BlockEvent, _Raw] | None:
        """An offered block as if fetched; None (fetch it) if it does not hold together."""
        if block.get("hash") != block_hash or block.get("number") != hex(number):
            return None
        receipts = orjson.loads(receipts_raw) if receipts_raw is not None else None
        if not isinstance(receipts, list) or any(
            not isinstance(r, dict) or r.get("blockHash") != block_hash for r in receipts
        ):
            return None  # no usable receipts: fetched the usual way
        light = _light(block)
        event = BlockEvent(
            number, block_hash, self._header(light), block, logs_of_receipts(receipts), False
        )
        return event, _Raw(block_raw, light, receipts, receipts_raw)

    async def _receipts(
        self, number: int, block_hash: str, block: dict[str, Any]
    ) -> tuple[list[dict[str, Any]] | None, bytes | None]:
        """The block's receipts, or (None, None): take its logs from eth_getLogs instead
        (the upstream lacks the method, or failed it this time)."""
        if number < self._receipts_from:
            return None, None
        try:
            answer = await self._call_receipts(number, block_hash, block)
        except UpstreamError as exc:
            answer = None
            why = str(exc)
        else:
            why = answer.error_message() if answer.error is not None else "not a list"
        if answer is not None and answer.error is None and isinstance(answer.value, list):
            if any(
                not isinstance(r, dict) or r.get("blockHash") != block_hash for r in answer.value
            ):
                raise _Unavailable("receipts of another fork")
            return answer.value, answer.result
        if answer is not None and answer.error is not None:
            if _error_code(answer.error) in _UNSUPPORTED:
                self._receipts_from = number + self.receipts_retry_blocks
                log.info(
                    "upstream lacks eth_getBlockReceipts: logs come from eth_getLogs "
                    "until block %d",
                    self._receipts_from,
                )
                return None, None
        log.warning("block %d: eth_getBlockReceipts failed (%s); logs by eth_getLogs", number, why)
        self.metrics.feed_problems.labels("receipts_fallback").inc()
        return None, None

    async def _call_receipts(self, number: int, block_hash: str, block: dict[str, Any]) -> Answer:
        """eth_getBlockReceipts under the key of a client's receipts by number (the
        pipeline asks by this block's hash), each transaction's receipt derived from it."""
        if self._call == self._pool_call or self.head.view.canonical.get(number) != block_hash:
            return await self.pool.call("eth_getBlockReceipts", [block_hash], number)
        derived = [
            ("eth_getTransactionReceipt", [tx["hash"]], _receipt_of(tx["hash"], block_hash))
            for tx in block.get("transactions") or ()
            if isinstance(tx, dict) and isinstance(tx.get("hash"), str)
        ]
        return await self._call("eth_getBlockReceipts", [hex(number)], number, derived)

    async def _pool_call(
        self,
        method: str,
        params: list[Any],
        min_block: int,
        derived: Sequence[tuple[str, list[Any], Callable[[Any], Any]]] = (),
    ) -> Answer:
        return await self.pool.call(method, params, min_block)

    def _header(self, light: dict[str, Any]) -> dict[str, Any]:
        """The newHeads payload of a block: the header an upstream pushed for this very
        block, as pushed; else geth's header fields of the block (a head only polled)."""
        pushed = self.head.pushed.get(light.get("hash", ""))
        if pushed is not None:
            return pushed
        return geth_header(light)

    # --- the cache -------------------------------------------------------------------
    def _warm(self, ev: BlockEvent, raw: _Raw) -> None:
        """Store what a dapp asks right after a new block, under the keys ``policy.plan``
        gives its requests, so those reads are hits from the first one. Never in the way of
        delivery: a failure is logged and counted, and the reads go upstream as misses."""
        try:
            self._warm_cache(ev, raw)
        except Exception:
            log.exception("block %d %s: warming the cache failed", ev.number, ev.hash)
            self.metrics.feed_problems.labels("warm_failed").inc()

    def _warm_cache(self, ev: BlockEvent, raw: _Raw) -> None:
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
        how = policy.store_decision(
            policy.plan(method, params, view),
            value,
            None,
            None,  # the block is known: nothing to decode (receipts were checked on arrival)
            view,
            self.head.profile.block_time,
            block=(n, h),
        )
        if how is not None:
            self.cache.put(how.key, stored_entry(value, how))

    # --- pending transactions --------------------------------------------------------
    async def _follow_pending(self) -> None:
        """Hold one newPendingTransactions stream on a WebSocket upstream while anyone
        listens, moving to another upstream (or reconnecting) when it breaks."""
        ws = [u for u in self.pool.upstreams if u.is_ws]
        if not ws:
            log.info("no WebSocket upstream: pending transaction listeners get nothing")
            return
        turn = 0
        delay = PENDING_RETRY_DELAY
        while self._pending_listeners:
            healthy = [u for u in ws if u.healthy] or ws
            u = healthy[turn % len(healthy)]
            turn += 1
            try:
                if await self._pending_stream(u):
                    delay = PENDING_RETRY_DELAY  # it worked for a while: a blip
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                log.info("pending stream of %s broke: %s", u.name, exc)
                self.metrics.feed_problems.labels("pending_stream").inc()
            except Exception:
                # Garbage from the upstream (a malformed answer) must not end the stream
                # for good: logged, counted, asked again after the back-off.
                log.exception("pending stream of %s failed", u.name)
                self.metrics.feed_problems.labels("pending_stream").inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, PENDING_RETRY_MAX)

    async def _pending_stream(self, u: Upstream) -> bool:
        """Follow ``u``'s pending stream until it ends; True if it was subscribed."""
        async with websockets.connect(
            u.url, max_size=self.pending_max_message, compression=None, open_timeout=u.timeout
        ) as conn:
            await conn.send(
                b'{"jsonrpc":"2.0","id":1,"method":"eth_subscribe",'
                b'"params":["newPendingTransactions"]}',
                text=True,
            )
            async with asyncio.timeout(u.timeout):
                raw = await conn.recv(decode=False)
            try:
                answer = orjson.loads(raw)
            except orjson.JSONDecodeError:
                log.warning("upstream %s answered eth_subscribe with no JSON: %.200r", u.name, raw)
                self.metrics.feed_problems.labels("pending_stream").inc()
                return False
            sub_id = answer.get("result") if isinstance(answer, dict) else None
            if not isinstance(sub_id, str):
                log.info("upstream %s refused newPendingTransactions: %.200r", u.name, raw)
                return False
            async for message in conn:
                try:
                    doc = orjson.loads(message)
                except orjson.JSONDecodeError:
                    continue
                params = doc.get("params") if isinstance(doc, dict) else None
                if not isinstance(params, dict) or params.get("subscription") != sub_id:
                    continue
                tx_hash = params.get("result")
                if isinstance(tx_hash, str):
                    for fn in list(self._pending_listeners):
                        try:
                            fn(tx_hash)
                        except Exception:
                            log.exception("pending listener failed")
        return True


@dataclass(frozen=True, slots=True)
class _Raw:
    """The bytes the upstream answered for a block, kept for the cache."""

    block: bytes
    light: dict[str, Any]  # the block with transaction hashes instead of bodies
    receipts: list[dict[str, Any]] | None
    receipts_raw: bytes | None


def _light(block: dict[str, Any]) -> dict[str, Any]:
    """eth_getBlockByHash(h, false) derived from the full block: transactions as hashes."""
    light = dict(block)
    txs = block.get("transactions")
    if isinstance(txs, list):
        light["transactions"] = [t.get("hash") if isinstance(t, dict) else t for t in txs]
    return light


def _light_or_none(block: Any) -> dict[str, Any] | None:
    return _light(block) if isinstance(block, dict) else None


def _block_or_none(block: Any) -> dict[str, Any] | None:
    return block if isinstance(block, dict) else None


def _receipt_of(tx_hash: str, block_hash: str) -> Callable[[Any], Any]:
    """Picks one transaction's receipt out of its block's receipts."""

    def pick(receipts: Any) -> Any:
        for r in receipts if isinstance(receipts, list) else ():
            if (
                isinstance(r, dict)
                and r.get("transactionHash") == tx_hash
                and r.get("blockHash") == block_hash
            ):
                return r
        return None

    return pick


def geth_header(block: dict[str, Any]) -> dict[str, Any]:
    """geth's newHeads payload of ``block`` (``HEADER_FIELDS``, in its sorted order)."""
    return {k: block[k] for k in HEADER_FIELDS if k in block}


def _offer_size(block_raw: bytes, receipts_raw: bytes | None) -> int:
    # The parsed block held beside the raw bytes costs a few times as much again; the bound
    # counts raw bytes, which are what a frame delivers.
    return len(block_raw) + (len(receipts_raw) if receipts_raw is not None else 0)


def _resolve(ref: str | int | None, view: HeadView) -> int | None:
    """A filter's block bound as a number against ``view``; None: not answerable here."""
    if ref is None or ref == "latest":
        return view.number
    if isinstance(ref, int):
        return ref
    if ref == "safe":
        return view.safe if view.safe >= 0 else None
    if ref == "finalized":
        return view.finalized if view.finalized >= 0 else None
    if ref == "earliest":
        return 0
    return None  # "pending": the upstream's pending block


def _kept(ev: BlockEvent) -> BlockEvent:
    """What the feed keeps of a delivered block for a reorg: number, hash, logs."""
    return BlockEvent(ev.number, ev.hash, {}, {}, ev.logs, False, ev.announced)


def _removed(ev: BlockEvent) -> BlockEvent:
    logs = [{**x, "removed": True} for x in ev.logs]
    return BlockEvent(ev.number, ev.hash, ev.header, ev.block, logs, True, ev.announced)


def _error_code(error: bytes) -> int | None:
    try:
        doc = orjson.loads(error)
    except orjson.JSONDecodeError:
        return None
    code = doc.get("code") if isinstance(doc, dict) else None
    return code if isinstance(code, int) else None
