"""Which calls are served, against a real node: relay → counting proxy → anvil.

A relay on its default allow list refuses a node's internals and a devnet's controls with
-32601 before they reach anvil (the proxy counts what does, and anvil's own state shows
nothing changed); an eth_getLogs past a guard of ``[logs]`` is answered -32005 naming it;
a tier's batch length holds its clients.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect

from chainrelay.devnet import DEV_ACCOUNTS, Anvil, deploy_emitter
from tests.lab.counting_proxy import CountingProxy, start_proxy
from tests.lab.procs import Procs, Relay, rpc, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

RANGE = 20
ANSWER_BYTES = 2000  # three of the emitter's logs (~600 bytes of JSON each) pass it
BATCH = 10
CONFIG = (
    f"[logs]\nmax_block_range = {RANGE}\nmax_answer_bytes = {ANSWER_BYTES}\n"
    f"[tiers.default]\nmax_batch_len = {BATCH}\n"
)
STRANGER = "0x" + "5a" * 20  # an address anvil_setBalance would fund
LOGS = 5  # emitter calls, each mined in a block of its own


@dataclass
class Lab:
    anvil: Anvil
    proxy: CountingProxy
    relay: Relay
    emitter: str
    first: int  # the block of the first emitter call
    tx: str  # a transaction to trace


async def post(url: str, doc: Any) -> Any:
    async with aiohttp.ClientSession() as s, s.post(url, json=doc) as r:
        assert r.status == 200
        return orjson.loads(await r.read())


def call(method: str, params: list[Any], id_: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}


@pytest.fixture
async def lab(
    procs: Procs,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> AsyncIterator[Lab]:
    anvil = await anvil_factory(chain_id=56, block_time=None)  # mines each transaction
    async with aiohttp.ClientSession() as s:
        emitter = await deploy_emitter(s, anvil.url)
    txs = []
    for i in range(LOGS):  # straight to anvil: the relay refuses eth_sendTransaction
        data = "0x" + f"{i + 1:064x}" + f"{i:064x}"
        got = await rpc(
            anvil.url,
            "eth_sendTransaction",
            [{"from": DEV_ACCOUNTS[0], "to": emitter, "data": data}],
        )
        txs.append(got["result"])
    receipt = (await rpc(anvil.url, "eth_getTransactionReceipt", [txs[0]]))["result"]
    await rpc(anvil.url, "anvil_mine", [hex(2 * RANGE)])  # a chain longer than the range
    head = int((await rpc(anvil.url, "eth_blockNumber"))["result"], 16)
    proxy = await start_proxy(procs, anvil.url, log_path=tmp_path / "proxy.log")
    relay = await relay_factory([proxy.url], CONFIG)

    async def caught_up() -> bool:
        got = await rpc(relay.url, "eth_blockNumber")
        return int(got.get("result", "0x0"), 16) >= head

    await until(caught_up, 20 * SECOND, "the relay to follow anvil's head")
    await proxy.reset()
    yield Lab(anvil, proxy, relay, emitter, int(receipt["blockNumber"], 16), txs[0])


async def balance(url: str) -> str:
    return str((await rpc(url, "eth_getBalance", [STRANGER, "latest"]))["result"])


async def test_node_internals_and_devnet_controls_never_reach_the_node(lab: Lab) -> None:
    url = lab.relay.url
    before = await balance(lab.anvil.url)
    got = await rpc(url, "debug_traceTransaction", [lab.tx])
    assert got["error"] == {
        "code": -32601,
        "message": "the method debug_traceTransaction is disabled on this node",
    }
    got = await rpc(url, "anvil_setBalance", [STRANGER, hex(10**18)])
    assert got["error"]["code"] == -32601 and "disabled on this node" in got["error"]["message"]
    got = await rpc(url, "relay_doesNotExist", [])
    assert (
        got["error"]["message"] == "the method relay_doesNotExist does not exist/is not available"
    )
    # A batch item and a WebSocket message are refused alike, beside calls that are served.
    batch = [call("eth_chainId", [], 1), call("evm_setAutomine", [False], 2)]
    got = await post(url, batch)
    assert got[0]["result"] == "0x38" and got[1]["error"]["code"] == -32601
    async with connect(lab.relay.ws_url) as ws:
        await ws.send(orjson.dumps(call("anvil_setBalance", [STRANGER, "0x1"], 3)))
        got = orjson.loads(await ws.recv())
        assert got["id"] == 3 and got["error"]["code"] == -32601
    counts = await lab.proxy.counts()
    reached = [m for m in counts if m.startswith(("debug_", "anvil_", "evm_", "relay_"))]
    assert reached == [], f"refused calls reached the node: {counts}"
    assert await balance(lab.anvil.url) == before  # anvil's own state: nothing changed


async def test_log_guards_and_the_tiers_batch_length_hold(lab: Lab) -> None:
    url = lab.relay.url
    # Everything from genesis, no address: past the range guard once "latest" is resolved.
    got = await rpc(url, "eth_getLogs", [{"fromBlock": "0x0", "toBlock": "latest"}])
    error = got["error"]
    assert error["code"] == -32005
    assert f"limited to a {RANGE} block range" in error["message"]
    assert error["data"] == {"limit": "logs.max_block_range", "value": RANGE}
    assert "eth_getLogs" not in await lab.proxy.counts()
    # The emitter's logs: one block's answer passes the size guard, all five do not.
    one = {"address": lab.emitter, "fromBlock": hex(lab.first), "toBlock": hex(lab.first)}
    got = await rpc(url, "eth_getLogs", [one])
    assert len(got["result"]) == 1
    every = {**one, "toBlock": hex(lab.first + LOGS - 1)}
    direct = await rpc(lab.anvil.url, "eth_getLogs", [every])
    assert len(direct["result"]) == LOGS
    assert len(orjson.dumps(direct["result"])) > ANSWER_BYTES  # the node's answer is past it
    for _ in range(2):  # never cached: refused again
        got = await rpc(url, "eth_getLogs", [every])
        assert got["error"]["code"] == -32005, got
        assert got["error"]["data"] == {"limit": "logs.max_answer_bytes", "value": ANSWER_BYTES}
        assert "response size exceeded" in got["error"]["message"]
    # The default tier's batch length is 10 here, the node's 1,000.
    calls = [call("eth_chainId", [], i) for i in range(BATCH + 1)]
    got = await post(url, calls)
    assert got["error"] == {
        "code": -32600,
        "message": f"batch of {BATCH + 1} exceeds the limit of {BATCH}",
    }
    got = await post(url, calls[:BATCH])
    assert [a["result"] for a in got] == ["0x38"] * BATCH
