"""The pool's deadline, rotation and "slow down" rules, with in-memory upstreams (no sockets).

One deadline per call covers all its tries; a try is cut to what is left of it; an upstream
out of rotation is never tried (the call is refused at once) and is back within one probe
interval of answering again; a 429 is "slow down", never a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypedDict, Unpack

import orjson
import pytest

from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import HeadConfig, LimitsConfig, PoolConfig
from chainrelay.errors import NoUpstreamInRotation, UpstreamTimeout, UpstreamUnavailable
from chainrelay.metrics import Metrics
from chainrelay.rpc.cache import MemoryCache
from chainrelay.rpc.service import RpcService
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import TransportError, Upstream
from tests.lab.procs import until
from tests.lab.timing import SECOND

# The deadline the tests give a call, and the margin its end is held to (a loaded machine
# may run the timer late, never early).
DEADLINE = 0.3 * SECOND
LATE = 0.25 * SECOND


class MemoryUpstream(Upstream):
    """An upstream in memory whose behaviour the test switches: "ok", "hang" or "429"."""

    def __init__(self, name: str, behaviour: str = "ok", timeout: float = 5.0) -> None:
        super().__init__(name, f"memory://{name}", timeout=timeout, connections=1)
        self.behaviour = behaviour
        self.requests = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        self.requests += 1
        if self.behaviour == "hang":
            await asyncio.Event().wait()
        if self.behaviour == "429":
            raise TransportError("HTTP 429, retry after 0s", retry_after=0.0)
        rid = orjson.loads(body)["id"]
        return orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": "0x2a"})


class PoolChanges(TypedDict, total=False):
    """The [pool] settings a test here changes."""

    max_consecutive_errors: int
    probe_interval: float


def pool_of(*upstreams: Upstream, **settings: Unpack[PoolChanges]) -> UpstreamPool:
    cfg = PoolConfig(deadline=DEADLINE, hedge=False, **settings)
    return UpstreamPool(list(upstreams), cfg, Metrics())


async def timed(call: Awaitable[object]) -> tuple[float, BaseException | None]:
    started = time.perf_counter()
    try:
        await call
    except Exception as exc:
        return time.perf_counter() - started, exc
    return time.perf_counter() - started, None


async def test_a_hanging_upstream_costs_one_deadline_whatever_the_tries() -> None:
    # Three tries of 0.4 deadlines each would take 1.2 deadlines; the third is cut short.
    u = MemoryUpstream("hang", "hang", timeout=0.4 * DEADLINE)
    pool = pool_of(u, max_consecutive_errors=1000)
    took, exc = await timed(pool.call("eth_getBalance", ["0x00", "pending"]))
    assert isinstance(exc, UpstreamTimeout), exc
    assert DEADLINE * 0.95 <= took <= DEADLINE + LATE, took
    assert u.requests == 3
    await pool.stop()


async def test_a_try_the_deadline_cut_below_half_its_timeout_is_not_held_against_it() -> None:
    u = MemoryUpstream("hang", "hang", timeout=0.45 * DEADLINE)  # the third try: 0.1
    pool = pool_of(u, max_consecutive_errors=3)
    _, exc = await timed(pool.call("eth_call", [{}]))
    assert isinstance(exc, UpstreamTimeout), exc
    assert (u.requests, u.errors, u.consecutive_errors) == (3, 3, 2)
    assert u.healthy
    await pool.stop()


async def test_a_try_longer_than_the_deadline_is_cut_to_it() -> None:
    u = MemoryUpstream("hang", "hang", timeout=10 * DEADLINE)
    pool = pool_of(u)
    took, exc = await timed(pool.call("eth_call", [{}, "latest"]))
    assert isinstance(exc, UpstreamTimeout), exc
    assert took <= DEADLINE + LATE, took
    await pool.stop()


async def test_a_deadline_spent_before_the_pool_ends_the_call_at_once_with_a_timeout() -> None:
    # The forwarding path's try took the whole deadline: no try is left for the pool.
    u = MemoryUpstream("ok")
    pool = pool_of(u)
    started = time.perf_counter() - DEADLINE
    took, exc = await timed(
        pool.call("eth_call", [{}], spent=1, tried=(u,), deadline=started + DEADLINE)
    )
    assert isinstance(exc, UpstreamTimeout), exc
    assert took < LATE and u.requests == 0


async def test_no_upstream_in_rotation_refuses_at_once_and_a_probe_brings_it_back() -> None:
    interval = 0.2 * SECOND
    u = MemoryUpstream("dead", "hang", timeout=0.1 * SECOND)
    pool = pool_of(u, max_consecutive_errors=1, probe_interval=interval)
    _, exc = await timed(pool.call("eth_call", [{}]))
    assert isinstance(exc, UpstreamTimeout)
    assert not u.healthy
    asked = u.requests
    took, exc = await timed(pool.call("eth_call", [{}]))
    assert isinstance(exc, NoUpstreamInRotation) and exc.code == -32001, exc
    assert took < 0.05 * SECOND and u.requests == asked
    _, exc = await timed(pool.broadcast("eth_sendRawTransaction", ["0x00"]))
    assert isinstance(exc, NoUpstreamInRotation), exc
    # Probes go on one interval apart even though each one hangs (each is bounded).
    await until(lambda: u.requests - asked >= 2, 2 * interval + LATE, "a second probe")
    u.behaviour = "ok"
    await until(lambda: u.healthy, interval + LATE, "back in rotation within an interval")
    answer = await pool.call("eth_call", [{}])
    assert answer.result == b'"0x2a"'
    await pool.stop()


async def test_a_429_storm_never_takes_the_upstream_out_and_ends_each_call_early() -> None:
    u = MemoryUpstream("busy", "429")
    pool = pool_of(u, max_consecutive_errors=1)
    for _ in range(10):
        took, exc = await timed(pool.call("eth_call", [{}]))
        assert isinstance(exc, UpstreamUnavailable) and "429" in str(exc), exc
        assert took <= DEADLINE + LATE
    assert u.healthy and u.consecutive_errors == 0
    await pool.stop()


async def test_a_429_retry_after_past_the_deadline_is_not_waited_for() -> None:
    u = MemoryUpstream("busy", "ok")
    pool = pool_of(u)
    u.slow_until = time.perf_counter() + 10 * DEADLINE
    took, exc = await timed(pool.call("eth_call", [{}]))
    assert isinstance(exc, UpstreamUnavailable), exc
    assert took < LATE and u.requests == 0
    await pool.stop()


async def test_with_one_upstream_hanging_the_other_answers_within_the_deadline() -> None:
    dead, live = MemoryUpstream("dead", "hang", 0.3 * DEADLINE), MemoryUpstream("live")
    dead.latency, live.latency = 0.001, 0.002  # the dead one is tried first
    pool = pool_of(dead, live)
    took, exc = await timed(pool.call("eth_call", [{}]))
    assert exc is None, exc
    assert took <= DEADLINE
    assert dead.requests == 1 and live.requests == 1
    await pool.stop()


async def test_a_write_to_hanging_upstreams_ends_by_the_deadline() -> None:
    u = MemoryUpstream("hang", "hang", timeout=10 * DEADLINE)
    pool = pool_of(u)
    took, exc = await timed(pool.broadcast("eth_sendRawTransaction", ["0x00"]))
    assert isinstance(exc, UpstreamTimeout), exc
    assert DEADLINE * 0.95 <= took <= DEADLINE + LATE
    await pool.stop()


@pytest.fixture
async def stale() -> RpcService:
    """A pipeline whose head is stale and whose only upstream is out of rotation."""
    metrics = Metrics()
    u = MemoryUpstream("dead", "hang")
    u.healthy = False
    pool = UpstreamPool([u], PoolConfig(), metrics)
    head = HeadTracker(pool, PROFILES["bsc"], metrics, HeadConfig())
    head.view.number = 100
    head.view.hash = "0x" + "ab" * 32
    assert not head.fresh
    return RpcService(MemoryCache(1 << 20, 1 << 16), pool, head, metrics, 56, LimitsConfig())


async def test_the_chain_id_is_local_and_a_stale_block_number_fails_fast(
    stale: RpcService,
) -> None:
    got = stale.handle(b'{"jsonrpc":"2.0","id":7,"method":"eth_chainId"}')
    assert got == b'{"jsonrpc":"2.0","id":7,"result":"0x38"}'
    later = stale.handle(b'{"jsonrpc":"2.0","id":8,"method":"eth_blockNumber"}')
    assert not isinstance(later, bytes)
    started = time.perf_counter()
    answer = orjson.loads(await later or b"")
    assert time.perf_counter() - started < LATE
    assert answer["error"]["code"] == -32001, answer
    assert answer["error"]["message"] == "no upstream in rotation"


def hedged_pool(*upstreams: MemoryUpstream) -> UpstreamPool:
    """A pool that hedges: the first upstream has latencies enough to hedge on (1 ms)."""
    cfg = PoolConfig(deadline=DEADLINE, hedge=True, hedge_min_delay=0.05 * SECOND)
    for u in upstreams:
        u.samples.extend([0.001] * 32)
        u.latency = 0.001
    upstreams[-1].latency = 0.002  # the first is tried first
    return UpstreamPool(list(upstreams), cfg, Metrics())


async def test_a_hedge_answers_for_a_hanging_upstream_well_inside_the_deadline() -> None:
    dead, live = MemoryUpstream("dead", "hang"), MemoryUpstream("live")
    pool = hedged_pool(dead, live)
    took, exc = await timed(pool.call("eth_call", [{}]))
    assert exc is None, exc
    assert took < DEADLINE / 2 and live.requests == 1
    await pool.stop()


async def test_hedges_on_hanging_upstreams_end_by_the_deadline() -> None:
    a, b = MemoryUpstream("a", "hang"), MemoryUpstream("b", "hang")
    pool = hedged_pool(a, b)
    took, exc = await timed(pool.call("eth_call", [{}]))
    assert isinstance(exc, UpstreamTimeout), exc
    assert DEADLINE * 0.95 <= took <= DEADLINE + LATE, took
    assert a.requests == b.requests == 1  # the first try and its hedge, both cut short
    await pool.stop()
