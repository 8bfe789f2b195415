"""A client of Nitro's feed protocol (``chainrelay nitro-tail URL [--from N]``): it speaks
to a sequencer's feed, Nitro's relay or a chainrelay leaf alike, as a Nitro node does
(``Arbitrum-Feed-Client-Version: 2``, the next number on each reconnect, Nitro's
compression offered), and yields each feed message once, in order, as the bytes received.

Each printed line: ``seq``, ``l1_block`` (the L1 block number in the message's header),
``bytes`` (the feed message's JSON), and ``age_ms``: now minus the message's timestamp
(the sequencer's, in whole seconds). Nitro's protocol carries no entry node's time, so the
age from the sequencer is what a client of it can tell; a chainrelay node's own latency
from its entry node is its ``chainrelay_feed_last_latency_seconds`` metric.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from chainrelay import defaults
from chainrelay.nitro.codec import (
    CHAIN_ID_HEADER,
    CLIENT_VERSION_HEADER,
    FEED_VERSION,
    REQUESTED_SEQ_HEADER,
    NitroFormatError,
    parse_broadcast,
)
from chainrelay.nitro.deflate import client_extensions

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Received:
    """A feed message (``raw``: its bytes) or a confirmation (``raw`` empty)."""

    seq: int
    raw: bytes
    received: float  # time.time() when its broadcast arrived
    confirmation: bool = False


async def follow(
    url: str,
    from_seq: int | None = None,
    *,
    compression: bool = True,
    max_message_bytes: int = defaults.NITRO_MAX_MESSAGE_BYTES,
    retry_delay: float = defaults.NITRO_RETRY_DELAY,
    retry_max: float = defaults.NITRO_RETRY_MAX,
    reconnect: bool = True,
) -> AsyncIterator[Received]:
    """Every feed message from ``from_seq`` (None: whatever the server holds), each number
    once and in order, and every confirmation; reconnects from the next number."""
    nxt = from_seq
    delay = retry_delay
    while True:
        headers = {CLIENT_VERSION_HEADER: str(FEED_VERSION)}
        if nxt is not None:
            headers[REQUESTED_SEQ_HEADER] = str(nxt)
        try:
            async with connect(
                url,
                additional_headers=headers,
                compression=None,
                extensions=client_extensions() if compression else None,
                max_size=max_message_bytes,
                proxy=None,
            ) as ws:
                assert ws.response is not None
                log.info("following %s (chain %s)", url, ws.response.headers.get(CHAIN_ID_HEADER))
                delay = retry_delay
                while True:
                    data = await ws.recv(decode=False)
                    now = time.time()
                    try:
                        b = parse_broadcast(data)
                    except NitroFormatError as exc:
                        log.warning("malformed broadcast from %s: %s", url, exc)
                        continue
                    for m in b.messages:
                        if nxt is not None and m.seq < nxt:
                            continue  # a server resending what it sent before a reconnect
                        nxt = m.seq + 1
                        yield Received(m.seq, m.raw, now)
                    if b.confirmed is not None:
                        yield Received(b.confirmed, b"", now, confirmation=True)
        except (ConnectionClosed, OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            if not reconnect:
                raise
            log.info("%s: %s; reconnecting from %s", url, exc or type(exc).__name__, nxt)
        await asyncio.sleep(delay)
        delay = min(delay * 2, retry_max)


def line(r: Received) -> bytes:
    """The JSON line ``nitro-tail`` prints for ``r``."""
    if r.confirmation:
        return orjson.dumps({"confirmed": r.seq})
    l1 = None
    ts = None
    try:
        header = orjson.loads(r.raw)["message"]["message"]["header"]
        l1, ts = header.get("blockNumber"), header.get("timestamp")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        pass
    age = round((r.received - ts) * 1000) if isinstance(ts, int | float) else None
    return orjson.dumps({"seq": r.seq, "l1_block": l1, "bytes": len(r.raw), "age_ms": age})


async def print_tail(
    url: str,
    from_seq: int | None,
    *,
    count: int | None = None,
    max_seconds: float | None = None,
    compression: bool = True,
) -> int:
    """``nitro-tail``: one JSON line per message (and confirmation) on stdout, until
    ``count`` messages, ``max_seconds``, or an interrupt."""
    import sys

    out = sys.stdout.buffer
    got = 0

    async def run() -> None:
        nonlocal got
        async for r in follow(url, from_seq, compression=compression):
            out.write(line(r) + b"\n")
            out.flush()
            if not r.confirmation:
                got += 1
                if count is not None and got >= count:
                    return

    try:
        async with asyncio.timeout(max_seconds):
            await run()
    except TimeoutError:
        pass
    return 0
