"""The upstream pool: picks upstreams by role, weight, budget, capability, health and lag;
retries, hedges, fails over.

Primaries share reads by weight among those that can serve the call now; fallbacks serve
only what no primary can: down, lagging, paused by a 429, at their budget, or lacking the
method or the block (``candidates``, ``route.py``). A timeout, connection error, 5xx, 429 or
malformed answer is retried on another upstream, and a slow read may be hedged onto a
second upstream of the same role. A JSON-RPC error that an upstream answered is the node's
real answer and is returned as it is, unless its wording says another upstream may answer
(``capabilities.py``: a method it lacks, a block it pruned, a rate limit in words): then
the upstream learns it and the call is asked elsewhere; the node's error goes back only
when no upstream could answer.

Every upstream's budget (``budget.py``: calls per second, calls in flight) is kept: a read
goes to an upstream within it, or waits for one up to ``[pool] budget_wait``, then fails
with -32005 (``UpstreamOverloaded``).

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
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from eth_utils import keccak

from chainrelay import defaults as d
from chainrelay.config import PoolConfig
from chainrelay.errors import (
    NoUpstreamInRotation,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamWrongChain,
)
from chainrelay.metrics import Metrics
from chainrelay.server.peer import detached
from chainrelay.upstreams.batching import BatchCall
from chainrelay.upstreams.capabilities import Verdict, classify
from chainrelay.upstreams.route import PRIMARY, pick_weighted
from chainrelay.upstreams.upstream import BatchUnsupported, HttpUpstream, TransportError, Upstream
from chainrelay.upstreams.wslink import WsUpstream
from chainrelay.wire.jsonrpc import Answer, Params

# A read forwarded by block hash: (that hash, its params naming the block by number instead).
AtHead = tuple[str, Params]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Error texts that mean "this node already has the transaction": success for a broadcast.
ALREADY_KNOWN = ("already known", "known transaction", "already imported", "already exists")
# A read waiting for an upstream's concurrency to free a slot looks again this often: a
# call ending is not signalled (the forwarding path's ends in the link's own callback), and
# 5 ms is well under a provider's round trip.
BUDGET_RECHECK = 0.005
# The state read that probes a pruned upstream's lowest block (erpc's "callState" probe).
PROBE_ADDRESS = "0x" + "00" * 20


class Declined(TransportError):
    """An upstream answered with an error another upstream may not give (``verdict``):
    it lacks the method, pruned the block, or asked in words to slow down. Retried
    elsewhere; never counted against its health. ``answer``: the node's own error, what
    the caller gets when no upstream could answer."""

    def __init__(self, upstream: Upstream, answer: Answer, verdict: Verdict) -> None:
        pause = d.SLOW_DOWN_PAUSE if verdict is Verdict.SLOW_DOWN else None
        super().__init__(f"{verdict.value}: {answer.error_message()}", retry_after=pause)
        self.upstream = upstream
        self.answer = answer
        self.verdict = verdict
        self.counts = False


class OverBudget(TransportError):
    """No try was made: the upstream stayed at its budget (``max_rps``, ``max_concurrency``)
    for all of ``[pool] budget_wait``."""

    def __init__(self, upstream: Upstream) -> None:
        super().__init__(f"upstream {upstream.name} at its budget")
        self.counts = False


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
        # Upstreams whose lowest block is being probed (one probe each at a time).
        self._probing: set[str] = set()
        self._background: set[asyncio.Task[object]] = set()
        # Upstreams an operator took out of rotation (the admin listener's
        # chainrelay_cordonUpstream): out until uncordoned, whatever probes say.
        self.cordoned: set[str] = set()
        # Upstreams whose heads the head tracker does not trust (chain/quorum.py), with
        # why ("fork", "ahead", "syncing"): their heads count for no ``best_latest``.
        self.head_flags: dict[str, str] = {}
        # When (perf_counter) a call last found no primary that could serve it now: the
        # fallbacks serve, so the head tracker follows their heads at full cadence.
        self.fallback_wanted_at = -math.inf

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

    def candidates(self, min_block: int = -1, method: str = "") -> list[Upstream]:
        """Upstreams in rotation in the order to try them for ``method`` reading
        ``min_block`` (-1: none). In classes, primaries before fallbacks in each: those that
        can serve it now (the first primary picked by weight, the others fastest first);
        then those to wait for (a 429's pause, a budget at its bound); then those lagging,
        lacking the method or the block, or whose head the tracker does not trust
        (``head_flags``: last, asked only when no other can be). Empty when none is
        in rotation: out-of-rotation upstreams are only probed, never tried.

        On every miss: one pass over the upstreams, one list, one sort, as before routing."""
        best = self.best_latest
        lag = self.settings.max_lag_blocks
        now = time.perf_counter()
        flags = self.head_flags
        order = []
        for u in self.upstreams:
            if not u.healthy:
                continue
            r = u.route
            latest = u.latest
            behind = best - latest if u.slow_lag is None else u.slow_lag
            if (
                (latest >= 0 and (behind > lag or (min_block >= 0 and latest < min_block)))
                or not r.caps.serves(method, min_block, now)
                or (flags and u.name in flags)  # on a fork of its own, far ahead, syncing
            ):
                r.rank = 4 + r.tier
            elif u.slow_until > now or (r.budget.bounded and not r.budget.open(now, u.in_flight)):
                r.rank = 2 + r.tier
            else:
                r.rank = r.tier
            order.append(u)
        first = pick_weighted(order)
        if first is not None:
            first.route.rank = -1
        else:
            self.fallback_wanted_at = now  # no primary can serve it now
        order.sort(key=_rank)
        return order

    def fallbacks_serve(self, hold: float) -> bool:
        """Whether the fallbacks serve (and so are followed at full cadence): no primary
        can (each out of rotation, failing, flagged, lagging or paused by a 429; none
        configured), or a call found none that could, for its budget, capability or block,
        within the last ``hold`` seconds."""
        now = time.perf_counter()
        if now - self.fallback_wanted_at < hold:
            return True
        best = self.best_latest
        lag = self.settings.max_lag_blocks
        failing = self.settings.max_consecutive_errors
        flags = self.head_flags
        return not any(
            u.route.tier == PRIMARY
            and u.healthy
            and u.consecutive_errors < failing  # head polls failing too: it is down
            and u.name not in flags
            and (u.latest < 0 or best - u.latest <= lag)
            and u.slow_until <= now
            for u in self.upstreams
        )

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

    def direct(self, method: str = "") -> WsUpstream | HttpUpstream | None:
        """The upstream a read of ``method`` may be sent to straight away by a caller that
        pairs its answer itself (RpcService's forwarding path): the one ``call`` would try
        first, when it is a healthy WebSocket or HTTP upstream that can take it now (not
        paused, within its budget) and no hedge would be raced against it. None otherwise:
        the read goes through ``call``. Retries are the caller's to ask for, through
        ``call``, after ``failed`` or ``declined`` (see ``Upstream``)."""
        upstreams = self.upstreams
        if len(upstreams) == 1:
            u = upstreams[0]
            r = u.route
            if r.budget.bounded or u.slow_until:
                now = time.perf_counter()
                if u.slow_until > now or not r.budget.open(now, u.in_flight):
                    return None
        else:
            order = self.candidates(-1, method)
            if not order:
                return None
            u = order[0]
            if u.route.rank > 1:  # to be waited for, or lacking the method: the full path
                return None
            if self._hedge_delay(u) is not None:
                return None
        if (u.__class__ is not WsUpstream and u.__class__ is not HttpUpstream) or not u.healthy:
            return None
        if u.route.budget.concurrency and u.__class__ is HttpUpstream:
            return None  # its sends straight away are not counted in flight: ``call`` keeps it
        return u

    def declined(self, u: Upstream, method: str, error: bytes) -> bool:
        """Whether the JSON-RPC ``error`` that ``u`` answered to a read of ``method`` sent
        through ``direct`` is one another upstream may not give (``capabilities.py``):
        learnt, and the caller then asks ``call`` with ``u`` as tried. False: it is the
        node's real answer."""
        return self._judge(u, method, -1, Answer(None, error)) is not None

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
            now = time.perf_counter()
            wait = min(exc.retry_after, self.settings.retry_after_max)
            u.slow_until = max(u.slow_until, now + wait)
            u.route.budget.slowed(now)
        elif exc.counts:
            self._mark_failed(u)

    def _judge(self, u: Upstream, method: str, block: int, answer: Answer) -> Declined | None:
        """``answer``'s error when another upstream may answer instead (``capabilities``),
        with what ``u`` learns from it taken in; None for a result or the node's real
        error. ``block``: the block the call read (-1: none known)."""
        if answer.error is None:
            return None
        verdict = classify(answer.error)
        if verdict is None:
            return None
        if verdict is not Verdict.SLOW_DOWN and u.route.caps.learn(
            verdict, method, block, time.perf_counter()
        ):
            log.info(
                "upstream %s: %s %s at block %d: asked elsewhere",
                u.name,
                verdict.value,
                method,
                block,
            )
            if verdict is Verdict.PRUNED and block >= 0:
                self._probe_lowest(u)
        return Declined(u, answer, verdict)

    def _probe_lowest(self, u: Upstream) -> None:
        """Find ``u``'s lowest available block by bisection, in the background, once a
        pruned answer marked it (erpc's blockAvailability probe): reads of the blocks
        between the mark and the true bound then skip it at once, instead of each learning
        it by a failed try."""
        if u.name in self._probing or u.latest < 0:
            return
        self._probing.add(u.name)
        task = detached(self._bisect_lowest(u), name=f"availability:{u.name}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _bisect_lowest(self, u: Upstream) -> None:
        """Bisect between ``u``'s learnt lowest block (not held below it) and its head
        (held): each step one state read, within its budget (none spent past it)."""
        caps = u.route.caps
        budget = u.route.budget
        hi = u.latest
        try:
            for _ in range(d.AVAILABILITY_PROBE_STEPS):
                lo = caps.lowest
                if lo >= hi or (
                    budget.bounded and not budget.open(time.perf_counter(), u.in_flight)
                ):
                    return
                mid = (lo + hi) // 2
                answer = await u.call("eth_getBalance", [PROBE_ADDRESS, hex(mid)])
                if answer.error is None:
                    hi = mid
                elif classify(answer.error) is Verdict.PRUNED:
                    caps.learn(Verdict.PRUNED, "", mid, time.perf_counter())
                else:
                    return
        except TransportError as exc:
            log.debug("upstream %s: availability probe stopped: %s", u.name, exc)
        finally:
            self._probing.discard(u.name)
            log.info("upstream %s: lowest available block %d", u.name, caps.lowest)

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

    async def _read(
        self,
        u: Upstream,
        method: str,
        params: Params | None,
        block: int,
        timeout: float,
        at_head: AtHead | None = None,
    ) -> Answer:
        """One try of a read on ``u``: its answer, or ``Declined`` when its error says
        another upstream may answer (learnt by ``u``). ``at_head``: see ``call``."""
        if at_head is not None and u.head_by_number and u.head_hash == at_head[0]:
            params = at_head[1]
        answer = await u.call(method, params, timeout=timeout)
        declined = self._judge(u, method, block, answer)
        if declined is not None:
            raise declined
        return answer

    async def _attempt_read(
        self,
        u: Upstream,
        method: str,
        params: Params | None,
        block: int,
        deadline: float,
        at_head: AtHead | None = None,
    ) -> Answer:
        """A try of a raced read: ``_read`` once ``u``'s pause and budget allow (``_turn``)."""
        try:
            left = await self._turn(u, deadline)
            if isinstance(left, TransportError):
                raise left
            return await self._read(u, method, params, block, left, at_head)
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
        at_head: AtHead | None = None,
    ) -> Answer:
        """A read: the first good answer from the best upstreams, retried and maybe hedged.
        ``min_block``: the block the read needs (the one it reads, ``policy.Plan``'s), for
        lag and block availability. ``spent``: attempts the caller made already (a read sent
        through ``direct``), taken from the budget; one is always left, for a link that
        failed under it. ``tried``: the upstreams those attempts went to, asked last (the
        best one may be the one that just failed, still healthy after one error).
        ``at_head``: (block hash, params naming that block by number) for a read forwarded
        by hash: an upstream whose own head is that block is sent the by-number form, if it
        is one node (``Upstream.head_by_number``).
        ``deadline``: the ``perf_counter`` time the call ends by, answered or not
        (``UpstreamTimeout``), all its tries and hedges included; the pool's ``deadline``
        from now when not given (the node's own reads). With no upstream in rotation,
        ``NoUpstreamInRotation`` at once. An answer every upstream asked declined (a
        method none has, a block none holds) is the first one's own error."""
        now = time.perf_counter()
        if deadline is None:
            deadline = now + self.settings.deadline
        elif now >= deadline:  # spent on the forwarding path's try
            raise _no_answer(list(tried), spent, None, method, self.settings.deadline)
        max_attempts = max(1, self.settings.max_attempts - spent)
        if len(self.upstreams) == 1:
            if not self.upstreams[0].healthy:
                raise _out_of_rotation(self.upstreams, method)
            return await self._call_in_turn(
                self.upstreams, method, params, min_block, max_attempts, deadline, at_head
            )
        order = self.candidates(min_block, method)
        if not order:
            raise _out_of_rotation(self.upstreams, method)
        if tried:
            order = [u for u in order if u not in tried] + [u for u in order if u in tried]
        if self._hedge_delay(order[0]) is None:
            return await self._call_in_turn(
                order, method, params, min_block, max_attempts, deadline, at_head
            )
        launched = 0
        # Attempts: a decline is routing, not a failed try, so it gives its attempt back
        # (once per upstream at most).
        limit = max_attempts
        last_exc: TransportError | None = None
        declined: list[Upstream] = []
        first_declined: Declined | None = None
        shut: OverBudget | None = None
        running: dict[asyncio.Task[Answer], Upstream] = {}

        def launch(hedge: bool = False) -> bool:
            nonlocal launched
            while launched < limit:
                u = order[launched % len(order)]
                if deadline - time.perf_counter() <= 0.0:
                    return False
                if hedge and u.route.tier != order[0].route.tier:
                    return False  # a hedge is never billed to a fallback
                launched += 1
                if not u.healthy or u in declined:  # out, or declined, in this call
                    continue
                if hedge and not _ready(u, time.perf_counter()):
                    continue  # a hedge is never waited for: the next one, if any
                task = asyncio.ensure_future(
                    self._attempt_read(u, method, params, min_block, deadline, at_head)
                )
                running[task] = u
                return True
            return False

        launch()
        hedging = len(order) > 1
        try:
            while running:
                left = deadline - time.perf_counter()
                if left <= 0.0:
                    break
                first = next(iter(running.values()))
                delay = self._hedge_delay(first) if hedging and len(running) == 1 else None
                wait = left if delay is None else min(delay, left)
                done, _ = await asyncio.wait(
                    running, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    if delay is not None and delay < left:
                        if launch(hedge=True):
                            self.metrics.hedged.inc()
                        else:
                            hedging = False  # none to race: wait for the one under way
                    continue
                for task in done:
                    running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        return task.result()
                    if not isinstance(exc, TransportError):
                        raise exc
                    if isinstance(exc, Declined):
                        declined.append(exc.upstream)
                        first_declined = first_declined or exc
                        limit = min(limit + 1, max_attempts + len(order))
                    elif isinstance(exc, OverBudget):
                        shut = exc
                    last_exc = exc
                    if not running:
                        launch()
        finally:
            for task in running:
                task.cancel()
        if first_declined is not None and shut is None:
            return first_declined.answer
        raise _no_answer(order, launched, shut or last_exc, method, self._late(deadline))

    async def _call_in_turn(
        self,
        order: Sequence[Upstream],
        method: str,
        params: Params | None,
        min_block: int,
        attempts: int,
        deadline: float,
        at_head: AtHead | None = None,
    ) -> Answer:
        """No hedge due (hedging off, or too few latencies known yet): the candidates one
        after another in the caller's own task, as the race would try them, with no tasks
        (``_in_turn``). Every upstream declining: the first one's own error."""

        def one(u: Upstream, left: float) -> Awaitable[Answer]:
            return self._read(u, method, params, min_block, left, at_head)

        try:
            return await self._in_turn(order, attempts, deadline, method, one)
        except Declined as exc:
            return exc.answer

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
        waited for only when a fair try (half its timeout) still fits after, and one at its
        budget for ``[pool] budget_wait`` at most. The first answer; else the first
        ``Declined`` (every upstream tried declined the call), else the error of the last
        try (``what``: the methods, for it)."""
        last: TransportError | None = None
        first_declined: Declined | None = None
        declined: list[Upstream] | None = None
        shut: OverBudget | None = None
        tries = 0
        # A decline is routing, not a failed try: it gives its attempt back, so each
        # upstream may decline once on top of ``attempts``.
        limit = attempts
        for i in range(attempts + len(order)):
            if i >= limit:
                break
            u = order[i % len(order)]
            if not u.healthy:  # taken out of rotation by this call's own tries
                continue
            if declined is not None and u in declined:
                limit += 1  # it said so already: not asked twice, and no attempt spent
                continue
            left = await self._turn(u, deadline)
            if isinstance(left, TransportError):
                if isinstance(left, OverBudget):
                    shut = left
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
                if isinstance(exc, Declined):
                    declined = [u] if declined is None else [*declined, u]
                    first_declined = first_declined or exc
                    limit += 1
        if first_declined is not None and shut is None:
            raise first_declined  # every upstream asked declined: the node's own error
        raise _no_answer(list(order), tries, shut or last, what, self._late(deadline))

    async def _turn(self, u: Upstream, deadline: float) -> float | TransportError:
        """What is left of ``deadline`` for a try on ``u`` once the pause its last 429 asked
        for is over, and its budget lets one more call go (both waited here); the error to
        report instead when that pause leaves no fair try (half its timeout) before the
        deadline, or the budget stays shut for all of ``[pool] budget_wait``."""
        left = await _paused(u, deadline)
        budget = u.route.budget
        if isinstance(left, TransportError) or not budget.bounded:
            return left
        now = time.perf_counter()
        until = min(now + self.settings.budget_wait, deadline)
        while not budget.open(now, u.in_flight):
            wait = budget.wait(now, u.in_flight)
            if wait == math.inf:  # a slot frees when a call ends: looked for again
                wait = BUDGET_RECHECK
            if now + wait > until:
                return OverBudget(u)
            await asyncio.sleep(wait)
            now = time.perf_counter()
        return deadline - now

    def _late(self, deadline: float) -> float | None:
        """The pool's deadline, when ``deadline`` has passed (for the error's message)."""
        return self.settings.deadline if time.perf_counter() >= deadline else None

    async def call_batch(
        self,
        calls: Sequence[BatchCall],
        min_block: int = -1,
        *,
        deadline: float | None = None,
        at_head: Sequence[AtHead | None] = (),
    ) -> list[Answer | UpstreamError]:
        """Reads sent as one JSON-RPC batch: each one's answer, in order, or the
        ``UpstreamError`` it got. The batch is tried on the candidates in turn as ``call``
        tries one read without a hedge (a batch is never raced), each try cut to what is
        left of ``deadline`` (``call``'s: a ``perf_counter`` time, the pool's deadline from
        now when not given). An upstream that refuses batches (``BatchUnsupported``) has
        the reads asked one by one through ``call``, by the same deadline; a read it
        declined (a method it lacks, a block it pruned) is asked again through ``call``.
        ``at_head``: each read's, as ``call``'s (none: every read as it is)."""
        if deadline is None:
            deadline = time.perf_counter() + self.settings.deadline
        try:
            return await self._batch_in_turn(calls, min_block, deadline, at_head)
        except UpstreamError as exc:
            return [exc] * len(calls)

    async def _batch_in_turn(
        self,
        calls: Sequence[BatchCall],
        min_block: int,
        deadline: float,
        at_head: Sequence[AtHead | None] = (),
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
                answers = await u.call_batch(_at_its_head(calls, at_head, u), timeout=left)
            except BatchUnsupported as exc:
                log.debug("upstream %s: %s; asking call by call", u.name, exc)
                return await self._one_by_one(calls, min_block, deadline)
            return await self._asked_again(u, calls, answers, deadline)

        return await self._in_turn(order, self.settings.max_attempts, deadline, method, one)

    async def _asked_again(
        self, u: Upstream, calls: Sequence[BatchCall], answers: list[Answer], deadline: float
    ) -> list[Answer | UpstreamError]:
        """``u``'s answers to a batch, with those it declined asked again through ``call``
        (``u`` tried last). A batch's calls may read different blocks: none is learnt as
        ``u``'s lowest from here, only methods."""
        out: list[Answer | UpstreamError] = list(answers)
        again: list[int] = []
        for i, (answer, (m, _p)) in enumerate(zip(answers, calls, strict=True)):
            if answer.error is not None and self._judge(u, m, -1, answer) is not None:
                again.append(i)
        if not again:
            return out
        got = await asyncio.gather(
            *(self.call(calls[i][0], calls[i][1], tried=(u,), deadline=deadline) for i in again),
            return_exceptions=True,
        )
        for i, r in zip(again, got, strict=True):
            if isinstance(r, Answer | UpstreamError):
                out[i] = r
            else:
                raise r
        return out

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
        """A write to every primary in rotation at once; the first success answers, by
        ``deadline`` (as ``call``'s). The fallbacks get it only when no primary can take it
        (none in rotation, or each failed without an answer): a paid fallback is not billed
        for every transaction the primaries carry.

        "already known" from a node is success: the transaction is there. The calls that
        have not answered yet go on in the background (each within its try's timeout) so
        every node gets the transaction.
        """
        now = time.perf_counter()
        if deadline is None:
            deadline = now + self.settings.deadline
        healthy = [u for u in self.upstreams if u.healthy]
        if not healthy:
            raise _out_of_rotation(self.upstreams, method)
        primaries = [u for u in healthy if u.route.tier == PRIMARY]
        fallbacks = [u for u in healthy if u.route.tier != PRIMARY]
        tiers = [primaries, fallbacks] if primaries and fallbacks else [healthy]
        asked: list[Upstream] = []
        last_exc: BaseException | None = None
        under_way = False  # some still under way at the deadline
        for order in tiers:
            if asked and deadline - time.perf_counter() <= 0.0:
                break
            asked += order
            got = await self._write_to(order, method, params, deadline)
            if isinstance(got, Answer):
                return got
            if got is None:
                under_way = True
                break
            last_exc = got
        where = ",".join(u.name for u in asked)
        if under_way or (isinstance(last_exc, TransportError) and last_exc.timeout):
            raise UpstreamTimeout(
                f"no upstream took the transaction within the {self.settings.deadline:g}s deadline",
                method=method,
                upstream=where,
                attempts=len(asked),
            )
        raise UpstreamUnavailable(
            f"no upstream took the transaction: {last_exc}",
            method=method,
            upstream=where,
            attempts=len(asked),
        )

    async def _write_to(
        self, order: Sequence[Upstream], method: str, params: Params | None, deadline: float
    ) -> Answer | BaseException | None:
        """``broadcast``'s write sent to each of ``order`` at once: the first success, else
        the first error an upstream answered (its real answer), else the last failure
        (none answered: the next tier may be asked); None when some were still under way
        at ``deadline``."""
        left = deadline - time.perf_counter()
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
        if pending:
            return None
        return last_exc


async def _paused(u: Upstream, deadline: float) -> float | TransportError:
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


def _ready(u: Upstream, now: float) -> bool:
    """Whether a call may go to ``u`` now: not paused by a 429, within its budget."""
    b = u.route.budget
    return u.slow_until <= now and (not b.bounded or b.open(now, u.in_flight))


def _rank(u: Upstream) -> tuple[int, float]:
    """The order of ``candidates``: its class for the call (``Route.rank``), then latency."""
    return u.route.rank, u.latency


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
    if isinstance(last, OverBudget):
        return UpstreamOverloaded(
            "every upstream that could answer stayed at its budget (max_rps, "
            "max_concurrency) past [pool] budget_wait",
            method=method,
            upstream=where,
            attempts=attempts,
        )
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


def _at_its_head(
    calls: Sequence[BatchCall], at_head: Sequence[AtHead | None], u: Upstream
) -> Sequence[BatchCall]:
    """``calls`` as sent to ``u``: each read pinned to ``u``'s own head by hash, by number
    instead (``UpstreamPool.call``'s ``at_head``)."""
    head = u.head_hash
    if head is None or not at_head or not u.head_by_number:
        return calls
    return [
        (m, form[1]) if form is not None and form[0] == head else (m, p)
        for (m, p), form in zip(calls, at_head, strict=True)
    ]
