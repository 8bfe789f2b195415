"""An entry node's Nitro feed under bad input, from both sides at once: a feed that sends
malformed JSON, forged signatures, numbers going backwards and broadcasts over the size
limit among the good messages (a fake Nitro feed: a real sequencer cannot be made to send
them), and clients of the node's Nitro endpoint that never read while messages flow.

The node must stay within ``NITRO_FLOOD_RSS_GROWTH`` of its RSS before the attack, count
and log each kind of bad input, forward none of it, drop each client that never reads
(``too_slow``), and give a client that reads every good message, exactly, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from chainrelay.devnet import free_port
from chainrelay.nitro.codec import encode_broadcast
from chainrelay.tree.frame import Signer, keccak
from tests.hostile import wsraw
from tests.lab.chain import metric
from tests.lab.fake_nitro_feed import FakeNitroFeed
from tests.lab.hostile import ATTACK_RSS_GROWTH, MiB, Rss
from tests.lab.nitro_clients import Collector, collecting, has
from tests.lab.nitro_messages import feed_message, realistic
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

CHAIN_ID = 42161
STREAM = "arbitrum/nitro-feed"
SEQUENCER = Signer(keccak(b"hostile nitro sequencer"))
FORGER = Signer(keccak(b"hostile nitro forger"))
ENTRY_KEY = keccak(b"hostile nitro entry node")
FIRST = 7_000_000
# What the node may grow by while the attack runs: the tier's bound for one attack. The
# good messages alone fill its caches (backlog, recent, older, compressed, sqlite's) by
# about 30 MiB here, whatever their number; a page of older messages read for the
# clients catching up is held twice (range_max_bytes, NITRO_RANGE_LOADS at once).
NITRO_FLOOD_RSS_GROWTH = ATTACK_RSS_GROWTH
ROUNDS = 12
GOOD_PER_ROUND = 20
FORGED_PER_ROUND = 20
BACKWARDS_PER_ROUND = 10
NEVER_READERS = 8  # per wave, two waves, each from its own addresses
MAX_MESSAGE = 2 * MiB
WAIT = 30 * SECOND


def entry_toml(feed: FakeNitroFeed, nitro_port: int, log: Path) -> str:
    entry = Signer(ENTRY_KEY)
    return (
        f'[tree]\nnode_key = "0x{ENTRY_KEY.hex()}"\n\n'
        f'[batches]\nlog = "{log}"\napi_keys = ["hostile-nitro-entry"]\n'
        # What the node keeps of the good messages by design, bounded small: what it grows
        # by past that is the attack's.
        f"backlog_bytes = {4 * MiB}\n"
        # A page of older messages read for the clients catching up: at most this much
        # (held twice while it is read, NITRO_RANGE_LOADS at once).
        f"range_max_bytes = {1 * MiB}\n\n"
        f'[nitro]\nlisten = "127.0.0.1:{nitro_port}"\n'
        f'allowed_signers = ["0x{SEQUENCER.address.hex()}"]\n'
        f"max_message_bytes = {MAX_MESSAGE}\n"
        # A client that never reads is found within a second, its buffer bounded small.
        "send_timeout = 1.0\n"
        f"write_buffer_bytes = {64 * 1024}\n"
        "retry_delay = 0.05\nretry_max = 0.2\nrecent_messages = 64\n"
        f"range_cache_bytes = {4 * MiB}\n\n"
        f'[[nitro.inputs]]\nurl = "{feed.url}"\n\n'
        f'[[batches.streams]]\nname = "{STREAM}"\nchain_id = {CHAIN_ID}\n'
        f'sequencers = ["0x{entry.address.hex()}"]\n'
    )


def has_read(client: Collector, n: int) -> bool:
    return len(client.messages()) >= n


def reconnected(feed: FakeNitroFeed, connects: int) -> bool:
    """Whether the input connected again since it had ``connects`` connections."""
    return len(feed.connects) > connects


async def never_reader(port: int, address: str) -> asyncio.StreamWriter:
    """A client of the Nitro endpoint, from ``address``, that asks for everything, plain,
    and reads nothing (a receive window of a few KB)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((address, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        wsraw.upgrade_request(
            "/",
            [b"Arbitrum-Feed-Client-Version: 2", b"Arbitrum-Requested-Sequence-Number: %d" % FIRST],
        )
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return writer


async def test_bad_feed_input_and_never_reading_clients(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=CHAIN_ID, block_time=1.0)
    good = realistic(
        ROUNDS * GOOD_PER_ROUND,
        first_seq=FIRST,
        signer=SEQUENCER,
        chain_id=CHAIN_ID,
        sizes=(5_000, 80_000),
    )
    async with FakeNitroFeed(CHAIN_ID) as feed:
        port = free_port()
        node = await relay_factory(
            [anvil.ws_url], entry_toml(feed, port, tmp_path / "nitro.sqlite"), name="entry"
        )
        assert node.proc is not None
        rss = Rss(node.proc.pid)
        peak = rss.start

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss.now())
                await asyncio.sleep(0.02)  # a sampling period, not a wait for anything

        sampler = asyncio.create_task(sample())
        reading = Collector(f"ws://127.0.0.1:{port}", FIRST)
        idle: list[asyncio.StreamWriter] = []
        try:
            async with collecting(reading):
                idle += [await never_reader(port, f"127.0.0.{2 + i}") for i in range(NEVER_READERS)]
                for r in range(ROUNDS):
                    at = r * GOOD_PER_ROUND
                    batch = good[at : at + GOOD_PER_ROUND]
                    feed.publish(batch[: GOOD_PER_ROUND // 2])
                    # Forged: the next numbers and ones far ahead, signed by someone else.
                    nxt = batch[GOOD_PER_ROUND // 2].seq
                    forged = [
                        feed_message(nxt + (i % 2) * 1000 + i, b"forged", signer=FORGER)
                        for i in range(FORGED_PER_ROUND)
                    ]
                    feed.send_raw(encode_broadcast(forged))
                    # Backwards: good messages this connection sent already.
                    old = batch[:BACKWARDS_PER_ROUND]
                    feed.send_raw(encode_broadcast([m.raw for m in old]))
                    feed.publish(batch[GOOD_PER_ROUND // 2 :])
                    # Paced as a sequencer's feed: the next round once this one is through.
                    await until(
                        functools.partial(has_read, reading, at + GOOD_PER_ROUND),
                        WAIT,
                        f"round {r} at the reading client",
                    )
                    if r == ROUNDS // 2:
                        idle += [
                            await never_reader(port, f"127.0.1.{2 + i}")
                            for i in range(NEVER_READERS)
                        ]
                    if r % 3 == 1:
                        # Each closes the input; it comes back asking for its next number.
                        connects = len(feed.connects)
                        bad = (
                            b'{"version":1,"messages":[{"sequenceNumber":'
                            if r % 2
                            else b'{"version":1,"messages":[' + b'"x' * MAX_MESSAGE + b'"]}'
                        )
                        feed.send_raw(bad)
                        await until(
                            functools.partial(reconnected, feed, connects), WAIT, "the input back"
                        )

                # Every good message reaches the reading client, exactly, in order; and
                # nothing else does.
                await has(reading, feed.sent, FIRST, FIRST + len(good), WAIT)
                assert len(reading.messages()) == len(good)

                want = {
                    ("in", "signer"): ROUNDS * FORGED_PER_ROUND,
                    ("in", "backwards"): ROUNDS * BACKWARDS_PER_ROUND,
                    ("in", "malformed"): 2,
                    ("in", "too_large"): 2,
                    ("out", "too_slow"): 2 * NEVER_READERS,
                }

                got: dict[tuple[str, str], float] = {}

                async def counted() -> bool:
                    m = await node.metrics()
                    for w, o in want:
                        got[w, o] = metric(m, "chainrelay_nitro_messages_total", where=w, outcome=o)
                    return all(got[k] >= n for k, n in want.items())

                try:
                    await until(counted, WAIT, "every bad input counted")
                except AssertionError:
                    raise AssertionError(f"counted {got}, want at least {want}") from None
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            for w in idle:
                w.transport.abort()
        growth = peak - rss.start
        print(f"RSS +{growth / MiB:.1f} MiB at most")
        assert growth < NITRO_FLOOD_RSS_GROWTH, f"grew {growth / MiB:.1f} MiB"
        log = node.log_path.read_text()
        for line in (
            "not an allowed signer",
            "refused (backwards)",
            "malformed broadcast",
            f"a broadcast over {MAX_MESSAGE} bytes",
            "too slow",
        ):
            assert line in log, line
        assert "Traceback" not in log
        assert node.proc.poll() is None
