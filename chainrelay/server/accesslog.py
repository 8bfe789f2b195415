"""The access log (``[server] access_log``): one JSON line per JSON-RPC request over HTTP or
WebSocket message, and per request the front door refused (4xx/5xx), to a file or stderr.

A line holds: ``time`` (UTC, ms), ``id`` (the answer's X-Request-Id; a fresh one for a
WebSocket message), ``client`` (the identity its limits are kept under: "key:<name>" for
a client with a key, else its address, an IPv6 client's network), ``transport``,
``method`` (a list for a batch), ``outcome`` (hit, miss, pass, local, shared_hit,
coalesced, shed, invalid, ``error:<JSON-RPC code>``, or the HTTP status of a refusal; a
list for a batch),
``upstream`` (the upstreams called for it, when it called any), ``status``, ``in`` and
``out`` (body bytes), ``ms`` (from the request's read to its answer). Successful requests
are sampled (``access_log_sample``); errors and refusals are always logged. GETs of
/health and /metrics are not logged: probes and scrapes would drown the rest.

Writing never blocks the loop: lines are buffered and handed, a chunk at a time, to a
thread that writes them (every ``access_log_flush_interval``, or at
``access_log_flush_bytes``). While the disk is slower than the node, what waits is bounded
(``access_log_max_buffer_bytes``): lines past it are dropped and counted
(``chainrelay_access_log_dropped``), never waited for.

A node with the log off pays nothing for it: the log is a subclass of the connection
(``LoggedHttpProtocol``) and a tap on the metrics, both installed only when it is on. With
it on, the replay shortcut is off (each request is parsed and its outcome taken from the
pipeline), which README measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import itertools
import logging
import os
import random
import re
import secrets
import time
import typing
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import orjson

from chainrelay.access.identity import NODE, Identity
from chainrelay.config import ServerConfig
from chainrelay.metrics import Metrics
from chainrelay.server.compress import accepts_gzip
from chainrelay.server.http import HttpProtocol

if typing.TYPE_CHECKING:
    from chainrelay.upstreams.pool import UpstreamPool

log = logging.getLogger(__name__)

Handler = Callable[[bytes, Identity], bytes | Awaitable[bytes | None]]

_ERROR_CODE = re.compile(rb'"error":\{"code":(-?\d+)')
_METHOD = re.compile(rb'"method":"([^"\\]{1,100})"')
_ID_VALUE = re.compile(rb"X-Request-Id: ([^\r]*)\r\n")


class Entry:
    """One request's line in the making: what the pipeline tells of it as it runs."""

    __slots__ = (
        "body",
        "calls",
        "client",
        "coalesced",
        "rid",
        "size",
        "started",
        "transport",
        "upstreams",
    )

    def __init__(self, body: bytes, client: str, transport: str) -> None:
        self.started = time.perf_counter()
        self.body = body  # its method is read from it when the pipeline counted none
        self.size = len(body)
        self.client = client
        self.transport = transport
        self.rid = ""
        self.calls: list[tuple[str, str]] = []
        self.upstreams: list[str] = []
        self.coalesced = 0


# The request being served; tasks started for it inherit it.
_CURRENT: contextvars.ContextVar[Entry | None] = contextvars.ContextVar(
    "chainrelay_access_entry", default=None
)


def _counted(method: str, outcome: str) -> None:
    entry = _CURRENT.get()
    if entry is not None:
        entry.calls.append((method, outcome))


def _coalesced() -> None:
    entry = _CURRENT.get()
    if entry is not None:
        entry.coalesced += 1


