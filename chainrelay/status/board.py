"""What ``/status.json`` answers: the node's state now and its last minutes, gathered from
the parts the node already has (the head tracker, the upstream pool, the parent set, the
hub, the subscription and filter services, the metrics' running totals).

A task samples the running totals once a second into a ``SampleRing`` (``status.samples``);
a listener on the hub notes each frame kept (its stream, the parent whose copy came first,
its origin-to-here time), once per frame, never per client call. The document is built
when asked for (a page polls it once a second), with lists bounded: at most
``max_children`` children are listed (a node may serve 10,000), the rest counted.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Protocol

import orjson

from chainrelay.chain.head import HeadTracker
from chainrelay.config import Config
from chainrelay.metrics import Metrics
from chainrelay.server.peer import stop_task
from chainrelay.status.samples import SampleRing, Series, Totals, ratio
from chainrelay.subscriptions.filters import FilterService
from chainrelay.tree.frame import Frame
from chainrelay.tree.hub import FeedHub
from chainrelay.tree.parents import ParentSet
from chainrelay.tree.streams import BatchStream
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.route import FALLBACK

# The document's shape; a page or a script checks it before reading on.
SCHEMA_VERSION = 1
# Seconds between samples: the page polls at the same pace.
SAMPLE_INTERVAL = 1.0
# The summary figures (hit ratio, upstream calls per call, frames per second) are over the
# last minute: long enough to hold a few dozen blocks' worth of calls, short enough to move.
SUMMARY_SECONDS = 60.0

Reply = tuple[int, bytes, bytes]


class NodeView(Protocol):
    """The parts of a node the board reads (``app.Node`` has them all)."""

    cfg: Config
    metrics: Metrics
    via: str
    chain_id: int
    pool: UpstreamPool | None
    head: HeadTracker | None
    hub: FeedHub | None
    parents: ParentSet | None
    filters: FilterService | None

    def status(self) -> dict[str, object]: ...


class _StreamNotes:
    """What the hub's listener noted of one stream: frames kept, the last one's
    origin-to-here time, and which parent's copy came first, how often and how late."""

    __slots__ = ("by_source", "frames", "fresh", "latency_ms")

    def __init__(self) -> None:
        self.frames = 0
        self.latency_ms: float | None = None
        self.fresh = False  # a frame came since the last sample
        self.by_source: dict[str, list[float]] = {}  # parent: [first copies, last ms]


