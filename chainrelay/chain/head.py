"""The head tracker: follows every upstream's head, keeps latest/safe/finalized, sees reorgs.

Each upstream is followed by ``newHeads`` when it speaks WebSocket and by polling
otherwise. The node's head is the block its upstreams agree on (``chain/quorum.py``): with
3 or more, the highest a quorum holds by hash; with 2, the higher head within
``[head] max_ahead_blocks`` of the other; with 1, its head. Upstreams on a fork of their
own, too far ahead, or syncing (``eth_syncing``, asked at start and every
``[head] syncing_every``) are flagged in the pool (``UpstreamPool.head_flags``), so their
heads count for no ``latest``, until they agree again. The recent canonical chain
(number -> hash) is kept for a bounded window and rewritten on a reorg.

Under ``serve --workers N`` the feeder worker's tracker writes its head to a
``SharedHead`` (``share_to``); the other workers' trackers take their heads from the
feeder's frames (``pushed_only``) and read the shared head (``shared``): while the feeder
confirms a head no older than theirs, they ask no upstream to confirm it, and they take
its finality instead of asking for their own. When it stops confirming (it is away),
they poll their upstreams and ask for finality as a pushed-only tracker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chainrelay.chain.headpoll import HeadPollSchedule
from chainrelay.chain.profiles import ChainProfile
from chainrelay.chain.quorum import HeadQuorum
from chainrelay.chain.sharedhead import SharedHead
from chainrelay.config import HeadConfig
from chainrelay.metrics import Metrics
from chainrelay.rpc.policy import HeadView
from chainrelay.server.peer import detached
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.route import PRIMARY
from chainrelay.upstreams.upstream import TransportError, Upstream

log = logging.getLogger(__name__)

# Back-off after a failed poll or a broken head stream.
RETRY_DELAY = 0.5
# How often a fallback's follower looks whether the fallbacks serve (a look at the pool's
# state, no call): a dead primary has its fallback followed at full cadence within a second.
FALLBACK_RECHECK = 1.0


@dataclass(frozen=True, slots=True)
class Header:
    number: int
    hash: str
    parent_hash: str

    @classmethod
    def parse(cls, obj: Any) -> Header | None:
        try:
            return cls(int(obj["number"], 16), obj["hash"], obj["parentHash"])
        except (KeyError, TypeError, ValueError):
            return None


# Called with (new canonical headers, oldest first; headers reorged away, newest first).
HeadListener = Callable[[list[Header], list[Header]], None]


class HeadTracker:
    def __init__(
        self,
        pool: UpstreamPool,
        profile: ChainProfile,
        metrics: Metrics,
        cfg: HeadConfig,
        *,
        pushed_only: bool = False,
        share_to: SharedHead | None = None,
        shared: SharedHead | None = None,
        feeder_linked: Callable[[], bool] | None = None,
    ) -> None:
        """``cfg``: the ``[head]`` section (reorg window, backfill, finality refresh,
        freshness, and each polled upstream's schedule). ``share_to``: where this tracker
        writes its head for the node's other workers (the feeder's); ``shared``: where it
        reads the feeder's (the other workers'), and ``feeder_linked`` whether this worker's
        link to the feeder is up (a feeder that died is known at once, not only once its
        confirmations stop)."""
        self.pool = pool
        self.profile = profile
        self.metrics = metrics
        self.cfg = cfg
        self.view = HeadView()
        self.window = cfg.reorg_window
        self.backfill = min(cfg.backfill_blocks, cfg.reorg_window)
        self._backfill_task: asyncio.Task[None] | None = None
        self.fresh_seconds = cfg.fresh_blocks * profile.block_time
        # The feeder worker is away once it confirmed nothing for this long: on a quiet
        # chain it confirms its head every half freshness window to a whole one (``_confirm``
        # looks every half window), so a window and a half pass between its confirmations
        # at worst while it is well.
        self.feeder_away_after = 1.5 * max(self.fresh_seconds, 1.0)
        # Heads come from elsewhere (``push_header``: the relay tree's frames): upstreams
        # are asked once for a first head, then only when nothing confirmed it for a while.
        self.pushed_only = pushed_only
        self.share_to = share_to
        self.shared = shared
        self.feeder_linked = feeder_linked
        # One schedule per polled upstream, kept across broken polls so a retry does not
        # forget the chain's rhythm.
        self.schedules: dict[str, HeadPollSchedule] = {}
        self.updated_at = 0.0  # monotonic time of the last head change
        # Monotonic time an upstream last confirmed the head (changed or not): a quiet
        # chain with a live upstream is fresh; a silent upstream is not.
        self.confirmed_at = 0.0
        self.listeners: list[HeadListener] = []
        # Every header a head stream sent, by hash, as sent (the last ``window`` of them):
        # heads pushed back to back are adopted one task later each, and the block follower
        # gives each block the payload pushed for it, whichever upstream pushed it.
        self.pushed: dict[str, dict[str, Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self._finality_task: asyncio.Task[None] | None = None
        self._last_finality_at = -(10**9)
        self._changed = asyncio.Event()
        # Whether the upstreams answer each tag: None until asked. The profile's fallback
        # depth stands in only for a tag that is missing, never on top of a real answer.
        self._has_tag: dict[str, bool | None] = {"finalized": None, "safe": None}
        # Which head the upstreams agree on; set at start for two upstreams or more that
        # this tracker follows itself (heads pushed from the tree were agreed upstream).
        self.quorum: HeadQuorum | None = None

    @property
    def fresh(self) -> bool:
        confirmed = self.confirmed_at
        if self.shared is not None:
            confirmed = max(confirmed, self.shared.confirmed_for(self.view.number))
        return self.view.known and time.monotonic() - confirmed < max(self.fresh_seconds, 1.0)

    async def start(self) -> None:
        upstreams = self.pool.upstreams
        if len(upstreams) > 1 and not self.pushed_only:
            cfg = self.cfg
            names = [u.name for u in upstreams]
            self.quorum = HeadQuorum(names, cfg.quorum, cfg.max_ahead_blocks, self.window)
        if not self.pushed_only and any(u.route.tier == PRIMARY for u in upstreams):
            for u in upstreams:
                if u.route.tier != PRIMARY:
                    u.slow_lag = 0  # checked slowly from the start, until it serves
        for u in upstreams:
            self._tasks.append(asyncio.create_task(self._follow(u), name=f"head:{u.name}"))
            if self.quorum is not None:
                task = asyncio.create_task(self._check_syncing(u), name=f"syncing:{u.name}")
                self._tasks.append(task)

    async def stop(self) -> None:
        tasks = [*self._tasks]
        for extra in (self._finality_task, self._backfill_task):
            if extra is not None:
                tasks.append(extra)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until a first head is known."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.view.known:
                    self._changed.clear()
                    await self._changed.wait()
        return self.view.known

    async def walked_back(self) -> None:
        """Return once the walk back from the first head (``[head] backfill_blocks``) is
        over, if one is under way: the canonical hashes behind that head are then known."""
        task = self._backfill_task
        if task is not None and not task.done():
            await asyncio.wait({task})

    # --- following -------------------------------------------------------------------
    async def _follow(self, u: Upstream) -> None:
        if self.pushed_only:
            with contextlib.suppress(TransportError):
                await self._poll_once(u)
            await self._confirm(u)
            return
        if u.slow_lag is not None:
            await self._follow_fallback(u)
        else:
            await self._follow_full(u)

    async def _follow_full(self, u: Upstream) -> None:
        """Follow ``u``'s head at full cadence: its head stream, or polls as its schedule
        expects blocks."""
        confirm: asyncio.Task[None] | None = None
        try:
            if u.is_ws:
                # Polling confirms the head by itself; a head stream needs the confirmation
                # loop.
                confirm = asyncio.create_task(self._confirm(u), name=f"confirm:{u.name}")
                self._tasks.append(confirm)
                with contextlib.suppress(TransportError):
                    await self._poll_once(u)  # a first head now, not at the next block
            while True:
                try:
                    if u.is_ws:
                        await u.subscribe_heads(functools.partial(self.push_header, u))
                    else:
                        await self._poll(u)
                except asyncio.CancelledError:
                    raise
                except (TransportError, NotImplementedError) as exc:
                    log.debug("head stream of %s broke: %s", u.name, exc)
                    if u.is_ws:
                        # Whatever the stream missed is fetched when the next head links back.
                        with contextlib.suppress(TransportError):
                            await self._poll_once(u)
                await asyncio.sleep(RETRY_DELAY)
        finally:
            if confirm is not None:
                confirm.cancel()
                self._tasks.remove(confirm)

    async def _follow_fallback(self, u: Upstream) -> None:
        """Follow a fallback's head: one check every ``[head] fallback_interval`` while the
        primaries serve (it is billed per call, and serves nothing meanwhile; its lag at
        the check is what the pool judges it by: ``Upstream.slow_lag``), at full cadence
        while the fallbacks serve (``UpstreamPool.fallbacks_serve``) and for one interval
        after. A fallback does not vote on the head while checked slowly (its head is up to
        an interval old: it would flag the primaries "ahead"); it votes while it serves."""
        pool = self.pool
        every = self.cfg.fallback_interval
        loop = asyncio.get_running_loop()
        while True:
            if pool.fallbacks_serve(every):
                u.slow_lag = None
                log.info("fallback %s serves: its head followed at full cadence", u.name)
                if self.quorum is not None:
                    await self._ask_syncing(u, self.quorum)
                full = asyncio.create_task(self._follow_full(u), name=f"head-full:{u.name}")
                try:
                    while pool.fallbacks_serve(every) and not full.done():
                        await asyncio.wait({full}, timeout=FALLBACK_RECHECK)
                finally:
                    full.cancel()
                    await asyncio.gather(full, return_exceptions=True)
                log.info("fallback %s idle: its head checked every %gs", u.name, every)
            u.slow_lag = max(0, pool.best_latest - u.latest) if u.latest >= 0 else 0
            with contextlib.suppress(TransportError):
                await self._poll_once(u)
            if u.latest >= 0:
                u.slow_lag = max(0, pool.best_latest - u.latest)
            next_at = loop.time() + every
            for _ in range(math.ceil(every / FALLBACK_RECHECK)):
                left = next_at - loop.time()
                if left <= 0 or pool.fallbacks_serve(every):
                    break
                await asyncio.sleep(min(FALLBACK_RECHECK, left))

    async def _confirm(self, u: Upstream) -> None:
        """On a quiet chain a head stream says nothing: ask now and then, so a live
        upstream keeps the head fresh and a dead one shows."""
        period = max(self.fresh_seconds, 1.0) / 2
        while True:
            await asyncio.sleep(period)
            if self._feeder_confirms():
                continue
            if time.monotonic() - self.confirmed_at >= period:
                with contextlib.suppress(TransportError):
                    await self._poll_once(u)

    def _feeder_confirms(self) -> bool:
        """Whether the feeder worker, linked and not away, last confirmed a head no newer
        than this tracker's (give or take the block whose frame is on its way): this one's
        head is then as current as an upstream's, and needs no poll."""
        shared = self.shared
        if shared is None or (self.feeder_linked is not None and not self.feeder_linked()):
            return False
        at = shared.confirmed_for(self.view.number)
        return time.monotonic() - at < self.feeder_away_after

    def push_header(self, u: Upstream, obj: Any) -> None:
        """A header pushed to this node (a head stream's newHeads, a relay tree frame's
        block): kept by hash as pushed, and taken in as ``u``'s head in a task of its own."""
        h = Header.parse(obj)
        if h is not None:
            self.keep_pushed(h, obj)
            task = asyncio.ensure_future(self.on_header(u, h))
            task.add_done_callback(_log_failure)

    def keep_pushed(self, h: Header, obj: Any) -> None:
        """Keep ``obj`` as the header pushed for ``h`` (the last ``window`` of them): the
        block follower gives ``h``'s block this payload."""
        pushed = self.pushed
        pushed[h.hash] = obj
        if len(pushed) > self.window:
            del pushed[next(iter(pushed))]

    async def _poll(self, u: Upstream) -> None:
        """Follow an HTTP upstream: the first poll at once, then whenever its schedule
        expects the next block. Each poll also confirms the head's freshness, so no
        ``_confirm`` loop runs beside it."""
        schedule = self.schedules.get(u.name)
        if schedule is None:
            schedule = HeadPollSchedule(self.profile.block_time, self.cfg)
            self.schedules[u.name] = schedule
        loop = asyncio.get_running_loop()
        while True:
            sent = loop.time()  # the answer describes the node at the time of asking
            try:
                number = await self._poll_once(u)
            except TransportError:
                schedule.polled(sent, None)
                raise
            wake = schedule.polled(sent, number)
            await asyncio.sleep(max(0.0, wake - loop.time()))

    async def _poll_once(self, u: Upstream) -> int | None:
        """Ask ``u`` for its head and take it in; the head's number, if it answered one."""
        answer = await u.call("eth_getBlockByNumber", ["latest", False])
        h = Header.parse(answer.value)
        if h is None:
            return None
        await self.on_header(u, h)
        return h.number

    # --- the canonical chain ---------------------------------------------------------
    async def on_header(self, u: Upstream, h: Header) -> None:
        await self._take_header(u, h)
        if self.share_to is not None:
            self._share()

    def _share(self) -> None:
        """Tell the node's other workers this tracker's head (see ``chain.sharedhead``)."""
        assert self.share_to is not None
        view = self.view
        if view.known:
            self.share_to.publish(view.number, self.confirmed_at, view.finalized, view.safe)

    async def _check_syncing(self, u: Upstream) -> None:
        """Ask ``u`` eth_syncing now and every ``[head] syncing_every``: a node catching up
        is flagged "syncing" (its head not used) until it answers false."""
        quorum = self.quorum
        assert quorum is not None
        while True:
            if u.slow_lag is None:  # a fallback checked slowly is asked when it serves
                await self._ask_syncing(u, quorum)
            await asyncio.sleep(self.cfg.syncing_every)

    async def _ask_syncing(self, u: Upstream, quorum: HeadQuorum) -> None:
        with contextlib.suppress(TransportError):
            answer = await u.call("eth_syncing", [])
            if answer.error is None:
                quorum.set_syncing(u.name, answer.value not in (False, None))
                self._flag(quorum)

    def _flag(self, quorum: HeadQuorum) -> None:
        """The pool's flags, as the quorum sees the upstreams now; changes logged."""
        flags = quorum.flags()
        before = self.pool.head_flags
        if flags != before:
            for name in flags.keys() | before.keys():
                if flags.get(name) != before.get(name):
                    why = flags.get(name)
                    log.warning(
                        "upstream %s head %s", name, f"flagged: {why}" if why else "trusted again"
                    )
            self.pool.head_flags = flags

    async def _trusted(self, u: Upstream, h: Header) -> tuple[Upstream, Header] | None:
        """``u``'s report of ``h`` taken by the quorum: the head to follow and an upstream
        holding it (None: none is agreed). ``u`` ahead of the agreed head is asked for its
        block there when what it holds is not known yet (one call; none while it leads by
        one block, whose parent it named): a fork of its own is flagged at once."""
        quorum = self.quorum
        if quorum is None or u.name not in quorum.names:
            return u, h
        quorum.saw(u.name, h)
        for x in self.pool.upstreams:
            # A fallback checked slowly does not vote: its head may be an interval old.
            quorum.set_out(x.name, not x.healthy or x.slow_lag is not None)
        number = quorum.unknown_below(u.name) if u.slow_lag is None else None
        if number is not None:
            with contextlib.suppress(TransportError):
                answer = await u.call("eth_getBlockByNumber", [hex(number), False])
                block = Header.parse(answer.value)
                if block is not None and block.number == number:
                    quorum.holds(u.name, number, block.hash)
        self._flag(quorum)
        got = quorum.trusted()
        if got is None:
            return None
        top, name = got
        holder = next((x for x in self.pool.upstreams if x.name == name), u)
        assert isinstance(top, Header)
        return holder, top

    async def _take_header(self, u: Upstream, h: Header) -> None:
        if h.number >= u.latest:  # a new head, or another block at the same height
            u.latest = h.number
            u.head_hash = h.hash
        trusted = await self._trusted(u, h)
        self.metrics.upstream_lag.labels(u.name).set(max(0, self.pool.best_latest - u.latest))
        if trusted is None:
            return
        u, h = trusted
        if self.view.known and h.number >= self.view.number:
            self.confirmed_at = time.monotonic()
        view = self.view
        if view.canonical.get(h.number) == h.hash:
            return
        if view.known and h.number < view.number:
            return  # a lagging upstream; the longest chain seen is followed
        async with self._lock:
            if view.canonical.get(h.number) == h.hash or (view.known and h.number < view.number):
                return
            await self._adopt(u, h)

    async def _adopt(self, u: Upstream, h: Header) -> None:
        """Make ``h`` the head, fetching the blocks that link it to the known chain."""
        view = self.view
        first = not view.known
        chain = [h]
        low = max(0, h.number - self.window)
        # Walk back by parent hash until the chain links to a block we hold as canonical.
        while view.known:
            tip = chain[-1]
            if tip.number == 0 or tip.number - 1 < low:
                break
            parent_known = view.canonical.get(tip.number - 1)
            if parent_known == tip.parent_hash:
                break
            if parent_known is None and tip.number - 1 < min(view.canonical, default=0):
                break
            pushed = Header.parse(self.pushed.get(tip.parent_hash))
            if pushed is not None and pushed.hash == tip.parent_hash:
                chain.append(pushed)  # pushed earlier (a fork's frames): no fetch
                continue
            try:
                answer = await u.call("eth_getBlockByHash", [tip.parent_hash, False])
            except TransportError:
                return  # retried on the next head
            parent = Header.parse(answer.value)
            if parent is None:
                return
            chain.append(parent)
        chain.reverse()
        base = chain[0].number
        removed: list[Header] = []
        for n in sorted((n for n in view.canonical if n >= base), reverse=True):
            old = view.canonical[n]
            if n < len(chain) + base and chain[n - base].hash == old:
                continue
            removed.append(Header(n, old, ""))
        for old_h in removed:
            view.canonical.pop(old_h.number, None)
            view.numbers.pop(old_h.hash, None)
        added = [c for c in chain if view.canonical.get(c.number) != c.hash]
        for c in chain:
            view.canonical[c.number] = c.hash
            view.numbers[c.hash] = c.number
        view.number = h.number
        view.hash = h.hash
        view.generation += 1
        self._trim()
        self.updated_at = self.confirmed_at = time.monotonic()
        if removed:
            self.metrics.reorgs.inc()
            log.info(
                "reorg at %d: %d block(s) replaced, new head %d %s",
                removed[-1].number,
                len(removed),
                h.number,
                h.hash,
            )
        self.metrics.head.set(h.number)
        shared_finality = self._take_shared_finality()
        self._fallback_finality()
        if (
            not shared_finality
            and h.number - self._last_finality_at >= self.cfg.finality_refresh_blocks
            and (self._finality_task is None or self._finality_task.done())
        ):
            self._last_finality_at = h.number
            self._finality_task = detached(self._refresh_finality(u), name="finality")
        for listener in self.listeners:
            listener(added, removed)
        self._changed.set()
        if first and self.backfill > 0:
            self._backfill_task = detached(self._backfill_window(u), name="backfill")

    async def _backfill_window(self, u: Upstream) -> None:
        """Fetch the canonical hashes just behind the first head, walking parent hashes."""
        view = self.view
        for _ in range(self.backfill):
            low = min(view.canonical)
            if low == 0 or low <= view.number - self.window:
                return
            low_hash = view.canonical[low]
            try:
                answer = await u.call("eth_getBlockByHash", [low_hash, False])
            except TransportError:
                return
            block = Header.parse(answer.value)
            if block is None or block.hash != low_hash:
                return
            async with self._lock:
                if view.canonical.get(low) != low_hash or (low - 1) in view.canonical:
                    return  # the chain moved under us: a later head will link as usual
                view.canonical[low - 1] = block.parent_hash
                view.numbers[block.parent_hash] = low - 1
                view.generation += 1

    def _trim(self) -> None:
        view = self.view
        floor = view.number - self.window
        for n in [n for n in view.canonical if n < floor]:
            view.numbers.pop(view.canonical.pop(n), None)

    def _take_shared_finality(self) -> bool:
        """Take the feeder worker's finality, no higher than this head; False when there is
        none to take (no feeder, or it confirmed nothing lately): ask an upstream then."""
        shared = self.shared
        if shared is None:
            return False
        got = shared.finality(time.monotonic(), self.feeder_away_after)
        if got is None:
            return False
        view = self.view
        finalized = max(view.finalized, min(got.finalized, view.number))
        safe = max(view.safe, min(got.safe, view.number), finalized)
        if (finalized, safe) != (view.finalized, view.safe):
            view.finalized, view.safe = finalized, safe
            view.generation += 1
        return True

    def _fallback_finality(self) -> None:
        """Keep safe/finalized no further behind the head than the profile's depths."""
        view = self.view
        p = self.profile
        before = (view.finalized, view.safe)
        if self._has_tag["finalized"] is False:
            view.finalized = max(view.finalized, view.number - p.fallback_finality_depth)
        if self._has_tag["safe"] is False:
            view.safe = max(view.safe, view.number - p.fallback_safe_depth)
        view.safe = max(view.safe, view.finalized)
        if (view.finalized, view.safe) != before:
            view.generation += 1
        self.metrics.finalized.set(view.finalized)

    async def _refresh_finality(self, u: Upstream) -> None:
        view = self.view
        for tag in ("finalized", "safe"):
            try:
                answer = await u.call("eth_getBlockByNumber", [tag, False])
            except TransportError:
                return
            h = Header.parse(answer.value) if answer.error is None else None
            self._has_tag[tag] = h is not None
            if h is None:
                continue  # this upstream lacks the tag: the fallback depth stands
            n = min(h.number, view.number)
            view.generation += 1
            if tag == "finalized":
                view.finalized = max(view.finalized, n)
            else:
                view.safe = max(view.safe, n)
        self._fallback_finality()
        if self.share_to is not None:
            self._share()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("head update failed", exc_info=task.exception())
