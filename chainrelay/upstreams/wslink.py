"""An upstream over WebSocket: one connection driven through websockets' sans-I/O client in
the transport's own callbacks (``WsLink``), and the upstream that pairs calls with answers
and follows subscriptions over it (``WsUpstream``)."""

from __future__ import annotations

import asyncio
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
from chainrelay.upstreams.batching import BatchCall, encode_batch
from chainrelay.upstreams.failures import TransportError
from chainrelay.upstreams.httplink import Waiter
from chainrelay.upstreams.upstream import Upstream
from chainrelay.wire import wsframes
from chainrelay.wire.jsonrpc import Params, encode_request, parse_answer

log = logging.getLogger(__name__)

# Random bytes drawn at once for client frame masks: a thousand frames per system call.
WS_MASK_POOL = 4096
_ANSWER_PREFIX = b'{"jsonrpc":"2.0","id":'
_ANSWER_PREFIX_LEN = len(_ANSWER_PREFIX)
# Told of each subscription notification: (subscription id, its result).
Notify = Callable[[str, Any], None]


# Calls that belong to the connection of the subscriptions they name.
_FIRST_ONLY = frozenset(("eth_subscribe", "eth_unsubscribe"))


def _answer_id(raw: bytes) -> int | None:
    """The id of an answer that opens with ``_ANSWER_PREFIX`` and a number (nearly every
    answer), read without decoding it; None otherwise."""
    if not raw.startswith(_ANSWER_PREFIX):
        return None
    end = raw.find(b",", _ANSWER_PREFIX_LEN, _ANSWER_PREFIX_LEN + 24)
    token = raw[_ANSWER_PREFIX_LEN:end] if end > 0 else b""
    return int(token) if token.isdigit() else None


