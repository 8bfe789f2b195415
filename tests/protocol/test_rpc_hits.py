"""The request pipeline's synchronous hit paths, without sockets or upstreams.

A call answered from cache once is answered again, id aside, through the body-remainder
fast path; the answers must be those of the full path, and the fast path must end with
the head it was learned at.
"""

from __future__ import annotations

from collections.abc import Coroutine

import orjson
import pytest

from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import HeadConfig, LimitsConfig, PoolConfig
from chainrelay.defaults import MEMO_MAX_PARAMS_BYTES
from chainrelay.metrics import Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import MemoryCache, new_entry
from chainrelay.rpc.policy import HeadView
from chainrelay.rpc.service import RpcService
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import Upstream
from chainrelay.wire.jsonrpc import parse_body

ADDR = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


class NoUpstream(Upstream):
    """Fails the test if the pipeline ever leaves the hit path."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        raise AssertionError(f"upstream asked: {body!r}")


def head_at(view: HeadView, n: int) -> None:
    view.number = n
    view.hash = "0x" + f"{n:x}".rjust(64, "a")
    view.canonical = {i: "0x" + f"{i:x}".rjust(64, "a") for i in range(max(0, n - 20), n + 1)}
    view.numbers = {h: i for i, h in view.canonical.items()}
    view.finalized = n - 10
    view.generation += 1


@pytest.fixture
def service() -> RpcService:
    metrics = Metrics()
    pool = UpstreamPool(
        [NoUpstream("none", "none://", timeout=1, connections=1)], PoolConfig(), metrics
    )
    head = HeadTracker(pool, PROFILES["devnet"], metrics, HeadConfig())
    head_at(head.view, 100)
    return RpcService(MemoryCache(1 << 20, 1 << 16), pool, head, metrics, 56, LimitsConfig())


def body(id_: object, block: str = "latest") -> bytes:
    return orjson.dumps(
        {"jsonrpc": "2.0", "id": id_, "method": "eth_getBalance", "params": [ADDR, block]}
    )


def warm(service: RpcService, value: bytes) -> None:
    (call,), _ = parse_body(body(0), 10)
    assert not isinstance(call, bytes)
    key = policy.plan(call.method, call.params, service.view).key
    assert key is not None
    service.cache.put(key, new_entry(value))


def test_repeated_calls_take_the_fast_path_with_their_own_ids(service: RpcService) -> None:
    warm(service, b'"0x2a"')
    first = service.handle(body(1))
    assert first == b'{"jsonrpc":"2.0","id":1,"result":"0x2a"}'
    assert len(service._seen) == 1
    for id_ in (2, "two", None, 10**12):
        got = service.handle(body(id_))
        assert isinstance(got, bytes)
        assert orjson.loads(got) == {"jsonrpc": "2.0", "id": id_, "result": "0x2a"}
    assert service.metrics.hits == 5


def test_a_new_head_ends_the_fast_path(service: RpcService) -> None:
    warm(service, b'"0x2a"')
    service.handle(body(1))
    head_at(service.view, 101)  # "latest" is another block now: not in cache
    record = service._seen.get(body(3).replace(b'"id":3', b'"id":'))
    assert record is not None and service.replay(record) is None
    pending, record = service.serve(body(3))
    assert isinstance(pending, Coroutine)  # goes upstream, not to the old answer
    assert record is None
    pending.close()


def test_a_body_that_differs_beyond_its_id_is_not_taken_for_another(
    service: RpcService,
) -> None:
    warm(service, b'"0x2a"')
    service.handle(body(1))
    pending = service.handle(body(4, "0x5a"))  # another block: a different call
    assert isinstance(pending, Coroutine)
    pending.close()


def test_the_plan_memo_stays_within_its_bytes_and_skips_large_params() -> None:
    bound = 4000
    metrics = Metrics()
    pool = UpstreamPool(
        [NoUpstream("none", "none://", timeout=1, connections=1)], PoolConfig(), metrics
    )
    head = HeadTracker(pool, PROFILES["devnet"], metrics, HeadConfig())
    head_at(head.view, 100)
    limits = LimitsConfig(max_hit_table_bytes=bound)
    service = RpcService(MemoryCache(1 << 20, 1 << 16), pool, head, metrics, 56, limits)

    def miss(method: str, params: list[object]) -> None:
        pending = service.handle(
            orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        )
        assert isinstance(pending, Coroutine)  # planned, then sent upstream (never awaited)
        pending.close()

    calls = 300  # distinct calls, more than fit
    for i in range(calls):
        miss("eth_getBalance", ["0x" + f"{i:x}".rjust(40, "0"), "0x5a"])
        assert service._memo.bytes <= bound
    assert 0 < len(service._memo) < calls, "the memo started over"
    # Params past MEMO_MAX_PARAMS_BYTES are planned without being kept.
    data = "0x" + "ab" * MEMO_MAX_PARAMS_BYTES
    miss("eth_call", [{"to": ADDR, "data": data}, "0x5a"])
    assert service._memo, "not cleared: the large call is simply not kept"
    assert all(len(params) <= MEMO_MAX_PARAMS_BYTES for _, params in service._memo)
