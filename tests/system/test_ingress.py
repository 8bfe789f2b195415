"""The batch ingress as a sequencer and its relays see it, with real processes: anvil as
Arbitrum's chain (42161) upstream, chainrelay nodes with a ``[batches]`` section (ingress
nodes with a durable log and an API key; relays fed by them over the feed), pushed to by
the publisher library or by raw WebSocket and HTTP clients.

What a node holds is read back through ``GET /feed/range`` and checked end to end (the
sequencer's signature in each frame, consecutive seqs, the payload that was pushed).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from chainrelay.batchsubscriber import BatchSubscription, FeedBatch
from chainrelay.errors import PublishRefused
from chainrelay.publisher import Ack, Publisher, generated_payload
from chainrelay.wire.batchframe import PUSH, Push, encode_push, sign_batch
from chainrelay.wire.feedframe import Signer, keccak
from tests.lab.batches import (
    CHAIN_ID,
    STREAM,
    batches_toml,
    pushes,
    range_status,
    read_range,
)
from tests.lab.procs import Relay, fetch_metrics, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

RelayFactory = Callable[..., Awaitable[Relay]]
AnvilFactory = Callable[..., Awaitable[Any]]

SEQUENCER_KEY = keccak(b"ingress system test sequencer")
SEQUENCER = Signer(SEQUENCER_KEY)
SEQUENCER_HEX = "0x" + SEQUENCER.address.hex()
API_KEY = "ingress-system-test-key"
# Batches cross one or two node processes and may be read back through range requests that
# climb to an ingress: seconds on a loaded two-core machine, not milliseconds.
HOP_TIMEOUT = 30 * SECOND


async def kill(node: Relay) -> None:
    assert node.proc is not None
    node.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(node.proc.wait)


async def restart(node: Relay) -> None:
    """The same process again: its port, config and durable log."""
    node.start()
    await node.wait_ready()


def restored_next(node: Relay) -> list[int]:
    """Each start's 'next batch' of the stream, from the node's log: where the ingress
    picked up from its durable log."""
    text = node.log_path.read_text(errors="replace")
    return [int(n) for n in re.findall(rf"ingress of {STREAM}: next batch (\d+)", text)]


# --- 1. crash safety --------------------------------------------------------------------------
CRASH_BATCHES = 10_000
CRASH_SIZE = 2048
CRASH_SEED = 20_261_126
CRASH_KILLS = 3


async def test_ingress_sigkilled_three_times_during_10000_pushes_loses_nothing_acked(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    anvil = await anvil_factory(chain_id=CHAIN_ID, block_time=1.0)
    node = await relay_factory(
        [anvil.ws_url],
        batches_toml(SEQUENCER_HEX, log=tmp_path / "ingress.sqlite", api_keys=[API_KEY]),
        name="ingress",
    )
    rng = random.Random(CRASH_SEED)
    # Kill points spread over the push, drawn apart so each restart has acks in between.
    kill_at = sorted(rng.sample(range(500, CRASH_BATCHES - 500, 250), CRASH_KILLS))
    acks: list[Ack] = []
    acked = asyncio.Event()

    def on_ack(fut: asyncio.Future[Ack]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            acks.append(fut.result())
            acked.set()

    # Every ack received before (or in the socket after) a SIGKILL was sent by the live
    # node: the batch and everything before it must survive the kill.
    acked_at_kill: list[int] = []

    async def killer() -> None:
        for k in kill_at:
            while len(acks) < k:
                acked.clear()
                await acked.wait()
            await kill(node)
            acked_at_kill.append(max(a.seq for a in acks))
            await restart(node)

    t0 = time.monotonic()
    async with Publisher(
        node.ws_url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY,
        retry_delay=0.02, retry_max=0.2,
    ) as pub:  # fmt: skip
        killing = asyncio.create_task(killer())
        futures = []
        async with asyncio.timeout(80 * SECOND):
            for seq in range(CRASH_BATCHES):
                payload = generated_payload(CRASH_SEED, seq, CRASH_SIZE)
                await pub.room(len(payload))
                fut = pub.submit(seq, payload)
                fut.add_done_callback(on_ack)
                futures.append(fut)
            await asyncio.gather(*futures)
            await killing
        assert sum(n.sessions for n in pub.nodes) == CRASH_KILLS + 1
    seconds = time.monotonic() - t0

    assert sorted(a.seq for a in acks) == list(range(CRASH_BATCHES))
    # Each restart took up at least where the acknowledged batches ended.
    starts = restored_next(node)
    assert starts[0] == 0 and len(starts) == CRASH_KILLS + 1, starts
    for at_kill, restored in zip(acked_at_kill, starts[1:], strict=True):
        assert restored > at_kill, (acked_at_kill, starts)
    got = await read_range(node, SEQUENCER_HEX, 0, CRASH_BATCHES)
    for seq in range(CRASH_BATCHES):
        assert got[seq] == generated_payload(CRASH_SEED, seq, CRASH_SIZE), f"batch {seq}"
    assert await range_status(node, CRASH_BATCHES) == (200, [])  # nothing after the last
    counts = await pushes(node)  # this process's: since the last restart
    assert counts.get("conflict", 0) == counts.get("gap", 0) == 0, counts
    print(f"10,000 x 2 KB with {CRASH_KILLS} kills at {kill_at} acks: {seconds:.1f} s")
