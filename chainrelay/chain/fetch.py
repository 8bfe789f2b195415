"""Fetching one block for the follower: the full block, its receipts, its logs.

A block offered whole (``chain.offers``: a relay tree frame) is taken as it is, with no
upstream call. Otherwise the block comes from eth_getBlockByHash(h, true) and its logs from
eth_getBlockReceipts, both asked at once (the block's data is whole one round trip after its
head, not two); a block whose receipts fail (any error, or an upstream without
``eth_getBlockReceipts``, asked again every ``feed_receipts_retry_blocks``) gets its logs
from ``eth_getLogs`` by block hash. A block no upstream gives now raises ``Unavailable``: the
follower tries it again at a later pass.

The reads go through the RPC pipeline's cache and coalescer (``reads``) under the keys a
client's same request has, with the light block, the block by number and each
transaction's receipt derivable from them (the receipts once the block has named its
transactions): a client asking for the block the moment its newHeads arrives waits for the
follower's fetch instead of asking upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from chainrelay.chain.events import BlockEvent, geth_header
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.offers import OfferedBlocks
from chainrelay.config import SubscriptionsConfig
from chainrelay.errors import UpstreamError
from chainrelay.metrics import Metrics
from chainrelay.slices import Slicer, decode_result, drive
from chainrelay.subscriptions.logfilter import logs_of_receipts_steps
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.wire.jsonrpc import Answer

log = logging.getLogger(__name__)

# Error codes meaning "this upstream does not serve the method" (geth, erigon, providers).
_UNSUPPORTED = (-32601, -32604)

# A read the client's same request could join: (method, params, the answer from the
# source call's value).
Derived = tuple[str, list[Any], Callable[[Any], Any]]


# Receipts whose logs are gathered between two looks at the slice's clock (~0.1 ms).
RECEIPTS_STEP = 128
# Receipt reads made derivable from the receipts call under way, between two looks (~0.3 ms).
DERIVE_STEP = 128


class FollowerReads(Protocol):
    """The RPC pipeline as the follower reads through it (``RpcService``)."""

    async def follower_call(
        self, method: str, params: list[Any], min_block: int, derived: Sequence[Derived] = ()
    ) -> Answer:
        """``method(params)`` through the cache and coalescer, as a client's same call,
        from an upstream at or past ``min_block``; ``derived``: client reads answered from
        it, which clients may join while it runs."""
        ...

    def follower_derive(self, method: str, params: list[Any], derived: Sequence[Derived]) -> None:
        """More reads answered from ``method(params)``, a ``follower_call`` still under way
        (nothing when it is over: its answer is cached)."""
        ...


class Unavailable(Exception):
    """No upstream could give this block now (not there yet, another fork, an error)."""


@dataclass(frozen=True, slots=True)
class RawBlock:
    """The bytes the upstream answered for a block, kept for the cache."""

    block: bytes
    light: dict[str, Any]  # the block with transaction hashes instead of bodies
    receipts: list[dict[str, Any]] | None
    receipts_raw: bytes | None
    # The exact JSON of each transaction and each receipt, in order, when the answers were
    # decoded piecewise (``Answer.parts``): cached as they are, not encoded again.
    tx_parts: list[bytes] | None = None
    receipt_parts: list[bytes] | None = None


class BlockFetcher:
    def __init__(
        self,
        pool: UpstreamPool,
        head: HeadTracker,
        metrics: Metrics,
        offers: OfferedBlocks,
        cfg: SubscriptionsConfig,
        *,
        reads: FollowerReads | None = None,
    ) -> None:
        """``cfg``: how often and how long to try a block (``feed_fetch_*``), and when to
        ask an upstream without eth_getBlockReceipts again (``feed_receipts_retry_blocks``);
        ``reads``: the pipeline to read through (None: straight from the pool, uncached)."""
        self.pool = pool
        self.head = head
        self.metrics = metrics
        self.offers = offers
        self.cfg = cfg
        self.reads = reads
        # eth_getBlockReceipts is skipped below this block number: an upstream said it
        # lacks the method, and is asked again past it.
        self._receipts_from = -1

    async def fetch(self, number: int, block_hash: str) -> tuple[BlockEvent, RawBlock]:
        """Block ``number`` with ``block_hash``, up to ``feed_fetch_attempts`` tries while it
        is canonical; ``Unavailable`` if none gave it."""
        for attempt in range(self.cfg.feed_fetch_attempts):
            if attempt:
                await asyncio.sleep(self.cfg.feed_fetch_retry_delay)
            if self.head.view.canonical.get(number) != block_hash:
                raise Unavailable  # reorged away while we waited: the next step says what
            try:
                return await self.fetch_once(number, block_hash)
            except (Unavailable, UpstreamError) as exc:
                log.debug("block %d %s not fetched (%s)", number, block_hash, exc)
        raise Unavailable

    async def fetch_once(self, number: int, block_hash: str) -> tuple[BlockEvent, RawBlock]:
        offered = self.offers.take(block_hash)
        if offered is not None:
            got = await self._from_offer(number, block_hash, *offered)
            if got is not None:
                return got
        # Client reads answered from this block, joined while it is fetched. By number
        # only while this block is the canonical one there (the key names that hash).
        derived: list[Derived] = [
            ("eth_getBlockByHash", [block_hash, False], _light_or_none),
        ]
        if self.head.view.canonical.get(number) == block_hash:
            derived += [
                ("eth_getBlockByNumber", [hex(number), True], _block_or_none),
                ("eth_getBlockByNumber", [hex(number), False], _light_or_none),
            ]
        receipts_call = self._start_receipts(number, block_hash)
        try:
            answer = await self._read("eth_getBlockByHash", [block_hash, True], number, derived)
            block = answer.value
            if answer.error is not None or not isinstance(block, dict) or answer.result is None:
                raise Unavailable("block")
            if block.get("hash") != block_hash:
                raise Unavailable("another block")
        except BaseException:
            if receipts_call is not None:
                receipts_call.cancel()  # a pipeline call goes on for whoever joined it
                with contextlib.suppress(BaseException):
                    await receipts_call
            raise
        slicer = Slicer()
        if receipts_call is not None:
            await self._derive_receipts(number, block_hash, block, slicer)
        fetched = await self._receipts(number, block_hash, receipts_call)
        receipts = fetched.value if fetched is not None else None
        if receipts is not None:
            logs = await drive(logs_of_receipts_steps(receipts, RECEIPTS_STEP), slicer)
        else:
            logs = await self._logs(number, block_hash)
        if any(x.get("blockHash") != block_hash for x in logs):
            raise Unavailable("logs of another fork")
        light = light_block(block)
        event = BlockEvent(number, block_hash, self._header(light), block, logs, False)
        return event, RawBlock(
            answer.result,
            light,
            receipts,
            fetched.result if fetched is not None else None,
            answer.parts,
            fetched.parts if fetched is not None else None,
        )

    async def _from_offer(
        self,
        number: int,
        block_hash: str,
        block: dict[str, Any],
        block_raw: bytes,
        receipts_raw: bytes | None,
    ) -> tuple[BlockEvent, RawBlock] | None:
        """An offered block as if fetched; None (fetch it) if it does not hold together. Its
        receipts decoded and their logs gathered in slices, as a fetched block's."""
        if block.get("hash") != block_hash or block.get("number") != hex(number):
            return None
        if receipts_raw is None:
            return None
        slicer = Slicer()
        decoded = await decode_result(receipts_raw, slicer)
        receipts = decoded.value
        if not isinstance(receipts, list) or any(
            not isinstance(r, dict) or r.get("blockHash") != block_hash for r in receipts
        ):
            return None  # no usable receipts: fetched the usual way
        logs = await drive(logs_of_receipts_steps(receipts, RECEIPTS_STEP), slicer)
        light = light_block(block)
        event = BlockEvent(number, block_hash, self._header(light), block, logs, False)
        raw = RawBlock(block_raw, light, receipts, receipts_raw, None, decoded.parts)
        return event, raw

    async def _logs(self, number: int, block_hash: str) -> list[dict[str, Any]]:
        """The block's logs by eth_getLogs, when its receipts did not come."""
        got = await self.pool.call("eth_getLogs", [{"blockHash": block_hash}], number)
        if got.error is not None or not isinstance(got.value, list):
            raise Unavailable("logs")
        return [x for x in got.value if isinstance(x, dict)]

    def _start_receipts(self, number: int, block_hash: str) -> asyncio.Task[Answer] | None:
        """The block's eth_getBlockReceipts, started; None when this upstream lacks it.

        Under the key of a client's receipts by number (the pipeline asks by this block's
        hash) while the block is canonical there; else by hash, straight from the pool."""
        if number < self._receipts_from:
            return None
        if self.reads is None or self.head.view.canonical.get(number) != block_hash:
            call = self.pool.call("eth_getBlockReceipts", [block_hash], number)
        else:
            call = self.reads.follower_call("eth_getBlockReceipts", [hex(number)], number)
        return asyncio.ensure_future(call)

    async def _derive_receipts(
        self, number: int, block_hash: str, block: dict[str, Any], slicer: Slicer
    ) -> None:
        """Each transaction's receipt, answered from the block's receipts call under way:
        a client asking one now joins that call. ``DERIVE_STEP`` at a time (planning each
        read's key: ~2 µs, a block of 1,500 transactions ~3 ms), the loop free between."""
        txs = block.get("transactions") or ()
        for at in range(0, len(txs), DERIVE_STEP):
            if self.reads is None or self.head.view.canonical.get(number) != block_hash:
                return
            derived = [
                ("eth_getTransactionReceipt", [tx["hash"]], _receipt_of(tx["hash"], block_hash))
                for tx in txs[at : at + DERIVE_STEP]
                if isinstance(tx, dict) and isinstance(tx.get("hash"), str)
            ]
            self.reads.follower_derive("eth_getBlockReceipts", [hex(number)], derived)
            await slicer.pause()

    async def _receipts(
        self, number: int, block_hash: str, call: asyncio.Task[Answer] | None
    ) -> Answer | None:
        """The block's receipts from ``call``, decoded (``value`` a list), or None: take its
        logs from eth_getLogs instead (the upstream lacks the method, or failed it this
        time)."""
        if call is None:
            return None
        answer: Answer | None = None
        try:
            got = await call
        except UpstreamError as exc:
            why = str(exc)
        else:
            answer = got
            why = got.error_message() if got.error is not None else "not a list"
        if answer is not None and answer.error is None and answer.result is not None:
            if answer.value is None:
                answer = await decode_result(answer.result)
            value = answer.value
            if isinstance(value, list):
                if any(not isinstance(r, dict) or r.get("blockHash") != block_hash for r in value):
                    raise Unavailable("receipts of another fork")
                return answer
        if answer is not None and answer.error is not None:
            if _error_code(answer.error) in _UNSUPPORTED:
                self._receipts_from = number + self.cfg.feed_receipts_retry_blocks
                log.info(
                    "upstream lacks eth_getBlockReceipts: logs come from eth_getLogs "
                    "until block %d",
                    self._receipts_from,
                )
                return None
        log.warning("block %d: eth_getBlockReceipts failed (%s); logs by eth_getLogs", number, why)
        self.metrics.feed_problems.labels("receipts_fallback").inc()
        return None

    async def _read(
        self, method: str, params: list[Any], min_block: int, derived: Sequence[Derived] = ()
    ) -> Answer:
        if self.reads is None:
            return await self.pool.call(method, params, min_block)
        return await self.reads.follower_call(method, params, min_block, derived)

    def _header(self, light: dict[str, Any]) -> dict[str, Any]:
        """The newHeads payload of a block: the header an upstream pushed for this very
        block, as pushed; else geth's header fields of the block (a head only polled)."""
        pushed = self.head.pushed.get(light.get("hash", ""))
        if pushed is not None:
            return pushed
        return geth_header(light)


def light_block(block: dict[str, Any]) -> dict[str, Any]:
    """eth_getBlockByHash(h, false) derived from the full block: transactions as hashes."""
    light = dict(block)
    txs = block.get("transactions")
    if isinstance(txs, list):
        light["transactions"] = [t.get("hash") if isinstance(t, dict) else t for t in txs]
    return light


def _light_or_none(block: Any) -> dict[str, Any] | None:
    return light_block(block) if isinstance(block, dict) else None


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


def _error_code(error: bytes) -> int | None:
    try:
        doc = orjson.loads(error)
    except orjson.JSONDecodeError:
        return None
    code = doc.get("code") if isinstance(doc, dict) else None
    return code if isinstance(code, int) else None
