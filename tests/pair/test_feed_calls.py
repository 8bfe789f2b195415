"""The block follower's calls and the request pipeline, in memory, when its call fails:
reads derived from it that nobody joined cost nothing; a client that joined gets the error.

Pair tier: a real RpcService and its coalescer against a fake upstream that holds every
call until the test lets it go, then answers it with a server error (a node cannot be made
to fail one call on demand). Reads that succeed ride on the follower's calls as well: that is
checked against anvil in tests/system/test_block_feed.py.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import orjson
import pytest

from chainrelay import defaults
from chainrelay.chain.fetch import Unavailable
from chainrelay.chain.follower import BlockFollower
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import HeadConfig, LimitsConfig, PoolConfig, SubscriptionsConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc.cache import MemoryCache
from chainrelay.rpc.service import RpcService
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import Upstream
from tests.lab.procs import until
from tests.lab.timing import SECOND

N = 100
BLOCK_HASH = "0x" + "b1" * 32


class FakeFailingUpstream(Upstream):
    """Holds every call until ``go`` is set, then answers it with a server error; counts
    calls by method."""

    def __init__(self) -> None:
        super().__init__("fake", "memory://", timeout=10.0, connections=1)
        self.go = asyncio.Event()
        self.methods: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        req = orjson.loads(body)
        self.methods[req["method"]] += 1
        await self.go.wait()
        error = {"code": -32000, "message": "not now"}
        return orjson.dumps({"jsonrpc": "2.0", "id": req["id"], "error": error})


class Pair:
    def __init__(self) -> None:
        self.node = FakeFailingUpstream()
        metrics = Metrics()
        pool = UpstreamPool([self.node], PoolConfig(max_attempts=1), metrics)
        self.head = HeadTracker(pool, PROFILES["devnet"], metrics, HeadConfig())
        view = self.head.view
        view.number, view.hash = N, BLOCK_HASH
        view.canonical, view.numbers = {N: BLOCK_HASH}, {BLOCK_HASH: N}
        view.generation += 1
        self.rpc = RpcService(
            MemoryCache(1 << 20, 1 << 16), pool, self.head, metrics, 56, LimitsConfig()
        )
        self.follower = BlockFollower(
            pool,
            self.head,
            self.rpc.cache,
            metrics,
            SubscriptionsConfig(),
            window=defaults.REORG_WINDOW,
            offered_max_bytes=defaults.OFFERED_MAX_BYTES,
            reads=self.rpc,
        )

    async def client(self, method: str, params: list[Any]) -> Any:
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        got = self.rpc.handle(body)
        raw = got if isinstance(got, bytes) else await got
        assert raw is not None, "no answer owed for a call with an id"
        return orjson.loads(raw)


def coalesced(pair: Pair) -> float:
    """Client reads that waited on a call under way (chainrelay_coalesced_total)."""
    got = pair.rpc.metrics.registry.get_sample_value("chainrelay_coalesced_total")
    return got or 0.0


@pytest.fixture
def pair() -> Pair:
    return Pair()


async def test_reads_derived_from_a_follower_call_a_fake_upstream_fails_cost_nothing_unless_joined(
    pair: Pair,
) -> None:
    fetch = asyncio.ensure_future(pair.follower.fetcher.fetch_once(N, BLOCK_HASH))
    await until(lambda: pair.node.methods["eth_getBlockByHash"] == 1, 5 * SECOND, "the fetch")
    # Its receipts are asked while the block is still on its way: one round trip for both.
    await until(
        lambda: pair.node.methods["eth_getBlockReceipts"] == 1, 5 * SECOND, "the receipts call"
    )
    joined = asyncio.ensure_future(pair.client("eth_getBlockByNumber", [hex(N), False]))
    await until(lambda: coalesced(pair) >= 1, 5 * SECOND, "the client to join")
    pair.node.go.set()
    with pytest.raises(Unavailable):  # the follower's own retries take it from there
        await fetch
    answer = await joined
    # The joined read made its own call (and got the upstream's error); the derived reads
    # nobody joined (the light block by hash, the full block by number) made none. The
    # block's receipts were asked beside the block, once.
    assert answer["error"]["code"] == -32000
    assert pair.node.methods == {
        "eth_getBlockByHash": 1,
        "eth_getBlockByNumber": 1,
        "eth_getBlockReceipts": 1,
    }
