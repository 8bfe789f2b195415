"""The block follower's early heads, without sockets: a head whose header the upstream pushed
reaches head listeners as the tracker adopts it, before its block and receipts are fetched;
heads the tracker had to walk back to, and the heads of a reorg, wait for the fetch. Every
head reaches head listeners once and in chain order, and each block's event follows.

Pair tier: a real head tracker and block follower over an in-memory chain standing in for the
upstream's answers; receipts can be held back to hold the fetch where the test wants it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from chainrelay import defaults
from chainrelay.chain.events import HEADER_FIELDS, BlockEvent
from chainrelay.chain.follower import BlockFollower
from chainrelay.chain.head import Header, HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import HeadConfig, PoolConfig, SubscriptionsConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc.cache import Entry, MemoryCache
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import Upstream
from tests.lab.procs import until
from tests.lab.timing import SECOND


def block_hash(fork: str, n: int) -> str:
    return "0x" + f"{fork}{n:x}".rjust(64, "0")


class MemoryChain(Upstream):
    """Answers blocks and receipts from dicts; receipts wait while ``receipts_open`` is
    clear, so a fetch stays under way until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__("mem", "memory://", timeout=10.0, connections=1)
        self.blocks: dict[str, dict[str, Any]] = {}
        self.logs: dict[str, list[dict[str, Any]]] = {}  # block hash -> its logs
        self.receipts_open = asyncio.Event()
        self.receipts_open.set()
        self.held: set[str] = set()  # blocks whose receipts wait while receipts_open is clear
        # Answered as the error of eth_getBlockReceipts, when set: a node's failure.
        self.receipts_error: dict[str, Any] | None = None
        self.methods: list[str] = []

    def add(self, fork: str, n: int, parent_fork: str) -> Header:
        parent = block_hash(parent_fork, n - 1)
        hash_ = block_hash(fork, n)
        block = {
            "number": hex(n),
            "hash": hash_,
            "parentHash": parent,
            "timestamp": hex(1000 + n),
            "transactions": [],
        }
        self.blocks[hash_] = block
        return Header(n, hash_, parent)

    def pushed(self, h: Header) -> dict[str, Any]:
        """The header as a node's newHeads stream sends it (no transactions)."""
        return {k: v for k, v in self.blocks[h.hash].items() if k != "transactions"}

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        req = orjson.loads(body)
        method, params = req["method"], req.get("params", [])
        self.methods.append(method)
        result: Any = None
        if method == "eth_getBlockByHash":
            result = self.blocks.get(params[0])
        elif method == "eth_getBlockReceipts":
            if not self.held or params[0] in self.held:
                await self.receipts_open.wait()
            if self.receipts_error is not None:
                error = {"jsonrpc": "2.0", "id": req["id"], "error": self.receipts_error}
                return orjson.dumps(error)
            logs = self.logs.get(params[0], [])
            result = [{"blockHash": params[0], "logs": logs}] if logs else []
        elif method == "eth_getLogs":
            result = self.logs.get(params[0]["blockHash"], [])
        return orjson.dumps({"jsonrpc": "2.0", "id": req["id"], "result": result})


class Lab:
    def __init__(
        self, feed: SubscriptionsConfig | None = None, cache: MemoryCache | None = None
    ) -> None:
        self.chain = MemoryChain()
        self.metrics = metrics = Metrics()
        pool = UpstreamPool([self.chain], PoolConfig(), metrics)
        self.tracker = HeadTracker(
            pool, PROFILES["devnet"], metrics, HeadConfig(reorg_window=16, backfill_blocks=0)
        )
        cache = MemoryCache(1 << 20, 1 << 16) if cache is None else cache
        self.follower = BlockFollower(
            pool,
            self.tracker,
            cache,
            metrics,
            SubscriptionsConfig() if feed is None else feed,
            window=16,
            offered_max_bytes=defaults.OFFERED_MAX_BYTES,
        )
        self.heads: list[dict[str, Any]] = []
        self.events: list[BlockEvent] = []
        self.follower.add_head_listener(self.heads.append)
        self.follower.add_listener(self.events.extend)

    async def push(self, h: Header) -> None:
        """The upstream's head stream sends ``h``, as ``HeadTracker.push_header`` takes it,
        and the tracker adopts it before this returns."""
        payload = self.chain.pushed(h)
        self.tracker.pushed[h.hash] = payload
        await self.tracker.on_header(self.chain, h)

    def head_numbers(self) -> list[int]:
        return [int(x["number"], 16) for x in self.heads]

    def delivered(self) -> list[tuple[int, str, bool]]:
        return [(e.number, e.hash, e.announced) for e in self.events if not e.removed]

    async def wait_events(self, count: int) -> None:
        await until(lambda: len(self.events) >= count, 5 * SECOND, f"{count} block events")

    async def polled(self, h: Header) -> None:
        """The tracker adopts ``h`` from a poll: no pushed header."""
        await self.tracker.on_header(self.chain, h)

    def problems(self, problem: str) -> float:
        return self.metrics.feed_problems.labels(problem)._value.get()


