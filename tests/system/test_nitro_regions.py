"""Arbitrum's sequencer feed across three regions, Nitro's protocol at both ends: every
client at every leaf gets every message, byte for byte as the sequencer sent it, in order,
through an entry node's death, a leaf's restart, and a resume from a number older than any
leaf's backlog.

One network namespace per node (``tests/lab/tree.py``), links delayed in user space::

    fake Nitro feed (its own region; tests/lab/fake_nitro_feed.py as a process)
      ├─10 ms─► entry a (eu) ─┬─ 80 ms─► leaf us   ◄── Nitro-protocol client
      └─80 ms─► entry b (us) ─┼─ 10 ms─┘
                              ├─120 ms─► leaf asia ◄── Nitro-protocol client
                              └─150 ms─┘ (from entry b)

Both entry nodes follow the feed and publish it, each signing with its own node key (both
are the stream's ``sequencers``); every leaf has both as parents and takes each number once.
Entry a is killed mid-stream; leaf asia is killed and started again; then a new client at
leaf us asks for a number older than the leaves' backlogs (8 frames), served through the
range endpoint from entry b.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chainrelay.tree.frame import Signer, keccak
from tests.lab.fake_nitro_feed import script_messages
from tests.lab.netns import Region, RegionLab, read_ready, unavailable
from tests.lab.nitro_clients import Collector, collecting, has
from tests.lab.procs import Procs, until
from tests.lab.timing import SECOND
from tests.lab.tree import ANVIL_PORT, BATCH_TREE_EXTRA, Tree, TreeNode, anvil_in

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(unavailable() is not None, reason=unavailable() or ""),
]

CHAIN_ID = 42161
STREAM = "arbitrum/nitro-feed"
SEQUENCER_KEY = keccak(b"lab nitro region sequencer")
SEQUENCER = Signer(SEQUENCER_KEY)
ENTRY_KEYS = {"entrya": keccak(b"lab nitro entry a"), "entryb": keccak(b"lab nitro entry b")}
FEED_PORT = 9700
NITRO_PORT = 9642
FIRST = 150_000_000
COUNT = 100
BACKLOG = 10
RATE = 15.0  # messages a second: about 4x Arbitrum's, so the run is short
START_TIMEOUT = 60 * SECOND
DELIVERY_TIMEOUT = 60 * SECOND
LEAF_BACKLOG = 8


def streams_toml() -> str:
    entries = ", ".join(f'"0x{Signer(k).address.hex()}"' for k in ENTRY_KEYS.values())
    return (
        f'\n[[batches.streams]]\nname = "{STREAM}"\nchain_id = {CHAIN_ID}\n'
        f"sequencers = [{entries}]\n"
    )


async def entry(tree: Tree, name: str, region: str, feed: Region, feed_rtt: float) -> TreeNode:
    """An entry node in its own namespace, beside an anvil of its own (its upstream: the
    feed needs no chain, a node needs one), the feed through a delay link."""
    node = tree.node(
        name,
        region,
        trust=(),
        tree_extra={**BATCH_TREE_EXTRA, "node_key": "0x" + ENTRY_KEYS[name].hex()},
    )
    await anvil_in(
        node.place, chain_id=CHAIN_ID, what=f"anvil beside {name}", timeout=START_TIMEOUT
    )
    f_host, f_port = tree.lab.link(node.place, feed, FEED_PORT, feed_rtt)
    node.text += (
        f'\n[[upstreams]]\nname = "anvil"\nurl = "ws://127.0.0.1:{ANVIL_PORT}"\n'
        f'\n[batches]\nlog = "{tree.tmp / (name + ".sqlite")}"\n'
        'api_keys = ["lab-nitro-entry-api-key"]\n'
        f'\n[nitro]\nlisten = "0.0.0.0:{NITRO_PORT}"\n'
        f'allowed_signers = ["0x{SEQUENCER.address.hex()}"]\n'
        f'\n[[nitro.inputs]]\nurl = "ws://{f_host}:{f_port}"\n' + streams_toml()
    )
    return node


def leaf(tree: Tree, name: str, region: str) -> TreeNode:
    node = tree.node(name, region, trust=(), tree_extra=BATCH_TREE_EXTRA)
    node.text += (
        f"\n[batches]\nbacklog_frames = {LEAF_BACKLOG}\n"
        f'\n[nitro]\nlisten = "0.0.0.0:{NITRO_PORT}"\n' + streams_toml()
    )
    return node


async def test_the_feed_reaches_every_leaf_through_an_entry_death_and_a_leaf_restart(
    procs: Procs, tmp_path: Path
) -> None:
    sent = {m.seq: m.raw for m in script_messages(COUNT, FIRST, 7, SEQUENCER_KEY)}
    with RegionLab(procs) as lab, Tree(lab, tmp_path) as tree:
        place = lab.add_region("seq")
        feed = place.spawn(
            [sys.executable, "-m", "tests.lab.fake_nitro_feed", "--listen",
             f"0.0.0.0:{FEED_PORT}", "--count", str(COUNT), "--first", str(FIRST),
             "--backlog", str(BACKLOG), "--rate", str(RATE), "--seed", "7",
             "--key", SEQUENCER_KEY.hex(), "--wait-signal"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        read_ready(feed, START_TIMEOUT)
        a = await entry(tree, "entrya", "eu", place, 10.0)
        b = await entry(tree, "entryb", "us", place, 80.0)
        us = leaf(tree, "leafus", "us")
        asia = leaf(tree, "leafasia", "asia")
        tree.parent(us, a, 80.0)
        tree.parent(us, b, 10.0)
        tree.parent(asia, a, 120.0)
        tree.parent(asia, b, 150.0)
        await tree.start(a, b, timeout=START_TIMEOUT)
        await tree.start(us, asia, timeout=START_TIMEOUT)

        c_us = Collector(us.place.url(NITRO_PORT, scheme="ws"), FIRST)
        c_asia = Collector(asia.place.url(NITRO_PORT, scheme="ws"), FIRST, compression=False)
        async with collecting(c_us, c_asia):
            await has(c_us, sent, FIRST, FIRST + BACKLOG, DELIVERY_TIMEOUT)
            await has(c_asia, sent, FIRST, FIRST + BACKLOG, DELIVERY_TIMEOUT)
            os.kill(feed.pid, signal.SIGUSR1)  # live from here, RATE a second
            await until(lambda: len(c_us.messages()) >= 30, DELIVERY_TIMEOUT, "30 at leaf us")
            a.kill()  # an entry node dies mid-stream: entry b carries on
            await until(lambda: len(c_asia.messages()) >= 60, DELIVERY_TIMEOUT, "60 at asia")
            assert len(c_asia.messages()) < COUNT  # the restart lands mid-stream
            asia.kill()
            asia.start()
            await asia.wait_ready(START_TIMEOUT)
            for c in (c_us, c_asia):
                await has(c, sent, FIRST, FIRST + COUNT, DELIVERY_TIMEOUT)
            assert len(c_us.messages()) == len(c_asia.messages()) == COUNT

        # Older than any leaf's backlog: through the range endpoint, from entry b.
        old = Collector(us.place.url(NITRO_PORT, scheme="ws"), FIRST + 1)
        async with collecting(old):
            await has(old, sent, FIRST + 1, FIRST + COUNT, DELIVERY_TIMEOUT)
        assert "held nowhere" not in us.log_tail(100_000)
