"""The feed hub: a node's streams of frames, their backlogs, and the children it serves.

Frames enter by ``publish`` (this node is their origin) or ``accept`` (a parent sent
them). ``accept`` keeps the first copy of each identity only, and only once its signature
checks out against the trusted origins: a duplicate costs a dict lookup, a forged or
broken frame is counted and dropped (never marked seen, so a good copy from another
parent still wins). Accepted frames go to the stream's backlog and, in the same call, to
every child that is caught up; then to the node's own listeners (``on_frame``).

Children are WebSocket sessions on the node's port, path ``/feed`` (``FeedChild``), and,
under ``serve --workers N``, the node's other workers on the feeder's private listener
(``open_sibling``): each frame is written to those first, since every child of theirs waits
for it too. A child's place in a stream is a ``Cursor`` into the backlog (``tree.session``), so
replay and live are one loop. The fan-out loop writes the same frame bytes to every child
(one shared WebSocket header per frame, ``writelines``: no copy) and never waits: a child
whose socket buffer is full is skipped until its transport drains (``resume_writing``),
and one that falls past its queue bound or out of the backlog is told ``bye`` and closed;
it resumes from its position.

Who a child is comes from its hello: on a hub with ``child_keys`` a relay proves its key
against the challenge its upgrade was answered with (``tree.auth``); any other child is an
anonymous subscriber, bounded per address and node-wide (``tree.admission``), so
subscribers never take the relays' places.

Block streams and batch streams are two types (``tree.streams``). Batch streams differ in
three ways: each frame is checked against the stream's sequencers (the frame carries the
sequencer's own signature), frames pass on strictly in sequence (``batches.order``: held
past a missing one, which is fetched from a parent's range endpoint), and the sequencer's
``confirmed`` trims the backlog; child relays say what they hold (``held``) for
acknowledgements that wait for relays (on a hub with ``child_keys``, authenticated relays
only).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from websockets.http11 import Response
from websockets.protocol import State

from chainrelay import defaults
from chainrelay.access.identity import Identity
from chainrelay.batches import frame as batchframe
from chainrelay.batches.order import Missing
from chainrelay.config import TreeConfig
from chainrelay.metrics import Metrics
from chainrelay.server.ws import WsSession
from chainrelay.tree import frame as feedframe
from chainrelay.tree.admission import Admission
from chainrelay.tree.auth import CHALLENGE_HEADER, AuthError, Challenge, ChildKeys
from chainrelay.tree.frame import KIND_BATCH, Frame, FrameError
from chainrelay.tree.session import (
    CLOSE_BAD_HELLO,
    CLOSE_LAGGING,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_STREAM,
    MAX_CONTROL_BYTES,
    Backlog,
    ControlError,
    Cursor,
    Dedup,
    Hello,
    Want,
    encode_bye,
    encode_confirmed,
    encode_error,
    encode_head,
    encode_welcome,
    parse_control,
    parse_held,
    parse_hello,
    welcome_entry,
)
from chainrelay.tree.streams import BatchSpec, BatchStream, BlockStream, Stream
from chainrelay.wire.wsframes import binary_header

log = logging.getLogger(__name__)

# Called with each frame kept and the name of the parent it came from ("" for a frame this
# node published).
FrameListener = Callable[[Frame, str], None]


@dataclass(frozen=True, slots=True)
class HubLimits:
    """The hub's limits: the block streams' own (a batch stream's are in its
    ``BatchSpec``), and those of every child and frame, whatever the stream."""

    # Block streams
    backlog_frames: int = defaults.TREE_BACKLOG_FRAMES
    backlog_bytes: int = defaults.TREE_BACKLOG_BYTES
    child_queue_frames: int = defaults.TREE_CHILD_QUEUE_FRAMES
    dedup_entries: int = defaults.TREE_DEDUP_ENTRIES
    stale_positions: int = defaults.TREE_STALE_POSITIONS
    # Every stream
    child_queue_bytes: int = defaults.TREE_CHILD_QUEUE_BYTES
    child_buffer_bytes: int = defaults.TREE_CHILD_BUFFER_BYTES
    max_frame_bytes: int = defaults.TREE_MAX_FRAME_BYTES
    max_children: int = defaults.TREE_MAX_CHILDREN
    hello_timeout: float = defaults.TREE_HELLO_TIMEOUT
    # How often a relay child is pinged to time its round trip (the status page's): the
    # interval a child pings its parent at ([tree] ping_interval).
    child_ping_interval: float = defaults.TREE_PING_INTERVAL
    # Anonymous children (``tree.admission``)
    anon_per_address: int = defaults.TREE_ANON_PER_ADDRESS
    anon_max_sessions: int = defaults.TREE_ANON_MAX_SESSIONS
    anon_reconnect_cooldown: float = defaults.TREE_ANON_RECONNECT_COOLDOWN
    anon_idle_addresses: int = defaults.TREE_ANON_IDLE_ADDRESSES

    @classmethod
    def of(cls, tree: TreeConfig) -> HubLimits:
        """The limits the ``[tree]`` section sets."""
        return cls(
            backlog_frames=tree.backlog_frames,
            backlog_bytes=tree.backlog_bytes,
            child_queue_frames=tree.child_queue_frames,
            child_queue_bytes=tree.child_queue_bytes,
            child_buffer_bytes=tree.child_buffer_bytes,
            dedup_entries=tree.dedup_entries,
            max_frame_bytes=tree.max_frame_bytes,
            max_children=tree.max_children,
            stale_positions=tree.stale_positions,
            hello_timeout=tree.hello_timeout,
            child_ping_interval=tree.ping_interval,
            anon_per_address=tree.anon_per_address,
            anon_max_sessions=tree.anon_max_sessions,
            anon_reconnect_cooldown=tree.anon_reconnect_cooldown,
            anon_idle_addresses=tree.anon_idle_addresses,
        )


# Fetches a batch stream's frames ``[start, end)`` from this node's parents (their range
# endpoints); returns the frames got, in order, possibly fewer.
RangeFetcher = Callable[[str, int, int], Awaitable[list[bytes]]]


class FeedHub:
    def __init__(
        self,
        streams: Iterable[str],
        metrics: Metrics,
        *,
        trust: Iterable[bytes] = (),
        limits: HubLimits | None = None,
        batches: Iterable[BatchSpec] = (),
        listeners: Iterable[FrameListener] = (),
        child_keys: ChildKeys | None = None,
        name: str = "",
    ) -> None:
        """``child_keys``: who may be a child relay (``tree.auth``; none: every child that
        names itself is one, as on a node without keys); ``name``: this hub's name in its
        challenges (the node's Via name; a random one when not given)."""
        self.limits = lim = limits or HubLimits()
        self.child_keys = child_keys or ChildKeys()
        self.name = name or f"hub-{secrets.token_hex(8)}"
        self.admission = Admission(
            per_address=lim.anon_per_address,
            max_sessions=lim.anon_max_sessions,
            cooldown=lim.anon_reconnect_cooldown,
            idle_addresses=lim.anon_idle_addresses,
        )
        self.metrics = metrics
        self.trust = frozenset(trust)
        self.streams: dict[str, Stream] = {
            name: BlockStream(
                name=name,
                backlog=Backlog(lim.backlog_frames, lim.backlog_bytes),
                child_queue_frames=lim.child_queue_frames,
                dedup=Dedup(lim.dedup_entries),
            )
            for name in streams
        }
        for spec in batches:
            self.streams[spec.name] = BatchStream.of(spec)
        # The node's own takers of accepted frames (blocks from the tree go to its follower).
        self.listeners: list[FrameListener] = list(listeners)
        self.children: set[FeedChild] = set()
        # The node's other workers among the children (``open_sibling``): written first.
        self.siblings: set[FeedChild] = set()
        self._counters: dict[tuple[str, str], Callable[[], None]] = {}
        self._latency: dict[str, Any] = {}
        # Set by the node: where missing batches come from, and who hears what this node
        # holds (its parents, for acknowledgements that wait for relays) and which
        # confirmations it took (its own children get them from here).
        self.fetch_range: RangeFetcher | None = None
        self.on_held: Callable[[str, int], None] | None = None
        # The node's own takers of confirmations (its Nitro endpoint), after its children.
        self.confirm_listeners: list[Callable[[str, int], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

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
        """A frame this node made (its origin), or a batch its ingress made durable: kept
        and fanned out like an accepted one. Batches come in sequence."""
        frame = feedframe.decode(raw, len(raw))
        st = self.streams[frame.stream]
        if isinstance(st, BatchStream):
            st.order.next = frame.position + 1
            self._keep(st, frame, "published", "")
        elif st.dedup.add(frame.identity):
            self._keep(st, frame, "published", "")

    def next_seq(self, stream: str) -> int | None:
        """The seq batch stream ``stream`` passes on next; None before it took any in (or
        for a block stream)."""
        st = self.streams[stream]
        return st.order.next if isinstance(st, BatchStream) else None

    def start_batches_at(self, stream: str, seq: int) -> None:
        """The next seq of a batch stream this node's own log will publish (an ingress)."""
        st = self.streams[stream]
        assert isinstance(st, BatchStream)
        st.order.next = seq

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
        if isinstance(st, BatchStream):
            return self._accept_batch(st, frame, source)
        if frame.kind == KIND_BATCH:
            self._count(st.name, "kind")
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
        if not self._signed_by(st, frame, who, self.trust):
            return None
        st.dedup.add(frame.identity)
        self._keep(st, frame, "accepted", source)
        return frame

    def _signed_by(self, st: Stream, frame: Frame, who: bytes, allowed: frozenset[bytes]) -> bool:
        """True if ``who`` (the frame's signer) is one of ``allowed`` (the trusted origins,
        or a batch stream's sequencers); else counted and logged."""
        if who in allowed:
            return True
        self._count(st.name, "untrusted")
        log.warning(
            "feed frame of %s at %d signed by untrusted 0x%s: dropped",
            st.name,
            frame.position,
            who.hex(),
        )
        return False

    # --- batch streams -----------------------------------------------------------------
    def _accept_batch(self, st: BatchStream, frame: Frame, source: str) -> Frame | None:
        """A batch frame: checked against the stream's sequencers, then passed on in
        sequence (held while an earlier one is missing)."""
        spec, order = st.spec, st.order
        if not order.is_new(frame.position):
            self._count(st.name, "duplicate")
            return None
        try:
            if batchframe.frame_chain_id(frame) != spec.chain_id:
                raise FrameError("chain", str(batchframe.frame_chain_id(frame)))
            who, _payload = batchframe.open_frame(frame, spec.max_payload_bytes)
        except FrameError as exc:
            self._count(st.name, exc.reason)
            return None
        if not self._signed_by(st, frame, who, spec.sequencers):
            return None
        released = order.offer(frame.position, frame, len(frame.raw))
        if released is None:
            # Too much held past a missing batch: fetch it now rather than wait, and what
            # was refused too (a quiet stream may never send it again).
            self._count(st.name, "held_full")
            st.refused = max(st.refused or 0, frame.position)
            self._fill_gap(st)
            return None
        for f in released:
            self._keep(st, f, "accepted", source)
        if released and self.on_held is not None and order.next is not None:
            self.on_held(st.name, order.next - 1)
        self._watch_gap(st)
        return frame

    def _watch_gap(self, st: BatchStream) -> None:
        """A batch is missing: wait ``order_wait`` for another parent's copy, then fetch."""
        if st.wanted() is None:
            if st.gap_timer is not None:
                st.gap_timer.cancel()
                st.gap_timer = None
                self.metrics.batch_gaps.labels(st.name, "arrived").inc()
            return
        if st.gap_timer is None and not st.fetching:
            loop = asyncio.get_running_loop()
            st.gap_timer = loop.call_later(st.spec.order_wait, self._fill_gap, st)

    def _fill_gap(self, st: BatchStream) -> None:
        st.gap_timer = None
        missing = st.wanted()
        if missing is None or st.fetching:
            return
        st.fetching = True
        task = asyncio.get_running_loop().create_task(self._fetch(st, missing))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, st: BatchStream, missing: Missing) -> None:
        """One page of what is missing (at most ``fetch_frames``: a long outage is
        fetched page by page, each page checked in one go, the loop free in between)."""
        end = min(missing.end, missing.start + st.spec.fetch_frames)
        got: list[bytes] = []
        try:
            if self.fetch_range is not None:
                got = await self.fetch_range(st.name, missing.start, end)
        except Exception as exc:  # any parent's failure: tried again, then passed over
            log.warning("fetching batches %s of %s failed: %s", missing, st.name, exc)
        finally:
            st.fetching = False
        before = st.order.next
        for raw in got:
            self.accept(raw, "range")
        if st.order.next != before or st.order.missing() is None:
            st.fetch_failures = 0
            self.metrics.batch_gaps.labels(st.name, "fetched").inc()
            if st.wanted() is not None:
                # More pages, or what a full gate refused: no parent sends those again.
                asyncio.get_running_loop().call_soon(self._fill_gap, st)
            return
        st.fetch_failures += 1
        if st.fetch_failures < st.spec.fetch_rounds:
            self._watch_gap(st)  # again after order_wait: a parent may be restarting
            return
        # No parent could give them: the held batches go on; children see the jump and
        # fetch the missing ones themselves (their range requests climb further).
        st.fetch_failures = 0
        log.warning(
            "batches %d-%d of %s are in no parent's backlog: passed over",
            missing.start,
            missing.end - 1,
            st.name,
        )
        self.metrics.batch_gaps.labels(st.name, "skipped").inc()
        for f in st.order.skip():
            self._keep(st, f, "accepted", "")
        self._watch_gap(st)

    def range(self, stream: str, start: int, max_frames: int, max_bytes: int) -> list[bytes] | None:
        """Frames of batch ``stream`` from seq ``start`` on, consecutive, from the backlog
        (at least one if any, at most ``max_frames`` and about ``max_bytes``); [] when
        ``start`` is not reached yet; None when the backlog no longer holds ``start``."""
        st = self.streams[stream]
        entries = st.backlog.entries
        if not isinstance(st, BatchStream):
            return []
        if st.order.next is None or not entries or entries[0].position > start:
            return None  # nothing taken in yet, or no longer held: ask further up
        if start >= st.order.next:
            return []
        out: list[bytes] = []
        used = 0
        # The backlog is in sequence; after a skipped gap, positions jump: stop there.
        i = start - entries[0].position
        if i >= len(entries) or entries[i].position != start:
            i = next((j for j, e in enumerate(entries) if e.position == start), -1)
            if i < 0:
                return None
        expect = start
        while i < len(entries) and len(out) < max_frames:
            e = entries[i]
            if e.position != expect or (out and used + len(e.raw) > max_bytes):
                break
            out.append(e.raw)
            used += len(e.raw)
            expect += 1
            i += 1
        return out

    def confirm(self, stream: str, seq: int, signature: bytes) -> bool:
        """The sequencer's word that batches up to ``seq`` are final: checked, the backlog
        trimmed below it, passed on to every child. False (and nothing done) if the
        signature is not a sequencer's or the stream is not a batch stream."""
        st = self.streams.get(stream)
        if not isinstance(st, BatchStream):
            return False
        try:
            digest = batchframe.confirmed_digest(st.spec.chain_id, stream, seq)
            who = feedframe.recover(signature, digest)
        except (FrameError, ValueError):
            return False
        if who not in st.spec.sequencers:
            return False
        if st.confirmed is not None and seq <= st.confirmed[0]:
            return True  # known already (from another parent)
        st.confirmed = (seq, signature)
        st.backlog.trim_below(seq)
        text = encode_confirmed(stream, seq, signature)
        for child in list(st.children):
            child.send(text)
        for fn in self.confirm_listeners:
            try:
                fn(stream, seq)
            except Exception:
                log.exception("confirmation listener failed")
        return True

    def note_held(self, child: FeedChild, stream: str, position: int) -> None:
        """A child relay holds every batch of ``stream`` up to ``position``."""
        st = self.streams.get(stream)
        if not isinstance(st, BatchStream) or st.order.next is None or child not in st.children:
            return
        if not child.relay:
            # A subscriber (or, on a hub with child_keys, a child that proved no key): what
            # it says it holds helps no acknowledgement.
            return
        # Never more than this node sent: a child's word cannot make up a relay's copy.
        position = min(position, st.order.next - 1)
        if position <= st.held.get(child, -1):
            return
        st.held[child] = position
        self._wake_held(st)

    def _wake_held(self, st: BatchStream) -> None:
        if not st.held_waiters:
            return
        keep = []
        # Per relay (``FeedChild.relay_name``: one relay is one, however many sessions
        # it has), once per message, not once per waiter.
        by_relay: dict[str | None, int] = {}
        for child, position in st.held.items():
            who = child.relay_name
            by_relay[who] = max(position, by_relay.get(who, -1))
        held = sorted(by_relay.values())
        for seq, k, fut in st.held_waiters:
            if fut.done():
                continue
            n = len(held) - bisect.bisect_left(held, seq)
            if n >= k:
                fut.set_result(n)
            else:
                keep.append((seq, k, fut))
        st.held_waiters = keep

    def wait_held(self, stream: str, seq: int, k: int) -> asyncio.Future[int]:
        """A future resolved (with how many) once ``k`` children hold batch ``seq``."""
        st = self.streams[stream]
        assert isinstance(st, BatchStream)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        st.held_waiters.append((seq, k, fut))
        self._wake_held(st)
        return fut

    def _keep(self, st: Stream, frame: Frame, outcome: str, source: str) -> None:
        st.backlog.append(frame.position, frame.identity, frame.raw)
        if st.newest is None or frame.position > st.newest:
            st.newest = frame.position
        st.last_identity = frame.identity
        self._count(st.name, outcome)
        children = st.children
        if self.siblings:
            first = [c for c in self.siblings if c in children]
            order = first + [c for c in children if c not in self.siblings]
        else:
            order = list(children)
        for child in order:
            try:
                child.pump()
            except Exception:  # one child's trouble never costs the others this frame
                log.exception("feed child %s failed; dropped", child.ip)
                child.abort()
        latency = self._latency.get(st.name)
        if latency is None:  # labels() takes a lock and builds a key: once per stream
            latency = self._latency[st.name] = self.metrics.feed_latency.labels(st.name)
        latency.set(max(0.0, time.time() - frame.origin_us / 1e6))
        for fn in self.listeners:
            try:
                fn(frame, source)
            except Exception:
                log.exception("feed listener failed")

    # --- resuming from parents ---------------------------------------------------------
    def wants(self, resume_last: int) -> list[Want]:
        """What to ask a parent for: each stream from just past the newest position held,
        or, before any frame arrived, the parent's last ``resume_last`` frames (a batch
        stream: from the next seq it lacks)."""
        out = []
        for st in self.streams.values():
            if isinstance(st, BatchStream) and st.order.next is not None:
                out.append(Want(st.name, from_position=st.order.next))
            elif st.newest is None:
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

    def open_sibling(
        self,
        transport: asyncio.Transport,
        *,
        ip: str,
        max_send_buffer: int,
        close_timeout: float = defaults.WS_CLOSE_TIMEOUT,
    ) -> FeedChild:
        """A child that is another worker of this node (on the feeder's private listener):
        written each frame before the other children."""
        child = self.open_child(
            transport, ip=ip, max_send_buffer=max_send_buffer, close_timeout=close_timeout
        )
        child.sibling = True
        return child

    def announce_head(self, header: dict[str, Any]) -> None:
        """A new head's header, for the node's other workers ahead of its block's frame
        (``tree.session.encode_head``); no other child gets it."""
        if not self.siblings:
            return
        text = encode_head(header)
        for child in list(self.siblings):
            child.hint(text)

    def close_children(self) -> None:
        for child in list(self.children):
            child.close_now(1001, "node shutting down")

    async def stop(self) -> None:
        """Cancel the hub's own work (gap fetches, timers, acknowledgement waits)."""
        for st in self.streams.values():
            if not isinstance(st, BatchStream):
                continue
            if st.gap_timer is not None:
                st.gap_timer.cancel()
                st.gap_timer = None
            for _seq, _k, fut in st.held_waiters:
                fut.cancel()
            st.held_waiters = []
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


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
        self.node: str | None = None  # the relay's name its hello gave
        self.sibling = False  # another worker of this node (``FeedHub.open_sibling``)
        # Who it is: the key it proved (``tree.auth``), and whether its ``held`` counts.
        self.proven: str | None = None
        self.relay = False
        self.group = ip  # what anonymous limits count it by: its identity's name
        self._challenge: Challenge | None = None
        self._pending = False  # holds a place of its group's until its hello
        self._anonymous = False  # counted among the anonymous sessions
        self._hello_timer: asyncio.TimerHandle | None = None
        self._rtt_timer: asyncio.TimerHandle | None = None  # the next ping of a relay child
        self.high_water = hub.limits.child_buffer_bytes
        # Above this the transport pauses us; ``resume_writing`` pumps again.
        transport.set_write_buffer_limits(high=self.high_water)

    def accept(self, raw_request: bytes) -> bool:
        hub = self.hub
        if len(hub.children) >= hub.limits.max_children:
            # Answered, not just dropped: the child can tell a full parent from a dead one.
            return self._reject(raw_request, 503, "too many children", "too_many_children")
        if not self.sibling:
            refusal = hub.admission.upgrade(self.group, time.monotonic())
            if refusal is not None:
                return self._reject(
                    raw_request, 429, refusal.message, refusal.reason, refusal.retry_after
                )
            self._pending = True
        ok = super().accept(raw_request)
        if not ok:
            self._leave_admission()
        else:
            self.hub.children.add(self)
            if self.sibling:
                self.hub.siblings.add(self)
            # A child that never says hello would hold its place among max_children.
            self._hello_timer = asyncio.get_running_loop().call_later(
                self.hub.limits.hello_timeout, self._hello_due
            )
        return ok

    def _reject(
        self, raw_request: bytes, status: int, text: str, reason: str, retry_after: float = 0.0
    ) -> bool:
        self.hub.metrics.feed_child_closes.labels(reason).inc()
        self.proto.receive_data(raw_request)
        self.proto.events_received()
        response = self.proto.reject(status, text + "\n")
        if retry_after > 0:
            response.headers["Retry-After"] = str(math.ceil(retry_after))
        self.proto.send_response(response)
        self._flush()
        return False

    def _answering(self, response: Response) -> None:
        """A hub with ``child_keys`` (``tree.auth``) puts its challenge in the upgrade's
        answer: every child gets its own, fresh."""
        super()._answering(response)
        if response.status_code == 101 and self.hub.child_keys and not self.sibling:
            self._challenge = Challenge.fresh(self.hub.name)
            response.headers[CHALLENGE_HEADER] = self._challenge.header()

    def _admit(self, hello: Hello) -> bool:
        """Who the child is, from its hello's proof; False (and refused) for a proof that
        does not check out or an anonymous child past its bounds (``tree.admission``)."""
        hub = self.hub
        if self.sibling:  # the node's own worker
            self.relay = hello.node is not None
            return True
        if hub.child_keys and hello.auth is not None:
            assert self._challenge is not None  # sent with every upgrade of a keyed hub
            try:
                self.proven = hub.child_keys.verify(hello.auth, self._challenge, hello.node)
            except AuthError as exc:
                self._refuse(str(exc), CLOSE_UNAUTHORIZED, f"auth_{exc.reason}")
                return False
        self._pending = False
        anonymous = self.proven is None
        refusal = hub.admission.hello(self.group, time.monotonic(), anonymous=anonymous)
        if refusal is not None:
            self._refuse(refusal.message, CLOSE_TOO_MANY, refusal.reason, refusal.retry_after)
            return False
        self._anonymous = anonymous
        # Without child_keys no child can prove anything: a named one is a relay, as ever.
        self.relay = self.proven is not None or (not hub.child_keys and hello.node is not None)
        if self.proven is not None:
            log.info("feed child %s (%s) is relay %s", hello.node, self.ip, self.proven)
        return True

    @property
    def relay_name(self) -> str | None:
        """What this relay counts as, once however many sessions it has: the address it
        proved (one key is one relay, whatever names its hellos give), else its name."""
        if self.proven is not None and self.proven.startswith("0x"):
            return self.proven
        return self.node

    def _leave_admission(self) -> None:
        if self._pending or self._anonymous:
            self.hub.admission.gone(self.group, time.monotonic(), counted=self._anonymous)
            self._pending = self._anonymous = False

    def _hello_due(self) -> None:
        if not self.greeted and not self.closed:
            self.greeted = True
            self._refuse("no hello in time", CLOSE_BAD_HELLO, "no_hello")

    def _message(self, body: bytes) -> None:
        if self.greeted:
            self._after_hello(body)
            return
        self.greeted = True
        self._stop_hello_timer()
        try:
            hello = parse_hello(body)
        except ControlError as exc:
            self._refuse(str(exc), exc.code, "bad_hello")
            return
        self.node = hello.node
        hub = self.hub
        entries = []
        for want in hello.wants:
            st = hub.streams.get(want.stream)
            if st is None:
                self._refuse(
                    f"unknown stream {want.stream}", CLOSE_UNKNOWN_STREAM, "unknown_stream"
                )
                return
        if not self._admit(hello):
            return
        for want in hello.wants:
            st = hub.streams[want.stream]
            start, gap = st.backlog.resume(want.from_position, want.last, want.after)
            if isinstance(st, BatchStream) and gap is None:
                gap = st.gap_before(want.from_position)
            cursor = Cursor.at(
                st.backlog, start, st.child_queue_frames, hub.limits.child_queue_bytes
            )
            cursor.max_frame = hello.max_frame_bytes
            self.cursors[want.stream] = cursor
            entries.append(welcome_entry(want, st.backlog, gap))
        self.send(encode_welcome(entries))
        for name in self.cursors:
            st = hub.streams[name]
            st.children.add(self)
            if not self.sibling:  # the node's own workers are no children of the tree
                hub.metrics.feed_children.labels(name).inc()
            if isinstance(st, BatchStream) and st.confirmed is not None:
                self.send(encode_confirmed(name, *st.confirmed))
        self.pump()
        if self.relay and not self.sibling:
            self._time_rtt()

    def _time_rtt(self) -> None:
        """Ping a relay child now and every ``child_ping_interval`` after: its round trip is
        what the status page shows of it (anonymous subscribers, possibly thousands, are
        not pinged)."""
        self._rtt_timer = None
        if self.closed:
            return
        self.ping_rtt()
        self._rtt_timer = asyncio.get_running_loop().call_later(
            self.hub.limits.child_ping_interval, self._time_rtt
        )

    def _after_hello(self, body: bytes) -> None:
        """A child relay's ``held`` (what it holds of a batch stream); nothing else."""
        try:
            msg = parse_control(body)
        except ControlError as exc:
            self._refuse(str(exc), exc.code, "bad_control")
            return
        if msg.get("type") == "hello":
            self._refuse("one hello per session", CLOSE_BAD_HELLO, "bad_hello")
            return
        try:
            stream, position = parse_held(msg)
        except ControlError as exc:
            self._refuse(str(exc), exc.code, "bad_control")
            return
        if stream not in self.cursors:
            self._refuse("held of a stream not asked for", CLOSE_BAD_HELLO, "bad_control")
            return
        self.hub.note_held(self, stream, position)

    def _refuse(
        self, message: str, code: int, reason: str, retry_after: float | None = None
    ) -> None:
        self.hub.metrics.feed_child_closes.labels(reason).inc()
        self.send(encode_error(message, retry_after))
        self.close_now(code, close_reason(message))

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

    def hint(self, text: bytes) -> None:
        """A text message worth sending now or never (an early head): left out when the
        child has not said hello yet or its socket buffer is past its high-water mark (the
        block's frame will tell it all the same), never a reason to close it."""
        if not self.cursors or self.closed or self.proto.state is not State.OPEN:
            return
        if self.transport.get_write_buffer_size() > self.high_water:
            return
        self.proto.send_text(text)
        self._flush()

    def _stop_hello_timer(self) -> None:
        # The timer holds the session: left to run, every connection that came and went
        # would stay in memory for hello_timeout (~7 KB each: thousands at a high rate).
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    def _release(self) -> None:
        self._stop_hello_timer()
        if self._rtt_timer is not None:
            self._rtt_timer.cancel()
            self._rtt_timer = None
        self._leave_admission()
        hub = self.hub
        if self in hub.children:
            hub.children.discard(self)
            hub.siblings.discard(self)
            for name in self.cursors:
                st = hub.streams[name]
                if self in st.children:
                    st.children.discard(self)
                    if isinstance(st, BatchStream):
                        st.held.pop(self, None)
                    if not self.sibling:
                        hub.metrics.feed_children.labels(name).dec()
        super()._release()


def close_reason(message: str) -> str:
    """``message`` cut to what a close frame carries: a control frame's payload is at most
    125 bytes (RFC 6455 5.5), two of them the code, so 123 bytes of UTF-8, cut between
    characters (a name from the wire may be anything)."""
    return message.encode(errors="replace")[:123].decode(errors="ignore")


def _no_rpc(_body: bytes, _who: Identity) -> bytes:
    return b""
