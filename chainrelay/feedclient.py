"""What a feed client (``chainrelay.subscriber``, ``chainrelay.batchsubscriber``) needs to
reach a node and judge its frames: the node's endpoints, derived from the one URL a user
gives, and the signer addresses it trusts."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit, urlunsplit

from chainrelay.errors import ConfigError


def feed_url(url: str) -> str:
    """The ``/feed`` WebSocket URL of a node given as ``ws://host:port[/feed]`` or
    ``http://host:port``."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError(f"a feed URL is ws://HOST:PORT/feed: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/feed"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def rpc_url(url: str) -> str:
    """The JSON-RPC endpoint of the node serving the feed at ``url``: same host and port."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "/", "", ""))


def range_url(url: str, stream: str, start: int, limit: int) -> str:
    """``GET /feed/range`` of the node serving the feed at ``url`` (same host and port):
    up to ``limit`` frames of ``stream`` from position ``start``, from its backlog or a
    durable log."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    query = urlencode({"stream": stream, "from": start, "limit": limit})
    return urlunsplit((scheme, parts.netloc, "/feed/range", query, ""))


def signer_address(text: str) -> bytes:
    """A trusted signer given as 0x-hex (``ConfigError`` unless it is 20 bytes)."""
    raw = text[2:] if text[:2] in ("0x", "0X") else text
    try:
        address = bytes.fromhex(raw)
    except ValueError:
        address = b""
    if len(address) != 20:
        raise ConfigError(f"a trusted signer is a 20-byte hex address: {text!r}")
    return address
