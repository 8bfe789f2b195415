"""WebSocket JSON-RPC on the HTTP port, driven through websockets' sans-I/O ServerProtocol.

The HTTP protocol hands over the raw upgrade request; from then on this session owns the
connection's bytes. Each text or binary message is one JSON-RPC body; answers go back as
text messages, in whatever order they complete (ids pair them, as on any node).

A session may carry the subscriptions of its connection (``eth_subscribe``): while a
message is handled they are reachable through ``current_subscriptions()``, so the RPC
pipeline routes subscription calls to this connection's without knowing the transport.
Notifications go out as frames the fan-out built once for all subscribers
(``send_frames``), under the same send-buffer bound as answers.

What a session holds for its peer is bounded: a message not yet whole (``buffered``, which
the front door counts against its budget), and what is queued to send. websockets answers
every ping with a pong inside ``receive_data``, so a peer that pings and never reads would
fill the send buffer with pongs: reading stops while the transport's buffer is past its
high-water mark (``pause_reading(Paused.WRITES)``), and starts again once it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from websockets.exceptions import InvalidState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from chainrelay import defaults
from chainrelay.access.identity import NODE, Identity, enter_identity, leave_identity
from chainrelay.errors import RateLimited
from chainrelay.server.budget import Account
from chainrelay.server.phases import Paused
from chainrelay.wire.jsonrpc import Answer
from chainrelay.wire.wsframes import next_frame

log = logging.getLogger(__name__)

Handler = Callable[[bytes, Identity], bytes | Awaitable[bytes | None]]

# Close code for a reader too slow to keep up: "try again later" (RFC 6455, 1013).
CLOSE_TRY_AGAIN_LATER = 1013
SLOW_READER_REASON = "client too slow: send buffer full"
# A text message that is not UTF-8 (RFC 6455 8.1: fail the connection, 1007).
CLOSE_INVALID_DATA = 1007
# What the peer did breaks the node's rules: over its address's share of the memory budget,
# a message begun and never finished.
CLOSE_POLICY = 1008
# The payload of the pings a session sends to time its peer (``ping_rtt``): the pong of
# this payload, and only of this one, is a round trip.
RTT_PING = b"chainrelay-rtt"
# Weight of each new round trip in the smoothed one (as a feed link weighs its parent's).
RTT_WEIGHT = 0.25


class Subscriptions(Protocol):
    """The subscriptions of one WebSocket connection, as its session sees them."""

    def call(self, method: str, params: Any) -> Answer:
        """Answer eth_subscribe / eth_unsubscribe for this connection."""
        ...

    def answered(self, payload: bytes) -> None:
        """An answer was sent: subscriptions it announces may notify from now on."""
        ...

    def closed(self, slow: bool) -> None:
        """The connection is closing (``slow``: for reading too slowly): unsubscribe all."""
        ...


# The subscriptions of the connection whose message is being handled; tasks started for
# that message inherit it (asyncio copies the context into every task it creates).
_CURRENT: contextvars.ContextVar[Subscriptions | None] = contextvars.ContextVar(
    "chainrelay_ws_subscriptions", default=None
)


def current_subscriptions() -> Subscriptions | None:
    """The subscriptions of the WebSocket connection being served; None over HTTP."""
    return _CURRENT.get()


class WsSession:
    def __init__(
        self,
        transport: asyncio.Transport,
        handler: Handler,
        *,
        max_message_bytes: int = defaults.MAX_WS_MESSAGE_BYTES,
        max_send_buffer: int = defaults.MAX_WS_SEND_BUFFER,
        max_pending: int = defaults.MAX_PENDING_PER_CONNECTION,
        on_close: Callable[[], None] | None = None,
        open_subscriptions: Callable[[WsSession], Subscriptions] | None = None,
        ip: str = "",
        close_timeout: float = defaults.WS_CLOSE_TIMEOUT,
        sends: Account | None = None,
        deflate: bool = False,
        request_id: str = "",
        who: Identity = NODE,
    ) -> None:
        """``deflate``: permessage-deflate is accepted when the client offers it (client
        JSON-RPC connections with ``[server] ws_deflate``; never a feed or a push, whose
        frames are written as built). ``request_id``: the handshake answer's
        X-Request-Id."""
        self.request_id = request_id
        self.transport = transport
        # What is queued for the peer, counted against the front door's budget (None: not
        # counted here; a feed child's frames have their own bounds).
        self.sends = sends
        self.close_timeout = close_timeout
        # The client as limits see it: its identity, kept by each message's task, and the
        # name per-client counts are kept under (a feed or push session names only that).
        self.who = who
        self.ip = ip or who.name
        self.handler = handler
        self.max_send_buffer = max_send_buffer
        self.max_pending = max_pending
        self._paused = 0  # ``Paused`` bits
        # Without an extension a frame is its header and the payload as is, which
        # ``send_frames`` relies on; with permessage-deflate it sends message by message.
        # websockets bounds a compressed message by its size once inflated (max_size).
        self.proto = ServerProtocol(
            max_size=max_message_bytes,
            extensions=[ServerPerMessageDeflateFactory()] if deflate else None,
        )
        # Frame payloads as websockets hands them over (bytes-like), joined once at the end.
        self._fragments: list[bytes | bytearray | memoryview] = []
        self._fragments_len = 0
        self._text = False  # the message being reassembled is a text message
        self.messages = 0  # messages received whole: the idle sweep sees progress in it
        # The peer's smoothed round-trip time, in seconds, once a ``ping_rtt`` came back.
        self.rtt: float | None = None
        self._rtt_sent = 0.0  # when the ping in flight was sent (0: none)
        self._tasks: set[asyncio.Task[bytes | None]] = set()
        self._on_close = on_close
        self._open_subscriptions = open_subscriptions
        self.subscriptions: Subscriptions | None = None
        self.closed = False
        self.slow = False  # closed for reading too slowly
        self._lost = False  # the transport is gone
        # The drop of a peer told to close, due close_timeout later; cancelled when the
        # connection ends first, so a closed session is not kept alive that long.
        self._abort_timer: asyncio.TimerHandle | None = None

    def _answering(self, response: Response) -> None:
        """Add this session's own headers to its handshake answer: its X-Request-Id."""
        if self.request_id:
            response.headers["X-Request-Id"] = self.request_id

    def accept(self, raw_request: bytes) -> bool:
        """Answer the upgrade request; False when it was refused (and answered so)."""
        self.proto.receive_data(raw_request)
        events = self.proto.events_received()
        request = events[0] if events and isinstance(events[0], Request) else None
        if request is None:
            self._flush()
            return False
        response = self.proto.accept(request)
        self._answering(response)
        self.proto.send_response(response)
        self._flush()
        if response.status_code != 101:
            return False
        if self._open_subscriptions is not None:
            self.subscriptions = self._open_subscriptions(self)
        return True

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # failed or closing: nothing more is read into memory
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Frame):
                self._frame(event)
        self._flush()

    def buffered(self) -> int:
        """Bytes of a message not yet whole held for the peer: its fragments so far and
        what websockets holds of the frame it is reading (``max_message_bytes`` bounds one
        message; the front door's budget bounds them all)."""
        return self._fragments_len + len(self.proto.reader.buffer)

    def pause_reading(self, reason: int) -> None:
        if not self._paused and not self._lost:
            self.transport.pause_reading()
        self._paused |= reason

    def resume_reading(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and not self.closed:
            self.transport.resume_reading()

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): a close frame and the write side shut at
        once, what was held of an unfinished message dropped, and nothing the peer still
        sends read; the connection ends when the peer closes it, or after close_timeout."""
        self._fragments = []
        self._fragments_len = 0
        if self.closed:
            return
        if self.proto.state is State.OPEN:
            self.proto.fail(code, reason)  # drops what websockets buffered of a frame
        # Closed to this session from now on (what still comes is dropped unread), but
        # the transport is left to the peer's close, within close_timeout: closed at once
        # while the peer still sends, its kernel would answer with a reset, which may
        # reach the peer before the close frame it should read.
        self.closed = True
        self._flush()
        self._release()
        if not self._lost:
            self._abort_later()
        if self._on_close is not None:
            self._on_close()

    def connection_lost(self) -> None:
        self.closed = True
        self._lost = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        for task in self._tasks:
            task.cancel()
        self._release()
        # What was read of an unfinished message goes now, not when the collector gets to
        # this session (it is in reference cycles with its transport and protocol object):
        # the fragments, and the frame websockets' reader still buffers.
        self._fragments = []
        self._fragments_len = 0
        with contextlib.suppress(Exception):  # the stream ends: its parser stops
            self.proto.receive_eof()
        self.proto.reader.buffer.clear()

    def _release(self) -> None:
        subs, self.subscriptions = self.subscriptions, None
        if subs is not None:
            subs.closed(self.slow)

    def abort(self) -> None:
        """Drop the connection now, whatever is still buffered for it."""
        if not self._lost:
            self.transport.abort()

    def _frame(self, frame: Frame) -> None:
        if self.closed:
            return  # failed by an earlier frame of the same read
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self._text = opcode is Opcode.TEXT
            if not frame.fin:
                self._fragments = [frame.data]
                self._fragments_len = len(frame.data)
                return
            self._whole(bytes(frame.data))
        elif opcode is Opcode.CONT:
            if not frame.fin:
                self._fragments.append(frame.data)
                self._fragments_len += len(frame.data)
                return
            self._fragments.append(frame.data)
            body = b"".join(self._fragments)
            self._fragments = []
            self._fragments_len = 0
            self._whole(body)
        elif opcode is Opcode.PONG and self._rtt_sent and frame.data == RTT_PING:
            sample = time.monotonic() - self._rtt_sent
            self._rtt_sent = 0.0
            rtt = self.rtt
            self.rtt = sample if rtt is None else rtt + RTT_WEIGHT * (sample - rtt)

    def ping_rtt(self) -> None:
        """Ping the peer to time its round trip (``rtt``, taken when its pong comes); one
        in flight at a time: a ping whose pong never came is sent again."""
        if self.closed or self._lost:
            return
        self._rtt_sent = time.monotonic()
        self.proto.send_ping(RTT_PING)
        self._flush()

    def _whole(self, body: bytes) -> None:
        self.messages += 1
        # RFC 6455 8.1: a text message must be UTF-8 whole (a character may straddle
        # fragments, so it is checked once reassembled); JSON-RPC is ASCII nearly always,
        # which is checked without decoding.
        if self._text and not body.isascii():
            try:
                body.decode()
            except UnicodeDecodeError as exc:
                self.fail(CLOSE_INVALID_DATA, f"invalid UTF-8 at position {exc.start}")
                return
        self._message(body)

    def _message(self, body: bytes) -> None:
        subs = self.subscriptions
        token = _CURRENT.set(subs) if subs is not None else None
        try:
            try:
                out = self.handler(body, self.who)
            except RateLimited as exc:  # past its rate: answered -32005, the connection open
                self.send(exc.answer)
                return
            if isinstance(out, bytes):
                self.send(out)
                return
            peer = enter_identity(self.who)
            task = asyncio.ensure_future(out)  # takes the context: subscriptions, address
            leave_identity(peer)
        finally:
            if token is not None:
                _CURRENT.reset(token)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        if len(self._tasks) >= self.max_pending:
            # Backpressure, not loss: stop reading until answers drain.
            self.pause_reading(Paused.BACKLOG)

    def _done(self, task: asyncio.Task[bytes | None]) -> None:
        self._tasks.discard(task)
        if len(self._tasks) <= self.max_pending // 2:
            self.resume_reading(Paused.BACKLOG)
        if task.cancelled() or self.closed:
            return
        exc = task.exception()
        if isinstance(exc, RateLimited):  # refused once its lease came back (shared buckets)
            self.send(exc.answer)
            return
        if exc is not None:
            log.error("websocket handler failed", exc_info=exc)
            return
        answer = task.result()
        if not answer:
            return  # a notification: nothing owed
        self.send(answer)
        if self.subscriptions is not None:
            self.subscriptions.answered(answer)

    def send(self, payload: bytes) -> None:
        """Send one text message; close a connection whose reader has fallen too far behind.

        Never blocks: a notification fan-out calls it for every subscriber in turn."""
        if not payload or self.closed or self.proto.state is not State.OPEN:
            return
        if self._over_send_bound():
            self._too_slow()
            return
        try:
            self.proto.send_text(payload)
        except InvalidState:
            return
        self._flush()

    def send_frames(self, frames: bytes) -> None:
        """Write final text frames built elsewhere (the notification fan-out's templates,
        ``subscriptions.registry.NotificationFrames``), past websockets' per-message path.

        Sound because this session never fragments what it sends (no frame can land inside
        a message of its own), writes them as they are only with no extension negotiated
        (a frame is header + payload; with permessage-deflate each message is compressed
        on its own, its payload taken out of its frame) and
        flushes the protocol object after every operation (none of its bytes wait to go
        out ahead of these). Same rules as ``send``: only while open, never blocks, and a
        reader past the send-buffer bound is closed instead."""
        if self.closed or self.proto.state is not State.OPEN:
            return
        if self.proto.extensions:
            self._send_each(frames)  # compressed: each message through websockets
            return
        if self._over_send_bound():
            self._too_slow()
            return
        self.transport.write(frames)

    def _send_each(self, frames: bytes) -> None:
        """The messages of ``frames`` (final, unmasked text frames), sent one by one."""
        pos = 0
        while pos < len(frames):
            found = next_frame(frames, pos, len(frames))
            if found is None:
                log.error("send_frames: a frame cut short, %d bytes dropped", len(frames) - pos)
                return
            _first, start, end = found
            self.send(frames[start:end])
            pos = end

    def _over_send_bound(self) -> bool:
        """Whether what is queued for the peer is past ``max_send_buffer``, or past what
        its address may hold (``sends``, the front door's budget, when counted)."""
        queued = self.transport.get_write_buffer_size()
        if queued > self.max_send_buffer:
            return True
        sends = self.sends
        if sends is None or not (queued or sends.held):
            return False
        return sends.settle(queued) is not None

    def resume_writing(self) -> None:
        """The transport drained below its high-water mark (sessions that stream use it)."""

    def _too_slow(self) -> None:
        self.slow = True
        self.close(CLOSE_TRY_AGAIN_LATER, SLOW_READER_REASON)
        self._release()  # no more notifications pile up behind the close frame

    def close_now(self, code: int, reason: str) -> None:
        """Close with ``code`` and ``reason`` and drop this connection's subscriptions at
        once, so nothing more is queued behind the close frame."""
        self.close(code, reason)
        self._release()

    def close(self, code: int, reason: str) -> None:
        if self.proto.state is State.OPEN:
            self.proto.send_close(code, reason)
            self._flush()
            if not self._lost:
                self._abort_later()

    def _abort_later(self) -> None:
        # A peer that never answers the close would keep its buffers forever.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven outside a loop (sans-I/O tests): nothing to wait for
            return
        if self._abort_timer is None:
            self._abort_timer = loop.call_later(self.close_timeout, self.abort)

    def _flush(self) -> None:
        for chunk in self.proto.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:  # websockets signals "half-close now" with an empty chunk
                if self.transport.can_write_eof():
                    self.transport.write_eof()
                else:
                    self.transport.close()
        if self.proto.close_expected() and not self.closed:
            self.closed = True
            self.transport.close()
            self._release()
            if self._on_close is not None:
                self._on_close()
