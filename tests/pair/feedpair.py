"""Two feed nodes joined in memory, like h11's ConnectionPair: a parent's ``FeedHub``
serving a child over two ``MemoryTransport``s joined back to back (``connect``), the child
side a websockets ``ClientProtocol``.

Bytes written on one end reach the other end on a later loop turn, never inside the
``write`` call: a session can never re-enter itself through its peer, as with a socket.
Each end's reading can be paused (``pause_reading``) or rationed (``rate`` bytes a turn),
so a slow or stalled reader is simulated with the writer's buffer filling as it would in
the kernel; the writer's protocol gets ``resume_writing`` once its buffer drains below the
low-water mark, as asyncio does. Every chunk written is kept as the same object
(``MemoryTransport.written``), so a test can tell bytes shared by several children from
copies.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

import orjson
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from chainrelay.tree.hub import FeedChild, FeedHub
from chainrelay.tree.session import Want, encode_hello

# asyncio's own default high-water mark for a transport's write buffer.
DEFAULT_HIGH_WATER = 64 * 1024


class End(Protocol):
    """What a transport delivers to: one end of a link (an asyncio.Protocol's shape)."""

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def resume_writing(self) -> None: ...


class MemoryTransport(asyncio.Transport):
    """One end's transport: ``write`` queues bytes for the peer end, delivered on a later
    loop turn while the peer reads, at most ``peer.rate`` bytes a turn."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.end: End | None = None  # the protocol this transport writes for
        self.peer: MemoryTransport | None = None
        self.buffer: deque[bytes] = deque()  # written, not yet delivered
        self.buffered = 0
        # Every chunk ever written, as given (the same objects).
        self.written: list[bytes | bytearray | memoryview] = []
        self.rate: int | None = None  # bytes this end reads per turn (None: all)
        self.reading = True
        self.high = DEFAULT_HIGH_WATER
        self.low = DEFAULT_HIGH_WATER // 4
        self.writer_paused = False  # pause_writing "called" (buffer went above high)
        self.closing = False
        self.eof = False  # write_eof called: the peer sees EOF once the buffer drains
        self.lost = False
        self._scheduled = False

    # --- asyncio.Transport -------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.eof:
            return  # as asyncio's socket transports do after close (it only warns)
        if not data:
            return
        self.written.append(data)
        self.buffer.append(bytes(data) if not isinstance(data, bytes) else data)
        self.buffered += len(data)
        if self.buffered > self.high:
            self.writer_paused = True
        self._schedule()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        self.high, self.low = high, low

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True
        self._schedule()

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self._schedule()

    def abort(self) -> None:
        self.buffer.clear()
        self.buffered = 0
        self.closing = True
        self._schedule()

    def is_closing(self) -> bool:
        return self.closing or self.lost

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        if self.peer is not None:
            self.peer._schedule()

    def is_reading(self) -> bool:
        return self.reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("127.0.0.1", 0)
        return default

    # --- delivery ----------------------------------------------------------------------
    def _schedule(self) -> None:
        if not self._scheduled and not self.lost:
            self._scheduled = True
            self.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        """One loop turn of this end's outgoing bytes: as many as the peer reads."""
        self._scheduled = False
        peer = self.peer
        if self.lost or peer is None:
            return
        if peer.lost:
            self.buffer.clear()
            self.buffered = 0
        elif peer.reading and self.buffer:
            budget = peer.rate if peer.rate is not None else self.buffered
            out = []
            while self.buffer and budget > 0:
                chunk = self.buffer.popleft()
                if len(chunk) > budget:
                    self.buffer.appendleft(chunk[budget:])
                    chunk = chunk[:budget]
                out.append(chunk)
                budget -= len(chunk)
                self.buffered -= len(chunk)
            if self.writer_paused and self.buffered <= self.low:
                self.writer_paused = False
                if self.end is not None:
                    self.end.resume_writing()
            if peer.end is not None and out:
                peer.end.data_received(b"".join(out))
            if self.buffer and not self.lost:
                self._schedule()  # the rest next turn (rationed reader)
                return
        if self.buffer:
            return  # waits for the peer to read again (resume_reading reschedules)
        if self.eof and not self.closing and peer.end is not None and not peer.lost:
            self.eof = False  # told once
            peer.end.eof_received()
        if self.closing:
            self._lose()
            peer._lose()

    def _lose(self) -> None:
        if self.lost:
            return
        self.lost = True
        self.closing = True
        if self.end is not None:
            self.end.connection_lost(None)


def link(a: End, b: End, name: str = "link") -> tuple[MemoryTransport, MemoryTransport]:
    """Two transports joined back to back: ``a`` writes through the first, ``b`` through
    the second."""
    ta, tb = MemoryTransport(f"{name}:a"), MemoryTransport(f"{name}:b")
    ta.peer, tb.peer = tb, ta
    ta.end, tb.end = a, b
    return ta, tb


class ParentEnd:
    """A parent node's end of a link: what the node's HTTP protocol does for ``/feed``
    (hand the upgrade request to ``hub.open_child``'s session, then every byte after it)."""

    def __init__(self, hub: FeedHub, max_send_buffer: int, sibling: bool = False) -> None:
        """``sibling``: the link comes in on a feeder's private listener (``open_sibling``)."""
        self.hub = hub
        self.max_send_buffer = max_send_buffer
        self.sibling = sibling
        self.transport: MemoryTransport | None = None
        self.session: FeedChild | None = None
        self.refused = False
        self._head = b""

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.data_received(data)
            return
        if self.refused:
            return
        self._head += data
        at = self._head.find(b"\r\n\r\n")
        if at < 0:
            return
        head, rest = self._head[: at + 4], self._head[at + 4 :]
        assert self.transport is not None
        opener = self.hub.open_sibling if self.sibling else self.hub.open_child
        session = opener(self.transport, ip="127.0.0.1", max_send_buffer=self.max_send_buffer)
        if not session.accept(head):
            self.refused = True
            self.transport.close()
            return
        self.session = session
        if rest:
            session.data_received(rest)

    def eof_received(self) -> None:
        # As an asyncio protocol whose eof_received returns None: the transport closes.
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.connection_lost()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_writing()


class ChildEnd:
    """A child's end of a link: a websockets client that upgrades to ``/feed``, sends one
    hello, hands each binary message to ``hub.accept`` (when it has a node of its own) and
    keeps what it got: frames, text messages, the handshake's status and the close code."""

    def __init__(
        self,
        wants: list[Want] | None,
        *,
        hub: FeedHub | None = None,
        hello: bytes | list[bytes] | None = None,
        max_frame_bytes: int = 1 << 24,
        node: str | None = None,
    ) -> None:
        self.proto = ClientProtocol(parse_uri("ws://parent.test/feed"), max_size=max_frame_bytes)
        self.hub = hub
        if hello is None:
            assert wants is not None
            hello = encode_hello(wants, node=node)
        self.hellos = [hello] if isinstance(hello, bytes) else hello
        self.transport: MemoryTransport | None = None
        self.status: int | None = None  # the upgrade's answer
        self.frames: list[bytes] = []
        self.texts: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.pongs: list[bytes] = []
        self.lost = asyncio.Event()
        self.arrived = asyncio.Event()  # set on every message; tests clear it

    def start(self) -> None:
        self.proto.send_request(self.proto.connect())
        self._flush()

    @property
    def welcome(self) -> dict[str, Any] | None:
        return next((t for t in self.texts if t.get("type") == "welcome"), None)

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        self._events()

    def ping(self, data: bytes) -> None:
        self.proto.send_ping(data)
        self._flush()

    def send_text(self, text: bytes | str) -> None:
        """A control message after the hello (a relay's ``held``, or garbage)."""
        self.proto.send_text(text.encode() if isinstance(text, str) else text)
        self._flush()

    def eof_received(self) -> None:
        self.proto.receive_eof()
        self._events()

    def _events(self) -> None:
        for event in self.proto.events_received():
            if isinstance(event, Response):
                self.status = event.status_code
                if event.status_code == 101 and self.proto.state is State.OPEN:
                    for hello in self.hellos:
                        self.proto.send_text(hello)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()

    def _frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.BINARY:
            raw = bytes(frame.data)
            self.frames.append(raw)
            if self.hub is not None:
                self.hub.accept(raw)
        elif frame.opcode is Opcode.TEXT:
            self.texts.append(orjson.loads(frame.data))
        elif frame.opcode is Opcode.PONG:
            self.pongs.append(bytes(frame.data))
        elif frame.opcode is Opcode.CLOSE:
            self.close_code = self.proto.close_rcvd.code if self.proto.close_rcvd else None
        self.arrived.set()

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.proto.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.write_eof()
        if self.proto.close_expected():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None and self.proto.close_rcvd is not None:
            self.close_code = self.proto.close_rcvd.code
        self.lost.set()

    def resume_writing(self) -> None:
        return None


class Pair:
    """One link from a parent hub to one child: the two ends and their transports."""

    def __init__(
        self,
        parent: ParentEnd,
        child: ChildEnd,
        to_child: MemoryTransport,
        to_parent: MemoryTransport,
    ) -> None:
        self.parent = parent
        self.child = child
        self.to_child = to_child  # the parent's transport: what it wrote for the child
        self.to_parent = to_parent

    @property
    def session(self) -> FeedChild:
        assert self.parent.session is not None, "the parent has not accepted the upgrade"
        return self.parent.session

    def stall(self) -> None:
        """The child stops reading: the parent's buffer toward it fills."""
        self.to_parent.pause_reading()

    def unstall(self) -> None:
        self.to_parent.resume_reading()


def connect(
    parent: FeedHub,
    wants: list[Want] | None = None,
    *,
    hub: FeedHub | None = None,
    hello: bytes | list[bytes] | None = None,
    rate: int | None = None,
    max_send_buffer: int = 16 * 1024 * 1024,
    node: str | None = None,
    sibling: bool = False,
) -> Pair:
    """A child of ``parent`` asking for ``wants`` (or sending ``hello`` as is): the upgrade
    and hello start now and complete over the next loop turns. ``hub``: the child node
    whose ``accept`` takes each frame; ``rate``: bytes the child reads a turn; ``sibling``:
    another worker of the parent's node."""
    pe = ParentEnd(parent, max_send_buffer, sibling)
    ce = ChildEnd(
        wants, hub=hub, hello=hello, max_frame_bytes=parent.limits.max_frame_bytes, node=node
    )
    to_child, to_parent = link(pe, ce, "feed")
    pe.transport, ce.transport = to_child, to_parent
    to_parent.rate = rate  # the child end reads what the parent's transport delivers
    ce.start()
    return Pair(pe, ce, to_child, to_parent)


class MemoryDialer:
    """Stands in for the event loop's ``create_connection`` (install it with
    ``monkeypatch.setattr(loop, "create_connection", dialer.create_connection)``): a client
    that dials ``host:port`` of a registered hub, as websockets' ``connect`` does for
    ``FeedLink``, gets a ``MemoryTransport`` to that hub's ``/feed`` instead of a socket.
    Any other address is refused, as a port nobody listens on."""

    def __init__(self, max_send_buffer: int = 16 * 1024 * 1024) -> None:
        self.hubs: dict[tuple[str, int], FeedHub] = {}
        self.parents: list[ParentEnd] = []  # one per connection made, in order
        self.max_send_buffer = max_send_buffer

    def add(self, host: str, port: int, hub: FeedHub) -> str:
        """``hub`` reachable at ``ws://host:port/feed`` (returned)."""
        self.hubs[(host, port)] = hub
        return f"ws://{host}:{port}/feed"

    async def create_connection(
        self,
        protocol_factory: Any,
        host: str | None = None,
        port: int | None = None,
        **_kw: Any,
    ) -> tuple[asyncio.Transport, Any]:
        hub = self.hubs.get((host or "", port or 0))
        if hub is None:
            raise ConnectionRefusedError(f"nothing listens at {host}:{port}")
        client = protocol_factory()
        pe = ParentEnd(hub, self.max_send_buffer)
        to_client, to_parent = link(pe, client, "dial")
        pe.transport = to_client
        self.parents.append(pe)
        client.connection_made(to_parent)
        return to_parent, client
