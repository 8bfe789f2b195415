"""Reads that are never cached, sent at once to one WebSocket or HTTP upstream.

A call the policy never caches (``Lookup.UNCACHED``) gains nothing from the full path's
task, coalescing and cache: when the pool has a healthy WebSocket or HTTP upstream
(``direct``), the request is written to it inside the caller's read, and its answer,
paired where it is read (by id, or by its place on an HTTP connection), is readdressed to
the caller's id without decoding (``Forward``). Its repeats at the same head (id aside) are
sent as the relay encoded the first one, with no decoding or planning (``Forwarder.again``).
A transport error, or an error answer another upstream may not give (a method this one
lacks, a block it pruned: ``UpstreamPool.declined``), hands the call to the full path,
which retries and fails over within what is left of the same deadline: the full path
counts it from the call's ``started``, and the forwarded try itself is bounded by the
upstream's timeout, never longer than the deadline (``make_upstream``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Container, Coroutine, Sequence
from typing import Any, Protocol

from chainrelay.config import LimitsConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.policy import HeadView, Kind
from chainrelay.rpc.replay import ReplayTable
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import HttpUpstream, TransportError, Upstream
from chainrelay.upstreams.wslink import WsUpstream
from chainrelay.wire.jsonrpc import (
    NULL_ID,
    Call,
    encode_error_raw,
    encode_request,
    encode_result,
    id_probe,
    parse_answer,
    parse_body,
    readdress,
)

log = logging.getLogger(__name__)

_RULES = policy.RULES
# Kinds whose calls are never sent straight to one upstream: writes go to every primary,
# subscriptions and filters are the node's own, and a log query's answer is measured
# against its size guard (``rpc/logguards.py``), which needs it read.
_NOT_FORWARDED = frozenset((Kind.SEND, Kind.SUBSCRIBE, Kind.FILTER, Kind.LOGS))
_REQUEST_OPEN = b'{"jsonrpc":"2.0","id":'
_REQUEST_OPEN_LEN = len(_REQUEST_OPEN)

# The full path of a call (``RpcService._answer_later``): (call, started, attempts spent,
# upstreams tried) -> its answer.
FullPath = Callable[[Call, float, int, Sequence[Upstream]], Coroutine[Any, Any, bytes | None]]


class AnswerSink(Protocol):
    """Where a forwarded call's answer is given, as to an asyncio future: a future, or a
    holder that writes it the moment it is given (``server/pending.py``'s ``Owed``)."""

    def get_loop(self) -> asyncio.AbstractEventLoop: ...

    def done(self) -> bool: ...

    def set_result(self, result: bytes, /) -> None: ...

    def set_exception(self, exc: BaseException, /) -> None: ...

    def cancel(self, msg: Any = None) -> bool: ...


class Forwarder:
    """Sends uncached reads straight to an upstream, and their repeats as first sent."""

    def __init__(
        self,
        pool: UpstreamPool,
        metrics: Metrics,
        view: HeadView,
        full_path: FullPath,
        limits: LimitsConfig,
    ) -> None:
        """``limits``: the bounds of the table of calls forwarded at this head (those of
        every replay table)."""
        self.pool = pool
        self.metrics = metrics
        self.view = view
        self.full_path = full_path
        self._loop: asyncio.AbstractEventLoop | None = None
        # Body without its id -> (method, the relay's own request after its id), for calls
        # forwarded at this head: their repeats are sent as that request under a new id.
        self.passes: ReplayTable[bytes, tuple[str, bytes]] = ReplayTable(
            limits.max_hit_table_bytes, limits.max_hit_table_entries, _pass_size
        )

    def send(
        self, call: Call, started: float, split: tuple[bytes, bytes] | None
    ) -> asyncio.Future[bytes] | None:
        """The future of ``call``'s answer, sent at once to a WebSocket or HTTP upstream
        (the pool's ``direct``), or None when it takes the full path. ``split``: the body's id
        token and the rest (``split_id``), to send its repeats the same way."""
        if _RULES[call.method].kind in _NOT_FORWARDED:
            return None
        upstream = self.pool.direct(call.method)
        if upstream is None:
            return None
        out = self.future()
        method = call.method
        rid = call.id or NULL_ID
        request = encode_request(0, method, call.params if call.has_params else None)
        forward = Forward(self, upstream, rid, method, call, started, out)
        # The request around its id (orjson keeps the members in order, "id" second).
        tail = request[_REQUEST_OPEN_LEN + 1 :]
        if not upstream.send_now(_REQUEST_OPEN, tail, forward):
            return None
        if split is not None and split[0] == rid:
            self._remember(split[1], method, tail)
        return out

    def future(self) -> asyncio.Future[bytes]:
        """A future on the running loop, for a forwarded call's answer."""
        loop = self._loop
        if loop is None:
            # Kept: asking asyncio for the running loop costs a getpid() system call.
            loop = self._loop = asyncio.get_running_loop()
        return loop.create_future()

    def _remember(self, rest: bytes, method: str, tail: bytes) -> None:
        """Remember a call just forwarded by its body without its id (``split_id``), with
        the request it was sent as (``tail``: what follows the id), so that its repeats at
        this head are sent the same with no decoding (``again``)."""
        passes = self.passes
        generation = self.view.generation
        if passes.get_at(rest, generation) is not None or not id_probe(rest):
            return
        passes.add(rest, (method, tail), generation)

    def again(
        self, body: bytes, token: bytes, rest: bytes, allowed: Container[str], out: AnswerSink
    ) -> bool:
        """Send a call forwarded before at this head, id aside, again as the relay encoded
        it the first time, under a new id, its answer to be given to ``out``: no decoding,
        no planning. Never the caller's bytes: a node might read them otherwise (a key
        twice, a member spelled in another case) than the relay did. False, with nothing
        sent, when it was not forwarded at this head, when no upstream takes it now, or
        when its method is not in ``allowed`` (what this caller may call: its first caller
        may have been another)."""
        known = self.passes.get_at(rest, self.view.generation)
        if known is None or known[0] not in allowed:
            return False
        method, tail = known
        upstream = self.pool.direct(method)
        if upstream is None:
            return False
        forward = Forward(self, upstream, token, method, body, time.perf_counter(), out)
        return upstream.send_now(_REQUEST_OPEN, tail, forward)


def _pass_size(rest: bytes, sent: tuple[str, bytes]) -> int:
    return len(rest) + len(sent[1])


class Forward:
    """Completes a call sent by a ``Forwarder``, as its upstream's waiter: called
    where the answer is read, it readdresses the answer to the caller's id, measures and
    counts it as the full path would ("pass") and sets the caller's future (``out``). A
    transport error (timeout, connection lost, garbage) starts the call again on the full
    path, which retries and fails over."""

    __slots__ = ("call", "forwarder", "method", "out", "rid", "started", "upstream")

    def __init__(
        self,
        forwarder: Forwarder,
        upstream: WsUpstream | HttpUpstream,
        rid: bytes,
        method: str,
        call: Call | bytes,
        started: float,
        out: AnswerSink,
    ) -> None:
        self.forwarder = forwarder
        self.upstream = upstream
        self.rid = rid  # the caller's id token
        self.method = method
        self.call = call  # or the body, parsed again only if the call must be retried
        self.started = started
        self.out = out

    def done(self) -> bool:
        return False  # the upstream gives each waiter one outcome, once

    def set_result(self, raw: bytes, /) -> None:
        # Called inside the upstream link's read: nothing may escape into it.
        try:
            self._answered(raw)
        except Exception as exc:
            log.exception("internal error serving %s", self.method)
            if not self.out.done():
                self.out.set_exception(exc)

    def _answered(self, raw: bytes) -> None:
        elapsed = time.perf_counter() - self.started
        rid = self.rid
        got = readdress(raw, rid)
        if got is None:
            try:
                answer = parse_answer(raw)
            except ValueError as err:
                self.set_exception(TransportError(f"malformed answer: {err}", malformed=True))
                return
            if answer.error is not None:
                got = encode_error_raw(rid, answer.error), True
            else:
                got = encode_result(rid, answer.result or NULL_ID), False
        if got[1] and self._declined(raw, elapsed):
            return
        out = self.out
        if out.done():  # the caller went away
            self._measure(elapsed, got[1])
            return
        out.set_result(got[0])
        if isinstance(out, asyncio.Future):
            # Measured once the answer is written: the write was scheduled first.
            out.get_loop().call_soon(self._measure, elapsed, got[1])
        else:  # written as it was given
            self._measure(elapsed, got[1])

    def _declined(self, raw: bytes, elapsed: float) -> bool:
        """An error answer the pool says another upstream may not give (a method this
        one lacks, a block it pruned: ``UpstreamPool.declined``): measured, and the call
        started again on the full path with this upstream tried. False: the node's real
        answer, passed on."""
        try:
            error = parse_answer(raw).error
        except ValueError:
            return False
        forwarder, upstream = self.forwarder, self.upstream
        if error is None or not forwarder.pool.declined(upstream, self.method, error):
            return False
        upstream.prune()
        upstream.answered(elapsed, True)
        self._retry(1)
        return True

    def _measure(self, elapsed: float, is_error: bool) -> None:
        upstream = self.upstream
        upstream.prune()
        upstream.answered(elapsed, is_error)
        self.forwarder.metrics.count(self.method, "pass", elapsed)

    def set_exception(self, exc: BaseException, /) -> None:
        forwarder, upstream = self.forwarder, self.upstream
        upstream.prune()
        if not isinstance(exc, TransportError):
            exc = TransportError(f"{type(exc).__name__}: {exc}")
        forwarder.pool.failed(upstream, exc, time.perf_counter() - self.started)
        log.debug("upstream %s %s failed: %s; retried", upstream.name, self.method, exc)
        self._retry(1)

    def _retry(self, spent: int) -> None:
        """Start the call again on the full path, ``spent`` attempts made (on this
        upstream, asked last there)."""
        call = self.call
        if self.out.done():
            return  # the caller went away
        if isinstance(call, bytes):
            item = parse_body(call, 1)[0][0]
            assert isinstance(item, Call)  # it was forwarded as one
            call = item
        retry = self.out.get_loop().create_task(
            self.forwarder.full_path(call, self.started, spent, (self.upstream,))
        )
        retry.add_done_callback(self._retried)

    def _retried(self, retry: asyncio.Task[bytes | None]) -> None:
        out = self.out
        if out.done():
            return
        if retry.cancelled():
            out.cancel()
        elif (exc := retry.exception()) is not None:
            out.set_exception(exc)
        else:
            out.set_result(retry.result() or b"")
