"""Arbitrum's sequencer feed through real relay processes, in Nitro's protocol at both ends:
a fake Nitro sequencer feed (``tests/lab/fake_nitro_feed.py``, this process) → an entry node
(follows it, keeps the stream in its batch log) → a leaf (its child) → Nitro-protocol
clients (``chainrelay.nitro.tail.follow``, as a Nitro node follows a feed).

One test, in phases, so the three node processes start once: every message reaches a
client at the leaf byte for byte as the sequencer sent it, in order (backlog, then live,
compressed or not; a client making a Nitro node's exact offer gets Nitro's compression);
bad input at the entry (malformed JSON, a forged signature, numbers going backwards) is
counted and nothing of it forwarded; the leaf restarts and its client goes on from its
next number; and a client asking for a number older than the leaf's backlog is served it
from the entry node's durable log through the range endpoint; and ``chainrelay
nitro-tail`` pointed at the leaf prints one line per message.
"""

from __future__ import annotations

import asyncio
import sys
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from chainrelay.devnet import free_port
from chainrelay.nitro.codec import encode_broadcast
from chainrelay.nitro.deflate import NITRO_ANSWER, NITRO_EXTENSION
from chainrelay.nitro.dictionary import FEED_DICTIONARY
from chainrelay.tree.frame import Signer, keccak
from tests.lab.chain import metric
from tests.lab.fake_nitro_feed import FakeNitroFeed
from tests.lab.nitro_clients import Collector, collecting, nitro_node_reads
from tests.lab.nitro_clients import has as has_all
from tests.lab.nitro_messages import feed_message, realistic
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

CHAIN_ID = 42161
STREAM = "arbitrum/nitro-feed"
SEQUENCER = Signer(keccak(b"lab nitro sequencer"))
ENTRY_KEY = keccak(b"lab nitro entry node")
ENTRY = Signer(ENTRY_KEY)
FIRST = 150_000_000
# Messages cross two node processes, a sqlite commit and lz4 on a loaded two-core machine.
TIMEOUT = 30 * SECOND
# Frames each node's backlog holds: the resume phase asks for older ones than any holds,
# which only the entry node's durable log has.
LEAF_BACKLOG = 8


def streams_toml() -> str:
    return (
        f'\n[[batches.streams]]\nname = "{STREAM}"\nchain_id = {CHAIN_ID}\n'
        f'sequencers = ["0x{ENTRY.address.hex()}"]\n'
    )


def entry_toml(feed: FakeNitroFeed, nitro_port: int, log: Path) -> str:
    return (
        f'[tree]\nnode_key = "0x{ENTRY_KEY.hex()}"\n\n'
        f'[batches]\nlog = "{log}"\napi_keys = ["lab-nitro-entry-key"]\n'
        f"backlog_frames = {LEAF_BACKLOG}\n\n"
        f'[nitro]\nlisten = "127.0.0.1:{nitro_port}"\n'
        f'allowed_signers = ["0x{SEQUENCER.address.hex()}"]\n\n'
        f'[[nitro.inputs]]\nurl = "{feed.url}"\n' + streams_toml()
    )


def leaf_toml(parent: Relay, nitro_port: int) -> str:
    return (
        f'[tree]\n\n[[tree.parents]]\nname = "entry"\nregion = "eu"\n'
        f'url = "{parent.ws_url}/feed"\n\n'
        f"[batches]\nbacklog_frames = {LEAF_BACKLOG}\n\n"
        f'[nitro]\nlisten = "127.0.0.1:{nitro_port}"\n' + streams_toml()
    )


async def has(c: Collector, feed: FakeNitroFeed, start: int, end: int) -> None:
    await has_all(c, feed.sent, start, end, TIMEOUT)


