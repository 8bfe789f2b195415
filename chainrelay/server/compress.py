"""Compression of answers: gzip over HTTP for clients that ask (``Accept-Encoding: gzip``)
and permessage-deflate on client WebSockets when negotiated and allowed
(``[server] ws_deflate``). Sans-I/O: bytes in, bytes out.

An HTTP answer is gzipped only when the client asked and it is at least
``gzip_min_bytes``: a cache hit of a balance (tens of bytes) is written as it is, a block or
a log range (tens of KB of hex) shrinks ~3x at zlib level 1. A client that does not ask
costs the fast path nothing more than the one scan of its head that looks for its
X-Request-Id too (``HttpProtocol._plain_post``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from chainrelay import defaults

# The head lines of a gzipped answer: what it is, and that it depends on what was asked.
GZIP_LINES = b"Content-Encoding: gzip\r\nVary: Accept-Encoding\r\n"
# gzip's wrapper around deflate (zlib's wbits for a gzip header and trailer).
_GZIP_WBITS = 31


@dataclass(frozen=True)
class Compression:
    """What the front door compresses, from ``[server]``."""

    gzip_min_bytes: int = defaults.GZIP_MIN_BYTES
    gzip_level: int = defaults.GZIP_LEVEL
    ws_deflate: bool = defaults.WS_DEFLATE

    def gzip(self, body: bytes) -> bytes:
        """``body`` gzipped (one member, as ``gzip.decompress`` reads it)."""
        z = zlib.compressobj(self.gzip_level, zlib.DEFLATED, _GZIP_WBITS)
        return z.compress(body) + z.flush()


def accepts_gzip(value: bytes | None) -> bool:
    """Whether an Accept-Encoding value (httptools' header) accepts gzip: listed, and not
    with a weight of 0 (RFC 9110 12.5.3)."""
    if value is None or b"gzip" not in value.lower():
        return False
    for item in value.lower().split(b","):
        name, _, params = item.partition(b";")
        if name.strip() not in (b"gzip", b"x-gzip"):
            continue
        q = params.strip()
        if q.startswith(b"q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False
