"""One WebSocket session to one parent's ``/feed``, kept open: the child side of the feed.

A node (or a subscriber) holds one ``FeedLink`` per parent. The link sends a hello built
from ``wants()`` at every (re)connect, so the caller decides where each stream resumes;
it hands every binary message (one frame) to ``on_frame`` untouched and every welcome
``gap`` to ``on_gap``. Checking, deduplicating and ordering frames is the caller's work:
the link decodes no frame.

``on_frame`` and ``on_gap`` are called from the read loop and must not block: they run
before the next message is read, so their order is the parent's order.

A broken connection (refused, timed out, closed, a pong that never came, a control
message that breaks the protocol) is reconnected after a back-off that doubles from
``retry_delay`` to ``retry_max`` while connects keep failing; a session that got as far as
its welcome resets it, so a parent that says ``bye`` to a slow child is back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect, unix_connect

from chainrelay.tree.auth import CHALLENGE_HEADER, Credentials, Proof, parse_challenge
from chainrelay.tree.session import (
    ControlError,
    Gap,
    Want,
    encode_held,
    encode_hello,
    parse_confirmed,
    parse_control,
)

log = logging.getLogger(__name__)

# Weight of each new ping's round-trip time in the smoothed one: ~the last 4 pings dominate,
# so a parent that turned slow is noticed within a few ping intervals.
RTT_ALPHA = 0.25
# Close code the child sends when it gives up a session itself (protocol error, resync).
CLOSE_CHILD_RESET = 4000


# Seconds a link gathers what its node holds before telling the parent (``held``): at
# 5,000 batches/s one message per 2 ms instead of one per batch; an acknowledgement that
# waits for relays waits this much longer.
HELD_INTERVAL = 0.002


def _no_gap(_link: FeedLink, _stream: str, _gap: Gap) -> None:
    return None


def _no_confirmed(_link: FeedLink, _stream: str, _seq: int, _signature: bytes) -> None:
    return None


def _no_head(_link: FeedLink, _header: dict[str, Any]) -> None:
    return None


class FeedLink:
    """The feed session with one parent, reconnected until ``stop``."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        wants: Callable[[], list[Want]],
        on_frame: Callable[[FeedLink, bytes], object],
        on_gap: Callable[[FeedLink, str, Gap], None] = _no_gap,
        on_confirmed: Callable[[FeedLink, str, int, bytes], object] = _no_confirmed,
        max_frame_bytes: int,
        connect_timeout: float,
        retry_delay: float,
        retry_max: float,
        ping_interval: float,
        node: str | None = None,
        unix_path: str | None = None,
        on_head: Callable[[FeedLink, dict[str, Any]], object] = _no_head,
        credentials: Credentials | None = None,
    ) -> None:
        """``node``: this node's name, told to the parent in the hello when this node is a
        relay (what it holds may count towards acknowledgements that wait for relays).
        ``unix_path``: the parent listens on this Unix socket (``url`` then only names the
        path and host of the handshake), as a node's feeder worker does for its others;
        ``on_head`` takes the early heads such a feeder sends (``tree.session.encode_head``).
        ``credentials``: this node's key or secret, which answers a parent's challenge
        (``tree.auth``) in the hello, so the parent counts it as a relay."""
        self.credentials = credentials
        self.url = url
        self.on_head = on_head
        self.unix_path = unix_path
        self.name = name
        self.wants = wants
        self.on_frame = on_frame
        self.on_gap = on_gap
        self.on_confirmed = on_confirmed
        self.max_frame_bytes = max_frame_bytes
        self.connect_timeout = connect_timeout
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        self.ping_interval = ping_interval
        self.node = node
        self.connected = False
        self.rtt: float | None = None
        self.failures = 0  # consecutive connects that never reached a welcome
        self.sessions = 0  # sessions that reached a welcome, ever
        self.frames = 0  # binary messages received, ever (copies others sent too)
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: ClientConnection | None = None
        self._up = asyncio.Event()
        self._reset_reason: str | None = None
        self._welcomed = False
        self._closing: set[asyncio.Task[None]] = set()
        self._held: dict[str, int] = {}  # what to tell the parent this node holds
        self._held_all: dict[str, int] = {}  # ... and told, again at each new session
        self._held_timer: asyncio.TimerHandle | None = None
        # Seconds the parent said to wait before trying again (a refusal's retry_after, a
        # 429's Retry-After): the next reconnect waits at least that long.
        self._retry_after = 0.0

    def __repr__(self) -> str:
        return f"FeedLink({self.name} {self.url} connected={self.connected})"

    async def start(self) -> None:
        """Spawn the connect/read loop; returns at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"feedlink {self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected = False
        self._up.clear()
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None

    async def wait_connected(self, timeout: float) -> bool:
        """True once a session reached its welcome (now or within ``timeout`` seconds)."""
        if self.connected:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            return False
        return self.connected

    def reset(self, reason: str) -> None:
        """End the current session now; the link reconnects with a fresh hello from
        ``wants()`` after ``retry_delay``. For a caller that lost track (its own queue
        overflowed) and wants the parent's replay rather than the frames in flight."""
        conn = self._conn
        if conn is None:
            return
        self._reset_reason = reason
        self._mark_down()
        # The read loop sees the close and reconnects; nothing is awaited here because
        # reset is called from on_frame, inside that very loop.
        self._spawn(conn.close(CLOSE_CHILD_RESET, reason[:100]), "reset")

    def held(self, stream: str, position: int) -> None:
        """This node holds every batch of ``stream`` up to ``position``: told to the
        parent within ``HELD_INTERVAL`` (its acknowledgements may wait for relays)."""
        self._held[stream] = position
        self._held_all[stream] = position
        if self._held_timer is None and self.connected:
            loop = asyncio.get_running_loop()
            self._held_timer = loop.call_later(HELD_INTERVAL, self._send_held)

    def _send_held(self) -> None:
        self._held_timer = None
        conn, held, self._held = self._conn, self._held, {}
        if conn is None or not self.connected:
            return
        for stream, position in held.items():
            self._spawn(conn.send(encode_held(stream, position), text=True), "held")

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"feedlink {self.name} {what}")
        self._closing.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._closing.discard)
        task.add_done_callback(_ignore_closed)

    # --- the loop ----------------------------------------------------------------------
    def _backoff(self) -> float:
        if self.failures == 0:
            return self.retry_delay
        # The doubling stops counting long after retry_max is reached: a parent away for
        # hours (a thousand failures) would make 2**failures too large for a float.
        doublings = min(self.failures - 1, 32)
        return min(self.retry_max, self.retry_delay * 2**doublings)

    def _mark_down(self) -> None:
        self.connected = False
        self._up.clear()

    async def _run(self) -> None:
        while True:
            self._welcomed = False
            try:
                await self._session()
                why = "closed"
            except asyncio.CancelledError:
                raise
            except websockets.InvalidStatus as exc:
                why = f"{type(exc).__name__}: {exc}"
                self._retry_after = _seconds(exc.response.headers.get("Retry-After"))
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                why = f"{type(exc).__name__}: {exc}"
            except ControlError as exc:
                why = f"protocol: {exc}"
                log.warning("feed link %s (%s): %s", self.name, self.url, why)
            except Exception as exc:
                # A bug in a callback must not end the link for good: logged, reconnected.
                why = f"{type(exc).__name__}: {exc}"
                log.exception("feed link %s (%s) failed", self.name, self.url)
            finally:
                self._conn = None
                self._mark_down()
            self.last_error = self._reset_reason or why
            self._reset_reason = None
            log.info("feed link %s (%s) ended: %s", self.name, self.url, self.last_error)
            if self._welcomed:
                self.failures = 0
            else:
                self.failures += 1
            delay, self._retry_after = max(self._backoff(), self._retry_after), 0.0
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection, until it ends (an exception when it ends badly)."""
        options: dict[str, Any] = {
            "max_size": self.max_frame_bytes,
            "compression": None,  # frames are lz4 already; control messages are tiny
            "open_timeout": self.connect_timeout,
            "close_timeout": self.connect_timeout,
            "ping_interval": None,  # our own pings below, for the round-trip time
        }
        if self.unix_path is not None:
            opening = unix_connect(self.unix_path, self.url, **options)
        else:
            # A feed parent is dialled directly, whatever the environment says.
            opening = connect(self.url, proxy=None, **options)
        async with opening as conn:
            self._conn = conn
            pinger = asyncio.create_task(self._ping(conn), name=f"feedlink {self.name} ping")
            try:
                # Frames past our bound would end the link (1009) at every resume: the parent
                # leaves them out, and the jump in positions is backfilled.
                hello = encode_hello(
                    self.wants(),
                    max_frame_bytes=self.max_frame_bytes,
                    node=self.node,
                    auth=self._proof(conn),
                )
                await conn.send(hello, text=True)
                async with asyncio.timeout(self.connect_timeout):
                    first = await conn.recv()
                if not isinstance(first, str):
                    raise ControlError("a frame came before the welcome")
                gaps = self._welcome(first)
                self._welcomed = True
                self.sessions += 1
                self.connected = True
                self._up.set()
                if self._held_all:  # a parent's new session knows nothing of what we hold
                    self._held.update(self._held_all)
                    self._send_held()
                for stream, gap in gaps:  # after ``sessions`` counts this session
                    self.on_gap(self, stream, gap)
                async for message in conn:
                    if isinstance(message, bytes):
                        self.frames += 1
                        self.on_frame(self, message)
                    else:
                        self._control(message)
            except ControlError as exc:
                await conn.close(CLOSE_CHILD_RESET, str(exc)[:100])
                raise
            finally:
                pinger.cancel()
                # Waited for without catching CancelledError: a ``stop`` that lands just as
                # the session ends must end the link, not be taken for the pinger's.
                await asyncio.wait([pinger])

    def _proof(self, conn: ClientConnection) -> Proof | None:
        """The answer to the parent's challenge, if it sent one and this node can prove."""
        if not self.credentials or self.node is None or conn.response is None:
            return None
        challenge = parse_challenge(conn.response.headers.get(CHALLENGE_HEADER))
        if challenge is None:
            return None
        return self.credentials.prove(challenge, self.node)

    def _welcome(self, text: str) -> list[tuple[str, Gap]]:
        """The welcome's gaps; ``ControlError`` for anything but a well-formed welcome."""
        msg = parse_control(text)
        if msg.get("type") == "error":
            self._retry_after = _seconds(msg.get("retry_after"))
            raise ControlError(f"parent refused the hello: {msg.get('message')!r}")
        if msg.get("type") != "welcome":
            raise ControlError(f"expected a welcome, got {msg.get('type')!r}")
        streams = msg.get("streams")
        if not isinstance(streams, list):
            raise ControlError("welcome without a streams list")
        gaps: list[tuple[str, Gap]] = []
        for entry in streams:
            if not isinstance(entry, dict) or not isinstance(entry.get("stream"), str):
                raise ControlError("welcome entry without a stream name")
            gap = entry.get("gap")
            if gap is None:
                continue
            if (
                not isinstance(gap, list)
                or len(gap) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in gap)
                or not 0 <= gap[0] <= gap[1]
            ):
                raise ControlError(f"welcome gap must be [start, end]: {gap!r}")
            if gap[0] < gap[1]:
                gaps.append((entry["stream"], Gap(gap[0], gap[1])))
        return gaps

    def _control(self, text: str) -> None:
        msg = parse_control(text)
        kind = msg.get("type")
        if kind == "bye":
            # The parent closes right after; the read loop ends with that close.
            log.info("feed link %s: parent says bye (%s)", self.name, msg.get("reason"))
            self._reset_reason = f"bye: {msg.get('reason')}"
            return
        if kind == "error":
            raise ControlError(f"parent error: {msg.get('message')!r}")
        if kind == "confirmed":
            self.on_confirmed(self, *parse_confirmed(msg))
            return
        if kind == "head":
            header = msg.get("header")
            if not isinstance(header, dict):
                raise ControlError("head needs a header object")
            self.on_head(self, header)
            return
        raise ControlError(f"unexpected control message {kind!r}")

    async def _ping(self, conn: ClientConnection) -> None:
        """Measure the round-trip time now and every ``ping_interval``; a pong that does not
        come within the interval means the parent is gone: the session is closed."""
        while True:
            try:
                pong = await conn.ping()
                async with asyncio.timeout(self.ping_interval):
                    rtt = await pong
            except TimeoutError:
                self._reset_reason = "no pong"
                await conn.close(CLOSE_CHILD_RESET, "no pong")
                return
            except websockets.ConnectionClosed:
                return
            self.rtt = rtt if self.rtt is None else self.rtt + RTT_ALPHA * (rtt - self.rtt)
            await asyncio.sleep(self.ping_interval)


# A parent's word on when to retry is followed up to this long: a wrong or hostile value
# must not park a link for good.
MAX_RETRY_AFTER = 300.0


def _seconds(v: object) -> float:
    """A retry_after or Retry-After value in seconds (0 for anything that is not one)."""
    try:
        seconds = float(v) if isinstance(v, int | float | str) and not isinstance(v, bool) else 0.0
    except ValueError:
        return 0.0
    return min(seconds, MAX_RETRY_AFTER) if seconds > 0 else 0.0


def _ignore_closed(task: asyncio.Task[None]) -> None:
    """A control message or close sent as the link went down: nothing to do about it."""
    if not task.cancelled():
        task.exception()