async def test_nitro_feed_through_entry_and_leaf(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=CHAIN_ID, block_time=1.0)
    msgs = realistic(60, first_seq=FIRST, signer=SEQUENCER, chain_id=CHAIN_ID)
    async with FakeNitroFeed(CHAIN_ID) as feed:
        feed.publish(msgs[:20])  # the sequencer's backlog before the entry node starts
        entry_port, leaf_port = free_port(), free_port()
        entry = await relay_factory(
            [anvil.ws_url], entry_toml(feed, entry_port, tmp_path / "nitro.sqlite"), name="entry"
        )
        leaf = await relay_factory([anvil.ws_url], leaf_toml(entry, leaf_port), name="leaf")
        leaf_url = f"ws://127.0.0.1:{leaf_port}"

        # Backlog, then live, at the leaf: compressed and plain; at the entry too.
        plain = Collector(leaf_url, FIRST, compression=False)
        deflated = Collector(leaf_url, FIRST)
        at_entry = Collector(f"ws://127.0.0.1:{entry_port}", FIRST)
        async with collecting(plain, deflated, at_entry):
            await has(plain, feed, FIRST, FIRST + 20)
            for i in range(20, 40, 4):  # live, some broadcasts holding several messages
                feed.publish(msgs[i : i + 4])
            for c in (plain, deflated, at_entry):
                await has(c, feed, FIRST, FIRST + 40)
            # The entry's input agreed Nitro's own compression with the (Nitro-like) feed.
            assert feed.agreed and all(a == [NITRO_EXTENSION] for a in feed.agreed)

            # A Nitro node's exact offer at the leaf: Nitro's exact answer, and every
            # message compressed (RSV1), inflating with Nitro's dictionary to the bytes
            # the sequencer's relay would send.
            head, got = await nitro_node_reads(leaf_port, FIRST + 30, 10, TIMEOUT)
            assert b"\r\nSec-WebSocket-Extensions: " + NITRO_ANSWER.encode() + b"\r\n" in head
            for i, (rsv1, payload) in enumerate(got):
                assert rsv1
                text = zlib.decompressobj(-15, zdict=FEED_DICTIONARY).decompress(payload)
                assert text == encode_broadcast([feed.sent[FIRST + 30 + i]])

            feed.confirm(FIRST + 10)
            await until(lambda: FIRST + 10 in plain.confirmations(), TIMEOUT, "the confirmation")

            # Bad input at the entry: none of it reaches a client, each is counted.
            nxt = FIRST + 40
            forged = feed_message(nxt, b"forged", signer=Signer(keccak(b"someone")))
            feed.send_raw(encode_broadcast([forged]))
            feed.send_raw(encode_broadcast([msgs[5].raw]))  # backwards on this connection
            feed.send_raw(b'{"version":1,"messages":[{"sequenceNumber":')  # malformed
            feed.publish(msgs[40:45])

            async def counted() -> bool:
                m = await entry.metrics()
                return all(
                    metric(m, "chainrelay_nitro_messages_total", where="in", outcome=o) >= 1
                    for o in ("signer", "backwards", "malformed")
                )

            await until(counted, TIMEOUT, "the bad input counted at the entry")
            for c in (plain, deflated, at_entry):
                await has(c, feed, FIRST, FIRST + 45)
            log = entry.log_path.read_text()
            assert "not an allowed signer" in log and "malformed broadcast" in log

            # The leaf restarts: its client goes on from its next number, no gap, no copy.
            assert leaf.proc is not None
            leaf.proc.terminate()
            leaf.proc.wait()
            feed.publish(msgs[45:50])
            leaf.start()
            await leaf.wait_ready()
            feed.publish(msgs[50:55])
            await has(deflated, feed, FIRST, FIRST + 55)
            await has(plain, feed, FIRST, FIRST + 55)

        # A number older than the leaf's backlog: from the entry's log, via the range endpoint.
        old = Collector(leaf_url, FIRST + 2)
        async with collecting(old):
            await has(old, feed, FIRST + 2, FIRST + 55)
            feed.publish(msgs[55:60])
            await has(old, feed, FIRST + 2, FIRST + 60)
        assert "held nowhere" not in leaf.log_path.read_text()

        # chainrelay nitro-tail, pointed at the leaf: one JSON line a message.
        tail = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chainrelay", "--log-level", "WARNING", "nitro-tail",
            leaf_url, "--from", str(FIRST + 57), "--count", "3", "--max-seconds", "30",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(tail.communicate(), TIMEOUT)
        lines = [orjson.loads(x) for x in out.splitlines()]
        assert [x["seq"] for x in lines] == [FIRST + 57, FIRST + 58, FIRST + 59]
        assert [x["bytes"] for x in lines] == [len(feed.sent[x["seq"]]) for x in lines]
        assert all(x["l1_block"] == 19_000_002 for x in lines)
