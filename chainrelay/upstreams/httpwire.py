"""An HTTP upstream's requests and answers as bytes, with no I/O.

The request head is built once per upstream from its URL (path and query, Host, basic
auth from the URL's userinfo, this node's Via, Accept-Encoding): the hot path adds only
``Content-Length`` and the body (``frame``). An answer's status is judged here
(``refusal``: what the node makes of a 429, a 503, a 508 or a 5xx), and an encoded body is
decoded within a bound (``decode``), so an upstream cannot make the node hold more than
that whatever it sends.
"""

from __future__ import annotations

import base64
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from chainrelay.upstreams.failures import (
    LOOP_DETECTED,
    BatchUnsupported,
    TransportError,
    retry_after_seconds,
)

# Path and query are written into the request line as they are: visible ASCII only.
_TARGET = re.compile(r"[!-~]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# gzip's header and trailer, or zlib's, around a deflate stream (RFC 9110 8.4.1).
_GZIP_WBITS = 16 + zlib.MAX_WBITS
# What is asked for when Accept-Encoding is sent: the two every provider's gateway
# speaks, both decoded by zlib (no brotli dependency).
ACCEPT_ENCODING = b"gzip, deflate"


@dataclass(frozen=True, slots=True)
class Target:
    """Where an HTTP upstream is and the head of every request to it.

    ``head`` ends with "Content-Length: " (this node's Via included); ``base`` is the
    same without the Via line, for a request that carries a longer Via chain."""

    host: str
    port: int
    secure: bool
    head: bytes
    base: bytes


def target(
    url: str,
    *,
    via: str = "",
    accept_encoding: bool = True,
    headers: Mapping[str, str] | None = None,
) -> Target:
    """The ``Target`` of an ``http://`` or ``https://`` URL. Raises ``ValueError`` for any
    other URL, one without a host, or one whose path cannot go in a request line as it is.
    ``headers``: more header lines for every request (checked by the config: names are
    tokens, values have no line breaks); an Authorization among them wins over the URL's
    userinfo."""
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    if _TARGET.fullmatch(path) is None:
        raise ValueError(f"a path with spaces or control characters in {url!r}")
    name = f"[{host}]" if ":" in host else host
    if parts.port is not None and parts.port != _DEFAULT_PORTS[parts.scheme]:
        name += f":{parts.port}"
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {name}",
        "Content-Type: application/json",
        # Some providers refuse requests without a User-Agent.
        "User-Agent: chainrelay",
    ]
    extra = dict(headers or {})
    own_auth = any(k.lower() == "authorization" for k in extra)
    if parts.username is not None and not own_auth:
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        lines.append("Authorization: Basic " + base64.b64encode(secret.encode()).decode())
    if accept_encoding:
        lines.append("Accept-Encoding: " + ACCEPT_ENCODING.decode())
    lines.extend(f"{k}: {v}" for k, v in extra.items())
    base = ("\r\n".join(lines) + "\r\n").encode()
    own = b"Via: " + via.encode() + b"\r\n" if via else b""
    return Target(
        host=host,
        port=port,
        secure=parts.scheme == "https",
        head=base + own + b"Content-Length: ",
        base=base,
    )


def frame(head: bytes, body: bytes) -> bytes:
    """A request: ``head`` (a ``Target``'s, ending in "Content-Length: "), then ``body``."""
    return b"%b%d\r\n\r\n%b" % (head, len(body), body)


def relayed_head(t: Target, came: str, via: str) -> bytes:
    """The head of a request made for a relay that forwarded it (its Via chain ``came``):
    the chain, then this node (``via``)."""
    return t.base + f"Via: {came}, {via}\r\n".encode() + b"Content-Length: "


def refusal(
    status: int, retry_after: bytes | None, body: bytes, batch: bool
) -> TransportError | None:
    """What an answer of ``status`` means, None when its body is the node's answer: a 200,
    or a 4xx carrying a JSON-RPC object (some nodes answer errors so).

    A 429 is "slow down" (never a failure), and so is a 503 that names a Retry-After
    (RFC 9110 15.6.4: the server is overloaded for that long); a 508 is a relay loop; any
    other non-200 of a batch refuses the batch (its calls are then asked one by one)."""
    if status == 200:
        return None
    if status == LOOP_DETECTED:
        return TransportError("the request came round to a relay it passed", loop=True)
    if status == 429 or (status == 503 and retry_after is not None):
        wait = retry_after_seconds(retry_after)
        return TransportError(f"HTTP {status}, retry after {wait:g}s", retry_after=wait)
    if batch:
        return BatchUnsupported(f"HTTP {status}")
    if status >= 500 or not body.lstrip().startswith(b"{"):
        return TransportError(f"HTTP {status}")
    return None


def decode(body: bytes, encoding: bytes, limit: int) -> bytes:
    """``body`` decoded from its Content-Encoding, at most ``limit`` bytes of it. Raises
    ``TransportError`` for an encoding not asked for, a broken or cut-off stream, or more
    than ``limit`` bytes once decoded (a small gzip bomb must not fill the node)."""
    name = encoding.strip().lower()
    if name in (b"", b"identity"):
        return body
    if name in (b"gzip", b"x-gzip"):
        wbits = _GZIP_WBITS
    elif name == b"deflate":
        # RFC 9110 says zlib-wrapped; some servers send a raw stream: tell them apart by
        # zlib's header (its first byte's low nibble is 8, the pair a multiple of 31).
        wrapped = len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0
        wbits = zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS
    else:
        raise TransportError(f"answer in an encoding not asked for: {name!r}", malformed=True)
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise TransportError(f"broken {name.decode()} answer: {exc}", malformed=True) from None
    if len(out) > limit or d.unconsumed_tail:
        raise TransportError(f"answer over {limit} bytes once decoded", malformed=True)
    if not d.eof:
        raise TransportError(f"cut-off {name.decode()} answer", malformed=True)
    return out
