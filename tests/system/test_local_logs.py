"""eth_getLogs answered from the block logs the relay holds: windows over held blocks (inside
the canonical window, or beyond it and final) with no upstream call, windows reaching past
them with eth_getLogs upstream for the rest only, every answer the node's own bytes. Real
anvil (mining on demand, final two blocks behind its head), a real relay, the counting proxy
between them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from chainrelay.devnet import TRANSFER_TOPIC, Anvil, transfer_emitter_initcode
from tests.lab.chain import DEV_ACCOUNTS, Chain, emitter_data, metric, start_relay_mining, topic_of
from tests.lab.counting_proxy import CountingProxy, start_proxy
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
# Canonical hashes for 16 blocks only, so the held blocks older than that answer because
# they are final (anvil with one slot per epoch: "finalized" is two blocks behind the head).
# Anvil mines only when told to: each block of ``emit_blocks`` holds both its transactions.
CONFIG = '[subscriptions]\nfollow_blocks = "always"\n[head]\nreorg_window = 16\n'
BEFORE_BLOCKS = 4  # mined before the relay starts: never held
HELD_BLOCKS = 30  # mined once it follows: all held


@dataclass
class Lab:
    node: Chain  # anvil, directly
    through: Chain  # the relay
    relay: Relay
    proxy: CountingProxy
    emitter: str
    before: list[int]  # blocks with logs the relay never held
    held: list[int]  # blocks with logs it held
    hashes: dict[int, str]


async def emit_blocks(
    node: Chain,
    emitter: str,
    count: int,
    mined: Callable[[str], Awaitable[None]] | None = None,
) -> list[int]:
    """Mine ``count`` blocks, each with two Transfer logs (from A0 and from A1, to A2);
    ``mined``: awaited with each block's hash before the next is mined."""
    numbers = []
    for i in range(count):
        for sender in (A0, A1):
            data = emitter_data(A2, 7 + i)
            await node.send({"from": sender, "to": emitter, "data": data, "gas": "0x20000"})
        await node.call("evm_mine")
        number, block_hash = await node.head()
        numbers.append(number)
        if mined is not None:
            await mined(block_hash)
    return numbers


