"""Drive a real anvil chain from the tests: send and sign transactions, mine, wait for heads.

``Chain`` talks JSON-RPC to one endpoint (anvil directly, or a relay) over one pooled
session, so a test can make hundreds of calls without paying for a connection each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
from eth_account import Account
from eth_utils import to_checksum_address

from chainrelay.devnet import DEV_ACCOUNTS, DEV_KEYS, TRANSFER_TOPIC
from tests.lab.counting_proxy import CountingProxy, start_proxy
from tests.lab.procs import Procs, Relay
from tests.lab.timing import SECOND

__all__ = [
    "DEV_ACCOUNTS",
    "DEV_KEYS",
    "TRANSFER_TOPIC",
    "Chain",
    "RpcError",
    "emitter_data",
    "metric",
    "sign_transfer",
    "start_relay_mining",
    "store_initcode",
    "topic_of",
    "wait_same_head",
    "word",
]

# Runtime of a one-slot store: with calldata, sstore(0, calldataload(0)); without, return
# sload(0). Storage that changes from block to block makes eth_getStorageAt and eth_call
# answers depend on the block they are asked at.
_STORE_RUNTIME = (
    "36600f57"  # calldatasize; jumpi(0x0f)
    "600054600052"  # mstore(0, sload(0))
    "60206000f3"  # return(0, 32)
    "5b600035600055"  # 0x0f: jumpdest; sstore(0, calldataload(0))
    "00"  # stop
)


def store_initcode() -> str:
    size = len(_STORE_RUNTIME) // 2
    return "0x" + f"60{size:02x}80600b6000396000f3" + _STORE_RUNTIME


def topic_of(address: str) -> str:
    """An address as a 32-byte log topic."""
    return "0x" + address[2:].lower().rjust(64, "0")


def word(value: int) -> str:
    """A 32-byte word: calldata for the store, or a storage value."""
    return "0x" + hex(value)[2:].rjust(64, "0")


def emitter_data(to: str, amount: int) -> str:
    """Calldata for the Transfer emitter: it logs Transfer(caller, to, amount)."""
    return topic_of(to) + hex(amount)[2:].rjust(64, "0")


def sign_transfer(
    key: str, *, nonce: int, to: str, value: int, chain_id: int, base_fee: int
) -> tuple[str, str]:
    """A signed EIP-1559 transfer as (raw hex, transaction hash)."""
    tip = 10**9
    signed = Account.sign_transaction(
        {
            "type": 2,
            "chainId": chain_id,
            "nonce": nonce,
            "to": to,
            "value": value,
            "gas": 21_000,
            "maxPriorityFeePerGas": tip,
            "maxFeePerGas": 2 * base_fee + tip,
        },
        key,
    )
    return "0x" + signed.raw_transaction.hex(), "0x" + signed.hash.hex()


class RpcError(Exception):
    """A JSON-RPC error answer where a result was expected."""


class Chain:
    """JSON-RPC calls to one endpoint over a pooled session; use ``async with Chain.open(url)``."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session
        self._ids = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[Chain]:
        async with aiohttp.ClientSession() as session:
            yield cls(url, session)

    async def request(self, method: str, params: list[Any]) -> dict[str, Any]:
        """The whole answer object, with its ``id`` removed (ids differ by design)."""
        self._ids += 1
        rid = self._ids
        body = orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.url, data=body, headers=headers) as r:
            doc = orjson.loads(await r.read())
        assert isinstance(doc, dict), f"{method}: not an object: {doc!r}"
        assert doc.pop("id", None) == rid, f"{method}: answer with another id"
        return doc

    async def raw(self, method: str, params: list[Any]) -> bytes:
        """The answer's body as sent, for a call with id 1 (a relay splices in the caller's
        id, so a relay's body and the node's are then the same bytes)."""
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        headers = {"Content-Type": "application/json"}
        async with self.session.post(self.url, data=body, headers=headers) as r:
            assert r.status == 200, f"{method}: HTTP {r.status}"
            return await r.read()

    async def call(self, method: str, params: list[Any] | None = None) -> Any:
        doc = await self.request(method, params or [])
        if "error" in doc:
            raise RpcError(f"{method}{params!r}: {doc['error']}")
        return doc["result"]

    async def block(self, ref: str = "latest", full: bool = False) -> dict[str, Any]:
        got = await self.call("eth_getBlockByNumber", [ref, full])
        assert isinstance(got, dict), f"no block {ref}"
        return got

    async def head(self) -> tuple[int, str]:
        b = await self.block()
        return int(b["number"], 16), str(b["hash"])

    async def send(self, tx: dict[str, Any]) -> str:
        """eth_sendTransaction from an unlocked dev account; returns the hash."""
        return str(await self.call("eth_sendTransaction", [tx]))

    async def receipt(self, tx_hash: str, timeout: float = 10 * SECOND) -> dict[str, Any]:
        """Wait for a transaction's receipt (the block it is in must be mined by someone)."""
        deadline = time.monotonic() + timeout
        while True:
            got = await self.call("eth_getTransactionReceipt", [tx_hash])
            if got is not None:
                return dict(got)
            if time.monotonic() > deadline:
                raise AssertionError(f"no receipt for {tx_hash} after {timeout:.1f}s")
            await asyncio.sleep(0.05)

    async def deploy(self, initcode: str, sender: str = DEV_ACCOUNTS[0]) -> str:
        """Deploy a contract and return its (checksummed) address; mines a block to include it."""
        tx_hash = await self.send({"from": sender, "data": initcode, "gas": hex(300_000)})
        await self.call("evm_mine")
        return to_checksum_address((await self.receipt(tx_hash))["contractAddress"])

    async def fill(self, rounds: int, emitter: str, store: str) -> list[str]:
        """Mine ``rounds`` blocks, each with a transfer, a Transfer log and a store write.

        Returns the hashes of every transaction sent, in order.
        """
        a, b, c = DEV_ACCOUNTS
        hashes: list[str] = []
        for i in range(rounds):
            hashes.append(await self.send({"from": a, "to": b, "value": hex(10_000 + i)}))
            data = emitter_data(c, 1 + i)
            hashes.append(
                await self.send({"from": b, "to": emitter, "data": data, "gas": "0x20000"})
            )
            data = word(0xC0FFEE00 + i)
            hashes.append(await self.send({"from": c, "to": store, "data": data, "gas": "0x20000"}))
            await self.call("evm_mine")
        return hashes


