"""One upstream JSON-RPC endpoint (HTTP or WebSocket) and what we measure of it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import os
import ssl
import time
import typing
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import WebSocketURI, parse_uri

from chainrelay import defaults
from chainrelay.config import PoolConfig, UpstreamConfig
from chainrelay.rpc.policy import RULES, Kind
from chainrelay.server.peer import current_via
from chainrelay.slices import parse_large_answer
from chainrelay.upstreams import httpwire
from chainrelay.upstreams.batching import BatchCall, NotABatchAnswer, encode_batch, parse_batch
from chainrelay.upstreams.budget import Budget
from chainrelay.upstreams.capabilities import Capabilities
from chainrelay.upstreams.failures import BatchUnsupported, TransportError
from chainrelay.upstreams.httplink import LinkPool, Sent, Waiter
from chainrelay.upstreams.route import ROLES, Route
from chainrelay.wire import wsframes
from chainrelay.wire.jsonrpc import Answer, Params, encode_request, parse_answer

log = logging.getLogger(__name__)

# Latencies kept per upstream for the hedging quantile: enough for a stable p95.
LATENCY_SAMPLES = 256
# Random bytes drawn at once for client frame masks: a thousand frames per system call.
WS_MASK_POOL = 4096
_ANSWER_PREFIX = b'{"jsonrpc":"2.0","id":'
_ANSWER_PREFIX_LEN = len(_ANSWER_PREFIX)


# An answer this large (a full block, a block's receipts: 5-13 ms of orjson.loads for 2 MB)
# is decoded piecewise, in slices of the event loop (``slices.parse_large_answer``); a batch's
# in a turn of its own, not in the turn that read its last bytes.
LARGE_ANSWER_BYTES = defaults.LARGE_ANSWER_BYTES


Notify = Callable[[str, Any], None]
# Told of every call an upstream made: (outcome "ok" | "error" | "transport_error", seconds).
Observer = Callable[[str, float], None]


class Upstream:
    """A JSON-RPC endpoint. ``call`` returns the node's answer or raises ``TransportError``."""

    def __init__(
        self, name: str, url: str, *, timeout: float, connections: int, via: str = ""
    ) -> None:
        """``via``: this node's entry in the Via header of its HTTP upstream requests ("":
        none); a default header of the session ``start`` opens."""
        self.name = name
        self.url = url
        self.timeout = timeout
        self.connections = connections
        # Measured state, read by the pool.
        self.latest = -1
        self.latency = 0.0  # EWMA, seconds
        self.samples: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.consecutive_errors = 0
        self.healthy = True
        # perf_counter time until which the upstream asked not to be called (a 429's
        # Retry-After): tried after the others, and not waited for past a call's deadline.
        self.slow_until = 0.0
        self.calls = 0
        self.errors = 0
        self.chain_id: int | None = None
        # Set by the pool so that every call counts, the head tracker's included.
        self.observer: Observer | None = None
        self.via = via
        # Role, weight, budget and capabilities (the pool's, from the [[upstreams]] entry):
        # every call sent spends from its budget, whoever sends it.
        self.route = Route()
        # Headers sent with every request (HTTP) or the WebSocket handshake: a provider's
        # key or basic auth ([[upstreams]] headers, auth; ``make_upstream``).
        self.headers: dict[str, str] = {}
        self._in_flight = 0
        self._gate: asyncio.Semaphore | None = None  # max_concurrency's slots, made on use

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered (for ``max_concurrency``)."""
        return self._in_flight

    @property
    def is_ws(self) -> bool:
        return self.url.startswith(("ws://", "wss://"))

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def request(self, body: bytes) -> bytes:
        raise NotImplementedError

    async def _roundtrip(self, method: str, params: Params | None) -> bytes:
        """The raw answer to one call, within ``self.timeout``. HTTP and WebSocket override
        it to bound the wait with a timer they keep anyway (one per HTTP connection, one
        expiry timer for all WebSocket calls), cheaper than an ``asyncio.timeout`` per call."""
        async with asyncio.timeout(self.timeout):
            return await self.request(encode_request(1, method, params))

    async def _roundtrip_within(self, method: str, params: Params | None, timeout: float) -> bytes:
        """``_roundtrip`` cut short to ``timeout`` (below ``self.timeout``): the last try of
        a call whose deadline is near, or a probe."""
        async with asyncio.timeout(timeout):
            return await self._roundtrip(method, params)

    async def call(
        self, method: str, params: Params | None, *, timeout: float | None = None
    ) -> Answer:
        """One call, timed and measured, within ``self.timeout`` or ``timeout`` when that is
        shorter (what is left of a call's deadline). Raises ``TransportError``."""
        self.calls += 1
        started = time.perf_counter()
        self.route.budget.spend(started)
        if timeout is None or timeout >= self.timeout:
            timeout = None
        self._in_flight += 1
        slot = None
        try:
            if self.route.budget.concurrency:
                slot, timeout = await self._slot(started, timeout)
            if timeout is None:
                raw = await self._roundtrip(method, params)
            else:
                raw = await self._roundtrip_within(method, params, timeout)
            try:
                if len(raw) > LARGE_ANSWER_BYTES:
                    answer = await parse_large_answer(raw)  # see LARGE_ANSWER_BYTES
                else:
                    answer = parse_answer(raw)
            except ValueError as exc:
                self.errors += 1
                raise TransportError(f"malformed answer: {exc}", malformed=True) from None
        except TimeoutError:
            raise self._timed_out(started, timeout) from None
        except TransportError as exc:
            self._try_failed(exc, started)
            raise
        finally:
            self._in_flight -= 1
            if slot is not None:
                slot.release()
        self.answered(time.perf_counter() - started, answer.error is not None)
        return answer

    async def _slot(
        self, started: float, timeout: float | None
    ) -> tuple[asyncio.Semaphore, float | None]:
        """One of the upstream's ``max_concurrency`` slots, waited for (every caller's
        calls, the head tracker's too, keep to it; the pool routes around a full one
        first), and what is left of the try's time once it is had. Raises
        ``TransportError`` (not counted against health) when none frees in that time."""
        gate = self._gate
        if gate is None:
            gate = self._gate = asyncio.Semaphore(self.route.budget.concurrency)
        bound = self.timeout if timeout is None else timeout
        if gate.locked():
            try:
                async with asyncio.timeout(bound):
                    await gate.acquire()
            except TimeoutError:
                busy = TransportError("no call slot free in time", timeout=True)
                busy.counts = False
                raise busy from None
            return gate, bound - (time.perf_counter() - started)
        await gate.acquire()  # free: taken at once
        return gate, timeout

    async def call_batch(
        self, calls: Sequence[BatchCall], *, timeout: float | None = None
    ) -> list[Answer]:
        """``calls`` as one JSON-RPC batch: their answers, in order, within
        ``self.timeout`` or ``timeout`` when shorter (as ``call``). Raises
        ``BatchUnsupported`` when the upstream does not answer the batch as one, and
        ``TransportError`` as ``call`` does.

        Counted as one call of the upstream; its time is not a latency sample (a batch is
        slower than the call the hedging quantile is about)."""
        self.calls += 1
        started = time.perf_counter()
        self.route.budget.spend(started, len(calls))
        if timeout is None or timeout >= self.timeout:
            timeout = None
        self._in_flight += 1
        slot = None
        try:
            if self.route.budget.concurrency:
                slot, timeout = await self._slot(started, timeout)
            if timeout is None:
                raw, first_id = await self._batch_roundtrip(calls)
            else:
                async with asyncio.timeout(timeout):
                    raw, first_id = await self._batch_roundtrip(calls)
            if len(raw) > LARGE_ANSWER_BYTES:
                await asyncio.sleep(0)  # see LARGE_ANSWER_BYTES
            try:
                answers = parse_batch(raw, first_id, len(calls))
            except NotABatchAnswer as exc:
                raise BatchUnsupported(f"batch of {len(calls)} refused: {exc}") from None
        except TimeoutError:
            raise self._timed_out(started, timeout) from None
        except TransportError as exc:
            self._try_failed(exc, started)
            raise
        finally:
            self._in_flight -= 1
            if slot is not None:
                slot.release()
        self.consecutive_errors = 0
        self._observe("ok", started)
        return answers

    async def _batch_roundtrip(self, calls: Sequence[BatchCall]) -> tuple[bytes, int]:
        """The raw answer to the batch of ``calls`` within ``self.timeout``, and the id of
        its first call."""
        async with asyncio.timeout(self.timeout):
            return await self.request(encode_batch(1, calls)), 1

    def answered(self, elapsed: float, is_error: bool) -> None:
        """Measure a call the upstream answered (a JSON-RPC error is an answer too)."""
        self.samples.append(elapsed)
        a = defaults.LATENCY_EWMA_ALPHA
        self.latency = elapsed if self.latency == 0.0 else (1 - a) * self.latency + a * elapsed
        self.consecutive_errors = 0
        observer = self.observer
        if observer is not None:
            observer("error" if is_error else "ok", elapsed)

    def failed(self, exc: TransportError, elapsed: float) -> None:
        """Measure a call that got no usable answer (``exc``)."""
        if exc.counts:
            self._failed()
        else:
            self.errors += 1
        if self.observer is not None:
            self.observer("transport_error", elapsed)

    def _observe(self, outcome: str, started: float) -> None:
        if self.observer is not None:
            self.observer(outcome, time.perf_counter() - started)

    def _failed(self) -> None:
        self.errors += 1
        self.consecutive_errors += 1

    def _try_failed(self, exc: TransportError, started: float) -> None:
        """Count a try (begun at ``started``) that got no usable answer: against the
        upstream's health only when ``exc`` says so (not a 429, not a malformed answer)."""
        if exc.counts:
            self._failed()
        else:
            self.errors += 1
        self._observe("transport_error", started)

    def _timed_out(self, started: float, timeout: float | None) -> TransportError:
        """Count a try that ran out of its time (``timeout``, None: the whole per-try
        timeout) and return its error. A try cut to under half its timeout by the call's
        deadline was not a fair chance: not counted against the upstream's health."""
        waited = self.timeout if timeout is None else round(timeout, 3)
        late = TransportError(f"timed out after {waited}s", timeout=True)
        late.counts = timeout is None or 2 * timeout >= self.timeout
        self._try_failed(late, started)
        return late

    def quantile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    async def subscribe_heads(self, on_header: Callable[[dict[str, Any]], None]) -> None:
        """Follow new heads until cancelled or the stream breaks (raises ``TransportError``)."""
        raise NotImplementedError


class HttpUpstream(Upstream):
    """An HTTP(S) upstream over the node's own keep-alive connections (``httplink.py``):
    pooled, pipelined where safe, TLS from ``ssl`` with verification on.

    The request head is built once from the URL (``httpwire.target``); a call writes it
    with its Content-Length and body, and waits for its answer with no timer of its own
    (each connection keeps one for every deadline on it). A try's deadline covers the whole
    exchange, the body read included: an upstream that drips its answer a byte at a time
    is cut off all the same.

    Pipelining: only reads of the policy table's (never ``eth_sendRawTransaction``, nor a
    method it does not know, which may write). A request pipelined behind another is lost
    with it if the connection drops, and a write lost so cannot be told from a write the
    node took: a write always has a connection to itself. Batches are not pipelined
    either (a batch's answer is long to come, and everything behind it would wait).
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float,
        connections: int,
        via: str = "",
        pipeline_depth: int = defaults.HTTP_UPSTREAM_PIPELINE_DEPTH,
        keepalive: float = defaults.HTTP_UPSTREAM_KEEPALIVE,
        max_answer_bytes: int = defaults.HTTP_UPSTREAM_MAX_ANSWER_BYTES,
        accept_encoding: bool = defaults.HTTP_UPSTREAM_ACCEPT_ENCODING,
        ca_file: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """``ca_file``: CA certificates (PEM) to verify an https:// upstream against
        instead of the system's. ``headers``: sent with every request (a provider's key,
        basic auth: ``[[upstreams]] headers``, ``auth``)."""
        super().__init__(name, url, timeout=timeout, connections=connections, via=via)
        self.headers = dict(headers or {})
        self.target = httpwire.target(
            url, via=via, accept_encoding=accept_encoding, headers=self.headers
        )
        self.pipeline_depth = pipeline_depth
        self.keepalive = keepalive
        self.max_answer_bytes = max_answer_bytes
        self.ca_file = ca_file
        self._links: LinkPool | None = None

    async def start(self) -> None:
        context = None
        if self.target.secure:
            # Made once: a context costs milliseconds (the CA store read and parsed).
            context = ssl.create_default_context(cafile=self.ca_file or None)
        self._links = LinkPool(
            self.target,
            size=self.connections,
            depth=self.pipeline_depth,
            keepalive=self.keepalive,
            max_answer_bytes=self.max_answer_bytes,
            ssl_context=context,
        )

    async def stop(self) -> None:
        links, self._links = self._links, None
        if links is not None:
            links.close()

    async def _roundtrip(self, method: str, params: Params | None) -> bytes:
        return await self._post(encode_request(1, method, params), None, _pipelines(method))

    async def _roundtrip_within(self, method: str, params: Params | None, timeout: float) -> bytes:
        return await self._post(encode_request(1, method, params), timeout, _pipelines(method))

    async def request(self, body: bytes) -> bytes:
        """POST one body; the answer's bytes. Raises ``TransportError``."""
        return await self._post(body, None, False)

    def _head(self) -> bytes:
        # This node's own Via goes with every request; a request made for one another relay
        # forwarded carries that one's chain too.
        came = current_via()
        if came and self.via:
            return httpwire.relayed_head(self.target, came, self.via)
        return self.target.head

    async def _post(
        self, body: bytes, timeout: float | None, pipelined: bool, batch: bool = False
    ) -> bytes:
        """POST ``body`` within ``self.timeout``, or ``timeout`` (shorter) when given; the
        answer's body (decoded), or ``TransportError`` (``httpwire.refusal``: what a
        non-200 status means; a connection lost, a late or an oversized answer)."""
        links = self._links
        if links is None:
            raise TransportError("upstream not started")
        budget = self.timeout if timeout is None else round(timeout, 3)
        loop = links.loop
        deadline = loop.time() + budget
        link = links.ready(pipelined) or await links.acquire(pipelined, deadline, budget)
        answer: asyncio.Future[bytes] = loop.create_future()
        # Cancelled (a hedge lost, the caller gone), the future is done: its answer is
        # read when it comes and dropped (the connection cannot skip it).
        link.send(httpwire.frame(self._head(), body), Sent(answer, deadline, budget, batch))
        return await answer

    async def _batch_roundtrip(self, calls: Sequence[BatchCall]) -> tuple[bytes, int]:
        """One POST of the batch, within ``self.timeout``. An HTTP error status other than
        429 (slow down: another upstream is asked) refuses the batch."""
        return await self._post(encode_batch(1, calls), None, False, batch=True), 1

    def send_now(self, head: bytes, tail: bytes, waiter: Waiter) -> bool:
        """As ``WsUpstream.send_now``: one call sent at once on a connection that takes it
        without waiting (idle, or room in its line: ``rpc/forward.py`` sends reads of the
        policy table only, safe to pipeline), its answer handed to ``waiter`` where it is
        read. Its id is 1: answers are paired by their place on the connection. False
        when no connection takes it now (``call`` then)."""
        links = self._links
        if links is None:
            return False
        link = links.ready(True)
        if link is None:
            return False
        budget = self.timeout
        length = len(head) + 1 + len(tail)
        link.send(
            b"%b%d\r\n\r\n%b1%b" % (self._head(), length, head, tail),
            Sent(waiter, links.loop.time() + budget, budget, False),
        )
        self.calls += 1
        spent = self.route.budget
        if spent.bounded:
            spent.spend(time.perf_counter())
        return True

    def prune(self) -> None:
        """Nothing to prune: a call's deadline lives on its connection, gone with it."""


