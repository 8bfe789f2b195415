"""Configuration: TOML files, loaded in a fixed order.

read → expand ``${ENV}`` in string values → strict decode (an unknown key is an error naming
its full path) → defaults (from ``defaults.py``) → validate.
``chainrelay validate FILE`` runs exactly this.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chainrelay import defaults as d
from chainrelay.chain.profiles import PROFILES
from chainrelay.errors import ConfigError
from chainrelay.rpc import shared_cache as sc

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class ServerConfig:
    listen: str = d.LISTEN
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    workers: int = 1


@dataclass
class LimitsConfig:
    max_body_bytes: int = d.MAX_BODY_BYTES
    max_batch_len: int = d.MAX_BATCH_LEN
    max_header_bytes: int = d.MAX_HEADER_BYTES
    max_pending_per_connection: int = d.MAX_PENDING_PER_CONNECTION
    max_pending_replies: int = d.MAX_PENDING_REPLIES
    max_connections_per_ip: int = d.MAX_CONNECTIONS_PER_IP
    keepalive_timeout: float = d.KEEPALIVE_TIMEOUT
    max_ws_message_bytes: int = d.MAX_WS_MESSAGE_BYTES
    max_ws_send_buffer: int = d.MAX_WS_SEND_BUFFER
    ws_close_timeout: float = d.WS_CLOSE_TIMEOUT
    max_relay_hops: int = d.MAX_RELAY_HOPS
    max_hit_table_bytes: int = d.MAX_HIT_TABLE_BYTES
    max_hit_table_entries: int = d.MAX_HIT_TABLE_ENTRIES
    memo_max_params_bytes: int = d.MEMO_MAX_PARAMS_BYTES


# "memory": this process only. "tiered": the memory LRU in front of a shared Redis.
# "redis": Redis, with only a minimal memory tier (see shared_cache.REDIS_MODE_MEMORY_BYTES).
CACHE_BACKENDS = ("memory", "redis", "tiered")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# When the block follower follows blocks (see chainrelay.chain.follower).
FOLLOW_MODES = ("auto", "always", "never")


@dataclass
class CacheConfig:
    backend: str = "memory"
    memory_bytes: int = d.CACHE_MEMORY_BYTES
    max_entry_bytes: int = d.CACHE_MAX_ENTRY_BYTES
    # The Redis tier ("redis" and "tiered" backends); defaults and reasons in shared_cache.py.
    redis_url: str = sc.REDIS_URL
    redis_key_prefix: str = sc.REDIS_KEY_PREFIX
    redis_max_entry_bytes: int = sc.REDIS_MAX_ENTRY_BYTES
    redis_ttl_finalized: float = sc.REDIS_TTL_FINALIZED  # 0: no TTL (maxmemory + LRU only)
    redis_ttl_unfinalized: float = sc.REDIS_TTL_UNFINALIZED
    redis_lock_ttl: float = sc.REDIS_LOCK_TTL
    redis_timeout: float = sc.REDIS_TIMEOUT
    redis_connect_timeout: float = sc.REDIS_CONNECT_TIMEOUT
    redis_retry_interval: float = sc.REDIS_RETRY_INTERVAL
    redis_max_connections: int = sc.REDIS_MAX_CONNECTIONS


@dataclass
class ChainConfig:
    # A profile from chainrelay.chain.profiles ("bsc", "arbitrum", "devnet"); empty: by id.
    profile: str = ""
    # Expected chain id; upstreams on another chain are refused. 0: read from upstreams.
    chain_id: int = 0


@dataclass
class UpstreamConfig:
    url: str = ""
    name: str = ""


@dataclass
class PoolConfig:
    timeout: float = d.UPSTREAM_TIMEOUT
    max_attempts: int = d.UPSTREAM_MAX_ATTEMPTS
    hedge: bool = True
    hedge_quantile: float = d.HEDGE_QUANTILE
    hedge_min_delay: float = d.HEDGE_MIN_DELAY
    max_lag_blocks: int = d.MAX_LAG_BLOCKS
    max_consecutive_errors: int = d.MAX_CONSECUTIVE_ERRORS
    probe_interval: float = d.PROBE_INTERVAL
    connections: int = d.UPSTREAM_CONNECTIONS
    ws_ping_interval: float = d.WS_PING_INTERVAL
    ws_max_message_bytes: int = d.WS_MAX_MESSAGE_BYTES


@dataclass
class HeadConfig:
    reorg_window: int = d.REORG_WINDOW
    backfill_blocks: int = d.BACKFILL_BLOCKS
    finality_refresh_blocks: int = d.FINALITY_REFRESH_BLOCKS
    fresh_blocks: float = d.HEAD_FRESH_BLOCKS
    poll_lead: float = d.HEAD_POLL_LEAD
    poll_near: float = d.HEAD_POLL_NEAR
    interval_alpha: float = d.HEAD_INTERVAL_ALPHA
    interval_min_factor: float = d.HEAD_INTERVAL_MIN_FACTOR
    interval_max_factor: float = d.HEAD_INTERVAL_MAX_FACTOR
    poll_backoff: float = d.HEAD_POLL_BACKOFF
    poll_min_interval: float = d.HEAD_POLL_MIN_INTERVAL
    poll_max_interval: float = d.HEAD_POLL_MAX_INTERVAL
    poll_probe_every: int = d.HEAD_POLL_PROBE_EVERY


@dataclass
class FiltersConfig:
    idle_timeout: float = d.FILTER_IDLE_TIMEOUT
    max_filters: int = d.MAX_FILTERS
    max_changes: int = d.MAX_FILTER_CHANGES
    max_per_ip: int = d.MAX_FILTERS_PER_IP
    max_addresses: int = d.MAX_FILTER_ADDRESSES
    max_topics_per_position: int = d.MAX_TOPICS_PER_POSITION


@dataclass
class SubscriptionsConfig:
    max_per_connection: int = d.MAX_SUBSCRIPTIONS_PER_CONNECTION
    max_per_ip: int = d.MAX_SUBSCRIPTIONS_PER_IP
    max_total: int = d.MAX_SUBSCRIPTIONS_TOTAL
    max_log_filters: int = d.MAX_LOG_FILTERS
    max_log_filters_per_ip: int = d.MAX_LOG_FILTERS_PER_IP
    max_held_notifications: int = d.MAX_HELD_NOTIFICATIONS
    max_held_bytes: int = d.MAX_HELD_BYTES
    pending_tx_fetches: int = d.PENDING_TX_FETCHES
    slow_close_grace: float = d.SLOW_CLOSE_GRACE
    follow_blocks_always: bool = d.FOLLOW_BLOCKS_ALWAYS
    follow_blocks: str = d.FOLLOW_BLOCKS
    follow_recent_blocks: int = d.FOLLOW_RECENT_BLOCKS
    feed_fetch_retry_delay: float = d.FEED_FETCH_RETRY_DELAY
    feed_fetch_attempts: int = d.FEED_FETCH_ATTEMPTS
    feed_block_passes: int = d.FEED_BLOCK_PASSES
    feed_receipts_retry_blocks: int = d.FEED_RECEIPTS_RETRY_BLOCKS
    pending_max_message: int = d.PENDING_MAX_MESSAGE


@dataclass
class TreeParentConfig:
    url: str = ""  # the parent's feed: ws://HOST:PORT/feed
    rpc: str = ""  # its JSON-RPC endpoint; empty: the same host and port over http
    region: str = ""
    name: str = ""


@dataclass
class TreeConfig:
    """The relay tree (see services/feedhub.py). A node with ``key`` is an origin of its
    chain's block stream; a node with ``parents`` takes frames from them (and, without
    ``[[upstreams]]``, their JSON-RPC endpoints are its upstreams)."""

    region: str = ""
    key: str = ""  # the origin's secp256k1 key, hex (better: "${ENV_VAR}")
    key_file: str = ""  # or an eth-account keystore JSON (or a file holding the hex key)
    key_password: str = ""  # the keystore's password (better: "${ENV_VAR}")
    trust: list[str] = field(default_factory=list)  # origin addresses whose frames count
    streams: list[str] = field(default_factory=list)  # empty: "<profile>/blocks"
    parents: list[TreeParentConfig] = field(default_factory=list)
    parents_k: int = d.TREE_PARENTS
    resume_last: int = d.TREE_RESUME_LAST
    backlog_frames: int = d.TREE_BACKLOG_FRAMES
    backlog_bytes: int = d.TREE_BACKLOG_BYTES
    child_queue_frames: int = d.TREE_CHILD_QUEUE_FRAMES
    child_queue_bytes: int = d.TREE_CHILD_QUEUE_BYTES
    child_buffer_bytes: int = d.TREE_CHILD_BUFFER_BYTES
    dedup_entries: int = d.TREE_DEDUP_ENTRIES
    max_frame_bytes: int = d.TREE_MAX_FRAME_BYTES
    max_payload_bytes: int = d.TREE_MAX_PAYLOAD_BYTES
    max_children: int = d.TREE_MAX_CHILDREN
    stale_positions: int = d.TREE_STALE_POSITIONS
    probe_interval: float = d.TREE_PROBE_INTERVAL
    degrade_factor: float = d.TREE_DEGRADE_FACTOR
    min_gain: float = d.TREE_MIN_GAIN
    connect_timeout: float = d.TREE_CONNECT_TIMEOUT
    retry_delay: float = d.TREE_RETRY_DELAY
    retry_max: float = d.TREE_RETRY_MAX
    ping_interval: float = d.TREE_PING_INTERVAL
    probe_timeout: float = d.TREE_PROBE_TIMEOUT
    probe_failures_down: int = d.TREE_PROBE_FAILURES_DOWN
    link_failures_down: int = d.TREE_LINK_FAILURES_DOWN
    down_hold: float = d.TREE_DOWN_HOLD
    link_check_interval: float = d.TREE_LINK_CHECK_INTERVAL
    hello_timeout: float = d.TREE_HELLO_TIMEOUT
    stall_rounds: int = d.TREE_STALL_ROUNDS
    offered_max_bytes: int = d.OFFERED_MAX_BYTES

    @property
    def enabled(self) -> bool:
        return bool(self.key or self.key_file or self.parents)


@dataclass
class BatchStreamConfig:
    """One sequencer's batch stream: who may sign it, for which chain, from which number."""

    name: str = ""  # e.g. "arbitrum/batches"
    chain_id: int = 0  # 0: the node's chain (its upstreams')
    sequencers: list[str] = field(default_factory=list)  # addresses whose batches count
    first_seq: int = 0  # the stream's first sequence number


