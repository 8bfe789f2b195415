"""Block-granular filling: a client's miss on one transaction or receipt brings in its
whole block's.

A receipt or transaction that went upstream names its block. Readers of recent
transactions read several from the same blocks, so one more call makes every other one of
that block a hit: eth_getBlockReceipts after a receipt miss (its logs then answer
eth_getLogs locally too), eth_getBlockByHash(h, true) after a second transaction miss in the
block (``MISSES_BEFORE_FILL``). The client
is not kept waiting for it: its own answer goes out first, and the fill warms the cache
behind it (``chain.warm``), then frees what it decoded a slice at a time (``slices.let_go``:
a block of a busy chain dropped at once held the loop for milliseconds).

Each (kind, block) is filled once, coalesced with whoever asks the same block meanwhile (the
call goes through the pipeline under a client's key), and remembered for a while so a block
is not filled twice. Only blocks the node can vouch for are filled: canonical in the head's
window, or final. At most ``max_fills`` fills run at once node-wide: a client scanning
receipts of old blocks costs its upstream calls, not twice that.

The recent window behind the block follower is filled the same way, ahead of the clients'
reads (``fill_window``, when ``chain.windowfill`` says so): the same remembered blocks, so
a block a client's miss filled is not filled again, nor the other way round, and within the
same ``max_fills``. Its blocks older than the hashes the head holds are filled if final, by
number, each hash taken from the block's receipts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from chainrelay import defaults
from chainrelay.chain.fetch import RECEIPTS_STEP, FollowerReads
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.warm import CacheWarmer
from chainrelay.errors import UpstreamError
from chainrelay.metrics import Metrics
from chainrelay.server.peer import detached
from chainrelay.slices import drive, let_go
from chainrelay.subscriptions.logfilter import logs_of_receipts_steps

log = logging.getLogger(__name__)

RECEIPT = "eth_getTransactionReceipt"
TRANSACTION = "eth_getTransactionByHash"
# What a miss of each method fills: its block's receipts, or its block's transactions.
FILLS = {RECEIPT: "receipts", TRANSACTION: "transactions"}
# Misses in one block before it is filled. Receipts at the first: dapps read many receipts
# of a block (every transfer of a token they watch), and one receipts call is about the size
# of the reads it saves. Transactions at the second: they are read one at a time far more
# often (a link followed to one transaction), and a whole block of bodies to save none
# would double the cost of such reads.
MISSES_BEFORE_FILL = {"receipts": 1, "transactions": 2}


def by_number(n: int) -> str:
    """What stands for the hash of final block ``n`` while it is not known (``_seen``'s
    key, ``_fill``'s ``h``): no block hash looks like it."""
    return f"#{n}"


# Told the logs of a block whose receipts were filled: (number, hash, logs).
LogsListener = Callable[[int, str, list[dict[str, Any]]], object]


class BlockFiller:
    def __init__(
        self,
        head: HeadTracker,
        warmer: CacheWarmer,
        reads: FollowerReads,
        metrics: Metrics,
        *,
        max_fills: int = defaults.MAX_BLOCK_FILLS,
        remembered: int = defaults.FILLED_BLOCKS_REMEMBERED,
        on_logs: LogsListener | None = None,
    ) -> None:
        self.head = head
        self.warmer = warmer
        self.reads = reads
        self.metrics = metrics
        self.max_fills = max_fills
        self.remembered = remembered
        self.on_logs = on_logs
        # (kind, block hash) -> misses seen, for blocks filled lately, under way or missed
        # in (fewer misses than MISSES_BEFORE_FILL), oldest first.
        self._seen: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._running: set[asyncio.Task[None]] = set()
        # Windows being filled (``fill_window``).
        self._windows: set[asyncio.Task[None]] = set()

    def note(self, method: str, number: int, block_hash: str) -> None:
        """A client's ``method`` (a receipt or a transaction read) went upstream and
        answered with a transaction of block ``number`` ``block_hash``: fill that block."""
        kind = FILLS.get(method)
        if kind is None:
            return
        key = (kind, block_hash)
        seen = self._seen
        misses = seen.get(key, 0) + 1
        if misses > MISSES_BEFORE_FILL[kind]:
            seen.move_to_end(key)
            return  # filled, or under way
        if not self.warmer.vouched(number, block_hash):
            return
        self._remember(key, misses)
        if misses < MISSES_BEFORE_FILL[kind]:
            return
        if len(self._running) >= self.max_fills:
            seen[key] = misses - 1  # asked again by a later miss of this block
            self.metrics.block_fills.labels(kind, "busy").inc()
            return
        seen[key] = misses + 1  # past the count: filled or under way
        task = detached(self._fill(kind, number, block_hash), name="block-fill")
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def fill_window(
        self, numbers: Iterable[int], taken: Callable[[str], bool], at_once: int
    ) -> None:
        """Fill the receipts of the canonical blocks ``numbers`` (newest first; from
        ``WindowFill.due``), in the background: blocks ``taken`` (by hash: the follower
        warms those itself) or filled lately or under way are passed over; at most
        ``at_once`` of these fills run at a time, and never more than ``max_fills`` fills
        with those of clients' misses, so a client's miss meanwhile still finds a slot."""
        task = detached(self._fill_window(numbers, taken, at_once), name="window-fill")
        self._windows.add(task)
        task.add_done_callback(self._windows.discard)

    async def _fill_window(
        self, numbers: Iterable[int], taken: Callable[[str], bool], at_once: int
    ) -> None:
        kind = "receipts"
        view = self.head.view
        mine: set[asyncio.Task[None]] = set()
        for n in numbers:
            h = view.canonical.get(n)
            if h is None:
                # The head tracker may still be walking back from its first head.
                await self.head.walked_back()
                h = view.canonical.get(n)
                if h is None and n > view.finalized:
                    break  # neither known by hash nor final: the window ends
            # A final block older than the hashes the head holds is filled by its number
            # (canonical for good), its hash taken from its receipts: remembered by number
            # until then.
            key = h if h is not None else by_number(n)
            if (h is not None and taken(h)) or self._filled(kind, key):
                continue
            while len(mine) >= at_once or len(self._running) >= self.max_fills:
                # Any fill's end may free a slot (the window's are among them).
                await asyncio.wait(set(self._running), return_when=asyncio.FIRST_COMPLETED)
            # Looked at again after the wait: the chain may have moved, a client's miss or
            # the follower may have taken the block meanwhile.
            if h is not None and (view.canonical.get(n) != h or taken(h)):
                continue
            if h is None and (known := view.canonical.get(n)) is not None:
                h = key = known  # the head learned its hash meanwhile
                if taken(h):
                    continue
            if self._filled(kind, key):
                continue
            self._remember((kind, key), MISSES_BEFORE_FILL[kind] + 1)  # under way
            task = detached(self._fill(kind, n, key, behind=True), name="window-block-fill")
            for running in (mine, self._running):
                running.add(task)
                task.add_done_callback(running.discard)
        if mine:
            await asyncio.wait(mine)

    def _filled(self, kind: str, h: str) -> bool:
        """Whether block ``h``'s ``kind`` was filled lately or is under way."""
        return self._seen.get((kind, h), 0) >= MISSES_BEFORE_FILL[kind]

    def _remember(self, key: tuple[str, str], misses: int) -> None:
        seen = self._seen
        seen[key] = misses
        seen.move_to_end(key)
        while len(seen) > self.remembered:
            seen.popitem(last=False)

    async def stop(self) -> None:
        for window in list(self._windows):
            window.cancel()  # before the fills: it would start more
        await asyncio.gather(*self._windows, return_exceptions=True)
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _fill(self, kind: str, n: int, h: str, *, behind: bool = False) -> None:
        """Fill block ``n`` ``h``'s ``kind`` (``h``: ``by_number(n)`` for a final block
        whose hash is not known yet: receipts only); ``behind``: for the window
        (``fill_window``), not a client's miss (counted apart)."""
        decoded: list[list[Any]] = []  # what the block was decoded into, to free in slices
        try:
            fill = self._receipts if kind == "receipts" else self._transactions
            ok = await fill(n, h, decoded)
            await let_go(decoded)
        except UpstreamError as exc:
            log.debug("block %d %s: %s not filled (%s)", n, h, kind, exc)
            ok = False
        except Exception:
            log.exception("block %d %s: filling its %s failed", n, h, kind)
            ok = False
        if not ok:
            self._seen[(kind, h)] = MISSES_BEFORE_FILL[kind] - 1  # a later miss tries again
        outcome = "filled" if ok else "failed"
        self.metrics.block_fills.labels(kind, f"window_{outcome}" if behind else outcome).inc()

    async def _receipts(self, n: int, h: str, decoded: list[list[Any]]) -> bool:
        """Fill block ``n``'s receipts; ``decoded`` is given them (``let_go``'s to free)."""
        answer = await self.reads.follower_call("eth_getBlockReceipts", [hex(n)], n)
        receipts = answer.value
        if answer.error is not None or answer.result is None or not isinstance(receipts, list):
            return False
        decoded.append(receipts)
        if h != by_number(n):
            if not _all_of(receipts, h):
                return False  # another block by now: nothing to warm
            await self._warm_receipts(n, h, receipts, answer.result, answer.parts)
            return True
        # A final block by its number: its hash is its receipts' own, when they agree, or
        # its header's (a block without transactions has no receipt to name it).
        if n > self.head.view.finalized:
            return False  # not final after all: a later miss fills it
        found = await self._final_hash(n, receipts)
        if found is None:
            return False
        if self._filled("receipts", found):
            return True  # a client's miss filled it meanwhile
        key = ("receipts", found)
        self._remember(key, MISSES_BEFORE_FILL["receipts"] + 1)  # under way, by its hash now
        try:
            await self._warm_receipts(n, found, receipts, answer.result, answer.parts)
        except BaseException:
            self._seen[key] = MISSES_BEFORE_FILL["receipts"] - 1  # a later miss tries again
            raise
        return True

    async def _final_hash(self, n: int, receipts: list[Any]) -> str | None:
        """The hash of final block ``n``, whose ``receipts`` came by number: the one they
        all name, or (none) its header's; None when they disagree or none is to be had."""
        if receipts:
            first = receipts[0]
            h = first.get("blockHash") if isinstance(first, dict) else None
            return h if isinstance(h, str) and _all_of(receipts, h) else None
        header = await self.reads.follower_call("eth_getBlockByNumber", [hex(n), False], n)
        block = header.value
        if header.error is not None or not isinstance(block, dict):
            return None
        h = block.get("hash")
        return h if isinstance(h, str) and block.get("number") == hex(n) else None

    async def _warm_receipts(
        self, n: int, h: str, receipts: list[Any], raw: bytes, parts: list[bytes] | None
    ) -> None:
        """Cache block ``n`` ``h``'s ``receipts`` (``raw``: their JSON as it came, ``parts``:
        each one's) and hold their logs, while it is canonical or final."""
        await self.warmer.warm_receipts(n, h, receipts, raw, parts)
        if self.on_logs is not None and self.warmer.vouched(n, h):
            logs = await drive(logs_of_receipts_steps(receipts, RECEIPTS_STEP))
            self.on_logs(n, h, logs)

    async def _transactions(self, n: int, h: str, decoded: list[list[Any]]) -> bool:
        """Fill block ``h``'s transactions; ``decoded`` is given them (``let_go``'s)."""
        answer = await self.reads.follower_call("eth_getBlockByHash", [h, True], n)
        block = answer.value
        if answer.error is not None or answer.result is None or not isinstance(block, dict):
            return False
        txs = block.get("transactions")
        if isinstance(txs, list):
            decoded.append(txs)
        if block.get("hash") != h:
            return False
        await self.warmer.warm_block(n, h, block, answer.result, answer.parts)
        return True


def _all_of(receipts: list[Any], h: str) -> bool:
    """Whether every one of ``receipts`` is a receipt of block ``h``."""
    return all(isinstance(r, dict) and r.get("blockHash") == h for r in receipts)
