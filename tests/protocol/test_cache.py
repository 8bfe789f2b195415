"""The memory cache (an LRU bounded in bytes) and the coalescer in front of it.

No sockets. The coalescer is asyncio by nature; its tests drive it with futures the test
resolves itself, never with sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
import tracemalloc
from collections.abc import Awaitable, Callable

import orjson
import pytest

from chainrelay.rpc.cache import (
    ANCHOR_HASH,
    ANCHOR_NUMBER,
    ENTRY_OVERHEAD,
    VALUE,
    MemoryCache,
    new_entry,
    stored_entry,
)
from chainrelay.rpc.coalesce import Coalescer
from chainrelay.rpc.policy import Storing


def cost(key: bytes, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


# --- MemoryCache -----------------------------------------------------------------------------
def test_cached_answers_are_not_walked_by_the_garbage_collector() -> None:
    """A full collection walks every object the collector tracks: a cache of a million
    answers, each an object of its own, would stall the loop for a second each time. An
    entry holds only atoms, so the collector lets go of it once it survives a collection."""
    cache = MemoryCache(1 << 20, 1 << 16)
    how = Storing(b"k", 30.0, 7, "0x" + "ab" * 32)
    cache.put(b"anchored", stored_entry(orjson.dumps({"n": 1}), how))
    cache.put(b"plain", new_entry(orjson.dumps([1, 2])))
    gc.collect()
    for key in (b"anchored", b"plain"):
        entry = cache.get(key)
        assert entry is not None and not gc.is_tracked(entry)


def test_a_stored_entry_holds_no_more_than_its_value() -> None:
    """An answer orjson encoded holds the buffer orjson grew for it (4 KiB and up for a
    700-byte log, orjson >= 3.12); the byte bound counts its length, so what is stored is
    held in an allocation of its own size."""
    log = {"address": "0x" + "ab" * 20, "topics": ["0x" + "cd" * 32] * 3, "data": "0x" + "00" * 64}
    log |= {"blockHash": "0x" + "ef" * 32, "transactionHash": "0x" + "12" * 32, "logIndex": "0x1"}
    how = Storing(b"k", 0.0, 7, "0xab")
    n = 2000
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        entries = [stored_entry(orjson.dumps(log), how) for _ in range(n)]
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    size = len(entries[0][VALUE])
    # The value, the entry object and the allocator's rounding: well under 2x the value.
    assert held / n < 2 * size + 200, (held / n, size)


def test_get_returns_what_put_stored_and_none_otherwise() -> None:
    c = MemoryCache(10_000, 1_000)
    assert c.get(b"k") is None
    assert c.put(b"k", new_entry(b'"0x1"', anchor_number=5, anchor_hash="0xab"))
    e = c.get(b"k")
    assert e is not None and e[VALUE] == b'"0x1"'
    assert (e[ANCHOR_NUMBER], e[ANCHOR_HASH]) == (5, "0xab")
    assert len(c) == 1 and c.bytes == cost(b"k", b'"0x1"')


def test_byte_bound_is_never_exceeded_under_a_flood_of_distinct_entries() -> None:
    max_bytes = 64 * 1024
    c = MemoryCache(max_bytes, 4 * 1024)
    rnd = random.Random(7)
    stored = 0
    for i in range(20_000):
        key = b"eth_getBalance:%d" % i
        value = b'"0x' + b"a" * rnd.randrange(0, 3000) + b'"'
        if c.put(key, new_entry(value)):
            stored += 1
        assert c.bytes <= max_bytes
        # The accounting matches what is really held.
        if i % 997 == 0:
            assert c.bytes == sum(cost(k, e[VALUE]) for k, e in c._data.items())
    assert stored == 20_000  # every entry fit the per-entry limit; older ones were evicted
    assert c.evictions == stored - len(c)
    assert c.bytes > max_bytes - 4 * 1024  # the bound is used, not merely respected


def test_least_recently_used_goes_first_and_a_get_refreshes() -> None:
    value = b"x" * 100
    one = cost(b"k0", value)
    c = MemoryCache(3 * one, 10 * one)
    for k in (b"k0", b"k1", b"k2"):
        assert c.put(k, new_entry(value))
    assert c.get(b"k0") is not None  # k0 is now the most recent; k1 the least
    assert c.put(b"k3", new_entry(value))
    assert c.get(b"k1") is None
    assert [c.get(k) is not None for k in (b"k0", b"k2", b"k3")] == [True, True, True]
    assert c.evictions == 1


def test_one_big_put_evicts_as_many_as_needed_and_no_more() -> None:
    c = MemoryCache(1000, 1000)
    small = b"s" * 80
    for i in range(4):
        assert c.put(b"k%d" % i, new_entry(small))  # 4 x 202 bytes
    big = b"b" * (1000 - ENTRY_OVERHEAD - 3 - 2 * cost(b"k0", small))
    assert c.put(b"big", new_entry(big))
    assert c.bytes <= 1000
    assert c.get(b"k0") is None and c.get(b"k1") is None
    assert c.get(b"k2") is not None and c.get(b"k3") is not None and c.get(b"big") is not None


def test_per_entry_limit_refuses_without_evicting() -> None:
    c = MemoryCache(100_000, 500)
    assert c.put(b"a", new_entry(b"1"))
    limit_value = b"v" * (500 - ENTRY_OVERHEAD - 1)
    assert c.put(b"k", new_entry(limit_value))  # exactly at the limit
    assert not c.put(b"z", new_entry(limit_value + b"v"))  # one byte over
    assert c.get(b"z") is None
    assert c.get(b"a") is not None and c.get(b"k") is not None
    assert c.evictions == 0
    tiny = MemoryCache(200, 10_000)  # the whole cache is smaller than the entry
    assert not tiny.put(b"k", new_entry(b"v" * 100))
    assert tiny.bytes == 0


def test_replacing_a_key_accounts_for_the_old_value() -> None:
    c = MemoryCache(10_000, 10_000)
    c.put(b"k", new_entry(b"x" * 1000))
    c.put(b"k", new_entry(b"y" * 10))
    assert len(c) == 1
    assert c.bytes == cost(b"k", b"y" * 10)
    e = c.get(b"k")
    assert e is not None and e[VALUE] == b"y" * 10


def test_expired_entries_are_not_served_and_free_their_bytes() -> None:
    c = MemoryCache(10_000, 10_000)
    now = time.monotonic()
    c.put(b"old", new_entry(b'"0x1"', expires=now - 1.0))
    c.put(b"fresh", new_entry(b'"0x2"', expires=now + 3600.0))
    c.put(b"forever", new_entry(b'"0x3"'))
    assert c.get(b"old") is None
    assert c.get(b"fresh") is not None
    assert c.get(b"forever") is not None
    assert len(c) == 2
    assert c.bytes == cost(b"fresh", b'"0x2"') + cost(b"forever", b'"0x3"')


def test_discard_removes_and_accounts() -> None:
    c = MemoryCache(10_000, 10_000)
    c.put(b"k", new_entry(b"v"))
    c.discard(b"k")
    c.discard(b"missing")
    assert c.get(b"k") is None and len(c) == 0 and c.bytes == 0


# --- Coalescer -------------------------------------------------------------------------------
async def test_concurrent_identical_calls_share_one_call() -> None:
    co: Coalescer[bytes] = Coalescer()
    release: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    entered = asyncio.Event()
    calls: list[str] = []

    def upstream(name: str) -> Callable[[], Awaitable[bytes]]:
        async def call() -> bytes:
            calls.append(name)
            entered.set()
            return await release

        return call

    waiters = [asyncio.ensure_future(co.run(b"k", upstream("k"))) for _ in range(50)]
    other = asyncio.ensure_future(co.run(b"other", upstream("other")))
    # The shared call's task was created by the first waiter, after every waiter was queued:
    # once it runs, all 50 have joined.
    await entered.wait()
    assert len(co) == 2 and b"k" in co and b"other" in co
    assert co.joined == 49
    release.set_result(b'"0x1"')
    assert await asyncio.gather(*waiters) == [b'"0x1"'] * 50
    assert await other == b'"0x1"'
    assert sorted(calls) == ["k", "other"]
    assert len(co) == 0 and b"k" not in co  # finished calls are forgotten
    # A later call is a new call.
    assert await co.run(b"k", _const(b'"0x2"')) == b'"0x2"'


async def test_a_caller_that_goes_away_does_not_cancel_the_others() -> None:
    co: Coalescer[bytes] = Coalescer()
    release: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    entered = asyncio.Event()

    async def upstream() -> bytes:
        entered.set()
        return await release

    first = asyncio.ensure_future(co.run(b"k", upstream))
    second = asyncio.ensure_future(co.run(b"k", upstream))
    await entered.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert b"k" in co  # the shared call goes on
    release.set_result(b"ok")
    assert await second == b"ok"


async def test_a_failed_call_fails_every_waiter_and_is_not_remembered() -> None:
    co: Coalescer[bytes] = Coalescer()
    release: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    entered = asyncio.Event()

    async def upstream() -> bytes:
        entered.set()
        return await release

    waiters = [asyncio.ensure_future(co.run(b"k", upstream)) for _ in range(3)]
    await entered.wait()
    release.set_exception(RuntimeError("upstream down"))
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len(co) == 0
    assert await co.run(b"k", _const(b"again")) == b"again"


async def test_a_call_that_just_finished_is_not_joined() -> None:
    # A finished call's done-callback runs one loop iteration after it ends: a caller that
    # runs in between must start a call of its own, not take an outcome decided before it
    # came.
    co: Coalescer[bytes] = Coalescer()
    loop = asyncio.get_running_loop()
    release: asyncio.Future[None] = loop.create_future()
    late: asyncio.Future[None] = loop.create_future()

    async def for_others() -> bytes:
        await release
        return b"decided before"

    async def late_caller() -> bytes:
        await late  # resumes in the iteration where for_others ends
        return await co.start(b"k", _const(b"fresh"))

    started = co.start(b"k", for_others)
    caller = asyncio.ensure_future(late_caller())
    # Both first run in the next iteration, for_others first: the late caller comes
    # right after it ends, before its done-callback.
    release.set_result(None)
    late.set_result(None)
    assert await caller == b"fresh"
    assert await started == b"decided before"
    assert co.joined == 0
    assert len(co) == 0


def _const(value: bytes) -> Callable[[], Awaitable[bytes]]:
    async def produce() -> bytes:
        return value

    return produce
