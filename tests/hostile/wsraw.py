"""A WebSocket client at the byte level, for clients no library would be: frames built by
hand (RFC 6455 5.2, masked with the key given or a random one), sent cut anywhere, and
sockets that never read.

    reader, writer = await upgrade(port, "/batches", [b"Authorization: Bearer k"])
    writer.write(frame(OP_BINARY, push))
    code = await close_code(reader, timeout)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
from collections.abc import Sequence

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"",
) -> bytes:
    """One frame as a client sends it: ``mask`` b"" (a random key), a 4-byte key, or None
    (unmasked, which a server must refuse). ``rsv``: the three reserved bits (0-7)."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0x0F])
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(bit | 127)
        head += struct.pack(">Q", n)
    if mask is None:
        return bytes(head) + payload
    key = mask or os.urandom(4)
    head += key
    return bytes(head) + masked(payload, key)


def masked(payload: bytes, key: bytes) -> bytes:
    """``payload`` XORed with the 4-byte ``key`` (RFC 6455 5.3); the same undoes it."""
    if not payload:
        return b""
    reps = key * (len(payload) // 4 + 1)
    return (int.from_bytes(payload, "big") ^ int.from_bytes(reps[: len(payload)], "big")).to_bytes(
        len(payload), "big"
    )


def upgrade_request(path: str, headers: Sequence[bytes] = ()) -> bytes:
    key = base64.b64encode(os.urandom(16))
    lines = [
        f"GET {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: 13",
        *headers,
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def connect(
    port: int, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the node on 127.0.0.1; ``rcvbuf`` asks the kernel for a receive
    buffer that small (before connecting, so the window it announces is small too)."""
    if rcvbuf is None:
        return await asyncio.open_connection("127.0.0.1", port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def upgrade(
    port: int, path: str, headers: Sequence[bytes] = (), *, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket connection to ``path``, its 101 read (``AssertionError`` otherwise)."""
    reader, writer = await connect(port, rcvbuf)
    writer.write(upgrade_request(path, headers))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    """``(fin, opcode, payload)`` of the next frame a server sent (never masked)."""
    b0, payload = await read_frame_bits(reader)
    return bool(b0 & 0x80), b0 & 0x0F, payload


async def read_frame_bits(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The first byte (FIN, RSV1-3, opcode) and the payload of the next frame a server sent
    (never masked)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", await reader.readexactly(8))
    return b0, await reader.readexactly(n)


def read_fast(writer: asyncio.StreamWriter) -> None:
    """Let a connection opened with a tiny receive buffer read at full speed from now on."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):  # already closed: nothing left to read anyway
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)


async def close_code(reader: asyncio.StreamReader) -> int | None:
    """Read frames until the server's close frame: its code (1005 when it has none), or
    None if the connection ended without one."""
    try:
        while True:
            _fin, opcode, payload = await read_frame(reader)
            if opcode == OP_CLOSE:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
    except (asyncio.IncompleteReadError, OSError):
        return None
