"""``chainrelay serve --workers N``: worker processes on one port, supervised, sharing Redis,
following the chain once per node.

Each test starts the real CLI as a process of its own; workers are found as its children in
/proc, and each /metrics scrape says which worker answered it (``chainrelay_worker``). A
WebSocket client's worker, and the worker that made a call the counting proxy saw, are read
from /proc too (``tcp_owner``: which process holds that TCP connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets
from eth_account import Account

from chainrelay.devnet import DEV_ACCOUNTS, TRANSFER_TOPIC, Anvil, transfer_emitter_initcode
from chainrelay.tree import frame as feedframe
from chainrelay.tree.session import Want, encode_hello
from tests.lab.chain import Chain, emitter_data, heartbeat
from tests.lab.counting_proxy import CountingProxy, start_proxy
from tests.lab.procs import ROOT, Procs, Relay, relay_config, tcp_owner, until
from tests.lab.redis_server import start_redis
from tests.lab.subscriptions import NEW_HEADS, TRANSFER_LOGS, Subscriber
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


async def post_again_if_reset(session: aiohttp.ClientSession, url: str, body: Any) -> Any:
    """``post``, asked once more on a new connection if the first was reset: a connection
    the kernel queued on a worker's listening socket just as that worker was killed is
    reset with it (SO_REUSEPORT), and a client asks again, as it would of any node."""
    try:
        return await post(session, url, body)
    except aiohttp.ClientConnectionError:
        return await post(session, url, body)


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


# --- one block follower per node -------------------------------------------------------
FEEDER = "0"  # the worker that follows the chain (chainrelay.tree.siblings.FEEDER)
A0, A1, A2 = DEV_ACCOUNTS
# A block crosses the feeder and its private listener in milliseconds; this much is a
# loaded two-core machine.
BLOCK_TIMEOUT = 10 * SECOND
# Connections opened to find one on each worker: the kernel's SO_REUSEPORT hash spreads
# them; missing one of three workers 60 times in a row has odds of 3 * (2/3)**60 < 1e-10.
MAX_CONNECTS = 60
# The test's chain while a feeder dies: a block every this long, at most MAX_BLOCKS of
# them (the miner stops by itself).
MINE_INTERVAL = 0.3
MAX_BLOCKS = 400
# Head-tracking calls: polls, and newHeads subscriptions (eth_subscribe's first param).
HEAD_METHODS = ("eth_blockNumber", "eth_getBlockByNumber")


async def worker_pids(relay: Relay, n: int) -> dict[str, int]:
    """Each worker's pid, by index."""
    return {i: int(m["pid"]) for i, m in (await per_worker_metrics(relay, n)).items()}


async def per_worker_health(
    relay: Relay, n: int, ready: Callable[[dict[str, Any]], bool]
) -> dict[int, dict[str, Any]]:
    """Each of ``n`` workers' /health, asking until every one has answered with ``ready``."""
    seen: dict[int, dict[str, Any]] = {}

    async def all_ready() -> bool:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with fresh_connections() as s, s.get(relay.url + "/health") as r:
                body = orjson.loads(await r.read())
            worker = body.get("worker")
            if worker is not None:
                seen[int(worker["index"])] = body
        return len(seen) == n and all(ready(b) for b in seen.values())

    await until(all_ready, 20 * SECOND, f"all {n} workers' /health to be ready")
    return seen


@asynccontextmanager
async def subscriber_per_worker(
    relay: Relay, pids: dict[str, int]
) -> AsyncIterator[dict[str, Subscriber]]:
    """One WebSocket client on each worker of ``pids`` (index -> pid), by index; the
    connections that landed on a worker already taken stay open, idle, until the end."""
    index_of = {pid: i for i, pid in pids.items()}
    got: dict[str, Subscriber] = {}
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(MAX_CONNECTS):
            sub = await stack.enter_async_context(Subscriber.connect(relay.ws_url))
            owner = tcp_owner(relay.port, sub.conn.local_address[1], pids.values())
            i = index_of.get(owner) if owner is not None else None
            if i is not None and i not in got:
                got[i] = sub
            if len(got) == len(pids):
                break
        assert len(got) == len(pids), f"connections reached only workers {sorted(got)}"
        yield got


