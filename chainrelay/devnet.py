"""A local devnet: a real anvil node plus a steady stream of real transactions.

Used by ``chainrelay`` with no arguments and by the test lab. Every block carries plain
transfers and calls to a tiny contract that emits ERC-20 ``Transfer`` logs, so blocks have
transactions, receipts and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from eth_utils import keccak

log = logging.getLogger(__name__)

TRANSFER_TOPIC = "0x" + keccak(b"Transfer(address,address,uint256)").hex()
# anvil's well-known development accounts (mnemonic "test test ... junk").
DEV_ACCOUNTS = [
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
]
DEV_KEYS = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
]


def transfer_emitter_initcode() -> str:
    """Init code of a contract whose every call emits Transfer(caller, arg0, arg1).

    Runtime: mstore(0, calldataload(32)); log3(0, 32, TOPIC, caller, calldataload(0)); stop.
    """
    runtime = (
        "602035600052"  # mstore(0, calldataload(32))
        "600035"  # calldataload(0): topic2 (to)
        "33"  # caller: topic1 (from)
        "7f"
        + TRANSFER_TOPIC[2:]  # topic0
        + "60206000a3"  # log3(offset 0, size 32, ...)
        "00"
    )
    size = len(runtime) // 2
    init = f"60{size:02x}80600b6000396000f3"
    return "0x" + init + runtime


def find_anvil() -> str:
    """The anvil binary: $CHAINRELAY_ANVIL, PATH, or ./.tools from the npm package."""
    env = os.environ.get("CHAINRELAY_ANVIL")
    if env:
        return env
    found = shutil.which("anvil")
    if found:
        return found
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[1]):
        candidate = base / ".tools" / "node_modules" / ".bin" / "anvil"
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(
        "anvil not found: run `npm install --prefix .tools @foundry-rs/anvil-linux-amd64` "
        "or set CHAINRELAY_ANVIL"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Anvil:
    """A running anvil process."""

    def __init__(
        self,
        *,
        chain_id: int = 56,
        block_time: float | None = 1.0,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.block_time = block_time
        self.host = host
        self.port = port or free_port(host)
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self) -> None:
        cmd = [
            find_anvil(),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--chain-id",
            str(self.chain_id),
            "--silent",
            *self.extra,
        ]
        if self.block_time:
            cmd += ["--block-time", str(self.block_time)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as s:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"anvil exited: {err}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with s.post(self.url, json=_req("eth_chainId", [])) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()


def _req(method: str, params: list[Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


async def rpc(session: aiohttp.ClientSession, url: str, method: str, params: list[Any]) -> Any:
    async with session.post(
        url, data=orjson.dumps(_req(method, params)), headers={"Content-Type": "application/json"}
    ) as r:
        doc = orjson.loads(await r.read())
    if "error" in doc:
        raise RuntimeError(f"{method}: {doc['error']}")
    return doc["result"]


async def deploy_emitter(session: aiohttp.ClientSession, url: str) -> str:
    """Deploy the Transfer emitter and return its address (mines a block if needed)."""
    tx_hash = await rpc(
        session,
        url,
        "eth_sendTransaction",
        [{"from": DEV_ACCOUNTS[0], "data": transfer_emitter_initcode(), "gas": "0x30000"}],
    )
    while True:
        receipt = await rpc(session, url, "eth_getTransactionReceipt", [tx_hash])
        if receipt is not None:
            return str(receipt["contractAddress"])
        await asyncio.sleep(0.1)


async def traffic(
    url: str,
    stop: asyncio.Event,
    *,
    per_block: int = 4,
    interval: float = 1.0,
    emitter: str | None = None,
) -> None:
    """Send ``per_block`` transfers and emitter calls every ``interval`` until ``stop``."""
    async with aiohttp.ClientSession() as session:
        if emitter is None:
            emitter = await deploy_emitter(session, url)
        i = 0
        while not stop.is_set():
            for _ in range(per_block):
                sender = DEV_ACCOUNTS[i % 3]
                to = DEV_ACCOUNTS[(i + 1) % 3]
                i += 1
                if i % 2:
                    tx = {"from": sender, "to": to, "value": hex(1000 + i)}
                else:
                    data = "0x" + to[2:].lower().rjust(64, "0") + hex(i)[2:].rjust(64, "0")
                    tx = {"from": sender, "to": emitter, "data": data, "gas": "0x20000"}
                with contextlib.suppress(RuntimeError, aiohttp.ClientError, OSError):
                    await rpc(session, url, "eth_sendTransaction", [tx])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
