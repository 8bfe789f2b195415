"""The head tracker's canonical chain: linking, gap filling, reorgs, finality; no sockets.

An in-memory chain stands in for an upstream's answers to ``eth_getBlockByHash``; the
tracker's logic is what is under test.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from chainrelay.chain.head import Header, HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.chain.sharedhead import SLOTS, Finality, SharedHead
from chainrelay.config import HeadConfig, PoolConfig
from chainrelay.metrics import Metrics
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.route import FALLBACK, PRIMARY, Route
from chainrelay.upstreams.upstream import Upstream
from tests.lab.procs import until
from tests.lab.timing import SECOND


def h(fork: str, n: int) -> str:
    return "0x" + f"{fork}{n:x}".rjust(64, "0")


class MemoryChain(Upstream):
    """Answers block lookups from a dict of blocks; counts what it was asked."""

    def __init__(self) -> None:
        super().__init__("mem", "memory://", timeout=1.0, connections=1)
        self.blocks: dict[str, dict[str, Any]] = {}
        self.asked: list[str] = []
        self.tags: list[str] = []  # eth_getBlockByNumber's block tags asked
        self.finalized: int | None = None

    def add(self, fork: str, n: int, parent_fork: str) -> Header:
        parent = h(parent_fork, n - 1) if n > 0 else "0x" + "0" * 64
        block = {"number": hex(n), "hash": h(fork, n), "parentHash": parent}
        self.blocks[block["hash"]] = block
        return Header(n, block["hash"], parent)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        req = orjson.loads(body)
        method, params = req["method"], req.get("params", [])
        if method == "eth_getBlockByHash":
            self.asked.append(params[0])
            result: Any = self.blocks.get(params[0])
        elif method == "eth_getBlockByNumber" and params[0] == "finalized":
            self.tags.append(params[0])
            result = None
            if self.finalized is not None:
                n = self.finalized
                result = next(b for b in self.blocks.values() if int(b["number"], 16) == n)
        else:
            if method == "eth_getBlockByNumber":
                self.tags.append(params[0])
            result = None
        return orjson.dumps({"jsonrpc": "2.0", "id": req["id"], "result": result})


@pytest.fixture
def chain() -> MemoryChain:
    return MemoryChain()


@pytest.fixture
def tracker(chain: MemoryChain) -> HeadTracker:
    metrics = Metrics()
    pool = UpstreamPool([chain], PoolConfig(), metrics)
    return HeadTracker(
        pool, PROFILES["devnet"], metrics, HeadConfig(reorg_window=16, backfill_blocks=0)
    )


def extend(chain: MemoryChain, fork: str, lo: int, hi: int, parent_fork: str) -> list[Header]:
    out = [chain.add(fork, lo, parent_fork)]
    out += [chain.add(fork, n, fork) for n in range(lo + 1, hi + 1)]
    return out


async def test_consecutive_heads_link_without_lookups(
    chain: MemoryChain, tracker: HeadTracker
) -> None:
    for header in extend(chain, "a", 0, 5, "a"):
        await tracker.on_header(chain, header)
    view = tracker.view
    assert view.number == 5
    assert view.canonical == {n: h("a", n) for n in range(6)}
    assert chain.asked == []


async def test_a_gap_is_filled_by_walking_parents(chain: MemoryChain, tracker: HeadTracker) -> None:
    headers = extend(chain, "a", 0, 9, "a")
    await tracker.on_header(chain, headers[2])
    seen: list[list[int]] = []
    tracker.listeners.append(lambda added, removed: seen.append([x.number for x in added]))
    await tracker.on_header(chain, headers[9])
    assert tracker.view.canonical == {n: h("a", n) for n in range(2, 10)}
    assert seen == [[3, 4, 5, 6, 7, 8, 9]]


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
async def test_reorg_replaces_the_orphaned_blocks(
    chain: MemoryChain, tracker: HeadTracker, depth: int
) -> None:
    for header in extend(chain, "a", 0, 10, "a"):
        await tracker.on_header(chain, header)
    events: list[tuple[list[int], list[int]]] = []
    tracker.listeners.append(
        lambda added, removed: events.append(
            ([x.number for x in added], [x.number for x in removed])
        )
    )
    fork_at = 10 - depth + 1
    new = extend(chain, "b", fork_at, 11, "a")
    await tracker.on_header(chain, new[-1])
    view = tracker.view
    assert view.number == 11 and view.hash == h("b", 11)
    for n in range(fork_at):
        assert view.canonical[n] == h("a", n)
    for n in range(fork_at, 12):
        assert view.canonical[n] == h("b", n)
    assert all(h("a", n) not in view.numbers for n in range(fork_at, 11))
    added, removed = events[-1]
    assert added == list(range(fork_at, 12))
    assert sorted(removed) == list(range(fork_at, 11))


async def test_same_height_replacement_is_a_reorg(chain: MemoryChain, tracker: HeadTracker) -> None:
    for header in extend(chain, "a", 0, 6, "a"):
        await tracker.on_header(chain, header)
    before = tracker.view.generation
    replacement = extend(chain, "c", 5, 6, "a")
    await tracker.on_header(chain, replacement[-1])
    assert tracker.view.canonical[5] == h("c", 5)
    assert tracker.view.canonical[6] == h("c", 6)
    assert tracker.view.generation > before


async def test_lagging_headers_do_not_move_the_head(
    chain: MemoryChain, tracker: HeadTracker
) -> None:
    headers = extend(chain, "a", 0, 8, "a")
    await tracker.on_header(chain, headers[8])
    other = extend(chain, "z", 3, 4, "a")
    await tracker.on_header(chain, other[-1])
    assert tracker.view.number == 8
    assert tracker.view.canonical.get(4) != h("z", 4)


async def test_window_is_bounded(chain: MemoryChain, tracker: HeadTracker) -> None:
    for header in extend(chain, "a", 0, 100, "a"):
        await tracker.on_header(chain, header)
    view = tracker.view
    assert len(view.canonical) <= tracker.window + 1
    assert len(view.numbers) == len(view.canonical)
    assert min(view.canonical) >= 100 - tracker.window


async def test_finalized_from_the_tag_never_goes_back(
    chain: MemoryChain, tracker: HeadTracker
) -> None:
    headers = extend(chain, "a", 0, 12, "a")
    for header in headers[:9]:
        await tracker.on_header(chain, header)
    chain.finalized = 6
    await tracker._refresh_finality(chain)
    assert tracker.view.finalized == 6
    chain.finalized = 3
    await tracker._refresh_finality(chain)
    assert tracker.view.finalized == 6
    assert tracker.view.safe >= tracker.view.finalized


async def test_missing_tag_falls_back_to_the_profile_depth(
    chain: MemoryChain, tracker: HeadTracker
) -> None:
    headers = extend(chain, "a", 0, 100, "a")
    for header in headers[:90]:
        await tracker.on_header(chain, header)
    assert tracker.view.finalized == -1  # nothing assumed before the upstream is asked
    await tracker._refresh_finality(chain)  # the chain answers null: no tag
    await tracker.on_header(chain, headers[90])
    assert tracker.view.finalized == 90 - PROFILES["devnet"].fallback_finality_depth


async def test_first_head_backfills_the_window_behind_it(chain: MemoryChain) -> None:
    metrics = Metrics()
    pool = UpstreamPool([chain], PoolConfig(), metrics)
    tracker = HeadTracker(
        pool, PROFILES["devnet"], metrics, HeadConfig(reorg_window=16, backfill_blocks=64)
    )
    headers = extend(chain, "a", 0, 40, "a")
    await tracker.on_header(chain, headers[40])
    assert tracker._backfill_task is not None
    await tracker._backfill_task
    view = tracker.view
    assert view.canonical == {n: h("a", n) for n in range(24, 41)}
    assert all(view.numbers[h("a", n)] == n for n in range(24, 41))
    await tracker.on_header(chain, headers[39])  # nothing new
    assert view.number == 40


# --- under serve --workers: the feeder's head, shared ------------------------------------
def test_a_shared_head_vouches_for_heads_at_most_one_block_behind_the_feeders() -> None:
    shared = SharedHead([0.0] * SLOTS)
    assert shared.confirmed_for(10) == 0.0  # nothing published yet
    assert shared.finality(100.0, 5.0) is None
    shared.publish(11, 100.0, 5, 8)
    assert shared.confirmed_for(11) == 100.0
    assert shared.confirmed_for(12) == 100.0  # a worker ahead: the feeder is not behind it
    assert shared.confirmed_for(10) == 100.0  # block 11's frame is on its way to it
    assert shared.confirmed_for(9) == 0.0  # two behind: the feeder vouches for nothing
    assert shared.finality(104.9, 5.0) == Finality(5, 8)
    assert shared.finality(105.0, 5.0) is None  # confirmed nothing lately: it is away


def tracker_of(chain: MemoryChain, **kw: Any) -> HeadTracker:
    metrics = Metrics()
    pool = UpstreamPool([chain], PoolConfig(), metrics)
    cfg = HeadConfig(reorg_window=16, backfill_blocks=0, finality_refresh_blocks=1)
    return HeadTracker(pool, PROFILES["devnet"], metrics, cfg, **kw)


async def test_a_worker_takes_the_feeders_finality_and_asks_its_upstream_for_none() -> None:
    feeder_chain, worker_chain = MemoryChain(), MemoryChain()
    shared = SharedHead([0.0] * SLOTS)
    feeder = tracker_of(feeder_chain, share_to=shared)
    worker = tracker_of(worker_chain, pushed_only=True, shared=shared)
    headers = extend(feeder_chain, "a", 0, 12, "a")
    extend(worker_chain, "a", 0, 12, "a")
    feeder_chain.finalized = 10
    for header in headers:
        await feeder.on_header(feeder_chain, header)
        assert feeder._finality_task is not None
        await feeder._finality_task
    assert (feeder.view.finalized, feeder.view.safe) == (10, 10)
    for header in headers[:9]:  # the worker's frames lag: block 8 is its head
        await worker.on_header(worker_chain, header)
    assert (worker.view.finalized, worker.view.safe) == (8, 8)  # never past its head
    await worker.on_header(worker_chain, headers[12])
    assert (worker.view.finalized, worker.view.safe) == (10, 10)
    assert worker_chain.tags == []
    assert worker._finality_task is None


async def test_a_worker_asks_its_upstream_for_finality_once_the_feeder_is_away() -> None:
    chain = MemoryChain()
    shared = SharedHead([0.0] * SLOTS)
    worker = tracker_of(chain, pushed_only=True, shared=shared)
    headers = extend(chain, "a", 0, 12, "a")
    chain.finalized = 4
    away = time.monotonic() - 2 * worker.feeder_away_after
    shared.publish(5, away, 3, 3)  # the feeder's last word, long ago
    await worker.on_header(chain, headers[5])
    assert worker._finality_task is not None
    await worker._finality_task
    assert chain.tags == ["finalized", "safe"]
    assert worker.view.finalized == 4


async def test_a_worker_is_fresh_while_the_feeder_confirms_its_head() -> None:
    chain = MemoryChain()
    shared = SharedHead([0.0] * SLOTS)
    worker = tracker_of(chain, pushed_only=True, shared=shared)
    headers = extend(chain, "a", 0, 12, "a")
    await worker.on_header(chain, headers[7])
    worker.confirmed_at = 0.0  # its own word is old
    assert not worker.fresh and not worker._feeder_confirms()
    shared.publish(8, time.monotonic(), 0, 0)  # the feeder, one block ahead, just now
    assert worker.fresh and worker._feeder_confirms()
    shared.publish(9, time.monotonic(), 0, 0)  # two ahead: this worker's frames are stuck
    assert not worker.fresh and not worker._feeder_confirms()
    shared.publish(7, time.monotonic() - worker.feeder_away_after, 0, 0)  # away
    assert not worker.fresh and not worker._feeder_confirms()


async def test_a_worker_whose_link_to_the_feeder_is_down_confirms_its_head_itself() -> None:
    chain = MemoryChain()
    shared = SharedHead([0.0] * SLOTS)
    linked = True
    worker = tracker_of(chain, pushed_only=True, shared=shared, feeder_linked=lambda: linked)
    headers = extend(chain, "a", 0, 12, "a")
    await worker.on_header(chain, headers[7])
    shared.publish(7, time.monotonic(), 0, 0)
    assert worker._feeder_confirms()
    linked = False  # the feeder died: its last word still looks fresh, for a while
    assert not worker._feeder_confirms()


class HeadNode(MemoryChain):
    """A chain in memory whose ``latest`` is ``head``; counts its head reads."""

    def __init__(self, name: str, tier: int) -> None:
        super().__init__()
        self.name = name
        self.route = Route(tier=tier)
        self.head: Header | None = None

    async def request(self, body: bytes) -> bytes:
        req = orjson.loads(body)
        if req["method"] == "eth_getBlockByNumber" and req["params"][0] == "latest":
            self.tags.append("latest")
            block = self.blocks[self.head.hash] if self.head is not None else None
            return orjson.dumps({"jsonrpc": "2.0", "id": req["id"], "result": block})
        if req["method"] == "eth_syncing":
            return orjson.dumps({"jsonrpc": "2.0", "id": req["id"], "result": False})
        return await super().request(body)


async def test_a_fallback_is_checked_slowly_votes_on_nothing_then_followed_when_it_serves() -> None:
    primary, paid = HeadNode("primary", PRIMARY), HeadNode("paid", FALLBACK)
    primary.head = extend(primary, "a", 0, 100, "a")[-1]
    paid.head = extend(paid, "a", 0, 20, "a")[-1]  # 80 blocks behind: past max_ahead
    metrics = Metrics()
    pool = UpstreamPool([primary, paid], PoolConfig(), metrics)
    cfg = HeadConfig(reorg_window=16, backfill_blocks=0, fallback_interval=0.4, max_ahead_blocks=64)
    tracker = HeadTracker(pool, PROFILES["devnet"], metrics, cfg)
    await tracker.start()
    try:
        assert await tracker.wait_ready(5.0)
        started = time.monotonic()
        await until(lambda: paid.tags.count("latest") >= 3, 5 * SECOND, "three slow checks")
        took = time.monotonic() - started
        # One check each interval, no more; its old head flags no primary "ahead".
        assert paid.tags.count("latest") <= took / 0.4 + 2, (paid.tags, took)
        assert paid.slow_lag == 80 and pool.head_flags == {} and tracker.view.number == 100
        # The primary goes down: the fallback serves, followed at full cadence, and votes.
        primary.healthy = False
        await until(lambda: paid.slow_lag is None, 5 * SECOND, "the fallback to serve")
        paid.head = extend(paid, "a", 21, 120, "a")[-1]
        await until(lambda: tracker.view.number == 120, 5 * SECOND, "the fallback's head")
    finally:
        await tracker.stop()
