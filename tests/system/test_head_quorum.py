"""A head the upstreams agree on, with real anvils: two upstreams on one chain (one anvil,
directly and through the counting proxy) and a third anvil forked from it (``--fork-url``)
that mines blocks of its own. Its head on its own fork, then 1,000 blocks ahead, never
moves the relay's ``latest``, and ``/health`` says why it is not used."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from chainrelay.devnet import Anvil
from tests.lab.chain import Chain, start_relay_mining
from tests.lab.counting_proxy import start_proxy
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

TIMEOUT = 30 * SECOND


async def test_a_fork_or_a_head_far_ahead_does_not_move_latest(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    main = await anvil_factory(chain_id=56, block_time=None, extra=["--no-mining"])
    async with Chain.open(main.url) as node:
        await node.call("anvil_mine", ["0x5"])
        fork = await anvil_factory(
            chain_id=56, block_time=None, extra=["--no-mining", "--fork-url", main.url]
        )
        proxy = await start_proxy(procs, main.url)
        relay = await start_relay_mining(node, relay_factory, [main.url, proxy.url, fork.url])
        async with Chain.open(fork.url) as other, Chain.open(relay.url) as through:
            top, top_hash = await node.head()

            async def relay_at_main() -> bool:
                return (await through.block())["hash"] == top_hash

            await until(relay_at_main, TIMEOUT, "the relay to follow the main chain")
            # The forked anvil mines past the main chain's head, on blocks of its own.
            below = (await other.head())[0]
            await other.call("anvil_mine", [hex(top - below + 3)])
            assert (await other.head())[0] == top + 3
            assert (await other.block(hex(top)))["hash"] != top_hash

            async def flagged(why: str) -> bool:
                ups = (await relay.health())["upstreams"]
                return [u["flagged"] for u in ups] == [None, None, why]

            await until(lambda: flagged("fork"), TIMEOUT, "the fork to be flagged")
            assert (await through.block())["hash"] == top_hash
            assert int(await through.call("eth_blockNumber"), 16) == top

            # 1,000 blocks ahead: flagged as such, and latest stays.
            await other.call("anvil_mine", [hex(1000)])
            await until(lambda: flagged("ahead"), TIMEOUT, "the head far ahead to be flagged")
            assert (await through.block())["hash"] == top_hash
            health = await relay.health()
            assert health["head"] == top
            # Seen past the bound ([head] max_ahead_blocks, 64), maybe while still mining.
            assert health["upstreams"][2]["latest"] > top + 64
