"""eth_getLogs split in chunks: where chunks fall, how answers splice, which refusals bisect,
and the scan's bounds (rpc/logsplit.py, rpc/logscan.py)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import orjson
import pytest

from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import HeadConfig, LimitsConfig, PoolConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc import logscan, logsplit
from chainrelay.rpc.cache import MemoryCache
from chainrelay.rpc.logguards import LogGuards
from chainrelay.rpc.logsplit import SplitRule
from chainrelay.rpc.service import RpcService
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import Upstream
from chainrelay.wire.jsonrpc import Answer
from tests.protocol.test_rpc_batches import answer
from tests.protocol.test_rpc_hits import head_at


def test_chunks_are_aligned_and_cover_the_range_once() -> None:
    assert logsplit.chunks(0, 4999, 2000) == [(0, 1999), (2000, 3999), (4000, 4999)]
    assert logsplit.chunks(1500, 6000, 2000) == [
        (1500, 1999),
        (2000, 3999),
        (4000, 5999),
        (6000, 6000),
    ]
    assert logsplit.chunks(7, 7, 2000) == [(7, 7)]
    # Two scans that overlap share their inner chunks (the cache's exact ranges).
    a = set(logsplit.chunks(100, 20_000, 2000))
    b = set(logsplit.chunks(3000, 30_000, 2000))
    assert {(4000, 5999), (18_000, 19_999)} <= a & b


def test_splice_keeps_bytes_and_skips_empty_parts() -> None:
    parts = [b'[{"a":1}, {"b":2}]', b"[]", b" [ ] ", b'[{"c":3}]']
    assert logsplit.splice(parts) == b'[{"a":1}, {"b":2},{"c":3}]'
    assert logsplit.splice([b"[]", b"[]"]) == b"[]"
    assert logsplit.splice([b"[]", b"null"]) is None


@pytest.mark.parametrize(
    "message",
    [
        "query returned more than 10000 results",
        "exceed maximum block range: 5000",
        "Log response size exceeded. You can make eth_getLogs requests with up to a 2K "
        "block range and no limit on the response size",
        "block range is too wide (maximum 1024)",
        "ranges over 10000 blocks are not supported on freetier",
        "eth_getLogs response size exceeded: the answer is over 10485760 bytes",
    ],
)
def test_provider_refusals_are_too_large(message: str) -> None:
    assert logsplit.too_large(orjson.dumps({"code": -32005, "message": message}))


@pytest.mark.parametrize(
    "error",
    [
        b'{"code":-32602,"message":"invalid argument 0: hex string without 0x prefix"}',
        b'{"code":-32000,"message":"header not found"}',
        b"not json",
        None,
    ],
)
def test_other_errors_are_not_too_large(error: bytes | None) -> None:
    assert not logsplit.too_large(error)


def test_halves() -> None:
    assert logsplit.halves(0, 9) == ((0, 4), (5, 9))
    assert logsplit.halves(3, 4) == ((3, 3), (4, 4))
    assert logsplit.halves(5, 5) is None


class Node:
    """A node with one log per block (as JSON naming its block), refusing ranges wider
    than ``cap`` with a provider's wording, counting calls under way."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.asked: list[tuple[int, int]] = []
        self.running = 0
        self.most = 0

    async def ask(self, params: list[Any], index: int) -> Answer:
        flt = params[0]
        lo, hi = int(flt["fromBlock"], 16), int(flt["toBlock"], 16)
        assert flt["address"] == "0xabc"
        self.asked.append((lo, hi))
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0)
        self.running -= 1
        if hi - lo + 1 > self.cap:
            return Answer(None, b'{"code":-32005,"message":"exceed maximum block range: 500"}')
        return Answer(_logs(lo, hi), None)


def _logs(lo: int, hi: int) -> bytes:
    return b"[" + b",".join(b'{"blockNumber":"%x"}' % n for n in range(lo, hi + 1)) + b"]"


GUARDS = LogGuards(100_000, 10, 10, 1_000_000)


async def test_scan_answers_what_one_call_would_bisecting_refused_chunks() -> None:
    node = Node(cap=500)
    flt = {"address": "0xabc", "fromBlock": "0x0", "toBlock": "0x0"}
    got = await logscan.scan(flt, 10, 5009, 2000, 3, node.ask, 10**9, GUARDS.oversize)
    assert got.error is None
    assert got.result == _logs(10, 5009)
    assert node.most <= 3
    served = sorted(r for r in node.asked if r[1] - r[0] + 1 <= 500)
    # The served ranges tile the query exactly: no block asked twice, none missed.
    assert served[0][0] == 10 and served[-1][1] == 5009
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(served))


async def test_scan_stops_at_the_size_guard() -> None:
    node = Node(cap=10**9)
    flt = {"address": "0xabc"}
    got = await logscan.scan(flt, 0, 99_999, 1000, 2, node.ask, 50_000, GUARDS.oversize)
    assert got.result is None and got.error is not None
    assert orjson.loads(got.error)["data"]["limit"] == "logs.max_answer_bytes"
    assert len(node.asked) < 100  # stopped early, not after every chunk


