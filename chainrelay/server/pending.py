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
from collections.abc import Callable, Iterator
from typing import NamedTuple

log = logging.getLogger(__name__)

INTERNAL_ERROR = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"internal error"}}'


class Owed:
    """An answer under way that is written the moment it is given: ``set_result`` (or
    ``set_exception``) calls ``on_done`` there and then, where an asyncio future would
    schedule its callbacks for the loop's next turn. For an answer given inside an
    upstream connection's read (a forwarded call's, ``rpc/forward.py``): the client's
    answer goes out in that same read, not one loop turn later. Read as a finished
    future is read (``outcome``); cancelled, it calls nothing (the connection is gone)."""

    __slots__ = ("_exception", "_on_done", "_result", "_state")

    _PENDING, _DONE, _CANCELLED = 0, 1, 2

    def __init__(self, on_done: Callable[[Owed], object]) -> None:
        self._on_done = on_done
        self._state = Owed._PENDING
        self._result: bytes | None = None
        self._exception: BaseException | None = None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (asked for only where a call is retried: it costs a getpid())."""
        return asyncio.get_running_loop()

    def done(self) -> bool:
        return self._state != Owed._PENDING

    def cancelled(self) -> bool:
        return self._state == Owed._CANCELLED

    def set_result(self, result: bytes | None, /) -> None:
        if self._state != Owed._PENDING:
            raise asyncio.InvalidStateError("answer already given")
        self._result = result
        self._state = Owed._DONE
        self._on_done(self)

    def set_exception(self, exc: BaseException, /) -> None:
        if self._state != Owed._PENDING:
            raise asyncio.InvalidStateError("answer already given")
        self._exception = exc
        self._state = Owed._DONE
        self._on_done(self)

    def cancel(self, msg: object = None) -> bool:
        if self._state != Owed._PENDING:
            return False
        self._state = Owed._CANCELLED
        return True

    def result(self) -> bytes | None:
        if self._state == Owed._CANCELLED:
            raise asyncio.CancelledError
        if self._state == Owed._PENDING:
            raise asyncio.InvalidStateError("answer not given yet")
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self) -> BaseException | None:
        if self._state == Owed._CANCELLED:
            raise asyncio.CancelledError
        if self._state == Owed._PENDING:
            raise asyncio.InvalidStateError("answer not given yet")
        return self._exception


class Awaited(NamedTuple):
    """A JSON-RPC answer under way: written as a 200 with the request's CORS lines."""

    answer: asyncio.Future[bytes | None] | Owed
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


def outcome(answer: asyncio.Future[bytes] | asyncio.Future[bytes | None] | Owed) -> bytes | None:
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
