"""web3.py sees the same chain through the relay as from anvil directly.

A real anvil (chain id 56, one block a second) carries real traffic: plain transfers,
Transfer logs from the emitter contract and writes to a one-slot store, so blocks have
transactions, receipts, logs and state that changes from block to block. Every read is
made twice with web3.py, once through a relay process and once straight to anvil, and the
two results must be equal. Reads at explicit blocks are compared as they are; reads by tag
(latest, safe, finalized, gas price) are repeated until both sides saw the same head.
Asked again, the explicit reads must come from the relay's cache and still be equal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec

import aiohttp
import orjson
import pytest
from eth_typing import BlockNumber, ChecksumAddress, HexStr
from web3 import AsyncHTTPProvider, AsyncWeb3, Web3, WebSocketProvider
from web3.exceptions import Web3RPCError
from web3.types import FilterParams, TxParams, Wei

from chainrelay.devnet import Anvil, traffic, transfer_emitter_initcode
from tests.lab.chain import (
    DEV_ACCOUNTS,
    DEV_KEYS,
    TRANSFER_TOPIC,
    Chain,
    metric,
    sign_transfer,
    store_initcode,
    topic_of,
)
from tests.lab.procs import Relay
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

# anvil's "finalized" trails "latest" by 64 blocks: 72 filled blocks leave a few final
# blocks that carry transactions, so both finality classes are compared.
FILL_ROUNDS = 72
# The relay keys unfinalized blocks by the hashes it has seen; blocks mined before it
# started and not yet final pass through. Wait for this many blocks mined while it runs.
LIVE_BLOCKS = 2
SETTLE_TIMEOUT = 12 * SECOND

Read = Callable[[AsyncWeb3[Any]], Awaitable[Any]]
P = ParamSpec("P")
# As web3's types want them; the dev accounts are written checksummed already.
ACCOUNTS = [Web3.to_checksum_address(a) for a in DEV_ACCOUNTS]


def bound(
    read: Callable[Concatenate[AsyncWeb3[Any], P], Awaitable[Any]], *args: P.args, **kw: P.kwargs
) -> Read:
    """``read`` with its arguments after the web3 bound now: reads made in a loop keep their
    own block, hash or account."""
    return lambda w: read(w, *args, **kw)


@dataclass
class Net:
    anvil: Anvil
    relay: Relay
    node: Chain
    direct: AsyncWeb3[Any]
    through: AsyncWeb3[Any]
    emitter: ChecksumAddress
    store: ChecksumAddress
    filled_head: int  # the last block filled before the relay started
    start_head: int  # anvil's head once the relay served: later blocks are in its window


@pytest.fixture(params=["ws", "http"])
async def net(
    request: pytest.FixtureRequest,
    anvil: Anvil,
    relay_factory: Callable[..., Awaitable[Relay]],
) -> AsyncIterator[Net]:
    """anvil with filled blocks and live traffic, and a relay following it by WS or HTTP."""
    async with Chain.open(anvil.url) as node:
        emitter = Web3.to_checksum_address(await node.deploy(transfer_emitter_initcode()))
        store = Web3.to_checksum_address(await node.deploy(store_initcode()))
        sent = await node.fill(FILL_ROUNDS, emitter, store)
        filled_head = int((await node.receipt(sent[-1]))["blockNumber"], 16)
        relay = await relay_factory([anvil.ws_url if request.param == "ws" else anvil.url])
        start_head, _ = await node.head()
        stop = asyncio.Event()
        task = asyncio.create_task(traffic(anvil.url, stop, emitter=emitter))
        direct = AsyncWeb3(AsyncHTTPProvider(anvil.url))
        through = AsyncWeb3(AsyncHTTPProvider(relay.url))
        try:
            yield Net(anvil, relay, node, direct, through, emitter, store, filled_head, start_head)
        finally:
            stop.set()
            await task
            await direct.provider.disconnect()
            await through.provider.disconnect()


async def relay_finalized(relay: Relay) -> int:
    async with aiohttp.ClientSession() as s, s.get(relay.url + "/health") as r:
        return int(orjson.loads(await r.read())["finalized"])


async def wait_relay_head(net: Net, number: int) -> None:
    """Wait until the relay's latest block is at ``number`` or past it, and on anvil's chain."""
    deadline = time.monotonic() + 10 * SECOND
    while True:
        got = await net.through.eth.get_block("latest")
        if got["number"] >= number:
            assert got == await net.direct.eth.get_block(got["number"])
            return
        assert time.monotonic() < deadline, f"relay head stuck at {got['number']} < {number}"
        await asyncio.sleep(0.05)


async def same(net: Net, read: Read, what: str) -> Any:
    """One read through the relay and the same read from anvil: equal, and the result."""
    through = await read(net.through)
    direct = await read(net.direct)
    assert through == direct, f"{what}: relay {through!r} != anvil {direct!r}"
    return direct


async def settle(net: Net, read: Read, what: str) -> Any:
    """Like ``same`` for reads about the head: retried until both sides saw the same head."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        through = await read(net.through)
        direct = await read(net.direct)
        if through == direct:
            return direct
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: relay and anvil never agreed within {SETTLE_TIMEOUT:.0f}s; "
                f"last relay {through!r} != anvil {direct!r}"
            )
        await asyncio.sleep(0.05)