def callers(
    calls: Iterable[tuple[int, str, Any]], proxy: CountingProxy, pids: Iterable[int]
) -> dict[int, int | None]:
    """The pid that made each call the proxy saw, by the port it came from (its worker's
    connections to the proxy are open still)."""
    pids = list(pids)
    return {port: tcp_owner(port, proxy.port, pids) for port in {c[0] for c in calls}}


def numbers(sub: Subscriber, sub_id: str) -> list[int]:
    return [int(r["number"], 16) for r in sub.results(sub_id)]


async def send_block(node: Chain, emitter: str, i: int) -> tuple[int, str, str]:
    """One block (anvil mines on each transaction) with one Transfer log: its number, hash
    and transaction."""
    tx = await node.send(
        {"from": A1, "to": emitter, "data": emitter_data(A2, 1 + i), "gas": hex(100_000)}
    )
    receipt = await node.receipt(tx)
    return int(receipt["blockNumber"], 16), str(receipt["blockHash"]), tx


async def test_three_workers_follow_the_chain_once_and_every_worker_serves_each_block(
    procs: Procs, anvil_factory: AnvilFactory, tmp_path: Path
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)  # mines each transaction
    proxy = await start_proxy(procs, anvil.url)
    async with Chain.open(anvil.url) as node:
        emitter = await node.deploy(transfer_emitter_initcode())
        async with heartbeat(node):
            relay = await start_workers(procs, tmp_path, [proxy.ws_url], 3)
        pids = await worker_pids(relay, 3)
        feeder = pids[FEEDER]
        async with subscriber_per_worker(relay, pids) as subs:
            ids: dict[str, tuple[str, str, str, str]] = {}
            for i, sub in subs.items():
                heads = await sub.subscribe(NEW_HEADS)
                logs = await sub.subscribe(TRANSFER_LOGS)
                block_filter = (await sub.call("eth_newBlockFilter", []))["result"]
                new_filter = await sub.call("eth_newFilter", [{"topics": [TRANSFER_TOPIC]}])
                ids[i] = (heads, logs, block_filter, new_filter["result"])
            since_start = await proxy.calls()
            await proxy.reset()

            blocks = [await send_block(node, emitter, 0)]
            for k in range(1, 6):
                # Each block once every subscriber has the one before: no call of one
                # block's can be taken for another's.
                await until(
                    lambda: all(
                        numbers(s, ids[i][0])[-1:] == [blocks[-1][0]] for i, s in subs.items()
                    ),
                    BLOCK_TIMEOUT,
                    f"block {blocks[-1][0]} at every worker's subscriber",
                )
                blocks.append(await send_block(node, emitter, k))
            await until(
                lambda: all(numbers(s, ids[i][0])[-1:] == [blocks[-1][0]] for i, s in subs.items()),
                BLOCK_TIMEOUT,
                "the last block at every worker's subscriber",
            )
            # A head's header reaches the other workers ahead of its block's frame (for their
            # newHeads); its logs come with the block, once the worker holds it.
            await until(
                lambda: all(
                    [r["transactionHash"] for r in s.results(ids[i][1])][-1:] == [blocks[-1][2]]
                    for i, s in subs.items()
                ),
                BLOCK_TIMEOUT,
                "the last block's log at every worker's subscriber",
            )
            following = await proxy.calls()
            await proxy.reset()

            # A receipt or a full block read once the block is in is a hit on every worker.
            for i, sub in subs.items():
                for _n, block_hash, tx in blocks:
                    got = await sub.call("eth_getTransactionReceipt", [tx])
                    assert got["result"] == await node.receipt(tx), f"worker {i}"
                    got = await sub.call("eth_getBlockByHash", [block_hash, True])
                    assert got["result"] == await node.call(
                        "eth_getBlockByHash", [block_hash, True]
                    )
            reads = await proxy.calls()

            # Every filter of every worker saw the same blocks and logs. (A worker whose head
            # before the first of them reached it after it subscribed, as a loaded machine
            # may have it, passes that one on too: a head new to it.)
            first = blocks[0][0]

            def from_first(sub: Subscriber, sid: str) -> list[tuple[int, Any]]:
                got = zip(numbers(sub, sid), sub.results(sid), strict=True)
                return [(n, r) for n, r in got if n >= first]

            for i, sub in subs.items():
                heads, logs, block_filter, log_filter = ids[i]
                assert [(n, r["hash"]) for n, r in from_first(sub, heads)] == [
                    (n, h) for n, h, _tx in blocks
                ], f"worker {i}'s newHeads"
                assert [(r["blockHash"], r["transactionHash"]) for r in sub.results(logs)] == [
                    (h, tx) for _n, h, tx in blocks
                ], f"worker {i}'s logs"
                changes = await sub.call("eth_getFilterChanges", [block_filter])
                hashes = changes["result"]
                assert hashes[len(hashes) - len(blocks) :] == [h for _n, h, _tx in blocks]
                assert len(hashes) - len(blocks) in (0, 1), f"worker {i}: {hashes}"
                changes = await sub.call("eth_getFilterChanges", [log_filter])
                assert [x["transactionHash"] for x in changes["result"]] == [
                    tx for _n, _h, tx in blocks
                ], f"worker {i}'s log filter"
            # Each worker's newHeads are the header the upstream pushed to the feeder, which
            # the feeder passed to the others ahead of the block's frame.
            seen = {i: orjson.dumps(from_first(s, ids[i][0])) for i, s in subs.items()}
            assert len(set(seen.values())) == 1, seen
            by_port = callers([*since_start, *following, *reads], proxy, pids.values())

    # One newHeads subscription upstream, the feeder's, over the node's whole life.
    subscribed = [
        by_port[c[0]] for c in since_start if c[1] == "eth_subscribe" and c[2][0] == "newHeads"
    ]
    assert subscribed == [feeder], f"newHeads subscriptions from {subscribed} (feeder {feeder})"
    # While the chain moved, every upstream call was the feeder's: each block fetched once,
    # its receipts once; no other worker polled, fetched or asked for finality.
    assert {by_port[c[0]] for c in following} == {feeder}, following
    full = [c[2][0] for c in following if c[1] == "eth_getBlockByHash" and c[2][1] is True]
    assert sorted(full) == sorted(h for _n, h, _tx in blocks)
    receipts = [c for c in following if c[1] == "eth_getBlockReceipts"]
    assert len(receipts) == len(blocks)
    heads_polled = {by_port[c[0]] for c in following if c[1] in HEAD_METHODS}
    assert heads_polled <= {feeder}
    # The reads on each worker were cache hits: no upstream call at all.
    assert reads == [], reads


