"""A bare frame forwarder: what a relay hop would cost if the relay's own work were free.

``python -m benchmarks.hop_floor --port N --parent ws://127.0.0.1:S/feed --stream S``

It takes a feed session from its parent with the relay's own client library (websockets,
no compression, one hello for the stream, live only) and writes each binary message to
every child of its ``/feed`` the way the relay's hub does (one shared WebSocket header,
``writelines``, uvloop) — no verification, no backlog, no cursors, no metrics, no cache.
Children get a welcome after their hello, then frames. ``GET /children`` answers how many
children are linked. Benchmarks only: it trusts every byte it is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import sys
from typing import cast

import uvloop
from websockets.asyncio.client import connect

from chainrelay.tree.session import Want, encode_hello, encode_welcome
from chainrelay.wire.wsframes import binary_header

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B65"
# A child's request head or hello larger than this is not one of the benchmark's children.
MAX_HEAD = 16 * 1024
# Frames up to this size are taken from the parent (the relay's default frame limit).
MAX_FRAME = 16 * 1024 * 1024


class Child(asyncio.Protocol):
    """One connection: an HTTP request (upgrade to /feed, or GET /children), then a hello."""

    def __init__(self, children: set[Child]) -> None:
        self.children = children
        self.buf = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        if len(self.buf) > MAX_HEAD:
            self.transport.close()
            return
        if not self.upgraded:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            self.buf = rest
            self._request(head)
            if not self.upgraded:
                return
        self._hello()

    def _request(self, head: bytes) -> None:
        assert self.transport is not None
        lines = head.split(b"\r\n")
        if lines[0].startswith(b"GET /children"):
            body = str(len(self.children)).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                + body
            )
            self.transport.close()
            return
        key = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        if not lines[0].startswith(b"GET /feed") or not key:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.upgraded = True

    def _hello(self) -> None:
        # A masked client text frame under 126 bytes: 2 header bytes, 4 mask bytes, payload.
        assert self.transport is not None
        if len(self.buf) < 2 or self in self.children:
            return
        size = self.buf[1] & 0x7F
        if len(self.buf) < 6 + size:
            return
        self.buf = b""
        welcome = encode_welcome([])
        self.transport.write(bytes((0x81, len(welcome))) + welcome)
        self.children.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.children.discard(self)


async def forward(parent: str, stream: str, children: set[Child]) -> None:
    async with connect(parent, max_size=MAX_FRAME, compression=None, ping_interval=None) as conn:
        await conn.send(encode_hello([Want(stream)]), text=True)
        async for message in conn:
            if isinstance(message, bytes):
                head = binary_header(len(message))
                for child in children:
                    assert child.transport is not None
                    child.transport.writelines((head, message))


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    children: set[Child] = set()
    server = await loop.create_server(lambda: Child(children), "127.0.0.1", args.port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await forward(args.parent, args.stream, children)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--parent", required=True, help="ws://HOST:PORT/feed")
    ap.add_argument("--stream", required=True)
    args = ap.parse_args(argv)
    uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
