"""Every front-door attack at once, from many addresses, against one node with its default
limits: what the node holds in all stays under ``NODE_RSS_GROWTH`` (256 MiB), a
well-behaved client (in a process of its own: the attackers' client work would delay one
sharing this test's loop) is answered meanwhile, and the node gives back what it held once
the attackers are gone.

The attacks (each from addresses of its own, all of 127/8 being loopback): a ping flood
from a peer that never reads its pongs, unfinished 4.9 MiB bodies and unfinished 4.9 MiB
WebSocket messages on 40 connections each, ten batches of 1,000 distinct misses, and
10,000 pipelined requests in one write. Before the node's memory budget the same mix grew
it by gigabytes (751 MiB for 150 unfinished bodies alone). The unfinished ones are held
until the others are over (the node would drop them after ``body_read_timeout``, 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import orjson
import pytest
from websockets.frames import Opcode

from chainrelay.devnet import Anvil
from tests.hostile.attacks import (
    Streams,
    attack_batch,
    close_all,
    frame,
    open_from,
    post_batches,
    settled,
    upgrade,
)
from tests.lab.hostile import (
    ATTACK_RSS_GROWTH,
    BYSTANDER_P99,
    NODE_RSS_GROWTH,
    BystanderProcess,
    MiB,
    Rss,
)
from tests.lab.procs import Relay, RelayFactory
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

CHAIN_ID = b'{"jsonrpc":"2.0","id":%d,"method":"eth_chainId","params":[]}'
UNFINISHED = 40  # bodies, and as many WebSocket messages
PIECE = 5 * MiB - 100 * 1024  # of a 5 MiB body or message


async def ping_flood(relay: Relay, address: str, pings: int, seconds: float) -> int:
    """Pings from a peer that never reads its pongs, until the node stops reading it or the
    time is up; the pings it took."""
    burst = frame(Opcode.PING, b"p" * 125) * 1000
    _, writer = await upgrade(relay, address)
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        with contextlib.suppress(TimeoutError, ConnectionError):
            while sent < pings and time.monotonic() < deadline:
                writer.write(burst)
                await asyncio.wait_for(writer.drain(), 2 * SECOND)
                sent += 1000
    finally:
        writer.transport.abort()
    return sent


async def unfinished_bodies(relay: Relay, addresses: list[str], over: asyncio.Event) -> None:
    """``UNFINISHED`` POSTs announcing 5 MiB and sending 4.9 MiB, held until ``over``."""

    async def one(address: str) -> Streams:
        reader, writer = await open_from(relay, address)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (5 * MiB)
        )
        piece = b" " * (256 * 1024)
        with contextlib.suppress(ConnectionError, TimeoutError):
            for at in range(0, PIECE, len(piece)):
                writer.write(piece[: min(len(piece), PIECE - at)])
                await asyncio.wait_for(writer.drain(), 10 * SECOND)
        return reader, writer

    conns = await asyncio.gather(*(one(addresses[i % len(addresses)]) for i in range(UNFINISHED)))
    await over.wait()
    close_all([w for _, w in conns])


async def unfinished_messages(relay: Relay, addresses: list[str], over: asyncio.Event) -> None:
    """``UNFINISHED`` WebSocket messages of 4.9 MiB without their last fragment, held until
    ``over``."""
    part = frame(Opcode.TEXT, b" " * PIECE, fin=False)

    async def one(address: str) -> Streams:
        reader, writer = await upgrade(relay, address)
        writer.write(part)
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.drain(), 10 * SECOND)
        return reader, writer

    conns = await asyncio.gather(*(one(addresses[i % len(addresses)]) for i in range(UNFINISHED)))
    await over.wait()
    close_all([w for _, w in conns])


async def pipelined_flood(relay: Relay, address: str, n: int) -> int:
    """``n`` pipelined requests in one write; the answers read."""
    flood = b"".join(
        b"POST / HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(CHAIN_ID % i), CHAIN_ID % i)
        for i in range(n)
    )
    reader, writer = await open_from(relay, address)
    writer.write(flood)
    got = 0
    deadline = time.monotonic() + 30 * SECOND
    try:
        while got < n and time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 10 * SECOND)
            if not chunk:
                break
            got += chunk.count(b"HTTP/1.1 200")
    finally:
        writer.transport.abort()
    return got


async def test_every_attack_at_once_with_default_limits_stays_within_the_node_budget(
    anvil: Anvil, relay_factory: RelayFactory
) -> None:
    relay: Relay = await relay_factory([anvil.url])
    assert relay.proc is not None
    rss = Rss(relay.proc.pid)
    over = asyncio.Event()
    bodies = [attack_batch(k) for k in range(10)]
    async with BystanderProcess(relay.url) as bystander:
        held = asyncio.gather(
            unfinished_bodies(relay, [f"127.0.1.{i}" for i in range(1, 5)], over),
            unfinished_messages(relay, [f"127.0.2.{i}" for i in range(1, 5)], over),
        )
        pings, batches, answered = await asyncio.gather(
            ping_flood(relay, "127.0.3.1", 300_000, 10 * SECOND),
            post_batches(relay.url, bodies, "127.0.4.1"),
            pipelined_flood(relay, "127.0.5.1", 10_000),
        )
        peak = rss.peak_growth()
        over.set()
        await held
    print(
        f"all at once: {pings} pings taken, {answered} pipelined answers, peak growth "
        f"{peak / MiB:.1f} MiB; bystander {bystander.summary()}"
    )
    results = [a for raw in batches for a in orjson.loads(raw)]
    assert len(results) == 10_000 and all(a.get("result") == "0x0" for a in results)
    assert answered == 10_000
    assert pings < 300_000, "a peer that reads no pong is no longer read"
    assert peak < NODE_RSS_GROWTH, f"peak growth {peak / MiB:.1f} MiB"
    assert bystander.failures == 0, bystander.summary()
    # Every attack at once holds a well-behaved client longer than any one of them does
    # (each module holds it under BYSTANDER_P99): 25-80 ms at p99 here on 2 cores shared
    # with the attackers, up to 210 ms with the machine busy besides (the node's own loop
    # then stalls 150-250 ms at times: it waits for a core). It was 110-200 ms on a quiet
    # machine before the node kept what it built at start out of the collector's full
    # collections (chainrelay/collector.py).
    assert bystander.p99() < 3 * BYSTANDER_P99, bystander.summary()
    # The attackers gone, the node gives back what it held (glibc may keep some freed heap
    # for reuse, so this is bounded, not zero): 28-40 MiB above where it started when this
    # test runs alone, 78-97 MiB when it runs first in the whole suite, right after the
    # type check (unexplained); against 163-173 MiB at the peak.
    after = await settled(rss, 32 * MiB, 15 * SECOND)
    assert after < 2 * ATTACK_RSS_GROWTH, f"growth after {after / MiB:.1f} MiB"
