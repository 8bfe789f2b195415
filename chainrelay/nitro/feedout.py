"""A node's Nitro feed endpoint (``[nitro] listen``): Nitro's own broadcast protocol, for
Nitro nodes and any client written for the sequencer's feed.

The upgrade: a client may send ``Arbitrum-Feed-Client-Version`` (below 2: refused 400,
as Nitro refuses it) and ``Arbitrum-Requested-Sequence-Number``; the answer carries
``Arbitrum-Feed-Server-Version: 2`` and ``Arbitrum-Chain-Id``. Compression is agreed
when the client offers it, as Nitro's relay agrees it (``chainrelay.nitro.deflate``):
Nitro's ``Arbitrum-permessage-deflate`` (a Nitro node's offer), or the standard
permessage-deflate; each message is compressed once for every client that agreed. Then,
as Nitro's relay does: the messages from the requested number (without one: the whole
backlog held here), then live ones with no gap and no duplicate, each as
``{"version":1,"messages":[<the feed message's bytes as the sequencer sent them>]}``,
and each confirmation as ``{"version":1,
"confirmedSequenceNumberMessage":{"sequenceNumber":N}}``.

Each client reads the stream at its own pace from one shared place: the messages come
from the node's batch stream (the hub's backlog, or for a number it holds no more the
range endpoint, which climbs the tree to a node that holds it, the entry node's durable
log included). A message is unpacked from its frame and wrapped once per node, not once
per client (``NITRO_RECENT_MESSAGES`` are kept wrapped, and older ones read for a
client catching up are kept, up to ``NITRO_RANGE_CACHE_BYTES``, for all the others: a
client holds at most ``write_buffer_bytes`` of them at a time). A number held nowhere is passed
over to the oldest one held, as Nitro's relay serves a request older than its backlog.

Limits, per client address: ``max_connections_per_ip`` (429 past it), and a client that
falls more than ``send_queue_messages`` behind the newest, or whose socket stays full for
``send_timeout``, is disconnected (it reconnects with its next number); a client's own
messages are read within 4 KiB and dropped (a feed client sends none).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from chainrelay.batches.frame import decode_range, open_frame
from chainrelay.config import NitroConfig, parse_listen
from chainrelay.metrics import Metrics
from chainrelay.nitro.codec import (
    CHAIN_ID_HEADER,
    CLIENT_VERSION_HEADER,
    FEED_VERSION,
    REQUESTED_SEQ_HEADER,
    SEQ_END,
    SERVER_VERSION_HEADER,
    encode_broadcast,
)
from chainrelay.nitro.deflate import NITRO_ANSWER, NITRO_EXTENSION, SharedDeflate, server_extensions
from chainrelay.tree.frame import Frame, FrameError, decode, unpack
from chainrelay.tree.hub import FeedHub
from chainrelay.tree.streams import BatchSpec, BatchStream

log = logging.getLogger(__name__)

# What a feed client may send: nothing but control frames; a message is read within this.
CLIENT_MESSAGE_MAX = 4096
CLOSE_TOO_SLOW = 1008
EXTENSIONS_HEADER = "Sec-WebSocket-Extensions"
RangeReader = Callable[[bytes], Awaitable[tuple[int, bytes, bytes]]]


class NitroServer:
    """Serves stream ``spec.name`` of ``hub`` in Nitro's protocol at ``cfg.listen``."""

    def __init__(
        self,
        cfg: NitroConfig,
        hub: FeedHub,
        spec: BatchSpec,
        metrics: Metrics,
        *,
        read_range: RangeReader | None = None,
        max_frame_bytes: int,
        reuse_port: bool = False,
    ) -> None:
        """``read_range``: the node's range endpoint (``BatchRange.serve``), for numbers
        the hub no longer holds; ``reuse_port``: one of the workers of ``serve --workers
        N``, each serving the endpoint on the same port (SO_REUSEPORT)."""
        self.cfg = cfg
        self.hub = hub
        self.spec = spec
        self.metrics = metrics
        self.read_range = read_range
        self.max_frame_bytes = max_frame_bytes
        self.reuse_port = reuse_port
        self.port = 0
        self._server: Server | None = None
        self._recent: OrderedDict[int, bytes] = OrderedDict()  # seq -> wrapped broadcast
        self._wake: asyncio.Future[None] | None = None
        self._confirmed: int | None = None
        self._per_ip: dict[str, int] = {}
        self._clients = 0
        self._handlers: set[asyncio.Task[Any]] = set()
        self._counters: dict[str, Any] = {}
        self._requested: dict[ServerConnection, int | None] = {}
        # Each message's compressed bytes, made once for all clients: kept (with the
        # message's text) up to range_cache_bytes, the recent and older ones alike.
        self.deflate = SharedDeflate(cfg.range_cache_bytes)
        # Older messages, wrapped once for every client catching up (range_cache_bytes).
        self._older: OrderedDict[int, bytes] = OrderedDict()
        self._older_bytes = 0
        self._loading: dict[int, asyncio.Future[list[bytes]]] = {}
        self._loads = asyncio.Semaphore(cfg.range_loads)
        self.loads = 0  # pages of older messages read (from the backlog or the range endpoint)

    async def start(self) -> None:
        self._wake = asyncio.get_running_loop().create_future()
        self.hub.listeners.append(self._on_frame)
        self.hub.confirm_listeners.append(self._on_confirmed)
        st = self.hub.streams[self.spec.name]
        if isinstance(st, BatchStream) and st.confirmed is not None:
            self._confirmed = st.confirmed[0]
        host, port = parse_listen(self.cfg.listen, "nitro.listen")
        self._server = await serve(
            self._handle,
            host,
            port,
            process_request=self._admit,
            process_response=self._headers,
            compression=None,
            extensions=server_extensions(self.deflate) if self.cfg.compression else None,
            max_size=CLIENT_MESSAGE_MAX,
            max_queue=4,
            write_limit=self.cfg.write_buffer_bytes,
            server_header=None,
            reuse_port=self.reuse_port or None,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info("nitro feed of %s served on %s:%d", self.spec.name, host, self.port)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.hub.listeners.remove(self._on_frame)
        with contextlib.suppress(ValueError):
            self.hub.confirm_listeners.remove(self._on_confirmed)
        server, self._server = self._server, None
        if server is not None:
            server.close(close_connections=False)
            for t in list(self._handlers):
                t.cancel()
            for conn in list(server.connections):
                conn.transport.abort()
            await server.wait_closed()

    def _count(self, outcome: str) -> None:
        c = self._counters.get(outcome)
        if c is None:
            c = self._counters[outcome] = self.metrics.nitro_messages.labels("out", outcome)
        c.inc()

    # --- what the hub takes ------------------------------------------------------------------
    def _on_frame(self, frame: Frame, _source: str) -> None:
        """Every frame the hub keeps, in sequence for a batch stream: wrapped once here."""
        if frame.stream != self.spec.name:
            return
        try:
            plain = unpack(frame, self.spec.max_payload_bytes)
        except FrameError as exc:  # checked already by the hub: not expected
            log.error("nitro message %d unreadable: %s", frame.position, exc)
            return
        self._remember(frame.position, encode_broadcast([plain]))
        self._wake_all()

    def _on_confirmed(self, stream: str, seq: int) -> None:
        if stream == self.spec.name:
            self._confirmed = seq
            self._wake_all()

    def _remember(self, seq: int, text: bytes) -> None:
        recent = self._recent
        recent[seq] = text
        while len(recent) > self.cfg.recent_messages:
            recent.popitem(last=False)

    def _wake_all(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        self._wake = asyncio.get_running_loop().create_future()

    # --- the upgrade --------------------------------------------------------------------------
    def _admit(self, conn: ServerConnection, request: Request) -> Response | None:
        headers = request.headers
        version = headers.get(CLIENT_VERSION_HEADER)
        if version is not None:
            if not version.strip().isdigit():
                return self._refuse(
                    conn, HTTPStatus.BAD_REQUEST, f"Malformed {CLIENT_VERSION_HEADER}"
                )
            if int(version) < FEED_VERSION:
                return self._refuse(
                    conn,
                    HTTPStatus.BAD_REQUEST,
                    f"Feed Client version too old: {int(version)}, expected {FEED_VERSION}",
                )
        requested = headers.get(REQUESTED_SEQ_HEADER)
        req: int | None = None
        if requested is not None:
            text = requested.strip()
            if not text.isdigit() or len(text) > 19 or int(text) >= SEQ_END:
                return self._refuse(
                    conn, HTTPStatus.BAD_REQUEST, f"Malformed {REQUESTED_SEQ_HEADER}"
                )
            req = int(text)
        ip = _ip(conn)
        if self._per_ip.get(ip, 0) >= self.cfg.max_connections_per_ip:
            self._count("refused_limit")
            log.info("nitro feed: %s holds %d connections; refused", ip, self._per_ip[ip])
            return conn.respond(HTTPStatus.TOO_MANY_REQUESTS, "Too many open feed connections.\n")
        if self._clients >= self.cfg.max_connections:
            self._count("refused_limit")
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Feed connections full.\n")
        self._requested[conn] = req
        # Counted from here, not from the handler: many upgrades at once cannot pass the
        # limit between their checks and their handlers.
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._clients += 1
        return None

    def _refuse(self, conn: ServerConnection, status: HTTPStatus, reason: str) -> Response:
        self._count("bad_request")
        return conn.respond(status, reason + "\n")

    def _headers(self, conn: ServerConnection, request: Request, response: Response) -> Response:
        if response.status_code == HTTPStatus.SWITCHING_PROTOCOLS:
            h: Headers = response.headers
            h[SERVER_VERSION_HEADER] = str(FEED_VERSION)
            h[CHAIN_ID_HEADER] = str(self.spec.chain_id)
            ext = h.get(EXTENSIONS_HEADER, "")
            if ext.startswith(NITRO_EXTENSION + ";"):
                # Nitro's answer as Nitro's server writes it, to the byte.
                del h[EXTENSIONS_HEADER]
                h[EXTENSIONS_HEADER] = NITRO_ANSWER
        elif conn in self._requested:
            # Admitted, but the upgrade failed: the handler will never run.
            self._requested.pop(conn, None)
            self._release(_ip(conn))
        return response

    def _release(self, ip: str) -> None:
        n = self._per_ip.get(ip, 0) - 1
        if n > 0:
            self._per_ip[ip] = n
        else:
            self._per_ip.pop(ip, None)
        self._clients -= 1

    # --- one client ---------------------------------------------------------------------------
    async def _handle(self, conn: ServerConnection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        ip = _ip(conn)
        requested = self._requested.pop(conn, None)
        self.metrics.nitro_clients.inc()
        # A client that leaves while its handler waits for the next message (a quiet feed)
        # ends the handler now: its connection slot is free at once.
        closed = asyncio.ensure_future(conn.wait_closed())
        closed.add_done_callback(lambda _: task.cancel())
        try:
            await self._serve(conn, requested)
        except (ConnectionClosed, asyncio.CancelledError):
            pass
        finally:
            closed.cancel()
            self._handlers.discard(task)
            self.metrics.nitro_clients.dec()
            self._release(ip)

    async def _serve(self, conn: ServerConnection, requested: int | None) -> None:
        nxt = requested
        sent_confirmed: int | None = None
        live = False  # caught up once: from then on, falling behind is being too slow
        while True:
            head = self.hub.next_seq(self.spec.name)  # the number that comes next
            if nxt is None:
                nxt = self._oldest()
            if head is not None and nxt is not None and nxt < head:
                if live and head - nxt > self.cfg.send_queue_messages:
                    self._too_slow(conn, f"{head - nxt} messages behind")
                    return
                texts, nxt = await self._read(nxt, head)
                for text in texts:
                    if not await self._send(conn, text):
                        return
                continue
            live = head is not None
            conf = self._confirmed
            if conf is not None and conf != sent_confirmed and nxt is not None:
                sent_confirmed = conf
                if not await self._send(conn, encode_broadcast([], conf), count=False):
                    return
                continue
            wake = self._wake
            assert wake is not None
            await asyncio.shield(wake)

    def _oldest(self) -> int | None:
        """The first number a client that asked for none gets: the oldest held here."""
        st = self.hub.streams[self.spec.name]
        entries = st.backlog.entries
        if entries:
            return entries[0].position
        return self.hub.next_seq(self.spec.name)

    async def _send(self, conn: ServerConnection, text: bytes, count: bool = True) -> bool:
        try:
            async with asyncio.timeout(self.cfg.send_timeout):
                await conn.send(text, text=True)
        except TimeoutError:
            self._too_slow(conn, f"socket full for {self.cfg.send_timeout:g}s")
            return False
        if count:
            self._count("sent")
        return True

    def _too_slow(self, conn: ServerConnection, why: str) -> None:
        self._count("too_slow")
        log.info("nitro feed: client %s too slow (%s); disconnected", _ip(conn), why)
        # Not a close handshake: a client that reads nothing would hold it for its timeout.
        conn.transport.abort()

    async def _read(self, start: int, end: int) -> tuple[list[bytes], int]:
        """Wrapped messages from ``start`` (fewer than ``end``), and the number after them:
        about ``write_buffer_bytes`` of them (at least one). From the recent ones or the
        older ones kept, else a page read once for all clients from the backlog's frames
        or the range endpoint; a number held nowhere is passed over to the oldest one
        held here."""
        out, at = self._kept(start, end)
        if out:
            return out, at
        texts = await self._load(start, min(end - start, self.cfg.range_page))
        budget = self.cfg.write_buffer_bytes
        used = 0
        for text in texts:
            if out and used + len(text) > budget:
                break
            out.append(text)
            used += len(text)
        if out:
            return out, start + len(out)
        oldest = self._oldest()
        if oldest is None or oldest <= start:
            oldest = end  # nothing older anywhere: only what comes next
        self._count("passed_over")
        log.warning(
            "nitro feed: messages %d-%d are held nowhere reachable; served from %d",
            start,
            oldest - 1,
            oldest,
        )
        return [], oldest

    def _kept(self, at: int, end: int) -> tuple[list[bytes], int]:
        """The run of messages from ``at`` held wrapped here, within the byte budget."""
        recent, older = self._recent, self._older
        budget = self.cfg.write_buffer_bytes
        out: list[bytes] = []
        used = 0
        while at < end:
            text = recent.get(at) or older.get(at)
            if text is None or (out and used + len(text) > budget):
                break
            out.append(text)
            used += len(text)
            at += 1
        return out, at

    async def _load(self, start: int, n: int) -> list[bytes]:
        """Messages ``start``.. (up to ``n``), wrapped and kept among the older ones: one
        read for every client asking for the same number meanwhile, at most
        ``range_loads`` reads at once. Its own task: a client leaving does not end it for
        the others waiting."""
        task = self._loading.get(start)
        if task is None:
            task = asyncio.ensure_future(self._fetch(start, n))
            self._loading[start] = task
            task.add_done_callback(lambda _: self._loading.pop(start, None))
        return await asyncio.shield(task)

    async def _fetch(self, start: int, n: int) -> list[bytes]:
        async with self._loads:
            self.loads += 1
            # The backlog's frames are the hub's own bytes (no copy); a page from the range
            # endpoint is at most its range_max_bytes.
            frames = self.hub.range(self.spec.name, start, n, self.cfg.write_buffer_bytes * 4)
            if frames is None:
                frames = await self._climb(start, n)
            texts: list[bytes] = []
            for raw in frames:
                text = self._open(raw, start + len(texts))
                if text is None:
                    break
                texts.append(text)
        older = self._older
        for i, text in enumerate(texts):
            if start + i not in older:
                older[start + i] = text
                self._older_bytes += len(text)
        while self._older_bytes > self.cfg.range_cache_bytes and older:
            _, text = older.popitem(last=False)
            self._older_bytes -= len(text)
        return texts

    async def _climb(self, start: int, n: int) -> list[bytes]:
        if self.read_range is None:
            return []
        query = f"stream={self.spec.name}&from={start}&limit={n}".encode()
        try:
            status, body, _ctype = await self.read_range(query)
            if status != 200:
                return []
            return decode_range(body, self.max_frame_bytes)
        except (FrameError, OSError, TimeoutError) as exc:
            log.info("nitro feed: range %d+%d failed: %s", start, n, exc)
            return []

    def _open(self, raw: bytes, seq: int) -> bytes | None:
        """A frame's message, wrapped; None if it is not the stream's message ``seq``,
        signed by one of its entry nodes (a frame from the range endpoint is checked as
        every node checks one from a parent)."""
        try:
            frame = decode(raw, self.max_frame_bytes)
            if frame.position != seq or frame.stream != self.spec.name:
                raise FrameError("position", f"{frame.position} for {seq}")
            who, plain = open_frame(frame, self.spec.max_payload_bytes)
        except FrameError as exc:
            log.warning("nitro feed: frame %d unusable: %s", seq, exc)
            return None
        if who not in self.spec.sequencers:
            log.warning("nitro feed: frame %d signed by 0x%s: not an entry node", seq, who.hex())
            return None
        return encode_broadcast([plain])


def _ip(conn: ServerConnection) -> str:
    peer = conn.remote_address
    return str(peer[0]) if peer else "?"