@asynccontextmanager
async def mining(node: Chain) -> AsyncIterator[None]:
    """An empty block every MINE_INTERVAL while the ``async with`` body runs (at most
    MAX_BLOCKS of them): the chain's own pace, which the test does not wait on."""
    stop = asyncio.Event()

    async def mine() -> None:
        for _ in range(MAX_BLOCKS):
            await node.call("evm_mine")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), MINE_INTERVAL)
            if stop.is_set():
                return

    task = asyncio.create_task(mine())
    try:
        yield
    finally:
        stop.set()
        await task


async def test_a_killed_feeder_is_restarted_and_the_other_workers_miss_no_block(
    procs: Procs, anvil_factory: AnvilFactory, tmp_path: Path
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    proxy = await start_proxy(procs, anvil.url)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        async with heartbeat(node):
            relay = await start_workers(procs, tmp_path, [proxy.ws_url], 3)
        assert relay.proc is not None
        parent = relay.proc.pid
        pids = await worker_pids(relay, 3)
        victim = pids[FEEDER]
        others = {i: p for i, p in pids.items() if i != FEEDER}
        async with subscriber_per_worker(relay, others) as subs:
            heads = {i: await sub.subscribe(NEW_HEADS) for i, sub in subs.items()}

            def least() -> int:
                return min(len(sub.notes[heads[i]]) for i, sub in subs.items())

            async with mining(node), fresh_connections() as s:
                await until(lambda: least() >= 3, BLOCK_TIMEOUT, "3 blocks at each subscriber")
                os.kill(victim, signal.SIGKILL)
                # Until the supervisor forks a new feeder, the other workers answer every
                # call: eth_blockNumber from their heads, eth_getBalance from the upstream.
                answered_alone = 0

                async def replaced() -> bool:
                    nonlocal answered_alone
                    alone = children(parent) == set(others.values())
                    for method, params in (
                        ("eth_blockNumber", []),
                        ("eth_getBalance", [A0, "latest"]),
                    ):
                        answer = await post_again_if_reset(s, relay.url, call(method, params))
                        assert "result" in answer, answer
                    answered_alone += alone
                    return len(children(parent) - {victim}) == 3

                await until(replaced, 20 * SECOND, "the supervisor to fork a new feeder")
                assert answered_alone > 0
                # The new feeder serves; the others' links find it on the same listener.
                healths = await per_worker_health(
                    relay,
                    3,
                    lambda b: (
                        b["status"] == "ok"
                        and (b["worker"]["feeder"] or b["worker"]["linked"] is True)
                    ),
                )
                assert healths[0]["worker"]["feeder"] is True
                after = least()
                await until(
                    lambda: least() >= after + 5, 2 * BLOCK_TIMEOUT, "5 blocks after the relink"
                )
            tip = (await node.head())[0]

            def all_at(n: int) -> Callable[[], bool]:
                return lambda: all(numbers(sub, heads[i])[-1] == n for i, sub in subs.items())

            await until(all_at(tip), BLOCK_TIMEOUT, f"every subscriber at the last block {tip}")
            # Every block, once and in order, before, while and after the feeder was away.
            for i, sub in subs.items():
                got = numbers(sub, heads[i])
                assert got == list(range(got[0], tip + 1)), f"worker {i}: {got}"
                for r in sub.results(heads[i]):
                    assert r["hash"] == (await node.block(r["number"]))["hash"], f"worker {i}"

            # And the new feeder is again the only one following.
            pids = await worker_pids(relay, 3)
            assert pids[FEEDER] != victim and pids[FEEDER] in children(parent)
            await proxy.reset()
            for _ in range(3):
                await node.call("evm_mine")
                tip += 1
                await until(all_at(tip), BLOCK_TIMEOUT, f"block {tip} at every subscriber")
            following = await proxy.calls()
            by_port = callers(following, proxy, pids.values())
    assert {by_port[c[0]] for c in following} == {pids[FEEDER]}, following
    log = relay.log_path.read_text()
    assert f"worker 0 (pid {victim}) died" in log


ORIGIN_KEY = "0x" + "33" * 32
STREAM = "bsc/blocks"


@asynccontextmanager
async def feed_per_worker(
    relay: Relay, pids: dict[str, int]
) -> AsyncIterator[dict[str, websockets.ClientConnection]]:
    """One live session of the public /feed on each worker of ``pids``, welcomed."""
    index_of = {pid: i for i, pid in pids.items()}
    got: dict[str, websockets.ClientConnection] = {}
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(MAX_CONNECTS):
            conn = await stack.enter_async_context(
                websockets.connect(relay.ws_url + "/feed", max_size=None, compression=None)
            )
            await conn.send(encode_hello([Want(STREAM)]).decode())
            async with asyncio.timeout(BLOCK_TIMEOUT):
                welcome = orjson.loads(await conn.recv())
            assert welcome["type"] == "welcome", welcome
            owner = tcp_owner(relay.port, conn.local_address[1], pids.values())
            i = index_of.get(owner) if owner is not None else None
            if i is not None and i not in got:
                got[i] = conn
            if len(got) == len(pids):
                break
        assert len(got) == len(pids), f"feed sessions reached only workers {sorted(got)}"
        yield got


async def test_an_origin_under_workers_signs_each_block_once_and_every_worker_serves_it(
    procs: Procs, anvil_factory: AnvilFactory, tmp_path: Path
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    proxy = await start_proxy(procs, anvil.url)
    origin = bytes.fromhex(Account.from_key(ORIGIN_KEY).address[2:])
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        async with heartbeat(node):
            relay = await start_workers(
                procs, tmp_path, [proxy.ws_url], 2, f'[tree]\nkey = "{ORIGIN_KEY}"\n'
            )
        pids = await worker_pids(relay, 2)
        async with feed_per_worker(relay, pids) as feeds:
            await proxy.reset()
            first = (await node.head())[0] + 1
            for _ in range(4):
                await node.send({"from": A0, "to": A1, "value": "0x1"})
                await node.call("evm_mine")
            tip = (await node.head())[0]
            got: dict[str, list[bytes]] = {}
            for i, conn in feeds.items():
                raws: list[bytes] = []
                async with asyncio.timeout(BLOCK_TIMEOUT):
                    while True:
                        raw = await conn.recv()
                        assert isinstance(raw, bytes), raw
                        position = feedframe.decode(raw, len(raw)).position
                        # A block mined before these (the start's heartbeat) may reach a
                        # feed that was connected in time for it and not the other.
                        if position >= first:
                            raws.append(raw)
                        if position == tip:
                            break
                got[i] = raws
            following = await proxy.calls()
            by_port = callers(following, proxy, pids.values())
    # The same frames, byte for byte, from both workers: the feeder signed each block once
    # with the node's key, and the other worker passed its frames on.
    assert got[FEEDER] == got["1"]
    frames = [feedframe.decode(raw, len(raw)) for raw in got[FEEDER]]
    assert [f.position for f in frames] == list(range(first, tip + 1))
    assert all(feedframe.signer(f) == origin for f in frames)
    assert {by_port[c[0]] for c in following} == {pids[FEEDER]}, following
    full = [c[2][0] for c in following if c[1] == "eth_getBlockByHash" and c[2][1] is True]
    assert sorted(full) == sorted("0x" + f.identity.hex() for f in frames)


async def test_while_the_feeder_is_frozen_the_other_workers_follow_the_chain_themselves(
    procs: Procs, anvil_factory: AnvilFactory, tmp_path: Path
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    proxy = await start_proxy(procs, anvil.url)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        async with heartbeat(node):
            relay = await start_workers(procs, tmp_path, [proxy.ws_url], 2)
        pids = await worker_pids(relay, 2)
        feeder, other = pids[FEEDER], pids["1"]
        async with subscriber_per_worker(relay, {"1": other}) as subs, mining(node):
            sub = subs["1"]
            heads = await sub.subscribe(NEW_HEADS)
            await until(lambda: len(sub.notes[heads]) >= 3, BLOCK_TIMEOUT, "3 blocks")
            # Frozen, not dead: the supervisor sees nothing to restart, and its links stay
            # open until their pings go unanswered.
            os.kill(feeder, signal.SIGSTOP)
            try:
                await proxy.reset()
                frozen_at = len(sub.notes[heads])
                await until(
                    lambda: len(sub.notes[heads]) >= frozen_at + 5,
                    4 * BLOCK_TIMEOUT,
                    "5 blocks while the feeder is frozen",
                )
                alone = await proxy.calls()
            finally:
                os.kill(feeder, signal.SIGCONT)
            await per_worker_health(relay, 2, lambda b: b["worker"]["linked"] is not False)
            back_at = len(sub.notes[heads])
            await until(lambda: len(sub.notes[heads]) >= back_at + 3, BLOCK_TIMEOUT, "3 blocks")
            await proxy.reset()
            back_at = len(sub.notes[heads])
            await until(lambda: len(sub.notes[heads]) >= back_at + 5, BLOCK_TIMEOUT, "5 blocks")
            fed = await proxy.calls()
            by_port = callers([*alone, *fed], proxy, pids.values())
        got = numbers(sub, heads)
    assert got == list(range(got[0], got[0] + len(got))), got
    # Frozen: the other worker polled its upstream for heads and fetched the blocks itself.
    assert {by_port[c[0]] for c in alone} == {other}, alone
    assert any(c[1] == "eth_getBlockByNumber" and c[2][0] == "latest" for c in alone)
    assert any(c[1] == "eth_getBlockByHash" and c[2][1] is True for c in alone)
    # Back: the feeder follows alone again.
    assert {by_port[c[0]] for c in fed} == {feeder}, fed
