"""A validator's view of the relay tree: the subscriber library and ``chainrelay subscribe``
against real nodes (anvil, an origin relay signing each block, a relay fed by the origin).

Each block anvil mines must reach the subscriber once, in order, verified, with the body
and receipts anvil serves, while both parents feed it and after one of them dies.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from chainrelay.clients.subscriber import FeedBlock, Subscription
from chainrelay.tree.frame import Signer
from tests.lab.chain import DEV_ACCOUNTS, Chain, start_relay_mining
from tests.lab.procs import ROOT, Relay, until
from tests.lab.subscriptions import FeedReader
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

ORIGIN_KEY = "42" * 32
ORIGIN = "0x" + Signer(bytes.fromhex(ORIGIN_KEY)).address.hex()
STREAM = "bsc/blocks"  # anvil runs as chain 56, so the nodes take the bsc profile
# Blocks pass a node process or two and may be backfilled over JSON-RPC: seconds, not ms.
READ_TIMEOUT = 20 * SECOND


async def mine_with_transfers(chain: Chain, blocks: int, first: int = 0) -> None:
    """``blocks`` blocks, block i holding i % 3 transfers (empty blocks included)."""
    a, b, _ = DEV_ACCOUNTS
    for i in range(first, first + blocks):
        for k in range(i % 3):
            await chain.send({"from": a, "to": b, "value": hex(1000 + k)})
        await chain.call("evm_mine")


async def start_origin(
    chain: Chain, node_ws: str, relay_factory: Callable[..., Awaitable[Relay]]
) -> Relay:
    return await start_relay_mining(
        chain, relay_factory, [node_ws], f'[tree]\nkey = "0x{ORIGIN_KEY}"\n'
    )


async def check_against_node(chain: Chain, got: list[FeedBlock]) -> None:
    for b in got:
        block = await chain.block(hex(b.number), full=True)
        receipts = await chain.call("eth_getBlockReceipts", [hex(b.number)])
        assert b.hash == block["hash"], f"block {b.number}"
        assert b.block == block and b.receipts == receipts, f"block {b.number}"
        assert b.tx_count == len(block["transactions"])


async def test_subscriber_gets_every_block_once_through_a_parents_death(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    node = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(node.url) as chain:
        await chain.call("evm_setAutomine", [False])  # transfers wait for evm_mine
        origin = await start_relay_mining(
            chain, relay_factory, [node.ws_url], f'[tree]\nkey = "0x{ORIGIN_KEY}"\n'
        )
        tree = (
            f'[tree]\ntrust = ["{ORIGIN}"]\n\n'
            f'[[tree.parents]]\nname = "origin"\nurl = "{origin.ws_url}/feed"\n'
        )
        relay = await start_relay_mining(chain, relay_factory, [], tree)
        first = (await chain.head())[0] + 1
        sub = Subscription(
            [f"{origin.ws_url}/feed", f"{relay.ws_url}/feed"],
            STREAM,
            from_block=first,
            trust=[ORIGIN],
        )
        reader = FeedReader(sub)
        got = reader.got
        try:
            for link in sub.links:
                assert await link.wait_connected(10 * SECOND), link.last_error
            await mine_with_transfers(chain, 6)
            await until(lambda: len(got) >= 6, 20 * SECOND, "six blocks through both parents")
            await until(lambda: sub.duplicates >= 6, 10 * SECOND, "the second copy of each")
            assert relay.proc is not None
            relay.proc.send_signal(signal.SIGTERM)
            # A thread waits so the subscriber's links keep running while the relay exits.
            await asyncio.to_thread(relay.proc.wait, 10 * SECOND)
            await mine_with_transfers(chain, 6, first=6)
            await until(lambda: len(got) >= 12, 20 * SECOND, "six blocks through the origin")
        finally:
            await reader.close()
        assert [b.number for b in got] == list(range(first, first + 12))
        assert (await chain.head())[0] == first + 11
        assert all(b.verified and not b.reorg and b.origin == ORIGIN for b in got)
        assert all(b.latency_ms is not None for b in got)
        # A relay that started just before the subscriber may forward its own parent's
        # replay of older blocks after the subscriber's hello: those are dropped as stale.
        assert set(sub.dropped) <= {"stale"} and sub.backfilled == 0
        await check_against_node(chain, got)

        # The command line, replaying the same blocks from the origin's backlog.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chainrelay", "--log-level", "WARNING", "subscribe",
            f"{origin.ws_url}/feed", "--stream", STREAM, "--from", str(first),
            "--trust", ORIGIN, "--count", "12", "--max-seconds", str(20 * SECOND),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        try:
            async with asyncio.timeout(30 * SECOND):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        lines = [orjson.loads(line) for line in out.splitlines()]
        assert [(x["number"], x["hash"], x["txs"]) for x in lines] == [
            (b.number, b.hash, b.tx_count) for b in got
        ]
        assert all(x["verified"] for x in lines)
        assert b"no --trust" not in err


async def test_blocks_from_before_the_origin_are_backfilled_from_its_jsonrpc(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    node = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(node.url) as chain:
        await chain.call("evm_setAutomine", [False])
        await mine_with_transfers(chain, 5)  # blocks 1-5: no frame was ever made of them
        origin = await start_origin(chain, node.ws_url, relay_factory)
        sub = Subscription(f"{origin.ws_url}/feed", STREAM, from_block=1, trust=[ORIGIN])
        reader = FeedReader(sub)
        try:
            assert await sub.links[0].wait_connected(10 * SECOND), sub.links[0].last_error
            await mine_with_transfers(chain, 3, first=5)
            tip = (await chain.head())[0]
            await reader.wait(tip, f"blocks 1-{tip}", READ_TIMEOUT)
        finally:
            await reader.close()
        got = reader.got
        assert [b.number for b in got] == list(range(1, tip + 1))
        # Blocks 1-5 came over JSON-RPC, unverified; the last three as the origin's frames.
        assert not any(b.verified for b in got[:5])
        assert all(b.verified and b.origin == ORIGIN for b in got[-3:])
        assert sub.backfilled == sum(not b.verified for b in got) >= 5
        await check_against_node(chain, got)


async def test_a_reorg_reaches_the_subscriber_as_new_blocks_at_delivered_heights(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    node = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(node.url) as chain:
        await chain.call("evm_setAutomine", [False])
        origin = await start_origin(chain, node.ws_url, relay_factory)
        first = (await chain.head())[0] + 1
        sub = Subscription(f"{origin.ws_url}/feed", STREAM, from_block=first, trust=[ORIGIN])
        reader = FeedReader(sub)
        try:
            assert await sub.links[0].wait_connected(10 * SECOND), sub.links[0].last_error
            await mine_with_transfers(chain, 4)
            await reader.wait(4, "four blocks", READ_TIMEOUT)
            a, b, _ = DEV_ACCOUNTS
            await chain.call(
                "anvil_reorg",
                [2, [[{"from": b, "to": a, "value": hex(7000 + k)}, k] for k in (0, 1)]],
            )
            await mine_with_transfers(chain, 1, first=4)
            await reader.wait(7, "the two replaced blocks and the next", READ_TIMEOUT)
        finally:
            await reader.close()
        got = reader.got
        tip = (await chain.head())[0]
        assert [x.number for x in got] == [*range(first, first + 4), tip - 2, tip - 1, tip]
        assert [x.reorg for x in got] == [False] * 4 + [True, True, False]
        assert got[4].hash != got[2].hash and got[5].hash != got[3].hash
        assert all(x.verified for x in got)
        await check_against_node(chain, got[4:])
