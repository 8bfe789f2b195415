"""Keep-alive HTTP/1.1 connections to one upstream: an asyncio Protocol over httptools'
response parser (as the front door is built), and the bounded pool of them.

Why not aiohttp here: its client costs 155-216 µs of CPU a call (``miss_overhead.py``),
twice a miss's whole budget. A request here is one ``write`` of a head built once per
upstream plus the body; its answer is framed by httptools in the transport's callback and
handed to whatever waits for it (a future, or ``rpc/forward.py``'s ``Forward``) right
there: no task, no stream reader, no header dictionary.

Answers on a connection come in request order, so waiters are paired with answers by
their place in the line (``HttpLink.sent``). A connection that breaks, times out or sends
what cannot be an answer fails every request waiting on it, pipelined ones included
(retryable ``TransportError``), and leaves the pool.

Invariant: nothing here awaits inside a transport callback; waiters are told their answer
in ``data_received`` and the link is back in the pool before they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import typing
from collections import deque

import httptools

from chainrelay.upstreams.failures import TransportError
from chainrelay.upstreams.httpwire import Target, decode, refusal

log = logging.getLogger(__name__)


class Waiter(typing.Protocol):
    """What waits for one answer: an asyncio future, or an object that acts on the answer
    where it is read (``rpc/forward.py``'s ``Forward``)."""

    def done(self) -> bool: ...

    def set_result(self, result: bytes, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class Sent:
    """A request written on a link, waiting for its answer: who waits, by when (loop
    time), the try's whole time (for the timeout's message), and whether it is a batch
    (a non-200 answer then refuses the batch)."""

    __slots__ = ("batch", "budget", "deadline", "waiter")

    def __init__(self, waiter: Waiter, deadline: float, budget: float, batch: bool) -> None:
        self.waiter = waiter
        self.deadline = deadline
        self.budget = budget
        self.batch = batch


def _tell(waiter: Waiter, outcome: bytes | BaseException) -> None:
    """Give ``waiter`` its outcome unless it went away (a cancelled call, a hedge lost):
    its answer, read anyway, is dropped. Nothing a waiter raises reaches the parser."""
    if waiter.done():
        return
    try:
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)
    except Exception:
        log.exception("HTTP upstream: a waiter failed on its answer")


def _behind(why: str) -> TransportError:
    """The error of a request that failed only because one before it on its connection
    did (or because the upstream said it would close after an earlier answer): retried,
    but not counted against the upstream's health, which the first one's error already is
    (one fault, one count: else a line of four would take an upstream out at once)."""
    exc = TransportError(why)
    exc.counts = False
    return exc


class HttpLink(asyncio.Protocol):
    """One keep-alive connection of a ``LinkPool``."""

    def __init__(self, pool: LinkPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # Requests written and not yet answered, oldest first: the answer being read is
        # the first one's.
        self.sent: deque[Sent] = deque()
        self.closed = False
        # Answered keep-alive over HTTP/1.1 at least once: requests may be pipelined on it.
        self.proven = False
        # Loop time it last became idle (nothing sent unanswered).
        self.idle_since = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # The answer being read.
        self._reading = False
        self._head_done = False
        self._framed = False  # by Content-Length or chunks: else it ends with the connection
        self._size = 0
        self._body: list[bytes] = []
        self._encoding = b""
        self._retry_after: bytes | None = None
        # Why the link broke, for the request being answered (the others: "connection closed").
        self._failure: TransportError | None = None

    # --- what the pool asks ---------------------------------------------------------------
    def send(self, data: bytes, sent: Sent) -> None:
        """Write a request (``httpwire.frame``); its answer goes to ``sent.waiter``."""
        transport = self.transport
        assert transport is not None and not self.closed
        self.sent.append(sent)
        transport.write(data)
        if self._timer is None or sent.deadline < self._timer_at:
            self._arm(sent.deadline)

    def close(self, why: str = "connection closed") -> None:
        """Close now: every request waiting on the link fails (the first with ``why``)."""
        if not self.closed:
            self._failure = self._failure or TransportError(why)
            self._lost(dropped=False)
        if self.transport is not None:
            self.transport.abort()

    # --- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.close("upgrade answered to a POST")
        except httptools.HttpParserError as exc:
            self.close(f"not an HTTP answer: {exc}")

    def eof_received(self) -> bool | None:
        self._until_eof()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._until_eof()
            if exc is not None and self._failure is None:
                self._failure = TransportError(f"connection lost: {exc}")
            self._lost(dropped=True)

    # --- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if not self.sent:
            raise TransportError("an answer to no request")
        self._reading = True
        self._head_done = False
        self._framed = False
        self._size = 0
        self._body = []
        self._encoding = b""
        self._retry_after = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self._size += len(name) + len(value)
        if self._size > self.pool.max_answer_bytes:
            self._too_large()
        n = len(name)
        # Only these few change what is made of the answer; most headers are skipped on
        # their length alone.
        if n == 16 and name.lower() == b"content-encoding":
            self._encoding = value
        elif n == 11 and name.lower() == b"retry-after":
            self._retry_after = value
        elif (n == 14 and name.lower() == b"content-length") or (
            n == 17 and name.lower() == b"transfer-encoding"
        ):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._head_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.pool.max_answer_bytes:
            self._too_large()
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._reading = False
        keep = self.parser.should_keep_alive()
        if keep and not self.proven and self.parser.get_http_version() == "1.1":
            self.proven = True
        self._answered(self.parser.get_status_code(), keep)
        if not keep:
            # "Connection: close" (or HTTP/1.0): the upstream reads nothing more; requests
            # pipelined behind this one were never read, so are safely asked again.
            self._failure = _behind("the upstream closed the connection after an answer")
            self.close()

    # --- inside ------------------------------------------------------------------------------
    def _answered(self, status: int, keep: bool) -> None:
        """Hand the answer just read to the oldest request's waiter; ``keep``: the link
        stays open (back in the pool first, so the waiter may send on it at once)."""
        sent = self.sent.popleft()
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        outcome: bytes | BaseException
        try:
            if self._encoding:
                body = decode(body, self._encoding, self.pool.max_answer_bytes)
            refused = refusal(status, self._retry_after, body, sent.batch)
            outcome = body if refused is None else refused
        except TransportError as exc:
            outcome = exc
        if keep:
            if not self.sent:
                self.idle_since = self.loop.time()
                idle_until = self.idle_since + self.pool.keepalive
                if self._timer is None or self._timer_at > idle_until:
                    self._arm(idle_until)
            self.pool.released(self)
        _tell(sent.waiter, outcome)

    def _until_eof(self) -> None:
        """An answer framed by neither Content-Length nor chunks ends with the connection."""
        if self._reading and self._head_done and not self._framed and self.sent:
            self._reading = False
            self._answered(self.parser.get_status_code(), False)

    def _too_large(self) -> None:
        limit = self.pool.max_answer_bytes
        self._failure = TransportError(f"answer over {limit} bytes", malformed=True)
        raise self._failure  # stops the parser (data_received closes the link)

    def _lost(self, dropped: bool) -> None:
        """The link is gone: out of the pool, and every request on it failed. ``dropped``:
        by the upstream (or the network), not by this node."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        first = self._failure or TransportError("connection closed")
        sent, self.sent = self.sent, deque()
        self._body = []
        self.pool.lost(self, len(sent) if dropped else 0)
        for i, s in enumerate(sent):
            _tell(s.waiter, first if i == 0 else _behind("connection closed"))

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._tick)

    def _tick(self) -> None:
        """One timer per link serves every deadline and the keep-alive: armed for the
        earliest deadline when a request is sent before it, and re-armed here (not on each
        answer), so a call costs no timer of its own."""
        self._timer = None
        now = self.loop.time()
        if self.sent:
            first = min(s.deadline for s in self.sent)
            if first > now:
                self._arm(first)
                return
            # An answer cannot be skipped on a connection: the link goes, and with it the
            # requests in its line (asked again elsewhere).
            sent, self.sent = self.sent, deque()
            self.close("timed out")
            for s in sent:
                _tell(
                    s.waiter,
                    TransportError(f"timed out after {s.budget:g}s", timeout=True)
                    if s.deadline <= now
                    else _behind("connection closed: a request before it timed out"),
                )
            return
        idle_until = self.idle_since + self.pool.keepalive
        if idle_until <= now:
            self.close("idle")
        else:
            self._arm(idle_until)


class LinkPool:
    """The keep-alive connections to one upstream: at most ``size``, each answering up to
    ``depth`` requests pipelined, each closed once idle for ``keepalive`` seconds.

    A request takes, in order: an idle connection (the one idle the shortest time, so the
    extra ones of a burst age out); a new one while under ``size``; a place in the line
    of a connection that has proven it keeps alive over HTTP/1.1, while under ``depth``
    (``pipelined``); else it waits for one of these within its deadline. New connections
    come before pipelining: an answer pipelined behind a slow one (a large eth_getLogs)
    waits for it, and a connection's handshake is paid once per keep-alive period.
    """

    def __init__(
        self,
        target: Target,
        *,
        size: int,
        depth: int,
        keepalive: float,
        max_answer_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.target = target
        self.size = size
        self.depth = depth
        self.keepalive = keepalive
        self.max_answer_bytes = max_answer_bytes
        self.ssl = ssl_context
        # Kept: asking asyncio for the running loop costs a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        self.links: set[HttpLink] = set()
        self.idle: list[HttpLink] = []  # the most recently idle last
        self.opening = 0
        # Callers waiting for room (a link free, or room to open one), oldest first.
        self._room: deque[asyncio.Future[None]] = deque()
        # Off for good once a connection dropped requests pipelined on it: that upstream
        # (or a proxy before it) does not take pipelining well.
        self.pipelining = depth > 1
        self.stopped = False

    def ready(self, pipelined: bool) -> HttpLink | None:
        """A link that takes a request now, with no wait: idle, or (``pipelined`` allowed)
        with room in its line when no more connections may be opened. None otherwise."""
        idle = self.idle
        while idle:
            link = idle.pop()
            if not link.closed:
                return link
        if (
            pipelined
            and self.pipelining
            and len(self.links) + self.opening >= self.size
            and not self.stopped
        ):
            best: HttpLink | None = None
            for link in self.links:
                if link.proven and len(link.sent) < self.depth and not link.closed:
                    if best is None or len(link.sent) < len(best.sent):
                        best = link
            return best
        return None

    async def acquire(self, pipelined: bool, deadline: float, budget: float) -> HttpLink:
        """A link to send on by ``deadline`` (loop time): ``ready``'s, a new one, or the
        first to have room. Raises ``TransportError`` (timeout, connect refused, TLS)."""
        while True:
            if self.stopped:
                raise TransportError("upstream stopped")
            link = self.ready(pipelined)
            if link is not None:
                return link
            if len(self.links) + self.opening < self.size:
                return await self._open(deadline, budget)
            room = self.loop.create_future()
            self._room.append(room)
            try:
                async with asyncio.timeout_at(deadline):
                    await room
            except TimeoutError:
                raise TransportError(f"timed out after {budget:g}s", timeout=True) from None
            finally:
                if not room.done():
                    room.cancel()
                with contextlib.suppress(ValueError):
                    self._room.remove(room)

    async def _open(self, deadline: float, budget: float) -> HttpLink:
        t = self.target
        self.opening += 1
        opened = False
        try:
            async with asyncio.timeout_at(deadline):
                _, link = await self.loop.create_connection(
                    lambda: HttpLink(self),
                    t.host,
                    t.port,
                    ssl=self.ssl,
                    server_hostname=t.host if self.ssl is not None else None,
                )
            opened = True
        except TimeoutError:
            raise TransportError(f"timed out after {budget:g}s", timeout=True) from None
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"connect: {exc}") from None
        finally:
            self.opening -= 1
            if not opened:
                self._wake()  # the room it held is free again (failed, or cancelled)
        if self.stopped:
            link.close("upstream stopped")
            raise TransportError("upstream stopped")
        self.links.add(link)
        return link

    def released(self, link: HttpLink) -> None:
        """``link`` answered a request: idle again, or with room in its line (for as many
        waiters as it has room: a proven link takes a whole line at once)."""
        if not link.sent:
            self.idle.append(link)
        if self._room:
            if link.proven and self.pipelining:
                self._wake(self.depth - len(link.sent))
            elif not link.sent:
                self._wake()

    def lost(self, link: HttpLink, dropped: int) -> None:
        """``link`` is closed: forgotten, and room to open another. ``dropped``: requests
        it still had unanswered when the upstream closed it."""
        if dropped > 1 and self.pipelining:
            # Requests pipelined on it went unanswered: maybe the upstream's doing (or a
            # proxy's before it), maybe a restart; pipelining is not worth another such loss.
            log.info(
                "HTTP upstream %s: pipelined requests dropped; no more pipelining", self.target.host
            )
            self.pipelining = False
        self.links.discard(link)
        with contextlib.suppress(ValueError):
            self.idle.remove(link)
        self._wake()

    def _wake(self, n: int = 1) -> None:
        """Let the ``n`` oldest callers waiting for room look again."""
        room = self._room
        while room and n > 0:
            fut = room.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def close(self) -> None:
        """Close every connection (requests on them fail); no new ones."""
        self.stopped = True
        for link in list(self.links):
            link.close("upstream stopped")
        self.idle.clear()
        for fut in self._room:
            if not fut.done():
                fut.set_result(None)