@asynccontextmanager
async def running(lab: Lab) -> AsyncIterator[Lab]:
    await lab.follower.start()
    try:
        yield lab
    finally:
        await lab.follower.stop()
        await lab.tracker.stop()


@pytest.fixture
async def lab() -> Any:
    async with running(Lab()) as lab:
        yield lab


async def test_a_pushed_head_goes_out_before_its_block_is_fetched(lab: Lab) -> None:
    c = lab.chain
    one = c.add("a", 1, "a")
    await lab.push(one)
    await lab.wait_events(1)  # the first head after the start: it comes with its block
    assert lab.delivered() == [(1, one.hash, False)]
    assert lab.heads == []

    c.receipts_open.clear()  # the fetch of what follows stays under way
    two, three = c.add("a", 2, "a"), c.add("a", 3, "a")
    await lab.push(two)
    assert lab.heads == [c.pushed(two)]  # out as the tracker adopted it
    await lab.push(three)
    assert lab.head_numbers() == [2, 3]  # the child of the last head out: out too
    assert len(lab.events) == 1  # neither block fetched yet

    c.receipts_open.set()
    await lab.wait_events(3)
    assert lab.delivered() == [(1, one.hash, False), (2, two.hash, True), (3, three.hash, True)]
    assert lab.head_numbers() == [2, 3]  # not again with their blocks


async def test_heads_walked_back_to_wait_for_the_fetch_in_order(lab: Lab) -> None:
    c = lab.chain
    await lab.push(c.add("a", 1, "a"))
    await lab.wait_events(1)
    c.receipts_open.clear()
    c.add("a", 2, "a")
    c.add("a", 3, "a")
    four = c.add("a", 4, "a")
    await lab.push(four)  # 2 and 3 were never pushed: the tracker walks back to them
    assert lab.heads == []  # 4 is not the next head due, so it waits for 2 and 3
    c.receipts_open.set()
    await lab.wait_events(4)
    assert [(n, a) for n, _, a in lab.delivered()] == [
        (1, False),
        (2, False),
        (3, False),
        (4, False),
    ]
    five = c.add("a", 5, "a")
    await lab.push(five)  # the child of a head delivered with its block: early again
    assert lab.head_numbers() == [5]
    await lab.wait_events(5)
    assert lab.delivered()[-1] == (5, five.hash, True)


async def test_a_head_reorged_away_before_its_fetch_is_replaced_not_delivered(lab: Lab) -> None:
    c = lab.chain
    await lab.push(c.add("a", 1, "a"))
    await lab.wait_events(1)
    c.receipts_open.clear()
    two = c.add("a", 2, "a")
    await lab.push(two)
    assert lab.head_numbers() == [2]
    two_b, three_b = c.add("b", 2, "a"), c.add("b", 3, "b")
    await lab.push(two_b)  # a reorg at 2: its head goes out with its block
    await lab.push(three_b)  # the child of a head not yet out: it waits too
    assert lab.head_numbers() == [2]
    c.receipts_open.set()
    await lab.wait_events(3)
    assert lab.delivered() == [
        (1, block_hash("a", 1), False),
        (2, two_b.hash, False),
        (3, three_b.hash, False),
    ]
    assert all(not e.removed for e in lab.events)  # 2 (fork a) was never delivered
    four_b = c.add("b", 4, "b")
    await lab.push(four_b)
    assert lab.head_numbers() == [2, 4]
    await lab.wait_events(4)
    assert lab.events[-1].header == c.pushed(four_b)


