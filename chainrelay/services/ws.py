"""WebSocket JSON-RPC on the HTTP port, driven through websockets' sans-I/O ServerProtocol.

The HTTP protocol hands over the raw upgrade request; from then on this session owns the
connection's bytes. Each text or binary message is one JSON-RPC body; answers go back as
text messages, in whatever order they complete (ids pair them, as on any node).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from chainrelay import defaults

log = logging.getLogger(__name__)

Handler = Callable[[bytes], bytes | Awaitable[bytes]]

# Close code for a reader too slow to keep up: "try again later" (RFC 6455, 1013).
CLOSE_TRY_AGAIN_LATER = 1013


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
    ) -> None:
        self.transport = transport
        self.handler = handler
        self.max_send_buffer = max_send_buffer
        self.max_pending = max_pending
        self._paused = False
        self.proto = ServerProtocol(max_size=max_message_bytes)
        self._fragments: list[bytes] = []
        self._tasks: set[asyncio.Task[bytes]] = set()
        self._on_close = on_close
        self.closed = False

    def accept(self, raw_request: bytes) -> bool:
        """Answer the upgrade request; False when it was refused (and answered so)."""
        self.proto.receive_data(raw_request)
        events = self.proto.events_received()
        request = events[0] if events and isinstance(events[0], Request) else None
        if request is None:
            self._flush()
            return False
        response = self.proto.accept(request)
        self.proto.send_response(response)
        self._flush()
        return response.status_code == 101

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if isinstance(event, Frame):
                self._frame(event)
        self._flush()

    def connection_lost(self) -> None:
        self.closed = True
        for task in self._tasks:
            task.cancel()

    def _frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            if not frame.fin:
                self._fragments = [frame.data]
                return
            self._message(bytes(frame.data))
        elif frame.opcode is Opcode.CONT:
            self._fragments.append(frame.data)
            if frame.fin:
                body = b"".join(self._fragments)
                self._fragments = []
                self._message(body)

    def _message(self, body: bytes) -> None:
        out = self.handler(body)
        if isinstance(out, bytes):
            self.send(out)
            return
        task = asyncio.ensure_future(out)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        if len(self._tasks) >= self.max_pending and not self._paused:
            # Backpressure, not loss: stop reading until answers drain.
            self._paused = True
            self.transport.pause_reading()

    def _done(self, task: asyncio.Task[bytes]) -> None:
        self._tasks.discard(task)
        if self._paused and len(self._tasks) <= self.max_pending // 2 and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        if task.cancelled() or self.closed:
            return
        exc = task.exception()
        if exc is not None:
            log.error("websocket handler failed", exc_info=exc)
            return
        self.send(task.result())

    def send(self, payload: bytes) -> None:
        """Send one text message; close a connection whose reader has fallen too far behind."""
        if not payload or self.closed or self.proto.state is not State.OPEN:
            return
        if self.transport.get_write_buffer_size() > self.max_send_buffer:
            self.close(CLOSE_TRY_AGAIN_LATER, "client too slow: send buffer full")
            return
        try:
            self.proto.send_text(payload)
        except InvalidState:
            return
        self._flush()

    def close(self, code: int, reason: str) -> None:
        if self.proto.state is State.OPEN:
            self.proto.send_close(code, reason)
            self._flush()

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
            if self._on_close is not None:
                self._on_close()
