"""The block filler's bounds, in memory: only blocks the node can vouch for are filled, at
most ``max_fills`` at a time, each once; a fill that fails is tried again by a later miss.
The recent window's fill (``fill_window``) keeps to the same bounds, shares the blocks
filled with clients' misses, and ends where the head knows no hash. What a fill decoded is
freed a slice at a time once cached (``slices.let_go``).

Pair tier: a real BlockFiller, CacheWarmer and memory cache, reading through a stand-in for
the pipeline that holds each call until the test answers it (what a real node answers is
checked against anvil in tests/system/test_block_fill.py).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest

from chainrelay import defaults, slices
from chainrelay.chain import fill
from chainrelay.chain.fetch import Derived
from chainrelay.chain.fill import BlockFiller
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.chain.warm import CacheWarmer
from chainrelay.config import HeadConfig, PoolConfig, UpstreamConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import VALUE, MemoryCache
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
        self.waiting = 0  # calls not answered yet
        self.empty: set[int] = set()  # blocks without transactions
        self.forked: set[int] = set()  # blocks whose receipts disagree on their block
        self.most = 0  # the most calls ever waiting at once
        self.receipts: Callable[[int], list[dict[str, Any]]] = receipts_of  # a block's

    async def follower_call(
        self, method: str, params: list[Any], min_block: int, derived: Sequence[Derived] = ()
    ) -> Answer:
        self.calls.append((method, params))
        self.waiting += 1
        self.most = max(self.most, self.waiting)
        try:
            ok = await self.go.setdefault(params[0], asyncio.get_running_loop().create_future())
        finally:
            self.waiting -= 1
        if not ok:
            return Answer(None, b'{"code":-32000,"message":"not now"}')
        n = int(params[0], 16)
        value: Any
        if method == "eth_getBlockByNumber":
            value = {"hash": block_hash(n), "number": hex(n)}
        elif n in self.empty:
            value = []
        else:
            value = self.receipts(n)
            if n in self.forked:  # one receipt from another block at that height
                value[-1] = {**value[-1], "blockHash": "0x" + "ef" * 32}
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
        assert entry is not None and entry[VALUE] == part
    # Parts that are not one per receipt are not used: each receipt is encoded.
    m = HEAD - 3
    await lab.filler.warmer.warm_receipts(
        m, block_hash(m), receipts_of(m), orjson.dumps(receipts_of(m)), parts[:2]
    )
    for r in receipts_of(m):
        key = policy.plan(RECEIPT, [r["transactionHash"]], view).key
        assert key is not None
        entry = lab.cache.get(key)
        assert entry is not None and entry[VALUE] == orjson.dumps(r)


def asked(lab: Lab) -> list[int]:
    return [int(c[1][0], 16) for c in lab.reads.calls]


async def answer_when_asked(lab: Lab, n: int) -> None:
    await until(lambda: hex(n) in lab.reads.go, 5 * SECOND, f"block {n}'s call")
    lab.reads.answer(n)


async def test_the_window_is_filled_newest_first_beside_clients_fills_each_block_once() -> None:
    lab = Lab(max_fills=4)
    lab.filler.note(RECEIPT, HEAD - 1, block_hash(HEAD - 1))  # a client's fill under way
    taken = {block_hash(HEAD - 2)}  # the follower warms that one itself
    lab.filler.fill_window(range(HEAD, HEAD - 10, -1), taken.__contains__, 2)
    await until(lambda: len(lab.reads.calls) >= 3, 5 * SECOND, "two of the window's calls")
    assert asked(lab) == [HEAD - 1, HEAD, HEAD - 3]
    # A client's miss on a block the window fills joins it; another still finds a slot.
    lab.filler.note(RECEIPT, HEAD - 3, block_hash(HEAD - 3))
    lab.filler.note(RECEIPT, HEAD - 50, block_hash(HEAD - 50))
    await until(lambda: len(lab.reads.calls) >= 4, 5 * SECOND, "the client's own fill")
    assert asked(lab)[3] == HEAD - 50
    assert lab.fills("receipts", "busy") == 0
    window = [n for n in range(HEAD, HEAD - 10, -1) if n not in (HEAD - 1, HEAD - 2)]
    for n in (HEAD - 1, HEAD - 50, *window):
        await answer_when_asked(lab, n)
    await until(lambda: lab.fills("receipts", "window_filled") == 8, 5 * SECOND, "the window")
    assert asked(lab) == [HEAD - 1, HEAD, HEAD - 3, HEAD - 50, *window[2:]]
    assert lab.reads.most <= 4  # max_fills, clients' fills and the window's together
    assert lab.fills("receipts", "filled") == 2
    assert all(lab.cached_receipt(n, 2) for n in window)
    assert sorted(lab.logs) == sorted([*window, HEAD - 1, HEAD - 50])
    # Filled: neither a client's miss nor the next run's window asks for them again.
    lab.filler.note(RECEIPT, HEAD - 4, block_hash(HEAD - 4))
    lab.filler.fill_window(range(HEAD, HEAD - 10, -1), taken.__contains__, 2)
    await until(lambda: not lab.filler._windows, 5 * SECOND, "the second window's pass")
    await lab.filler.stop()
    assert len(lab.reads.calls) == 10


async def test_the_window_never_runs_past_max_fills_with_clients_fills() -> None:
    lab = Lab(max_fills=3)
    lab.filler.note(RECEIPT, HEAD - 40, block_hash(HEAD - 40))
    lab.filler.note(RECEIPT, HEAD - 41, block_hash(HEAD - 41))
    lab.filler.fill_window(range(HEAD, HEAD - 4, -1), lambda h: False, 4)
    await until(lambda: len(lab.reads.calls) >= 3, 5 * SECOND, "one of the window's calls")
    await answer_when_asked(lab, HEAD - 40)  # a client's fill over: the window takes its slot
    await until(lambda: len(lab.reads.calls) >= 4, 5 * SECOND, "the window's second call")
    for n in (HEAD - 41, *range(HEAD, HEAD - 4, -1)):
        await answer_when_asked(lab, n)
    await until(lambda: lab.fills("receipts", "window_filled") == 4, 5 * SECOND, "the window")
    await lab.filler.stop()
    assert asked(lab) == [HEAD - 40, HEAD - 41, HEAD, HEAD - 1, HEAD - 2, HEAD - 3]
    assert lab.reads.most == 3


async def test_the_window_ends_where_the_head_knows_no_hash_once_its_walk_back_is_over() -> None:
    lab = Lab()
    view = lab.head.view
    low = min(view.canonical)
    view.finalized = low - 6  # the blocks below the walk back are not final: not by number
    walked = asyncio.Event()

    async def walk_back() -> None:  # the tracker's walk back from its first head, held
        await walked.wait()
        for n in range(low - 1, low - 4, -1):
            view.canonical[n] = block_hash(n)
            view.numbers[block_hash(n)] = n

    lab.head._backfill_task = asyncio.create_task(walk_back())
    lab.filler.fill_window(range(low + 2, low - 10, -1), lambda h: False, 8)
    await until(lambda: len(lab.reads.calls) >= 3, 5 * SECOND, "the known blocks' calls")
    assert asked(lab) == [low + 2, low + 1, low]  # then it waits for the walk back
    walked.set()
    await until(lambda: len(lab.reads.calls) >= 6, 5 * SECOND, "the walked blocks' calls")
    for n in range(low + 2, low - 4, -1):
        lab.reads.answer(n)
    await until(lambda: lab.fills("receipts", "window_filled") == 6, 5 * SECOND, "the window")
    await lab.filler.stop()
    assert asked(lab) == list(range(low + 2, low - 4, -1))  # none the head knows no hash of


async def test_final_blocks_below_the_heads_hashes_are_filled_by_number() -> None:
    lab = Lab()
    view = lab.head.view
    low = min(view.canonical)  # final, as the two blocks below it it knows no hash of
    window = range(low + 1, low - 3, -1)
    lab.filler.fill_window(window, lambda h: False, 8)
    await until(lambda: len(lab.reads.calls) >= 4, 5 * SECOND, "the window's calls")
    for n in window:
        lab.reads.answer(n)
    await until(lambda: lab.fills("receipts", "window_filled") == 4, 5 * SECOND, "the window")
    assert asked(lab) == list(window)
    for n in (low - 1, low - 2):  # cached under the hash their receipts name, logs held
        assert all(lab.cached_receipt(n, i) for i in range(3))
        assert n in lab.logs
    # A client's miss there fills nothing again: the block is remembered by its hash.
    lab.filler.note(RECEIPT, low - 2, block_hash(low - 2))
    await lab.filler.stop()
    assert len(lab.reads.calls) == 4


async def test_a_block_reorged_while_the_window_fills_it_is_neither_cached_nor_held() -> None:
    lab = Lab()
    view = lab.head.view
    lab.filler.fill_window(range(HEAD - 5, HEAD - 7, -1), lambda h: False, 8)
    await until(lambda: len(lab.reads.calls) >= 2, 5 * SECOND, "the window's calls")
    other = "0x" + "ab" * 32  # another block takes HEAD - 5's height
    del view.numbers[block_hash(HEAD - 5)]
    view.canonical[HEAD - 5] = other
    view.numbers[other] = HEAD - 5
    view.generation += 1
    lab.reads.answer(HEAD - 5)  # the old block's receipts, as a lagging upstream sends them
    lab.reads.answer(HEAD - 6)
    await until(lambda: lab.fills("receipts", "window_filled") == 2, 5 * SECOND, "the window")
    await lab.filler.stop()
    assert not any(lab.cached_receipt(HEAD - 5, i) for i in range(3))
    assert lab.cached_receipt(HEAD - 6, 0)
    assert lab.logs == [HEAD - 6]


async def test_a_final_block_by_number_whose_receipts_disagree_is_left_to_a_later_miss() -> None:
    lab = Lab()
    low = min(lab.head.view.canonical)
    lab.reads.forked.add(low - 1)
    lab.filler.fill_window([low - 1], lambda h: False, 8)
    await until(lambda: len(lab.reads.calls) >= 1, 5 * SECOND, "the window's call")
    lab.reads.answer(low - 1)
    await until(lambda: lab.fills("receipts", "window_failed") == 1, 5 * SECOND, "the fill")
    assert not lab.cached_receipt(low - 1, 0)
    # Nothing is remembered as filled under its hash: a client's miss there fills it.
    lab.reads.forked.clear()
    lab.filler.note(RECEIPT, low - 1, block_hash(low - 1))
    await until(lambda: lab.fills("receipts", "filled") == 1, 5 * SECOND, "the miss's fill")
    await lab.filler.stop()
    assert lab.cached_receipt(low - 1, 0)


async def test_a_final_block_without_transactions_is_filled_by_its_headers_hash() -> None:
    lab = Lab()
    low = min(lab.head.view.canonical)
    lab.reads.empty.update({low, low - 1})
    lab.filler.fill_window([low, low - 1], lambda h: False, 8)
    await until(lambda: len(lab.reads.calls) >= 2, 5 * SECOND, "the window's calls")
    lab.reads.answer(low)
    lab.reads.answer(low - 1)
    await until(lambda: lab.fills("receipts", "window_filled") == 2, 5 * SECOND, "the window")
    await lab.filler.stop()
    # The block the head knows by hash, and the one below it by its header's: both held
    # (no logs), so an eth_getLogs window over them is answered locally.
    assert sorted(lab.logs) == [low - 1, low]
    assert ("eth_getBlockByNumber", [hex(low - 1), False]) in lab.reads.calls


class Tracked(dict[str, Any]):
    """A receipt whose freeing the test sees (a dict subclass takes weak references)."""


async def test_a_filled_blocks_receipts_are_freed_a_slice_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lab = Lab()
    turns = 0
    freed: list[int] = []  # the loop's turn each receipt was freed at

    def receipts(n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for r in receipts_of(n) * 100:
            t = Tracked(r)
            weakref.finalize(t, lambda: freed.append(turns))
            out.append(t)
        return out

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    async def let_go(lists: list[list[Any]]) -> None:  # every step a slice of its own
        await slices.let_go(lists, slices.Slicer(budget=0.0))

    monkeypatch.setattr(fill, "let_go", let_go)
    lab.reads.receipts = receipts
    task = asyncio.create_task(other())
    lab.filler.note(RECEIPT, HEAD, block_hash(HEAD))
    await answer_when_asked(lab, HEAD)
    await until(lambda: lab.fills("receipts", "filled") == 1, 5 * SECOND, "the fill")
    await until(lambda: len(freed) == 300, 5 * SECOND, "every receipt freed")
    task.cancel()
    assert lab.cached_receipt(HEAD, 0)
    # Freed by the fill itself once cached, over one turn of the loop a step at least.
    assert len(set(freed)) >= 300 // defaults.LET_GO_STEP, sorted(set(freed))
    await lab.filler.stop()
