"""The answers one HTTP connection owes, in request order (HTTP/1.1 pipelining).

Each request that is not answered at once leaves one record in the connection's queue,
typed by what is written for it once ready; an answer is written only when every answer
before it has been. The queue itself is a plain deque on the connection, so that the hot
path's "nothing owed?" is a C-level truth test.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterator
from typing import NamedTuple

log = logging.getLogger(__name__)

INTERNAL_ERROR = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"internal error"}}'


class Awaited(NamedTuple):
    """A JSON-RPC answer under way: written as a 200 with the request's CORS lines."""

    answer: asyncio.Future[bytes | None]
    keep_alive: bool
    cors: bytes  # the answer's own head lines: CORS, X-Request-Id
    gzip: bool = False  # the client accepts gzip: a large answer is sent gzipped


class AwaitedReply(NamedTuple):
    """A whole response made elsewhere (any status and content type), under way."""

    answer: asyncio.Future[bytes]
    keep_alive: bool
    cors: bytes  # for the JSON-RPC error written if it never completes


class Ready(NamedTuple):
    """A response ready, waiting for the answers before it."""

    data: bytes
    keep_alive: bool


Pending = Awaited | AwaitedReply | Ready
PendingQueue = collections.deque[Pending]


def pop_ready(queue: PendingQueue) -> Iterator[Pending]:
    """The entries at the front of ``queue`` that can be written now, each popped as it is
    given: up to the first answer still under way."""
    while queue:
        entry = queue[0]
        if not isinstance(entry, Ready) and not entry.answer.done():
            return
        queue.popleft()
        yield entry


def outcome(answer: asyncio.Future[bytes] | asyncio.Future[bytes | None]) -> bytes | None:
    """The body of a completed answer (b"" for a notification's: nothing owed, as when
    answered at once); None when it failed or was cancelled, which is still answered
    (``INTERNAL_ERROR``): on a pipelined connection the answers that follow would
    otherwise each land on the request before their own."""
    if answer.cancelled():
        return None
    exc = answer.exception()
    if exc is not None:
        log.error("request failed", exc_info=exc)
        return None
    result = answer.result()
    return b"" if result is None else result


def replies_under_way(queue: PendingQueue) -> int:
    return sum(1 for e in queue if isinstance(e, AwaitedReply))


def cancel_all(queue: PendingQueue) -> None:
    """Cancel every answer under way and forget them all (the connection is gone)."""
    for entry in queue:
        if not isinstance(entry, Ready):
            entry.answer.cancel()
    queue.clear()
