"""The HTTP front door: an asyncio Protocol over httptools, with WebSocket upgrade.

Hot-path invariant: for a POST whose calls are all cache hits, the read that completes it
is parsed, answered and written synchronously: no task, no timer, no upstream I/O. Three
ways in, cheapest first: a repeat of a request answered from cache at this head, its id
aside (a replay, in ``data_received``: no parsing, no decoding); a read of one plain POST
(``_plain_post``: no httptools); anything else through httptools (``on_message_complete``).
Answers on one connection are written in request order (HTTP/1.1 pipelining).

What a client makes the front door hold between its reads (a body still coming in, a head
kept for its body, an unfinished WebSocket message, answers queued for a client that does
not read them) counts against the node's memory budget (``server/budget.py``), per client
address and node-wide. A request read whole in one read never touches the budget: the hot
path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import re
import secrets
import socket
import time
import typing
from collections.abc import Awaitable, Callable, Coroutine
from types import CoroutineType

import httptools
import orjson

from chainrelay import defaults
from chainrelay.access.door import REFUSAL_BODIES, Door, Refusal
from chainrelay.access.identity import (
    NODE,
    Identity,
    enter_identity,
    for_address,
    leave_identity,
)
from chainrelay.access.proxyproto import ProxyHeaderError
from chainrelay.access.proxyproto import parse as parse_proxy_header
from chainrelay.allocator import give_back_freed_memory
from chainrelay.config import LimitsConfig
from chainrelay.errors import RateLimited
from chainrelay.metrics import Metrics
from chainrelay.rpc.replay import ReplayTable
from chainrelay.server.budget import Account, Budget, Over
from chainrelay.server.compress import GZIP_LINES, Compression, accepts_gzip
from chainrelay.server.peer import enter_via, leave_via, relays_in
from chainrelay.server.pending import (
    INTERNAL_ERROR,
    Awaited,
    AwaitedReply,
    Owed,
    Pending,
    PendingQueue,
    Ready,
    cancel_all,
    outcome,
    pop_ready,
    replies_under_way,
)
from chainrelay.server.phases import Event, Paused, Phase, on
from chainrelay.server.plainhead import (
    CONTENT_LENGTH,
    NOT_PLAIN,
    SPECIAL,
    PlainHead,
    read_head,
)
from chainrelay.server.replays import (
    ANSWER_OPEN,
    ANSWER_RESULT,
    REPLAY_ENTRY_OVERHEAD,
    REPLAY_OPEN,
    ForwardReplay,
    Replay,
    forward_size,
    replay_size,
)
from chainrelay.server.routes import (
    BATCHES_PATH,
    FEED_PATH,
    RANGE_PATH,
    BatchRoutes,
    Reply,
    Routes,
)
from chainrelay.server.ws import CLOSE_POLICY, CLOSE_TRY_AGAIN_LATER, WsSession
from chainrelay.wire.jsonrpc import single_id, split_token

if typing.TYPE_CHECKING:
    from chainrelay.access.buckets import Limiter
    from chainrelay.access.sharedbuckets import SharedLimiter
    from chainrelay.rpc.replay import Seen
    from chainrelay.server.accesslog import AccessLog

log = logging.getLogger(__name__)

_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    508: b"Loop Detected",
}
# The header lines that name a request's client (``Door.admit``), read off a plain POST's
# head only on connections that ask (from a trusted proxy, or with keys in use).
_WHO_LINES = re.compile(
    rb"\r\n(x-forwarded-for|forwarded|authorization|x-api-key|origin)[ \t]*:[ \t]*([^\r\n]*)",
    re.I,
)
# An incoming request id is kept when made of these (URL-safe, no spaces, no quotes: it is
# written into a head and a JSON log line as it is); else a fresh one replaces it.
_SANE_ID = re.compile(rb"[-A-Za-z0-9._:/+=]+")
# A head not yet complete may end in up to this many bytes of its blank line ("\r\n\r").
_PARTIAL_HEAD_END = 3
# Answers above this are written as head and body without joining them (saves a copy).
LARGE_BODY = 16 * 1024
# Every reason to pause but a parse left for a later turn.
_NOT_TURN = Paused.BACKLOG | Paused.WRITES
# How often idle keep-alive connections are looked for.
IDLE_SWEEP_INTERVAL = 5.0
# Bytes of the memory budget let go of since its peak after which the sweep gives the
# heap's free pages back to the kernel (``allocator.py``): a burst of a few bodies' worth,
# so an attack's buffers do not stay resident, and a quiet node never trims.
TRIM_AFTER_RELEASED = 32 * 1024 * 1024
# A read longer than this is fed to httptools a slice at a time, so that a pipelined flood
# can be stopped after ``limits.max_requests_per_turn`` requests (httptools parses a whole
# buffer in one call). A slice of the smallest requests (an 18-byte GET) is ~230 of them.
PARSE_SLICE = 4096
# The Prometheus text exposition's content type.
METRICS_TYPE = b"text/plain; version=0.0.4"


async def _metrics_reply(text: Awaitable[bytes]) -> Reply:
    return 200, await text, METRICS_TYPE


def _retry_after(wait: float) -> bytes:
    """The Retry-After line for a wait (whole seconds, rounded up); none for a request
    that can never pass (it costs more than the whole bucket)."""
    if wait == math.inf:
        return b""
    return b"Retry-After: %d\r\n" % max(1, math.ceil(wait))


def _rate_limit_of(
    answer: asyncio.Future[bytes] | asyncio.Future[bytes | None] | Owed,
) -> RateLimited | None:
    if answer.cancelled():
        return None
    exc = answer.exception()
    return exc if isinstance(exc, RateLimited) else None


def _nowhere(_data: bytes) -> None:
    """Where a protocol object writes before it has a transport: nowhere."""


class HttpServer:
    """Owns the listening socket and the set of live connections."""

    def __init__(
        self,
        routes: Routes,
        limits: LimitsConfig,
        metrics: Metrics,
        cors_origins: list[str] | None = None,
        via: str = "",
        *,
        ipv6_prefix: int = defaults.IPV6_CLIENT_PREFIX,
        limiter: Limiter | SharedLimiter | None = None,
        door: Door | None = None,
        proxy_protocol: bool = False,
        max_proxy_header_bytes: int = defaults.MAX_PROXY_HEADER_BYTES,
        request_id_max_bytes: int = defaults.REQUEST_ID_MAX_BYTES,
        protocol: type[HttpProtocol] | None = None,
        access: AccessLog | None = None,
        compression: Compression | None = None,
    ) -> None:
        """``protocol``: the connection class (the access log's, or the admin listener's);
        ``HttpProtocol`` when not given. ``access``: the access log, when on."""
        self.routes = routes
        # The rate limits per identity (RpcService's): a replay pays them here, since it
        # never reaches the pipeline (None: no limits).
        self.limiter = limiter
        self.protocol = protocol or HttpProtocol
        # Request ids: "X-Request-Id: <8 hex of this process>-<counter, hex>". Unique
        # across a node's workers and restarts without any coordination, and one
        # formatting of an int per answer (see README: its cost to a cache hit).
        self.request_id_max_bytes = request_id_max_bytes
        self._id_prefix = secrets.token_hex(4).encode() + b"-"
        self.id_head = b"X-Request-Id: " + self._id_prefix
        # The next id's counter (a replay's head ends in ``_id_line``, and writes it).
        self.ids = itertools.count(1).__next__
        # The access log, when on (its connections are ``LoggedHttpProtocol``).
        self.access = access
        self.compression = compression or Compression()
        # An IPv6 client stands for its network of this prefix (chainrelay/access/identity.py).
        self.ipv6_prefix = ipv6_prefix
        # Who a request is beyond its connection's address (trusted proxies, API keys);
        # None: neither is configured, and no request is asked.
        self.door = door
        # Every connection begins with a PROXY header, from a trusted proxy only.
        self.proxy_protocol = proxy_protocol
        self.max_proxy_header_bytes = max_proxy_header_bytes
        # This node's name in Via headers ("chainrelay-<random>"): a request naming it
        # came round in a loop. Empty: no loop check.
        self.via = via
        self.limits = limits
        self.metrics = metrics
        self.connections: set[HttpProtocol] = set()
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.budget = Budget(limits.max_buffered_bytes_per_ip, limits.max_buffered_bytes_total)
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        origins = ["*"] if cors_origins is None else cors_origins
        self.cors_any = "*" in origins
        self.cors_origins = {o.encode() for o in origins}
        self._cors_line = b"Access-Control-Allow-Origin: *\r\n" if self.cors_any else b""
        self._base_headers = b"Content-Type: application/json\r\n" + self._cors_line
        self.ok_head = b"HTTP/1.1 200 OK\r\n" + self._base_headers + b"Content-Length: "
        # A plain POST's head -> who it names (None: the connection's own client), and
        # whether it was read on a trusted proxy's connection: see ``Replay``, whose rule
        # this is too. Only heads that were let in; new door rules clear it.
        self.named_heads: dict[bytes, tuple[Identity | None, bool]] = {}
        # A plain POST's head -> what it says (``read_plain_head``).
        self.plain_heads: dict[bytes, PlainHead] = {}
        # A request without its id token -> how a repeat of it is answered, at one head.
        self.replays: ReplayTable[bytes, Replay] = ReplayTable(
            limits.max_hit_table_bytes, limits.max_hit_table_entries, replay_size
        )
        # A request without its id token -> the uncached call it was forwarded as, at one
        # head (``ForwardReplay``), bounded as the replays are.
        self.forwards: ReplayTable[bytes, ForwardReplay] = ReplayTable(
            limits.max_hit_table_bytes, limits.max_hit_table_entries, forward_size
        )

    def id_line(self, incoming: bytes | None = None) -> bytes:
        """An answer's X-Request-Id line (see ``request_id``)."""
        if incoming is None:
            return self.id_head + b"%x\r\n" % self.ids()
        return b"X-Request-Id: " + self.request_id(incoming) + b"\r\n"

    def request_id(self, incoming: bytes | None) -> bytes:
        """An answer's request id: ``incoming`` (the request's) when it is sane (of
        URL-safe characters, at most ``request_id_max_bytes``), else a fresh one."""
        if (
            incoming is not None
            and len(incoming) <= self.request_id_max_bytes
            and _SANE_ID.fullmatch(incoming) is not None
        ):
            return incoming
        return self.new_id()

    def new_id(self) -> bytes:
        """A new id (a WebSocket message's, in the access log)."""
        return self._id_prefix + b"%x" % self.ids()

    def cors_lines(self, origin: bytes | None) -> bytes:
        """The CORS lines of an answer to a request from ``origin`` when origins are listed
        (with ``*``, every answer's head carries its own line)."""
        if origin is not None and not self.cors_any and origin in self.cors_origins:
            return b"Access-Control-Allow-Origin: " + origin + b"\r\nVary: Origin\r\n"
        return b""

    def set_door(self, door: Door | None) -> None:
        """Name clients by new rules (keys read again): replays learned under the old ones
        go, since a replay answers without asking the door (its head, key included, is the
        one that was let in)."""
        self.door = door
        self.replays.clear()
        self.forwards.clear()
        self.named_heads.clear()
        names = door.keys.names() if door is not None else frozenset()
        for conn in list(self.connections):
            ws = conn.ws
            if ws is not None and ws.who.key is not None and ws.who.key not in names:
                ws.fail(CLOSE_POLICY, "API key no longer valid")

    def read_plain_head(self, head: bytes) -> PlainHead:
        """What a POST's head says for ``HttpProtocol._plain_post`` (``plainhead.read_head``;
        ``NOT_PLAIN`` too for the batch endpoint's, which are not JSON-RPC), remembered in
        ``plain_heads`` within ``max_named_heads`` (past it the table starts over)."""
        heads = self.plain_heads
        if len(heads) >= self.limits.max_named_heads:
            heads.clear()
        if head.startswith(b"POST " + BATCHES_PATH):
            plain = heads[head] = NOT_PLAIN  # not JSON-RPC
        else:
            plain = heads[head] = read_head(head, None if self.cors_any else self.cors_lines)
        return plain

    def name_head(self, head: bytes, who: Identity | None, proxied: bool) -> None:
        """Remember who ``head`` named (see ``named_heads``), within its bound."""
        heads = self.named_heads
        if len(heads) >= self.limits.max_named_heads:
            heads.clear()
        heads[head] = (who, proxied)

    def learn_replay(
        self,
        rest: bytes,
        token: bytes,
        answer: bytes,
        record: Seen,
        cors: bytes = b"",
        who: Identity | None = None,
        proxied: bool = False,
    ) -> None:
        """Remember that the request ``rest`` (id token aside) was answered ``answer`` from
        ``record`` (with the CORS lines ``cors``), when the answer is exactly the splice a
        replay writes; ``who`` and ``proxied``: see ``Replay``."""
        if not single_id(rest) or answer != b"".join(
            (ANSWER_OPEN, token, ANSWER_RESULT, record.value, b"}")
        ):
            return  # an "id" in the head, or an answer not spliced from the record
        # Up to the value of its X-Request-Id: each replay writes a new one, then the rest.
        head = self.head(200, len(answer), True, cors)[:-2] + self.id_head
        size = len(rest) + len(head) + len(answer) + REPLAY_ENTRY_OVERHEAD
        replayer = self.routes.replayer
        assert replayer is not None  # replays are learned only from one
        replay = Replay(head, record, len(token), size, replayer.replay, who, proxied)
        self.replays.add(rest, replay, record.generation)

    def learn_forward(
        self,
        split: tuple[bytes, bytes],
        body_at: int,
        generation: int,
        cors: bytes = b"",
        who: Identity | None = None,
        proxied: bool = False,
    ) -> None:
        """Remember that the request ``split`` (id token, the rest) was forwarded uncached
        at head ``generation``, its body starting at ``body_at`` (its call remembered by the
        forwarder under that body without its id: ``Replayer.passed``), answered with the
        CORS lines ``cors``; ``who`` and ``proxied``: see ``Replay``."""
        token, rest = split
        if not single_id(rest):
            return  # an "id" in the head too
        entry = ForwardReplay(body_at, len(token), rest[body_at:], cors, who, proxied)
        self.forwards.add(rest, entry, generation)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        protocol = self.protocol
        if self.proxy_protocol:
            protocol = _reading_proxy_headers(protocol)
        self._server = await loop.create_server(
            lambda: protocol(self), host, port, reuse_port=reuse_port or None, backlog=2048
        )
        self._sweeper = asyncio.create_task(self._sweep())

    async def start_on(self, sock: socket.socket) -> None:
        """Serve on a socket bound and listening already (made by another process: a
        node's feeder worker serves its private feed listener, which the supervisor made)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: self.protocol(self), sock=sock)
        self._sweeper = asyncio.create_task(self._sweep())

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop accepting, let in-flight answers finish (up to ``drain_timeout``), close."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + drain_timeout
        # Answers complete in callbacks on many connections; polling the set is simplest.
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for ``keepalive_timeout``, and drop those
        that began a request or WebSocket message and did not finish it within
        ``body_read_timeout``.

        The hot path only counts requests (messages); a connection whose count has not
        moved for a whole timeout is idle (if it owes no answer) or stuck in its message.
        """
        limits = self.limits
        timeout, body_timeout = limits.keepalive_timeout, limits.body_read_timeout
        seen: dict[HttpProtocol, tuple[int, bool, float]] = {}
        while True:
            await asyncio.sleep(min(IDLE_SWEEP_INTERVAL, timeout, body_timeout))
            now = time.monotonic()
            live: dict[HttpProtocol, tuple[int, bool, float]] = {}
            for conn in list(self.connections):
                count, unfinished = conn.progress()
                last = seen.get(conn)
                if last is None or last[:2] != (count, unfinished):
                    live[conn] = (count, unfinished, now)
                elif unfinished:
                    if now - last[2] >= body_timeout:
                        conn.drop_unfinished()
                    else:
                        live[conn] = last
                elif conn.ws is not None:
                    live[conn] = last
                elif conn.busy:
                    live[conn] = (count, unfinished, now)
                elif now - last[2] >= timeout:
                    conn.close()
                else:
                    live[conn] = last
            seen = live
            if self.budget.let_go(TRIM_AFTER_RELEASED):
                give_back_freed_memory()

    def head(
        self,
        status: int,
        length: int,
        keep_alive: bool,
        extra: bytes = b"",
        content_type: bytes | None = None,
    ) -> bytes:
        if status == 204:  # RFC 9110 8.6: no Content-Length (nor content) on a 204
            return b"".join(
                (
                    b"HTTP/1.1 204 No Content\r\n",
                    self._cors_line,
                    extra,
                    b"" if keep_alive else b"Connection: close\r\n",
                    b"\r\n",
                )
            )
        return b"".join(
            (
                b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"OK")),
                self._base_headers
                if content_type is None
                else b"Content-Type: " + content_type + b"\r\n" + self._cors_line,
                # The answer's own lines after its length, where the prebuilt head of
                # ``HttpProtocol._write_ok`` puts them: one answer, the same bytes either way.
                b"Content-Length: %d\r\n" % length,
                extra,
                b"" if keep_alive else b"Connection: close\r\n",
                b"\r\n",
            )
        )