async def test_heads_pushed_back_to_back_each_go_out_early(lab: Lab) -> None:
    c = lab.chain
    await lab.push(c.add("a", 1, "a"))
    await lab.wait_events(1)
    c.receipts_open.clear()
    two, three = c.add("a", 2, "a"), c.add("a", 3, "a")
    # Both arrive before the tracker's task for the first has run.
    lab.tracker.push_header(c, c.pushed(two))
    lab.tracker.push_header(c, c.pushed(three))
    await until(lambda: len(lab.heads) == 2, 5 * SECOND, "both heads")
    assert lab.heads == [c.pushed(two), c.pushed(three)]
    assert len(lab.events) == 1  # neither block fetched yet
    c.receipts_open.set()
    await lab.wait_events(3)
    assert [(n, early) for n, _, early in lab.delivered()] == [(1, False), (2, True), (3, True)]


# --- one block never stops the feed ------------------------------------------------------
def a_log(block: Header, index: int) -> dict[str, Any]:
    return {
        "address": "0x" + "11" * 20,
        "topics": [],
        "data": "0x",
        "blockNumber": hex(block.number),
        "blockHash": block.hash,
        "logIndex": hex(index),
        "removed": False,
    }


async def test_receipts_failing_with_a_server_error_fall_back_to_get_logs(lab: Lab) -> None:
    c = lab.chain
    await lab.push(c.add("a", 1, "a"))
    await lab.wait_events(1)
    c.receipts_error = {"code": -32000, "message": "header not found"}
    two = c.add("a", 2, "a")
    c.logs[two.hash] = [a_log(two, 0), a_log(two, 1)]
    await lab.push(two)
    await lab.wait_events(2)
    assert lab.events[-1].logs == c.logs[two.hash]
    assert lab.problems("receipts_fallback") == 1
    # Not a lack of the method: the next block asks for its receipts again.
    c.receipts_error = None
    c.methods.clear()
    await lab.push(c.add("a", 3, "a"))
    await lab.wait_events(3)
    assert "eth_getBlockReceipts" in c.methods and "eth_getLogs" not in c.methods


async def test_an_upstream_without_block_receipts_is_asked_again_later() -> None:
    async with running(Lab(SubscriptionsConfig(feed_receipts_retry_blocks=2))) as lab:
        c = lab.chain
        await lab.push(c.add("a", 1, "a"))
        await lab.wait_events(1)
        c.receipts_error = {"code": -32601, "message": "the method does not exist"}
        c.methods.clear()
        for n in (2, 3, 4):
            await lab.push(c.add("a", n, "a"))
            await lab.wait_events(n)
        # 2 asked and refused; 3 not asked; 4 (two blocks on) asked again.
        assert c.methods.count("eth_getBlockReceipts") == 2
        assert c.methods.count("eth_getLogs") == 3
        assert lab.problems("receipts_fallback") == 0


class FailingCache(MemoryCache):
    """A cache whose stores fail: the fault a warming bug would cause."""

    def put(self, key: bytes, entry: Entry) -> bool:
        raise RuntimeError("store failed")


async def test_a_failure_while_warming_the_cache_does_not_hold_delivery() -> None:
    async with running(Lab(cache=FailingCache(1 << 20, 1 << 16))) as lab:
        c = lab.chain
        for n in (1, 2):
            await lab.push(c.add("a", n, "a"))
            await lab.wait_events(n)
        assert [e.number for e in lab.events] == [1, 2]
        assert lab.problems("warm_failed") == 2


