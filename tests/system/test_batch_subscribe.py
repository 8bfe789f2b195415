"""A subscriber's view of a batch stream: the batch subscriber library and ``chainrelay
subscribe --stream arbitrum/batches`` against real nodes (anvil as chain 42161, an ingress
node taking a sequencer's pushes into its durable log, a relay fed by the ingress).

Every batch the sequencer had acknowledged must reach the subscriber once, in sequence,
with the payload and signer it was pushed with: the ones older than the relay's backlog
read through the relay's range endpoint (which climbs to the ingress's durable log), the
rest from the relay's feed, then live ones; a subscriber started again at any number
resumes with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from chainrelay.clients.batchsubscriber import BatchSubscription, FeedBatch
from chainrelay.clients.publisher import Publisher
from chainrelay.tree.frame import keccak
from tests.lab.batches import (
    API_KEY,
    CHAIN_ID,
    READ_TIMEOUT,
    SEQUENCER_HEX,
    SEQUENCER_KEY,
    STREAM,
    batches_toml,
    check_batches,
    payload_of,
    read_batches,
)
from tests.lab.procs import ROOT, Procs, Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab


async def push_batches(ingress: Relay, first: int, count: int) -> None:
    """Push batches ``first .. first+count-1`` pipelined (the publisher library) and return
    once every one is acknowledged (durable at the ingress)."""
    async with (
        asyncio.timeout(READ_TIMEOUT),
        Publisher(
            ingress.ws_url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY
        ) as pub,
    ):
        acks = []
        for seq in range(first, first + count):
            await pub.room(len(payload_of(seq)))
            acks.append(pub.submit(seq, payload_of(seq)))
        await asyncio.gather(*acks)


async def start_pair(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
    relay_backlog: int,
    pushed: int = 0,
) -> tuple[Relay, Relay]:
    """An ingress node and a relay whose parent it is, the relay holding the last
    ``relay_backlog`` batches; batches ``0 .. pushed-1`` pushed and on the relay's feed."""
    node = await anvil_factory(chain_id=CHAIN_ID, block_time=1.0)
    ingress = await relay_factory(
        [node.url],
        batches_toml(SEQUENCER_HEX, log=tmp_path / "ingress.sqlite", api_keys=[API_KEY]),
        name="ingress",
    )
    relay = await relay_factory(
        [node.url],
        batches_toml(
            SEQUENCER_HEX, parents=[ingress], settings=f"backlog_frames = {relay_backlog}"
        ),
        name="relay",
    )
    if pushed:
        await push_batches(ingress, 0, pushed)
        last = pushed - 1
        await until(lambda: relay_holds(relay, last), READ_TIMEOUT, f"the relay to hold {last}")
    return ingress, relay


async def relay_holds(relay: Relay, seq: int) -> bool:
    """True once the relay's feed has batch ``seq`` (a subscriber asking for it live gets it)."""
    sub = BatchSubscription(relay.ws_url, STREAM, from_seq=seq, trust=[SEQUENCER_HEX])
    try:
        async with asyncio.timeout(2 * SECOND):
            async for b in sub:
                return b.seq == seq and not b.fetched
    except TimeoutError:
        return False
    finally:
        await sub.aclose()
    return False


