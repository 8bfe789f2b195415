"""The block filler's bounds, in memory: only blocks the node can vouch for are filled, at
most ``max_fills`` at a time, each once; a fill that fails is tried again by a later miss.

Pair tier: a real BlockFiller, CacheWarmer and memory cache, reading through a stand-in for
the pipeline that holds each call until the test answers it (what a real node answers is
checked against anvil in tests/system/test_block_fill.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson

from chainrelay.chain.fetch import Derived
from chainrelay.chain.fill import BlockFiller
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.chain.warm import CacheWarmer
from chainrelay.config import HeadConfig, PoolConfig, UpstreamConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import MemoryCache
from chainrelay.upstreams.make import make_upstream
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.wire.jsonrpc import Answer
from tests.lab.procs import until
from tests.lab.timing import SECOND

HEAD = 200
FINAL = 150
RECEIPT = "eth_getTransactionReceipt"


def block_hash(n: int) -> str:
    return "0x" + f"{n:064x}"


def receipts_of(n: int) -> list[dict[str, Any]]:
    h = block_hash(n)
    return [
        {
            "blockHash": h,
            "blockNumber": hex(n),
            "transactionHash": "0x" + f"{n:032x}{i:032x}",
            "logs": [],
        }
        for i in range(3)
    ]


class HeldReads:
    """Answers each follower call with the block's receipts once the test lets it go."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Any]]] = []
        self.go: dict[str, asyncio.Future[bool]] = {}

    async def follower_call(
        self, method: str, params: list[Any], min_block: int, derived: Sequence[Derived] = ()
    ) -> Answer:
        self.calls.append((method, params))
        ok = await self.go.setdefault(params[0], asyncio.get_running_loop().create_future())
        if not ok:
            return Answer(None, b'{"code":-32000,"message":"not now"}')
        value = receipts_of(int(params[0], 16))
        return Answer(orjson.dumps(value), None, value)

    def follower_derive(self, method: str, params: list[Any], derived: Sequence[Derived]) -> None:
        return None

    def answer(self, n: int, ok: bool = True) -> None:
        self.go.setdefault(hex(n), asyncio.get_running_loop().create_future()).set_result(ok)


class Lab:
    def __init__(self, max_fills: int = 8) -> None:
        self.metrics = Metrics()
        # The head tracker is never started: the pool's upstream is never asked.
        pool = UpstreamPool(
            [make_upstream(UpstreamConfig(url="http://127.0.0.1:9"), PoolConfig())],
            PoolConfig(),
            self.metrics,
        )
        self.head = HeadTracker(pool, PROFILES["devnet"], self.metrics, HeadConfig())
        view = self.head.view
        view.number, view.finalized = HEAD, FINAL
        view.canonical = {n: block_hash(n) for n in range(FINAL - 10, HEAD + 1)}
        view.numbers = {h: n for n, h in view.canonical.items()}
        view.hash = view.canonical[HEAD]
        view.generation += 1
        self.cache = MemoryCache(1 << 22, 1 << 20)
        self.reads = HeldReads()
        self.logs: list[int] = []
        self.filler = BlockFiller(
            self.head,
            CacheWarmer(self.head, self.cache, self.metrics),
            self.reads,
            self.metrics,
            max_fills=max_fills,
            on_logs=lambda n, h, logs: self.logs.append(n),
        )

    def fills(self, kind: str, outcome: str) -> float:
        got = self.metrics.registry.get_sample_value(
            "chainrelay_block_fills_total", {"kind": kind, "outcome": outcome}
        )
        return got or 0.0

    def cached_receipt(self, n: int, i: int) -> bool:
        r = receipts_of(n)[i]
        key = policy.plan(RECEIPT, [r["transactionHash"]], self.head.view).key
        return key is not None and self.cache.get(key) is not None