def _pipelines(method: str) -> bool:
    """Whether a call of ``method`` may be pipelined (see ``HttpUpstream``): a read the
    policy table knows."""
    rule = RULES.get(method)
    return rule is not None and rule.kind is not Kind.SEND


class _WsLink(asyncio.Protocol):
    """One WebSocket connection to an upstream, driven through websockets' sans-I/O
    ``ClientProtocol`` in the transport's own callbacks: a message costs no task, no
    queue and no lock, only a frame parsed and a frame written.

    Once open, a final text or binary frame (nearly every frame) is framed by
    ``wire.wsframes`` directly; every other frame (ping, pong, close, fragments) is handed
    whole to the protocol object, which therefore never sees a frame cut in two.

    Keep-alive: a ping goes out every ``ping_interval`` seconds; a connection that has
    sent nothing at all by the next one is dead and is aborted.
    """

    def __init__(
        self,
        uri: WebSocketURI,
        on_message: Callable[[bytes], None],
        on_lost: Callable[[_WsLink], None],
        *,
        ping_interval: float = defaults.WS_PING_INTERVAL,
        max_message: int = defaults.WS_MAX_MESSAGE_BYTES,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.proto = ClientProtocol(uri, max_size=max_message)
        self.headers = headers or {}
        self.ping_interval = ping_interval
        self.max_message = max_message
        self.transport: asyncio.Transport | None = None
        # Kept: asking asyncio for the running loop costs a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = self.loop.create_future()
        self.closed = False
        self._on_message = on_message
        self._on_lost = on_lost
        self._fragments: list[bytes] = []
        self._heard = True  # something arrived since the last ping
        self._ping: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None
        self._framing = False  # frames are split here (after the handshake)
        self._buf = bytearray()  # the start of a frame not yet complete
        self._masks = b""  # random bytes for client frame masks, used four at a time
        self._mask_at = 0

    # --- transport callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        request = self.proto.connect()
        for name, value in self.headers.items():  # a provider's key or basic auth
            request.headers[name] = value
        self.proto.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._heard = True
        if not self._framing:
            self._receive(data)
            return
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data
        pos = 0
        try:
            while (frame := wsframes.next_frame(buf, pos, self.max_message)) is not None:
                first, start, end = frame
                if (first == wsframes.FIN_TEXT or first == wsframes.FIN_BINARY) and not (
                    buf[pos + 1] & wsframes.MASK_BIT  # a server never masks
                ):
                    self._on_message(bytes(buf[start:end]))
                    pos = end
                    continue
                self._receive(bytes(buf[pos:end]))
                pos = end
        except wsframes.FrameTooLarge as exc:
            log.warning("WebSocket upstream: %s; reconnecting", exc)
            if self.transport is not None:
                self.transport.abort()
            return
        if buf is self._buf:
            del self._buf[:pos]
        elif pos < len(buf):
            self._buf = bytearray(buf[pos:])

    def _receive(self, data: bytes) -> None:
        """Bytes for websockets' protocol object: the handshake, then whole frames."""
        proto = self.proto
        proto.receive_data(data)
        for event in proto.events_received():
            if event.__class__ is Frame:
                self._frame(event)
            elif isinstance(event, Response):
                self._handshake()
        self._flush()

    def eof_received(self) -> bool | None:
        self.proto.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._ping is not None:
            self._ping.cancel()
        if not self.opened.done():
            self.opened.set_exception(TransportError(f"connect: {exc or 'connection closed'}"))
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    # --- frames ----------------------------------------------------------------------
    def _handshake(self) -> None:
        if self.opened.done():
            return
        exc = self.proto.handshake_exc
        if exc is not None:
            self.opened.set_exception(TransportError(f"connect: {exc}"))
            return
        self.opened.set_result(None)
        # From here on frames are split here, unless the protocol object holds the start of
        # one already (a server speaking first, in the handshake's own read).
        reader = getattr(self.proto, "reader", None)
        self._framing = not getattr(reader, "buffer", None)
        self._ping = self.loop.call_later(self.ping_interval, self._keepalive)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._on_message(bytes(frame.data))
            else:
                self._fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self._on_message(message)

    def _keepalive(self) -> None:
        if self.closed or self.transport is None:
            return
        if not self._heard:
            log.warning("WebSocket upstream silent for %.1fs: reconnecting", self.ping_interval)
            self.transport.abort()
            return
        self._heard = False
        with contextlib.suppress(InvalidState):
            self.proto.send_ping(b"")
            self._flush()
        self._ping = self.loop.call_later(self.ping_interval, self._keepalive)

    # --- sending ---------------------------------------------------------------------
    def send(self, body: bytes) -> None:
        """Send one text message. Raises ``TransportError`` once the connection is gone."""
        transport = self.transport
        if self.closed or transport is None or self.proto.state is not State.OPEN:
            raise TransportError("send: connection closed")
        at = self._mask_at
        if at + 4 > len(self._masks):
            # RFC 6455 asks for unpredictable masks; one read of the system's randomness
            # serves a thousand frames.
            self._masks, at = os.urandom(WS_MASK_POOL), 0
        self._mask_at = at + 4
        transport.write(wsframes.encode_text(body, self._masks[at : at + 4]))

    async def writable(self) -> None:
        """Wait while the transport's buffer is above its high-water mark."""
        if self._writable is not None:
            await asyncio.shield(self._writable)

    def close(self) -> None:
        if self.transport is None or self.closed:
            return
        with contextlib.suppress(InvalidState):
            if self.proto.state is State.OPEN:
                self.proto.send_close()
                self._flush()
        self.transport.close()

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.proto.data_to_send():
            if chunk:
                transport.write(chunk)
            else:  # websockets asks for the end of the stream with an empty chunk
                transport.close()
        if self.proto.close_expected():
            transport.close()


class WsUpstream(Upstream):
    """A WebSocket upstream: requests multiplexed by id over one connection, reconnected
    on demand; ``subscribe_heads`` uses ``eth_subscribe("newHeads")``."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float,
        connections: int,
        ping_interval: float = defaults.WS_PING_INTERVAL,
        max_message_bytes: int = defaults.WS_MAX_MESSAGE_BYTES,
        via: str = "",
    ) -> None:
        super().__init__(name, url, timeout=timeout, connections=connections, via=via)
        self._uri = parse_uri(url)
        self.ping_interval = ping_interval
        self.max_message_bytes = max_message_bytes
        self._link: _WsLink | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, Waiter] = {}
        self._subs: dict[str, Callable[[Any], None]] = {}
        # eth_subscribe calls under way, by request id: the subscription is registered as
        # its answer is read, so a notification in the same read is not lost.
        self._sub_calls: dict[int, Callable[[Any], None]] = {}
        self._lock = asyncio.Lock()
        # (deadline, id) of calls in the order sent: with one timeout for all, that is
        # deadline order, so one timer, armed for the oldest, serves every call.
        self._deadlines: deque[tuple[float, int]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        # First ids of the batches under way (``call_batch``), oldest first: an error
        # object with a null id is a batch's refusal, and goes to the oldest one.
        self._batches: deque[int] = deque()

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered, ``send_now``'s included: the link's own table."""
        return len(self._pending)

    async def start(self) -> None:
        return None  # connects on first use

    async def stop(self) -> None:
        link = self._link
        if link is not None:
            link.close()
            self._lost(link)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    async def _connection(self) -> _WsLink:
        link = self._link
        if link is not None:
            return link
        async with self._lock:
            if self._link is None:
                async with asyncio.timeout(self.timeout):
                    self._link = await self._connect()
        return self._link

    async def _connect(self) -> _WsLink:
        uri = self._uri
        loop = asyncio.get_running_loop()
        link = _WsLink(
            uri,
            self._message,
            self._lost,
            ping_interval=self.ping_interval,
            max_message=self.max_message_bytes,
            headers=self.headers,
        )
        try:
            await loop.create_connection(
                lambda: link,
                uri.host,
                uri.port,
                ssl=ssl.create_default_context() if uri.secure else None,
            )
        except OSError as exc:
            raise TransportError(f"connect: {exc}") from None
        try:
            await link.opened
        except BaseException:
            link.close()
            raise
        return link

    def _lost(self, link: _WsLink) -> None:
        if link is not self._link:
            return
        self._link = None
        pending = list(self._pending.values())
        self._pending.clear()  # the same dict: calls under way still hold it
        for fut in pending:
            if not fut.done():
                fut.set_exception(TransportError("connection closed"))
        subs, self._subs = self._subs, {}
        for cb in subs.values():
            cb(None)  # None tells a subscriber its stream broke

    def _message(self, raw: bytes) -> None:
        # Answers nearly always open with this prefix: their id is read without decoding
        # the message (the caller decodes it once, in parse_answer).
        if raw.startswith(_ANSWER_PREFIX):
            end = raw.find(b",", _ANSWER_PREFIX_LEN, _ANSWER_PREFIX_LEN + 24)
            token = raw[_ANSWER_PREFIX_LEN:end] if end > 0 else b""
            if token.isdigit():
                rid = int(token)
                fut = self._pending.pop(rid, None)
                if fut is not None:
                    if self._sub_calls:
                        self._subscribed(rid, raw)
                    if not fut.done():
                        fut.set_result(raw)
                    return
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, list):
            self._batch_answered(doc, raw)
            return
        if not isinstance(doc, dict):
            return
        if doc.get("method") == "eth_subscription":
            p = doc.get("params") or {}
            sub = p.get("subscription") if isinstance(p, dict) else None
            cb = self._subs.get(sub) if isinstance(sub, str) else None
            if cb is not None:
                cb(p.get("result"))
            return
        doc_id = doc.get("id")
        if doc_id is None and self._batches and doc.get("error") is not None:
            self._batch_refused(raw)
            return
        if not isinstance(doc_id, int):
            return
        fut = self._pending.pop(doc_id, None)
        if fut is not None and not fut.done():
            if self._sub_calls:
                self._subscribed(doc_id, raw)
            fut.set_result(raw)

    def _batch_answered(self, doc: list[Any], raw: bytes) -> None:
        """An answer to a batch (``call_batch``): every call of it waits on one future,
        given the whole array by the first id of it found here."""
        pending = self._pending
        for member in doc:
            rid = member.get("id") if isinstance(member, dict) else None
            if isinstance(rid, int):
                fut = pending.pop(rid, None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(raw)
                    return

    def _batch_refused(self, raw: bytes) -> None:
        """An error object with a null id while batches are under way: a provider without
        batches refusing one (a single call of ours is always a valid request, never
        answered so). The oldest batch still waiting takes it, and asks call by call."""
        pending = self._pending
        for first in self._batches:
            fut = pending.get(first)
            if fut is not None and not fut.done():
                fut.set_result(raw)
                return

    def _subscribed(self, rid: int, raw: bytes) -> None:
        """Register the subscription an eth_subscribe answer names, before its caller
        resumes: notifications read right after the answer find their callback."""
        cb = self._sub_calls.pop(rid, None)
        if cb is None:
            return
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(raw)
            sub_id = doc.get("result") if isinstance(doc, dict) else None
            if isinstance(sub_id, str):
                self._subs[sub_id] = cb

    async def _roundtrip(
        self,
        method: str,
        params: Params | None,
        subscriber: Callable[[Any], None] | None = None,
    ) -> bytes:
        link = self._link or await self._connection()
        await link.writable()
        rid = next(self._ids)
        if subscriber is not None:
            self._sub_calls[rid] = subscriber
        loop = link.loop
        fut: asyncio.Future[bytes] = loop.create_future()
        pending = self._pending
        pending[rid] = fut
        deadlines = self._deadlines
        deadlines.append((loop.time() + self.timeout, rid))
        if self._expiry is None:
            self._expiry = loop.call_at(deadlines[0][0], self._expire)
        try:
            link.send(encode_request(rid, method, params))
            return await fut
        finally:
            pending.pop(rid, None)
            if subscriber is not None:
                self._sub_calls.pop(rid, None)
            while deadlines and deadlines[0][1] not in pending:
                deadlines.popleft()

    async def _batch_roundtrip(self, calls: Sequence[BatchCall]) -> tuple[bytes, int]:
        """One message of the batch; the answer array comes back as one message, paired
        by any id of it (``_batch_answered``). The batch's deadline is its first id's."""
        link = self._link or await self._connection()
        await link.writable()
        n = len(calls)
        first = next(self._ids)
        for _ in range(n - 1):
            next(self._ids)  # the batch's ids: first .. first + n - 1, nothing awaited between
        ids = range(first, first + n)
        loop = link.loop
        fut: asyncio.Future[bytes] = loop.create_future()
        pending = self._pending
        for rid in ids:
            pending[rid] = fut
        deadlines = self._deadlines
        deadlines.append((loop.time() + self.timeout, first))
        if self._expiry is None:
            self._expiry = loop.call_at(deadlines[0][0], self._expire)
        self._batches.append(first)
        try:
            link.send(encode_batch(first, calls))
            return await fut, first
        finally:
            self._batches.remove(first)
            for rid in ids:
                pending.pop(rid, None)
            while deadlines and deadlines[0][1] not in pending:
                deadlines.popleft()

    def send_now(self, head: bytes, tail: bytes, waiter: Waiter) -> bool:
        """Send one call at once on the open link: the request ``head`` + an id of this
        link's + ``tail``. ``waiter`` is given its raw answer, or a ``TransportError`` on
        timeout or connection loss, from the callback where that is learnt (no hop through
        the event loop). False when the call cannot be sent without waiting (no link yet,
        or its buffer full): ``call`` then.

        For callers that measure the answer themselves (``answered``, ``failed``): no
        task, no decoding."""
        link = self._link
        if link is None or link._writable is not None:
            return False
        rid = next(self._ids)
        loop = link.loop
        try:
            link.send(b"%b%d%b" % (head, rid, tail))
        except TransportError:
            return False
        self._pending[rid] = waiter
        deadlines = self._deadlines
        deadlines.append((loop.time() + self.timeout, rid))
        if self._expiry is None:
            self._expiry = loop.call_at(deadlines[0][0], self._expire)
        self.calls += 1
        budget = self.route.budget
        if budget.bounded:
            budget.spend(time.perf_counter())
        return True

    def prune(self) -> None:
        """Drop the deadlines of answered calls at the head of the line (``send_now``'s
        callers, once their answer arrived): bounds the line by the calls under way."""
        deadlines, pending = self._deadlines, self._pending
        while deadlines and deadlines[0][1] not in pending:
            deadlines.popleft()

    def _expire(self) -> None:
        """Fail the calls past their deadline; re-arm for the oldest one left."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines, pending = self._deadlines, self._pending
        while deadlines:
            at, rid = deadlines[0]
            fut = pending.get(rid)
            if fut is not None and at > now:
                self._expiry = loop.call_at(at, self._expire)
                return
            deadlines.popleft()
            if fut is not None:
                del pending[rid]
                if not fut.done():
                    fut.set_exception(
                        TransportError(f"timed out after {self.timeout}s", timeout=True)
                    )

    async def subscribe_heads(self, on_header: Callable[[dict[str, Any]], None]) -> None:
        broken = asyncio.Event()

        def deliver(result: Any) -> None:
            if result is None:
                broken.set()
            elif isinstance(result, dict):
                on_header(result)

        # Not through ``call``: the answer's reader registers ``deliver`` under the id it
        # names before this resumes (a header may follow in the same read); measured alike.
        self.calls += 1
        started = time.perf_counter()
        try:
            try:
                raw = await self._roundtrip("eth_subscribe", ["newHeads"], deliver)
            except TimeoutError:
                raise TransportError(f"timed out after {self.timeout}s", timeout=True) from None
            try:
                answer = parse_answer(raw)
            except ValueError as exc:
                raise TransportError(f"malformed answer: {exc}", malformed=True) from None
        except TransportError as exc:
            self.failed(exc, time.perf_counter() - started)
            raise
        self.answered(time.perf_counter() - started, answer.error is not None)
        if answer.error is not None or not isinstance(answer.value, str):
            raise TransportError(f"eth_subscribe refused: {answer.error!r}")
        if self._subs.get(answer.value) is not deliver:
            raise TransportError("newHeads stream closed")  # lost as it was answered
        try:
            await broken.wait()
        finally:
            self._subs.pop(answer.value, None)
        raise TransportError("newHeads stream closed")


def make_upstream(u: UpstreamConfig, pool: PoolConfig, *, via: str = "") -> Upstream:
    """The upstream ``u`` names, over WebSocket or HTTP by its URL, with the pool's
    per-upstream settings and its own route (role, weight, budget, capabilities) and
    headers. A try never outlasts a call's whole deadline: the timeout is the shorter of
    the two (a call's later tries are cut to what is left of it)."""
    timeout = min(pool.timeout, pool.deadline)
    upstream: Upstream
    if u.url.startswith(("ws://", "wss://")):
        upstream = WsUpstream(
            u.name,
            u.url,
            timeout=timeout,
            connections=pool.connections,
            ping_interval=pool.ws_ping_interval,
            max_message_bytes=pool.ws_max_message_bytes,
            via=via,
        )
    else:
        upstream = HttpUpstream(
            u.name,
            u.url,
            timeout=timeout,
            connections=u.connections or pool.connections,
            via=via,
            pipeline_depth=pool.http_pipeline_depth,
            keepalive=pool.http_keepalive_timeout,
            max_answer_bytes=pool.http_max_answer_bytes,
            accept_encoding=pool.http_accept_encoding,
            ca_file=u.ca_file,
            headers=request_headers(u),
        )
    upstream.route = Route(
        tier=ROLES[u.role],
        weight=u.weight,
        budget=Budget(u.max_rps, u.max_concurrency, auto_tune=pool.auto_tune),
        caps=Capabilities(archive=u.archive, ttl=pool.capability_ttl),
    )
    upstream.headers = request_headers(u)
    return upstream


def request_headers(u: UpstreamConfig) -> dict[str, str]:
    """The headers ``u`` asks to send: its ``headers`` table, and ``auth`` ("user:pass")
    as HTTP basic auth (an Authorization header of the table wins, and either wins over
    the URL's userinfo)."""
    headers = dict(u.headers)
    if u.auth and not any(k.lower() == "authorization" for k in headers):
        token = base64.b64encode(u.auth.encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return headers
