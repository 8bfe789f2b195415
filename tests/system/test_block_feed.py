"""The block follower's upstream side through a relay: its fetch shared with clients' reads of
the same block and of its receipts, and the automatic mode that follows blocks only while
clients read them. Every answer is compared with anvil's, byte for byte.

Real anvil (mining on demand), a real relay, the counting proxy between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
import websockets

from chainrelay.devnet import Anvil
from tests.lab.chain import DEV_ACCOUNTS, Chain, metric, on_demand_behind_proxy, start_relay_mining
from tests.lab.fault_upstream import PENDING_GARBAGE, start_fault_upstream
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
# Heartbeat that keeps heads coming while a relay starts in front of a node that mines only
# when told to.
# No backfill: the head tracker's walk behind its first head would ask eth_getBlockByHash,
# which the proxy holds in the coalescing test.
NO_BACKFILL = "[head]\nbackfill_blocks = 0\n"


async def coalesced(relay: Relay) -> float:
    return metric(await relay.metrics(), "chainrelay_coalesced_total")


async def receipt_reads(node: Chain, block_hash: str) -> list[tuple[str, list[Any]]]:
    """A client's reads of the receipts of block ``block_hash``: each transaction's, and the
    block's by number and by an EIP-1898 hash object."""
    block = await node.call("eth_getBlockByHash", [block_hash, False])
    assert len(block["transactions"]) >= 2, "the block was meant to carry transactions"
    return [
        *(("eth_getTransactionReceipt", [t]) for t in block["transactions"]),
        ("eth_getBlockReceipts", [block["number"]]),
        ("eth_getBlockReceipts", [{"blockHash": block_hash}]),
    ]