# Read once: a member read off its Enum class costs a Python call per message.
_IDLE = Phase.IDLE
_HELD = Phase.HELD
_HEAD = Phase.HEAD
_REFUSED = Phase.REFUSED
_UPGRADED = Phase.UPGRADED
_BODY = Phase.BODY
_LINGERING = Phase.LINGERING
_ON_BEGIN = on(Event.BEGIN)
_ON_HEADERS = on(Event.HEADERS)
_ON_REFUSE = on(Event.REFUSE)
_ON_COMPLETE = on(Event.COMPLETE)
_ON_HOLD = on(Event.HOLD)
_ON_RELEASE = on(Event.RELEASE)
_ON_UPGRADE = on(Event.UPGRADE)
_ON_LINGER = on(Event.LINGER)


class HttpProtocol(asyncio.Protocol):
    """One client connection: its phase (``server/phases.py``), the answers it is owed
    (``server/pending.py``) and, once upgraded, its WebSocket session."""

    __slots__ = (
        "_at",
        "_body",
        "_body_len",
        "_body_size",
        "_chunk",
        "_count_sends",
        "_counted",
        "_head_at",
        "_head_buf",
        "_headers",
        "_held",
        "_in",
        "_lingered",
        "_lingering",
        "_out",
        "_parse_soon",
        "_paused",
        "_per_request",
        "_phase",
        "_proxied",
        "_queue",
        "_rest",
        "_rest_at",
        "_send_now",
        "_url",
        "parser",
        "requests",
        "server",
        "transport",
        "who",
        "ws",
    )

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.ws: WsSession | None = None
        self.who = NODE  # the client, as limits see it (its address until it says more)
        # The connection comes from a trusted proxy: its requests name their own clients.
        self._proxied = False
        # Each request is asked who it is (``Door.admit``): from a trusted proxy, or keys
        # in use. False: every request is the connection's client, at no cost.
        self._per_request = False
        # The name the connection is counted under in ``per_ip`` (None: not counted).
        self._counted: str | None = None
        self.requests = 0  # messages seen; the idle sweep compares it between sweeps
        self._phase = Phase.IDLE
        self._url = b""
        self._body: list[bytes] = []
        self._body_len = 0
        self._body_size = -1  # as its Content-Length announced; -1: chunked, or none
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunk = b""
        self._head_buf: list[bytes] = []
        # Where in the current read httptools' next message starts (None: not known, after
        # a chunked body, whose framing httptools does not hand over) and where in
        # _head_buf[0] the head being read starts: a read may hold earlier messages.
        self._at: int | None = 0
        self._head_at: int | None = 0
        self._held = b""  # the lone POST head kept in Phase.HELD
        self._queue: PendingQueue = collections.deque()
        self._paused = 0  # ``Paused`` bits
        self._send_now: Callable[[bytes], object] = _nowhere  # the transport's write
        # What this connection holds against the server's budget: what it reads (a body,
        # a head kept, an unfinished WebSocket message) and what is queued for it.
        self._in = Account(server.budget, "")
        self._out = self._in
        # Whether what is queued to send counts against the budget: answers and pongs,
        # yes; a feed child's frames and a pusher's acks have their own bounds
        # (tree.child_buffer_bytes, batches.max_in_flight).
        self._count_sends = True
        # What is left of a read too large to parse in one turn (``_parse_rest``).
        self._rest = b""
        self._rest_at = 0
        self._parse_soon = False
        self._lingering: asyncio.TimerHandle | None = None
        self._lingered = 0  # bytes read and dropped since the last answer

    # --- connection ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._opened(transport)
        self._admit(_peer_address(transport))

    def _opened(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport and count the connection among the server's."""
        self.transport = typing.cast(asyncio.Transport, transport)
        self._send_now = self.transport.write
        self.server.connections.add(self)
        self.server.metrics.connections.labels("http").inc()

    def _admit(self, address: str) -> None:
        """The connection's client is at ``address``: count it under its identity (a
        connection of a trusted proxy carries many clients, each limited per request: it
        is not counted as one client's, and has a share of the memory budget of its own)."""
        srv = self.server
        self.who = who = for_address(address, srv.ipv6_prefix)
        door = srv.door
        if door is not None:
            self._proxied = address in door.trusted
            self._per_request = self._proxied or door.keys_on
        if self._proxied:
            share = f"{who.name}#{id(self)}"
            self._in = Account(srv.budget, share)
            self._out = Account(srv.budget, share)
            return
        self._in = Account(srv.budget, who.name)
        self._out = Account(srv.budget, who.name)
        self._count_connection(who.name)

    def _count_connection(self, name: str) -> bool:
        """Count the connection under the client address ``name`` (``max_connections_per_ip``:
        per address, never per key, since a connection is counted before any key is
        known); False, the connection refused (429) and closed, past the bound."""
        srv = self.server
        self._counted = name
        srv.per_ip[name] += 1
        if srv.per_ip[name] > srv.limits.max_connections_per_ip:
            srv.metrics.rejected.labels("connections_per_ip").inc()
            self._plain(429, b"too many connections from this address", keep_alive=False)
            self.close()  # at once, not lingering: its place is what it must not keep
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        srv = self.server
        srv.connections.discard(self)
        name = self._counted
        if name is not None:
            srv.per_ip[name] -= 1
            if srv.per_ip[name] <= 0:
                del srv.per_ip[name]
        srv.metrics.connections.labels("ws" if self.ws else "http").dec()
        if self.ws is not None:
            self.ws.connection_lost()
        cancel_all(self._queue)
        self._in.release()
        self._out.release()
        # What was read of an unfinished request goes now, not when the collector gets to
        # this protocol object (it is in reference cycles with its transport and parser).
        self._rest = b""
        self._body = []
        self._held = b""
        self._head_buf = []
        self._chunk = b""
        if self._lingering is not None:
            self._lingering.cancel()

    @property
    def busy(self) -> bool:
        """Whether answers are owed (the server's drain and idle sweep ask)."""
        return bool(self._queue)

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if self._paused == Paused.TURN and self._rest:
            self._parse_later()  # the rest of a read first; reading resumes after it
        elif not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        # A client that does not read its answers is not read either: answers (a range
        # answer runs to megabytes) and pongs never pile up in the transport unbounded.
        transport = self.transport
        if transport is None:
            return
        if self.ws is not None:
            # Counted after the read that queued it (``_settle_ws``), where it can be
            # refused: here the transport is in the middle of a write.
            self.ws.pause_reading(Paused.WRITES)
            return
        self._out.settle_anyway(transport.get_write_buffer_size())
        self._pause(Paused.WRITES)

    def resume_writing(self) -> None:
        transport = self.transport
        assert transport is not None
        if self.ws is not None:
            self.ws.resume_reading(Paused.WRITES)
            if self._count_sends:
                self._out.settle_anyway(transport.get_write_buffer_size())
            self.ws.resume_writing()
            return
        self._out.settle_anyway(transport.get_write_buffer_size())
        self._resume(Paused.WRITES)

    # --- the budget, and messages that never end ----------------------------------------
    def _settle_ws(self) -> None:
        """Count what the WebSocket session holds for its peer (a message not yet whole,
        frames queued to it); past the budget the connection is failed, its bytes dropped:
        1008 for an address over its share, 1013 (try later) when the node is full."""
        ws = self.ws
        transport = self.transport
        assert ws is not None and transport is not None
        sending = transport.get_write_buffer_size() if self._count_sends else 0
        if ws.closed:  # failed or closing: nothing more is read; its close frame is queued
            self._in.release()
            self._out.settle_anyway(sending)
            return
        over = self._in.settle(ws.buffered())
        if over is None:
            over = self._out.settle(sending)
        if over is None:
            return
        self._count_refusal(over)
        if over is Over.NODE:
            ws.fail(CLOSE_TRY_AGAIN_LATER, "node busy: too much buffered, try later")
        else:
            ws.fail(CLOSE_POLICY, "too much buffered for this address")
        self._in.release()

    def _count_refusal(self, over: Over) -> None:
        label = "buffered_total" if over is Over.NODE else "buffered_per_ip"
        self.server.metrics.rejected.labels(label).inc()

    def progress(self) -> tuple[int, bool]:
        """Messages begun so far (WebSocket: received whole), and whether one is begun and
        not finished: what the sweep compares between its rounds."""
        if self.ws is not None:
            return self.ws.messages, self.ws.buffered() > 0
        phase = self._phase
        return self.requests, phase is _HEAD or phase is _BODY or phase is _HELD

    def drop_unfinished(self) -> None:
        """A request or message begun ``body_read_timeout`` ago is still not whole: its
        bytes are dropped and the connection closed (408; WebSocket close 1008)."""
        self.server.metrics.rejected.labels("read_timeout").inc()
        if self.ws is not None:
            self.ws.fail(CLOSE_POLICY, "message not finished in time")
            self._in.release()
            return
        self._body = []
        self._held = b""
        self._in.release()
        if self._queue:
            self.close()  # answers still owed: the 408 could not go first
            return
        self._plain(408, b"request not finished in time", keep_alive=False)

    def _refuse_unbuffered(self, over: Over) -> None:
        """A body that would take the connection's address or the node past the budget:
        answered 429 or 503 with Connection: close, its bytes dropped."""
        self._body = []
        self._in.release()
        self._phase = _ON_REFUSE[self._phase]
        self._count_refusal(over)
        if over is Over.NODE:
            self._plain(503, b"node busy: too many unfinished requests", keep_alive=False)
        else:
            self._plain(429, b"too many unfinished requests from this address", False)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase is not _IDLE:
            if phase is _UPGRADED:
                ws = self.ws
                assert ws is not None
                ws.data_received(data)
                # Most reads end with no message half read and nothing queued.
                if ws.buffered() or self._in.held or self._out.held:
                    self._settle_ws()
                elif self._count_sends and ws.transport.get_write_buffer_size():
                    self._settle_ws()
                return
            if phase is _LINGERING:
                self._lingered += len(data)
                if self._lingered > self.server.limits.linger_bytes:
                    self.close()
                return
            if phase is _HELD:
                self._in.give(len(self._held))
                data = self._held + data
                self._held = b""
                self._phase = _ON_RELEASE[self._phase]
                phase = _IDLE
        if phase is _IDLE:
            split = split_token(data) if not self._queue else None
            if split is not None:
                # A replay: but for its id token, this read is a request answered from
                # cache before at this head (a read of exactly one POST whose head passed
                # _plain_post). With a token of the same length as the one it stands
                # for, the bytes are those of that request but for a valid JSON id, so
                # it gets that answer with this id: no parsing, no decoding, one write.
                replay = self.server.replays.get(split[1])
                if (
                    replay is not None
                    and len(split[0]) == replay.token_len
                    and replay.proxied is self._proxied
                    and replay.check(replay.record, replay.who or self.who) is not None
                    and self._pays(replay, replay.who or self.who)
                ):
                    self.requests += 1
                    # Reads stop when the transport closes, so it is open here.
                    # Its head ends in this process's id prefix: the counter completes it.
                    self._send_now(
                        b"%b%x%b%b%b"
                        % (replay.head, self.server.ids(), REPLAY_OPEN, split[0], replay.suffix)
                    )
                    return
                forward = self.server.forwards.get(split[1])
                if forward is not None and self._forward_again(forward, split[0], data):
                    return
            if data[:5] == b"POST ":
                if self._plain_post(data, split) or self._hold_head(data):
                    return
        if len(data) > PARSE_SLICE:
            self._rest = data
            self._rest_at = 0
            self._parse_rest()
            return
        self._feed(data)

    def _forward_again(self, forward: ForwardReplay, token: bytes, data: bytes) -> bool:
        """Send a request forwarded before at this head, but for its id ``token``, as the
        call it was forwarded as (``Replayer.again``): no parsing of its head or body, no
        planning. False: it takes the usual path (another head, a method this client may
        not call, its rate, no upstream to send it to now)."""
        if len(token) != forward.token_len or forward.proxied is not self._proxied:
            return False
        server = self.server
        replayer = server.routes.replayer
        if replayer is None:
            return False
        # Written as soon as it is given, in the upstream's read (``Owed``).
        out = Owed(self._flush)
        if not replayer.again(
            data[forward.body_at :], token, forward.rest, forward.who or self.who, out
        ):
            return False
        self.requests += 1
        lines = forward.cors + server.id_head + b"%x\r\n" % server.ids()
        self._queue.append(Awaited(out, True, lines))
        if out.done():  # given inside the send, before it was queued (a failed write)
            self._flush()
        return True

    def _pays(self, replay: Replay, who: Identity) -> bool:
        """Whether ``who``'s bucket pays for a replay now (a hit's cost). Not: the request
        takes the pipeline's path, which refuses it (429) or, under shared buckets, leases
        first."""
        limiter = self.server.limiter
        if limiter is None:
            return True
        return not limiter.take_call(who, replay.record.method, True)

    def _rpc(
        self, body: bytes, keep_alive: bool, cors: bytes | None = None, who: Identity | None = None
    ) -> bytes | typing.Awaitable[bytes | None] | None:
        """``routes.rpc``'s answer to ``body`` from ``who`` (None: the connection's identity);
        None when it was refused for the client's rate and answered so (429)."""
        try:
            return self.server.routes.rpc(body, who or self.who)
        except RateLimited as exc:
            self._rate_limited(exc, keep_alive, cors)
            return None

    def _rate_limited(self, exc: RateLimited, keep_alive: bool, cors: bytes | None) -> None:
        """429 with the JSON-RPC answer (-32005) and Retry-After in whole seconds, rounded
        up; the connection stays open. (Counted where it was refused, in the pipeline.)"""
        self._send(429, exc.answer, keep_alive, _retry_after(exc.retry_after), cors)

    def _feed(self, data: bytes) -> None:
        """Parse one read (or a slice of one) with httptools."""
        if self._phase is _HEAD:  # a request head split over reads: keep it for an upgrade
            self._head_buf.append(data)
        self._chunk = data
        self._at = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data, int(upgrade.args[0]))
            return
        except httptools.HttpParserError:
            self.server.metrics.rejected.labels("bad_http").inc()
            self._plain(400, b"malformed HTTP request", keep_alive=False)
            return
        finally:
            self._chunk = b""  # not held past its parse: a body's read is megabytes
        if self._phase is not _HEAD:
            return
        # Still inside a head after this read: it is only ever head bytes that pile up,
        # held (for an upgrade) and counted until the head ends.
        held = sum(map(len, self._head_buf))
        if held - (self._head_at or 0) > self.server.limits.max_header_bytes + _PARTIAL_HEAD_END:
            self._reject_head()
            return
        over = self._in.settle(held)
        if over is not None:
            self._refuse_unbuffered(over)

    def _parse_rest(self) -> None:
        """Parse what is left of a large read a slice at a time, until it is all parsed,
        reading is paused for another reason (answers owed, a client that does not read
        them: ``_resume`` comes back here) or this turn has begun
        ``max_requests_per_turn`` requests: the rest waits for the next loop turn, so a
        pipelined flood on one connection never holds the loop from the others. While a
        rest waits, reading stays paused (``Paused.TURN``)."""
        self._parse_soon = False
        data, at = self._rest, self._rest_at
        last = self.requests + self.server.limits.max_requests_per_turn
        transport = self.transport
        assert transport is not None
        while at < len(data):
            if self._phase is _LINGERING or transport.is_closing():
                at = len(data)  # nothing more is answered
                break
            if self._paused & _NOT_TURN:
                break
            if self.requests >= last:
                self._rest_at = at
                self._pause(Paused.TURN)
                self._parse_later()
                return
            end = at + PARSE_SLICE
            if self._phase is _BODY and self._body_size > 0:
                end = max(end, at + self._body_size - self._body_len)  # the body whole
            self._feed(data[at:end])
            at = end
            if self._phase is _UPGRADED:
                if at < len(data):
                    self._rest = b""
                    self.data_received(data[at:])  # the WebSocket session's first frames
                at = len(data)
        if at < len(data):
            self._rest_at = at
            self._pause(Paused.TURN)
            return
        self._rest = b""
        self._resume(Paused.TURN)

    def _parse_later(self) -> None:
        if not self._parse_soon:
            self._parse_soon = True
            asyncio.get_running_loop().call_soon(self._parse_rest)

    def _plain_post(self, data: bytes, split: tuple[bytes, bytes] | None = None) -> bool:
        """Answer a read that holds exactly one ordinary keep-alive POST, without httptools.

        The common case of every JSON-RPC client, taken only when nothing in the head asks
        for more than a length-delimited body (no chunking, upgrade, Expect, Connection or
        a second Content-Length); anything else goes to httptools untouched.
        """
        server = self.server
        limits = server.limits
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > limits.max_header_bytes:
            return False
        head = data[:end]
        # A client sends a few heads again and again (they differ in Content-Length): what
        # each says is read by regex once (about 2 µs) and then looked up.
        plain = server.plain_heads.get(head)
        if plain is None:
            plain = server.read_plain_head(head)
        n, cors, named, gzip, incoming = plain
        if n < 0 or len(data) != end + 4 + n or n > limits.max_body_bytes:
            return False
        self.requests += 1
        # A request that names its id keeps it; a replay writes a fresh one, so such a
        # request is never learned as one.
        if incoming is None:
            lines = cors + server.id_head + b"%x\r\n" % server.ids()
        else:
            lines = cors + server.id_line(incoming)
        who = self.who
        if self._per_request:
            known = server.named_heads.get(head)
            if known is not None and known[1] is self._proxied:
                who = known[0] or who
            else:
                got = self._who_in_head(head)
                if got.__class__ is Refusal:
                    self._refuse(got, True, lines)
                    return True
                who = typing.cast(Identity, got)
                server.name_head(head, None if who is self.who else who, self._proxied)
        routes = server.routes
        replayer = routes.replayer
        if replayer is None:
            answered = self._rpc(data[end + 4 :], True, lines, who)
            if answered is not None:
                self._answer(answered, True, lines, gzip, who)
            return True
        try:
            answer, record = replayer.serve(data[end + 4 :], who)
        except RateLimited as exc:
            self._rate_limited(exc, True, lines)
            return True
        # A replay writes the answer as it is: never one a client asked to have gzipped.
        # It keeps who the request named (a key, a forwarded address), if not the
        # connection's own client: the same bytes name the same client again.
        if (
            record is not None
            and split is not None
            and not named
            and not gzip
            and answer.__class__ is bytes
        ):
            its = None if who is self.who else who
            server.learn_replay(split[1], split[0], answer, record, cors, its, self._proxied)
        elif (
            record is None
            and split is not None
            and not named
            and not gzip
            and answer.__class__ is asyncio.Future
        ):
            # The body without its id: the request's without it, past the head (the id
            # is the body's when it is the request's only one, as learn_forward checks).
            generation = replayer.passed(split[1][end + 4 :])
            if generation is not None:
                its = None if who is self.who else who
                server.learn_forward(split, end + 4, generation, cors, its, self._proxied)
        self._answer(answer, True, lines, gzip, who)
        return True

    def _who_in_head(self, head: bytes) -> Identity | Refusal:
        """``Door.admit`` for a plain POST's head, its header lines read by one regex."""
        door = self.server.door
        assert door is not None
        found: dict[bytes, bytes] = {}
        for name, value in _WHO_LINES.findall(head):
            name = name.lower()
            value = value.rstrip(b" \t")
            found[name] = found[name] + b", " + value if name in found else value
        target = head[5 : head.find(b" ", 5)]
        return door.admit(self.who, self._proxied, found.get, target)

    def _request_who(self) -> Identity | Refusal:
        """The identity of the request httptools read last, or why it is refused."""
        door = self.server.door
        if not self._per_request or door is None:
            return self.who
        return door.admit(self.who, self._proxied, self.headers, self._url)

    def _refuse(self, refusal: Refusal, keep_alive: bool, cors: bytes | None = None) -> None:
        """401 (no valid key) or 403 (a key's origin), with a JSON-RPC error body."""
        self.server.metrics.rejected.labels(
            "unauthorized" if refusal is Refusal.UNAUTHORIZED else "origin"
        ).inc()
        extra = b"WWW-Authenticate: Bearer\r\n" if refusal is Refusal.UNAUTHORIZED else b""
        self._send(refusal.value, REFUSAL_BODIES[refusal], keep_alive, extra, cors)

    def _hold_head(self, data: bytes) -> bool:
        """Keep a read that is exactly one plain POST head announcing a body, until the
        body's read: clients that write head and body apart (Python's http.client, hence
        requests and web3.py's HTTPProvider) then take the fast paths too, in one pass.

        Not with Expect (the client would wait for a 100 first), any other header that
        keeps a POST off the fast path, or a length over the limit.
        """
        end = len(data) - 4
        if end <= 0 or end > self.server.limits.max_header_bytes:
            return False
        if data.find(b"\r\n\r\n") != end or SPECIAL.search(data) is not None:
            return False
        if data.startswith(b"POST " + BATCHES_PATH):
            return False
        length = CONTENT_LENGTH.search(data)
        if length is None or not 0 < int(length.group(1)) <= self.server.limits.max_body_bytes:
            return False  # no body to wait for, or one refused at once (413)
        if self._in.take(len(data)) is not None:
            return False  # httptools reads it, and refuses its body (429, 503)
        self._held = data
        self._phase = _ON_HOLD[self._phase]
        return True

    # --- httptools callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        self.requests += 1
        self._phase = _ON_BEGIN[self._phase]
        self._head_buf = [self._chunk]
        self._head_at = self._at
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def header(self, name: bytes) -> bytes | None:
        """A request header by lower-case name (looked up only off the hot path)."""
        for k, v in self._headers:
            if k.lower() == name:
                return v
        return None

    def headers(self, name: bytes) -> bytes | None:
        """Every line of a request header, joined as one list (RFC 9110 5.3); None if
        absent."""
        got = [v for k, v in self._headers if k.lower() == name]
        return b", ".join(got) if got else None

    def on_headers_complete(self) -> None:
        self._phase = _ON_HEADERS[self._phase]
        if self._phase is not _BODY:
            return  # refused while it still came in, or the last answer is out
        if self._head_bytes() > self.server.limits.max_header_bytes:
            self._reject_head()
            return
        self._body = []
        self._body_len = 0
        if self._in.held:
            self._in.release()  # the head split over reads, now parsed
        if self.parser.should_upgrade():
            return  # _head_buf is kept for the WebSocket handshake
        self._head_buf = []
        length = self.header(b"content-length")
        self._body_size = -1
        if length is not None and length.isdigit():
            self._body_size = int(length)
            if self._body_size > self.server.limits.max_body_bytes:
                self._reject_too_large()

    def _head_bytes(self) -> int:
        """The size of the head just read, as ``_plain_post`` measures a head in one read:
        its raw bytes, so that where a client's reads split a request never decides
        whether it is answered. Also moves ``_at`` past the head."""
        start = self._head_at
        bufs = self._head_buf
        if start is None:  # after a chunked body in this read: the parsed fields, as sent
            self._at = None
            return len(self._url) + sum(len(k) + len(v) + 3 for k, v in self._headers)
        data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
        # As httptools reads a head: blank lines before it skipped, its end the first empty
        # line (CRLF or bare LF); measured up to its last line's end, as _plain_post does.
        while data[start : start + 1] in (b"\r", b"\n"):
            start += 1
        lf = data.find(b"\n\n", start)
        crlf = data.find(b"\n\r\n", start)
        if crlf >= 0 and (lf < 0 or crlf < lf):
            end, after = crlf, crlf + 3
        elif lf >= 0:
            end, after = lf, lf + 2
        else:  # httptools saw the blank line, so only a miscount gets here
            self._at = None
            return len(data) - start
        self._at = after - (len(data) - len(self._chunk))
        return end - start - (data[end - 1 : end] == b"\r")

    def on_chunk_header(self) -> None:
        self._at = None  # the chunk's size line is not handed over: positions are lost

    def on_body(self, body: bytes) -> None:
        if self._at is not None:
            self._at += len(body)
        if self._phase is not _BODY:
            return  # refused, or the connection's last answer is out
        n = len(body)
        # The piece that ends a body is handed over in this same read: not counted, so a
        # request whose body comes whole in one read is answered even on a full node.
        if self._body_len + n != self._body_size:
            over = self._in.take(n)
            if over is not None:
                self._refuse_unbuffered(over)
                return
        self._body.append(body)
        self._body_len += n
        if self._body_len > self.server.limits.max_body_bytes:
            self._body = []
            self._in.release()
            self._reject_too_large()

    def on_message_complete(self) -> None:
        phase = self._phase
        self._phase = _ON_COMPLETE[phase]
        if phase is _REFUSED or phase is _LINGERING or self.parser.should_upgrade():
            return  # an upgrade is answered when httptools raises HttpParserUpgrade
        if self._in.held:
            self._in.release()  # the body is handed over now
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        if method == b"POST":
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            self._body = []
            batches = self.server.routes.batches
            if batches is not None and self._url.split(b"?", 1)[0] == BATCHES_PATH:
                self._batch_post(batches, body, keep_alive)
                return
            who = self._request_who()
            if who.__class__ is Refusal:
                self._refuse(who, keep_alive)
                return
            who = typing.cast(Identity, who)
            via = self.headers(b"via")
            if via is None:
                answer = self._rpc(body, keep_alive, None, who)
                if answer is not None:
                    self._answer(answer, keep_alive, None, who=who)
            else:
                self._relayed(body, via, keep_alive, who)
        elif method == b"GET":
            self._get(keep_alive)
        elif method == b"OPTIONS":
            self._preflight(keep_alive)
        else:
            self._plain(405, b"method not allowed", keep_alive)

    def _relayed(self, body: bytes, via: bytes, keep_alive: bool, who: Identity) -> None:
        """A request another relay forwarded (``Via``, RFC 9110 7.6.3): refused with 508 if
        it passed through this node already (relays that are each other's upstreams would
        pass a miss or a write round forever); else served with its Via carried on to any
        upstream request made for it."""
        server = self.server
        relays = relays_in(via)
        looped = server.via and server.via.encode() in relays
        if looped or len(relays) >= server.limits.max_relay_hops:
            server.metrics.rejected.labels("relay_loop").inc()
            self._plain(508, b"relay loop: this request passed through this node", keep_alive)
            return
        token = enter_via(", ".join(f"1.1 {r.decode()}" for r in relays))
        try:
            answer = self._rpc(body, keep_alive, None, who)
            if answer is not None:
                self._answer(answer, keep_alive, None, who=who)
        finally:
            leave_via(token)

    def _batch_post(self, batches: BatchRoutes, body: bytes, keep_alive: bool) -> None:
        if not batches.authorized(self.header(b"authorization")):
            batches.refuse_unauthorized()
            self._plain(401, b"a push needs Authorization: Bearer <api key>", keep_alive)
            return
        self._reply(batches.post(body), keep_alive)

    def _reply(self, reply: Awaitable[Reply], keep_alive: bool) -> None:
        """Queue an answer made elsewhere (any status and content type), in request order."""

        async def whole() -> bytes:
            try:
                status, body, content_type = await reply
            except Exception:
                # Never a 200: on POST /batches a 200 says "acknowledged".
                log.exception("answer to %s failed", path.decode(errors="replace"))
                status, body, content_type = 500, b'{"error":"internal error"}', None
            return self.server.head(status, len(body), keep_alive, cors, content_type) + body

        if replies_under_way(self._queue) >= self.server.limits.max_pending_replies:
            # Each may be megabytes (range answers): a few at a time per connection. A
            # pipelined burst arrives in one read, parsed whole before reading could pause,
            # so the rest is refused, each in its turn, not held.
            if isinstance(reply, Coroutine):
                reply.close()
            self.server.metrics.rejected.labels("too_many_pending").inc()
            self._plain(429, b"too many answers under way on this connection", keep_alive)
            return
        path = self._url
        cors = self._lines()
        fut: asyncio.Future[bytes] = asyncio.ensure_future(whole())
        self._queue.append(AwaitedReply(fut, keep_alive, cors))
        fut.add_done_callback(self._flush)

    # --- answers ---------------------------------------------------------------------
    def _answer(
        self,
        result: bytes | Awaitable[bytes | None],
        keep_alive: bool,
        cors: bytes | None = None,
        gzip: bool = False,
        who: Identity | None = None,
    ) -> None:
        """Write a POST's answer now or once it is ready, in request order. ``cors``: the
        answer's own head lines (CORS, X-Request-Id), and ``gzip`` whether the client
        accepts gzip, when they were not left to be read from httptools' headers; ``who``:
        the request's identity (None: the connection's)."""
        if cors is None:
            # Read now: by the time an answer that waits is written, the headers at hand
            # may be those of a later request.
            cors = self._lines()
            gzip = accepts_gzip(self.header(b"accept-encoding"))
        if result.__class__ is bytes:
            if gzip:
                assert isinstance(result, bytes)
                result, cors = self._gzipped(result, cors)
            # The hot path: a synchronous answer on an idle keep-alive connection.
            if keep_alive and not self._queue:
                self._write_ok(result, cors)
            else:
                self._send(200, result, keep_alive, cors=cors)
            return
        assert not isinstance(result, bytes)
        if result.__class__ is CoroutineType:
            # A miss: its coroutine, straight into a task (ensure_future's checks cost more).
            # The task keeps the client's identity (limits per client); hits never set it.
            coro = typing.cast("Coroutine[object, object, bytes | None]", result)
            token = enter_identity(who or self.who)
            fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_task(coro)
            leave_identity(token)
        elif result.__class__ is asyncio.Future:
            # A read already sent upstream (RpcService's forwarding path): no task to make.
            fut = typing.cast("asyncio.Future[bytes | None]", result)
        else:
            token = enter_identity(who or self.who)
            fut = asyncio.ensure_future(result)
            leave_identity(token)
        self._queue.append(Awaited(fut, keep_alive, cors, gzip))
        fut.add_done_callback(self._flush)
        if len(self._queue) > self.server.limits.max_pending_per_connection:
            self._pause(Paused.BACKLOG)

    def _gzipped(self, body: bytes, lines: bytes) -> tuple[bytes, bytes]:
        """An answer for a client that accepts gzip: gzipped from ``gzip_min_bytes`` on."""
        compression = self.server.compression
        if len(body) < compression.gzip_min_bytes:
            return body, lines
        return compression.gzip(body), lines + GZIP_LINES

    def _cors(self) -> bytes:
        """The CORS lines for the request httptools read last, when origins are listed."""
        return self.server.cors_lines(self.header(b"origin"))

    def _lines(self) -> bytes:
        """The head lines of the answer to the request httptools read last: its CORS lines
        (origins listed) and its X-Request-Id."""
        server = self.server
        rid = server.id_line(self.header(b"x-request-id"))
        return rid if server.cors_any else self._cors() + rid

    def _send(
        self,
        status: int,
        body: bytes,
        keep_alive: bool,
        extra: bytes = b"",
        cors: bytes | None = None,
    ) -> None:
        if cors is None:
            cors = self._lines()
        data = self.server.head(status, len(body), keep_alive, extra + cors) + body
        if self._queue:
            self._queue.append(Ready(data, keep_alive))
            return
        self._write(data, keep_alive)

    def _write_ok(self, body: bytes, lines: bytes) -> None:
        """200 OK on a keep-alive connection: the prebuilt head, the length and the
        answer's own ``lines`` (X-Request-Id, CORS)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        head = self.server.ok_head + b"%d\r\n%b\r\n" % (len(body), lines)
        if len(body) > LARGE_BODY:
            transport.writelines((head, body))  # no copy of a large answer
        else:
            transport.write(head + body)

    def _write(self, data: bytes, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._phase is _LINGERING:
            return
        transport.write(data)
        if not keep_alive:
            self._linger()

    def _linger(self) -> None:
        """The connection's last answer is written: shut the write side once it is out,
        and read and drop what the client still sends until it closes, for at most
        ``linger_timeout`` and ``linger_bytes``. Closing at once would make the kernel
        answer bytes still coming (the rest of a refused body) with a reset, which may
        reach the client before it read its answer (a 413 or 429 lost)."""
        transport = self.transport
        assert transport is not None
        self._phase = _ON_LINGER[self._phase]
        self._body = []
        self._held = b""
        self._rest = b""
        self._head_buf = []
        self._in.release()
        cancel_all(self._queue)  # written after this answer, they would never be read
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        limits = self.server.limits
        self._lingering = asyncio.get_running_loop().call_later(limits.linger_timeout, self.close)
        if self._paused:  # nothing more is answered: nothing to wait for before reading
            self._paused = 0
            transport.resume_reading()

    def _flush(self, _fut: object = None) -> None:
        """Write the answers now ready at the front of the queue, in request order."""
        q = self._queue
        if len(q) == 1 and self._flush_one(q[0]):
            q.clear()
        else:
            self._flush_all(q)
        if (
            self._paused & Paused.BACKLOG
            and len(q) <= self.server.limits.max_pending_per_connection // 2
        ):
            self._resume(Paused.BACKLOG)

    def _flush_one(self, entry: Pending) -> bool:
        """Write the one answer owed on a keep-alive connection when it is the usual kind:
        a JSON-RPC answer done, not gzipped. False: ``_flush_all`` writes it (or waits)."""
        if entry.__class__ is not Awaited or self._phase is _LINGERING:
            return False
        fut = entry.answer
        if (
            not entry.keep_alive
            or entry.gzip
            or not fut.done()
            or fut.cancelled()
            or fut.exception() is not None
        ):
            return False
        self._write_ok(fut.result() or b"", entry.cors)
        return True

    def _flush_all(self, q: PendingQueue) -> None:
        for entry in pop_ready(q):
            keep_alive = entry.keep_alive
            if self._phase is _LINGERING:
                break  # the last answer is out
            if isinstance(entry, Ready):
                self._write(entry.data, keep_alive)
                continue
            limited = _rate_limit_of(entry.answer)
            if limited is not None:  # refused once its lease came back (shared buckets)
                extra = _retry_after(limited.retry_after) + entry.cors
                head = self.server.head(429, len(limited.answer), keep_alive, extra)
                self._write(head + limited.answer, keep_alive)
                continue
            body = outcome(entry.answer)
            if body is None:
                body = INTERNAL_ERROR
            elif isinstance(entry, AwaitedReply):
                self._write(body, keep_alive)
                continue
            lines = entry.cors
            if isinstance(entry, Awaited) and entry.gzip:
                body, lines = self._gzipped(body, lines)
            if keep_alive:
                self._write_ok(body, lines)  # the head head(200, ...) builds, prebuilt
            else:
                head = self.server.head(200, len(body), keep_alive, lines)
                self._write(head + body, keep_alive)

    def _plain(self, status: int, text: bytes, keep_alive: bool) -> None:
        body = orjson.dumps({"error": text.decode()})
        self._send(status, body, keep_alive)

    def _reject_head(self) -> None:
        self._phase = _ON_REFUSE[self._phase]
        self.server.metrics.rejected.labels("header_too_large").inc()
        self._plain(431, b"request head too large", keep_alive=False)

    def _reject_too_large(self) -> None:
        self._phase = _ON_REFUSE[self._phase]
        self.server.metrics.rejected.labels("body_too_large").inc()
        limit = self.server.limits.max_body_bytes
        self._plain(413, b"request body larger than %d bytes" % limit, keep_alive=False)

    def _get(self, keep_alive: bool) -> None:
        path = self._url.split(b"?", 1)[0]
        routes = self.server.routes
        if path == b"/health" and routes.health is not None:
            status, body = routes.health()
            self._send(status, body, keep_alive)
        elif path == RANGE_PATH and routes.feed_range is not None:
            query = self._url.split(b"?", 1)[1] if b"?" in self._url else b""
            self._reply(routes.feed_range(query, self.headers(b"via")), keep_alive)
        elif path in routes.pages:
            status, body, content_type = routes.pages[path]()
            head = self.server.head(status, len(body), keep_alive, self._lines(), content_type)
            if self._queue:
                self._queue.append(Ready(head + body, keep_alive))
            else:
                self._write(head + body, keep_alive)
        elif path == b"/metrics" and routes.metrics_text is not None:
            text = routes.metrics_text()
            if text.__class__ is not bytes:  # gathered from the other workers: later
                self._reply(_metrics_reply(typing.cast("Awaitable[bytes]", text)), keep_alive)
                return
            assert isinstance(text, bytes)
            data = (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n%b"
                b"Content-Length: %d\r\n\r\n" % (self._lines(), len(text))
            ) + text
            if self._queue:
                self._queue.append(Ready(data, keep_alive))
            else:
                self._write(data, keep_alive)
        else:
            self._plain(
                404, b"not found: POST JSON-RPC to any path; GET /health, /metrics", keep_alive
            )

    def _preflight(self, keep_alive: bool) -> None:
        req_headers = self.header(b"access-control-request-headers") or b"content-type"
        extra = (
            b"Access-Control-Allow-Methods: POST, GET, OPTIONS\r\n"
            b"Access-Control-Allow-Headers: " + req_headers + b"\r\n"
            b"Access-Control-Max-Age: 86400\r\n"
        )
        self._send(204, b"", keep_alive, extra)

    def _upgrade(self, data: bytes, offset: int) -> None:
        assert self.transport is not None
        if self._phase is _LINGERING:
            return  # an upgrade pipelined behind the connection's last answer
        head = b"".join(self._head_buf[:-1]) + data[:offset]
        if self._head_at:  # the read began with earlier messages, already answered
            head = head[self._head_at :]
        rest = data[offset:]
        self._head_buf = []
        limits = self.server.limits
        feed = self.server.routes.feed
        path = self._url.split(b"?", 1)[0]
        session: WsSession
        batches = self.server.routes.batches
        door = self.server.door
        who = self.who
        if self._proxied and door is not None:
            who = door.client(who, self.headers)  # a push or a feed child: no key here
            # A WebSocket through a trusted proxy is one client's from now on (a keep-alive
            # connection of the proxy carried many): counted under its address from here.
            if self._counted is None and not self._count_connection(who.name):
                return
        if batches is not None and path == BATCHES_PATH:
            if not batches.authorized(self.header(b"authorization")):
                batches.refuse_unauthorized()
                self._plain(401, b"a push needs Authorization: Bearer <api key>", False)
                return
            self._count_sends = False
            session = batches.open(
                self.transport,
                ip=who.name,
                max_send_buffer=limits.max_ws_send_buffer,
                close_timeout=limits.ws_close_timeout,
            )
        elif feed is not None and path == FEED_PATH:
            self._count_sends = False
            session = feed(
                self.transport,
                ip=who.name,
                max_send_buffer=limits.max_ws_send_buffer,
                close_timeout=limits.ws_close_timeout,
            )
        else:
            got = self._request_who()
            if got.__class__ is Refusal:
                self._refuse(got, False)
                return
            who = typing.cast(Identity, got)  # what the session's every message is
            session = WsSession(
                self.transport,
                self.server.routes.rpc,
                ip=who.name,
                max_message_bytes=limits.max_ws_message_bytes,
                max_send_buffer=limits.max_ws_send_buffer,
                max_pending=limits.max_pending_per_connection,
                open_subscriptions=self.server.routes.ws_subscriptions,
                close_timeout=limits.ws_close_timeout,
                sends=self._out,
                deflate=self.server.compression.ws_deflate,
                request_id=self.server.request_id(self.header(b"x-request-id")).decode(),
                who=who,
            )
        if not session.accept(head):
            self.transport.close()
            return
        self.ws = session
        self._phase = _ON_UPGRADE[self._phase]
        metrics = self.server.metrics
        metrics.connections.labels("http").dec()
        metrics.connections.labels("ws").inc()
        if rest:
            session.data_received(rest)


def _peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else ""


class ProxiedHttpProtocol(HttpProtocol):
    """A connection of a ``proxy_protocol`` listener: its first bytes are a PROXY header
    (``access/proxyproto.py``) naming the client, taken only from a trusted proxy. A
    connection from anywhere else, or one that does not begin with a whole, well-formed
    header within ``max_proxy_header_bytes``, is closed without an answer (what it sent is
    not HTTP to this listener). Until the header is read, the connection counts as no
    client's."""

    __slots__ = ("_proxy_buf",)

    def __init__(self, server: HttpServer) -> None:
        super().__init__(server)
        self._proxy_buf: bytes | None = b""  # None: the header is read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._opened(transport)
        door = self.server.door
        if door is None or _peer_address(transport) not in door.trusted:
            self.server.metrics.rejected.labels("proxy_header").inc()
            transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self._proxy_buf
        if buf is None:
            super().data_received(data)
            return
        transport = self.transport
        assert transport is not None
        buf += data
        limit = self.server.max_proxy_header_bytes
        try:
            header = parse_proxy_header(buf, limit)
            if header is None and len(buf) >= limit:
                raise ProxyHeaderError(f"no whole PROXY header in {limit} bytes")
        except ProxyHeaderError as exc:
            self._proxy_buf = b""
            self.server.metrics.rejected.labels("proxy_header").inc()
            log.debug("closing a connection: %s", exc)
            transport.close()
            return
        if header is None:
            self._proxy_buf = buf
            return
        self._proxy_buf = None
        self._admit(header.source or _peer_address(transport))
        rest = buf[header.length :]
        if rest and not transport.is_closing():
            super().data_received(rest)


def _reading_proxy_headers(cls: type[HttpProtocol]) -> type[HttpProtocol]:
    """``cls``'s connections, reading a PROXY header first (``ProxiedHttpProtocol``)."""
    if cls is HttpProtocol:
        return ProxiedHttpProtocol
    return type(f"Proxied{cls.__name__}", (cls, ProxiedHttpProtocol), {"__slots__": ()})