async def test_a_block_no_upstream_serves_is_given_up_after_its_passes() -> None:
    feed = SubscriptionsConfig(
        feed_fetch_attempts=1, feed_fetch_retry_delay=0.01 * SECOND, feed_block_passes=3
    )
    async with running(Lab(feed)) as lab:
        c = lab.chain
        await lab.push(c.add("a", 1, "a"))
        await lab.wait_events(1)
        two = c.add("a", 2, "a")
        three = c.add("a", 3, "a")
        del c.blocks[two.hash]  # the node lost it: every fetch of 2 answers null
        await lab.polled(two)
        await lab.polled(three)
        await lab.wait_events(2)
        assert [e.number for e in lab.events] == [1, 3]
        assert c.methods.count("eth_getBlockByHash") >= 3
        assert lab.problems("block_given_up") == 1


# --- delivery block by block; what is kept --------------------------------------------------
async def test_each_block_goes_out_as_soon_as_it_is_fetched(lab: Lab) -> None:
    c = lab.chain
    await lab.push(c.add("a", 1, "a"))
    await lab.wait_events(1)
    two, three = c.add("a", 2, "a"), c.add("a", 3, "a")
    c.held.add(three.hash)
    c.receipts_open.clear()
    await lab.polled(three)  # 2 is walked back to; 3's receipts are held
    await lab.wait_events(2)
    assert [e.number for e in lab.events] == [1, 2]  # 2 out while 3 is under way
    c.receipts_open.set()
    await lab.wait_events(3)
    assert [e.hash for e in lab.events[1:]] == [two.hash, three.hash]


async def test_only_number_hash_and_logs_are_kept_and_none_at_or_below_finalized(
    lab: Lab,
) -> None:
    c = lab.chain
    for n in range(1, 6):
        h = c.add("a", n, "a")
        c.logs[h.hash] = [a_log(h, 0)]
        await lab.push(h)
        await lab.wait_events(n)
    kept = [lab.follower.order._blocks[n][1] for n in sorted(lab.follower.order._blocks)]
    assert [e.number for e in kept] == [1, 2, 3, 4, 5]
    # The logs kept encoded (decoded again only for a retraction).
    assert all(e.block == {} and e.header == {} and e.logs == [] for e in kept)
    assert all(e.logs_raw is not None and len(orjson.loads(e.logs_raw)) == 1 for e in kept)
    lab.tracker.view.finalized = 3
    six = c.add("a", 6, "a")
    c.logs[six.hash] = [a_log(six, 0)]
    await lab.push(six)
    await lab.wait_events(6)
    assert sorted(lab.follower.order._blocks) == [4, 5, 6]
    # A reorg above the finalized block still retracts what it replaces.
    six_b = c.add("b", 6, "a")
    await lab.push(six_b)
    await lab.push(c.add("b", 7, "b"))
    await lab.wait_events(9)
    assert [(e.number, e.removed) for e in lab.events[6:]] == [(6, True), (6, False), (7, False)]
    assert lab.events[6].logs == [{**a_log(six, 0), "removed": True}]


# --- newHeads payloads -----------------------------------------------------------------------
async def test_a_polled_head_gets_gethss_header_form_not_the_block(lab: Lab) -> None:
    c = lab.chain
    await lab.push(c.add("a", 1, "a"))
    await lab.wait_events(1)
    two = c.add("a", 2, "a")
    c.blocks[two.hash].update(
        size="0x220", totalDifficulty="0x0", uncles=[], miner="0x" + "00" * 20
    )
    await lab.polled(two)
    await lab.wait_events(2)
    block = c.blocks[two.hash]
    header = lab.events[-1].header
    assert list(header) == sorted(header) == [k for k in HEADER_FIELDS if k in block]
    assert header == {k: block[k] for k in header}
    assert not {"transactions", "uncles", "size", "totalDifficulty"} & set(header)


async def test_a_pushed_head_keeps_the_payload_pushed_for_that_block(lab: Lab) -> None:
    c = lab.chain
    one = c.add("a", 1, "a")
    await lab.push(one)
    await lab.wait_events(1)
    # Another upstream pushes a later head in another form: block 1 keeps its own.
    two = c.add("a", 2, "a")
    lab.tracker.pushed[two.hash] = {"hash": two.hash, "number": hex(2), "extra": "x"}
    await lab.polled(two)
    await lab.wait_events(2)
    assert lab.events[0].header == c.pushed(one)
    assert lab.events[1].header == {"hash": two.hash, "number": hex(2), "extra": "x"}
