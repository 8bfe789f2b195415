"""The node's parents in the relay tree: measured, chosen, linked, and re-chosen.

Every ``probe_interval`` the set times one HTTP ``GET /health`` to each candidate (on a
keep-alive connection, so a sample is one round trip plus the parent's answer), folds it
into the candidate's smoothed round-trip time, and runs ``tree.choice.choose``. A
change starts the new parents' ``FeedLink``s first and waits (up to ``connect_timeout``)
for their welcome before it stops the links it drops: the node never has fewer parents
than it had because of a change.

A candidate is down when its probes fail ``probe_failures_down`` times in a row (unless
its link is connected: then the feed itself proves it reachable and the link's ping times
stand in for the probe), or when its link failed ``link_failures_down`` connects in a row
(a parent that answers ``/health`` but whose feed is broken); that second kind holds for
``down_hold`` seconds, so such a parent is not re-linked every round. A link that reaches
that count brings the next round forward: a dead parent is replaced about a second after
it died (its link's back-off), not up to a probe interval later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from chainrelay.config import TreeConfig
from chainrelay.server.peer import stop_task
from chainrelay.tree.auth import Credentials
from chainrelay.tree.choice import Candidate, RttEstimate, choose, health_url
from chainrelay.tree.link import FeedLink
from chainrelay.tree.session import Gap, Want

log = logging.getLogger(__name__)


def _nothing(*_args: object) -> None:
    return None


class _State:
    """What the set knows of one candidate beyond what ``choose`` reads."""

    __slots__ = ("down_until", "estimate", "frames", "probe_failures", "probe_url", "quiet")

    def __init__(self, probe_url: str) -> None:
        self.probe_url = probe_url
        self.estimate = RttEstimate()
        self.probe_failures = 0
        self.down_until = 0.0
        self.frames = 0  # its link's frame count at the last round
        self.quiet = 0  # rounds in a row its link sent nothing while another link did


class ParentSet:
    """Keeps ``parents_k`` parents linked, chosen among ``candidates`` by round-trip time."""

    def __init__(
        self,
        candidates: Sequence[Candidate],
        tree: TreeConfig,
        *,
        wants: Callable[[], list[Want]],
        on_frame: Callable[[FeedLink, bytes], object],
        on_gap: Callable[[FeedLink, str, Gap], None] = _nothing,
        on_confirmed: Callable[[FeedLink, str, int, bytes], object] = _nothing,
        node: str | None = None,
        credentials: Credentials | None = None,
        probe_urls: Mapping[str, str] | None = None,
        # Hooks (metrics, logs, tests): called synchronously, must not block
        on_change: Callable[[list[str]], None] = _nothing,
        on_probe: Callable[[str, float | None], None] = _nothing,
        on_link: Callable[[str, bool], None] = _nothing,
    ) -> None:
        """``tree``: the checked ``[tree]`` section; its ``parents_k``, probe, failure and
        hold settings drive the choice, and its frame, connect, retry and ping settings go
        to every link (``node``: this node's name in their hello; ``credentials``: what
        answers their challenge, ``tree.auth``).
        ``probe_urls`` maps a candidate's name to any URL of its HTTP endpoint (its
        JSON-RPC URL will do); without one, the candidate's own URL is probed.
        ``on_change(names)`` follows every change of parents, ``on_probe(name, seconds or
        None)`` every probe, ``on_link(name, started)`` every link started or stopped.
        What ``on_frame`` and ``on_confirmed`` return is ignored."""
        names = [c.name for c in candidates]
        if len(set(names)) != len(names):
            raise ValueError("candidate names must be unique")
        urls = probe_urls or {}
        self.candidates: dict[str, Candidate] = {c.name: c for c in candidates}
        self._state = {c.name: _State(health_url(urls.get(c.name, c.url))) for c in candidates}
        self.cfg = tree
        self.node = node
        self.credentials = credentials
        self.wants = wants
        self.on_frame = on_frame
        self.on_gap = on_gap
        self.on_confirmed = on_confirmed
        self.on_change = on_change
        self.on_probe = on_probe
        self.on_link = on_link
        self.parents: list[str] = []  # names linked to, fastest first
        self.links: dict[str, FeedLink] = {}
        self.rounds = 0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._round_lock = asyncio.Lock()

    async def start(self) -> None:
        """Spawn the probe-and-choose loop (its first round runs at once); returns at once."""
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, use_dns_cache=True),
            timeout=aiohttp.ClientTimeout(total=self.cfg.probe_timeout),
        )
        self._task = asyncio.create_task(self._run(), name="parents")

    async def stop(self) -> None:
        """Stop probing, then every link."""
        task, self._task = self._task, None
        await stop_task(task)
        links, self.links = self.links, {}
        self.parents = []
        for name, link in links.items():
            await link.stop()
            self.on_link(name, False)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # --- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in one round must not leave the node without parents for good.
                log.exception("choosing parents failed; trying again next round")
            await self._until_next_round()

    async def _until_next_round(self) -> None:
        """Wait out ``probe_interval``, or less when a link has failed enough to be dropped:
        FeedLink reports failures by its counter only, so it is looked at every
        ``link_check_interval``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.probe_interval
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(left, self.cfg.link_check_interval))
            if any(link.failures >= self.cfg.link_failures_down for link in self.links.values()):
                return

    async def round(self) -> None:
        """Probe every candidate, then re-choose and re-link. The loop calls it every
        ``probe_interval``; a caller that knows a parent just failed may call it sooner."""
        async with self._round_lock:  # one change of links at a time
            await asyncio.gather(*(self._probe(name) for name in self.candidates))
            self._mark_failed_links()
            self._mark_stalled_links()
            chosen = self._choose()
            if not chosen and self._lift_holds():
                chosen = self._choose()
            await self._relink(chosen)
            self.rounds += 1

    def _choose(self) -> list[str]:
        return choose(
            list(self.candidates.values()),
            self.cfg.parents_k,
            self.parents,
            degrade_factor=self.cfg.degrade_factor,
            min_gain=self.cfg.min_gain,
        )

    def _lift_holds(self) -> bool:
        """With no parent at all, a candidate held down for a broken feed whose /health
        answers gets another chance now: most often it was restarting (a node whose only
        parent restarted would otherwise wait out the hold with no feed). True if any."""
        lifted = False
        for name, cand in self.candidates.items():
            st = self._state[name]
            if not cand.up and st.down_until > 0 and cand.rtt is not None:
                st.down_until = 0.0
                cand.up = True
                lifted = True
                link = self.links.get(name)
                if link is not None:
                    link.failures = 0  # counted afresh, or the link check re-runs at once
        return lifted

    async def _probe(self, name: str) -> None:
        cand, st = self.candidates[name], self._state[name]
        sample = await self._time_health(st.probe_url)
        self.on_probe(name, sample)
        link = self.links.get(name)
        if sample is None and link is not None and link.connected and link.rtt is not None:
            sample = link.rtt  # the feed is up: its pings are the measurement
        now = time.monotonic()
        if sample is None:
            st.probe_failures += 1
            cand.failures = st.probe_failures
            if st.probe_failures >= self.cfg.probe_failures_down:
                # Lost: its return is measured afresh, not from a time that no longer holds.
                st.estimate.reset()
                cand.rtt = None
                cand.up = False
            return
        st.probe_failures = 0
        cand.failures = 0
        cand.rtt = st.estimate.update(sample)
        cand.up = now >= st.down_until

    async def _time_health(self, url: str) -> float | None:
        """Seconds one ``GET /health`` took, or None when no answer came in time.

        Any answer counts, a 503 too: it measures the distance as well, and a node whose
        own JSON-RPC upstreams are degraded may still forward its parents' frames. Whether
        a parent's feed works is its link's to find out."""
        session = self._session
        assert session is not None
        t0 = time.perf_counter()
        try:
            async with session.get(url, allow_redirects=False) as r:
                await r.read()  # drained, so the connection is reused by the next probe
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        return time.perf_counter() - t0

    def _mark_failed_links(self) -> None:
        now = time.monotonic()
        for name, link in self.links.items():
            if link.failures >= self.cfg.link_failures_down:
                cand = self.candidates[name]
                log.warning(
                    "parent %s down: %d connects failed (%s)",
                    name,
                    link.failures,
                    link.last_error,
                )
                self._state[name].down_until = now + self.cfg.down_hold
                cand.failures = max(cand.failures, link.failures)
                cand.up = False

    def _mark_stalled_links(self) -> None:
        """A parent whose link stays connected but sends nothing while another parent's
        link sends frames (its own parents gone, a stuck process) is down like one whose
        connects fail: after ``stall_rounds`` such rounds in a row."""
        moved: dict[str, int] = {}
        for name, link in self.links.items():
            st = self._state[name]
            # A new link counts from zero again.
            moved[name] = link.frames - st.frames if link.frames >= st.frames else link.frames
            st.frames = link.frames
        if not any(moved.values()):
            return  # a quiet chain, or every parent stuck alike: nothing to tell apart
        now = time.monotonic()
        for name, n in moved.items():
            st = self._state[name]
            st.quiet = st.quiet + 1 if n == 0 else 0
            if st.quiet >= self.cfg.stall_rounds:
                log.warning(
                    "parent %s down: no frame in %d rounds while another parent sent some",
                    name,
                    st.quiet,
                )
                st.quiet = 0
                st.down_until = now + self.cfg.down_hold
                self.candidates[name].up = False

    async def _relink(self, chosen: list[str]) -> None:
        """Link ``chosen``: the new links first, connected (or timed out), then drop the rest."""
        added = [n for n in chosen if n not in self.links]
        dropped = [n for n in self.links if n not in chosen]
        for name in added:
            link = FeedLink(
                self.candidates[name].url,
                name=name,
                wants=self.wants,
                on_frame=self.on_frame,
                on_gap=self.on_gap,
                on_confirmed=self.on_confirmed,
                max_frame_bytes=self.cfg.max_frame_bytes,
                connect_timeout=self.cfg.connect_timeout,
                retry_delay=self.cfg.retry_delay,
                retry_max=self.cfg.retry_max,
                ping_interval=self.cfg.ping_interval,
                node=self.node,
                credentials=self.credentials,
            )
            self.links[name] = link
            await link.start()
            self.on_link(name, True)
        if added and dropped:
            # A dropped parent may still be serving; keep it until its successor is in.
            await asyncio.gather(
                *(self.links[n].wait_connected(self.cfg.connect_timeout) for n in added)
            )
        for name in dropped:
            link = self.links.pop(name)
            await link.stop()
            self.on_link(name, False)
        changed = set(chosen) != set(self.parents)
        self.parents = chosen
        if changed:
            log.info("parents: %s", ", ".join(chosen) or "none")
            self.on_change(list(chosen))
