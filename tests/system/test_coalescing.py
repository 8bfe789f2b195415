"""Coalescing: concurrent identical calls cost the upstream one call.

relay → counting proxy → anvil. The proxy holds the method under test until every caller
has joined the one in-flight call (the relay's own metrics say when), then lets it through;
the count at the proxy is the number of calls that reached the node.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chainrelay.devnet import DEV_ACCOUNTS
from tests.lab.counting_proxy import start_proxy
from tests.lab.procs import AnvilFactory, Procs, RelayFactory, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

# A contract that returns the balance of the address in its calldata:
# mstore(0, balance(calldataload(0))); return(0, 32)
BALANCE_READER_CODE = "0x60003531600052602060" + "00f3"
BALANCE_READER = "0x" + "be" * 20
# The calls the relay's head tracker and chain check make on their own.
RELAY_OWN_METHODS = {"eth_chainId", "eth_getBlockByNumber", "eth_getBlockByHash"}
# Longer than any hold below: a timed-out call would be retried and counted twice.
RELAY_CONFIG = "[pool]\ntimeout = 60.0\nhedge = false\n"
JSON_HEADERS = {"Content-Type": "application/json"}


async def call(url: str, method: str, params: list[Any]) -> Any:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        doc = orjson.loads(await r.read())
    assert "error" not in doc, doc
    return doc["result"]


async def relay_health(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/health") as r:
        return dict(orjson.loads(await r.read()))


async def burst(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """POST every body at once, each on its own connection."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one(body: dict[str, Any]) -> dict[str, Any]:
            async with s.post(url, data=orjson.dumps(body), headers=JSON_HEADERS) as r:
                assert r.status == 200
                return dict(orjson.loads(await r.read()))

        return await asyncio.gather(*(one(b) for b in bodies))


async def deploy_reader(anvil_url: str) -> None:
    """Put the balance reader on chain in a mined block (the head moves to block 1)."""
    await call(anvil_url, "anvil_setCode", [BALANCE_READER, BALANCE_READER_CODE])
    await call(anvil_url, "evm_mine", [])


def request_id(i: int) -> int | str:
    return i if i % 2 else f"caller-{i}"


async def test_200_concurrent_identical_eth_calls_reach_the_node_once(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)  # the head must not move
    await deploy_reader(anvil.url)
    proxy = await start_proxy(procs, anvil.url, hold=("eth_call",), log_path=tmp_path / "proxy.log")
    relay = await relay_factory([proxy.url], RELAY_CONFIG)
    params = [
        {"to": BALANCE_READER, "data": "0x" + DEV_ACCOUNTS[1][2:].lower().rjust(64, "0")},
        "latest",
    ]
    expected = await call(anvil.url, "eth_call", params)
    assert int(expected, 16) == 10_000 * 10**18  # a real answer from the contract

    n = 200
    bodies = [
        {"jsonrpc": "2.0", "id": request_id(i), "method": "eth_call", "params": params}
        for i in range(n)
    ]
    answers = asyncio.ensure_future(burst(relay.url, bodies))

    async def all_joined() -> bool:
        if answers.done():
            answers.result()  # raise what went wrong
            return True
        m = await relay.metrics()
        return m.get("chainrelay_coalesced_total", 0) >= n - 1

    await until(all_joined, 30 * SECOND, f"{n - 1} callers to join the in-flight eth_call")
    assert await proxy.held() == 1  # one call reached the proxy; the others wait on it
    await proxy.release()
    got = await answers

    assert [a["id"] for a in got] == [request_id(i) for i in range(n)]
    assert all(a == {"jsonrpc": "2.0", "id": a["id"], "result": expected} for a in got), got[:3]
    counts = await proxy.counts()
    assert counts.get("eth_call") == 1
    assert set(counts) <= RELAY_OWN_METHODS | {"eth_call"}
    m = await relay.metrics()
    assert m['chainrelay_requests_total{method="eth_call",outcome="miss"}'] == n
    assert m["chainrelay_coalesced_total"] == n - 1

    # The answer was stored: the next caller is a hit and the node is not asked again.
    again = await burst(relay.url, bodies[:10])
    assert [a["result"] for a in again] == [expected] * 10
    assert (await proxy.counts()).get("eth_call") == 1


