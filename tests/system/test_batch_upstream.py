"""A client batch is one unit of upstream work: its misses reach the node as JSON-RPC
batches of ``[pool] batch_len`` calls, each call answered byte for byte as it would be
alone, coalesced with identical calls under way, hits never sent.

relay → counting proxy → anvil; the proxy counts the requests (a batch is one) and the
calls in them. A second relay straight on anvil gives each call's single answer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chainrelay.devnet import DEV_ACCOUNTS, Anvil
from tests.lab.counting_proxy import CountingProxy, start_proxy
from tests.lab.procs import AnvilFactory, Procs, Relay, RelayFactory, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

RELAY_CONFIG = "[pool]\ntimeout = 60.0\nhedge = false\n"
JSON_HEADERS = {"Content-Type": "application/json"}
# revert(0, 0): every eth_call to it is answered with an error, which is its answer.
REVERTER = "0x" + "ee" * 20
REVERTER_CODE = "0x60006000fd"


async def post(url: str, body: bytes) -> bytes:
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=JSON_HEADERS) as r:
        assert r.status == 200
        return await r.read()


def address(i: int) -> str:
    return DEV_ACCOUNTS[i] if i < len(DEV_ACCOUNTS) else "0x" + f"{i:x}".rjust(40, "c")


def mixed_calls(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct reads: balances, nonces and code at "latest" (cached by the relay),
    balances at "pending" (never cached), and reverting eth_calls (an error answer)."""
    out: list[dict[str, Any]] = []
    for i in range(offset, offset + n):
        kind = i % 5
        params: list[Any]
        if kind == 0:
            method, params = "eth_getBalance", [address(i), "latest"]
        elif kind == 1:
            method, params = "eth_getTransactionCount", [address(i), "latest"]
        elif kind == 2:
            method, params = "eth_getBalance", [address(i), "pending"]
        elif kind == 3:
            method, params = "eth_getCode", [address(i), "latest"]
        else:
            data = "0x" + f"{i:x}".rjust(64, "0")
            method, params = "eth_call", [{"to": REVERTER, "data": data}, "latest"]
        out.append(
            {"jsonrpc": "2.0", "id": i if i % 2 else f"c-{i}", "method": method, "params": params}
        )
    return out


async def singles(url: str, calls: list[dict[str, Any]]) -> bytes:
    """The batch answer the calls' single answers make, each asked alone at ``url``."""
    parts = [await post(url, orjson.dumps(c)) for c in calls]
    return b"[" + b",".join(parts) + b"]"


# The methods the clients' calls here use (``mixed_calls``).
CLIENT_METHODS = {"eth_getBalance", "eth_getTransactionCount", "eth_getCode", "eth_call"}


async def batch_requests(proxy: CountingProxy) -> int:
    """Requests that carried clients' calls: the relay's own calls made meanwhile (head
    polling, chain checks, an upstream's probe, whenever a loaded machine lets them fall)
    are one request each and are taken off."""
    requests, counts = await proxy.tally()  # one instant: a poll between two reads skews
    own = sum(v for k, v in counts.items() if k not in CLIENT_METHODS)
    return requests - own


async def lab(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Any,
    **proxy_kw: Any,
) -> tuple[Anvil, CountingProxy, Relay, Relay]:
    anvil = await anvil_factory(chain_id=56, block_time=None)  # the head stays put
    async with aiohttp.ClientSession() as s:
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "anvil_setCode",
            "params": [REVERTER, REVERTER_CODE],
        }
        async with s.post(anvil.url, json=body) as r:
            assert "error" not in await r.json()
    proxy = await start_proxy(procs, anvil.url, log_path=tmp_path / "proxy.log", **proxy_kw)
    relay = await relay_factory([proxy.url], RELAY_CONFIG)
    direct = await relay_factory([anvil.url], RELAY_CONFIG, name="direct")
    await proxy.reset()
    return anvil, proxy, relay, direct