async def hits(relay: Relay, method: str) -> float:
    return metric(await relay.metrics(), "chainrelay_requests_total", method=method, outcome="hit")


async def again(net: Net, reads: list[tuple[str, str, Read, bool]]) -> None:
    """Repeat every read: still equal, and those that must be cached are counted as hits."""
    missed = []
    for what, method, read, must_hit in reads:
        before = await hits(net.relay, method)
        await same(net, read, f"{what} (again)")
        if must_hit and await hits(net.relay, method) == before:
            missed.append(f"{method}: {what}")
    assert not missed, "repeated reads not answered from cache:\n" + "\n".join(missed)


async def live_blocks(net: Net, count: int = LIVE_BLOCKS) -> list[int]:
    """The first ``count`` blocks with transactions mined after the relay started, once the
    relay has seen them (interval mining also makes empty blocks)."""
    deadline = time.monotonic() + 15 * SECOND
    n = net.start_head + 1
    found: list[int] = []
    while len(found) < count:
        await wait_relay_head(net, n)
        if await net.direct.eth.get_block_transaction_count(n):
            found.append(n)
        n += 1
        assert time.monotonic() < deadline, f"no {count} blocks with transactions after start"
    return found


async def settled_fees(w3: AsyncWeb3[Any], newest: int, percentiles: list[float]) -> Any:
    """eth_feeHistory up to ``newest`` without the base fee of the block after it.

    anvil answers that last entry with its current pending base fee whatever ``newest``
    is (geth gives block newest+1's), so on anvil it changes with every block while the
    rest of the answer is fixed.
    """
    fees: dict[str, Any] = dict(await w3.eth.fee_history(4, BlockNumber(newest), percentiles))
    fees["baseFeePerGas"] = fees["baseFeePerGas"][:-1]
    fees["baseFeePerBlobGas"] = fees["baseFeePerBlobGas"][:-1]
    return fees