async def wait_same_head(relay: Chain, node: Chain, timeout: float = 10 * SECOND) -> str:
    """Wait until the relay's ``latest`` block is the node's ``latest``; returns its hash."""
    deadline = time.monotonic() + timeout
    while True:
        node_head = await node.block()
        relay_head = await relay.block()
        if relay_head["hash"] == node_head["hash"]:
            return str(node_head["hash"])
        if time.monotonic() > deadline:
            raise AssertionError(
                f"relay head {int(relay_head['number'], 16)} {relay_head['hash']} never "
                f"reached node head {int(node_head['number'], 16)} {node_head['hash']} "
                f"within {timeout:.1f}s"
            )
        await asyncio.sleep(0.02)


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        have = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
        if all(have.get(k) == f'"{v}"' for k, v in labels.items()):
            total += value
    return total


# How often a node that mines on demand is made to mine while a relay in front of it
# starts: the relay waits for a first head before it reports healthy.
START_HEARTBEAT = 0.2 * SECOND
RELAY_START_TIMEOUT = 20 * SECOND


@asynccontextmanager
async def heartbeat(node: Chain) -> AsyncIterator[None]:
    """Mine a block every START_HEARTBEAT while the ``async with`` body runs: a node in
    front of a chain that mines on demand waits for a first head before it reports
    healthy."""
    stop = asyncio.Event()

    async def beat() -> None:
        while not stop.is_set():
            await node.call("evm_mine")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), START_HEARTBEAT)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        stop.set()
        await task


async def start_relay_mining(
    node: Chain,
    relay_factory: Callable[..., Awaitable[Relay]],
    upstreams: list[str],
    extra: str = "",
    each_upstream: str = "",
) -> Relay:
    """Start a relay in front of a node that mines on demand, mining a block every
    START_HEARTBEAT until the relay serves (bounded by RELAY_START_TIMEOUT)."""
    async with heartbeat(node), asyncio.timeout(RELAY_START_TIMEOUT):
        return await relay_factory(upstreams, extra, each_upstream=each_upstream)


@asynccontextmanager
async def on_demand_behind_proxy(
    procs: Procs, anvil_factory: Callable[..., Awaitable[Any]], hold: tuple[str, ...] = ()
) -> AsyncIterator[tuple[Chain, CountingProxy]]:
    """A BSC-like anvil (chain id 56) that mines only when told (automine off too), behind a
    counting proxy (``hold``: methods it holds until released); (the node, the proxy)."""
    anvil = await anvil_factory(chain_id=56, block_time=None)
    proxy = await start_proxy(procs, anvil.url, hold=hold)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        yield node, proxy
