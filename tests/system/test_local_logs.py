"""eth_getLogs for recent blocks answered from the block follower's own blocks: no upstream
call, the same bytes as the node's answer. Real anvil (mining on demand), a real relay,
the counting proxy between them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from chainrelay.devnet import Anvil, transfer_emitter_initcode
from tests.lab.chain import DEV_ACCOUNTS, Chain, emitter_data, metric, start_relay_mining
from tests.lab.counting_proxy import start_proxy
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
FOLLOW = '[subscriptions]\nfollow_blocks = "always"\n'


async def test_logs_of_recent_blocks_come_from_the_feed_with_no_upstream_call(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    proxy = await start_proxy(procs, anvil.url)
    async with Chain.open(anvil.url) as node:
        relay = await start_relay_mining(node, relay_factory, [proxy.url], FOLLOW)
        emitter = await node.deploy(transfer_emitter_initcode())
        numbers = []
        for i in range(3):
            for sender in (A0, A1):
                data = emitter_data(A2, 7 + i)
                await node.send({"from": sender, "to": emitter, "data": data, "gas": "0x20000"})
            await node.call("evm_mine")
            numbers.append((await node.head())[0])
        first, last = hex(numbers[0]), hex(numbers[-1])
        head_hash = (await node.head())[1]
        async with Chain.open(relay.url) as through:

            async def delivered() -> bool:
                # The feed warms the cache with a block just before it delivers it: the
                # head's block read as a hit means the feed has it.
                hits = metric(await relay.metrics(), "chainrelay_requests_total", outcome="hit")
                await through.raw("eth_getBlockByHash", [head_hash, False])
                after = metric(await relay.metrics(), "chainrelay_requests_total", outcome="hit")
                return after > hits

            await until(delivered, 10 * SECOND, "the relay's feed to deliver the head")
            await proxy.reset()
            filters: list[dict[str, Any]] = [
                {"fromBlock": first, "toBlock": last},
                {"fromBlock": first, "toBlock": "latest", "address": emitter},
                {"fromBlock": last},
                {"blockHash": head_hash},
                {"fromBlock": first, "topics": [None, None, "0x" + "00" * 12 + A2[2:].lower()]},
                {"fromBlock": first, "address": "0x" + "00" * 20},
            ]
            for flt in filters:
                want = await node.raw("eth_getLogs", [flt])
                assert await through.raw("eth_getLogs", [flt]) == want, flt
            assert (await proxy.counts()).get("eth_getLogs", 0) == 0
            # Past what the feed delivered, or a pending range: the upstream answers.
            for flt in ({"fromBlock": "0x0", "toBlock": last}, {"toBlock": "pending"}):
                want = await node.raw("eth_getLogs", [flt])
                assert await through.raw("eth_getLogs", [flt]) == want, flt
            assert (await proxy.counts()).get("eth_getLogs", 0) == 2
