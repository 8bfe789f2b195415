"""The Redis tier between real relay processes, a real redis-server and a real anvil.

Upstream calls are counted by ``tests.lab.counting_proxy`` in front of anvil. anvil mines
only when asked (no interval), so "latest" names one block for the whole test and two
relays key the same call the same way; ``[head] fresh_blocks`` keeps such a still head
counted as fresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chainrelay.devnet import DEV_ACCOUNTS, Anvil
from tests.lab.counting_proxy import CountingProxy, start_proxy
from tests.lab.procs import AnvilFactory, Procs, Relay, RelayFactory, rpc, until
from tests.lab.redis_server import RedisServer, start_redis
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab


STILL_HEAD = "[head]\nfresh_blocks = 1000000.0\n"


def tiered(redis: RedisServer, **cache: Any) -> str:
    """A relay config with the Redis tier in front of ``redis``.

    The command timeout is raised from 250 ms to 1 s: a lab of eight busy processes on two
    cores stalls an event loop for longer than a Redis round trip ever takes, and a tier
    marked down by such a stall would make the counts below depend on scheduling.
    """
    settings = {
        "backend": "tiered",
        "redis_url": redis.url,
        "redis_lock_ttl": 10.0,
        "redis_timeout": 1.0,
        **cache,
    }
    lines = "\n".join(f"{k} = {orjson.dumps(v).decode()}" for k, v in settings.items())
    return f"{STILL_HEAD}\n[cache]\n{lines}\n"


def address(i: int) -> str:
    return "0x" + f"{0xC0FFEE00 + i:040x}"


def call(method: str, params: list[Any], id_: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> Any:
    headers = {"Content-Type": "application/json"}
    async with session.post(url, data=orjson.dumps(body), headers=headers) as r:
        assert r.status == 200, f"HTTP {r.status}"
        return orjson.loads(await r.read())


async def metric(relay: Relay, name: str) -> float:
    return (await relay.metrics()).get(name, 0.0)


def requests(method: str, outcome: str) -> str:
    return f'chainrelay_requests_total{{method="{method}",outcome="{outcome}"}}'


@pytest.fixture
async def redis(procs: Procs, tmp_path: Path) -> RedisServer:
    return await start_redis(procs, tmp_path)


@pytest.fixture
async def still_anvil(anvil_factory: AnvilFactory) -> Anvil:
    node = await anvil_factory(chain_id=56, block_time=None)
    async with aiohttp.ClientSession() as s:
        await post(s, node.url, call("anvil_mine", ["0x5"]))  # a few blocks to stand on
    return node


@pytest.fixture
async def proxy(procs: Procs, still_anvil: Anvil, tmp_path: Path) -> CountingProxy:
    return await start_proxy(procs, still_anvil.url, log_path=tmp_path / "proxy.log")


async def test_a_miss_cached_by_one_relay_is_a_hit_on_the_other(
    redis: RedisServer, proxy: CountingProxy, still_anvil: Anvil, relay_factory: RelayFactory
) -> None:
    a = await relay_factory([proxy.url], tiered(redis), name="a")
    b = await relay_factory([proxy.url], tiered(redis), name="b")
    body = [call("eth_getBalance", [address(i), "latest"], i) for i in range(20)]
    body.append(call("eth_getBalance", [DEV_ACCOUNTS[0], "latest"], 20))
    async with aiohttp.ClientSession() as s:
        direct = await post(s, still_anvil.url, body)
        from_a = await post(s, a.url, body)
        assert from_a == direct
        assert (await proxy.counts()).get("eth_getBalance") == 21
        from_b = await post(s, b.url, body)
    assert from_b == direct
    assert (await proxy.counts()).get("eth_getBalance") == 21  # b asked no upstream
    assert await metric(a, requests("eth_getBalance", "miss")) == 21
    assert await metric(b, requests("eth_getBalance", "shared_hit")) == 21
    assert await metric(b, requests("eth_getBalance", "miss")) == 0
    # Second time on b: its own memory tier answers.
    async with aiohttp.ClientSession() as s:
        assert await post(s, b.url, body) == direct
    assert await metric(b, requests("eth_getBalance", "hit")) == 21
    # Keys are namespaced by chain id.
    keys = await redis.keys("chainrelay:56:v:eth_getBalance:*")
    assert len(keys) == 21


async def test_concurrent_identical_misses_over_four_relays_cost_one_upstream_call(
    procs: Procs,
    redis: RedisServer,
    still_anvil: Anvil,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    held = await start_proxy(
        procs, still_anvil.url, hold=("eth_getBalance",), log_path=tmp_path / "held.log"
    )
    relays = await asyncio.gather(
        *(relay_factory([held.url], tiered(redis), name=f"r{i}") for i in range(4))
    )
    params = [DEV_ACCOUNTS[1], "latest"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        expected = (await post(s, still_anvil.url, call("eth_getBalance", params)))["result"]
        calls = [
            asyncio.create_task(post(s, relays[i % 4].url, call("eth_getBalance", params, i)))
            for i in range(100)
        ]

        async def lined_up() -> bool:
            coalesced = waiting = 0.0
            for r in relays:
                m = await r.metrics()
                coalesced += m.get("chainrelay_coalesced_total", 0.0)
                waiting += m.get("chainrelay_shared_cache_waiting", 0.0)
            return coalesced == 96 and waiting == 3 and await held.held() == 1

        try:
            # 25 calls per relay coalesce into one miss each; three of the four misses wait
            # on the fourth's Redis lock while its upstream call is held at the proxy.
            await until(lined_up, 20 * SECOND, "100 calls lined up behind one upstream call")
            await held.release()
            answers = await asyncio.gather(*calls)
        finally:
            for t in calls:
                t.cancel()
    assert [a["result"] for a in answers] == [expected] * 100
    assert [a["id"] for a in answers] == list(range(100))
    assert (await held.counts()).get("eth_getBalance") == 1
    outcomes: dict[str, float] = {}
    for r in relays:
        m = await r.metrics()
        for o in ("acquired", "waited", "fallback"):
            key = f'chainrelay_shared_cache_locks_total{{outcome="{o}"}}'
            outcomes[o] = outcomes.get(o, 0.0) + m.get(key, 0.0)
    assert outcomes == {"acquired": 1, "waited": 3, "fallback": 0}


async def test_waiters_call_upstream_themselves_when_the_lock_holder_dies(
    procs: Procs,
    redis: RedisServer,
    still_anvil: Anvil,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    held = await start_proxy(
        procs, still_anvil.url, hold=("eth_getBalance",), log_path=tmp_path / "held.log"
    )
    config = tiered(redis, redis_lock_ttl=1.0)
    holder = await relay_factory([held.url], config, name="holder")
    waiter = await relay_factory([held.url], config, name="waiter")
    params = [DEV_ACCOUNTS[2], "latest"]
    async with aiohttp.ClientSession() as s:
        expected = (await post(s, still_anvil.url, call("eth_getBalance", params)))["result"]
        first = asyncio.create_task(post(s, holder.url, call("eth_getBalance", params)))

        async def holding() -> bool:
            return await held.held() > 0

        await until(holding, 10 * SECOND, "the holder's upstream call")
        second = asyncio.create_task(post(s, waiter.url, call("eth_getBalance", params)))
        await until(
            lambda: _gauge(waiter, "chainrelay_shared_cache_waiting", 1.0),
            10 * SECOND,
            "the second relay to wait on the lock",
        )
        assert holder.proc is not None
        os.kill(holder.proc.pid, signal.SIGKILL)  # dies holding the lock
        holder.proc.wait()

        # Once the lock expires the waiter makes its own call (held too, then released); the
        # dead holder's call left the proxy with its connection.
        async def own_call() -> bool:
            return await held.held() == 1 and (await held.counts()).get("eth_getBalance") == 2

        await until(own_call, 10 * SECOND, "the waiter's own call")
        await held.release()
        answer = await second
        with contextlib.suppress(aiohttp.ClientError):
            await first  # its relay is gone
    assert answer["result"] == expected
    assert (await held.counts()).get("eth_getBalance") == 2
    assert await metric(waiter, 'chainrelay_shared_cache_locks_total{outcome="acquired"}') == 1
    assert await metric(waiter, 'chainrelay_shared_cache_locks_total{outcome="waited"}') == 0


async def _gauge(relay: Relay, name: str, want: float) -> bool:
    return await metric(relay, name) == want


async def test_redis_killed_mid_load_fails_no_request_and_is_used_again_after_restart(
    redis: RedisServer, still_anvil: Anvil, relay_factory: RelayFactory
) -> None:
    config = tiered(redis, redis_retry_interval=0.2)
    relays = await asyncio.gather(
        *(relay_factory([still_anvil.url], config, name=f"r{i}") for i in range(2))
    )
    total, kill_at, workers = 1600, 400, 16
    done = 0
    failures: list[str] = []
    killed = asyncio.Event()
    expected_dev = {}
    async with aiohttp.ClientSession() as s:
        for acct in DEV_ACCOUNTS:
            got = await post(s, still_anvil.url, call("eth_getBalance", [acct, "latest"]))
            expected_dev[acct] = got["result"]

        async def one(i: int) -> None:
            nonlocal done
            relay = relays[i % 2]
            if i % 3 == 0:  # a hit after the first time
                acct = DEV_ACCOUNTS[(i // 3) % len(DEV_ACCOUNTS)]
                body = call("eth_getBalance", [acct, "latest"], i)
                want: str | None = expected_dev[acct]
            elif i % 3 == 1:  # a fresh miss every time
                body = call("eth_getBalance", [address(10_000 + i), "latest"], i)
                want = "0x0"
            else:  # misses on one relay, shared hits on the other while Redis lives
                body = call("eth_getTransactionCount", [address(i // 2), "latest"], i)
                want = "0x0"
            try:
                got = await post(s, relay.url, body)
                if got.get("result") != want or got.get("id") != i:
                    failures.append(f"{i}: {got}")
            except (aiohttp.ClientError, OSError, AssertionError) as exc:
                failures.append(f"{i}: {exc!r}")
            done += 1
            if done == kill_at:
                killed.set()

        async def worker(k: int) -> None:
            for i in range(k, total, workers):
                await one(i)

        async def killer() -> None:
            await killed.wait()
            redis.kill()

        async with asyncio.timeout(90 * SECOND):
            await asyncio.gather(killer(), *(worker(k) for k in range(workers)))
    assert failures == []
    assert done == total
    for r in relays:
        m = await r.metrics()
        assert m["chainrelay_shared_cache_up"] == 0
        assert m["chainrelay_shared_cache_down_total"] == 1  # marked down once, then skipped
        assert m['chainrelay_shared_cache_gets_total{outcome="skipped"}'] > 0
        assert (await rpc(r.url, "eth_chainId"))["result"] == "0x38"
    # Back on the same port: each relay reconnects on its own and uses it again.
    await redis.restart()
    for r in relays:
        await until(
            functools.partial(_gauge, r, "chainrelay_shared_cache_up", 1.0),
            10 * SECOND,
            f"relay on port {r.port} to use Redis again",
        )
    a, b = relays
    before = await metric(b, requests("eth_getBalance", "shared_hit"))
    params = [address(99_999), "latest"]
    assert (await rpc(a.url, "eth_getBalance", params))["result"] == "0x0"
    assert (await rpc(b.url, "eth_getBalance", params))["result"] == "0x0"
    assert await metric(b, requests("eth_getBalance", "shared_hit")) == before + 1


async def test_a_flood_of_distinct_calls_never_pushes_memory_past_its_limit(
    redis: RedisServer, still_anvil: Anvil, relay_factory: RelayFactory
) -> None:
    limit = 64 * 1024
    relay = await relay_factory([still_anvil.url], tiered(redis, memory_bytes=limit))
    peak = 0.0
    n, batch = 3000, 100
    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        for start in range(0, n, batch):
            body = [
                call("eth_getBalance", [address(i), "latest"], i)
                for i in range(start, start + batch)
            ]
            answers = await post(s, relay.url, body)
            assert all(a["result"] == "0x0" for a in answers)
            used = await metric(relay, "chainrelay_cache_bytes")
            assert used <= limit
            peak = max(peak, used)
        # The oldest answers left memory long ago; Redis still has them.
        again = await post(s, relay.url, [call("eth_getBalance", [address(0), "latest"])])
    assert again[0]["result"] == "0x0"
    assert time.monotonic() - started < 60 * SECOND
    assert peak > limit * 0.75  # the limit was reached, not merely respected
    # The lookups of one batch travel together: far fewer Redis round trips than lookups.
    m = await relay.metrics()
    lookups = sum(
        m[f'chainrelay_shared_cache_gets_total{{outcome="{o}"}}'] for o in ("hit", "miss")
    )
    trips = m['chainrelay_shared_cache_latency_seconds_count{op="get"}']
    assert lookups >= n and trips * 10 <= lookups
    assert await metric(relay, requests("eth_getBalance", "shared_hit")) == 1
    assert len(await redis.keys("chainrelay:56:v:*")) >= n
    # Redis itself runs bounded: the setting docs/deployment.md asks for.
    assert await redis.config_get("maxmemory-policy") == "allkeys-lru"
    assert int(await redis.config_get("maxmemory")) == 32 * 1024 * 1024


async def test_a_relay_and_its_parent_on_one_redis_never_wait_on_each_other(
    redis: RedisServer, still_anvil: Anvil, relay_factory: RelayFactory
) -> None:
    # The compose topology's region: a regional relay and a leaf whose upstream it is, on
    # one Redis under one prefix. The leaf holds its lock while it asks the regional; were
    # the lock shared, the regional would wait on it until it expired (10 s here).
    regional = await relay_factory([still_anvil.url], tiered(redis), name="regional")
    # The leaf's head tracker would otherwise fetch recent blocks by hash through the
    # regional as it starts (its backfill), storing the very block asked for below.
    no_backfill = tiered(redis).replace("[head]\n", "[head]\nbackfill_blocks = 0\n")
    leaf = await relay_factory([regional.url], no_backfill, name="leaf")
    # A call both relays key alike (the leaf forwards it unchanged).
    block = (await rpc(still_anvil.url, "eth_getBlockByNumber", ["0x3", False]))["result"]
    started = time.monotonic()
    got = await rpc(leaf.url, "eth_getBlockByHash", [block["hash"], False])
    assert got["result"] == block
    assert time.monotonic() - started < 2 * SECOND
    for r in (leaf, regional):  # each made its own call, neither waited on the other
        m = await r.metrics()
        assert m[requests("eth_getBlockByHash", "miss")] == 1
        assert m['chainrelay_shared_cache_locks_total{outcome="waited"}'] == 0
        assert m['chainrelay_shared_cache_locks_total{outcome="fallback"}'] == 0
    # What the regional stored, the leaf finds in Redis: the answers are shared.
    other = [address(6), "latest"]
    assert (await rpc(regional.url, "eth_getBalance", other))["result"] == "0x0"
    assert (await rpc(leaf.url, "eth_getBalance", other))["result"] == "0x0"
    assert await metric(leaf, requests("eth_getBalance", "shared_hit")) == 1


async def test_a_redis_that_stops_answering_costs_one_timeout_then_is_skipped(
    redis: RedisServer, still_anvil: Anvil, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(
        [still_anvil.url], tiered(redis, redis_timeout=0.3, redis_retry_interval=0.2)
    )
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)  # alive, connected, silent: a hung Redis
    try:
        started = time.monotonic()
        async with aiohttp.ClientSession() as s:
            for i in range(40):
                got = await post(s, relay.url, call("eth_getBalance", [address(500 + i), "latest"]))
                assert got["result"] == "0x0"
        elapsed = time.monotonic() - started
        m = await relay.metrics()
        assert m["chainrelay_shared_cache_up"] == 0
        assert m["chainrelay_shared_cache_down_total"] == 1
        assert m['chainrelay_shared_cache_gets_total{outcome="skipped"}'] >= 38
        # One command waited out its timeout; every later request skipped Redis.
        assert elapsed < 10 * 0.3
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    await until(
        lambda: _gauge(relay, "chainrelay_shared_cache_up", 1.0),
        10 * SECOND,
        "the relay to use Redis again",
    )
    assert (await rpc(relay.url, "eth_getBalance", [address(999), "latest"]))["result"] == "0x0"
    assert await metric(relay, 'chainrelay_shared_cache_puts_total{outcome="stored"}') >= 1