class StatusBoard:
    """``start`` samples and listens; ``json``/``page`` answer the admin listener's GETs."""

    def __init__(self, node: NodeView, *, history: int, max_children: int) -> None:
        self.node = node
        self.ring = SampleRing(max(history, 2))
        self.max_children = max_children
        self.started = time.time()
        self._notes: dict[str, _StreamNotes] = {}
        self._task: asyncio.Task[None] | None = None
        self._page: bytes | None = None

    async def start(self) -> None:
        hub = self.node.hub
        if hub is not None:
            hub.listeners.append(self._on_frame)
        self.ring.add(self._totals())
        self._task = asyncio.create_task(self._sample(), name="status samples")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        hub = self.node.hub
        if hub is not None and self._on_frame in hub.listeners:
            hub.listeners.remove(self._on_frame)

    async def _sample(self) -> None:
        # A periodic sampler, not a wait on state: one sample per interval of wall time.
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            self.ring.add(self._totals())

    def _on_frame(self, frame: Frame, source: str) -> None:
        notes = self._notes.get(frame.stream)
        if notes is None:
            notes = self._notes[frame.stream] = _StreamNotes()
        ms = max(0.0, time.time() * 1000 - frame.origin_us / 1000)
        notes.frames += 1
        notes.latency_ms = ms
        notes.fresh = True
        if source:
            got = notes.by_source.get(source)
            if got is None:
                got = notes.by_source[source] = [0, 0.0]
            got[0] += 1
            got[1] = ms

    def _totals(self) -> Totals:
        m = self.node.metrics
        latency: dict[str, float | None] = {}
        for name, notes in self._notes.items():
            latency[name] = round(notes.latency_ms, 3) if notes.fresh and notes.latency_ms else None
            notes.fresh = False
        return Totals(
            t=time.time(),
            calls=m.calls_total(),
            hits=m.hits,
            misses=m.misses,
            upstream_calls=m.upstream_calls_total(),
            frames={name: n.frames for name, n in self._notes.items()},
            latency_ms=latency,
        )

    # --- answers ------------------------------------------------------------------------
    def json(self) -> Reply:
        return 200, orjson.dumps(self.document()), b"application/json"

    def page(self) -> Reply:
        if self._page is None:  # read once: a static file, no build step
            self._page = resources.files("chainrelay.status").joinpath("page.html").read_bytes()
        return 200, self._page, b"text/html; charset=utf-8"

    def document(self) -> dict[str, object]:
        """The whole ``/status.json`` (see ``tests/protocol/test_status.py`` for its schema)."""
        node = self.node
        status = node.status()
        series = self.ring.series()
        return {
            "version": SCHEMA_VERSION,
            "time": round(time.time(), 3),
            "uptimeSeconds": round(time.time() - self.started, 1),
            "node": {
                "name": node.via,
                "role": self._role(status),
                "region": node.cfg.tree.region or None,
                "ingress": status["ingress"],
                "worker": status["worker"],
                "ok": status["ok"],
            },
            "chain": self._chain(),
            "summary": self._summary(series),
            "parents": self._parents(),
            "children": self._children(),
            "streams": self._streams(series),
            "upstreams": self._upstreams(),
            "subscriptions": self._subscriptions(),
            "cache": status["cache"],
            "series": series.as_json(),
        }

    def _role(self, status: dict[str, object]) -> object:
        """Its place in the tree as the page draws it: ``origin``; ``relay`` (parents and
        child relays); ``leaf`` (parents, no child relay now); ``root`` (a tree node with no
        parents that signs nothing: an ingress, say); else the node's own word for it."""
        node, role = self.node, status["role"]
        hub = node.hub
        if role == "origin" or hub is None or not (node.cfg.tree.enabled or status["ingress"]):
            return role
        relays = any(c.relay and not c.sibling for c in hub.children)
        if node.cfg.tree.parents:
            return "relay" if relays else "leaf"
        return "root"

    def _chain(self) -> dict[str, object]:
        node, head, pool = self.node, self.node.head, self.node.pool
        number = head.view.number if head is not None and head.view.known else None
        best = max((u.latest for u in pool.upstreams), default=-1) if pool else -1
        return {
            "chainId": node.chain_id,
            "profile": head.profile.name if head is not None else None,
            "head": number,
            "finalized": head.view.finalized if head is not None and head.view.known else None,
            "fresh": bool(head and head.fresh),
            # Blocks the best upstream is ahead of this node's head (0: level with it).
            "lagBlocks": None if number is None or best < 0 else max(0, best - number),
        }

    def _summary(self, series: Series) -> dict[str, object]:
        span = self.ring.totals(SUMMARY_SECONDS)
        if span is None:
            return {"seconds": 0, "callsPerSecond": None, "hitRatio": None, "upstreamPerCall": None}
        first, last = span
        calls = last.calls - first.calls
        cacheable = (last.hits - first.hits) + (last.misses - first.misses)
        return {
            "seconds": round(last.t - first.t, 1),
            "callsPerSecond": round(calls / (last.t - first.t), 3),
            "hitRatio": ratio(last.hits - first.hits, cacheable),
            "upstreamPerCall": ratio(last.upstream_calls - first.upstream_calls, calls),
            "totals": {
                "calls": last.calls,
                "hits": last.hits,
                "misses": last.misses,
                "upstreamCalls": last.upstream_calls,
            },
        }

    def _parents(self) -> list[dict[str, object]]:
        parents = self.node.parents
        if parents is None:
            return []
        first: dict[str, int] = {}
        for notes in self._notes.values():
            for source, (count, _ms) in notes.by_source.items():
                first[source] = first.get(source, 0) + int(count)
        out: list[dict[str, object]] = []
        for name, cand in parents.candidates.items():
            link = parents.links.get(name)
            rtt = link.rtt if link is not None and link.rtt is not None else cand.rtt
            out.append(
                {
                    "name": name,
                    "region": cand.region,
                    "url": cand.url,
                    "linked": name in parents.parents,
                    "connected": bool(link and link.connected),
                    "rttMs": None if rtt is None else round(rtt * 1000, 3),
                    "up": cand.up,
                    "failures": cand.failures,
                    "frames": 0 if link is None else link.frames,
                    "firstCopies": first.get(name, 0),
                    "lastError": None if link is None else link.last_error,
                }
            )
        return out

    def _children(self) -> dict[str, object]:
        hub = self.node.hub
        if hub is None:
            return {"count": 0, "relays": 0, "listed": []}
        children = [c for c in hub.children if not c.sibling and c.cursors]
        listed = [
            {
                "name": c.node or c.ip,
                "address": c.ip,
                "relay": c.relay,
                "proven": c.proven,
                "streams": sorted(c.cursors),
                # A relay child's round trip, timed by this node's pings (hub._time_rtt);
                # anonymous subscribers are not pinged.
                "rttMs": None if c.rtt is None else round(c.rtt * 1000, 3),
            }
            for c in sorted(children, key=lambda c: (not c.relay, c.node or c.ip))[
                : self.max_children
            ]
        ]
        return {
            "count": len(children),
            "relays": sum(1 for c in children if c.relay),
            "listed": listed,
        }

    def _streams(self, series: Series) -> list[dict[str, object]]:
        hub = self.node.hub
        if hub is None:
            return []
        out: list[dict[str, object]] = []
        for name, st in hub.streams.items():
            notes = self._notes.get(name)
            rates = series.frames_per_s.get(name, [])
            recent = rates[-int(SUMMARY_SECONDS) :]
            out.append(
                {
                    "name": name,
                    "kind": "batches" if isinstance(st, BatchStream) else "blocks",
                    "newest": st.newest,
                    "children": len([c for c in st.children if not c.sibling]),
                    "frames": 0 if notes is None else notes.frames,
                    "framesPerSecond": round(sum(recent) / len(recent), 3) if recent else None,
                    "latencyMs": None
                    if notes is None or notes.latency_ms is None
                    else round(notes.latency_ms, 3),
                    "bySource": {}
                    if notes is None
                    else {
                        s: {"firstCopies": int(n), "latencyMs": round(ms, 3)}
                        for s, (n, ms) in notes.by_source.items()
                    },
                    "confirmed": st.confirmed[0]
                    if isinstance(st, BatchStream) and st.confirmed is not None
                    else None,
                }
            )
        return out

    def _upstreams(self) -> list[dict[str, object]]:
        node, pool = self.node, self.node.pool
        if pool is None:
            return []
        parent_urls = {p.rpc for p in node.cfg.tree.parents}
        now = time.perf_counter()  # the pool's clock for a 429's pause
        return [
            {
                "name": u.name,
                "url": u.url,
                # A tree parent's JSON-RPC, or a node of the chain itself.
                "role": "parent" if u.url in parent_urls else "node",
                "state": pool.state(u),
                "latest": u.latest if u.latest >= 0 else None,
                "latencyMs": round(u.latency * 1000, 3),
                "calls": u.calls,
                "errors": u.errors,
                "consecutiveErrors": u.consecutive_errors,
                # What is left of a provider's "slow down" (a 429's Retry-After).
                "slowedSeconds": round(max(0.0, u.slow_until - now), 3),
                # Its place in routing: primary or fallback, its weight and budget (0: no
                # bound), and why the head tracker does not trust its head (None: it does).
                "routing": "fallback" if u.route.tier == FALLBACK else "primary",
                "weight": u.route.weight,
                "maxRps": u.route.budget.rate,
                "maxConcurrency": u.route.budget.concurrency,
                "inFlight": u.in_flight,
                "flagged": pool.head_flags.get(u.name),
            }
            for u in pool.upstreams
        ]

    def _subscriptions(self) -> dict[str, object]:
        node = self.node
        kinds: dict[str, int] = {}
        for family in node.metrics.subscriptions.collect():
            for sample in family.samples:
                kinds[sample.labels["kind"]] = int(sample.value)
        filters = node.filters
        return {
            "byKind": kinds,
            "total": sum(kinds.values()),
            "filters": 0 if filters is None else len(filters.table),
        }
