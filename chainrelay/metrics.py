"""Prometheus metrics of one node, in a registry of its own (several nodes per process in tests)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Collection, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from chainrelay.rpc.policy import RULES

# Method names come from clients: any name outside the policy table is counted as "other"
# so a client cannot grow the metric set without bound.
KNOWN_METHODS = frozenset(RULES) | frozenset(
    {"eth_subscribe", "eth_unsubscribe", "eth_newFilter", "eth_getFilterChanges"}
)

# One cache hit recognised by its bytes, id aside (``RpcService.replay``) in this many
# takes the full hit path instead, which times it: such hits are all counted and their
# latency is sampled. The full path costs about five replays, so one in 64 would cost 7%
# of a replay's CPU; one in 1024 costs 0.5% and still times dozens of hits a second under
# load (a power of two: a mask test).
REPLAY_TIMED_EVERY = 1024

# What an upstream call ends in: an answer, a JSON-RPC error answer, or no usable answer.
UPSTREAM_OUTCOMES = ("ok", "error", "transport_error")

# How long the node's loop was held (its lag, a GC pause): fine around the 2 ms that a burst
# of clients should never wait for, coarse up to the second a full collection can take.
STALL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # Hot-path counters are plain ints, turned into metrics only when scraped.
        self.hits = 0
        self.misses = 0
        # (method, outcome) -> a one-item list: a slot a hot path can hold and bump itself.
        self._requests: dict[tuple[str, str], list[int]] = {}
        self._latency: dict[str, list[float]] = {}  # per outcome: bucket counts..., sum
        # Upstream calls, per upstream: outcome counts (UPSTREAM_OUTCOMES order), then
        # latency bucket counts and sum; exported as chainrelay_upstream_calls_total and
        # chainrelay_upstream_latency_seconds.
        self._upstream: dict[str, list[float]] = {}
        r.register(_HotCollector(self))
        self.cache_bytes = Gauge(
            "chainrelay_cache_bytes", "Bytes held by the memory cache", registry=r
        )
        self.coalesced = Counter(
            "chainrelay_coalesced", "Calls answered by another caller's upstream call", registry=r
        )
        self.upstream_healthy = Gauge(
            "chainrelay_upstream_healthy",
            "1 while the upstream is in rotation",
            ["upstream"],
            registry=r,
        )
        self.upstream_lag = Gauge(
            "chainrelay_upstream_lag_blocks",
            "Blocks behind the best upstream",
            ["upstream"],
            registry=r,
        )
        self.hedged = Counter(
            "chainrelay_hedged", "Reads hedged onto a second upstream", registry=r
        )
        self.head = Gauge("chainrelay_head_block", "The node's head block number", registry=r)
        self.finalized = Gauge(
            "chainrelay_finalized_block", "The node's finalized block number", registry=r
        )
        self.reorgs = Counter("chainrelay_reorgs", "Reorgs seen by the head tracker", registry=r)
        self.access_log_dropped = Counter(
            "chainrelay_access_log_dropped",
            "Access log lines dropped: the disk was slower than the node and the buffer"
            " (server.access_log_max_buffer_bytes) full, or a write failed",
            registry=r,
        )
        self.worker_scrape_failures = Counter(
            "chainrelay_worker_scrape_failures",
            "Under serve --workers: other workers' metrics left out of an admin scrape"
            " (no answer within server.admin_scrape_timeout)",
            registry=r,
        )
        self.connections = Gauge(
            "chainrelay_connections", "Open client connections", ["transport"], registry=r
        )
        self.rejected = Counter(
            "chainrelay_rejected",
            "Requests refused before JSON-RPC (HTTP status)",
            ["reason"],
            registry=r,
        )

        self.subscriptions = Gauge(
            "chainrelay_subscriptions",
            "Active eth_subscribe subscriptions by kind",
            ["kind"],
            registry=r,
        )
        self.notifications = Counter(
            "chainrelay_subscription_notifications",
            "eth_subscription notifications sent, by subscription kind",
            ["kind"],
            registry=r,
        )
        self.slow_subscribers = Counter(
            "chainrelay_slow_subscriber_disconnects",
            "WebSocket subscribers closed (1013) for reading too slowly",
            registry=r,
        )
        self.feed_problems = Counter(
            "chainrelay_block_feed_problems",
            "Block feed troubles it got past: receipts_fallback (eth_getLogs for a block),"
            " warm_failed, block_given_up, gap (blocks past the reorg window never"
            " delivered), pending_stream (the pending-transaction stream broke)",
            ["problem"],
            registry=r,
        )
        self.local_logs = Counter(
            "chainrelay_local_logs",
            "eth_getLogs misses answered from the block logs the node holds: local (no"
            " upstream call), split (held blocks, and eth_getLogs upstream for the"
            " sub-ranges around them)",
            ["answer"],
            registry=r,
        )
        self.log_store_bytes = Gauge(
            "chainrelay_log_store_bytes", "Bytes of block logs held for eth_getLogs", registry=r
        )
        self.log_store_blocks = Gauge(
            "chainrelay_log_store_blocks", "Blocks whose logs are held for eth_getLogs", registry=r
        )
        self.held_overflows = Counter(
            "chainrelay_held_notification_overflows",
            "WebSocket connections closed (1008) for holding too many notifications of"
            " subscriptions whose eth_subscribe answer was not yet sent",
            registry=r,
        )
        self.feed_frames = Counter(
            "chainrelay_feed_frames",
            "Feed frames by outcome: accepted (first copy, verified), duplicate (a copy"
            " already accepted), published (by this origin), or dropped for a reason"
            " (truncated, version, kind, flags, too_large, stream, signature, untrusted,"
            " unknown_stream, stale, payload)",
            ["stream", "outcome"],
            registry=r,
        )
        self.feed_children = Gauge(
            "chainrelay_feed_children",
            "Feed sessions of children (relays, leaves, subscribers) served, by stream",
            ["stream"],
            registry=r,
        )
        self.feed_child_closes = Counter(
            "chainrelay_feed_child_closes",
            "Feed sessions this node ended, by reason (lagging, bad_hello, unknown_stream)",
            ["reason"],
            registry=r,
        )
        self.feed_parents = Gauge(
            "chainrelay_feed_parents",
            "Parents this node takes the feed from (linked now)",
            registry=r,
        )
        self.feed_latency = Gauge(
            "chainrelay_feed_last_latency_seconds",
            "Origin-to-here time of the last frame accepted, by stream (clocks assumed in sync)",
            ["stream"],
            registry=r,
        )
        self.batch_pushes = Counter(
            "chainrelay_batch_pushes",
            "Batch pushes taken by this ingress node, by stream and outcome: accepted,"
            " duplicate (acknowledged again), or refused for a reason (gap, conflict,"
            " signer, signature, too_large, unknown_stream, malformed, not_durable,"
            " not_held, unauthorized)",
            ["stream", "outcome"],
            registry=r,
        )
        self.nitro_messages = Counter(
            "chainrelay_nitro_messages",
            "Nitro feed messages and broadcasts, by where and outcome: in (accepted,"
            " duplicate, backwards, malformed, signature, signer, too_large, held_full,"
            " refused) and out (sent, too_slow, refused_limit, bad_request)",
            ["where", "outcome"],
            registry=r,
        )
        self.nitro_clients = Gauge(
            "chainrelay_nitro_clients",
            "Clients connected to this node's Nitro feed endpoint",
            registry=r,
        )
        self.batch_ack_seconds = Histogram(
            "chainrelay_batch_ack_seconds",
            "Seconds from a batch push read to its acknowledgement (durable, fsynced)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=r,
        )
        self.batch_gaps = Counter(
            "chainrelay_batch_order_gaps",
            "Missing batches a relay waited for, by stream and how they were filled:"
            " arrived (from another parent), fetched (from a parent's range endpoint),"
            " skipped (no parent could give them; children fetch them themselves)",
            ["stream", "outcome"],
            registry=r,
        )
        self.block_fills = Counter(
            "chainrelay_block_fills",
            "Blocks brought in after a client's miss on one of their receipts or"
            " transactions, by kind (receipts, transactions) and outcome: filled, failed,"
            " busy (too many fills under way: not filled); window_filled, window_failed:"
            " receipts of the recent window behind the block follower's first block,"
            " filled ahead of clients' reads (chain/windowfill.py)",
            ["kind", "outcome"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "chainrelay_event_loop_lag_seconds",
            "How late a timer due on the event loop fired (chainrelay/looplag.py): the wait a"
            " request arriving then saw before the loop turned to it",
            buckets=STALL_BUCKETS,
            registry=r,
        )
        self.gc_pause = Histogram(
            "chainrelay_gc_pause_seconds",
            "Pauses of Python's garbage collector, by generation (2: every object the node"
            " holds is walked)",
            ["generation"],
            buckets=STALL_BUCKETS,
            registry=r,
        )
        self.pending_tx_skipped = Counter(
            "chainrelay_pending_tx_skipped",
            "Pending transactions not sent to fullTx subscribers: too many fetches under"
            " way, or gone (mined, dropped) or unreadable when fetched",
            registry=r,
        )

    def upstream_observer(self, name: str) -> Callable[[str, float], None]:
        """The function that counts each call made to upstream ``name``, with its latency:
        plain list updates (no labels, no locks), one per upstream call."""
        slots = self._upstream.setdefault(
            name, [0.0] * (len(UPSTREAM_OUTCOMES) + len(LATENCY_BUCKETS) + 2)
        )
        index = {o: i for i, o in enumerate(UPSTREAM_OUTCOMES)}
        first_bucket = len(UPSTREAM_OUTCOMES)
        buckets = LATENCY_BUCKETS
        bisect_left = bisect.bisect_left

        def observe(outcome: str, seconds: float) -> None:
            slots[index[outcome]] += 1
            slots[first_bucket + bisect_left(buckets, seconds)] += 1
            slots[-1] += seconds

        return observe

    def count(self, method: str, outcome: str, seconds: float) -> None:
        """Count one answered call. On the hot path: two dict updates, no locks, no labels."""
        if method not in KNOWN_METHODS:
            method = "other"
        key = (method, outcome)
        got = self._requests.get(key)
        if got is None:
            got = self._requests[key] = [0]
        got[0] += 1
        lat = self._latency.get(outcome)
        if lat is None:
            lat = self._latency[outcome] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        lat[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        lat[-1] += seconds

    def tap(self, on_count: Callable[[str, str], None], on_coalesced: Callable[[], None]) -> None:
        """Tell ``on_count`` of every call counted (method, outcome) and ``on_coalesced`` of
        every call that joined another's, besides counting them (the access log). Installed
        on this instance only when asked for: a node without it pays nothing for it on its
        hot path, not even a test of whether it is there. Replays (``slot``) bypass it."""
        count = self.count
        coalesced = self.coalesced.inc

        def counted(method: str, outcome: str, seconds: float) -> None:
            count(method, outcome, seconds)
            on_count(method, outcome)

        def joined(amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
            coalesced(amount, exemplar)
            on_coalesced()

        self.count = counted  # type: ignore[method-assign]
        self.coalesced.inc = joined  # type: ignore[method-assign]

    def slot(self, method: str, outcome: str) -> list[int]:
        """The counter of one (method, outcome), for a path that counts a call with
        ``slot[0] += 1`` and no call of its own (it then adds no latency)."""
        if method not in KNOWN_METHODS:
            method = "other"
        key = (method, outcome)
        got = self._requests.get(key)
        if got is None:
            got = self._requests[key] = [0]
        return got

    def answered(self, methods: Collection[str]) -> int:
        """Calls of ``methods`` answered so far, whatever their outcome (a few dozen dict
        items walked: for a look once a block, not per call)."""
        return sum(n[0] for (method, _), n in list(self._requests.items()) if method in methods)

    def calls_total(self) -> int:
        """Client calls answered so far, any method and outcome (for a look once a second,
        not per call)."""
        return sum(n[0] for n in list(self._requests.values()))

    def upstream_calls_total(self) -> int:
        """Calls sent to every upstream so far, any outcome."""
        n = len(UPSTREAM_OUTCOMES)
        return int(sum(sum(slots[:n]) for slots in list(self._upstream.values())))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _HotCollector(Collector):
    """Exports the hot-path counters of ``Metrics`` in Prometheus form at scrape time."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        req = CounterMetricFamily(
            "chainrelay_requests",
            "JSON-RPC calls by method and outcome",
            labels=["method", "outcome"],
        )
        for (method, outcome), count in list(m._requests.items()):
            req.add_metric([method, outcome], count[0])
        yield req
        hits = CounterMetricFamily("chainrelay_cache_hits", "Answers served from cache")
        hits.add_metric([], m.hits)
        yield hits
        misses = CounterMetricFamily("chainrelay_cache_misses", "Cacheable calls not in cache")
        misses.add_metric([], m.misses)
        yield misses
        hist = HistogramMetricFamily(
            "chainrelay_request_latency_seconds",
            "Time to answer a JSON-RPC call (cache hits recognised by their bytes, id "
            f"aside: one in {REPLAY_TIMED_EVERY} timed)",
            labels=["outcome"],
        )
        for outcome, lat in list(m._latency.items()):
            hist.add_metric([outcome], _buckets(lat[:-1]), lat[-1])
        yield hist
        calls = CounterMetricFamily(
            "chainrelay_upstream_calls",
            "Calls sent to upstreams by upstream and outcome",
            labels=["upstream", "outcome"],
        )
        up_latency = HistogramMetricFamily(
            "chainrelay_upstream_latency_seconds", "Upstream call latency", labels=["upstream"]
        )
        n = len(UPSTREAM_OUTCOMES)
        for name, slots in list(m._upstream.items()):
            for i, outcome in enumerate(UPSTREAM_OUTCOMES):
                calls.add_metric([name, outcome], slots[i])
            up_latency.add_metric([name], _buckets(slots[n:-1]), slots[-1])
        yield calls
        yield up_latency


def _buckets(counts: list[float]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from per-bucket counts (the last one is +Inf)."""
    cumulative = 0.0
    out = []
    for le, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
        cumulative += n
        out.append(("+Inf" if le == float("inf") else repr(le), cumulative))
    return out
