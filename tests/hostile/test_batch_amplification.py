"""Batch amplification: one client's batches of distinct misses, all at once.

A batch of 1,000 distinct uncached calls used to cost 1,000 upstream calls, each a task
and an upstream request of its own: 30 such batches cost +721 MiB and seconds of latency
for everyone. Now a batch's misses go upstream as JSON-RPC batches of 100 calls, a client
has at most ``max_upstream_in_flight_per_client`` calls in flight (its later chunks wait
for its earlier ones), and past ``max_upstream_in_flight`` the node answers -32005 at once.

relay → counting proxy → anvil; the proxy counts the upstream requests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chainrelay.devnet import Anvil
from tests.hostile.attacks import BATCH_CALLS, attack_batch, post_batches
from tests.lab.counting_proxy import CountingProxy, start_proxy
from tests.lab.hostile import ATTACK_RSS_GROWTH, BYSTANDER_P99, Bystander, Rss
from tests.lab.procs import Procs, Relay, RelayFactory
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

BATCHES = 10
CALLS = BATCH_CALLS
# The relay's own calls, one request each, taken off the count.
OWN = {"eth_blockNumber", "eth_getBlockByNumber", "eth_getBlockByHash", "eth_chainId"}


async def upstream_requests(proxy: CountingProxy) -> tuple[int, int]:
    """(requests that carried clients' calls, those calls) since the last reset."""
    requests, counts = await proxy.tally()  # one instant: a poll between two reads skews
    own = sum(v for k, v in counts.items() if k in OWN)
    return requests - own, sum(v for k, v in counts.items() if k not in OWN)


async def start(
    procs: Procs,
    anvil: Anvil,
    relay_factory: RelayFactory,
    tmp_path: Path,
    extra: str = "",
) -> tuple[CountingProxy, Relay, Rss]:
    proxy = await start_proxy(procs, anvil.url, log_path=tmp_path / "proxy.log")
    relay = await relay_factory([proxy.url], "[pool]\nhedge = false\n" + extra)
    assert relay.proc is not None
    await proxy.reset()
    return proxy, relay, Rss(relay.proc.pid)


async def test_parallel_batches_of_distinct_misses_cost_a_request_per_100_calls(
    procs: Procs, anvil: Anvil, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    proxy, relay, rss = await start(procs, anvil, relay_factory, tmp_path)
    bodies = [attack_batch(k) for k in range(BATCHES)]
    async with Bystander(relay.url) as bystander:
        got = await asyncio.wait_for(post_batches(relay.url, bodies), 90 * SECOND)
    answers: list[dict[str, Any]] = [a for raw in got for a in orjson.loads(raw)]
    assert len(answers) == BATCHES * CALLS
    assert all(a.get("result") == "0x0" for a in answers), [a for a in answers if "error" in a][:3]
    requests, calls = await upstream_requests(proxy)
    assert calls == BATCHES * CALLS
    assert requests <= BATCHES * CALLS // 100 + BATCHES, requests  # ~ calls / 100
    growth = rss.peak_growth()
    mib = growth / 2**20
    print(f"requests {requests} for {calls} calls; RSS +{mib:.1f} MiB; {bystander.summary()}")
    assert growth < ATTACK_RSS_GROWTH, growth
    assert bystander.p99() < BYSTANDER_P99, bystander.summary()
    assert bystander.failures == 0


async def test_past_the_node_bound_batches_are_shed_with_minus_32005(
    procs: Procs, anvil: Anvil, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    # Room for one chunk of 100 calls and a few single misses: the other chunks are shed.
    limits = "[limits]\nmax_upstream_in_flight = 150\nmax_upstream_in_flight_per_client = 1000\n"
    proxy, relay, rss = await start(procs, anvil, relay_factory, tmp_path, limits)
    bodies = [attack_batch(k) for k in range(BATCHES)]
    async with Bystander(relay.url) as bystander:
        got = await asyncio.wait_for(post_batches(relay.url, bodies), 90 * SECOND)
    answers: list[dict[str, Any]] = [a for raw in got for a in orjson.loads(raw)]
    shed = [a for a in answers if "error" in a]
    served = [a for a in answers if "result" in a]
    assert len(shed) + len(served) == BATCHES * CALLS
    assert shed and served, (len(shed), len(served))
    assert {a["error"]["code"] for a in shed} == {-32005}
    assert {a["error"]["message"] for a in shed} == {"node overloaded, retry later"}
    _requests, calls = await upstream_requests(proxy)
    assert calls == len(served)  # a shed call never went upstream
    m = await relay.metrics()
    assert m.get('chainrelay_requests_total{method="eth_getBalance",outcome="shed"}', 0) == len(
        shed
    )
    assert rss.peak_growth() < ATTACK_RSS_GROWTH
    assert bystander.p99() < BYSTANDER_P99, bystander.summary()


async def test_a_client_past_its_own_bound_waits_while_another_client_is_served(
    procs: Procs, anvil: Anvil, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    # One upstream batch of 100 at a time per client, each taking 100 ms upstream: the
    # attacker's 2,000 calls take ~2 s; another client's 100 calls one upstream batch.
    proxy = await start_proxy(procs, anvil.url, delay_ms=100, log_path=tmp_path / "proxy.log")
    extra = "[limits]\nmax_upstream_in_flight_per_client = 100\n[pool]\nhedge = false\n"
    relay = await relay_factory([proxy.url], extra)
    attacker_bodies = [attack_batch(k) for k in range(2)]
    other_body = orjson.dumps(orjson.loads(attack_batch(99))[:100])  # other addresses
    loop = asyncio.get_running_loop()
    started = loop.time()
    attack_task = asyncio.ensure_future(post_batches(relay.url, attacker_bodies))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    ) as s:
        async with s.post(
            relay.url, data=other_body, headers={"Content-Type": "application/json"}
        ) as r:
            other = orjson.loads(await r.read())
    other_took = loop.time() - started
    got = await asyncio.wait_for(attack_task, 60 * SECOND)
    attack_took = loop.time() - started
    assert all("result" in a for a in other)
    assert all("result" in a for raw in got for a in orjson.loads(raw))
    # The attacker's chunks went one at a time (20 x 100 ms); the other client's batch
    # did not queue behind them.
    assert attack_took > 1.5 * SECOND
    print(f"other client {other_took:.2f} s, attacker {attack_took:.2f} s")
    assert other_took < attack_took / 3, (other_took, attack_took)
