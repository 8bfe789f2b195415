"""Block-granular filling: a client's miss on one receipt (or a second transaction) of a
block brings in the whole block's receipts (or transactions), so the other reads of that
block are hits, byte for byte the node's answers. Blocks mined before the relay started,
so the block follower never had them.

Real anvil (mining on demand), a real relay, the counting proxy between them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from chainrelay.devnet import Anvil, transfer_emitter_initcode
from tests.lab.chain import (
    DEV_ACCOUNTS,
    Chain,
    emitter_data,
    metric,
    on_demand_behind_proxy,
    start_relay_mining,
)
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
# The follower never follows here: what is warmed comes from the fills alone.
NO_FOLLOW = '[subscriptions]\nfollow_blocks = "never"\n'
TXS_PER_BLOCK = 6


async def mine_blocks_of_transfers(node: Chain, blocks: int) -> list[list[str]]:
    """``blocks`` blocks of TXS_PER_BLOCK transfers each; their transaction hashes."""
    out = []
    for b in range(blocks):
        hashes = []
        for i in range(TXS_PER_BLOCK):
            sender = (A0, A1)[i % 2]
            hashes.append(await node.send({"from": sender, "to": A2, "value": hex(100 * b + i)}))
        await node.call("evm_mine")
        out.append(hashes)
    return out


async def until_vouched(relay: Relay, through: Chain, number: int) -> None:
    """Wait until the relay's head tracker knows block ``number`` as canonical (its walk
    back from its first head may still be under way): only such blocks are filled. A read
    of the block by number is then planned under the block's hash (outcome miss or hit),
    no longer passed through."""

    async def known() -> bool:
        before = metric(await relay.metrics(), "chainrelay_requests_total", outcome="pass")
        await through.call("eth_getBlockByNumber", [hex(number), False])
        after = metric(await relay.metrics(), "chainrelay_requests_total", outcome="pass")
        return after == before

    await until(known, 20 * SECOND, f"the relay to know block {number} as canonical")


async def fills(relay: Relay, kind: str) -> float:
    return metric(await relay.metrics(), "chainrelay_block_fills_total", kind=kind)


async def test_a_receipt_miss_brings_in_its_blocks_receipts_and_tx_misses_its_txs(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    async with on_demand_behind_proxy(procs, anvil_factory) as (node, proxy):
        blocks = await mine_blocks_of_transfers(node, 2)
        relay = await start_relay_mining(node, relay_factory, [proxy.url], NO_FOLLOW)
        async with Chain.open(relay.url) as through:
            first_block = await node.call("eth_getTransactionReceipt", [blocks[0][0]])
            await until_vouched(relay, through, int(first_block["blockNumber"], 16))
            await proxy.reset()
            # One receipt of the first block: its own call, then the block's receipts.
            first, *others = blocks[0]
            assert await through.raw("eth_getTransactionReceipt", [first]) == await node.raw(
                "eth_getTransactionReceipt", [first]
            )

            async def filled(kind: str) -> bool:
                return await fills(relay, kind) >= 1

            await until(lambda: filled("receipts"), 10 * SECOND, "the block's receipts fill")
            after_miss = await proxy.counts()
            reads = [("eth_getTransactionReceipt", [h]) for h in others]
            got = [await through.raw(m, p) for m, p in reads]
            want = [await node.raw(m, p) for m, p in reads]
            after_reads = await proxy.counts()

            # Two transactions of the second block: then the block's transactions (one is
            # often read alone: a first miss fills nothing).
            first_tx, second_tx, *rest = blocks[1]
            await proxy.reset()
            for tx in (first_tx, second_tx):
                assert await through.raw("eth_getTransactionByHash", [tx]) == await node.raw(
                    "eth_getTransactionByHash", [tx]
                )
                if tx == first_tx:
                    assert await fills(relay, "transactions") == 0
                    assert "eth_getBlockByHash" not in await proxy.counts()
            await until(lambda: filled("transactions"), 10 * SECOND, "the block's fill")
            tx_reads = [("eth_getTransactionByHash", [h]) for h in rest]
            tx_got = [await through.raw(m, p) for m, p in tx_reads]
            tx_want = [await node.raw(m, p) for m, p in tx_reads]
            tx_counts = await proxy.counts()
    assert got == want
    assert after_miss.get("eth_getTransactionReceipt") == 1, after_miss
    assert after_miss.get("eth_getBlockReceipts") == 1, after_miss
    assert after_reads == after_miss, after_reads  # the other receipts: hits
    assert tx_got == tx_want
    assert tx_counts.get("eth_getTransactionByHash") == 2, tx_counts
    assert tx_counts.get("eth_getBlockByHash") == 1, tx_counts


async def test_a_block_is_filled_once_however_many_of_its_receipts_miss(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    # Receipts held at the proxy: every read of the block misses while the fill waits.
    holding = ("eth_getBlockReceipts",)  # by the proxy until released
    async with on_demand_behind_proxy(procs, anvil_factory, holding) as (node, proxy):
        (block,) = await mine_blocks_of_transfers(node, 1)
        relay = await start_relay_mining(node, relay_factory, [proxy.url], NO_FOLLOW)
        async with Chain.open(relay.url) as through:
            mined = await node.call("eth_getTransactionReceipt", [block[0]])
            await until_vouched(relay, through, int(mined["blockNumber"], 16))
            await proxy.reset()
            for h in block[:3]:
                await through.call("eth_getTransactionReceipt", [h])
            await until(lambda: _held(proxy, 1), 10 * SECOND, "the fill's receipts call")
            held = await proxy.held()
            await proxy.release()
            await until(
                lambda: _filled_once(relay), 10 * SECOND, "the fill to warm the block's receipts"
            )
            for h in block[3:]:
                await through.call("eth_getTransactionReceipt", [h])
            counts = await proxy.counts()
    assert held == 1
    assert counts.get("eth_getBlockReceipts") == 1, counts
    assert counts.get("eth_getTransactionReceipt") == 3, counts  # the three before the fill


async def _held(proxy: Any, n: int) -> bool:
    return await proxy.held() >= n


async def _filled_once(relay: Relay) -> bool:
    return await fills(relay, "receipts") >= 1


async def test_a_filled_blocks_logs_answer_eth_get_logs_with_no_upstream_call(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    async with on_demand_behind_proxy(procs, anvil_factory) as (node, proxy):
        emitter = await node.deploy(transfer_emitter_initcode())
        sent = []
        for i in range(TXS_PER_BLOCK):
            data = emitter_data(A2, 11 + i)
            sent.append(
                await node.send({"from": A0, "to": emitter, "data": data, "gas": "0x20000"})
            )
        await node.call("evm_mine")
        number = hex((await node.head())[0])
        relay = await start_relay_mining(node, relay_factory, [proxy.url], NO_FOLLOW)
        async with Chain.open(relay.url) as through:
            await until_vouched(relay, through, int(number, 16))
            await through.call("eth_getTransactionReceipt", [sent[0]])
            await until(lambda: _filled_once(relay), 10 * SECOND, "the block's receipts fill")
            await proxy.reset()
            filters: list[dict[str, Any]] = [
                {"fromBlock": number, "toBlock": number},
                {"fromBlock": number, "toBlock": number, "address": emitter},
            ]
            got = [await through.raw("eth_getLogs", [f]) for f in filters]
            want = [await node.raw("eth_getLogs", [f]) for f in filters]
            counts = await proxy.counts()
    assert got == want
    assert len(orjson.loads(want[0])["result"]) == TXS_PER_BLOCK
    assert "eth_getLogs" not in counts, counts
