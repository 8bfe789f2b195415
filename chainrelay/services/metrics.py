"""Prometheus metrics of one node, in a registry of its own (several nodes per process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from chainrelay.protocol.policy import RULES

# Method names come from clients: any name outside the policy table is counted as "other"
# so a client cannot grow the metric set without bound.
KNOWN_METHODS = frozenset(RULES) | frozenset(
    {"eth_subscribe", "eth_unsubscribe", "eth_newFilter", "eth_getFilterChanges"}
)

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
        self.requests = Counter(
            "chainrelay_requests",
            "JSON-RPC calls by method and outcome",
            ["method", "outcome"],
            registry=r,
        )
        self.request_latency = Histogram(
            "chainrelay_request_latency_seconds",
            "Time to answer a JSON-RPC call",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter("chainrelay_cache_hits", "Answers served from cache", registry=r)
        self.cache_misses = Counter(
            "chainrelay_cache_misses", "Cacheable calls not in cache", registry=r
        )
        self.cache_bytes = Gauge(
            "chainrelay_cache_bytes", "Bytes held by the memory cache", registry=r
        )
        self.coalesced = Counter(
            "chainrelay_coalesced", "Calls answered by another caller's upstream call", registry=r
        )
        self.upstream_calls = Counter(
            "chainrelay_upstream_calls",
            "Calls sent to upstreams by upstream and outcome",
            ["upstream", "outcome"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "chainrelay_upstream_latency_seconds",
            "Upstream call latency",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
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
        self.connections = Gauge(
            "chainrelay_connections", "Open client connections", ["transport"], registry=r
        )
        self.rejected = Counter(
            "chainrelay_rejected",
            "Requests refused before JSON-RPC (HTTP status)",
            ["reason"],
            registry=r,
        )
        self._req_children: dict[tuple[str, str], Counter] = {}
        self._lat_children: dict[str, Histogram] = {}

    def count(self, method: str, outcome: str, seconds: float) -> None:
        """Count one answered call; children are cached so the hot path does no label lookup."""
        key = (method, outcome)
        child = self._req_children.get(key)
        if child is None:
            label = method if method in KNOWN_METHODS else "other"
            child = self._req_children[key] = self.requests.labels(label, outcome)
        child.inc()
        lat = self._lat_children.get(outcome)
        if lat is None:
            lat = self._lat_children[outcome] = self.request_latency.labels(outcome)
        lat.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