async def test_scan_answers_a_chunks_other_error_as_it_is() -> None:
    refusal = b'{"code":-32000,"message":"header not found"}'

    async def ask(params: list[Any], index: int) -> Answer:
        if params[0]["fromBlock"] == hex(4000):
            return Answer(None, refusal)
        return Answer(b"[]", None)

    got = await logscan.scan({}, 0, 9999, 2000, 4, ask, 10**9, GUARDS.oversize)
    assert got == Answer(None, refusal)


async def test_one_block_refused_is_the_answer() -> None:
    node = Node(cap=0)
    got = await logscan.scan({"address": "0xabc"}, 0, 3, 2, 1, node.ask, 10**9, GUARDS.oversize)
    assert got.error is not None and logsplit.too_large(got.error)


# --- a split call holds the client's slots of upstream calls in flight --------------------


class LogsNode(Upstream):
    """Answers every eth_getLogs a loop turn later: no logs, or (``pad``) one log of ``pad``
    bytes of data in the range's first block; counts the calls under way at once
    (``most``)."""

    def __init__(self, pad: int = 0) -> None:
        super().__init__("logs", "mem://", timeout=30, connections=1)
        self.pad = pad
        self.asked = 0
        self.running = 0
        self.most = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        doc = orjson.loads(body)
        self.asked += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            for _ in range(3):
                await asyncio.sleep(0)
        finally:
            self.running -= 1
        result = b"[]"
        if self.pad:
            number = doc["params"][0]["fromBlock"]
            log = {
                "blockNumber": number,
                "blockHash": "0x" + number[2:].rjust(64, "a"),  # head_at's hashes
                "data": "0x" + "ab" * self.pad,
            }
            result = orjson.dumps([log])
        return b'{"jsonrpc":"2.0","id":' + orjson.dumps(doc["id"]) + b',"result":' + result + b"}"


def logs_service(node: LogsNode, per_client: int) -> RpcService:
    metrics = Metrics()
    pool = UpstreamPool([node], PoolConfig(hedge=False), metrics)
    head = HeadTracker(pool, PROFILES["devnet"], metrics, HeadConfig())
    head_at(head.view, 1_000)
    limits = LimitsConfig(max_upstream_in_flight_per_client=per_client)
    return RpcService(
        MemoryCache(1 << 24, 1 << 20),
        pool,
        head,
        metrics,
        56,
        limits,
        log_split=SplitRule(100, 4),
    )


def wide_logs(lo: int, hi: int) -> bytes:
    flt = {"fromBlock": hex(lo), "toBlock": hex(hi), "address": "0x" + "ab" * 20}
    return orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_getLogs", "params": [flt]})


@pytest.mark.parametrize(("per_client", "most"), [(2, 2), (1, 1), (256, 4)])
async def test_a_split_calls_chunks_in_flight_are_held_to_the_clients_bound(
    per_client: int, most: int
) -> None:
    node = LogsNode()
    service = logs_service(node, per_client)
    got = orjson.loads(await answer(service, wide_logs(0, 999)))  # 10 chunks of 100
    assert got["result"] == [] and node.asked == 10
    # Its chunks went a few at a time, never more than the client's slots (nor the split's
    # concurrency), and every slot was given back.
    assert node.most == most, node.most
    assert service.gate.counts.total == 0 and service.gate.counts.held == {}


async def test_a_client_at_its_bound_has_its_chunks_asked_in_the_one_slot_its_call_holds() -> None:
    node = LogsNode()
    service = logs_service(node, 3)
    assert service.gate.more("10.0.0.1", 2) == 2  # two of its three slots taken elsewhere
    got = orjson.loads(await answer(service, wide_logs(0, 999)))
    assert got["result"] == [] and node.asked == 10 and node.most == 1
    assert service.gate.counts.held == {"10.0.0.1": 2}
    service.gate.leave("10.0.0.1", 2)
    assert service.gate.more("10.0.0.9", 5) == 3, "another client's own three"


async def test_a_split_answer_is_stored_as_its_chunks_only_and_a_second_scan_asks_nothing() -> None:
    node = LogsNode(pad=10_000)
    service = logs_service(node, 256)
    body = wide_logs(0, 899)  # 9 chunks of 100, all final (the head 1,000, final at 990)
    first = await answer(service, body)
    logs = orjson.loads(first)["result"]
    assert [int(x["blockNumber"], 16) for x in logs] == list(range(0, 900, 100))
    whole = len(orjson.dumps(logs))
    # The chunks are stored (9 entries, the answer's bytes once), the spliced whole not.
    assert node.asked == 9 and len(service.cache) == 9
    assert whole < service.cache.bytes < whole * 1.1, (whole, service.cache.bytes)
    stored = service.cache.bytes
    assert await answer(service, body) == first
    assert node.asked == 9 and service.cache.bytes == stored, "served from the chunks"
    # Another window over the same history is served from the same chunks.
    inner = orjson.loads(await answer(service, wide_logs(100, 599)))["result"]
    assert inner == logs[1:6] and node.asked == 9
