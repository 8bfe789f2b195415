"""Attacks the hostile-client tests share, written at the byte level (asyncio streams) where
no client library would send what they send. Every attacker may take any loopback source
address (all of 127/8 is loopback), so attacks can come from many identities at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os

import aiohttp
import orjson
from websockets.frames import Frame, Opcode

from tests.lab.hostile import Rss
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Calls in one batch of distinct misses: geth's batch limit.
BATCH_CALLS = 1000


async def open_from(relay: Relay, address: str = "127.0.0.1") -> Streams:
    return await asyncio.open_connection("127.0.0.1", relay.port, local_addr=(address, 0))


async def upgrade(relay: Relay, address: str = "127.0.0.1") -> Streams:
    """A WebSocket connection's streams, past the handshake."""
    reader, writer = await open_from(relay, address)
    key = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10 * SECOND)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.transport.abort()


async def settled(rss: Rss, within: int, timeout: float) -> int:
    """RSS growth once it is back within ``within`` of the start (or the last reading)."""
    got = rss.growth()

    def back() -> bool:
        nonlocal got
        got = rss.growth()
        return got < within

    with contextlib.suppress(AssertionError):
        await until(back, timeout, "the relay's RSS to come back")
    return got


async def unfinished_body(relay: Relay, address: str, size: int, sent: int) -> bytes:
    """Announce a ``size``-byte body, send ``sent`` bytes of it, and wait for an answer
    (a refusal, or a timeout); what was answered, b"" if nothing."""
    reader, writer = await open_from(relay, address)
    try:
        writer.write(
            b"POST / HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        piece = b" " * (256 * 1024)
        with contextlib.suppress(ConnectionError):
            for at in range(0, sent, len(piece)):
                writer.write(piece[: min(len(piece), sent - at)])
                await writer.drain()
        with contextlib.suppress(TimeoutError, ConnectionError):
            return await asyncio.wait_for(reader.read(4096), 20 * SECOND)
        return b""
    finally:
        writer.transport.abort()


def attack_batch(k: int, calls: int = BATCH_CALLS) -> bytes:
    """``calls`` distinct balance reads (a "latest" miss each: cacheable, not cached)."""
    return orjson.dumps(
        [
            {
                "jsonrpc": "2.0",
                "id": i,
                "method": "eth_getBalance",
                "params": ["0x" + f"{k:04x}{i:036x}", "latest"],
            }
            for i in range(calls)
        ]
    )


async def post_batches(url: str, bodies: list[bytes], address: str = "127.0.0.1") -> list[bytes]:
    """``bodies`` at once from one client (at ``address``), each on its own connection;
    the answers, read but not decoded (the bystander shares this process: its loop is not
    to be held by the attacker's own decoding)."""
    conn = aiohttp.TCPConnector(limit=0, local_addr=(address, 0))
    timeout = aiohttp.ClientTimeout(total=60 * SECOND)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:

        async def one(body: bytes) -> bytes:
            headers = {"Content-Type": "application/json"}
            async with s.post(url, data=body, headers=headers) as r:
                assert r.status == 200
                return await r.read()

        return await asyncio.gather(*(one(b) for b in bodies))