@asynccontextmanager
async def lab(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> AsyncIterator[Lab]:
    anvil = await anvil_factory(
        chain_id=56, block_time=None, extra=["--no-mining", "--slots-in-an-epoch", "1"]
    )
    proxy = await start_proxy(procs, anvil.url)
    async with Chain.open(anvil.url) as node:
        emitter = await node.deploy(transfer_emitter_initcode())
        before = await emit_blocks(node, emitter, BEFORE_BLOCKS)
        relay = await start_relay_mining(node, relay_factory, [proxy.ws_url], CONFIG)
        async with Chain.open(relay.url) as through:
            # A block filter sees each block as the follower delivers it, right after the
            # follower handed the block's logs to the store.
            blocks = await through.call("eth_newBlockFilter")
            seen: set[str] = set()

            async def delivered(block_hash: str) -> None:
                async def seen_now() -> bool:
                    seen.update(await through.call("eth_getFilterChanges", [blocks]))
                    return block_hash in seen

                await until(seen_now, 10 * SECOND, f"the relay to deliver {block_hash}")

            # One block at a time: a follower more than its window behind skips blocks.
            held = await emit_blocks(node, emitter, HELD_BLOCKS, delivered)
            hashes = {n: (await node.block(hex(n)))["hash"] for n in range(before[0], held[-1] + 1)}
            await proxy.reset()
            yield Lab(node, through, relay, proxy, emitter, before, held, hashes)


async def same_as_the_node(lab: Lab, flt: dict[str, Any]) -> bytes:
    """The relay's answer to eth_getLogs(flt), checked to be the node's, byte for byte."""
    want = await lab.node.raw("eth_getLogs", [flt])
    got = await lab.through.raw("eth_getLogs", [flt])
    assert got == want, flt
    return got


async def test_windows_over_held_blocks_cost_no_upstream_call_in_or_beyond_the_window(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    async with lab(procs, anvil_factory, relay_factory) as x:
        first, last = x.held[0], x.held[-1]
        assert last - first >= 16 + 2  # the oldest held blocks are beyond the window, final
        filters: list[dict[str, Any]] = [
            {"fromBlock": hex(first), "toBlock": hex(last)},
            {"fromBlock": hex(first), "toBlock": hex(first + 5)},  # beyond the window
            {"fromBlock": hex(first), "toBlock": "latest", "address": x.emitter},
            {"fromBlock": hex(last)},
            {"blockHash": x.hashes[first + 2]},  # beyond the window
            {"blockHash": x.hashes[last]},
            {"fromBlock": hex(first), "topics": [None, topic_of(A1)]},
            {"fromBlock": hex(first + 3), "topics": [TRANSFER_TOPIC, None, topic_of(A2)]},
            {"fromBlock": hex(first), "address": "0x" + "00" * 20},
        ]
        for flt in filters:
            await same_as_the_node(x, flt)
        assert (await x.proxy.counts()).get("eth_getLogs", 0) == 0
        samples = await x.relay.metrics()
        assert metric(samples, "chainrelay_local_logs_total", answer="local") == len(filters)
        assert metric(samples, "chainrelay_log_store_blocks") >= HELD_BLOCKS

        # "pending", and a filter this node refuses: the upstream is asked the window
        # whole, and its answer (an error for the second) is the answer.
        pending = {"toBlock": "pending"}
        await same_as_the_node(x, pending)
        five = {"fromBlock": hex(first), "toBlock": hex(last), "topics": [None] * 5}
        refused = await x.through.request("eth_getLogs", [five])
        # (anvil words this error differently over WebSocket, the relay's way to it)
        assert (
            refused["error"]["code"]
            == (await x.node.request("eth_getLogs", [five]))["error"]["code"]
        )
        assert await x.proxy.params("eth_getLogs") == [[pending], [five]]


async def test_a_window_reaching_past_the_held_blocks_asks_upstream_for_the_rest_only(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    async with lab(procs, anvil_factory, relay_factory) as x:
        start, last = x.before[0], x.held[-1]
        flt = {"fromBlock": hex(start), "toBlock": hex(last), "address": x.emitter}
        await same_as_the_node(x, flt)
        [[asked]] = await x.proxy.params("eth_getLogs")
        # Up to the first block the relay holds: one before the first it was mined with.
        end = int(asked["toBlock"], 16)
        assert x.before[-1] <= end < x.held[0]
        assert asked == {**flt, "toBlock": hex(end)}

        # Another window with the same part outside: that part is a cache hit by now.
        await same_as_the_node(x, {**flt, "toBlock": hex(x.held[5])})
        assert len(await x.proxy.params("eth_getLogs")) == 1
        # One outside part of its own: only that is asked.
        other = {"fromBlock": hex(x.before[1]), "topics": [TRANSFER_TOPIC]}
        await same_as_the_node(x, other)
        assert (await x.proxy.params("eth_getLogs"))[1] == [
            {**other, "fromBlock": hex(x.before[1]), "toBlock": hex(end)}
        ]
        samples = await x.relay.metrics()
        assert metric(samples, "chainrelay_local_logs_total", answer="split") == 3

        # The upstream gone: a window whose outside part fails is answered with the error,
        # as the whole window asked upstream is, never with the held part alone.
        x.proxy.kill()
        split = await x.through.request("eth_getLogs", [{**flt, "fromBlock": hex(x.before[2])}])
        whole = await x.through.request(
            "eth_getLogs", [{"fromBlock": hex(x.before[2]), "toBlock": hex(x.before[-1])}]
        )
        assert "result" not in split and "result" not in whole
        assert split["error"]["code"] == whole["error"]["code"]
        # Windows over held blocks alone are still answered, the node's bytes.
        await same_as_the_node(x, {"fromBlock": hex(x.held[0]), "topics": [TRANSFER_TOPIC]})
