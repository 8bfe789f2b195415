"""WebSocket frames on an upstream link's fast path (RFC 6455 section 5.2), sans-I/O.

A JSON-RPC exchange with a WebSocket upstream is one client text frame out and one
server text frame back. websockets' protocol object handles everything else (the
handshake, pings, close, fragmented messages); these two functions only spare the
common frames its general machinery: encoding a masked text frame, and finding where a
frame starts and ends in the bytes read so far.
"""

from __future__ import annotations

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

# First byte of a final, unfragmented, extension-free text or binary frame.
FIN_TEXT = 0x81
FIN_BINARY = 0x82
MASK_BIT = 0x80


class FrameTooLarge(ValueError):
    """A frame header announces a payload above the limit."""


def encode_text(payload: bytes, mask: bytes) -> bytes:
    """One final text frame from a client: ``payload`` masked with the 4-byte ``mask``."""
    n = len(payload)
    if n < 126:
        head = bytes((FIN_TEXT, MASK_BIT | n))
    elif n < 65536:
        head = bytes((FIN_TEXT, MASK_BIT | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((FIN_TEXT, MASK_BIT | 127)) + n.to_bytes(8, "big")
    return head + mask + apply_mask(payload, mask)


def text_header(n: int) -> bytes:
    """The header of one final, unmasked text frame of ``n`` payload bytes (a server's)."""
    return _header(FIN_TEXT, n)


def binary_header(n: int) -> bytes:
    """The header of one final, unmasked binary frame of ``n`` payload bytes (a server's):
    written before bytes shared by every reader, so the payload is never copied."""
    return _header(FIN_BINARY, n)


def _header(first: int, n: int) -> bytes:
    if n < 126:
        return bytes((first, n))
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big")
    return bytes((first, 127)) + n.to_bytes(8, "big")


def next_frame(buf: bytes | bytearray, pos: int, max_size: int) -> tuple[int, int, int] | None:
    """``(first byte, payload start, frame end)`` of the frame at ``pos``, or None until
    all of it has arrived. A masked frame's payload starts after its mask (a server must
    not mask: such frames belong to the general path, which refuses them).

    Raises ``FrameTooLarge`` as soon as the header announces more than ``max_size``.
    """
    have = len(buf) - pos
    if have < 2:
        return None
    second = buf[pos + 1]
    n = second & 0x7F
    at = pos + 2
    if n == 126:
        if have < 4:
            return None
        n = int.from_bytes(buf[at : at + 2], "big")
        at += 2
    elif n == 127:
        if have < 10:
            return None
        n = int.from_bytes(buf[at : at + 8], "big")
        at += 8
    if n > max_size:
        raise FrameTooLarge(f"frame of {n} bytes exceeds the limit of {max_size}")
    if second & MASK_BIT:
        at += 4
    end = at + n
    if end > len(buf):
        return None
    return buf[pos], at, end
