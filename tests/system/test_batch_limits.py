"""Limits of the batch endpoints against clients that misbehave, on a real ingress node.

A range answer runs to megabytes: a client that pipelines range requests and reads none of
the answers must not make the node hold them all (it is no longer read once a few are
under way or its answers back up), and the node keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from chainrelay.clients.publisher import Publisher
from tests.lab.batches import (
    API_KEY,
    CHAIN_ID,
    READ_TIMEOUT,
    SEQUENCER_HEX,
    SEQUENCER_KEY,
    STREAM,
    batches_toml,
    payload_of,
    range_status,
)
from tests.lab.procs import Relay

pytestmark = pytest.mark.lab

BATCHES = 1000
PAYLOAD = 2000
# Requests the client pipelines: each answer is ~2 MB (1,000 frames of ~2 KB).
FLOOD = 300
# What the node may grow by while the flood waits unread: a few answers in flight, far
# below FLOOD of them (~600 MB).
MAX_GROWTH = 120 * 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_client_that_reads_no_range_answers_holds_few_of_them(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=CHAIN_ID, block_time=1.0)
    node = await relay_factory(
        [anvil.url],
        batches_toml(SEQUENCER_HEX, log=tmp_path / "ingress.sqlite", api_keys=[API_KEY]),
        name="ingress",
    )
    assert node.proc is not None
    async with (
        asyncio.timeout(READ_TIMEOUT),
        Publisher(
            node.ws_url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN_ID, api_key=API_KEY
        ) as pub,
    ):
        await asyncio.gather(*(pub.submit(s, payload_of(s, PAYLOAD)) for s in range(BATCHES)))
    before = rss(node.proc.pid)
    request = (
        f"GET /feed/range?stream={STREAM}&from=0&limit={BATCHES} HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        # open_connection's transport reads too; typeshed types StreamWriter's as write-only.
        transport = cast(asyncio.Transport, writer.transport)
        transport.pause_reading()  # the node's answers back up
        for _ in range(FLOOD):
            writer.write(request)
        # The node stops reading this client; the kernel then holds the rest of the flood.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await writer.drain()
        # Watched for a while (an observation window, not a wait for an event): the most
        # the node ever holds for this client.
        grown, until_t = 0, time.monotonic() + 3
        while time.monotonic() < until_t:
            grown = max(grown, rss(node.proc.pid) - before)
            await asyncio.sleep(0.05)
        assert grown < MAX_GROWTH, f"the node grew by {grown / 2**20:.0f} MiB"
        # Every request was answered, in order: a few with their frames, the rest 429.
        transport.resume_reading()
        statuses: list[int] = []
        async with asyncio.timeout(READ_TIMEOUT):
            for _ in range(FLOOD):
                head = await reader.readuntil(b"\r\n\r\n")
                statuses.append(int(head.split(b" ", 2)[1]))
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
        assert set(statuses) == {200, 429} and statuses.count(200) < FLOOD // 10, statuses
        # Everyone else is still served, range answers included.
        status, frames = await range_status(node, BATCHES - 10, 10)
        assert status == 200 and len(frames) == 10
        assert (await node.health())["status"] in ("ok", "degraded")
    finally:
        writer.close()
