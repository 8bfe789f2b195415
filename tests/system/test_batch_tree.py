"""Batches through a relay tree across regions: a sequencer's pushes reach every
subscriber at the leaves, each batch once, in order, intact, even when a regional relay
is killed mid-stream.

The tree, one network namespace per node (``tests/lab/tree.py`` in a ``RegionLab``)::

    sequencer (this process) ─► ingress (a, beside anvil as chain 42161)
                                  ├─40 ms─► relay b ─┬─20 ms─► leaf1..leaf4 (each has both
                                  └─60 ms─► relay c ─┴─40 ms─►  relays as parents)

Link delays are emulated in user space (``tests/lab/delay_link.py``: this kernel has no
netem qdisc); the round trips above are the links'. Each leaf has a ``chainrelay subscribe
--stream arbitrum/batches --from 0`` process beside it, whose JSON lines say each batch's
seq and the keccak of its payload. The nodes carry the stream in ``[[batches.streams]]``;
a batches-only tree needs no ``[tree] trust`` (every batch is checked against the
stream's sequencers).
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest

from chainrelay.clients.publisher import Publisher
from chainrelay.tree.frame import keccak
from tests.lab.batches import API_KEY, CHAIN_ID, SEQUENCER_HEX, SEQUENCER_KEY, STREAM, payload_of
from tests.lab.chain import metric
from tests.lab.netns import RegionLab, unavailable
from tests.lab.procs import Procs, until
from tests.lab.timing import SECOND
from tests.lab.tree import NODE_PORT, Subscriber, Tree, TreeNode, batch_tree

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(unavailable() is not None, reason=unavailable() or ""),
]

BATCHES = 2000
# A steady 200 batches/s: 10 s of pushing, long enough to kill a relay in the middle.
RATE = 200.0
LEAVES = 4
# 2,000 batches at 200/s take 10 s; every subscriber has them a few link delays later.
# Nodes and subscribers share two cores with the delay links: generous.
DELIVERY_TIMEOUT = 60 * SECOND
# Seven nodes start on two cores.
START_TIMEOUT = 60 * SECOND


async def build(tree: Tree) -> tuple[TreeNode, list[TreeNode], list[TreeNode]]:
    """Start the ingress, the two regional relays and the leaves; (ingress, relays, leaves)."""
    return await batch_tree(
        tree, sequencer=SEQUENCER_HEX, api_key=API_KEY, leaves=LEAVES, timeout=START_TIMEOUT
    )


async def linked_to_both(leaf: TreeNode) -> bool:
    return metric(await leaf.metrics(), "chainrelay_feed_parents") == 2


async def push_steady(ingress: TreeNode, count: int, rate: float) -> None:
    """Push batches 0..count-1 at ``rate`` a second (pipelined) and return once every one
    is acknowledged (durable at the ingress)."""
    url = ingress.place.url(NODE_PORT, scheme="ws")
    loop = asyncio.get_running_loop()
    async with Publisher(
        url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY
    ) as pub:
        acks = []
        start = loop.time()
        for seq in range(count):
            # Pacing, not synchronisation: the next batch is due at start + seq / rate.
            await asyncio.sleep(max(0.0, start + seq / rate - loop.time()))
            await pub.room(len(payload_of(seq)))
            acks.append(pub.submit(seq, payload_of(seq)))
        async with asyncio.timeout(DELIVERY_TIMEOUT):
            await asyncio.gather(*acks)


def check_all(sub: Subscriber) -> None:
    """Every batch once, in order, the payload and signer it was pushed with."""
    assert not sub.bad_lines, sub.bad_lines[:3]
    assert sub.seqs == list(range(BATCHES)), f"{sub.name}: {len(sub.seqs)} lines"
    for line in sub.blocks:
        seq = line["seq"]
        assert line["keccak"] == "0x" + keccak(payload_of(seq)).hex(), f"{sub.name} {seq}"
        assert line["signer"] == SEQUENCER_HEX


async def subscribe_all(tree: Tree, leaves: list[TreeNode]) -> list[Subscriber]:
    """A subscriber beside every leaf, from seq 0; returns once each leaf has its child."""
    subs = [
        tree.subscribe(leaf, STREAM, from_block=0, trust=SEQUENCER_HEX, label=f"sub-{leaf.name}")
        for leaf in leaves
    ]
    for leaf in leaves:

        async def linked(leaf: TreeNode = leaf) -> bool:
            samples = await leaf.metrics()
            return metric(samples, "chainrelay_feed_children", stream=STREAM) == 1

        await until(linked, START_TIMEOUT, f"a subscriber at {leaf.name}")
    return subs


async def test_every_subscriber_gets_every_batch_in_order(procs: Procs, tmp_path: Path) -> None:
    with RegionLab(procs) as lab, Tree(lab, tmp_path) as tree:
        ingress, _, leaves = await build(tree)
        for leaf in leaves:
            await until(functools.partial(linked_to_both, leaf), START_TIMEOUT, "two parents")
        subs = await subscribe_all(tree, leaves)
        await push_steady(ingress, BATCHES, RATE)
        for sub in subs:
            await sub.wait_count(BATCHES, DELIVERY_TIMEOUT)
        for sub in subs:
            check_all(sub)
        # Through the links, live: at most the first few (before a subscriber's link was up)
        # were read from a range endpoint.
        for sub in subs:
            fetched = [line["seq"] for line in sub.blocks if line["fetched"]]
            assert fetched == list(range(len(fetched))) and len(fetched) < BATCHES // 10


async def test_a_regional_relay_killed_mid_stream_costs_no_subscriber_a_batch(
    procs: Procs, tmp_path: Path
) -> None:
    with RegionLab(procs) as lab, Tree(lab, tmp_path) as tree:
        ingress, (b, _), leaves = await build(tree)
        for leaf in leaves:
            await until(functools.partial(linked_to_both, leaf), START_TIMEOUT, "two parents")
        subs = await subscribe_all(tree, leaves)
        pushing = asyncio.ensure_future(push_steady(ingress, BATCHES, RATE))
        try:
            for sub in subs:
                await sub.wait_count(BATCHES // 3, DELIVERY_TIMEOUT)
            assert not pushing.done()  # the kill lands mid-stream
            b.kill()
            await pushing
        finally:
            if not pushing.done():
                pushing.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await pushing
        for sub in subs:
            await sub.wait_count(BATCHES, DELIVERY_TIMEOUT)
        for sub in subs:
            check_all(sub)
            # Nothing the kill cost was made up from a range endpoint: the other parent
            # brought it live (only a leading few may be fetched, before a link was up).
            fetched = [line["seq"] for line in sub.blocks if line["fetched"]]
            assert fetched == list(range(len(fetched))) and len(fetched) < BATCHES // 10
        # Every leaf went on with its other parent alone.
        for leaf in leaves:
            assert metric(await leaf.metrics(), "chainrelay_feed_parents") == 1