async def test_only_blocks_the_node_can_vouch_for_are_filled() -> None:
    lab = Lab()
    lab.filler.note(RECEIPT, HEAD - 1, "0x" + "ee" * 32)  # another fork's block at that height
    lab.filler.note(RECEIPT, FINAL - 20, block_hash(FINAL - 20))  # old and final: vouched
    lab.filler.note(RECEIPT, HEAD + 5, block_hash(HEAD + 5))  # past the head
    lab.filler.note("eth_call", HEAD, block_hash(HEAD))  # not a read that fills
    await until(lambda: len(lab.reads.calls) >= 1, 5 * SECOND, "the fill's call")
    assert lab.reads.calls == [("eth_getBlockReceipts", [hex(FINAL - 20)])]
    lab.reads.answer(FINAL - 20)
    await until(lambda: lab.fills("receipts", "filled") == 1, 5 * SECOND, "the fill")
    assert all(lab.cached_receipt(FINAL - 20, i) for i in range(3))
    assert lab.logs == [FINAL - 20]
    await lab.filler.stop()


async def test_fills_are_bounded_and_each_block_is_filled_once() -> None:
    lab = Lab(max_fills=1)
    lab.filler.note(RECEIPT, HEAD, block_hash(HEAD))
    lab.filler.note(RECEIPT, HEAD, block_hash(HEAD))  # the same block: under way already
    lab.filler.note(RECEIPT, HEAD - 1, block_hash(HEAD - 1))  # one fill at a time: skipped
    await until(lambda: len(lab.reads.calls) >= 1, 5 * SECOND, "the fill's call")
    assert lab.fills("receipts", "busy") == 1
    lab.reads.answer(HEAD)
    await until(lambda: lab.fills("receipts", "filled") == 1, 5 * SECOND, "the first fill")
    lab.filler.note(RECEIPT, HEAD, block_hash(HEAD))  # filled already: nothing to do
    lab.filler.note(RECEIPT, HEAD - 1, block_hash(HEAD - 1))  # its next miss fills it
    await until(lambda: len(lab.reads.calls) >= 2, 5 * SECOND, "the second fill's call")
    lab.reads.answer(HEAD - 1)
    await until(lambda: lab.fills("receipts", "filled") == 2, 5 * SECOND, "the second fill")
    assert [c[1][0] for c in lab.reads.calls] == [hex(HEAD), hex(HEAD - 1)]
    await lab.filler.stop()


async def test_a_fill_that_failed_is_tried_again_by_a_later_miss() -> None:
    lab = Lab()
    lab.filler.note(RECEIPT, HEAD, block_hash(HEAD))
    await until(lambda: len(lab.reads.calls) >= 1, 5 * SECOND, "the fill's call")
    lab.reads.answer(HEAD, ok=False)
    await until(lambda: lab.fills("receipts", "failed") == 1, 5 * SECOND, "the failure")
    assert not lab.cached_receipt(HEAD, 0)
    lab.reads.go.clear()
    lab.filler.note(RECEIPT, HEAD, block_hash(HEAD))
    await until(lambda: len(lab.reads.calls) >= 2, 5 * SECOND, "the fill's second call")
    lab.reads.answer(HEAD)
    await until(lambda: lab.fills("receipts", "filled") == 1, 5 * SECOND, "the fill")
    assert lab.cached_receipt(HEAD, 2)
    await lab.filler.stop()


async def test_a_receipt_is_cached_as_the_exact_json_the_upstream_sent_when_at_hand() -> None:
    lab = Lab()
    n = HEAD - 2
    receipts = receipts_of(n)
    # Spaced as an upstream might: cached as sent, not encoded again.
    parts = [orjson.dumps(r).replace(b",", b", ") for r in receipts]
    raw = b"[" + b",".join(parts) + b"]"
    await lab.filler.warmer.warm_receipts(n, block_hash(n), receipts, raw, parts)
    view = lab.head.view
    for r, part in zip(receipts, parts, strict=True):
        key = policy.plan(RECEIPT, [r["transactionHash"]], view).key
        assert key is not None
        entry = lab.cache.get(key)
        assert entry is not None and entry.value == part
    # Parts that are not one per receipt are not used: each receipt is encoded.
    m = HEAD - 3
    await lab.filler.warmer.warm_receipts(
        m, block_hash(m), receipts_of(m), orjson.dumps(receipts_of(m)), parts[:2]
    )
    for r in receipts_of(m):
        key = policy.plan(RECEIPT, [r["transactionHash"]], view).key
        assert key is not None
        entry = lab.cache.get(key)
        assert entry is not None and entry.value == orjson.dumps(r)