async def block_numbers(net: Net) -> tuple[list[int], set[int], int]:
    """Blocks with transactions to compare, those of them the relay must answer from cache
    when asked again (final ones and ones mined while it ran; the others are unfinalized
    blocks from before it started, compared too but allowed to pass through), and the
    relay's finalized block."""
    live = await live_blocks(net)
    finalized = await relay_finalized(net.relay)
    assert finalized >= 4, f"relay took no finality from anvil (finalized={finalized})"
    numbers = sorted({1, finalized // 2, finalized, finalized + 1, net.filled_head, *live})
    cached = {n for n in numbers if n <= finalized or n > net.start_head}
    return numbers, cached, finalized


async def test_blocks_transactions_receipts_and_logs_match(net: Net) -> None:
    numbers, cached, finalized = await block_numbers(net)

    reads: list[tuple[str, str, Read, bool]] = []  # (what, method, read, must hit)

    def add(what: str, method: str, read: Read, hit: bool) -> None:
        reads.append((what, method, read, hit))

    with_logs = 0
    for n in numbers:
        hit = n in cached
        block = await same(net, bound(lambda w, n: w.eth.get_block(n, True), n), f"block {n} full")
        assert block["transactions"], f"block {n} has no transactions: nothing to compare"
        h = block["hash"]
        add(f"block {n}", "eth_getBlockByNumber", bound(lambda w, n: w.eth.get_block(n), n), hit)
        add(
            f"block {n} full",
            "eth_getBlockByNumber",
            bound(lambda w, n: w.eth.get_block(n, True), n),
            hit,
        )
        add(
            f"block {h.hex()}",
            "eth_getBlockByHash",
            bound(lambda w, h: w.eth.get_block(h), h),
            True,
        )
        add(
            f"block {h.hex()} full",
            "eth_getBlockByHash",
            bound(lambda w, h: w.eth.get_block(h, True), h),
            True,
        )
        add(
            f"receipts of {n}",
            "eth_getBlockReceipts",
            bound(lambda w, n: w.eth.get_block_receipts(n), n),
            hit,
        )
        receipts = await net.direct.eth.get_block_receipts(n)
        has_logs = any(r["logs"] for r in receipts)
        with_logs += has_logs
        # A block named by hash may be final, but the relay cannot tell without asking:
        # an empty answer for it is not stored (see DESIGN.md, empty results).
        add(
            f"logs of block {n} by hash {h.hex()}",
            "eth_getLogs",
            bound(lambda w, h: w.eth.get_logs({"blockHash": h}), h),
            has_logs,
        )
        add(
            f"emitter logs in {n}",
            "eth_getLogs",
            bound(
                lambda w, n: w.eth.get_logs({"fromBlock": n, "toBlock": n, "address": net.emitter}),
                n,
            ),
            hit,
        )
        for tx in block["transactions"]:
            th = tx["hash"]
            add(
                f"tx {th.hex()}",
                "eth_getTransactionByHash",
                bound(lambda w, th: w.eth.get_transaction(th), th),
                True,
            )
            add(
                f"receipt {th.hex()}",
                "eth_getTransactionReceipt",
                bound(lambda w, th: w.eth.get_transaction_receipt(th), th),
                True,
            )
    assert with_logs >= len(numbers) - 1, "too few compared blocks carry logs"

    # Ranges: all final, and one that runs from final blocks into the relay's live window.
    to_dev2 = [TRANSFER_TOPIC, None, topic_of(DEV_ACCOUNTS[2])]
    ranges: list[tuple[str, FilterParams, bool]] = [
        ("final range", {"fromBlock": 1, "toBlock": finalized, "address": net.emitter}, True),
        (
            "final range, to dev2",
            {"fromBlock": 1, "toBlock": finalized, "topics": to_dev2},
            True,
        ),
        (
            "range into the live window",
            {
                "fromBlock": finalized - 2,
                "toBlock": numbers[-1],
                "address": net.emitter,
                "topics": [TRANSFER_TOPIC],
            },
            True,
        ),
    ]
    for what, flt, hit in ranges:
        logs = await same(net, bound(lambda w, flt: w.eth.get_logs(flt), flt), what)
        assert len(logs) >= 3, f"{what}: only {len(logs)} logs, nothing to compare"
        add(what, "eth_getLogs", bound(lambda w, flt: w.eth.get_logs(flt), flt), hit)

    for what, _method, read, _hit in reads:
        await same(net, read, what)

    # Tags name a moving block: compare once both sides saw the same head.
    for tag in ("latest", "safe", "finalized", "earliest"):
        for full in (False, True):
            await settle(
                net, bound(lambda w, t, f: w.eth.get_block(t, f), tag, full), f"block {tag}"
            )
    earliest = await net.through.eth.get_block("earliest")
    assert earliest["number"] == 0

    # Asked again, the reads come from the relay's cache, and still match anvil.
    await again(net, reads)


async def test_state_reads_match(net: Net) -> None:
    numbers, cached, _finalized = await block_numbers(net)
    a0, a1, a2 = ACCOUNTS
    write: TxParams = {"from": a0, "to": net.store, "data": HexStr("0x" + "2a".rjust(64, "0"))}
    transfer: TxParams = {"from": a1, "to": a2, "value": Wei(1)}

    reads: list[tuple[str, str, Read, bool]] = []
    for n in numbers:
        hit = n in cached
        for acct in ACCOUNTS:
            reads.append(
                (
                    f"balance {acct} at {n}",
                    "eth_getBalance",
                    bound(lambda w, a, n: w.eth.get_balance(a, n), acct, n),
                    hit,
                )
            )
            reads.append(
                (
                    f"nonce {acct} at {n}",
                    "eth_getTransactionCount",
                    bound(lambda w, a, n: w.eth.get_transaction_count(a, n), acct, n),
                    hit,
                )
            )
        for contract in (net.store, net.emitter):
            reads.append(
                (
                    f"code {contract} at {n}",
                    "eth_getCode",
                    bound(lambda w, c, n: w.eth.get_code(c, n), contract, n),
                    hit,
                )
            )
        reads += [
            (
                f"store slot 0 at {n}",
                "eth_getStorageAt",
                bound(lambda w, n: w.eth.get_storage_at(net.store, 0, n), n),
                hit,
            ),
            (
                f"store read at {n}",
                "eth_call",
                bound(lambda w, n: w.eth.call({"to": net.store}, n), n),
                hit,
            ),
            (
                f"estimate store write at {n}",
                "eth_estimateGas",
                bound(lambda w, n: w.eth.estimate_gas(write, n), n),
                hit,
            ),
            (
                f"estimate transfer at {n}",
                "eth_estimateGas",
                bound(lambda w, n: w.eth.estimate_gas(transfer, n), n),
                hit,
            ),
            (
                f"fee history to {n}",
                "eth_feeHistory",
                bound(lambda w, n: settled_fees(w, n, [25.0, 75.0]), n),
                hit,
            ),
        ]
    for what, _method, read, _hit in reads:
        await same(net, read, what)

    # Each filled block wrote another word to the store: the reads are block-specific.
    filled = [n for n in numbers if 3 <= n <= net.filled_head]
    words = {await net.direct.eth.get_storage_at(net.store, 0, n) for n in filled}
    assert len(filled) >= 3 and len(words) == len(filled), "store slot did not change"
    assert await net.through.eth.get_code(net.store, numbers[-1]) == bytes.fromhex(
        store_initcode()[2 + 22 :]
    )

    assert await same(net, lambda w: w.eth.chain_id, "chain id") == 56
    await settle(net, lambda w: w.eth.gas_price, "gas price")
    await settle(net, lambda w: w.eth.get_balance(a0, "latest"), "balance at latest")
    await settle(net, lambda w: w.eth.get_transaction_count(a1, "safe"), "nonce at safe")
    await settle(net, lambda w: w.eth.get_storage_at(net.store, 0, "finalized"), "slot at final")
    await settle(net, lambda w: w.eth.fee_history(4, "latest", [50.0]), "fee history latest")
    fees = await net.direct.eth.fee_history(4, BlockNumber(numbers[-1]), [25.0, 75.0])
    assert len(fees["baseFeePerGas"]) == 5 and len(fees["reward"]) == 4

    await again(net, reads)


async def test_signed_transaction_through_relay(net: Net) -> None:
    account = ACCOUNTS[0]
    # The traffic generator sends from the same account: a nonce it takes first is retried.
    for attempt in range(5):
        latest = await net.through.eth.get_block("latest")
        nonce = await net.through.eth.get_transaction_count(account, "pending")
        raw, tx_hash = sign_transfer(
            DEV_KEYS[0],
            nonce=nonce,
            to=DEV_ACCOUNTS[2],
            value=123_456_789 + attempt,
            chain_id=56,
            base_fee=int(latest["baseFeePerGas"]),
        )
        try:
            sent = await net.through.eth.send_raw_transaction(HexStr(raw))
            break
        except Web3RPCError as exc:
            if "nonce" not in str(exc).lower() and "underpriced" not in str(exc).lower():
                raise
    else:
        raise AssertionError("the signed transaction lost the nonce race five times")
    assert sent.to_0x_hex() == tx_hash

    receipt = await net.through.eth.wait_for_transaction_receipt(sent, timeout=10 * SECOND)
    assert receipt["status"] == 1
    assert receipt["from"].lower() == account.lower()
    assert receipt == await net.direct.eth.get_transaction_receipt(sent)
    await same(net, lambda w: w.eth.get_transaction(sent), "the sent transaction")
    await same(net, lambda w: w.eth.get_transaction_receipt(sent), "its receipt")
    block = await same(
        net, lambda w: w.eth.get_block(receipt["blockNumber"]), "the block that holds it"
    )
    assert sent in block["transactions"]
    value = await same(net, lambda w: w.eth.get_transaction(sent), "the sent transaction again")
    assert value["value"] == 123_456_789 + attempt


@pytest.mark.parametrize("net", ["ws"], indirect=True)
async def test_websocket_provider_plain_calls(net: Net) -> None:
    live = await live_blocks(net, 1)
    finalized = await relay_finalized(net.relay)
    async with AsyncWeb3(WebSocketProvider(net.relay.ws_url, max_connection_retries=1)) as ws:
        assert await ws.is_connected()
        assert await ws.eth.chain_id == await net.direct.eth.chain_id
        head = await ws.eth.block_number
        assert head >= net.start_head
        for n in (finalized, *live):
            block = await ws.eth.get_block(n, True)
            assert block == await net.direct.eth.get_block(n, True)
            tx = block["transactions"][0]
            assert await ws.eth.get_transaction_receipt(tx["hash"]) == (
                await net.direct.eth.get_transaction_receipt(tx["hash"])
            )
            assert await ws.eth.get_balance(ACCOUNTS[1], n) == (
                await net.direct.eth.get_balance(ACCOUNTS[1], n)
            )
            assert await ws.eth.get_storage_at(net.store, 0, n) == (
                await net.direct.eth.get_storage_at(net.store, 0, n)
            )
        # Several calls in flight on the one connection come back to the right callers.
        many = await asyncio.gather(*(ws.eth.get_block(n) for n in range(1, 9)))
        assert [b["number"] for b in many] == list(range(1, 9))
        assert many == [await net.direct.eth.get_block(n) for n in range(1, 9)]
