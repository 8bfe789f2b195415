"""The feed hub: a node's streams of frames, their backlogs, and the children it serves.

Frames enter by ``publish`` (this node is their origin) or ``accept`` (a parent sent
them). ``accept`` keeps the first copy of each identity only, and only once its signature
checks out against the trusted origins: a duplicate costs a dict lookup, a forged or
broken frame is counted and dropped (never marked seen, so a good copy from another
parent still wins). Accepted frames go to the stream's backlog and, in the same call, to
every child that is caught up; then to the node's own listeners (``on_frame``).

Children are WebSocket sessions on the node's port, path ``/feed`` (``FeedChild``). A
child's place in a stream is a ``Cursor`` into the backlog (``protocol.feedsession``), so
replay and live are one loop. The fan-out loop writes the same frame bytes to every child
(one shared WebSocket header per frame, ``writelines``: no copy) and never waits: a child
whose socket buffer is full is skipped until its transport drains (``resume_writing``),
and one that falls past its queue bound or out of the backlog is told ``bye`` and closed;
it resumes from its position.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from websockets.protocol import State

from chainrelay import defaults
from chainrelay.protocol.feedsession import (
    CLOSE_BAD_HELLO,
    CLOSE_LAGGING,
    CLOSE_UNKNOWN_STREAM,
    MAX_CONTROL_BYTES,
    Backlog,
    ControlError,
    Cursor,
    Dedup,
    Want,
    encode_bye,
    encode_error,
    encode_welcome,
    parse_hello,
    welcome_entry,
)
from chainrelay.services.metrics import Metrics
from chainrelay.services.ws import WsSession
from chainrelay.wire import feedframe
from chainrelay.wire.feedframe import Frame, FrameError
from chainrelay.wire.wsframes import binary_header

log = logging.getLogger(__name__)

# Called with each frame kept and the name of the parent it came from ("" for a frame this
# node published).
FrameListener = Callable[[Frame, str], None]


@dataclass(frozen=True, slots=True)
class HubLimits:
    backlog_frames: int = defaults.TREE_BACKLOG_FRAMES
    backlog_bytes: int = defaults.TREE_BACKLOG_BYTES
    child_queue_frames: int = defaults.TREE_CHILD_QUEUE_FRAMES
    child_queue_bytes: int = defaults.TREE_CHILD_QUEUE_BYTES
    child_buffer_bytes: int = defaults.TREE_CHILD_BUFFER_BYTES
    dedup_entries: int = defaults.TREE_DEDUP_ENTRIES
    max_frame_bytes: int = defaults.TREE_MAX_FRAME_BYTES
    max_children: int = defaults.TREE_MAX_CHILDREN
    stale_positions: int = defaults.TREE_STALE_POSITIONS
    hello_timeout: float = defaults.TREE_HELLO_TIMEOUT


@dataclass(slots=True)
class Stream:
    name: str
    backlog: Backlog
    dedup: Dedup
    children: set[FeedChild] = field(default_factory=set)
    newest: int | None = None  # highest position accepted
    last_identity: bytes | None = None  # identity of the last frame accepted


class FeedHub:
    def __init__(
        self,
        streams: Iterable[str],
        metrics: Metrics,
        *,
        trust: Iterable[bytes] = (),
        limits: HubLimits | None = None,
    ) -> None:
        self.limits = lim = limits or HubLimits()
        self.metrics = metrics
        self.trust = frozenset(trust)
        self.streams: dict[str, Stream] = {
            name: Stream(
                name,
                Backlog(lim.backlog_frames, lim.backlog_bytes),
                Dedup(lim.dedup_entries),
            )
            for name in streams
        }
        self.listeners: list[FrameListener] = []
        self.children: set[FeedChild] = set()
        self._counters: dict[tuple[str, str], Callable[[], None]] = {}

    # --- counting ----------------------------------------------------------------------
    def _count(self, stream: str, outcome: str) -> None:
        if stream not in self.streams:
            stream = "other"  # names come from the wire: never grow the label set
        key = (stream, outcome)
        inc = self._counters.get(key)
        if inc is None:
            inc = self._counters[key] = self.metrics.feed_frames.labels(stream, outcome).inc
        inc()

    # --- frames in ---------------------------------------------------------------------
    def publish(self, raw: bytes) -> None:
        """A frame this node made (its origin): kept and fanned out like an accepted one."""
        frame = feedframe.decode(raw, len(raw))
        st = self.streams[frame.stream]
        if st.dedup.add(frame.identity):
            self._keep(st, frame, "published", "")

    def accept(self, raw: bytes, source: str = "") -> Frame | None:
        """A frame from a parent (named ``source``): the accepted frame, or None (a
        duplicate, or dropped)."""
        try:
            frame = feedframe.decode(raw, self.limits.max_frame_bytes)
        except FrameError as exc:
            self._count("", exc.reason)
            log.debug("feed frame dropped: %s", exc)
            return None
        st = self.streams.get(frame.stream)
        if st is None:
            self._count(frame.stream, "unknown_stream")
            return None
        if frame.identity in st.dedup:
            self._count(st.name, "duplicate")
            return None
        if st.newest is not None and frame.position + self.limits.stale_positions < st.newest:
            self._count(st.name, "stale")
            return None
        try:
            who = feedframe.signer(frame)
        except FrameError as exc:
            self._count(st.name, exc.reason)
            return None
        if who not in self.trust:
            self._count(st.name, "untrusted")
            log.warning(
                "feed frame of %s at %d signed by untrusted 0x%s: dropped",
                st.name,
                frame.position,
                who.hex(),
            )
            return None
        st.dedup.add(frame.identity)
        self._keep(st, frame, "accepted", source)
        return frame

    def _keep(self, st: Stream, frame: Frame, outcome: str, source: str) -> None:
        st.backlog.append(frame.position, frame.identity, frame.raw)
        if st.newest is None or frame.position > st.newest:
            st.newest = frame.position
        st.last_identity = frame.identity
        self._count(st.name, outcome)
        for child in list(st.children):
            try:
                child.pump()
            except Exception:  # one child's trouble never costs the others this frame
                log.exception("feed child %s failed; dropped", child.ip)
                child.abort()
        self.metrics.feed_latency.labels(st.name).set(max(0.0, time.time() - frame.origin_us / 1e6))
        for fn in self.listeners:
            try:
                fn(frame, source)
            except Exception:
                log.exception("feed listener failed")

    # --- resuming from parents ---------------------------------------------------------
    def wants(self, resume_last: int) -> list[Want]:
        """What to ask a parent for: each stream from just past the newest position held,
        or, before any frame arrived, the parent's last ``resume_last`` frames."""
        out = []
        for st in self.streams.values():
            if st.newest is None:
                out.append(Want(st.name, last=resume_last))
            else:
                out.append(Want(st.name, from_position=st.newest + 1, after=st.last_identity))
        return out

    # --- children ----------------------------------------------------------------------
    def open_child(
        self,
        transport: asyncio.Transport,
        *,
        ip: str,
        max_send_buffer: int,
        close_timeout: float = defaults.WS_CLOSE_TIMEOUT,
    ) -> FeedChild:
        return FeedChild(
            self, transport, ip=ip, max_send_buffer=max_send_buffer, close_timeout=close_timeout
        )

    def close_children(self) -> None:
        for child in list(self.children):
            child.close_now(1001, "node shutting down")


