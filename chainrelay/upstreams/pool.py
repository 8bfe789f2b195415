"""The upstream pool: picks upstreams by health, lag and latency; retries, hedges, fails over.

Reads go to the best upstream; a timeout, connection error, 5xx, 429 or malformed answer is
retried on another one, and a slow read may be hedged onto a second upstream. A JSON-RPC
error that an upstream answered is the node's real answer and is returned as it is.

Every call has one deadline (``[pool] deadline``) covering all its tries and hedges; each
try is cut to what is left of it, and past it the call ends with ``UpstreamTimeout``. An
upstream whose errors in a row take it out of rotation is only probed until it answers,
never tried; with none in rotation a call is refused at once (``NoUpstreamInRotation``).
A provider's 429 asks to slow down: never counted against health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from eth_utils import keccak

from chainrelay.config import PoolConfig
from chainrelay.errors import (
    NoUpstreamInRotation,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamWrongChain,
)
from chainrelay.metrics import Metrics
from chainrelay.server.peer import detached
from chainrelay.upstreams.batching import BatchCall
from chainrelay.upstreams.upstream import (
    BatchUnsupported,
    TransportError,
    Upstream,
    WsUpstream,
)
from chainrelay.wire.jsonrpc import Answer, Params

log = logging.getLogger(__name__)

T = TypeVar("T")

# Error texts that mean "this node already has the transaction": success for a broadcast.
ALREADY_KNOWN = ("already known", "known transaction", "already imported", "already exists")


class UpstreamPool:
    def __init__(
        self, upstreams: Sequence[Upstream], settings: PoolConfig, metrics: Metrics
    ) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        self.upstreams = list(upstreams)
        self.settings = settings
        self.metrics = metrics
        for u in self.upstreams:
            u.observer = metrics.upstream_observer(u.name)
        self._probes: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[object]] = set()
        # Upstreams an operator took out of rotation (the admin listener's
        # chainrelay_cordonUpstream): out until uncordoned, whatever probes say.
        self.cordoned: set[str] = set()
        # Upstreams whose heads the head tracker does not trust (chain/quorum.py), with
        # why ("fork", "ahead", "syncing"): their heads count for no ``best_latest``.
        self.head_flags: dict[str, str] = {}

    async def start(self) -> None:
        for u in self.upstreams:
            await u.start()

    async def check_chain(self, expected: int | None) -> int:
        """Read every upstream's eth_chainId; refuse those on another chain.

        Returns the chain id. Raises ``UpstreamWrongChain`` when no upstream is left.
        """
        ids: dict[str, int] = {}
        for u in self.upstreams:
            try:
                answer = await u.call("eth_chainId", [])
                ids[u.name] = int(str(answer.value), 16)
            except (TransportError, ValueError, TypeError) as exc:
                log.warning("upstream %s: could not read eth_chainId (%s)", u.name, exc)
        if expected is None and ids:
            values = list(ids.values())
            expected = max(set(values), key=values.count)
        keep = []
        for u in self.upstreams:
            got = ids.get(u.name)
            if got is not None and got != expected:
                log.error(
                    "upstream %s refused: it serves chain id %d, this node serves %d",
                    u.name,
                    got,
                    expected,
                )
                continue
            u.chain_id = got
            keep.append(u)
        if not keep or expected is None:
            raise UpstreamWrongChain("no upstream serves the configured chain")
        self.upstreams = keep
        return expected

    async def stop(self) -> None:
        for t in (*self._probes, *self._background):
            t.cancel()
        await asyncio.gather(*self._probes, *self._background, return_exceptions=True)
        for u in self.upstreams:
            await u.stop()

    # --- selection --------------------------------------------------------------------
    @property
    def best_latest(self) -> int:
        flags = self.head_flags
        if flags:
            trusted = [u.latest for u in self.upstreams if u.name not in flags]
            if trusted:
                return max(trusted)
        return max((u.latest for u in self.upstreams), default=-1)

    @property
    def in_rotation(self) -> bool:
        """Whether any upstream is in rotation: with none, calls are refused at once."""
        return any(u.healthy for u in self.upstreams)

    def candidates(self, min_block: int = -1) -> list[Upstream]:
        """Upstreams in rotation in the order to try them: caught up (and holding
        ``min_block``) first, then those asking to slow down (a 429), fastest first. Empty
        when none is in rotation: out-of-rotation upstreams are only probed, never tried."""
        best = self.best_latest
        lag = self.settings.max_lag_blocks
        now = time.perf_counter()

        def rank(u: Upstream) -> tuple[bool, bool, float]:
            behind = u.latest >= 0 and (
                best - u.latest > lag or (min_block >= 0 and u.latest < min_block)
            )
            return behind, u.slow_until > now, u.latency

        order = [u for u in self.upstreams if u.healthy]
        order.sort(key=rank)
        return order

    def cordon(self, name: str) -> bool:
        """Take the upstream ``name`` out of rotation until ``uncordon``: calls under way
        finish, no new one is sent to it (heads may still be read from it). False: no
        upstream of that name."""
        u = self._named(name)
        if u is None:
            return False
        self.cordoned.add(name)
        u.healthy = False
        self.metrics.upstream_healthy.labels(name).set(0)
        log.warning("upstream %s cordoned: out of rotation until uncordoned", name)
        return True

    def uncordon(self, name: str) -> bool:
        """Put a cordoned upstream back in rotation, its error count cleared (if it is
        broken, its errors take it out again as they would any upstream). False: no
        upstream of that name."""
        u = self._named(name)
        if u is None:
            return False
        if name in self.cordoned:
            self.cordoned.discard(name)
            u.healthy = True
            u.consecutive_errors = 0
            self.metrics.upstream_healthy.labels(name).set(1)
            log.info("upstream %s uncordoned: back in rotation", name)
        return True

    def state(self, u: Upstream) -> str:
        """ "cordoned", "out" (of rotation after errors, probed) or "in" (rotation)."""
        if u.name in self.cordoned:
            return "cordoned"
        return "in" if u.healthy else "out"

    def _named(self, name: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.name == name), None)

    def direct(self) -> WsUpstream | None:
        """The upstream a read may be sent to straight away by a caller that pairs its
        answer itself (RpcService's forwarding path): the one ``call`` would try first,
        when it is a healthy WebSocket upstream and no hedge would be raced against it.
        None otherwise: the read goes through ``call``. Retries are the caller's to ask
        for, through ``call``, after ``failed`` (see ``Upstream``)."""
        upstreams = self.upstreams
        if len(upstreams) == 1:
            u = upstreams[0]
        else:
            order = self.candidates()
            if not order:
                return None
            u = order[0]
            if self._hedge_delay(u) is not None:
                return None
        if u.__class__ is not WsUpstream or not u.healthy:
            return None
        return u

    def failed(self, u: Upstream, exc: TransportError, elapsed: float) -> None:
        """Count a call sent through ``direct`` that got no usable answer, as ``call``
        counts its own attempts (health included)."""
        u.failed(exc, elapsed)
        self._failed_try(u, exc)

    def _failed_try(self, u: Upstream, exc: TransportError) -> None:
        """A try that got no usable answer: a 429 makes ``u`` tried last for what its
        Retry-After asks (never counted against its health); errors in a row take it out
        of rotation."""
        if exc.retry_after is not None:
            wait = min(exc.retry_after, self.settings.retry_after_max)
            u.slow_until = max(u.slow_until, time.perf_counter() + wait)
        elif exc.counts:
            self._mark_failed(u)

    def _mark_failed(self, u: Upstream) -> None:
        if u.healthy and u.consecutive_errors >= self.settings.max_consecutive_errors:
            u.healthy = False
            log.warning("upstream %s out of rotation after %d errors", u.name, u.consecutive_errors)
            self.metrics.upstream_healthy.labels(u.name).set(0)
            task = detached(self._probe(u), name=f"probe:{u.name}")
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe(self, u: Upstream) -> None:
        """Probe ``u`` until it answers, then bring it back. Probes start one interval apart
        and each is bounded by the interval: one that heals is back within one interval,
        whatever the probe under way when it healed was stuck on. Any answer brings it
        back, a 429 included (it is reachable; it only asks to be called less)."""
        interval = self.settings.probe_interval
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval
        while not u.healthy:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = loop.time() + interval
            try:
                await u.call("eth_blockNumber", [], timeout=interval)
            except TransportError as exc:
                if exc.retry_after is None:
                    continue
            if u.name in self.cordoned:
                return  # cordoned meanwhile: back only when uncordoned
            u.healthy = True
            u.consecutive_errors = 0
            self.metrics.upstream_healthy.labels(u.name).set(1)
            log.info("upstream %s back in rotation", u.name)

    # --- calls ------------------------------------------------------------------------
    async def _attempt(
        self, u: Upstream, method: str, params: Params | None, timeout: float
    ) -> Answer:
        try:
            return await u.call(method, params, timeout=timeout)
        except TransportError as exc:
            self._failed_try(u, exc)
            log.debug("upstream %s %s failed: %s", u.name, method, exc)
            raise

    def _hedge_delay(self, u: Upstream) -> float | None:
        s = self.settings
        if not s.hedge or len(u.samples) < 20:
            return None
        return max(s.hedge_min_delay, u.quantile(s.hedge_quantile))

    async def call(
        self,
        method: str,
        params: Params | None,
        min_block: int = -1,
        spent: int = 0,
        tried: Sequence[Upstream] = (),
        *,
        deadline: float | None = None,
    ) -> Answer:
        """A read: the first good answer from the best upstreams, retried and maybe hedged.
        ``spent``: attempts the caller made already (a read sent through ``direct``), taken
        from the budget; one is always left, for a link that failed under it. ``tried``:
        the upstreams those attempts went to, asked last (the best one may be the one that
        just failed, still healthy after one error). ``deadline``: the ``perf_counter``
        time the call ends by, answered or not (``UpstreamTimeout``), all its tries and
        hedges included; the pool's ``deadline`` from now when not given (the node's own
        reads). With no upstream in rotation, ``NoUpstreamInRotation`` at once."""
        now = time.perf_counter()
        if deadline is None:
            deadline = now + self.settings.deadline
        elif now >= deadline:  # spent on the forwarding path's try
            raise _no_answer(list(tried), spent, None, method, self.settings.deadline)
        max_attempts = max(1, self.settings.max_attempts - spent)
        if len(self.upstreams) == 1:
            if not self.upstreams[0].healthy:
                raise _out_of_rotation(self.upstreams, method)
            return await self._call_in_turn(self.upstreams, method, params, max_attempts, deadline)
        order = self.candidates(min_block)
        if not order:
            raise _out_of_rotation(self.upstreams, method)
        if tried:
            order = [u for u in order if u not in tried] + [u for u in order if u in tried]
        if self._hedge_delay(order[0]) is None:
            return await self._call_in_turn(order, method, params, max_attempts, deadline)
        launched = 0
        last_exc: TransportError | None = None
        running: dict[asyncio.Task[Answer], Upstream] = {}

        def launch() -> bool:
            nonlocal launched
            while launched < max_attempts:
                u = order[launched % len(order)]
                launched += 1
                left = deadline - time.perf_counter()
                if left <= 0.0:
                    return False
                if not u.healthy:  # taken out by this call's own tries
                    continue
                running[asyncio.ensure_future(self._attempt(u, method, params, left))] = u
                return True
            return False

        launch()
        try:
            while running:
                left = deadline - time.perf_counter()
                if left <= 0.0:
                    break
                first = next(iter(running.values()))
                delay = self._hedge_delay(first) if len(running) == 1 and len(order) > 1 else None
                wait = left if delay is None else min(delay, left)
                done, _ = await asyncio.wait(
                    running, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if delay is not None and delay < left:
                        self.metrics.hedged.inc()
                        launch()
                    continue
                for task in done:
                    running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        return task.result()
                    if not isinstance(exc, TransportError):
                        raise exc
                    last_exc = exc
                    if not running:
                        launch()
        finally:
            for task in running:
                task.cancel()
        raise _no_answer(order, launched, last_exc, method, self._late(deadline))

    async def _call_in_turn(
        self,
        order: list[Upstream],
        method: str,
        params: Params | None,
        attempts: int,
        deadline: float,
    ) -> Answer:
        """No hedge due (hedging off, or too few latencies known yet): the candidates one
        after another in the caller's own task, as the race would try them, with no tasks
        (``_in_turn``)."""

        def one(u: Upstream, left: float) -> Awaitable[Answer]:
            return u.call(method, params, timeout=left)

        return await self._in_turn(order, attempts, deadline, method, one)

    async def _in_turn(
        self,
        order: Sequence[Upstream],
        attempts: int,
        deadline: float,
        what: str,
        one: Callable[[Upstream, float], Awaitable[T]],
    ) -> T:
        """``one`` tried on ``order``'s upstreams in turn (``attempts`` tries at most), each
        try given what is left of the deadline; an upstream that asked to slow down is
        waited for only when a fair try (half its timeout) still fits after. The first
        answer; else the error of the last try (``what``: the methods, for it)."""
        last: TransportError | None = None
        tries = 0
        for i in range(attempts):
            u = order[i % len(order)]
            if not u.healthy:  # taken out of rotation by this call's own tries
                continue
            left = await _turn(u, deadline)
            if isinstance(left, TransportError):
                last = last or left
                continue
            if left <= 0.0:
                break
            tries += 1
            try:
                return await one(u, left)
            except TransportError as exc:
                self._failed_try(u, exc)
                log.debug("upstream %s %s failed: %s", u.name, what, exc)
                last = exc
        raise _no_answer(list(order), tries, last, what, self._late(deadline))

    def _late(self, deadline: float) -> float | None:
        """The pool's deadline, when ``deadline`` has passed (for the error's message)."""
        return self.settings.deadline if time.perf_counter() >= deadline else None

    async def call_batch(
        self,
        calls: Sequence[BatchCall],
        min_block: int = -1,
        *,
        deadline: float | None = None,
    ) -> list[Answer | UpstreamError]:
        """Reads sent as one JSON-RPC batch: each one's answer, in order, or the
        ``UpstreamError`` it got. The batch is tried on the candidates in turn as ``call``
        tries one read without a hedge (a batch is never raced), each try cut to what is
        left of ``deadline`` (``call``'s: a ``perf_counter`` time, the pool's deadline from
        now when not given). An upstream that refuses batches (``BatchUnsupported``) has
        the reads asked one by one through ``call``, by the same deadline."""
        if deadline is None:
            deadline = time.perf_counter() + self.settings.deadline
        try:
            return await self._batch_in_turn(calls, min_block, deadline)
        except UpstreamError as exc:
            return [exc] * len(calls)

    async def _batch_in_turn(
        self, calls: Sequence[BatchCall], min_block: int, deadline: float
    ) -> list[Answer | UpstreamError]:
        """``_call_in_turn`` for a batch (``_in_turn``); an upstream that refuses batches
        has the reads asked one by one instead."""
        method = _methods(calls)
        upstreams = self.upstreams
        order = upstreams if len(upstreams) == 1 else self.candidates(min_block)
        if not order or not any(u.healthy for u in order):
            raise _out_of_rotation(upstreams, method)

        async def one(u: Upstream, left: float) -> list[Answer | UpstreamError]:
            try:
                return list(await u.call_batch(calls, timeout=left))
            except BatchUnsupported as exc:
                log.debug("upstream %s: %s; asking call by call", u.name, exc)
            return await self._one_by_one(calls, min_block, deadline)

        return await self._in_turn(order, self.settings.max_attempts, deadline, method, one)

    async def _one_by_one(
        self, calls: Sequence[BatchCall], min_block: int, deadline: float
    ) -> list[Answer | UpstreamError]:
        """A refused batch's reads, each through ``call`` (all at once: the caller counted
        them as that many calls in flight)."""
        got = await asyncio.gather(
            *(self.call(m, p, min_block, deadline=deadline) for m, p in calls),
            return_exceptions=True,
        )
        out: list[Answer | UpstreamError] = []
        for r in got:
            if isinstance(r, Answer | UpstreamError):
                out.append(r)
            else:
                raise r
        return out

    def _settled(self, task: asyncio.Task[Answer]) -> None:
        """A write's copy to one upstream ended; one still going after the first answer was
        sent has its failure read here (the upstream's, counted by ``_attempt``)."""
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("late write failed: %s", task.exception())

    async def broadcast(
        self, method: str, params: Params | None, *, deadline: float | None = None
    ) -> Answer:
        """A write to every upstream in rotation at once; the first success answers, by
        ``deadline`` (as ``call``'s).

        "already known" from a node is success: the transaction is there. The calls that
        have not answered yet go on in the background (each within its try's timeout) so
        every node gets the transaction.
        """
        now = time.perf_counter()
        if deadline is None:
            deadline = now + self.settings.deadline
        order = [u for u in self.upstreams if u.healthy]
        if not order:
            raise _out_of_rotation(self.upstreams, method)
        left = deadline - now
        tasks = [asyncio.ensure_future(self._attempt(u, method, params, left)) for u in order]
        for task in tasks:
            # Failures that come after the answer (or together with it) are read there.
            task.add_done_callback(self._settled)
        first_error: Answer | None = None
        last_exc: BaseException | None = None
        pending = set(tasks)
        try:
            while pending:
                left = deadline - time.perf_counter()
                if left <= 0.0:
                    break
                done, pending = await asyncio.wait(
                    pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        last_exc = exc
                        continue
                    answer = task.result()
                    if answer.error is None:
                        return answer
                    if _already_known(answer) and isinstance(params, list) and params:
                        return Answer(_tx_hash(params[0]), None)
                    if first_error is None:
                        first_error = answer
        finally:
            self._background.update(pending)
        if first_error is not None:
            return first_error
        where = ",".join(u.name for u in order)
        if pending or (isinstance(last_exc, TransportError) and last_exc.timeout):
            raise UpstreamTimeout(
                f"no upstream took the transaction within the {self.settings.deadline:g}s deadline",
                method=method,
                upstream=where,
                attempts=len(order),
            )
        raise UpstreamUnavailable(
            f"no upstream took the transaction: {last_exc}",
            method=method,
            upstream=where,
            attempts=len(order),
        )


async def _turn(u: Upstream, deadline: float) -> float | TransportError:
    """What is left of ``deadline`` for a try on ``u`` once the pause its last 429 asked
    for is over (waited here); the error to report instead when that pause leaves no fair
    try (half its timeout) before the deadline."""
    now = time.perf_counter()
    if u.slow_until > now:
        if deadline - u.slow_until < u.timeout / 2:
            wait = u.slow_until - now
            return TransportError(f"HTTP 429, {wait:.1f}s to wait", retry_after=wait)
        await asyncio.sleep(u.slow_until - now)
        now = time.perf_counter()
    return deadline - now


def _already_known(answer: Answer) -> bool:
    msg = answer.error_message().lower()
    return any(s in msg for s in ALREADY_KNOWN)


def _tx_hash(raw: object) -> bytes:
    with contextlib.suppress(ValueError, TypeError):
        data = bytes.fromhex(str(raw)[2:])
        return b'"0x' + keccak(data).hex().encode() + b'"'
    return b"null"


def _methods(calls: Sequence[BatchCall]) -> str:
    """The methods of a batch, for its errors: each once, in first-seen order."""
    return ",".join(dict.fromkeys(m for m, _ in calls))


def _no_answer(
    order: list[Upstream],
    attempts: int,
    last: TransportError | None,
    method: str,
    deadline: float | None,
) -> UpstreamError:
    """What a read that got no answer from ``attempts`` tries of ``order`` raises;
    ``deadline``: the call's deadline in seconds when it passed."""
    where = ",".join(u.name for u in order[: max(1, attempts)])
    if deadline is not None:
        return UpstreamTimeout(
            f"no upstream answered within the {deadline:g}s deadline",
            method=method,
            upstream=where,
            attempts=attempts,
        )
    if last is not None and last.timeout:
        return UpstreamTimeout(
            "upstream timed out", method=method, upstream=where, attempts=attempts
        )
    return UpstreamUnavailable(
        f"no upstream answered: {last}", method=method, upstream=where, attempts=attempts
    )


def _out_of_rotation(upstreams: Sequence[Upstream], method: str) -> NoUpstreamInRotation:
    return NoUpstreamInRotation(
        "no upstream in rotation",
        method=method,
        upstream=",".join(u.name for u in upstreams),
        attempts=0,
    )
