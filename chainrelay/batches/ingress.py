"""The batch ingress: sequencers push signed batches; each accepted one is made durable,
acknowledged, and published to the relay tree.

A push (``batches.frame.Push``, over WebSocket ``/batches`` or ``POST /batches``) is
checked in this order: the stream is one of this node's, the payload within its limit,
the signature recovers to one of the stream's sequencers, then the sequence rules
(``batches.rules``: contiguous numbers, first payload wins). An accepted batch becomes
its feed frame once (the sequencer's signature in it), goes to the durable log's next
group commit, and only when that commit is fsynced is it acknowledged and handed to the
feed hub, in sequence: nothing a child or subscriber sees can be lost by this node. A
push that asked for ``relays = k`` is acknowledged once k child relays say they hold it
(their ``held`` messages), or answered -32046 after ``relay_ack_timeout`` (durable here,
not held by enough relays in time).

A duplicate of an accepted batch is acknowledged again once that batch is durable; a
conflicting one is refused loudly (logged as an error: a sequencer signed two batches
with one number). Every outcome is counted (``chainrelay_batch_pushes``).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.protocol import State

from chainrelay.access.identity import NODE, Identity
from chainrelay.batches import frame as batchframe
from chainrelay.batches.frame import (
    CONFIRMED,
    CONFLICT,
    GAP,
    INTERNAL,
    MALFORMED,
    NOT_DURABLE,
    NOT_HELD,
    SIGNATURE,
    SIGNER,
    TOO_LARGE,
    UNKNOWN_STREAM,
    Push,
    PushError,
)
from chainrelay.batches.log import BatchLog
from chainrelay.batches.rules import StreamRules, Verdict
from chainrelay.config import BatchesConfig
from chainrelay.errors import (
    BatchLogError,
    BatchRefused,
)
from chainrelay.metrics import Metrics
from chainrelay.server.ws import WsSession
from chainrelay.tree.frame import FrameError, keccak, recover
from chainrelay.tree.hub import FeedHub
from chainrelay.tree.streams import BatchSpec
from chainrelay.wire.wsframes import text_header

log = logging.getLogger(__name__)

# The HTTP status each refusal (``batchframe``'s codes) gets on POST /batches.
HTTP_STATUS = {
    GAP: 409,
    CONFLICT: 409,
    SIGNER: 403,
    SIGNATURE: 403,
    TOO_LARGE: 413,
    UNKNOWN_STREAM: 404,
    NOT_HELD: 503,
    NOT_DURABLE: 503,
    MALFORMED: 400,
    INTERNAL: 500,
}


@dataclass(slots=True)
class _Stream:
    spec: BatchSpec
    rules: StreamRules
    # Accepted batches not yet durable: seq -> the log's future (a duplicate waits on it).
    # Its payload hash too: more may be in flight (several connections, POSTs) than the
    # rules keep hashes of, and the log has none of them yet.
    in_flight: dict[int, tuple[asyncio.Future[None], bytes]]


class Ingress:
    """Takes pushes for ``specs`` (the node's batch streams) into ``log`` and ``hub``."""

    def __init__(
        self,
        cfg: BatchesConfig,
        specs: Iterable[BatchSpec],
        log_: BatchLog,
        hub: FeedHub,
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.log = log_
        self.hub = hub
        self.metrics = metrics
        self._specs = {s.name: s for s in specs}
        self._first = cfg.first_seqs()
        self.streams: dict[str, _Stream] = {}
        self._keys = [k.encode() for k in cfg.api_keys]
        # (stream, outcome) -> its counter: prometheus_client's labels() takes a lock and
        # builds a key on every call, once or twice per push. Bounded: streams are this
        # node's (else "other"), outcomes a fixed set.
        self._counters: dict[tuple[str, str], Any] = {}

    async def start(self) -> None:
        await self.log.start()
        for name, spec in self._specs.items():
            tail = await self.log.tail(name, self.cfg.recent_hashes)
            rules = StreamRules.restored(self._first.get(name, 0), tail, self.cfg.recent_hashes)
            self.streams[name] = _Stream(spec, rules, {})
            self.hub.start_batches_at(name, rules.next)
            log.info("ingress of %s: next batch %d", name, rules.next)

    async def stop(self) -> None:
        await self.log.stop()

    def begin_at(self, stream: str, seq: int) -> bool:
        """Start stream ``stream`` at ``seq`` if it has taken nothing yet (its log empty,
        nothing in flight): a feed followed from its middle (Nitro's) starts where its
        input is, not at a configured number. False if it has begun already."""
        st = self.streams[stream]
        rules = st.rules
        if rules.next != rules.first or st.in_flight or seq < rules.first:
            return False
        st.rules = StreamRules(seq, None, self.cfg.recent_hashes)
        # Before the first record is queued: the log's writer starts an empty stream here.
        self.log.first_seqs[stream] = seq
        self.hub.start_batches_at(stream, seq)
        log.info("ingress of %s: begins at %d", stream, seq)
        return True

    # --- authentication -------------------------------------------------------------------
    def authorized(self, header: bytes | None) -> bool:
        """True for ``Authorization: Bearer <one of the api keys>`` (compared in constant
        time, every key, so timing tells nothing of which or how much matched)."""
        if header is None or not header.startswith(b"Bearer "):
            return False
        token = header[7:].strip()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(token, key)
        return ok

    def refuse_unauthorized(self) -> None:
        self._count("", "unauthorized")

    # --- pushes ---------------------------------------------------------------------------
    def _count(self, stream: str, outcome: str) -> None:
        if stream not in self.streams:
            stream = "other"  # names come from the wire: never grow the label set
        counter = self._counters.get((stream, outcome))
        if counter is None:
            counter = self.metrics.batch_pushes.labels(stream, outcome)
            self._counters[(stream, outcome)] = counter
        counter.inc()

    def handle(self, body: bytes, _who: Identity = NODE) -> bytes | Awaitable[bytes]:
        """One push message (a WebSocket message): its answer, now or once durable. (A
        pusher is who its API key says: the push endpoints check it before this.)"""
        t0 = time.perf_counter()
        try:
            push = batchframe.decode_push(body)
        except PushError as exc:
            self._count("", "malformed")
            return _error("", 0, MALFORMED, str(exc))
        try:
            fut = self.submit(push)
        except BatchRefused as exc:
            return _error(push.stream, push.seq, exc.code, exc.message, exc.data)
        if isinstance(fut, asyncio.Future):
            # The common push: answered from a callback, no task or coroutine per push.
            answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(functools.partial(self._answered, push, t0, answer))
            return answer
        return self._answer(push, fut, t0)

    def _answered(
        self, push: Push, t0: float, answer: asyncio.Future[bytes], fut: asyncio.Future[int | None]
    ) -> None:
        if answer.done():  # cancelled: the connection is gone
            return
        if fut.cancelled():
            answer.cancel()
            return
        exc = fut.exception()
        if isinstance(exc, BatchRefused):
            answer.set_result(_error(push.stream, push.seq, exc.code, exc.message, exc.data))
        elif exc is not None:
            log.error("push %d of %s failed", push.seq, push.stream, exc_info=exc)
            answer.set_result(_error(push.stream, push.seq, INTERNAL, f"internal error: {exc}"))
        else:
            answer.set_result(self._reply(push, fut.result(), t0))

    async def _answer(self, push: Push, fut: Awaitable[int | None], t0: float) -> bytes:
        try:
            relays = await fut
        except BatchRefused as exc:
            return _error(push.stream, push.seq, exc.code, exc.message, exc.data)
        except Exception as exc:  # a log read failed (a duplicate's lookup): say so
            log.exception("push %d of %s failed", push.seq, push.stream)
            return _error(push.stream, push.seq, INTERNAL, f"internal error: {exc}")
        return self._reply(push, relays, t0)

    def _reply(self, push: Push, relays: int | None, t0: float) -> bytes:
        self.metrics.batch_ack_seconds.observe(time.perf_counter() - t0)
        kind = "confirmed" if push.kind == CONFIRMED else "ack"
        msg: dict[str, object] = {"type": kind, "stream": push.stream, "seq": push.seq}
        if relays is not None:
            msg["relays"] = relays
        return orjson.dumps(msg)

    # --- the endpoints (http.BatchRoutes) ---------------------------------------------------
    def open(
        self, transport: asyncio.Transport, *, ip: str, max_send_buffer: int, close_timeout: float
    ) -> WsSession:
        """A pusher's WebSocket session: each binary message a push, answered in text;
        at most ``max_in_flight`` unanswered before the connection stops being read."""
        return PushSession(
            transport,
            self.handle,
            max_message_bytes=max_push_message(self.cfg),
            max_send_buffer=max_send_buffer,
            max_pending=self.cfg.max_in_flight,
            ip=ip,
            close_timeout=close_timeout,
        )

    async def post(self, body: bytes) -> tuple[int, bytes, bytes]:
        """``POST /batches``: the status and JSON answer of one push message."""
        answer = self.handle(body)
        if not isinstance(answer, bytes):
            answer = await answer
        code = orjson.loads(answer).get("code")
        return HTTP_STATUS.get(code, 200), answer, b"application/json"

    def submit(self, push: Push) -> Awaitable[int | None]:
        """Check ``push``; ``BatchRefused`` now, or an awaitable that completes once the
        batch is durable (and held by ``push.relays`` relays: how many, else None)."""
        st = self.streams.get(push.stream)
        if st is None:
            self._count(push.stream, "unknown_stream")
            raise BatchRefused(UNKNOWN_STREAM, f"no batch stream {push.stream!r} here")
        if push.kind == CONFIRMED:
            return self._confirm(st, push)
        limit = st.spec.max_payload_bytes
        if len(push.payload) > limit:
            self._count(push.stream, "too_large")
            raise BatchRefused(
                TOO_LARGE, f"payload of {len(push.payload)} bytes > {limit}", {"limit": limit}
            )
        payload_hash = keccak(push.payload)
        digest = batchframe.batch_digest(st.spec.chain_id, push.stream, push.seq, payload_hash)
        self._check_signer(st, push, digest)
        decision = st.rules.decide(push.seq, payload_hash)
        verdict = decision.verdict
        if verdict is Verdict.ACCEPT:
            return self._accept(st, push, payload_hash)
        if verdict is Verdict.LOOKUP:
            return self._lookup(st, push, payload_hash)
        return self._settle(st, push, verdict, decision.expected)

    def _check_signer(self, st: _Stream, push: Push, digest: bytes) -> None:
        try:
            who = recover(push.signature, digest)
        except FrameError:
            self._count(push.stream, "signature")
            raise BatchRefused(
                SIGNATURE, "signature unreadable (65 bytes r|s|v, v 0 or 1)"
            ) from None
        if who not in st.spec.sequencers:
            self._count(push.stream, "signer")
            raise BatchRefused(
                SIGNER,
                "signature is not a sequencer's of this stream (forged, or an unknown key)",
                {"signer": "0x" + who.hex()},
            )

    def _accept(self, st: _Stream, push: Push, payload_hash: bytes) -> Awaitable[int | None]:
        frame = batchframe.encode_frame(
            chain_id=st.spec.chain_id,
            stream=push.stream,
            seq=push.seq,
            payload=push.payload,
            signature=push.signature,
            origin_us=time.time_ns() // 1000,
        )
        durable = self.log.append(push.stream, push.seq, payload_hash, frame)
        st.in_flight[push.seq] = (durable, payload_hash)
        durable.add_done_callback(lambda f: self._durable(st, push.seq, frame, f))
        self._count(push.stream, "accepted")
        if push.relays > 0:
            return self._after(st, push, durable)
        # Its own future, resolved after _durable published the batch: a closing
        # connection cancels this one, never the log's (a duplicate may wait on that).
        acked: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        durable.add_done_callback(functools.partial(self._acked, push, acked))
        return acked

    def _acked(
        self, push: Push, acked: asyncio.Future[int | None], durable: asyncio.Future[None]
    ) -> None:
        """``_after`` for a push that waits for no relay, as a callback."""
        if acked.done():
            return
        if durable.cancelled():
            acked.cancel()
            return
        exc = durable.exception()
        if exc is None:
            acked.set_result(None)
        elif isinstance(exc, BatchLogError):
            acked.set_exception(self._not_durable(push, exc))
        else:
            acked.set_exception(exc)

    def _durable(self, st: _Stream, seq: int, frame: bytes, fut: asyncio.Future[None]) -> None:
        """A batch's commit finished (callbacks run in append order: in sequence)."""
        failed = fut.cancelled() or fut.exception() is not None
        entry = st.in_flight.get(seq)
        if entry is not None and entry[0] is fut:
            del st.in_flight[seq]
        elif failed:
            # A record of an earlier try, failed after its seq was pushed again and
            # accepted anew: the new one decides, this one rolls nothing back.
            return
        if failed:
            st.rules.rollback(seq)
            return
        self.hub.publish(frame)

    async def _after(self, st: _Stream, push: Push, durable: asyncio.Future[None]) -> int | None:
        try:
            await asyncio.shield(durable)
        except BatchLogError as exc:
            raise self._not_durable(push, exc) from None
        if push.relays <= 0:
            return None
        return await self._held(st, push)

    def _not_durable(self, push: Push, exc: BatchLogError) -> BatchRefused:
        self._count(push.stream, "not_durable")
        log.error("batch %d of %s not durable: %s", push.seq, push.stream, exc)
        return BatchRefused(NOT_DURABLE, f"not durable: {exc}; push it again")

    async def _held(self, st: _Stream, push: Push) -> int:
        fut = self.hub.wait_held(push.stream, push.seq, push.relays)
        try:
            async with asyncio.timeout(self.cfg.relay_ack_timeout):
                return await fut
        except TimeoutError:
            self._count(push.stream, "not_held")
            raise BatchRefused(
                NOT_HELD,
                f"durable here, but not held by {push.relays} relays within "
                f"{self.cfg.relay_ack_timeout:g}s",
                {"durable": True},
            ) from None
        finally:
            fut.cancel()

    async def _lookup(self, st: _Stream, push: Push, payload_hash: bytes) -> int | None:
        entry = st.in_flight.get(push.seq)
        if entry is not None:
            stored: bytes | None = entry[1]  # accepted, not yet in the log
        else:
            stored = await self.log.hash_of(push.stream, push.seq)
        d = st.rules.decide_known(push.seq, payload_hash, stored)
        return await self._settle(st, push, d.verdict, d.expected)

    def _settle(
        self, st: _Stream, push: Push, verdict: Verdict, expected: int
    ) -> Awaitable[int | None]:
        if verdict is Verdict.DUPLICATE:
            self._count(push.stream, "duplicate")
            entry = st.in_flight.get(push.seq)
            durable = entry[0] if entry is not None else None
            if durable is None:
                durable = asyncio.get_running_loop().create_future()
                durable.set_result(None)
            return self._after(st, push, durable)
        if verdict is Verdict.CONFLICT:
            self._count(push.stream, "conflict")
            log.error(
                "sequencer pushed a second, different batch %d of %s: refused",
                push.seq,
                push.stream,
            )
            raise BatchRefused(
                CONFLICT,
                f"batch {push.seq} is accepted already with another payload",
                {"seq": push.seq},
            )
        self._count(push.stream, "gap")
        raise BatchRefused(
            GAP,
            f"batch {push.seq} does not follow on: next expected {expected}",
            {"expected": expected},
        )

    def _confirm(self, st: _Stream, push: Push) -> Awaitable[int | None]:
        digest = batchframe.confirmed_digest(st.spec.chain_id, push.stream, push.seq)
        self._check_signer(st, push, digest)
        # Only what is durable (published): a batch in flight may yet be rolled back.
        next_seq = self.hub.next_seq(push.stream)
        durable_next = next_seq if next_seq is not None else 0
        if push.seq >= durable_next:
            self._count(push.stream, "gap")
            raise BatchRefused(
                GAP,
                f"cannot confirm {push.seq}: durable batches end at {durable_next - 1}",
                {"expected": durable_next},
            )
        self.hub.confirm(push.stream, push.seq, push.signature)
        self._count(push.stream, "confirmed")
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class PushSession(WsSession):
    """A pusher's WebSocket session. One group commit acknowledges many pushes at once:
    their answers leave in one write at the end of the loop turn, not one write each."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._out: list[bytes] = []
        self._out_bytes = 0

    def send(self, payload: bytes) -> None:
        """Same rules as ``WsSession.send`` (never blocks, a reader too far behind is
        closed), the frame built here: this session never fragments and negotiates no
        extension, so an answer is its header and its bytes (see ``send_frames``).

        Answers gathered for the end of the loop turn count against the send buffer too:
        one turn may read megabytes of pushes (tens of thousands of answers) from a
        pusher that reads none of them."""
        if not payload or self.closed or self.proto.state is not State.OPEN:
            return
        if self.transport.get_write_buffer_size() + self._out_bytes > self.max_send_buffer:
            self._too_slow()
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._write_out)
        header = text_header(len(payload))
        self._out.append(header)
        self._out.append(payload)
        self._out_bytes += len(header) + len(payload)

    def _write_out(self) -> None:
        out, self._out, self._out_bytes = self._out, [], 0
        if out and not self.closed and self.proto.state is State.OPEN:
            self.transport.write(b"".join(out))

    def close(self, code: int, reason: str) -> None:
        self._write_out()  # answers already due go before the close frame
        super().close(code, reason)


def _error(stream: str, seq: int, code: int, message: str, data: object = None) -> bytes:
    msg: dict[str, object] = {
        "type": "error",
        "stream": stream,
        "seq": seq,
        "code": code,
        "message": message,
    }
    if data is not None:
        msg["data"] = data
    return orjson.dumps(msg)


def specs_of(cfg: BatchesConfig, node_chain_id: int) -> list[BatchSpec]:
    """The node's batch streams as the hub and the ingress check them."""
    return [
        BatchSpec(
            s.name,
            s.chain_id or node_chain_id,
            frozenset(bytes.fromhex(a[2:]) for a in s.sequencers),
            max_payload_bytes=cfg.max_payload_bytes,
            backlog_frames=cfg.backlog_frames,
            backlog_bytes=cfg.backlog_bytes,
            order_max_held=cfg.order_max_held,
            order_max_held_bytes=cfg.order_max_held_bytes,
            order_wait=cfg.order_wait,
            child_queue_frames=cfg.child_queue_frames,
            fetch_frames=cfg.range_max_frames,
            fetch_rounds=cfg.fetch_rounds,
        )
        for s in cfg.streams
    ]


def max_push_message(cfg: BatchesConfig) -> int:
    """The largest WebSocket message a pusher may send: twice the payload limit, so a
    batch somewhat too large gets its -32044 answer; a larger message is closed (1009)."""
    return 2 * cfg.max_payload_bytes + batchframe.PUSH_HEADER_LEN
