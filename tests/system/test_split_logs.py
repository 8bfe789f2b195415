"""A wide eth_getLogs split in chunks, on a real anvil of 50,000 blocks with a log on both
sides of every chunk boundary: the relay's answer is the node's own answer to one call,
byte for byte; one upstream call per aligned chunk, tiling the range; a second scan asks
nothing upstream for its finalized part; one client's scan holds no more upstream calls
at once than its own bound. A fake upstream that refuses ranges over 2,000 blocks with
BSC's public endpoints' wording (no real node refuses by range) has its refused ranges
bisected.

The chain is mined by anvil in a few seconds with ``--prune-history --hardfork cancun``:
measured here, ``anvil_mine`` of 5,000 empty blocks took 20-25 s with anvil's defaults
(Prague, full history), 12-14 s with ``--prune-history``, 3.0 s with ``--hardfork london``,
0.13-0.17 s with both (london, shanghai or cancun), 0.62 s for 20,000; Prague's blocks
each run its system calls (EIP-2935's history of block hashes among them), and each
block's state is kept unless pruned. Logs of old blocks are not state: pruning keeps them."""

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

TOP = 50_000
CHUNK = 2_000
# Heights of the blocks holding a log: on both sides of every chunk boundary, the head's
# block, and a few inside chunks (block 1 holds the emitter's deployment).
LOG_HEIGHTS = tuple(
    sorted({2, 777, 31_234, TOP} | {h for b in range(CHUNK, TOP + 1, CHUNK) for h in (b - 1, b)})
)
# The fake upstream's relay: chunks over its cap, and one refused range under them, over
# the chain's first FAKE_TOP blocks.
FAKE_SPLIT = 2500
FAKE_TOP = 2999
# No block following: every log comes from the upstream, so its calls can be counted.
FOLLOW = '[subscriptions]\nfollow_blocks = "never"\n'
# BSC's profile refuses ranges past 10,000 blocks (its public endpoints' bound): raised.
CONFIG = (
    f"{FOLLOW}[logs]\nsplit_blocks = {CHUNK}\nsplit_concurrency = 4\nmax_block_range = {2 * TOP}\n"
)
# Upstream calls in flight one client may have: fewer than a scan's concurrency.
CLIENT_SLOTS = 2


async def chain_with_logs(node: Chain) -> str:
    """On anvil mining on demand: the Transfer emitter deployed, a log at each of
    ``LOG_HEIGHTS`` (a transfer of 1, 2, ... in turn); the emitter's address."""
    emitter = await node.deploy(transfer_emitter_initcode())
    for i, height in enumerate(LOG_HEIGHTS):
        now = (await node.head())[0]
        if height - 1 > now:
            await node.call("anvil_mine", [hex(height - 1 - now)])
        data = emitter_data(DEV_ACCOUNTS[2], 1 + i)
        await node.send({"from": DEV_ACCOUNTS[1], "to": emitter, "data": data, "gas": "0x20000"})
        await node.call("evm_mine")
        assert (await node.head())[0] == height
    return emitter


def _span(params: Any) -> tuple[int, int]:
    flt = params[0]
    return int(flt["fromBlock"], 16), int(flt["toBlock"], 16)


async def test_a_scan_is_one_calls_bytes_its_repeat_cached_and_refusals_bisected_fake_upstream(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    # Mining on demand, fast (see above), "finalized" two blocks behind the head.
    fast = ["--prune-history", "--hardfork", "cancun"]
    options = ["--no-mining", "--slots-in-an-epoch", "1", *fast]
    anvil = await anvil_factory(chain_id=56, block_time=None, extra=options)
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
            amounts = [int(x["data"], 16) for x in logs]  # each its own transfer, in order
            assert amounts == list(range(1, 1 + len(LOG_HEIGHTS)))
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
            # A range under the split, refused upstream: asked again in halves.
            narrow = {"fromBlock": hex(300), "toBlock": hex(2599), "address": emitter}
            want = await node.raw("eth_getLogs", [narrow])
            await fake.reset()
            assert await through.raw("eth_getLogs", [narrow]) == want
            assert (await fake.counts()).get("eth_getLogs", 0) >= 3  # refused, then halves
            flt = {"fromBlock": "0x0", "toBlock": hex(FAKE_TOP), "address": emitter}
            want = await node.raw("eth_getLogs", [flt])
            await fake.reset()
            got = await through.raw("eth_getLogs", [flt])
            assert got == want
            held_logs = [h for h in LOG_HEIGHTS if h <= FAKE_TOP]
            assert len(orjson.loads(got)["result"]) == len(held_logs)
            # The first chunk (0-2,499) refused, then served in halves: 3 calls; the
            # second (2,500-2,999) served at once.
            assert FAKE_SPLIT > LOGS_RANGE_CAP >= FAKE_SPLIT // 2
            assert (await fake.counts()).get("eth_getLogs", 0) == 4