async def test_an_empty_eth_call_answer_at_an_unfinal_block_costs_one_upstream_call(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    # Asked by hash, an empty answer ("0x": no code there) is that block's answer for good.
    anvil = await anvil_factory(chain_id=56, block_time=None)
    await call(anvil.url, "evm_mine", [])
    proxy = await start_proxy(procs, anvil.url, hold=("eth_call",), log_path=tmp_path / "proxy.log")
    relay = await relay_factory([proxy.url], RELAY_CONFIG)
    params = [{"to": "0x" + "0e" * 20, "data": "0x70a08231"}, "latest"]
    assert await call(anvil.url, "eth_call", params) == "0x"
    health = await relay_health(relay.url)
    assert health["finalized"] < health["head"]  # latest is not final: keyed by its hash

    n = 200
    bodies = [
        {"jsonrpc": "2.0", "id": request_id(i), "method": "eth_call", "params": params}
        for i in range(n)
    ]
    answers = asyncio.ensure_future(burst(relay.url, bodies))

    async def all_joined() -> bool:
        if answers.done():
            answers.result()
            return True
        return (await relay.metrics()).get("chainrelay_coalesced_total", 0) >= n - 1

    await until(all_joined, 30 * SECOND, f"{n - 1} callers to join the in-flight eth_call")
    await proxy.release()
    got = await answers
    assert {a["result"] for a in got} == {"0x"}
    # The calls after it are hits, at the same head.
    assert {a["result"] for a in await burst(relay.url, bodies)} == {"0x"}
    assert (await proxy.counts()).get("eth_call") == 1
    m = await relay.metrics()
    assert m['chainrelay_requests_total{method="eth_call",outcome="hit"}'] >= n


async def test_concurrent_reads_of_a_finalized_block_cost_one_upstream_call(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    await call(anvil.url, "evm_mine", [])  # block 1 on top of genesis; genesis is final
    proxy = await start_proxy(
        procs, anvil.url, hold=("eth_getBalance",), log_path=tmp_path / "proxy.log"
    )
    relay = await relay_factory([proxy.url], RELAY_CONFIG)

    async def genesis_final() -> bool:
        return (await relay_health(relay.url))["finalized"] == 0

    await until(genesis_final, 10 * SECOND, "the relay to learn that block 0 is finalized")
    params = [DEV_ACCOUNTS[2], "0x0"]
    expected = await call(anvil.url, "eth_getBalance", params)

    n = 50
    bodies = [
        {"jsonrpc": "2.0", "id": request_id(i), "method": "eth_getBalance", "params": params}
        for i in range(n)
    ]
    answers = asyncio.ensure_future(burst(relay.url, bodies))

    async def all_joined() -> bool:
        if answers.done():
            answers.result()
            return True
        return (await relay.metrics()).get("chainrelay_coalesced_total", 0) >= n - 1

    await until(all_joined, 30 * SECOND, f"{n - 1} callers to join the in-flight read")
    await proxy.release()
    got = await answers
    assert [a["id"] for a in got] == [request_id(i) for i in range(n)]
    assert {a["result"] for a in got} == {expected}
    assert (await proxy.counts()).get("eth_getBalance") == 1

    # Final: stored for good, under one key for every spelling of block 0.
    later = [
        {"jsonrpc": "2.0", "id": i, "method": "eth_getBalance", "params": [DEV_ACCOUNTS[2], ref]}
        for i, ref in enumerate(["0x0", "earliest", "0x00", "finalized"] * 5)
    ]
    assert {a["result"] for a in await burst(relay.url, later)} == {expected}
    assert (await proxy.counts()).get("eth_getBalance") == 1
    m = await relay.metrics()
    assert m['chainrelay_requests_total{method="eth_getBalance",outcome="hit"}'] >= len(later)
