"""The block feed's early heads, without sockets: a head whose header the upstream pushed
reaches head listeners as the tracker adopts it, before its block and receipts are fetched;
heads the tracker had to walk back to, and the heads of a reorg, wait for the fetch. Every
head reaches head listeners once and in chain order, and each block's event follows.

A real head tracker and block feed over an in-memory chain standing in for the upstream's
answers; receipts can be held back to hold the fetch where the test wants it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from chainrelay.config import PoolConfig
from chainrelay.protocol.chains import PROFILES
from chainrelay.services.blocks import BlockEvent, BlockFeed
from chainrelay.services.cache import MemoryCache
from chainrelay.services.head import Header, HeadTracker
from chainrelay.services.metrics import Metrics
from chainrelay.services.pool import UpstreamPool
from chainrelay.services.upstream import Upstream
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
        self.receipts_open = asyncio.Event()
        self.receipts_open.set()

    def add(self, fork: str, n: int, parent_fork: str) -> Header:
        parent = block_hash(parent_fork, n - 1)
        block = {
            "number": hex(n),
            "hash": block_hash(fork, n),
            "parentHash": parent,
            "timestamp": hex(1000 + n),
            "transactions": [],
        }
        self.blocks[block["hash"]] = block
        return Header(n, block["hash"], parent)

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
        result: Any = None
        if method == "eth_getBlockByHash":
            result = self.blocks.get(params[0])
        elif method == "eth_getBlockReceipts":
            await self.receipts_open.wait()
            result = []
        return orjson.dumps({"jsonrpc": "2.0", "id": req["id"], "result": result})


class Lab:
    def __init__(self) -> None:
        self.chain = MemoryChain()
        metrics = Metrics()
        pool = UpstreamPool([self.chain], PoolConfig(), metrics)
        self.tracker = HeadTracker(pool, PROFILES["devnet"], metrics, window=16, backfill=0)
        cache = MemoryCache(1 << 20, 1 << 16)
        self.feed = BlockFeed(pool, self.tracker, cache, metrics, window=16)
        self.heads: list[dict[str, Any]] = []
        self.events: list[BlockEvent] = []
        self.feed.add_head_listener(self.heads.append)
        self.feed.add_listener(self.events.extend)

    async def push(self, h: Header) -> None:
        """The upstream's head stream sends ``h``, as ``HeadTracker._spawn_header`` takes it,
        and the tracker adopts it before this returns."""
        payload = self.chain.pushed(h)
        self.tracker.last_payload = self.tracker.pushed[h.hash] = payload
        await self.tracker.on_header(self.chain, h)

    def head_numbers(self) -> list[int]:
        return [int(x["number"], 16) for x in self.heads]

    def delivered(self) -> list[tuple[int, str, bool]]:
        return [(e.number, e.hash, e.announced) for e in self.events if not e.removed]

    async def wait_events(self, count: int) -> None:
        await until(lambda: len(self.events) >= count, 5 * SECOND, f"{count} block events")


@pytest.fixture
async def lab() -> Any:
    lab = Lab()
    await lab.feed.start()
    yield lab
    await lab.feed.stop()
    await lab.tracker.stop()


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
    lab.tracker._spawn_header(c, c.pushed(two))
    lab.tracker._spawn_header(c, c.pushed(three))
    await until(lambda: len(lab.heads) == 2, 5 * SECOND, "both heads")
    assert lab.heads == [c.pushed(two), c.pushed(three)]
    assert len(lab.events) == 1  # neither block fetched yet
    c.receipts_open.set()
    await lab.wait_events(3)
    assert [(n, early) for n, _, early in lab.delivered()] == [(1, False), (2, True), (3, True)]