def _copy(buf: bytes | bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` in one copy at most. A read's own bytes are sliced once
    (not at all when the frame is the whole read: the usual small answer). A message that
    came over several reads is gathered in a bytearray, whose slice and then its bytes
    would be two copies: for a block's 2.4 MB of receipts taken again and again in a loop
    on a 2-CPU VM, a median of 2.2 ms against 0.05 ms for one (two buffers that size make
    malloc give pages back and fault them in again). The view is released before ``buf``
    may be resized."""
    if isinstance(buf, bytes):
        return buf[start:end]
    with memoryview(buf) as view:
        return bytes(view[start:end])


def _fail_all(pending: dict[int, Waiter]) -> None:
    """Fail every call under way in ``pending`` (its connection is gone), and forget them."""
    waiting = list(pending.values())
    pending.clear()
    for fut in waiting:
        if not fut.done():
            fut.set_exception(TransportError("connection closed"))


class WsLink(asyncio.Protocol):
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
        on_lost: Callable[[WsLink], None],
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
                    self._on_message(_copy(buf, start, end))
                    pos = end
                    continue
                self._receive(_copy(buf, pos, end))
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


class _Lane:
    """A connection of a WebSocket upstream beside its first, for single calls only (no
    subscriptions, no batches): its link once open, and its own table of calls under way
    (failed with it alone when it is lost)."""

    __slots__ = ("link", "pending")

    def __init__(self) -> None:
        self.link: WsLink | None = None
        self.pending: dict[int, Waiter] = {}


class WsUpstream(Upstream):
    """A WebSocket upstream: requests multiplexed by id over connections reconnected on
    demand; ``subscribe_heads`` uses ``eth_subscribe("newHeads")``.

    The first connection carries the subscriptions and the batches, and single calls when
    it is idle. A single call sent while it is busy goes to the connection with the fewest
    calls under way, and one more is opened beside them, in the background, up to
    ``lanes`` in all (``WS_LANES``): a node may serve one connection's calls with less
    parallelism than separate ones, and one connection carries its answers in order, so a
    block's megabytes of receipts would hold up every call behind them."""

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
        lanes: int = defaults.WS_LANES,
    ) -> None:
        super().__init__(name, url, timeout=timeout, connections=connections, via=via)
        self._uri = parse_uri(url)
        self.ping_interval = ping_interval
        self.max_message_bytes = max_message_bytes
        self.lanes = max(1, lanes)
        self._link: WsLink | None = None
        # The connections beside the first (``_Lane``), those being opened, and when one
        # may be tried again after an attempt failed (loop time).
        self._extra: list[_Lane] = []
        self._opening: set[asyncio.Task[None]] = set()
        self._lanes_after = 0.0
        self._stopped = False
        self._ids = itertools.count(1)
        self._pending: dict[int, Waiter] = {}
        self._subs: dict[str, Callable[[Any], None]] = {}
        # eth_subscribe calls under way, by request id: the subscription is registered as
        # its answer is read, so a notification in the same read is not lost.
        self._sub_calls: dict[int, Callable[[Any], None]] = {}
        # eth_unsubscribe calls of head streams given up (a fallback back to its slow head
        # checks), held until answered.
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        # (deadline, id, its connection's table) of calls in the order sent: with one
        # timeout for all, that is deadline order, so one timer, armed for the oldest,
        # serves every call.
        self._deadlines: deque[tuple[float, int, dict[int, Waiter]]] = deque()
        self._expiry: asyncio.TimerHandle | None = None
        # First ids of the batches under way (``call_batch``), oldest first: an error
        # object with a null id is a batch's refusal, and goes to the oldest one.
        self._batches: deque[int] = deque()

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered, ``send_now``'s included: the links' own tables."""
        n = len(self._pending)
        for lane in self._extra:
            n += len(lane.pending)
        return n

    async def start(self) -> None:
        self._stopped = False  # connects on first use

    async def stop(self) -> None:
        self._stopped = True
        for task in (*self._unsubscribing, *self._opening):
            task.cancel()
        link = self._link
        if link is not None:
            link.close()
            self._lost(link)
        self._close_lanes()  # when the first was not open
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _pick(self) -> tuple[WsLink, dict[int, Waiter]] | None:
        """The open connection that takes a single call now, with its table: the first
        when idle, else the one with the fewest calls under way (one more is opened when
        every one is busy and fewer than ``lanes`` are open). None: none is open and
        writable."""
        link = self._link
        table = self._pending
        if link is not None and link._writable is None:
            if not table:
                return link, table
            fewest = len(table)
        else:
            link, fewest = None, 1 << 62
        for lane in self._extra:
            n = len(lane.pending)
            if n < fewest and lane.link is not None and lane.link._writable is None:
                link, table, fewest = lane.link, lane.pending, n
                if not n:
                    return link, table
        if (
            len(self._extra) + len(self._opening) + 1 < self.lanes
            and self._link is not None
            and not self._stopped
            and self._link.loop.time() >= self._lanes_after
        ):
            task = self._link.loop.create_task(self._add_lane())
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)
        return None if link is None else (link, table)

    async def _add_lane(self) -> None:
        """Open one more connection for single calls; on failure, none is tried again for
        ``WS_LANE_RETRY`` seconds (the calls go on over those open)."""
        lane = _Lane()
        table = lane.pending
        try:
            async with asyncio.timeout(self.timeout):
                link = await self._connect(
                    lambda raw: self._answered_on(raw, table), lambda _: self._lane_lost(lane)
                )
        except Exception as exc:  # refused, timed out, a handshake refused: all alike
            log.debug("upstream %s: another connection: %s", self.name, exc)
            self._lanes_after = asyncio.get_running_loop().time() + defaults.WS_LANE_RETRY
            return
        if self._stopped:
            link.close()
            return
        lane.link = link
        self._extra.append(lane)

    def _close_lanes(self) -> None:
        """Close the connections beside the first, failing their calls under way."""
        for lane in list(self._extra):
            self._lane_lost(lane)
            if lane.link is not None:
                lane.link.close()

    def _lane_lost(self, lane: _Lane) -> None:
        if lane in self._extra:
            self._extra.remove(lane)
        _fail_all(lane.pending)

    async def _connection(self) -> WsLink:
        link = self._link
        if link is not None:
            return link
        async with self._lock:
            if self._link is None:
                async with asyncio.timeout(self.timeout):
                    self._link = await self._connect()
        return self._link

    async def _connect(
        self,
        on_message: Callable[[bytes], None] | None = None,
        on_lost: Callable[[WsLink], None] | None = None,
    ) -> WsLink:
        """A new connection, open: the first's (``_message``, ``_lost``) unless told."""
        uri = self._uri
        loop = asyncio.get_running_loop()
        link = WsLink(
            uri,
            on_message or self._message,
            on_lost or self._lost,
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

    def _lost(self, link: WsLink) -> None:
        """The first connection is gone: its calls fail, its subscriptions break, and the
        connections beside it are closed with it (the node may be gone: a call retried
        must not find one of them still open, about to be lost too). Calls reconnect the
        first; the others are opened again as calls overlap."""
        if link is not self._link:
            return
        self._link = None
        _fail_all(self._pending)  # the same dict: calls under way still hold it
        subs, self._subs = self._subs, {}
        for cb in subs.values():
            cb(None)  # None tells a subscriber its stream broke
        self._close_lanes()

    def _answered_on(self, raw: bytes, table: dict[int, Waiter]) -> None:
        """A message on a connection beside the first: only answers to single calls."""
        rid = _answer_id(raw)
        if rid is None:
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return
            rid = doc.get("id") if isinstance(doc, dict) else None
            if not isinstance(rid, int):
                return
        fut = table.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(raw)

    def _message(self, raw: bytes) -> None:
        # Answers nearly always open with this prefix: their id is read without decoding
        # the message (the caller decodes it once, in parse_answer).
        rid = _answer_id(raw)
        if rid is not None:
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
        picked = None if subscriber is not None or method in _FIRST_ONLY else self._pick()
        if picked is None:
            link, pending = self._link or await self._connection(), self._pending
        else:
            link, pending = picked
        await link.writable()
        rid = next(self._ids)
        if subscriber is not None:
            self._sub_calls[rid] = subscriber
        loop = link.loop
        fut: asyncio.Future[bytes] = loop.create_future()
        pending[rid] = fut
        self._due(loop, rid, pending)
        try:
            link.send(encode_request(rid, method, params))
            return await fut
        finally:
            pending.pop(rid, None)
            if subscriber is not None:
                self._sub_calls.pop(rid, None)
            self.prune()

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
        self._due(loop, first, pending)
        self._batches.append(first)
        try:
            link.send(encode_batch(first, calls))
            return await fut, first
        finally:
            self._batches.remove(first)
            for rid in ids:
                pending.pop(rid, None)
            self.prune()

    def send_now(self, head: bytes, tail: bytes, waiter: Waiter) -> bool:
        """Send one call at once on the open link: the request ``head`` + an id of this
        link's + ``tail``. ``waiter`` is given its raw answer, or a ``TransportError`` on
        timeout or connection loss, from the callback where that is learnt (no hop through
        the event loop). False when the call cannot be sent without waiting (no link yet,
        or its buffer full): ``call`` then.

        For callers that measure the answer themselves (``answered``, ``failed``): no
        task, no decoding."""
        picked = self._pick()
        if picked is None:
            return False
        link, pending = picked
        rid = next(self._ids)
        loop = link.loop
        try:
            link.send(b"%b%d%b" % (head, rid, tail))
        except TransportError:
            return False
        pending[rid] = waiter
        self._due(loop, rid, pending)
        self.calls += 1
        budget = self.route.budget
        if budget.bounded:
            budget.spend(time.perf_counter())
        return True

    def _due(self, loop: asyncio.AbstractEventLoop, rid: int, table: dict[int, Waiter]) -> None:
        """Give call ``rid`` of ``table`` its deadline; the one timer is armed if idle."""
        deadlines = self._deadlines
        deadlines.append((loop.time() + self.timeout, rid, table))
        if self._expiry is None:
            self._expiry = loop.call_at(deadlines[0][0], self._expire)

    def prune(self) -> None:
        """Drop the deadlines of answered calls at the head of the line (``send_now``'s
        callers, once their answer arrived): bounds the line by the calls under way."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in deadlines[0][2]:
            deadlines.popleft()

    def _expire(self) -> None:
        """Fail the calls past their deadline; re-arm for the oldest one left."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        while deadlines:
            at, rid, pending = deadlines[0]
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
        except asyncio.CancelledError:
            self._given_up(deliver)  # cancelled as it was answered: registered all the same
            raise
        self.answered(time.perf_counter() - started, answer.error is not None)
        if answer.error is not None or not isinstance(answer.value, str):
            raise TransportError(f"eth_subscribe refused: {answer.error!r}")
        if self._subs.get(answer.value) is not deliver:
            raise TransportError("newHeads stream closed")  # lost as it was answered
        try:
            await broken.wait()
        finally:
            self._given_up(deliver)
        raise TransportError("newHeads stream closed")

    def _given_up(self, deliver: Callable[[Any], None]) -> None:
        """The head stream that delivers to ``deliver`` is over: forgotten, and, when it was
        given up rather than lost with its link (``_lost`` forgets every stream first), the
        node told to stop sending (a provider bills every header it pushes), after this
        task's own end."""
        for sub_id in [k for k, cb in self._subs.items() if cb is deliver]:
            del self._subs[sub_id]
            if self._link is not None and not self._link.closed:
                task = asyncio.get_running_loop().create_task(self._unsubscribe(sub_id))
                self._unsubscribing.add(task)
                task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, sub_id: str) -> None:
        with contextlib.suppress(TransportError):
            await self.call("eth_unsubscribe", [sub_id])
