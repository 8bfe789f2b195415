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
import random
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


# Ports handed out for listeners are drawn from below the kernel's ephemeral range: a port
# the kernel picked (bind to 0) is free only until it hands the same one to some outgoing
# connection, which on a busy machine happens between the pick and the listener's bind.
LISTEN_PORTS_LOW = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port a listener can bind on ``host`` now: from below the ephemeral range where
    there is room (chosen at random, so processes picking at once rarely meet, and never
    twice in this process), else one the kernel picks."""
    high = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(100 if high - LISTEN_PORTS_LOW > 1_000 else 0):
        port = rng.randrange(LISTEN_PORTS_LOW, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
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


# --- a busy chain: ERC-20 transfers from many unlocked accounts -------------------------
# BenchToken, a plain ERC-20 (balanceOf, transfer, approve, transferFrom, Transfer and
# Approval events) that mints ``amount`` to each of ``holders`` at construction. Compiled
# once with solc 0.8.26 (solcjs 0.8.26+commit.8a97fa7a; optimizer on, 200 runs; evmVersion
# shanghai; metadata hash none) from this source:
#
# // SPDX-License-Identifier: MIT
# pragma solidity 0.8.26;
#
# contract BenchToken {
#     uint8 public constant decimals = 18;
#     uint256 public totalSupply;
#     mapping(address => uint256) public balanceOf;
#     mapping(address => mapping(address => uint256)) public allowance;
#
#     event Transfer(address indexed from, address indexed to, uint256 value);
#     event Approval(address indexed owner, address indexed spender, uint256 value);
#
#     constructor(address[] memory holders, uint256 amount) {
#         for (uint256 i = 0; i < holders.length; i++) {
#             balanceOf[holders[i]] += amount;
#             emit Transfer(address(0), holders[i], amount);
#         }
#         totalSupply = amount * holders.length;
#     }
#
#     function transfer(address to, uint256 value) external returns (bool) {
#         _move(msg.sender, to, value);
#         return true;
#     }
#
#     function approve(address spender, uint256 value) external returns (bool) {
#         allowance[msg.sender][spender] = value;
#         emit Approval(msg.sender, spender, value);
#         return true;
#     }
#
#     function transferFrom(address from, address to, uint256 value) external returns (bool) {
#         uint256 allowed = allowance[from][msg.sender];
#         require(allowed >= value, "allowance");
#         if (allowed != type(uint256).max) {
#             allowance[from][msg.sender] = allowed - value;
#         }
#         _move(from, to, value);
#         return true;
#     }
#
#     function _move(address from, address to, uint256 value) private {
#         uint256 held = balanceOf[from];
#         require(held >= value, "balance");
#         unchecked {
#             balanceOf[from] = held - value;
#         }
#         balanceOf[to] += value;
#         emit Transfer(from, to, value);
#     }
# }
TOKEN_INITCODE = (
    "608060405234801561000f575f80fd5b506040516106e53803806106e583398101604081905261002e916101"
    "3f565b5f5b82518110156100f9578160015f85848151811061004f5761004f610213565b6020026020010151"
    "6001600160a01b03166001600160a01b031681526020019081526020015f205f828254610084919061023b56"
    "5b9250508190555082818151811061009d5761009d610213565b60200260200101516001600160a01b03165f"
    "6001600160a01b03167fddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef8460"
    "40516100e991815260200190565b60405180910390a3600101610030565b5081516101069082610254565b5f"
    "555061026b9050565b634e487b7160e01b5f52604160045260245ffd5b80516001600160a01b038116811461"
    "013a575f80fd5b919050565b5f8060408385031215610150575f80fd5b82516001600160401b038111156101"
    "65575f80fd5b8301601f81018513610175575f80fd5b80516001600160401b0381111561018e5761018e6101"
    "10565b604051600582901b90603f8201601f191681016001600160401b03811182821017156101bc576101bc"
    "610110565b6040529182526020818401810192908101888411156101d9575f80fd5b6020850194505b838510"
    "156101ff576101f185610124565b8152602094850194016101e0565b50602096909601519597959650505050"
    "5050565b634e487b7160e01b5f52603260045260245ffd5b634e487b7160e01b5f52601160045260245ffd5b"
    "8082018082111561024e5761024e610227565b92915050565b808202811582820484141761024e5761024e61"
    "0227565b61046d806102785f395ff3fe608060405234801561000f575f80fd5b506004361061007a575f3560"
    "e01c8063313ce56711610058578063313ce567146100cf57806370a08231146100e9578063a9059cbb146101"
    "08578063dd62ed3e1461011b575f80fd5b8063095ea7b31461007e57806318160ddd146100a657806323b872"
    "dd146100bc575b5f80fd5b61009161008c366004610373565b610145565b60405190151581526020015b6040"
    "5180910390f35b6100ae5f5481565b60405190815260200161009d565b6100916100ca36600461039b565b61"
    "01b1565b6100d7601281565b60405160ff909116815260200161009d565b6100ae6100f73660046103d5565b"
    "60016020525f908152604090205481565b610091610116366004610373565b610261565b6100ae6101293660"
    "046103f5565b600260209081525f928352604080842090915290825290205481565b335f8181526002602090"
    "815260408083206001600160a01b038716808552925280832085905551919290917f8c5be1e5ebec7d5bd14f"
    "71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b9259061019f9086815260200190565b60405180910390a3"
    "5060015b92915050565b6001600160a01b0383165f9081526002602090815260408083203384529091528120"
    "54828110156102155760405162461bcd60e51b8152602060048201526009602482015268616c6c6f77616e63"
    "6560b81b60448201526064015b60405180910390fd5b5f19811461024b57610227838261043a565b60016001"
    "60a01b0386165f9081526002602090815260408083203384529091529020555b610256858585610276565b50"
    "6001949350505050565b5f61026d338484610276565b50600192915050565b6001600160a01b0383165f9081"
    "5260016020526040902054818110156102c85760405162461bcd60e51b815260206004820152600760248201"
    "526662616c616e636560c81b604482015260640161020c565b6001600160a01b038085165f90815260016020"
    "5260408082208585039055918516815290812080548492906102fe90849061044d565b925050819055508260"
    "01600160a01b0316846001600160a01b03167fddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628"
    "f55a4df523b3ef8460405161034a91815260200190565b60405180910390a350505050565b80356001600160"
    "a01b038116811461036e575f80fd5b919050565b5f8060408385031215610384575f80fd5b61038d83610358"
    "565b946020939093013593505050565b5f805f606084860312156103ad575f80fd5b6103b684610358565b92"
    "506103c460208501610358565b929592945050506040919091013590565b5f602082840312156103e5575f80"
    "fd5b6103ee82610358565b9392505050565b5f8060408385031215610406575f80fd5b61040f83610358565b"
    "915061041d60208401610358565b90509250929050565b634e487b7160e01b5f52601160045260245ffd5b81"
    "8103818111156101ab576101ab610426565b808201808211156101ab576101ab61042656fea164736f6c6343"
    "00081a000a"
)
BALANCE_OF = "0x70a08231"  # balanceOf(address)
TRANSFER = "0xa9059cbb"  # transfer(address,uint256)
# Gas for one transfer: 21,000 + calldata + two storage writes (one may be a new slot,
# 22,100) + the Transfer log: about 52,000 at most; the rest is headroom.
TRANSFER_GAS = 90_000
# Gas to deploy BenchToken: the code, plus a new balance slot and a Transfer log per holder.
TOKEN_DEPLOY_GAS = 600_000
TOKEN_GAS_PER_HOLDER = 30_000


def _topic_word(address: str) -> str:
    return address[2:].lower().rjust(64, "0")


def token_initcode(holders: list[str], amount: int) -> str:
    """BenchToken's init code with its constructor arguments ``(holders, amount)``."""
    args = f"{0x40:064x}{amount:064x}{len(holders):064x}"
    return "0x" + TOKEN_INITCODE + args + "".join(_topic_word(h) for h in holders)