class FeedChild(WsSession):
    """One child's feed session: a hello, then every frame due from its cursors."""

    def __init__(
        self,
        hub: FeedHub,
        transport: asyncio.Transport,
        *,
        ip: str,
        max_send_buffer: int,
        close_timeout: float = defaults.WS_CLOSE_TIMEOUT,
    ) -> None:
        super().__init__(
            transport,
            _no_rpc,
            max_message_bytes=MAX_CONTROL_BYTES,
            max_send_buffer=max_send_buffer,
            ip=ip,
            close_timeout=close_timeout,
        )
        self.hub = hub
        self.cursors: dict[str, Cursor] = {}
        self.greeted = False
        self.high_water = hub.limits.child_buffer_bytes
        # Above this the transport pauses us; ``resume_writing`` pumps again.
        transport.set_write_buffer_limits(high=self.high_water)

    def accept(self, raw_request: bytes) -> bool:
        if len(self.hub.children) >= self.hub.limits.max_children:
            self.hub.metrics.feed_child_closes.labels("too_many_children").inc()
            # Answered, not just dropped: the child can tell a full parent from a dead one.
            self.proto.receive_data(raw_request)
            self.proto.events_received()
            self.proto.send_response(self.proto.reject(503, "too many children\n"))
            self._flush()
            return False
        ok = super().accept(raw_request)
        if ok:
            self.hub.children.add(self)
            # A child that never says hello would hold its place among max_children.
            asyncio.get_running_loop().call_later(self.hub.limits.hello_timeout, self._hello_due)
        return ok

    def _hello_due(self) -> None:
        if not self.greeted and not self.closed:
            self.greeted = True
            self._refuse("no hello in time", CLOSE_BAD_HELLO, "no_hello")

    def _message(self, body: bytes) -> None:
        if self.greeted:
            self._refuse("one hello per session", CLOSE_BAD_HELLO, "bad_hello")
            return
        self.greeted = True
        try:
            hello = parse_hello(body)
        except ControlError as exc:
            self._refuse(str(exc), exc.code, "bad_hello")
            return
        hub = self.hub
        entries = []
        for want in hello.wants:
            st = hub.streams.get(want.stream)
            if st is None:
                self._refuse(
                    f"unknown stream {want.stream}", CLOSE_UNKNOWN_STREAM, "unknown_stream"
                )
                return
        for want in hello.wants:
            st = hub.streams[want.stream]
            start, gap = st.backlog.resume(want.from_position, want.last, want.after)
            cursor = Cursor.at(
                st.backlog, start, hub.limits.child_queue_frames, hub.limits.child_queue_bytes
            )
            cursor.max_frame = hello.max_frame_bytes
            self.cursors[want.stream] = cursor
            entries.append(welcome_entry(want, st.backlog, gap))
        self.send(encode_welcome(entries))
        for name in self.cursors:
            st = hub.streams[name]
            st.children.add(self)
            hub.metrics.feed_children.labels(name).inc()
        self.pump()

    def _refuse(self, message: str, code: int, reason: str) -> None:
        self.hub.metrics.feed_child_closes.labels(reason).inc()
        self.send(encode_error(message))
        self.close_now(code, message[:120])

    def pump(self) -> None:
        """Write what is due while the socket buffer has room; never waits."""
        if self.closed or self.proto.state is not State.OPEN:
            return
        transport = self.transport
        streams = self.hub.streams
        for name, cursor in self.cursors.items():
            backlog = streams[name].backlog
            if cursor.lagging(backlog):
                self.hub.metrics.feed_child_closes.labels("lagging").inc()
                # Not through ``send``: its send-buffer bound would turn the bye into a 1013
                # close, and a lagging child's buffer is full by definition.
                if self.proto.state is State.OPEN:
                    self.proto.send_text(encode_bye("lagging"))
                self.close_now(CLOSE_LAGGING, "lagging: resume from your position")
                return
            # Until the buffer passes its high-water mark: only a transport that paused us
            # calls ``resume_writing`` once drained; stopping below it would leave the rest
            # of a replay waiting for the next live frame.
            while (room := self.high_water - transport.get_write_buffer_size()) >= 0:
                batch = cursor.take(backlog, room)
                if not batch:
                    break
                for raw in batch:
                    transport.writelines((binary_header(len(raw)), raw))

    def resume_writing(self) -> None:
        self.pump()

    def _release(self) -> None:
        hub = self.hub
        if self in hub.children:
            hub.children.discard(self)
            for name in self.cursors:
                st = hub.streams[name]
                if self in st.children:
                    st.children.discard(self)
                    hub.metrics.feed_children.labels(name).dec()
        super()._release()


def _no_rpc(_body: bytes) -> bytes:
    return b""