@dataclass
class BatchesConfig:
    """L2 batch streams (see services/ingress.py). Every node that carries a batch stream
    names it here with its sequencers, so it can check each batch it relays; a node with
    ``log`` is also an ingress: sequencers push to it, and it keeps every batch durably."""

    streams: list[BatchStreamConfig] = field(default_factory=list)
    log: str = ""  # the durable log (sqlite3 file); set: this node takes pushes
    api_keys: list[str] = field(default_factory=list)  # a pusher's Bearer token (better: ${ENV})
    max_payload_bytes: int = d.BATCH_MAX_PAYLOAD_BYTES
    commit_max_batches: int = d.BATCH_COMMIT_MAX_BATCHES
    commit_max_bytes: int = d.BATCH_COMMIT_MAX_BYTES
    max_in_flight: int = d.BATCH_MAX_IN_FLIGHT
    recent_hashes: int = d.BATCH_RECENT_HASHES
    relay_ack_timeout: float = d.BATCH_RELAY_ACK_TIMEOUT
    backlog_frames: int = d.BATCH_BACKLOG_FRAMES
    backlog_bytes: int = d.BATCH_BACKLOG_BYTES
    order_max_held: int = d.BATCH_ORDER_MAX_HELD
    order_max_held_bytes: int = d.BATCH_ORDER_MAX_HELD_BYTES
    order_wait: float = d.BATCH_ORDER_WAIT
    child_queue_frames: int = d.BATCH_CHILD_QUEUE_FRAMES
    fetch_rounds: int = d.BATCH_FETCH_ROUNDS
    range_max_frames: int = d.BATCH_RANGE_MAX_FRAMES
    range_max_bytes: int = d.BATCH_RANGE_MAX_BYTES
    range_timeout: float = d.BATCH_RANGE_TIMEOUT


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    subscriptions: SubscriptionsConfig = field(default_factory=SubscriptionsConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    batches: BatchesConfig = field(default_factory=BatchesConfig)
    upstreams: list[UpstreamConfig] = field(default_factory=list)


def expand_env(text: str, env: typing.Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` (or ``${NAME:-default}``) with the environment's value."""
    env = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set")

    return _ENV.sub(sub, text)


def _decode(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key {where!r}")
    kwargs = {k: _value(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _value(tp: Any, v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _decode(tp, v, path)  # type: ignore[arg-type]
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(v, list):
            raise ConfigError(f"{path}: expected an array")
        return [_value(inner, x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"{path}: unsupported type")  # pragma: no cover
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp in (int, float, str, bool) and (type(v) is not tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(v).__name__}")
    return v


def validate(cfg: Config) -> Config:
    _validate_tree(cfg)
    _validate_batches(cfg)
    if not cfg.upstreams:
        raise ConfigError(
            "upstreams: at least one [[upstreams]] entry (or [[tree.parents]]) is needed"
        )
    for i, u in enumerate(cfg.upstreams):
        if not u.url.startswith(("http://", "https://", "ws://", "wss://")):
            raise ConfigError(f"upstreams[{i}].url: expected an http(s):// or ws(s):// URL")
        if not u.name:
            u.name = f"upstream{i}"
    names = [u.name for u in cfg.upstreams]
    if len(set(names)) != len(names):
        raise ConfigError("upstreams: names must be unique")
    if cfg.chain.profile and cfg.chain.profile not in PROFILES:
        raise ConfigError(
            f"chain.profile: unknown profile {cfg.chain.profile!r} (one of {sorted(PROFILES)})"
        )
    _validate_cache(cfg.cache)
    _, port = parse_listen(cfg.server.listen)
    for path, value in (
        ("limits.max_body_bytes", cfg.limits.max_body_bytes),
        ("limits.max_batch_len", cfg.limits.max_batch_len),
        ("limits.ws_close_timeout", cfg.limits.ws_close_timeout),
        ("limits.max_relay_hops", cfg.limits.max_relay_hops),
        ("limits.max_pending_replies", cfg.limits.max_pending_replies),
        ("limits.max_hit_table_bytes", cfg.limits.max_hit_table_bytes),
        ("limits.max_hit_table_entries", cfg.limits.max_hit_table_entries),
        ("limits.memo_max_params_bytes", cfg.limits.memo_max_params_bytes),
        ("pool.max_attempts", cfg.pool.max_attempts),
        ("pool.ws_ping_interval", cfg.pool.ws_ping_interval),
        ("pool.ws_max_message_bytes", cfg.pool.ws_max_message_bytes),
        ("server.workers", cfg.server.workers),
        ("filters.idle_timeout", cfg.filters.idle_timeout),
        ("filters.max_filters", cfg.filters.max_filters),
        ("filters.max_changes", cfg.filters.max_changes),
        ("filters.max_per_ip", cfg.filters.max_per_ip),
        ("filters.max_addresses", cfg.filters.max_addresses),
        ("filters.max_topics_per_position", cfg.filters.max_topics_per_position),
        ("subscriptions.max_per_connection", cfg.subscriptions.max_per_connection),
        ("subscriptions.max_per_ip", cfg.subscriptions.max_per_ip),
        ("subscriptions.max_total", cfg.subscriptions.max_total),
        ("subscriptions.max_log_filters", cfg.subscriptions.max_log_filters),
        ("subscriptions.max_log_filters_per_ip", cfg.subscriptions.max_log_filters_per_ip),
        ("subscriptions.max_held_notifications", cfg.subscriptions.max_held_notifications),
        ("subscriptions.max_held_bytes", cfg.subscriptions.max_held_bytes),
        ("subscriptions.pending_tx_fetches", cfg.subscriptions.pending_tx_fetches),
        ("subscriptions.slow_close_grace", cfg.subscriptions.slow_close_grace),
        ("subscriptions.feed_fetch_retry_delay", cfg.subscriptions.feed_fetch_retry_delay),
        ("subscriptions.follow_recent_blocks", cfg.subscriptions.follow_recent_blocks),
        ("subscriptions.feed_fetch_attempts", cfg.subscriptions.feed_fetch_attempts),
        ("subscriptions.feed_block_passes", cfg.subscriptions.feed_block_passes),
        (
            "subscriptions.feed_receipts_retry_blocks",
            cfg.subscriptions.feed_receipts_retry_blocks,
        ),
        ("subscriptions.pending_max_message", cfg.subscriptions.pending_max_message),
        ("head.poll_near", cfg.head.poll_near),
        ("head.interval_alpha", cfg.head.interval_alpha),
        ("head.interval_min_factor", cfg.head.interval_min_factor),
        ("head.poll_min_interval", cfg.head.poll_min_interval),
        ("head.poll_probe_every", cfg.head.poll_probe_every),
    ):
        if value <= 0:
            raise ConfigError(f"{path}: must be positive")
    h = cfg.head
    if h.poll_lead < 0 or h.interval_alpha > 1 or h.poll_backoff < 1:
        raise ConfigError("head: poll_lead >= 0, interval_alpha <= 1 and poll_backoff >= 1")
    if h.interval_max_factor < h.interval_min_factor or h.poll_max_interval < h.poll_min_interval:
        raise ConfigError(
            "head: interval_max_factor >= interval_min_factor and "
            "poll_max_interval >= poll_min_interval"
        )
    if cfg.subscriptions.follow_blocks not in FOLLOW_MODES:
        raise ConfigError(
            f"subscriptions.follow_blocks: expected one of {', '.join(FOLLOW_MODES)}, "
            f"got {cfg.subscriptions.follow_blocks!r}"
        )
    if cfg.server.workers > 1 and port == 0:
        raise ConfigError("server.listen: port 0 gives each worker its own port; name one")
    return cfg


_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_STREAM = re.compile(r"[a-z0-9_-]{1,20}/[a-z0-9_-]{1,11}")


def _validate_tree(cfg: Config) -> None:
    t = cfg.tree
    for i, a in enumerate(t.trust):
        if not _ADDRESS.fullmatch(a):
            raise ConfigError(f"tree.trust[{i}]: expected a 0x-prefixed 20-byte address")
    for i, name in enumerate(t.streams):
        if not _STREAM.fullmatch(name):
            raise ConfigError(f"tree.streams[{i}]: expected <chain>/<kind>, e.g. bsc/blocks")
    if t.key and t.key_file:
        raise ConfigError("tree: give key or key_file, not both")
    for i, p in enumerate(t.parents):
        if not p.url.startswith(("ws://", "wss://")):
            raise ConfigError(f"tree.parents[{i}].url: expected a ws(s):// URL")
        if not p.rpc:
            p.rpc = "http" + p.url[2:].split("/feed", 1)[0]
        if not p.rpc.startswith(("http://", "https://")):
            raise ConfigError(f"tree.parents[{i}].rpc: expected an http(s):// URL")
        if not p.name:
            p.name = f"parent{i}"
    if len({p.name for p in t.parents}) != len(t.parents):
        raise ConfigError("tree.parents: names must be unique")
    if t.parents and not t.trust and not cfg.batches.streams:
        raise ConfigError("tree.trust: a node with parents needs its origins' addresses")
    if t.parents and not cfg.upstreams:
        # Misses go to the parents' JSON-RPC endpoints, as to any upstream.
        cfg.upstreams = [UpstreamConfig(url=p.rpc, name=p.name) for p in t.parents]
    for path, value in (
        ("tree.parents_k", t.parents_k),
        ("tree.backlog_frames", t.backlog_frames),
        ("tree.backlog_bytes", t.backlog_bytes),
        ("tree.child_queue_frames", t.child_queue_frames),
        ("tree.child_queue_bytes", t.child_queue_bytes),
        ("tree.child_buffer_bytes", t.child_buffer_bytes),
        ("tree.dedup_entries", t.dedup_entries),
        ("tree.max_frame_bytes", t.max_frame_bytes),
        ("tree.max_payload_bytes", t.max_payload_bytes),
        ("tree.max_children", t.max_children),
        ("tree.stale_positions", t.stale_positions),
        ("tree.probe_interval", t.probe_interval),
        ("tree.degrade_factor", t.degrade_factor),
        ("tree.connect_timeout", t.connect_timeout),
        ("tree.retry_delay", t.retry_delay),
        ("tree.retry_max", t.retry_max),
        ("tree.ping_interval", t.ping_interval),
        ("tree.probe_timeout", t.probe_timeout),
        ("tree.probe_failures_down", t.probe_failures_down),
        ("tree.link_failures_down", t.link_failures_down),
        ("tree.link_check_interval", t.link_check_interval),
        ("tree.hello_timeout", t.hello_timeout),
        ("tree.stall_rounds", t.stall_rounds),
        ("tree.offered_max_bytes", t.offered_max_bytes),
    ):
        if value <= 0:
            raise ConfigError(f"{path}: must be positive")
    if t.child_queue_bytes < t.max_frame_bytes:
        # A child owed one frame bigger than its queue would be closed at every resume.
        raise ConfigError("tree.child_queue_bytes: must be at least tree.max_frame_bytes")
    if t.resume_last < 0 or t.min_gain < 0 or t.down_hold < 0:
        raise ConfigError("tree: resume_last, min_gain and down_hold must not be negative")


def _positive(section: str, values: object, key: str) -> None:
    if getattr(values, key) <= 0:
        raise ConfigError(f"{section}.{key}: must be positive")


def _validate_batches(cfg: Config) -> None:
    b = cfg.batches
    names: set[str] = set()
    for i, st in enumerate(b.streams):
        where = f"batches.streams[{i}]"
        if not _STREAM.fullmatch(st.name):
            raise ConfigError(f"{where}.name: expected <chain>/<kind>, e.g. arbitrum/batches")
        if st.name in names or st.name in cfg.tree.streams:
            raise ConfigError(f"{where}.name: {st.name} is named twice")
        names.add(st.name)
        if not st.sequencers:
            raise ConfigError(f"{where}.sequencers: name the addresses that sign its batches")
        for j, a in enumerate(st.sequencers):
            if not _ADDRESS.fullmatch(a):
                raise ConfigError(f"{where}.sequencers[{j}]: expected a 0x-prefixed address")
        if st.chain_id < 0 or st.first_seq < 0 or st.first_seq >= 2**63:
            raise ConfigError(f"{where}: chain_id and first_seq must not be negative")
    if b.log and not b.streams:
        raise ConfigError("batches.log: an ingress needs batches.streams to take pushes for")
    if b.log and not b.api_keys:
        raise ConfigError("batches.api_keys: an ingress takes pushes only with a key; name one")
    for i, key in enumerate(b.api_keys):
        if len(key) < 16:
            raise ConfigError(f"batches.api_keys[{i}]: at least 16 characters")
    for key in (
        "max_payload_bytes",
        "commit_max_batches",
        "commit_max_bytes",
        "max_in_flight",
        "recent_hashes",
        "relay_ack_timeout",
        "backlog_frames",
        "backlog_bytes",
        "order_max_held",
        "order_max_held_bytes",
        "order_wait",
        "child_queue_frames",
        "fetch_rounds",
        "range_max_frames",
        "range_max_bytes",
        "range_timeout",
    ):
        _positive("batches", b, key)
    if b.recent_hashes < b.max_in_flight:
        # A duplicate of a batch still in flight must be found among the recent hashes:
        # the log holds only what is durable.
        raise ConfigError("batches.recent_hashes: must be at least batches.max_in_flight")
    if b.log and b.max_payload_bytes + 1024 > cfg.limits.max_body_bytes:
        # POST /batches bodies pass the HTTP body bound first: a legal push must fit it.
        raise ConfigError("batches.max_payload_bytes: a push must fit in limits.max_body_bytes")
    if b.streams and b.max_payload_bytes + 1024 > cfg.tree.max_frame_bytes:
        raise ConfigError(
            "batches.max_payload_bytes: a batch's frame must fit in tree.max_frame_bytes"
        )


def _validate_cache(c: CacheConfig) -> None:
    if c.backend not in CACHE_BACKENDS:
        raise ConfigError(
            f"cache.backend: unknown backend {c.backend!r} (one of {', '.join(CACHE_BACKENDS)})"
        )
    for key in (
        "memory_bytes",
        "max_entry_bytes",
        "redis_max_entry_bytes",
        "redis_ttl_unfinalized",
        "redis_lock_ttl",
        "redis_timeout",
        "redis_connect_timeout",
        "redis_retry_interval",
        "redis_max_connections",
    ):
        _positive("cache", c, key)
    if c.redis_ttl_finalized < 0:
        raise ConfigError("cache.redis_ttl_finalized: must be 0 (no TTL) or positive")
    if c.backend != "memory" and not c.redis_url.startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"cache.redis_url: expected a {', '.join(REDIS_SCHEMES)} URL, got {c.redis_url!r}"
        )


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"server.listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _expand_values(data: Any, env: typing.Mapping[str, str] | None, path: str) -> Any:
    """Expand ``${ENV}`` inside string values only, so comments may mention variables."""
    if isinstance(data, str):
        try:
            return expand_env(data, env)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if isinstance(data, dict):
        return {k: _expand_values(v, env, f"{path}.{k}" if path else k) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_values(v, env, f"{path}[{i}]") for i, v in enumerate(data)]
    return data


def loads(text: str, env: typing.Mapping[str, str] | None = None) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    return validate(_decode(Config, _expand_values(raw, env, ""), ""))


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: {exc.strerror}") from None
    try:
        return loads(text)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def quick(upstreams: list[str], listen: str = d.LISTEN) -> Config:
    """The config of ``chainrelay serve --upstream URL ...``."""
    cfg = Config()
    cfg.server.listen = listen
    cfg.upstreams = [UpstreamConfig(url=u, name=f"upstream{i}") for i, u in enumerate(upstreams)]
    return validate(cfg)