async def test_a_block_asked_as_it_is_mined_rides_on_the_feeds_own_fetch(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    holding = ("eth_getBlockByHash",)  # by the proxy until released
    async with on_demand_behind_proxy(procs, anvil_factory, holding) as (node, proxy):
        extra = NO_BACKFILL + '[subscriptions]\nfollow_blocks = "always"\n'
        relay = await start_relay_mining(node, relay_factory, [proxy.url], extra)
        async with Chain.open(relay.url) as through:
            await settle_feed(node, proxy)
            for sender in (A0, A1):
                await node.send({"from": sender, "to": A2, "value": "0x5"})
            await proxy.reset()
            await node.call("evm_mine")
            n, block_hash = await node.head()
            # The feed's fetch of the new block is under way, held at the proxy (another
            # block's call may be held beside it: only this block's are counted).
            await until(
                lambda: _asked_for(proxy, block_hash, 1), 10 * SECOND, "the feed's fetch of it"
            )
            await until(lambda: _relay_at(through, n), 10 * SECOND, "the relay's head")
            before = await coalesced(relay)
            # A client that saw the head asks for the block at once, in both forms.
            reads: list[tuple[str, list[Any]]] = [
                ("eth_getBlockByHash", [block_hash, True]),
                ("eth_getBlockByHash", [block_hash, False]),
                ("eth_getBlockByNumber", [hex(n), False]),
                ("eth_getBlockByNumber", ["latest", True]),
            ]
            asks = [asyncio.ensure_future(through.raw(m, p)) for m, p in reads]

            async def joined_or_asked() -> bool:
                return await coalesced(relay) >= before + len(asks) or await _asked_for(
                    proxy, block_hash, 2
                )

            await until(
                joined_or_asked, 10 * SECOND, "the client's reads to join the feed's call or not"
            )
            held = len(await _calls_for(proxy, block_hash))
            await proxy.release()
            got = await asyncio.gather(*asks)
            want = [await node.raw(m, p) for m, p in reads]
            # The receipts the feed fetched with the block: hits, the node's bytes.
            await until(lambda: _counted(proxy, "eth_getBlockReceipts", 1), 10 * SECOND, "receipts")
            derived = await receipt_reads(node, block_hash)
            got_receipts = [await through.raw(m, p) for m, p in derived]
            want_receipts = [await node.raw(m, p) for m, p in derived]
            counts = await proxy.counts()
            by_hash = len(await _calls_for(proxy, block_hash))
    for read, g, w in zip(reads + derived, got + got_receipts, want + want_receipts, strict=True):
        assert g == w, read
    assert held == 1  # only the feed's call reached the node
    assert by_hash == 1, counts
    # One call each for the block and its receipts, whoever asked.
    assert counts.get("eth_getBlockReceipts") == 1, counts
    assert "eth_getTransactionReceipt" not in counts, counts


async def test_receipts_asked_as_the_block_is_fetched_ride_on_the_feeds_own_call(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    holding = ("eth_getBlockReceipts",)  # by the proxy until released
    async with on_demand_behind_proxy(procs, anvil_factory, holding) as (node, proxy):
        extra = NO_BACKFILL + '[subscriptions]\nfollow_blocks = "always"\n'
        relay = await start_relay_mining(node, relay_factory, [proxy.url], extra)
        async with Chain.open(relay.url) as through:
            await settle_feed(node, proxy)
            for sender in (A0, A1):
                await node.send({"from": sender, "to": A2, "value": "0x6"})
            await proxy.reset()
            await node.call("evm_mine")
            n, block_hash = await node.head()
            # The feed has the block and its receipts call is under way, held at the proxy.
            await until(lambda: _held(proxy, 1), 10 * SECOND, "the feed's receipts call")
            await until(lambda: _relay_at(through, n), 10 * SECOND, "the relay's head")
            reads = await receipt_reads(node, block_hash)
            before = await coalesced(relay)
            asks = [asyncio.ensure_future(through.raw(m, p)) for m, p in reads]

            async def joined_or_asked() -> bool:
                return await coalesced(relay) >= before + len(asks) or await _asked_for(
                    proxy, block_hash, 2
                )

            await until(
                joined_or_asked, 10 * SECOND, "the client's reads to join the feed's call or not"
            )
            held = len(await _calls_for(proxy, block_hash))
            await proxy.release()
            got = await asyncio.gather(*asks)
            want = [await node.raw(m, p) for m, p in reads]
            counts = await proxy.counts()
    for read, g, w in zip(reads, got, want, strict=True):
        assert g == w, read
    assert held == 1  # only the feed's call reached the node
    assert counts.get("eth_getBlockReceipts") == 1, counts
    assert "eth_getTransactionReceipt" not in counts, counts


async def settle_feed(node: Chain, proxy: Any) -> None:
    """Let through the calls held for blocks mined while the relay started, and wait until
    the feed has asked the receipts of a block mined after them (it fetches in order), then
    hold again: from here on, what is held is for the blocks the test mines."""
    await proxy.release()
    await proxy.reset()
    await node.call("evm_mine")
    await until(lambda: _counted(proxy, "eth_getBlockReceipts", 1), 10 * SECOND, "the feed")
    await proxy.hold()


async def _held(proxy: Any, n: int) -> bool:
    return await proxy.held() >= n


async def _calls_for(proxy: Any, block_hash: str) -> list[Any]:
    """The eth_getBlockByHash calls for ``block_hash`` the proxy saw since its reset."""
    return [p for p in await proxy.params("eth_getBlockByHash") if p and p[0] == block_hash]


async def _asked_for(proxy: Any, block_hash: str, n: int) -> bool:
    return len(await _calls_for(proxy, block_hash)) >= n


async def _joined_or_held(relay: Relay, proxy: Any, coalesced_at_least: float) -> bool:
    return await coalesced(relay) >= coalesced_at_least or await proxy.held() > 1


async def test_automatic_feed_follows_while_clients_read_blocks_hit_or_miss(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    async with on_demand_behind_proxy(procs, anvil_factory) as (node, proxy):
        # The default mode ("auto"), following for 3 blocks after a client's last miss; the
        # recent window's fill (tests/system/test_window_fill.py) off: the calls counted
        # here are the feed's alone.
        extra = "[subscriptions]\nfollow_recent_blocks = 3\nfill_window_blocks = 0\n"
        relay = await start_relay_mining(node, relay_factory, [proxy.url], extra)
        async with Chain.open(relay.url) as through:

            async def mine_one() -> tuple[int, str]:
                await node.call("evm_mine")
                head = await node.head()
                await until(lambda: _relay_at(through, head[0]), 10 * SECOND, "the relay's head")
                return head

            # Nobody subscribes and nobody reads blocks: no block is fetched.
            await proxy.reset()
            for _ in range(3):
                await mine_one()
            idle = await proxy.counts()
            assert "eth_getBlockReceipts" not in idle, idle  # the feed asks it for every block

            # A client reads a receipt (a miss): the feed follows from the next block on.
            tx = await node.send({"from": A0, "to": A1, "value": "0x7"})
            await mine_one()
            assert (await through.call("eth_getTransactionReceipt", [tx]))["status"] == "0x1"
            for sender in (A0, A1):
                await node.send({"from": sender, "to": A2, "value": "0x1"})
            await proxy.reset()
            held = await _blocks_held(relay)
            await mine_one()
            await until(
                lambda: _counted(proxy, "eth_getBlockReceipts", 1),
                10 * SECOND,
                "the feed's fetch of the block",
            )
            # Taken in (its cache warmed before its logs are held), not just asked for.
            await until(lambda: _holds(relay, held + 1), 10 * SECOND, "the block taken in")
            # Its receipts are then hits, byte for byte the node's.
            reads = await receipt_reads(node, (await node.head())[1])
            for m, p in reads:
                assert await through.raw(m, p) == await node.raw(m, p), (m, p)
            following = await proxy.counts()
            assert "eth_getTransactionReceipt" not in following, following

            # Reads that hit keep it following, past follow_recent_blocks.
            await proxy.reset()
            for _ in range(5):
                await node.send({"from": A0, "to": A2, "value": "0x1"})
                held = await _blocks_held(relay)
                await mine_one()
                await until(
                    lambda: _counted(proxy, "eth_getBlockReceipts", 1),
                    10 * SECOND,
                    "the feed's fetch of the block",
                )
                await until(
                    functools.partial(_holds, relay, held + 1),
                    10 * SECOND,
                    "the block taken in",
                )
                block = await node.call("eth_getBlockByNumber", ["latest", False])
                await through.call("eth_getTransactionReceipt", [block["transactions"][0]])
                hits = await proxy.counts()
                await proxy.reset()
                assert hits.get("eth_getBlockReceipts") == 1, hits
                assert "eth_getTransactionReceipt" not in hits, hits

            # Reads stop: three blocks later the feed stops fetching.
            for _ in range(3):
                await mine_one()
            await proxy.reset()
            for _ in range(3):
                await mine_one()
            stopped = await proxy.counts()
    assert following.get("eth_getBlockReceipts") == 1, following
    assert "eth_getBlockReceipts" not in stopped, stopped


async def _relay_at(through: Chain, n: int) -> bool:
    return int(await through.call("eth_blockNumber"), 16) >= n


async def _blocks_held(relay: Relay) -> float:
    """Blocks the relay's follower has taken in (``chainrelay_log_store_blocks``)."""
    return (await relay.metrics()).get("chainrelay_log_store_blocks", 0.0)


async def _holds(relay: Relay, n: float) -> bool:
    return await _blocks_held(relay) >= n


async def _counted(proxy: Any, method: str, n: int) -> bool:
    return (await proxy.counts()).get(method, 0) >= n


async def test_garbage_from_a_fake_upstream_does_not_end_the_pending_stream(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    # Answers the relay's first pending subscriptions with cut-off JSON (anvil cannot).
    fake = await start_fault_upstream(procs, "pending_garbage", anvil.url)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        relay = await start_relay_mining(node, relay_factory, [fake.url.replace("http", "ws", 1)])
        async with websockets.connect(relay.ws_url, compression=None) as conn:
            await conn.send(
                '{"jsonrpc":"2.0","id":1,"method":"eth_subscribe",'
                '"params":["newPendingTransactions"]}'
            )
            answer = orjson.loads(await conn.recv())
            assert isinstance(answer.get("result"), str), answer
            seen: list[str] = []

            async def read() -> None:
                async for message in conn:
                    doc = orjson.loads(message)
                    if doc.get("method") == "eth_subscription":
                        seen.append(doc["params"]["result"])

            reader = asyncio.create_task(read())
            try:
                # The relay's stream comes up after its back-off; probe until one arrives.
                probe = ""
                for attempt in range(20):
                    probe = await node.send({"from": A2, "to": A0, "value": hex(1 + attempt)})
                    with contextlib.suppress(AssertionError):
                        await until(
                            functools.partial(operator.contains, seen, probe), SECOND, "pending"
                        )
                        break
                else:
                    raise AssertionError("the pending stream never came back")
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        m = await relay.metrics()
    problems = metric(m, "chainrelay_block_feed_problems_total", problem="pending_stream")
    assert problems >= PENDING_GARBAGE


# Transfers in the large block: its answers (~330 kB with transactions, ~450 kB of receipts)
# are past defaults.LARGE_ANSWER_BYTES, so the feed decodes them piecewise.
LARGE_BLOCK_TXS = 500


async def test_a_large_block_is_taken_in_piecewise_and_every_part_served_as_the_node_sends_it(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    async with on_demand_behind_proxy(procs, anvil_factory) as (node, proxy):
        extra = NO_BACKFILL + '[subscriptions]\nfollow_blocks = "always"\n'
        relay = await start_relay_mining(node, relay_factory, [proxy.url], extra)
        nonce = int(await node.call("eth_getTransactionCount", [A0, "pending"]), 16)
        for i in range(LARGE_BLOCK_TXS):  # nonces given: pending ones are not replaced
            await node.send({"from": A0, "to": A2, "value": "0x1", "nonce": hex(nonce + i)})
        await proxy.reset()
        await node.call("evm_mine")
        n, block_hash = await node.head()
        block_raw = await node.raw("eth_getBlockByNumber", [hex(n), True])
        receipts_raw = await node.raw("eth_getBlockReceipts", [hex(n)])
        assert min(len(block_raw), len(receipts_raw)) > 256 * 1024
        # The cache holds the block and its receipts twice over (whole and each part) once
        # the feed has warmed it (the gauge is set as a block's warming ends).
        warmed = 1.5 * (len(block_raw) + len(receipts_raw))
        await until(
            lambda: _cache_bytes_past(relay, warmed), 30 * SECOND, "the feed to warm the block"
        )
        block = orjson.loads(block_raw)["result"]
        hashes = [tx["hash"] for tx in block["transactions"]]
        assert len(hashes) == LARGE_BLOCK_TXS
        reads: list[tuple[str, list[Any]]] = [
            ("eth_getBlockByNumber", [hex(n), True]),
            ("eth_getBlockByHash", [block_hash, False]),
            ("eth_getBlockReceipts", [hex(n)]),
            *(("eth_getTransactionReceipt", [h]) for h in hashes[::50]),
            *(("eth_getTransactionByHash", [h]) for h in hashes[::50]),
            ("eth_getTransactionReceipt", [hashes[-1]]),
            ("eth_getTransactionByHash", [hashes[-1]]),
        ]
        async with Chain.open(relay.url) as through:
            got = [await through.raw(m, p) for m, p in reads]
        want = [await node.raw(m, p) for m, p in reads]
        counts = await proxy.counts()
        by_hash = await proxy.params("eth_getBlockByHash")
        receipts = await proxy.params("eth_getBlockReceipts")
    for read, g, w in zip(reads, got, want, strict=True):
        assert g == w, read
    # The feed's two calls for this block (others are for the blocks mined while the relay
    # started), and no client read reached the node: every one was warmed.
    assert [p for p in by_hash if p == [block_hash, True]] == [[block_hash, True]], by_hash
    assert len([p for p in receipts if p[0] in (hex(n), block_hash)]) == 1, receipts
    assert "eth_getTransactionReceipt" not in counts, counts
    assert "eth_getTransactionByHash" not in counts, counts


async def _cache_bytes_past(relay: Relay, at_least: float) -> bool:
    return metric(await relay.metrics(), "chainrelay_cache_bytes") >= at_least