async def test_a_batch_of_300_distinct_misses_costs_3_upstream_requests_answered_as_singles(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    _anvil, proxy, relay, direct = await lab(procs, anvil_factory, relay_factory, tmp_path)
    calls = mixed_calls(300)
    got = await post(relay.url, orjson.dumps(calls))
    assert await batch_requests(proxy) == 3
    counts = await proxy.counts()
    assert (
        counts.get("eth_getBalance", 0)
        + counts.get("eth_call", 0)
        + counts.get("eth_getTransactionCount", 0)
        + counts.get("eth_getCode", 0)
        == 300
    )
    assert got == await singles(direct.url, calls)  # byte for byte, errors and ids too
    errors = [a for a in orjson.loads(got) if "error" in a]
    assert len(errors) == 60 and all(
        a["error"]["code"] == 3 or "revert" in a["error"]["message"] for a in errors
    )

    # Hits are not sent: "latest" answers were stored; only the "pending" ones go again
    # (and reverts, which are never stored), in one request.
    await proxy.reset()
    again = await post(relay.url, orjson.dumps(calls))
    assert again == got
    counts = await proxy.counts()
    assert set(counts) - {"eth_blockNumber", "eth_getBlockByNumber"} <= {
        "eth_getBalance",
        "eth_call",
    }
    assert counts.get("eth_getBalance", 0) == 60 and await batch_requests(proxy) == 2


async def test_batch_items_coalesce_with_identical_single_calls_both_ways(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    _anvil, proxy, relay, direct = await lab(
        procs, anvil_factory, relay_factory, tmp_path, hold=("eth_getBalance",)
    )
    calls = [
        {"jsonrpc": "2.0", "id": i, "method": "eth_getBalance", "params": [address(i), "latest"]}
        for i in range(50)
    ]
    first = asyncio.ensure_future(post(relay.url, orjson.dumps(calls[7])))  # a single call

    async def held(n: int) -> bool:
        return await proxy.held() >= n

    await until(lambda: held(1), 30 * SECOND, "the single call to be held")
    batch = asyncio.ensure_future(post(relay.url, orjson.dumps(calls)))  # joins call 7
    await until(lambda: held(2), 30 * SECOND, "the batch to be held")
    late = asyncio.ensure_future(post(relay.url, orjson.dumps(calls[30])))  # joins the batch

    async def joined() -> bool:
        m = await relay.metrics()
        return m.get("chainrelay_coalesced_total", 0) >= 2

    await until(joined, 30 * SECOND, "two calls to join one under way")
    await proxy.release()
    got = await batch
    assert got == await singles(direct.url, calls)
    assert orjson.loads(await first)["result"] == orjson.loads(got)[7]["result"]
    assert orjson.loads(await late)["result"] == orjson.loads(got)[30]["result"]
    assert (await proxy.counts())["eth_getBalance"] == 50  # 1 single + 49 in one batch
    assert await batch_requests(proxy) == 2


async def test_fake_upstream_refusing_batches_gets_the_calls_one_by_one(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    _anvil, proxy, relay, direct = await lab(
        procs, anvil_factory, relay_factory, tmp_path, refuse_batches=True
    )
    calls = mixed_calls(150, offset=1000)
    got = await post(relay.url, orjson.dumps(calls))
    assert got == await singles(direct.url, calls)
    assert await batch_requests(proxy) == 2 + 150  # two refused batches, then each call


async def test_a_websocket_upstream_takes_a_batch_as_one_message(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    _anvil, proxy, _relay, direct = await lab(procs, anvil_factory, relay_factory, tmp_path)
    ws_relay = await relay_factory([proxy.ws_url], RELAY_CONFIG, name="ws")
    await proxy.reset()
    calls = mixed_calls(250, offset=2000)
    got = await post(ws_relay.url, orjson.dumps(calls))
    assert got == await singles(direct.url, calls)
    counts = await proxy.counts()
    sent = sum(
        counts.get(m, 0)
        for m in ("eth_getBalance", "eth_getTransactionCount", "eth_getCode", "eth_call")
    )
    assert sent == 250
    assert await batch_requests(proxy) == 3
