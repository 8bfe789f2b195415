"""The recent window behind the block follower, filled once reads miss there: a cold relay's
receipt misses of blocks from before its start (``fill_window_after_misses`` of them, here
2) bring in the receipts (and so the held logs) of every block behind its first followed
block, so the other receipts and the eth_getLogs windows over those blocks cost no
upstream call, each answer anvil's own bytes. The first miss alone fills only its block.

Real anvil (mining on demand), a real relay with its default follow mode and window, the
counting proxy between them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

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
from tests.system.test_block_fill import until_vouched

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
BLOCKS = 5  # mined before the relay starts, each with a transfer and an emitted log per sender
FILLED_BY = ("eth_getTransactionReceipt", "eth_getBlockReceipts", "eth_getLogs")


async def mine_logged_blocks(node: Chain, emitter: str) -> list[list[str]]:
    """BLOCKS blocks, each with a plain transfer and an emitter's Transfer log from each of
    A0 and A1; their transaction hashes."""
    blocks = []
    for b in range(BLOCKS):
        hashes = []
        for sender in (A0, A1):
            data = emitter_data(A2, 100 + b)
            hashes.append(
                await node.send({"from": sender, "to": emitter, "data": data, "gas": "0x20000"})
            )
            hashes.append(await node.send({"from": sender, "to": A2, "value": hex(1 + b)}))
        await node.call("evm_mine")
        blocks.append(hashes)
    return blocks


async def window_fills(relay: Relay) -> tuple[float, float]:
    """(blocks filled for the window, blocks filled after a client's receipt miss)."""
    samples = await relay.metrics()
    name = "chainrelay_block_fills_total"
    return (
        metric(samples, name, kind="receipts", outcome="window_filled"),
        metric(samples, name, kind="receipts", outcome="filled"),
    )


async def test_receipt_misses_fill_the_recent_window_so_its_reads_go_nowhere(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    async with on_demand_behind_proxy(procs, anvil_factory) as (node, proxy):
        emitter = await node.deploy(transfer_emitter_initcode())
        blocks = await mine_logged_blocks(node, emitter)
        relay = await start_relay_mining(
            node, relay_factory, [proxy.url], "[subscriptions]\nfill_window_after_misses = 2\n"
        )
        head, _ = await node.head()  # no block is mined from here on
        first = (await node.call("eth_getTransactionReceipt", [blocks[0][0]]))["blockNumber"]
        async with Chain.open(relay.url) as through:

            async def same_head() -> bool:  # read by number alone: no block data
                return bool(await through.call("eth_blockNumber") == hex(head))

            # The follower then starts after ``head``.
            await until(same_head, 10 * SECOND, "the relay's head to be the node's")
            # Reads of headers alone (this wait's) make the follower follow, and fill nothing.
            await until_vouched(relay, through, int(first, 16))
            assert await window_fills(relay) == (0, 0)
            await proxy.reset()
            one, two = blocks[-1][0], blocks[-2][0]
            assert await through.raw("eth_getTransactionReceipt", [one]) == await node.raw(
                "eth_getTransactionReceipt", [one]
            )

            async def its_block_filled() -> bool:
                return await window_fills(relay) == (0, 1)

            # One miss: its own block is filled, not the window.
            await until(its_block_filled, 10 * SECOND, "the missed receipt's block filled")
            assert await through.raw("eth_getTransactionReceipt", [two]) == await node.raw(
                "eth_getTransactionReceipt", [two]
            )

            async def window_held() -> bool:
                # Every block from genesis to the head: the window (64) reaches past genesis.
                window, filled = await window_fills(relay)
                held = metric(await relay.metrics(), "chainrelay_log_store_blocks")
                return window + filled == head + 1 and held == head + 1

            await until(window_held, 20 * SECOND, "the window's receipts filled and logs held")
            window, filled = await window_fills(relay)
            await proxy.reset()
            reads: list[tuple[str, list[Any]]] = [
                ("eth_getTransactionReceipt", [h]) for b in blocks for h in b if h != one
            ]
            reads += [
                ("eth_getLogs", [{"fromBlock": first, "toBlock": hex(head)}]),
                ("eth_getLogs", [{"fromBlock": "0x0", "toBlock": "latest", "address": emitter}]),
                ("eth_getBlockReceipts", [first]),
            ]
            got = [await through.raw(m, p) for m, p in reads]
            counts = await proxy.counts()
            want = [await node.raw(m, p) for m, p in reads]
    assert filled == 2  # the missed receipts' own blocks; all the others by the window
    assert window == head - 1
    assert got == want
    assert not {m: n for m, n in counts.items() if m in FILLED_BY}, counts
    assert b'"logIndex"' in want[-3]  # the windows hold logs: not empty answers compared