class AccessLog:
    """The buffer, its writer thread, and the JSON-RPC handler that logs (``handle``)."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics, rpc: Handler) -> None:
        self.path = cfg.access_log
        self.sample = cfg.access_log_sample
        self.flush_interval = cfg.access_log_flush_interval
        self.flush_bytes = cfg.access_log_flush_bytes
        self.max_bytes = cfg.access_log_max_buffer_bytes
        self.metrics = metrics
        self._rpc = rpc
        self._lines: list[bytes] = []
        self._buffered = 0  # in _lines
        self._writing = 0  # handed to the thread, not yet written
        self._fd = -1
        self._executor: ThreadPoolExecutor | None = None
        self._timer: asyncio.Task[None] | None = None
        self._write: asyncio.Future[None] | None = None
        self.dropped = 0
        # The connection whose read is being handled (``LoggedHttpProtocol``), and the
        # entry of its HTTP request just handled, for its answer to name its id.
        self.conn: HttpProtocol | None = None
        self.last: Entry | None = None
        # Each WebSocket message's id (HTTP answers carry theirs): the same form as the
        # front door's, a prefix of its own.
        self._id_prefix = secrets.token_hex(4) + "-"
        self._ids = itertools.count(1).__next__

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self.path == "-":
            self._fd = os.dup(2)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="chainrelay-access-log")
        self.metrics.tap(_counted, _coalesced)
        self._timer = asyncio.create_task(self._tick())

    def watch(self, pool: UpstreamPool) -> None:
        """Name, in each line, the upstreams its request called."""
        for u in pool.upstreams:
            observe = u.observer
            name = u.name

            def observed(
                outcome: str, seconds: float, observe: typing.Any = observe, name: str = name
            ) -> None:
                if observe is not None:
                    observe(outcome, seconds)
                entry = _CURRENT.get()
                if entry is not None and name not in entry.upstreams:
                    entry.upstreams.append(name)

            u.observer = observed

    async def stop(self) -> None:
        """Write what is buffered, then close."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        if self._write is not None:
            with contextlib.suppress(Exception):
                await self._write
        self._flush()
        if self._write is not None:
            with contextlib.suppress(Exception):
                await self._write
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self._flush()

    # --- lines ----------------------------------------------------------------------------
    def handle(self, body: bytes, who: Identity = NODE) -> bytes | Awaitable[bytes | None]:
        """The pipeline's answer to ``body`` from ``who``, its line written once it is
        answered."""
        conn = self.conn
        ws = conn is not None and conn.ws is not None
        entry = Entry(body, who.name, "ws" if ws else "http")
        token = _CURRENT.set(entry)
        try:
            out = self._rpc(body, who)
        finally:
            _CURRENT.reset(token)
        http = conn is not None and not ws
        if http:
            self.last = entry  # the connection's _answer names its id, before it completes
        else:  # a WebSocket message (or a call outside any connection's read)
            entry.rid = f"{self._id_prefix}{self._ids():x}"
        if isinstance(out, bytes):
            if not http:
                self.finish(entry, out, 200)
            return out
        return self._later(entry, out)

    async def _later(self, entry: Entry, out: Awaitable[bytes | None]) -> bytes | None:
        _CURRENT.set(entry)  # this task's own context
        try:
            answer = await out
        except BaseException:
            self.finish(entry, b"", 500)  # answered with an internal error
            raise
        self.finish(entry, answer or b"", 200)
        return answer

    def refused(self, client: str, rid: bytes, status: int, size: int) -> None:
        """A request the front door answered with an HTTP error (always logged)."""
        entry = Entry(b"", client, "http")
        entry.size = size
        entry.rid = rid.decode(errors="replace")
        self._line(entry, None, str(status), status, 0, error=True)

    def finish(self, entry: Entry, answer: bytes, status: int) -> None:
        """A JSON-RPC request answered: its line (sampled unless an error)."""
        calls = entry.calls
        codes = _ERROR_CODE.findall(answer) if b'"error"' in answer else []
        if calls:
            methods: object = [m for m, _ in calls]
            outcomes: list[str] = [o for _, o in calls]
        else:  # answered from the replay table: a hit, or a local answer
            found = _METHOD.search(entry.body)
            methods = [found.group(1).decode() if found is not None else ""]
            outcomes = ["hit"]
        if entry.coalesced and "miss" in outcomes:
            outcomes[outcomes.index("miss")] = "coalesced"
        for i, code in enumerate(codes[: len(outcomes)]):
            if outcomes[i] in ("error", "invalid", "shed", "hit", "local", "pass", "miss"):
                outcomes[i] = f"error:{code.decode()}"
        error = bool(codes) or status >= 400
        single = len(outcomes) == 1 and isinstance(methods, list) and len(methods) == 1
        method = methods[0] if single and isinstance(methods, list) else methods
        outcome: object = outcomes[0] if single else outcomes
        self._line(entry, method, outcome, status, len(answer), error=error)

    def _line(
        self,
        entry: Entry,
        method: object,
        outcome: object,
        status: int,
        size_out: int,
        *,
        error: bool,
    ) -> None:
        if not error and self.sample < 1.0 and random.random() >= self.sample:
            return
        now = datetime.datetime.now(datetime.UTC)
        line = orjson.dumps(
            {
                "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "id": entry.rid,
                "client": entry.client,
                "transport": entry.transport,
                "method": method,
                "outcome": outcome,
                "upstream": entry.upstreams or None,
                "status": status,
                "in": entry.size,
                "out": size_out,
                "ms": round((time.perf_counter() - entry.started) * 1000, 3),
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        if self._buffered + self._writing + len(line) > self.max_bytes:
            self.dropped += 1
            self.metrics.access_log_dropped.inc()
            return
        self._lines.append(line)
        self._buffered += len(line)
        if self._buffered >= self.flush_bytes:
            self._flush()

    def _flush(self) -> None:
        """Hand what is buffered to the writer thread, unless a write is under way (its
        end hands over what came meanwhile)."""
        if not self._lines or self._write is not None or self._executor is None:
            return
        chunk = b"".join(self._lines)
        self._lines = []
        self._buffered = 0
        self._writing = len(chunk)
        loop = asyncio.get_running_loop()
        self._write = loop.run_in_executor(self._executor, _write_all, self._fd, chunk)
        self._write.add_done_callback(self._written)

    def _written(self, fut: asyncio.Future[None]) -> None:
        self._write = None
        self._writing = 0
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None:
            log.warning("access log: write failed (%s); its lines are lost", exc)
            self.metrics.access_log_dropped.inc()
        if self._buffered >= self.flush_bytes:
            self._flush()


def _write_all(fd: int, data: bytes) -> None:
    """In the writer thread: the whole chunk, however many writes it takes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class LoggedHttpProtocol(HttpProtocol):
    """A connection of a node whose access log is on: it tells the log whose reads it
    handles, names each answer's id to its line, and logs what it refuses."""

    __slots__ = ()

    def _access(self) -> AccessLog:
        access = self.server.access
        assert access is not None
        return access

    def data_received(self, data: bytes) -> None:
        access = self._access()
        access.conn, access.last = self, None
        try:
            super().data_received(data)
        finally:
            access.conn = access.last = None

    def _parse_rest(self) -> None:
        access = self._access()
        access.conn, access.last = self, None
        try:
            super()._parse_rest()
        finally:
            access.conn = access.last = None

    def _answer(
        self,
        result: bytes | Awaitable[bytes | None],
        keep_alive: bool,
        cors: bytes | None = None,
        gzip: bool = False,
        who: Identity | None = None,
    ) -> None:
        if cors is None:
            cors = self._lines()
            gzip = accepts_gzip(self.header(b"accept-encoding"))
        access = self._access()
        entry, access.last = access.last, None
        if entry is not None:
            found = _ID_VALUE.search(cors)
            entry.rid = found.group(1).decode() if found is not None else ""
            if isinstance(result, bytes):
                access.finish(entry, result, 200)
        super()._answer(result, keep_alive, cors, gzip, who)

    def _send(
        self,
        status: int,
        body: bytes,
        keep_alive: bool,
        extra: bytes = b"",
        cors: bytes | None = None,
    ) -> None:
        if status >= 400:
            if cors is None:
                cors = self._lines()
            found = _ID_VALUE.search(cors)
            rid = found.group(1) if found is not None else b""
            self._access().refused(self.who.name, rid, status, self._body_len)
        super()._send(status, body, keep_alive, extra, cors)