async def test_from_zero_past_the_relays_backlog_every_batch_in_order_then_live(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    ingress, relay = await start_pair(
        anvil_factory, relay_factory, tmp_path, relay_backlog=500, pushed=3000
    )
    sub = BatchSubscription(
        f"{relay.ws_url}/feed", STREAM, from_seq=0, trust=[SEQUENCER_HEX], chain_id=CHAIN_ID
    )
    try:
        batches = aiter(sub)
        got = await read_batches(batches, 3000)
        check_batches(got, 0)
        fetched = [b.seq for b in got if b.fetched]
        # The relay holds 500: everything older came from the ingress's durable log,
        # through the relay's range endpoint; nothing after the first frame is fetched.
        assert len(fetched) >= 2500 and fetched == list(range(len(fetched)))
        assert sub.fetched == len(fetched)
        live = asyncio.ensure_future(read_batches(batches, 200))
        await push_batches(ingress, 3000, 200)
        later = await live
        check_batches(later, 3000)
        assert not any(b.fetched for b in later)
        assert not sub.dropped, sub.dropped
    finally:
        await sub.aclose()


async def test_from_zero_after_a_confirmation_trimmed_the_backlog_on_a_quiet_stream(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    """The relay's backlog holds only the confirmed batch and nothing new comes: every
    batch before it comes through the range endpoint (from the ingress's durable log)."""
    ingress, relay = await start_pair(
        anvil_factory, relay_factory, tmp_path, relay_backlog=500, pushed=300
    )
    async with Publisher(
        ingress.ws_url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY
    ) as pub:
        await pub.confirm(299)

    async def trimmed() -> bool:
        health = await relay.health()
        return bool(health["tree"]["confirmed"].get(STREAM) == 299)

    await until(trimmed, READ_TIMEOUT, "the relay to take the confirmation")
    sub = BatchSubscription(f"{relay.ws_url}/feed", STREAM, from_seq=0, trust=[SEQUENCER_HEX])
    try:
        got = await read_batches(aiter(sub), 300)
        check_batches(got, 0)
        assert [b.seq for b in got if b.fetched] == list(range(299))
    finally:
        await sub.aclose()


async def test_a_subscriber_started_again_at_any_seq_resumes_without_gap_or_duplicate(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    _, relay = await start_pair(
        anvil_factory, relay_factory, tmp_path, relay_backlog=500, pushed=1500
    )
    taken: list[FeedBatch] = []
    # Restart points inside the durable log only, across the backlog's edge, and inside it.
    for stop in (400, 999, 1001, 1300, 1499):
        start = taken[-1].seq + 1 if taken else 0
        sub = BatchSubscription(
            f"{relay.ws_url}/feed", STREAM, from_seq=start, trust=[SEQUENCER_HEX]
        )
        try:
            taken += await read_batches(aiter(sub), stop - start + 1)
        finally:
            await sub.aclose()
    check_batches(taken, 0)
    assert taken[-1].seq == 1499


async def test_cli_prints_one_json_line_per_batch(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    procs: Procs,
    tmp_path: Path,
) -> None:
    _, relay = await start_pair(
        anvil_factory, relay_factory, tmp_path, relay_backlog=100, pushed=300
    )
    cmd = [sys.executable, "-m", "chainrelay", "--log-level", "WARNING", "subscribe"]
    cmd += [f"{relay.ws_url}/feed", "--stream", STREAM, "--from", "150"]
    cmd += ["--trust", SEQUENCER_HEX, "--count", "150", "--max-seconds", str(READ_TIMEOUT)]
    out, err = tmp_path / "cli.out", tmp_path / "cli.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = procs.spawn(cmd, stdout=o, stderr=e, cwd=ROOT)
    await until(lambda: proc.poll() is not None, READ_TIMEOUT, "the CLI to exit")
    assert proc.returncode == 0, err.read_text()
    lines = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert [x["seq"] for x in lines] == list(range(150, 300))
    for x in lines:
        data = payload_of(x["seq"])
        assert x["bytes"] == len(data) and x["keccak"] == "0x" + keccak(data).hex()
        assert x["signer"] == SEQUENCER_HEX
        assert (x["latency_ms"] is None) == x["fetched"]
    # The relay holds the last 100: 150..199 were read from the ingress through it.
    assert [x["fetched"] for x in lines] == [True] * 50 + [False] * 100


async def test_a_consumer_behind_its_queue_is_resynchronised_and_misses_nothing(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    _, relay = await start_pair(
        anvil_factory, relay_factory, tmp_path, relay_backlog=500, pushed=3000
    )
    # While the consumer reads 0..2499 through the range endpoint, the relay replays its 500
    # over the link: a queue of 64 overflows, and the link resumes after the 64 it holds.
    sub = BatchSubscription(
        f"{relay.ws_url}/feed", STREAM, from_seq=0, trust=[SEQUENCER_HEX], queue_batches=64
    )
    try:
        got = await read_batches(aiter(sub), 3000)
    finally:
        await sub.aclose()
    check_batches(got, 0)
    assert sub.dropped["overflow"] > 0 and set(sub.dropped) == {"overflow"}
    assert sub.links[0].sessions >= 2  # resynchronised: a second session from its position


async def test_a_parent_killed_mid_stream_costs_no_batch(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    ingress, relay = await start_pair(anvil_factory, relay_factory, tmp_path, relay_backlog=500)
    sub = BatchSubscription(
        [f"{relay.ws_url}/feed", f"{ingress.ws_url}/feed"],
        STREAM,
        from_seq=0,
        trust=[SEQUENCER_HEX],
    )
    batches = aiter(sub)
    # Far more than is read before the kill, so that it lands while pushes go on.
    pushing = asyncio.ensure_future(push_batches(ingress, 0, 4000))
    try:
        got = await read_batches(batches, 500)
        assert relay.proc is not None
        assert not pushing.done()  # the kill lands mid-stream
        os.kill(relay.proc.pid, signal.SIGKILL)
        got += await read_batches(batches, 3500)
        await pushing
    finally:
        pushing.cancel()
        await sub.aclose()
    check_batches(got, 0)
    # The other parent brought every batch live: none was made up from a range endpoint.
    assert not any(b.fetched for b in got)
    assert sub.duplicates > 0  # both parents sent batches: the second copies were dropped
