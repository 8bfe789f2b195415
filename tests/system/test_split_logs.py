"""A wide eth_getLogs split in chunks, on a real anvil of 3,000 blocks with logs at chosen
heights (chunk boundaries among them): the relay's answer is the node's own answer to one
call, byte for byte; one upstream call per aligned chunk, tiling the range; a second scan
asks nothing upstream for its finalized part. A fake upstream that refuses ranges over
2,000 blocks with BSC's public endpoints' wording (no real node refuses by range) has its
refused ranges bisected.

3,000 blocks, not 50,000: anvil_mine took 4-18 ms a block on this shared 2-core machine
(growing with the chain), so 50,000 would take minutes; 15 chunks of 200 exercise the same
paths as 25 of 2,000."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from chainrelay.devnet import Anvil, transfer_emitter_initcode
from chainrelay.rpc import logsplit
from tests.lab.chain import DEV_ACCOUNTS, Chain, emitter_data, start_relay_mining
from tests.lab.counting_proxy import start_proxy
from tests.lab.fault_upstream import LOGS_RANGE_CAP, start_fault_upstream
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
CHUNK = 200
# Heights of the blocks holding a log: on both sides of chunk boundaries, and inside.
LOG_HEIGHTS = (199, 200, 201, 399, 400, 1777, 2399, 2400, 2998, 3000)
# The fake upstream's relay: chunks over its cap, and one refused range under them.
FAKE_SPLIT = 2500
# No block following: every log comes from the upstream, so its calls can be counted.
FOLLOW = '[subscriptions]\nfollow_blocks = "never"\n'
CONFIG = f"{FOLLOW}[logs]\nsplit_blocks = {CHUNK}\nsplit_concurrency = 4\n"
# Upstream calls in flight one client may have: fewer than a scan's concurrency.
CLIENT_SLOTS = 2


async def chain_with_logs(node: Chain) -> str:
    """On anvil mining on demand: the Transfer emitter deployed, a log at each of
    ``LOG_HEIGHTS``; the emitter's address."""
    emitter = await node.deploy(transfer_emitter_initcode())
    for i, height in enumerate(LOG_HEIGHTS):
        now = (await node.head())[0]
        if height - 1 > now:
            await node.call("anvil_mine", [hex(height - 1 - now)])
        data = emitter_data(A2, 1 + i)
        await node.send({"from": A1, "to": emitter, "data": data, "gas": "0x20000"})
        await node.call("evm_mine")
        assert (await node.head())[0] == height
    return emitter


def _span(params: Any) -> tuple[int, int]:
    flt = params[0]
    return int(flt["fromBlock"], 16), int(flt["toBlock"], 16)


async def _anvil(anvil_factory: Callable[..., Awaitable[Anvil]]) -> Anvil:
    """anvil mining on demand, "finalized" two blocks behind its head."""
    return await anvil_factory(
        chain_id=56, block_time=None, extra=["--no-mining", "--slots-in-an-epoch", "1"]
    )


async def test_a_scan_is_one_calls_bytes_its_repeat_cached_and_refusals_bisected_fake_upstream(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await _anvil(anvil_factory)
    async with Chain.open(anvil.url) as node:
        emitter = await chain_with_logs(node)
        proxy = await start_proxy(procs, anvil.url)
        relay = await start_relay_mining(node, relay_factory, [proxy.url], CONFIG)
        async with Chain.open(relay.url) as through:
            top = (await node.head())[0]

            async def final_near_head() -> bool:
                return int((await relay.health())["finalized"] or 0) >= top - CHUNK

            await until(final_near_head, 20 * SECOND, "the relay to know finality")
            finalized = int((await relay.health())["finalized"])
            await proxy.reset()
            flt = {"fromBlock": "0x0", "toBlock": hex(top), "address": emitter}
            want = await node.raw("eth_getLogs", [flt])
            got = await through.raw("eth_getLogs", [flt])
            assert got == want
            logs = orjson.loads(want)["result"]
            assert [int(x["blockNumber"], 16) for x in logs] == list(LOG_HEIGHTS)
            asked = sorted(_span(p) for p in await proxy.params("eth_getLogs"))
            # One upstream call per aligned chunk, tiling the range exactly.
            assert asked == logsplit.chunks(0, top, CHUNK), asked

            # The same filter up to "latest", a block further on: the chunks at or below
            # the first scan's finality come from the cache.
            await node.call("evm_mine")
            top2 = (await node.head())[0]

            async def relay_at_top2() -> bool:
                return int((await through.block())["number"], 16) >= top2

            await until(relay_at_top2, 20 * SECOND, "the relay to follow the new block")
            await proxy.reset()
            flt2 = {**flt, "toBlock": "latest"}
            want2 = await node.raw("eth_getLogs", [flt2])
            got2 = await through.raw("eth_getLogs", [flt2])
            assert got2 == want2
            asked2 = [_span(p) for p in await proxy.params("eth_getLogs")]
            assert asked2, "the chunk holding the new block is asked"
            assert all(hi > finalized for _lo, hi in asked2), (finalized, asked2)
            assert len(asked2) <= 2, asked2

        # One client's wide scan holds its own slots of upstream calls in flight: with a
        # bound of 2 per client, two chunks at a time are asked, not the split's 4.
        held = await start_proxy(procs, anvil.url, hold=("eth_getLogs",))
        bounded = f"{CONFIG}[limits]\nmax_upstream_in_flight_per_client = {CLIENT_SLOTS}\n"
        relay = await start_relay_mining(node, relay_factory, [held.url], bounded)
        async with Chain.open(relay.url) as through:
            flt = {"fromBlock": "0x0", "toBlock": hex(top), "address": emitter}
            scan = asyncio.ensure_future(through.raw("eth_getLogs", [flt]))

            async def chunks_held() -> bool:
                return await held.held() >= CLIENT_SLOTS

            await until(chunks_held, 20 * SECOND, "the scan's first chunks upstream")
            await through.call("eth_chainId")  # a round trip: any further chunk sent by now
            assert await held.held() == CLIENT_SLOTS
            await held.release()
            assert await scan == await node.raw("eth_getLogs", [flt])

        fake = await start_fault_upstream(procs, "logs_range", anvil.url)
        extra = f"{FOLLOW}[logs]\nsplit_blocks = {FAKE_SPLIT}\n"
        relay = await start_relay_mining(node, relay_factory, [fake.url], extra)
        async with Chain.open(relay.url) as through:
            top = (await node.head())[0]
            # A range under the split, refused upstream: asked again in halves.
            narrow = {"fromBlock": hex(300), "toBlock": hex(2599), "address": emitter}
            want = await node.raw("eth_getLogs", [narrow])
            await fake.reset()
            assert await through.raw("eth_getLogs", [narrow]) == want
            assert (await fake.counts()).get("eth_getLogs", 0) >= 3  # refused, then halves
            flt = {"fromBlock": "0x0", "toBlock": hex(top), "address": emitter}
            want = await node.raw("eth_getLogs", [flt])
            await fake.reset()
            got = await through.raw("eth_getLogs", [flt])
            assert got == want
            assert len(orjson.loads(got)["result"]) == len(LOG_HEIGHTS)
            # The first chunk (0-2,499) refused, then served in halves: 3 calls; the
            # second (2,500 to the head) served at once.
            assert FAKE_SPLIT > LOGS_RANGE_CAP >= FAKE_SPLIT // 2
            assert (await fake.counts()).get("eth_getLogs", 0) == 4
