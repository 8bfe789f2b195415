"""One upstream JSON-RPC endpoint (HTTP or WebSocket) and what we measure of it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from chainrelay import defaults
from chainrelay.wire.jsonrpc import Answer, Params, encode_request, parse_answer

log = logging.getLogger(__name__)

# Latencies kept per upstream for the hedging quantile: enough for a stable p95.
LATENCY_SAMPLES = 256


class TransportError(Exception):
    """The upstream gave no usable answer (timeout, refused, 5xx, 429, garbage): retryable."""

    def __init__(self, message: str, *, timeout: bool = False, malformed: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        # The upstream answered, but not with JSON-RPC. Retried elsewhere, yet not counted
        # against the upstream's health: one odd request must not take every node out.
        self.malformed = malformed


Notify = Callable[[str, Any], None]
# Told of every call an upstream made: (outcome "ok" | "error" | "transport_error", seconds).
Observer = Callable[[str, float], None]


class Upstream:
    """A JSON-RPC endpoint. ``call`` returns the node's answer or raises ``TransportError``."""

    def __init__(self, name: str, url: str, *, timeout: float, connections: int) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self.connections = connections
        # Measured state, read by the pool.
        self.latest = -1
        self.latency = 0.0  # EWMA, seconds
        self.samples: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.consecutive_errors = 0
        self.healthy = True
        self.calls = 0
        self.errors = 0
        self.chain_id: int | None = None
        # Set by the pool so that every call counts, the head tracker's included.
        self.observer: Observer | None = None

    @property
    def is_ws(self) -> bool:
        return self.url.startswith(("ws://", "wss://"))

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def request(self, body: bytes) -> bytes:
        raise NotImplementedError

    async def call(self, method: str, params: Params | None) -> Answer:
        """One call, timed and measured. Raises ``TransportError``."""
        self.calls += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self.request(encode_request(1, method, params))
            try:
                answer = parse_answer(raw)
            except ValueError as exc:
                self.errors += 1
                raise TransportError(f"malformed answer: {exc}", malformed=True) from None
        except TimeoutError:
            self._failed()
            self._observe("transport_error", started)
            raise TransportError(f"timed out after {self.timeout}s", timeout=True) from None
        except TransportError as exc:
            if not exc.malformed:
                self._failed()
            self._observe("transport_error", started)
            raise
        elapsed = time.perf_counter() - started
        self.samples.append(elapsed)
        a = defaults.LATENCY_EWMA_ALPHA
        self.latency = elapsed if self.latency == 0.0 else (1 - a) * self.latency + a * elapsed
        self.consecutive_errors = 0
        self._observe("error" if answer.error is not None else "ok", started)
        return answer

    def _observe(self, outcome: str, started: float) -> None:
        if self.observer is not None:
            self.observer(outcome, time.perf_counter() - started)

    def _failed(self) -> None:
        self.errors += 1
        self.consecutive_errors += 1

    def quantile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    async def subscribe_heads(self, on_header: Callable[[dict[str, Any]], None]) -> None:
        """Follow new heads until cancelled or the stream breaks (raises ``TransportError``)."""
        raise NotImplementedError


class HttpUpstream(Upstream):
    def __init__(self, name: str, url: str, *, timeout: float, connections: int) -> None:
        super().__init__(name, url, timeout=timeout, connections=connections)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"Content-Type": "application/json"},
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, body: bytes) -> bytes:
        assert self._session is not None, "upstream not started"
        try:
            async with self._session.post(self.url, data=body) as resp:
                data = await resp.read()
                if resp.status == 429 or resp.status >= 500:
                    raise TransportError(f"HTTP {resp.status}")
                if resp.status != 200 and not data.lstrip().startswith(b"{"):
                    raise TransportError(f"HTTP {resp.status}")
                return data
        except aiohttp.ClientError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from None


class WsUpstream(Upstream):
    """A WebSocket upstream: requests multiplexed by id over one connection, reconnected
    on demand; ``subscribe_heads`` uses ``eth_subscribe("newHeads")``."""

    def __init__(self, name: str, url: str, *, timeout: float, connections: int) -> None:
        super().__init__(name, url, timeout=timeout, connections=connections)
        self._conn: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._subs: dict[str, Callable[[Any], None]] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        return None  # connects on first use

    async def stop(self) -> None:
        conn = self._conn  # the reader forgets it as it ends
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        self._conn = None
        if conn is not None:
            await conn.close()

    async def _connection(self) -> ClientConnection:
        if self._conn is not None:
            return self._conn
        async with self._lock:
            if self._conn is None:
                try:
                    conn = await websockets.connect(
                        self.url, max_size=64 * defaults.MiB, compression=None
                    )
                except (OSError, websockets.WebSocketException) as exc:
                    raise TransportError(f"connect: {exc}") from None
                self._conn = conn
                self._reader = asyncio.create_task(self._read(conn))
        assert self._conn is not None
        return self._conn

    async def _read(self, conn: ClientConnection) -> None:
        try:
            async for message in conn:
                raw = message if isinstance(message, bytes) else message.encode()
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(doc, dict):
                    continue
                if doc.get("method") == "eth_subscription":
                    p = doc.get("params") or {}
                    cb = self._subs.get(p.get("subscription"))
                    if cb is not None:
                        cb(p.get("result"))
                    continue
                fut = self._pending.pop(doc.get("id"), None)  # type: ignore[arg-type]
                if fut is not None and not fut.done():
                    fut.set_result(raw)
        except websockets.WebSocketException:
            pass
        finally:
            self._conn = None
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(TransportError("connection closed"))
            self._pending.clear()
            for cb in list(self._subs.values()):
                cb(None)  # None tells a subscriber its stream broke
            self._subs.clear()

    async def request(self, body: bytes) -> bytes:
        conn = await self._connection()
        doc = orjson.loads(body)
        rid = next(self._ids)
        doc["id"] = rid
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await conn.send(orjson.dumps(doc).decode())
        except websockets.WebSocketException as exc:
            self._pending.pop(rid, None)
            raise TransportError(f"send: {exc}") from None
        try:
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def subscribe_heads(self, on_header: Callable[[dict[str, Any]], None]) -> None:
        broken = asyncio.Event()

        def deliver(result: Any) -> None:
            if result is None:
                broken.set()
            elif isinstance(result, dict):
                on_header(result)

        answer = await self.call("eth_subscribe", ["newHeads"])
        if answer.error is not None or not isinstance(answer.value, str):
            raise TransportError(f"eth_subscribe refused: {answer.error!r}")
        self._subs[answer.value] = deliver
        try:
            await broken.wait()
        finally:
            self._subs.pop(answer.value, None)
        raise TransportError("newHeads stream closed")


def make_upstream(name: str, url: str, *, timeout: float, connections: int) -> Upstream:
    cls = WsUpstream if url.startswith(("ws://", "wss://")) else HttpUpstream
    return cls(name, url, timeout=timeout, connections=connections)