def balance_of_data(holder: str) -> str:
    """Calldata of ``balanceOf(holder)``."""
    return BALANCE_OF + _topic_word(holder)


def transfer_data(to: str, amount: int) -> str:
    """Calldata of ``transfer(to, amount)``."""
    return TRANSFER + _topic_word(to) + f"{amount:064x}"


async def rpc_batch(
    session: aiohttp.ClientSession, url: str, calls: list[tuple[str, list[Any]]]
) -> list[dict[str, Any]]:
    """One JSON-RPC batch; the answer objects in the order of ``calls``."""
    body = [
        {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
        for i, (method, params) in enumerate(calls)
    ]
    async with session.post(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    ) as r:
        doc = orjson.loads(await r.read())
    if not isinstance(doc, list):
        raise RuntimeError(f"batch answered {str(doc)[:200]}")
    by_id = {a.get("id"): a for a in doc if isinstance(a, dict)}
    return [by_id.get(i, {"error": "no answer"}) for i in range(len(calls))]


async def deploy_tokens(
    session: aiohttp.ClientSession, url: str, count: int, holders: list[str], amount: int
) -> list[str]:
    """Deploy ``count`` BenchTokens, each minting ``amount`` to every one of ``holders``;
    their addresses once all are mined."""
    gas = hex(TOKEN_DEPLOY_GAS + TOKEN_GAS_PER_HOLDER * len(holders))
    tx = {"from": holders[0], "data": token_initcode(holders, amount), "gas": gas}
    answers = await rpc_batch(session, url, [("eth_sendTransaction", [tx])] * count)
    hashes = []
    for a in answers:
        if "error" in a:
            raise RuntimeError(f"token deployment: {a['error']}")
        hashes.append(a["result"])
    addresses = []
    for tx_hash in hashes:
        while True:
            receipt = await rpc(session, url, "eth_getTransactionReceipt", [tx_hash])
            if receipt is not None:
                break
            await asyncio.sleep(0.1)  # interval mining: the next block carries it
        if receipt.get("status") != "0x1" or not receipt.get("contractAddress"):
            raise RuntimeError(f"token deployment failed: {receipt}")
        addresses.append(str(receipt["contractAddress"]))
    return addresses


class BusyTraffic:
    """A busy chain: ERC-20 transfers from many unlocked accounts, right after each block.

    Follows the node's heads over its WebSocket (``newHeads``). After each new head it
    sends, as one JSON-RPC batch of ``eth_sendTransaction``, between ``per_block[0]`` and
    ``per_block[1]`` token transfers, each from a different one of ``senders`` (accounts
    the node holds unlocked: anvil ``--accounts N``), of a random one of ``tokens``, to a
    random sender or one of ``recipients``. With interval mining the batch lands in the
    next block, so every block carries that many transfers and their Transfer logs.

    ``head`` is the last head seen; ``sent`` maps each block number to the hashes of the
    transfers sent for it (the last ``keep_blocks`` blocks): the transactions a dapp's users
    would ask about. Nothing here is measured: the driver talks to the node directly.
    """

    def __init__(
        self,
        url: str,
        ws_url: str,
        senders: list[str],
        tokens: list[str],
        recipients: list[str],
        *,
        per_block: tuple[int, int] = (100, 200),
        seed: int = 1,
        keep_blocks: int = 256,
    ) -> None:
        if per_block[1] > len(senders):
            raise ValueError(f"{per_block[1]} transfers a block need as many senders")
        self.url = url
        self.ws_url = ws_url
        self.senders = senders
        self.tokens = tokens
        self.recipients = recipients
        self.per_block = per_block
        self.keep_blocks = keep_blocks
        self.rng = random.Random(seed)
        self.head = 0
        self.sent: dict[int, list[str]] = {}
        self.errors = 0
        self.first_errors: list[str] = []
        self._next_sender = 0
        self._new_head = asyncio.Event()
        self._batches: set[asyncio.Task[None]] = set()

    async def wait_head(self, above: int, timeout: float) -> int:
        """The head once it is above ``above``, or the head as it is after ``timeout``."""
        if self.head <= above:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while self.head <= above:
                        self._new_head.clear()
                        await self._new_head.wait()
        return self.head

    def mined(self, lo: int, hi: int) -> list[int]:
        """Blocks from ``lo`` to ``hi`` (inclusive) that transfers were sent for."""
        return [n for n in range(lo, hi + 1) if self.sent.get(n)]

    async def run(self, stop: asyncio.Event) -> None:
        """Follow heads and send a batch after each until ``stop`` is set."""
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.ws_url, max_msg_size=64 * 1024 * 1024) as ws:
                await ws.send_bytes(orjson.dumps(_req("eth_subscribe", ["newHeads"])))
                stopped = asyncio.create_task(stop.wait())
                try:
                    while not stop.is_set():
                        receive = asyncio.create_task(ws.receive())
                        await asyncio.wait({receive, stopped}, return_when=asyncio.FIRST_COMPLETED)
                        if not receive.done():
                            receive.cancel()
                            break
                        msg = receive.result()
                        if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                            raise RuntimeError(f"node WebSocket closed: {msg.type.name}")
                        self._on_message(orjson.loads(msg.data), session)
                finally:
                    stopped.cancel()
                    for task in list(self._batches):
                        task.cancel()
                    await asyncio.gather(*self._batches, return_exceptions=True)

    def _on_message(self, doc: Any, session: aiohttp.ClientSession) -> None:
        params = doc.get("params") if isinstance(doc, dict) else None
        if not isinstance(params, dict) or not isinstance(params.get("result"), dict):
            return  # the subscription's id
        number = int(params["result"]["number"], 16)
        if number <= self.head:
            return
        self.head = number
        self._new_head.set()
        for old in [n for n in self.sent if n <= number - self.keep_blocks]:
            del self.sent[old]
        task = asyncio.create_task(self._send(session, number + 1))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send(self, session: aiohttp.ClientSession, block: int) -> None:
        rng = self.rng
        count = rng.randint(*self.per_block)
        calls: list[tuple[str, list[Any]]] = []
        for _ in range(count):
            sender = self.senders[self._next_sender % len(self.senders)]
            self._next_sender += 1
            pool = self.senders if rng.random() < 0.3 else self.recipients
            to = rng.choice(pool)
            data = transfer_data(to, rng.randrange(1, 10**6))
            tx = {"from": sender, "to": rng.choice(self.tokens), "data": data}
            calls.append(("eth_sendTransaction", [{**tx, "gas": hex(TRANSFER_GAS)}]))
        try:
            answers = await rpc_batch(session, self.url, calls)
        except (RuntimeError, aiohttp.ClientError, OSError) as exc:
            self._error(repr(exc), count)
            return
        hashes = []
        for a in answers:
            if "error" in a:
                self._error(str(a["error"]), 1)
            else:
                hashes.append(str(a["result"]))
        self.sent.setdefault(block, []).extend(hashes)

    def _error(self, text: str, count: int) -> None:
        self.errors += count
        if len(self.first_errors) < 5:
            self.first_errors.append(text[:300])
