"""``chainrelay serve --workers N``: worker processes on one port, supervised, sharing Redis.

Each test starts the real CLI as a process of its own; workers are found as its children in
/proc, and each /metrics scrape says which worker answered it (``chainrelay_worker``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chainrelay.devnet import DEV_ACCOUNTS, Anvil
from tests.lab.counting_proxy import start_proxy
from tests.lab.procs import ROOT, Procs, Relay, relay_config, until
from tests.lab.redis_server import start_redis
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

AnvilFactory = Callable[..., Awaitable[Anvil]]

# anvil mines only when asked, so "latest" is one block for the whole test.
STILL_HEAD = "[head]\nfresh_blocks = 1000000.0\n"


def call(method: str, params: list[Any], id_: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


def address(i: int) -> str:
    return "0x" + f"{0xBEEF0000 + i:040x}"


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> Any:
    headers = {"Content-Type": "application/json"}
    async with session.post(url, data=orjson.dumps(body), headers=headers) as r:
        assert r.status == 200, f"HTTP {r.status}"
        return orjson.loads(await r.read())


def fresh_connections() -> aiohttp.ClientSession:
    """Every request on a new connection, so the kernel spreads them over the workers."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return False


def spawn_serve(procs: Procs, relay: Relay, workers: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "chainrelay", "serve", "--config", str(relay.config_path)]
    with relay.log_path.open("ab") as log:
        return procs.spawn(
            [*cmd, "--workers", str(workers)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )


async def still_anvil(anvil_factory: AnvilFactory) -> Anvil:
    """An anvil that mines only when asked, five blocks up: "latest" is block 5 for the
    whole test, above anvil's finalized block, so every worker keys it by the same hash
    whether or not it has read the finalized tag yet."""
    node = await anvil_factory(chain_id=56, block_time=None)
    async with aiohttp.ClientSession() as s:
        await post(s, node.url, call("anvil_mine", ["0x5"]))
    return node


async def start_workers(
    procs: Procs, tmp_path: Path, upstreams: list[str], n: int, extra: str = ""
) -> Relay:
    """``chainrelay serve --config F --workers n``, healthy."""
    relay = Relay(procs, relay_config(upstreams, extra), tmp_path, "workers")
    relay.proc = spawn_serve(procs, relay, n)
    await relay.wait_ready()
    return relay


async def per_worker_metrics(
    relay: Relay, n: int, ready: Callable[[dict[str, float]], bool] = lambda m: True
) -> dict[str, dict[str, float]]:
    """The metrics of each of ``n`` workers, scraping until every worker has answered with
    metrics that satisfy ``ready``."""
    seen: dict[str, dict[str, float]] = {}

    async def all_seen() -> bool:
        m = await relay.metrics()  # a new connection each time
        for key, value in m.items():
            if key.startswith("chainrelay_worker{"):
                seen[key.split('"')[1]] = m | {"pid": value}
        return len(seen) == n and all(ready(m) for m in seen.values())

    await until(all_seen, 20 * SECOND, f"all {n} workers to answer a scrape")
    return seen


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


async def test_two_workers_share_a_port_are_replaced_when_killed_and_drain_on_sigterm(
    procs: Procs, anvil_factory: AnvilFactory, tmp_path: Path
) -> None:
    anvil = await still_anvil(anvil_factory)
    proxy = await start_proxy(procs, anvil.url, hold=("eth_getBalance",))
    relay = await start_workers(procs, tmp_path, [proxy.url], 2, STILL_HEAD)
    assert relay.proc is not None
    parent = relay.proc.pid

    # Both workers serve the one port.
    workers = await per_worker_metrics(relay, 2)
    pids = {int(m["pid"]) for m in workers.values()}
    assert pids == children(parent)

    # A worker that dies is replaced, and the new one serves the same port.
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    await until(
        lambda: victim not in children(parent) and len(children(parent)) == 2,
        10 * SECOND,
        "the supervisor to replace the killed worker",
    )
    workers = await per_worker_metrics(relay, 2)
    now = {int(m["pid"]) for m in workers.values()}
    assert victim not in now and len(now) == 2 and now == children(parent)

    # In-flight calls at SIGTERM are answered before the workers exit.
    async with fresh_connections() as s:
        expected = {
            i: (await post(s, anvil.url, call("eth_getBalance", [address(i), "latest"])))["result"]
            for i in range(20)
        }
        calls = [
            asyncio.create_task(
                post(s, relay.url, call("eth_getBalance", [address(i), "latest"], i))
            )
            for i in range(20)
        ]
        try:
            await until(lambda: _held(proxy, 20), 10 * SECOND, "20 calls in flight at the upstream")
            os.kill(parent, signal.SIGTERM)
            # The workers stop accepting first, while the 20 calls are still held...
            await until(lambda: refused(relay.port), 10 * SECOND, "the port to close")
            assert all(not t.done() for t in calls)
            await proxy.release()  # ...and answer them before they exit.
            answers = await asyncio.gather(*calls)
        finally:
            for t in calls:
                t.cancel()
    assert {a["id"]: a["result"] for a in answers} == expected
    code = await asyncio.to_thread(relay.proc.wait, 20 * SECOND)
    assert code == 0
    assert not any(alive(p) for p in now)
    log = relay.log_path.read_text()
    assert log.count("worker stopped") == 2
    assert "all workers stopped" in log


async def _held(proxy: Any, n: int) -> bool:
    return bool(await proxy.held() == n)


async def test_four_workers_answer_concurrent_identical_misses_with_one_upstream_call(
    procs: Procs, anvil_factory: AnvilFactory, tmp_path: Path
) -> None:
    anvil = await still_anvil(anvil_factory)
    redis = await start_redis(procs, tmp_path)
    # A node 300 ms away: every worker's miss lands while the first call is under way.
    proxy = await start_proxy(procs, anvil.url, delay_ms=300)
    extra = (
        STILL_HEAD + f'\n[cache]\nbackend = "tiered"\nredis_url = "{redis.url}"\n'
        "redis_lock_ttl = 10.0\nredis_timeout = 1.0\n"
    )
    relay = await start_workers(procs, tmp_path, [proxy.url], 4, extra)
    # Every worker is up, and follows block 5, before the burst.
    await per_worker_metrics(relay, 4, lambda m: m.get("chainrelay_head_block") == 5)
    params = [DEV_ACCOUNTS[1], "latest"]
    async with fresh_connections() as s:
        expected = (await post(s, anvil.url, call("eth_getBalance", params)))["result"]
        await proxy.reset()
        answers = await asyncio.gather(
            *(post(s, relay.url, call("eth_getBalance", params, i)) for i in range(100))
        )
    assert [a["result"] for a in answers] == [expected] * 100
    assert (await proxy.counts()).get("eth_getBalance") == 1
    workers = await per_worker_metrics(relay, 4)

    def total(name: str) -> float:
        return sum(m.get(name, 0.0) for m in workers.values())

    lock = 'chainrelay_shared_cache_locks_total{{outcome="{}"}}'
    assert total(lock.format("acquired")) == 1
    # Other workers' misses were answered by that one call through Redis.
    assert total(lock.format("waited")) >= 1
    assert total(lock.format("fallback")) == 0
    got = total('chainrelay_requests_total{method="eth_getBalance",outcome="miss"}')
    got += total('chainrelay_requests_total{method="eth_getBalance",outcome="shared_hit"}')
    got += total('chainrelay_requests_total{method="eth_getBalance",outcome="hit"}')
    assert got == 100


async def test_a_worker_that_cannot_start_stops_the_service_with_an_error(
    procs: Procs, tmp_path: Path
) -> None:
    relay = Relay(procs, relay_config(["http://127.0.0.1:9"]), tmp_path, "doomed")
    proc = spawn_serve(procs, relay, 2)
    code = await asyncio.to_thread(proc.wait, 30 * SECOND)
    assert code == 1
    assert children(proc.pid) == set()
    text = relay.log_path.read_text()
    assert "before serving; stopping" in text
