"""One upstream JSON-RPC endpoint and what we measure of it (``Upstream``), and the upstream
over HTTP (``HttpUpstream``); over WebSocket it is ``wslink.WsUpstream``, and
``make.make_upstream`` builds either from config."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from chainrelay import defaults
from chainrelay.rpc.policy import RULES, Kind
from chainrelay.server.peer import current_via
from chainrelay.slices import parse_large_answer
from chainrelay.upstreams import httpwire
from chainrelay.upstreams.batching import BatchCall, NotABatchAnswer, encode_batch, parse_batch
from chainrelay.upstreams.failures import BatchUnsupported, TransportError
from chainrelay.upstreams.httplink import LinkPool, Sent, Waiter
from chainrelay.upstreams.route import Route
from chainrelay.wire.jsonrpc import Answer, Params, encode_request, parse_answer

log = logging.getLogger(__name__)

# Latencies kept per upstream for the hedging quantile: enough for a stable p95.
LATENCY_SAMPLES = 256


# An answer this large (a full block, a block's receipts: 5-13 ms of orjson.loads for 2 MB)
# is decoded piecewise, in slices of the event loop (``slices.parse_large_answer``); a batch's
# in a turn of its own, not in the turn that read its last bytes.
LARGE_ANSWER_BYTES = defaults.LARGE_ANSWER_BYTES


# Told of every call an upstream made: (outcome "ok" | "error" | "transport_error", seconds).
Observer = Callable[[str, float], None]


class Upstream:
    """A JSON-RPC endpoint. ``call`` returns the node's answer or raises ``TransportError``."""

    def __init__(
        self, name: str, url: str, *, timeout: float, connections: int, via: str = ""
    ) -> None:
        """``via``: this node's entry in the Via header of its HTTP upstream requests ("":
        none); a default header of the session ``start`` opens."""
        self.name = name
        self.url = url
        self.timeout = timeout
        self.connections = connections
        # Measured state, read by the pool.
        self.latest = -1
        # A fallback whose head is checked at the slow cadence while the primaries serve
        # (chain/head.py): how far behind the best head it was at its last check, by which
        # its lag is judged meanwhile (its ``latest`` is that old). None: followed at full
        # cadence, judged by its head now.
        self.slow_lag: int | None = None
        # The hash of the head it last reported at ``latest`` (None: not known): a read of
        # that very block is named by number there when ``head_by_number`` (one node behind
        # the URL; ``UpstreamPool.call``'s ``at_head``).
        self.head_hash: str | None = None
        self.head_by_number = defaults.UPSTREAM_HEAD_BY_NUMBER
        self.latency = 0.0  # EWMA, seconds
        self.samples: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.consecutive_errors = 0
        self.healthy = True
        # perf_counter time until which the upstream asked not to be called (a 429's
        # Retry-After): tried after the others, and not waited for past a call's deadline.
        self.slow_until = 0.0
        self.calls = 0
        self.errors = 0
        self.chain_id: int | None = None
        # Set by the pool so that every call counts, the head tracker's included.
        self.observer: Observer | None = None
        self.via = via
        # Role, weight, budget and capabilities (the pool's, from the [[upstreams]] entry):
        # every call sent spends from its budget, whoever sends it.
        self.route = Route()
        # Headers sent with every request (HTTP) or the WebSocket handshake: a provider's
        # key or basic auth ([[upstreams]] headers, auth; ``make_upstream``).
        self.headers: dict[str, str] = {}
        self._in_flight = 0
        self._gate: asyncio.Semaphore | None = None  # max_concurrency's slots, made on use

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered (for ``max_concurrency``)."""
        return self._in_flight

    @property
    def is_ws(self) -> bool:
        return self.url.startswith(("ws://", "wss://"))

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def request(self, body: bytes) -> bytes:
        raise NotImplementedError

    async def _roundtrip(self, method: str, params: Params | None) -> bytes:
        """The raw answer to one call, within ``self.timeout``. HTTP and WebSocket override
        it to bound the wait with a timer they keep anyway (one per HTTP connection, one
        expiry timer for all WebSocket calls), cheaper than an ``asyncio.timeout`` per call."""
        async with asyncio.timeout(self.timeout):
            return await self.request(encode_request(1, method, params))

    async def _roundtrip_within(self, method: str, params: Params | None, timeout: float) -> bytes:
        """``_roundtrip`` cut short to ``timeout`` (below ``self.timeout``): the last try of
        a call whose deadline is near, or a probe."""
        async with asyncio.timeout(timeout):
            return await self._roundtrip(method, params)

    async def call(
        self, method: str, params: Params | None, *, timeout: float | None = None
    ) -> Answer:
        """One call, timed and measured, within ``self.timeout`` or ``timeout`` when that is
        shorter (what is left of a call's deadline). Raises ``TransportError``."""
        self.calls += 1
        started = time.perf_counter()
        self.route.budget.spend(started)
        if timeout is None or timeout >= self.timeout:
            timeout = None
        self._in_flight += 1
        slot = None
        try:
            if self.route.budget.concurrency:
                slot, timeout = await self._slot(started, timeout)
            if timeout is None:
                raw = await self._roundtrip(method, params)
            else:
                raw = await self._roundtrip_within(method, params, timeout)
            try:
                if len(raw) > LARGE_ANSWER_BYTES:
                    answer = await parse_large_answer(raw)  # see LARGE_ANSWER_BYTES
                else:
                    answer = parse_answer(raw)
            except ValueError as exc:
                self.errors += 1
                raise TransportError(f"malformed answer: {exc}", malformed=True) from None
        except TimeoutError:
            raise self._timed_out(started, timeout) from None
        except TransportError as exc:
            self._try_failed(exc, started)
            raise
        finally:
            self._in_flight -= 1
            if slot is not None:
                slot.release()
        self.answered(time.perf_counter() - started, answer.error is not None)
        return answer

    async def _slot(
        self, started: float, timeout: float | None
    ) -> tuple[asyncio.Semaphore, float | None]:
        """One of the upstream's ``max_concurrency`` slots, waited for (every caller's
        calls, the head tracker's too, keep to it; the pool routes around a full one
        first), and what is left of the try's time once it is had. Raises
        ``TransportError`` (not counted against health) when none frees in that time."""
        gate = self._gate
        if gate is None:
            gate = self._gate = asyncio.Semaphore(self.route.budget.concurrency)
        bound = self.timeout if timeout is None else timeout
        if gate.locked():
            try:
                async with asyncio.timeout(bound):
                    await gate.acquire()
            except TimeoutError:
                busy = TransportError("no call slot free in time", timeout=True)
                busy.counts = False
                raise busy from None
            return gate, bound - (time.perf_counter() - started)
        await gate.acquire()  # free: taken at once
        return gate, timeout

    async def call_batch(
        self, calls: Sequence[BatchCall], *, timeout: float | None = None
    ) -> list[Answer]:
        """``calls`` as one JSON-RPC batch: their answers, in order, within
        ``self.timeout`` or ``timeout`` when shorter (as ``call``). Raises
        ``BatchUnsupported`` when the upstream does not answer the batch as one, and
        ``TransportError`` as ``call`` does.

        Counted as one call of the upstream; its time is not a latency sample (a batch is
        slower than the call the hedging quantile is about)."""
        self.calls += 1
        started = time.perf_counter()
        self.route.budget.spend(started, len(calls))
        if timeout is None or timeout >= self.timeout:
            timeout = None
        self._in_flight += 1
        slot = None
        try:
            if self.route.budget.concurrency:
                slot, timeout = await self._slot(started, timeout)
            if timeout is None:
                raw, first_id = await self._batch_roundtrip(calls)
            else:
                async with asyncio.timeout(timeout):
                    raw, first_id = await self._batch_roundtrip(calls)
            if len(raw) > LARGE_ANSWER_BYTES:
                await asyncio.sleep(0)  # see LARGE_ANSWER_BYTES
            try:
                answers = parse_batch(raw, first_id, len(calls))
            except NotABatchAnswer as exc:
                raise BatchUnsupported(f"batch of {len(calls)} refused: {exc}") from None
        except TimeoutError:
            raise self._timed_out(started, timeout) from None
        except TransportError as exc:
            self._try_failed(exc, started)
            raise
        finally:
            self._in_flight -= 1
            if slot is not None:
                slot.release()
        self.consecutive_errors = 0
        self._observe("ok", started)
        return answers

    async def _batch_roundtrip(self, calls: Sequence[BatchCall]) -> tuple[bytes, int]:
        """The raw answer to the batch of ``calls`` within ``self.timeout``, and the id of
        its first call."""
        async with asyncio.timeout(self.timeout):
            return await self.request(encode_batch(1, calls)), 1

    def answered(self, elapsed: float, is_error: bool) -> None:
        """Measure a call the upstream answered (a JSON-RPC error is an answer too)."""
        self.samples.append(elapsed)
        a = defaults.LATENCY_EWMA_ALPHA
        self.latency = elapsed if self.latency == 0.0 else (1 - a) * self.latency + a * elapsed
        self.consecutive_errors = 0
        observer = self.observer
        if observer is not None:
            observer("error" if is_error else "ok", elapsed)

    def failed(self, exc: TransportError, elapsed: float) -> None:
        """Measure a call that got no usable answer (``exc``)."""
        if exc.counts:
            self._failed()
        else:
            self.errors += 1
        if self.observer is not None:
            self.observer("transport_error", elapsed)

    def _observe(self, outcome: str, started: float) -> None:
        if self.observer is not None:
            self.observer(outcome, time.perf_counter() - started)

    def _failed(self) -> None:
        self.errors += 1
        self.consecutive_errors += 1

    def _try_failed(self, exc: TransportError, started: float) -> None:
        """Count a try (begun at ``started``) that got no usable answer: against the
        upstream's health only when ``exc`` says so (not a 429, not a malformed answer)."""
        if exc.counts:
            self._failed()
        else:
            self.errors += 1
        self._observe("transport_error", started)

    def _timed_out(self, started: float, timeout: float | None) -> TransportError:
        """Count a try that ran out of its time (``timeout``, None: the whole per-try
        timeout) and return its error. A try cut to under half its timeout by the call's
        deadline was not a fair chance: not counted against the upstream's health."""
        waited = self.timeout if timeout is None else round(timeout, 3)
        late = TransportError(f"timed out after {waited}s", timeout=True)
        late.counts = timeout is None or 2 * timeout >= self.timeout
        self._try_failed(late, started)
        return late

    def quantile(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    async def subscribe_heads(self, on_header: Callable[[dict[str, Any]], None]) -> None:
        """Follow new heads until cancelled or the stream breaks (raises ``TransportError``)."""
        raise NotImplementedError


class HttpUpstream(Upstream):
    """An HTTP(S) upstream over the node's own keep-alive connections (``httplink.py``):
    pooled, pipelined where safe, TLS from ``ssl`` with verification on.

    The request head is built once from the URL (``httpwire.target``); a call writes it
    with its Content-Length and body, and waits for its answer with no timer of its own
    (each connection keeps one for every deadline on it). A try's deadline covers the whole
    exchange, the body read included: an upstream that drips its answer a byte at a time
    is cut off all the same.

    Pipelining: only reads of the policy table's (never ``eth_sendRawTransaction``, nor a
    method it does not know, which may write). A request pipelined behind another is lost
    with it if the connection drops, and a write lost so cannot be told from a write the
    node took: a write always has a connection to itself. Batches are not pipelined
    either (a batch's answer is long to come, and everything behind it would wait).
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout: float,
        connections: int,
        via: str = "",
        pipeline_depth: int = defaults.HTTP_UPSTREAM_PIPELINE_DEPTH,
        keepalive: float = defaults.HTTP_UPSTREAM_KEEPALIVE,
        max_answer_bytes: int = defaults.HTTP_UPSTREAM_MAX_ANSWER_BYTES,
        accept_encoding: bool = defaults.HTTP_UPSTREAM_ACCEPT_ENCODING,
        ca_file: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """``ca_file``: CA certificates (PEM) to verify an https:// upstream against
        instead of the system's. ``headers``: sent with every request (a provider's key,
        basic auth: ``[[upstreams]] headers``, ``auth``)."""
        super().__init__(name, url, timeout=timeout, connections=connections, via=via)
        self.headers = dict(headers or {})
        self.target = httpwire.target(
            url, via=via, accept_encoding=accept_encoding, headers=self.headers
        )
        self.pipeline_depth = pipeline_depth
        self.keepalive = keepalive
        self.max_answer_bytes = max_answer_bytes
        self.ca_file = ca_file
        self._links: LinkPool | None = None

    async def start(self) -> None:
        context = None
        if self.target.secure:
            # Made once: a context costs milliseconds (the CA store read and parsed).
            context = ssl.create_default_context(cafile=self.ca_file or None)
        self._links = LinkPool(
            self.target,
            size=self.connections,
            depth=self.pipeline_depth,
            keepalive=self.keepalive,
            max_answer_bytes=self.max_answer_bytes,
            ssl_context=context,
        )

    async def stop(self) -> None:
        links, self._links = self._links, None
        if links is not None:
            links.close()

    async def _roundtrip(self, method: str, params: Params | None) -> bytes:
        return await self._post(encode_request(1, method, params), None, _pipelines(method))

    async def _roundtrip_within(self, method: str, params: Params | None, timeout: float) -> bytes:
        return await self._post(encode_request(1, method, params), timeout, _pipelines(method))

    async def request(self, body: bytes) -> bytes:
        """POST one body; the answer's bytes. Raises ``TransportError``."""
        return await self._post(body, None, False)

    def _head(self) -> bytes:
        # This node's own Via goes with every request; a request made for one another relay
        # forwarded carries that one's chain too.
        came = current_via()
        if came and self.via:
            return httpwire.relayed_head(self.target, came, self.via)
        return self.target.head

    async def _post(
        self, body: bytes, timeout: float | None, pipelined: bool, batch: bool = False
    ) -> bytes:
        """POST ``body`` within ``self.timeout``, or ``timeout`` (shorter) when given; the
        answer's body (decoded), or ``TransportError`` (``httpwire.refusal``: what a
        non-200 status means; a connection lost, a late or an oversized answer)."""
        links = self._links
        if links is None:
            raise TransportError("upstream not started")
        budget = self.timeout if timeout is None else round(timeout, 3)
        loop = links.loop
        deadline = loop.time() + budget
        link = links.ready(pipelined) or await links.acquire(pipelined, deadline, budget)
        answer: asyncio.Future[bytes] = loop.create_future()
        # Cancelled (a hedge lost, the caller gone), the future is done: its answer is
        # read when it comes and dropped (the connection cannot skip it).
        link.send(httpwire.frame(self._head(), body), Sent(answer, deadline, budget, batch))
        return await answer

    async def _batch_roundtrip(self, calls: Sequence[BatchCall]) -> tuple[bytes, int]:
        """One POST of the batch, within ``self.timeout``. An HTTP error status other than
        429 (slow down: another upstream is asked) refuses the batch."""
        return await self._post(encode_batch(1, calls), None, False, batch=True), 1

    def send_now(self, head: bytes, tail: bytes, waiter: Waiter) -> bool:
        """As ``WsUpstream.send_now``: one call sent at once on a connection that takes it
        without waiting (idle, or room in its line: ``rpc/forward.py`` sends reads of the
        policy table only, safe to pipeline), its answer handed to ``waiter`` where it is
        read. Its id is 1: answers are paired by their place on the connection. False
        when no connection takes it now (``call`` then)."""
        links = self._links
        if links is None:
            return False
        link = links.ready(True)
        if link is None:
            return False
        budget = self.timeout
        length = len(head) + 1 + len(tail)
        link.send(
            b"%b%d\r\n\r\n%b1%b" % (self._head(), length, head, tail),
            Sent(waiter, links.loop.time() + budget, budget, False),
        )
        self.calls += 1
        spent = self.route.budget
        if spent.bounded:
            spent.spend(time.perf_counter())
        return True

    def prune(self) -> None:
        """Nothing to prune: a call's deadline lives on its connection, gone with it."""


def _pipelines(method: str) -> bool:
    """Whether a call of ``method`` may be pipelined (see ``HttpUpstream``): a read the
    policy table knows."""
    rule = RULES.get(method)
    return rule is not None and rule.kind is not Kind.SEND
