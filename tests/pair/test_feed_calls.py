"""The block feed's reads and the request pipeline, in memory: a client's read of the block
being fetched (in any of its forms, or one of its transactions' receipts) rides on the
feed's call; when the feed's call fails, reads nobody joined cost nothing.

Pair tier: a real RpcService and its coalescer against an in-memory upstream whose block
and receipts answers wait until the test lets them go, so the client's read is made
while the feed's call is surely under way.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import orjson
import pytest

from chainrelay.config import PoolConfig
from chainrelay.protocol.chains import PROFILES
from chainrelay.services.blocks import BlockFeed, _Unavailable
from chainrelay.services.cache import MemoryCache
from chainrelay.services.head import HeadTracker
from chainrelay.services.metrics import Metrics
from chainrelay.services.pool import UpstreamPool
from chainrelay.services.rpc import RpcService
from chainrelay.services.upstream import Upstream
from tests.lab.procs import until
from tests.lab.timing import SECOND

N = 100
BLOCK_HASH = "0x" + "b1" * 32
TXS = ["0x" + f"{i:02x}" * 32 for i in (1, 2, 3)]


def block() -> dict[str, Any]:
    txs = [{"hash": t, "blockHash": BLOCK_HASH, "blockNumber": hex(N), "nonce": "0x0"} for t in TXS]
    return {
        "number": hex(N),
        "hash": BLOCK_HASH,
        "parentHash": "0x" + "a0" * 32,
        "transactions": txs,
    }


def receipts() -> list[dict[str, Any]]:
    return [
        {"transactionHash": t, "blockHash": BLOCK_HASH, "blockNumber": hex(N), "logs": []}
        for t in TXS
    ]


class HeldNode(Upstream):
    """Answers one block and its receipts once ``go`` is set; counts calls by method."""

    def __init__(self) -> None:
        super().__init__("mem", "memory://", timeout=10.0, connections=1)
        self.go = asyncio.Event()
        self.fail = False  # answer the block with a server error
        self.refuse_block_hash_object = False  # -32602 to {"blockHash": ...} parameters
        self.methods: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        req = orjson.loads(body)
        method, params = req["method"], req["params"]
        self.methods[method] += 1
        await self.go.wait()
        result: Any = None
        if self.refuse_block_hash_object and isinstance(params[0], dict):
            error = {"code": -32602, "message": "invalid argument 0: hex string expected"}
            return orjson.dumps({"jsonrpc": "2.0", "id": req["id"], "error": error})
        if self.fail:
            error = {"code": -32000, "message": "not now"}
            return orjson.dumps({"jsonrpc": "2.0", "id": req["id"], "error": error})
        if method in ("eth_getBlockByHash", "eth_getBlockByNumber"):
            b = block()
            if not params[1]:
                b["transactions"] = TXS
            result = b
        elif method == "eth_getBlockReceipts":
            result = receipts()
        elif method == "eth_getTransactionReceipt":
            result = next(r for r in receipts() if r["transactionHash"] == params[0])
        return orjson.dumps({"jsonrpc": "2.0", "id": req["id"], "result": result})


class Pair:
    def __init__(self) -> None:
        self.node = HeldNode()
        metrics = Metrics()
        pool = UpstreamPool([self.node], PoolConfig(max_attempts=1), metrics)
        self.head = HeadTracker(pool, PROFILES["devnet"], metrics)
        view = self.head.view
        view.number, view.hash = N, BLOCK_HASH
        view.canonical, view.numbers = {N: BLOCK_HASH}, {BLOCK_HASH: N}
        view.generation += 1
        self.rpc = RpcService(MemoryCache(1 << 20, 1 << 16), pool, self.head, metrics, 56)
        self.feed = BlockFeed(
            pool, self.head, self.rpc.cache, metrics, feed_call=self.rpc.feed_call
        )

    async def client(self, method: str, params: list[Any]) -> Any:
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        got = self.rpc.handle(body)
        raw = got if isinstance(got, bytes) else await got
        return orjson.loads(raw)


@pytest.fixture
def pair() -> Pair:
    return Pair()


async def test_client_reads_of_the_block_being_fetched_ride_on_the_feeds_calls(pair: Pair) -> None:
    fetch = asyncio.ensure_future(pair.feed._fetch_once(N, BLOCK_HASH))
    await until(lambda: pair.node.methods["eth_getBlockByHash"] == 1, 5 * SECOND, "the fetch")
    reads = [
        ("eth_getBlockByHash", [BLOCK_HASH, True]),
        ("eth_getBlockByHash", [BLOCK_HASH, False]),
        ("eth_getBlockByNumber", [hex(N), False]),
        ("eth_getBlockByNumber", ["latest", True]),
    ]
    clients = [asyncio.ensure_future(pair.client(m, p)) for m, p in reads]
    pair.node.go.set()
    await until(lambda: pair.node.methods["eth_getBlockReceipts"] == 1, 5 * SECOND, "receipts")
    receipt_reads = [asyncio.ensure_future(pair.client("eth_getTransactionReceipt", [TXS[1]]))]
    event, _ = await fetch
    got = await asyncio.gather(*clients, *receipt_reads)
    light = {**block(), "transactions": TXS}
    assert [g["result"] for g in got[:4]] == [block(), light, light, block()]
    assert got[4]["result"] == receipts()[1]
    assert event.number == N and len(event.block["transactions"]) == 3
    # One call for the block and one for its receipts, whoever asked.
    assert pair.node.methods == {"eth_getBlockByHash": 1, "eth_getBlockReceipts": 1}


async def test_reads_derived_from_a_failed_feed_call_cost_nothing_unless_joined(
    pair: Pair,
) -> None:
    pair.node.fail = True
    fetch = asyncio.ensure_future(pair.feed._fetch_once(N, BLOCK_HASH))
    await until(lambda: pair.node.methods["eth_getBlockByHash"] == 1, 5 * SECOND, "the fetch")
    joined = asyncio.ensure_future(pair.client("eth_getBlockByNumber", [hex(N), False]))
    await until(lambda: pair.rpc._coalescer.joined >= 1, 5 * SECOND, "the client to join")
    pair.node.go.set()
    with pytest.raises(_Unavailable):  # the feed's own retries take it from there
        await fetch
    answer = await joined
    # The joined read made its own call (and got the node's error); the derived reads
    # nobody joined (the light block by hash, the full block by number) made none.
    assert answer["error"]["code"] == -32000
    assert pair.node.methods == {"eth_getBlockByHash": 1, "eth_getBlockByNumber": 1}


async def test_an_upstream_refusing_block_hash_objects_is_asked_by_hash(pair: Pair) -> None:
    pair.node.refuse_block_hash_object = True
    pair.node.go.set()
    _, raw = await pair.feed._fetch_once(N, BLOCK_HASH)
    assert raw.receipts == receipts()
    assert pair.node.methods == {"eth_getBlockByHash": 1, "eth_getBlockReceipts": 2}
    await pair.feed._fetch_once(N, BLOCK_HASH)  # the block is cached; receipts by hash at once
    assert pair.node.methods == {"eth_getBlockByHash": 1, "eth_getBlockReceipts": 3}
