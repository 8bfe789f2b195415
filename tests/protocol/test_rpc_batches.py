"""A client batch is one unit of upstream work: its misses go upstream as JSON-RPC batches,
each call answered as it would be alone. No sockets: the upstream is an in-memory node
that answers singles and batches the way geth does (compact, one answer per id)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypedDict, Unpack

import orjson
import pytest

from chainrelay.access.identity import Identity, enter_identity, leave_identity
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import HeadConfig, LimitsConfig, PoolConfig
from chainrelay.errors import UpstreamTimeout, UpstreamUnavailable
from chainrelay.metrics import Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import Entry, MemoryCache, new_entry
from chainrelay.rpc.policy import Finality
from chainrelay.rpc.service import RpcService
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import TransportError, Upstream
from chainrelay.wire.jsonrpc import Answer
from tests.lab.procs import until
from tests.lab.timing import SECOND
from tests.protocol.test_rpc_hits import head_at

# How long a wait for the pipeline's own step may take on a loaded machine.
WAIT = 5 * SECOND


def balance_of(address: str) -> str:
    return hex(int(address, 16) % 1_000_003 * 10**15)


class MemoryNode(Upstream):
    """Answers eth_getBalance (from the address), eth_call (reverts) and eth_gasPrice;
    ``refuse``: answers a batch with one error object, as providers without batches do;
    ``hold``: requests wait until it is set."""

    def __init__(self, *, refuse: bool = False) -> None:
        super().__init__("mem", "mem://", timeout=30, connections=1)
        self.refuse = refuse
        self.requests: list[Any] = []
        self.hold = asyncio.Event()
        self.hold.set()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        doc = orjson.loads(body)
        self.requests.append(doc)
        await self.hold.wait()
        if isinstance(doc, list):
            if self.refuse:
                return b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"no batches"}}'
            return b"[" + b",".join(self._answer(d) for d in reversed(doc)) + b"]"
        return self._answer(doc)

    def _answer(self, d: dict[str, Any]) -> bytes:
        head = b'{"jsonrpc":"2.0","id":' + orjson.dumps(d["id"])
        if d["method"] == "eth_call":
            return head + b',"error":{"code":3,"message":"execution reverted","data":"0x"}}'
        if d["method"] == "eth_gasPrice":
            return head + b',"result":"0x3b9aca00"}'
        if d["method"] == "eth_getBalance":
            return head + b',"result":"' + balance_of(d["params"][0]).encode() + b'"}'
        return head + b',"result":{"method":' + orjson.dumps(d["method"]) + b"}}"

    def sent(self) -> int:
        return sum(len(r) if isinstance(r, list) else 1 for r in self.requests)


class UpstreamBounds(TypedDict, total=False):
    """The [limits] a test here changes."""

    max_upstream_in_flight: int
    max_upstream_in_flight_per_client: int


def make_service(node: MemoryNode, **limits: Unpack[UpstreamBounds]) -> RpcService:
    metrics = Metrics()
    pool = UpstreamPool([node], PoolConfig(hedge=False), metrics)
    head = HeadTracker(pool, PROFILES["devnet"], metrics, HeadConfig())
    head_at(head.view, 100)
    return RpcService(
        MemoryCache(1 << 24, 1 << 20), pool, head, metrics, 56, LimitsConfig(**limits)
    )


def address(i: int) -> str:
    return "0x" + f"{i + 1:x}".rjust(40, "0")


def get_balance(i: int, id_: object, block: str = "0x5a") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "eth_getBalance", "params": [address(i), block]}


async def answer(service: RpcService, body: bytes, peer: str = "10.0.0.1") -> bytes:
    who = Identity(peer)
    got = service.handle(body, who)
    if isinstance(got, bytes):
        return got
    token = enter_identity(who)
    task = asyncio.ensure_future(got)
    leave_identity(token)
    out = await task
    assert out is not None
    return out


async def test_a_batch_of_250_distinct_misses_costs_three_upstream_requests_in_call_order() -> None:
    node = MemoryNode()
    service = make_service(node)
    batch = [get_balance(i, i if i % 2 else f"c{i}") for i in range(250)]
    got = orjson.loads(await answer(service, orjson.dumps(batch)))
    assert len(node.requests) == 3 and [len(r) for r in node.requests] == [100, 100, 50]
    assert [a["id"] for a in got] == [b["id"] for b in batch]
    assert all(a["result"] == balance_of(address(i)) for i, a in enumerate(got))
    # Stored as single calls' answers are: the same batch again costs nothing.
    again = await answer(service, orjson.dumps(batch))
    assert orjson.loads(again) == got and len(node.requests) == 3
    assert service.gate.counts.total == 0


async def test_each_answer_is_byte_for_byte_what_the_call_alone_gets() -> None:
    calls = [
        get_balance(0, 1, "latest"),
        get_balance(1, "x", "pending"),  # never cached
        {"jsonrpc": "2.0", "id": 3, "method": "eth_call", "params": [{"to": address(2)}, "0x5a"]},
        {"jsonrpc": "2.0", "id": 4, "method": "eth_gasPrice"},  # params omitted
        {"jsonrpc": "2.0", "method": "eth_getBalance", "params": [address(5), "0x5a"]},  # no id
        {"jsonrpc": "2.0", "id": 6, "method": "web3_sha3x", "params": []},  # unknown to policy
    ]
    alone = make_service(MemoryNode())
    singles = [await answer(alone, orjson.dumps(c)) for c in calls[:4]]
    singles.append(await answer(alone, orjson.dumps(calls[5])))
    node = MemoryNode()
    batched = await answer(make_service(node), orjson.dumps(calls))
    assert batched == b"[" + b",".join(singles) + b"]"
    assert len(node.requests) == 1
    sent = {d["id"]: d for d in node.requests[0]}
    assert "params" not in next(d for d in sent.values() if d["method"] == "eth_gasPrice")


async def test_hits_are_not_sent_and_duplicates_in_a_batch_cost_one_call() -> None:
    node = MemoryNode()
    service = make_service(node)
    await answer(service, orjson.dumps([get_balance(i, i) for i in range(10)]))
    node.requests.clear()
    batch = [get_balance(i, i) for i in range(20)] + [get_balance(15, "dup")]
    got = orjson.loads(await answer(service, orjson.dumps(batch)))
    assert [len(r) for r in node.requests] == [10]
    assert {d["params"][0] for d in node.requests[0]} == {address(i) for i in range(10, 20)}
    assert got[-1] == {"jsonrpc": "2.0", "id": "dup", "result": balance_of(address(15))}


async def test_a_concurrent_single_call_joins_the_batchs_call_and_the_batch_joins_one() -> None:
    node = MemoryNode()
    service = make_service(node)
    node.hold.clear()
    single = asyncio.ensure_future(answer(service, orjson.dumps(get_balance(0, "s"))))
    await until(lambda: len(node.requests) == 1, WAIT, "the single call sent")
    batch = asyncio.ensure_future(
        answer(service, orjson.dumps([get_balance(i, i) for i in range(5)]), "10.0.0.2")
    )
    await until(lambda: len(node.requests) == 2, WAIT, "the batch's call sent")
    late = asyncio.ensure_future(answer(service, orjson.dumps(get_balance(3, "late")), "10.0.0.3"))
    coalesced = service.metrics.coalesced
    await until(lambda: coalesced._value.get() == 2, WAIT, "the late call joined")
    node.hold.set()
    await asyncio.gather(single, batch, late)
    assert node.sent() == 5  # address 0 by the single call, 1..4 in one batch
    assert [len(r) if isinstance(r, list) else 1 for r in node.requests] == [1, 4]
    assert orjson.loads(late.result())["result"] == balance_of(address(3))
    assert service.metrics.coalesced._value.get() == 2


async def test_a_provider_that_refuses_batches_is_asked_call_by_call() -> None:
    node = MemoryNode(refuse=True)
    service = make_service(node)
    batch = [get_balance(i, i) for i in range(120)]
    got = orjson.loads(await answer(service, orjson.dumps(batch)))
    assert [a["result"] for a in got] == [balance_of(address(i)) for i in range(120)]
    assert len(node.requests) == 2 + 120  # two refused batches, then each call
    assert node.consecutive_errors == 0 and node.healthy


async def test_past_the_node_bound_the_batch_is_answered_minus_32005_at_once() -> None:
    node = MemoryNode()
    service = make_service(node, max_upstream_in_flight=100)
    node.hold.clear()
    first = asyncio.ensure_future(
        answer(service, orjson.dumps([get_balance(i, i) for i in range(100)]), "10.0.0.1")
    )
    await until(lambda: len(node.requests) == 1, WAIT, "the first batch sent")
    shed = await answer(
        service, orjson.dumps([get_balance(i, i) for i in range(100, 200)]), "10.0.0.2"
    )
    assert {a["error"]["code"] for a in orjson.loads(shed)} == {-32005}
    single = await answer(service, orjson.dumps(get_balance(500, 1)), "10.0.0.3")
    overloaded = {"code": -32005, "message": "node overloaded, retry later"}
    assert orjson.loads(single)["error"] == overloaded
    node.hold.set()
    assert all("result" in a for a in orjson.loads(await first))
    assert len(node.requests) == 1 and service.gate.counts.total == 0


async def test_a_client_past_its_own_bound_goes_a_few_chunks_at_a_time() -> None:
    node = MemoryNode()
    service = make_service(node, max_upstream_in_flight_per_client=200)
    node.hold.clear()
    batch = asyncio.ensure_future(
        answer(service, orjson.dumps([get_balance(i, i) for i in range(500)]))
    )
    await until(lambda: len(node.requests) >= 2, WAIT, "two chunks sent")
    assert len(node.requests) == 2  # 200 calls in flight: the other chunks wait
    assert service.gate.counts.held == {"10.0.0.1": 200}
    assert service.gate.enter_now("10.0.0.9", 1)  # another client is not held up
    service.gate.leave("10.0.0.9", 1)
    node.hold.set()
    got = orjson.loads(await batch)
    assert [a["result"] for a in got] == [balance_of(address(i)) for i in range(500)]
    assert [len(r) for r in node.requests if isinstance(r, list)] == [100] * 5


@pytest.mark.parametrize("batch_len", [1, 7])
async def test_the_chunk_length_is_the_pool_setting(batch_len: int) -> None:
    node = MemoryNode()
    metrics = Metrics()
    pool = UpstreamPool([node], PoolConfig(hedge=False, batch_len=batch_len), metrics)
    head = HeadTracker(pool, PROFILES["devnet"], metrics, HeadConfig())
    head_at(head.view, 100)
    service = RpcService(MemoryCache(1 << 24, 1 << 20), pool, head, metrics, 56, LimitsConfig())
    await answer(service, orjson.dumps([get_balance(i, i) for i in range(14)]))
    assert node.sent() == 14 and len(node.requests) == 14 // batch_len


class DictShared:
    """A shared tier in a dict, counting how lookups arrive (one MGET per loop turn)."""

    def __init__(self) -> None:
        self.entries: dict[bytes, Entry] = {}
        self.puts: list[bytes] = []
        self.gets = 0

    async def get(self, key: bytes) -> Entry | None:
        self.gets += 1
        return self.entries.get(key)

    async def put(self, key: bytes, entry: Entry, finality: Finality) -> None:
        self.puts.append(key)
        self.entries[key] = entry

    async def exclusive(self, key: bytes, produce: Callable[[], Awaitable[Answer]]) -> Answer:
        return await produce()


async def test_with_a_shared_tier_its_entries_answer_and_the_rest_goes_up_in_batches() -> None:
    node = MemoryNode()
    service = make_service(node)
    shared = service.shared = DictShared()
    warm = [get_balance(i, i) for i in range(0, 150, 3)]  # 50 the shared tier holds
    await answer(make_service(MemoryNode()), orjson.dumps(warm))
    for c in warm:
        key = policy.plan("eth_getBalance", c["params"], service.view).key
        assert key is not None
        shared.entries[key] = new_entry(orjson.dumps(balance_of(c["params"][0])))
    batch = [get_balance(i, i) for i in range(150)]
    got = orjson.loads(await answer(service, orjson.dumps(batch)))
    assert [a["result"] for a in got] == [balance_of(address(i)) for i in range(150)]
    assert [len(r) for r in node.requests] == [100]  # only what the shared tier lacked
    assert shared.gets == 150 and len(shared.puts) == 100
    assert service.metrics.hits == 50


class DeadNode(MemoryNode):
    """Refuses connections, as a node that is down."""

    async def request(self, body: bytes) -> bytes:
        self.requests.append(orjson.loads(body))
        raise TransportError("connection refused")


async def test_the_pool_fails_a_batch_over_to_the_next_upstream_as_it_does_a_call() -> None:
    dead, live = DeadNode(), MemoryNode()
    live.name = "live"
    pool = UpstreamPool([dead, live], PoolConfig(hedge=False), Metrics())
    dead.latency, live.latency = 0.001, 0.002  # the dead one is tried first
    got = await pool.call_batch([("eth_getBalance", [address(i), "0x5a"]) for i in range(3)])
    assert [a.result for a in got if isinstance(a, Answer)] == [
        f'"{balance_of(address(i))}"'.encode() for i in range(3)
    ]
    assert len(dead.requests) == 1 and len(live.requests) == 1


async def test_a_batch_no_upstream_answers_is_an_upstream_error_for_each_call() -> None:
    pool = UpstreamPool([DeadNode()], PoolConfig(hedge=False, max_attempts=2), Metrics())
    got = await pool.call_batch([("eth_getBalance", [address(i), "0x5a"]) for i in range(3)])
    assert all(isinstance(e, UpstreamUnavailable) and e.attempts == 2 for e in got)


async def test_a_batch_past_its_deadline_is_a_timeout_for_each_call() -> None:
    node = MemoryNode()
    node.hold.clear()
    pool = UpstreamPool([node], PoolConfig(hedge=False), Metrics())
    deadline = time.perf_counter() + 0.05
    calls = [("eth_getBalance", [address(i), "0x5a"]) for i in range(3)]
    got = await pool.call_batch(calls, deadline=deadline)
    assert all(isinstance(e, UpstreamTimeout) and e.code == -32002 for e in got)


async def test_writes_subscriptions_and_filters_in_a_batch_keep_their_own_paths() -> None:
    raw_tx = "0x" + "ab" * 40
    calls = [
        get_balance(0, 1),
        {"jsonrpc": "2.0", "id": 2, "method": "eth_sendRawTransaction", "params": [raw_tx]},
        {"jsonrpc": "2.0", "id": 3, "method": "eth_subscribe", "params": ["newHeads"]},
        {"jsonrpc": "2.0", "id": 4, "method": "eth_newBlockFilter", "params": []},
        get_balance(1, 5),
    ]
    alone = make_service(MemoryNode())
    singles = [await answer(alone, orjson.dumps(c)) for c in calls]
    node = MemoryNode()
    got = await answer(make_service(node), orjson.dumps(calls))
    assert got == b"[" + b",".join(singles) + b"]"
    batches = [r for r in node.requests if isinstance(r, list)]
    assert [[d["method"] for d in r] for r in batches] == [["eth_getBalance"] * 2]
    sent_alone = [r["method"] for r in node.requests if isinstance(r, dict)]
    assert sorted(sent_alone) == ["eth_newBlockFilter", "eth_sendRawTransaction"]  # no filters
