"""Every section of the config file, in the order the file reads: ``[server]``,
``[tiers.<name>]``, ``[methods]``, ``[logs]``, ``[limits]``, ``[cache]``, ``[chain]``,
``[pool]``, ``[head]``, ``[subscriptions]``, ``[filters]``, ``[tree]``, ``[batches]``,
``[[upstreams]]``.

Each section is a dataclass whose fields are its keys, each default named in
``defaults.py``; ``check`` holds its own rules (``checks.py`` says how a rule is written).
The rules that span sections are ``Config.check``'s.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass, field

from chainrelay import defaults as d
from chainrelay.access.methods import check_entries
from chainrelay.chain.profiles import PROFILES
from chainrelay.config.checks import check_fields, positive, require
from chainrelay.errors import ConfigError
from chainrelay.upstreams.httpwire import target as http_target

# "memory": this process only. "tiered": the memory LRU in front of a shared Redis.
# "redis": Redis, with only a minimal memory tier (defaults.REDIS_MODE_MEMORY_BYTES).
CACHE_BACKENDS = ("memory", "redis", "tiered")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

# When the block follower follows blocks (see chainrelay.chain.follower).
FOLLOW_MODES = ("auto", "always", "never")

# An upstream's role (chainrelay/upstreams/route.py), and a header name it may be sent
# (RFC 9110's token).
UPSTREAM_ROLES = ("primary", "fallback")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# A trusted signer, and a stream's name (<chain>/<kind>: at most 32 bytes, a frame's field).
ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
STREAM = re.compile(r"[a-z0-9_-]{1,20}/[a-z0-9_-]{1,11}")

# A pusher's API key: long enough that guessing one is out of reach.
MIN_API_KEY_CHARS = 16
# The headers a trusted proxy may name its client in (see defaults.CLIENT_ADDRESS_HEADER).
CLIENT_ADDRESS_HEADERS = ("x-forwarded-for", "forwarded")
# A client's API key: URL-safe (it may be a URL's path), and long enough not to be guessed.
CLIENT_KEY = re.compile(rf"[A-Za-z0-9._~-]{{{d.MIN_CLIENT_KEY_CHARS},256}}")
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_listen(listen: str, key: str = "server.listen") -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{key}: expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class ServerConfig:
    """``[server]``: where the front door listens, and how many processes serve it."""

    listen: str = d.LISTEN
    cors_origins: list[str] = field(default_factory=lambda: list(d.CORS_ORIGINS))
    workers: int = positive(d.WORKERS)
    # Operator surfaces: the admin listener, the access log, compression (README).
    admin_listen: str = d.ADMIN_LISTEN
    # /metrics and the full /health on the public port too, with the admin listener on.
    public_metrics: bool = d.PUBLIC_METRICS
    admin_scrape_timeout: float = positive(d.ADMIN_SCRAPE_TIMEOUT)
    access_log: str = d.ACCESS_LOG
    access_log_sample: float = d.ACCESS_LOG_SAMPLE
    access_log_flush_interval: float = positive(d.ACCESS_LOG_FLUSH_INTERVAL)
    access_log_flush_bytes: int = positive(d.ACCESS_LOG_FLUSH_BYTES)
    access_log_max_buffer_bytes: int = positive(d.ACCESS_LOG_MAX_BUFFER_BYTES)
    request_id_max_bytes: int = positive(d.REQUEST_ID_MAX_BYTES)
    gzip_min_bytes: int = positive(d.GZIP_MIN_BYTES)
    gzip_level: int = d.GZIP_LEVEL
    ws_deflate: bool = d.WS_DEFLATE
    # The prefix an IPv6 client's limits are kept under (128: each address on its own).
    ipv6_prefix: int = d.IPV6_CLIENT_PREFIX
    # Who a client is behind proxies (chainrelay/access/forwarded.py, proxyproto.py): the
    # proxies believed (addresses, networks), the header they name the client in, and
    # whether every connection begins with a PROXY header (then only from those proxies).
    trusted_proxies: list[str] = field(default_factory=lambda: list(d.TRUSTED_PROXIES))
    client_address_header: str = d.CLIENT_ADDRESS_HEADER
    proxy_protocol: bool = d.PROXY_PROTOCOL
    max_forwarded_hops: int = positive(d.MAX_FORWARDED_HOPS)
    max_proxy_header_bytes: int = positive(d.MAX_PROXY_HEADER_BYTES)
    # The admin listener's status page (chainrelay/status/): seconds of samples kept, and
    # children listed in /status.json (the rest counted).
    status_history: int = positive(d.STATUS_HISTORY)
    status_max_children: int = positive(d.STATUS_MAX_CHILDREN)

    def check(self) -> None:
        _, port = parse_listen(self.listen)
        check_fields(self, "server")
        if self.admin_listen:
            _, admin_port = parse_listen(self.admin_listen, "server.admin_listen")
            require(
                admin_port == 0 or admin_port != port,
                "server.admin_listen: must not be the public port",
            )
        require(
            0.0 <= self.access_log_sample <= 1.0,
            "server.access_log_sample: must be between 0 and 1",
        )
        require(1 <= self.gzip_level <= 9, "server.gzip_level: must be between 1 and 9")
        require(0 < self.ipv6_prefix <= 128, "server.ipv6_prefix: from 1 to 128 bits")
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ConfigError(
                    f"server.trusted_proxies: {entry!r} is not an address or a network"
                ) from None
        require(
            self.client_address_header in CLIENT_ADDRESS_HEADERS,
            "server.client_address_header: one of " + ", ".join(CLIENT_ADDRESS_HEADERS),
        )
        require(
            not self.proxy_protocol or bool(self.trusted_proxies),
            "server.proxy_protocol: name the proxies it is taken from in "
            "server.trusted_proxies (every other connection is closed)",
        )
        require(
            self.max_proxy_header_bytes >= 107,
            "server.max_proxy_header_bytes: at least 107 (a PROXY v1 line)",
        )
        require(
            self.workers <= 1 or port != 0,
            "server.listen: port 0 gives each worker its own port; name one",
        )


@dataclass
class TierConfig:
    """``[tiers.<name>]``: what one client (one identity: a key, or an address) of a tier
    may ask. Clients without a key are in ``[tiers.default]``; a key names its tier."""

    # Calls per second of one identity (a token bucket, access/buckets.py; 0: no limit),
    # calls at once above it, and what a cache hit costs as a share of a miss.
    rate: float = d.RATE
    burst: float = positive(d.RATE_BURST)
    hit_cost_factor: float = d.HIT_COST_FACTOR
    # The tier's own limit on the calls of one batch (the node's is limits.max_batch_len).
    max_batch_len: int = positive(d.MAX_BATCH_LEN)
    # Methods this tier's clients may call beyond the node's ([methods]), and those they
    # may not among them: names, or families ("debug_*").
    enable_methods: list[str] = field(default_factory=lambda: list(d.METHODS_ENABLE))
    disable_methods: list[str] = field(default_factory=lambda: list(d.METHODS_DISABLE))

    def check(self, name: str) -> None:
        check_fields(self, f"tiers.{name}")
        for key in ("enable_methods", "disable_methods"):
            wrong = check_entries(getattr(self, key), f"tiers.{name}.{key}")
            require(wrong is None, wrong or "")

        require(self.rate >= 0, f"tiers.{name}.rate: 0 (no limit) or more")
        require(0 <= self.hit_cost_factor <= 1, f"tiers.{name}.hit_cost_factor: from 0 to 1")


@dataclass
class MethodsConfig:
    """``[methods]``: the node's own allow list, for every tier (access/methods.py)."""

    # Served beyond the defaults: names, or families ("debug_*", "trace_*").
    enable: list[str] = field(default_factory=lambda: list(d.METHODS_ENABLE))
    # Refused among what would be served.
    disable: list[str] = field(default_factory=lambda: list(d.METHODS_DISABLE))

    def check(self) -> None:
        for key in ("enable", "disable"):
            wrong = check_entries(getattr(self, key), f"methods.{key}")
            require(wrong is None, wrong or "")


@dataclass
class LogsConfig:
    """``[logs]``: the guards of eth_getLogs (rpc/logguards.py); past one, -32005."""

    # The widest block range, tags resolved against the head (0: the chain profile's).
    max_block_range: int = d.LOGS_MAX_BLOCK_RANGE
    max_addresses: int = positive(d.LOGS_MAX_ADDRESSES)
    max_topics_per_position: int = positive(d.LOGS_MAX_TOPICS_PER_POSITION)
    # An answer's bytes, from the block logs held or from an upstream.
    max_answer_bytes: int = positive(d.LOGS_MAX_ANSWER_BYTES)
    # A wider range is asked upstream in chunks of this many blocks (0: the profile's),
    # this many chunk calls at once.
    split_blocks: int = d.LOGS_SPLIT_BLOCKS
    split_concurrency: int = positive(d.LOGS_SPLIT_CONCURRENCY)

    def check(self) -> None:
        check_fields(self, "logs")
        require(
            self.max_block_range >= 0,
            "logs.max_block_range: must be 0 (the chain profile's) or positive",
        )
        require(
            self.split_blocks >= 0,
            "logs.split_blocks: must be 0 (the chain profile's) or positive",
        )


@dataclass
class ClientKeyConfig:
    """``[[auth.keys]]``, and each ``[[keys]]`` of ``auth.keys_file``: one client's API key."""

    name: str = ""
    key: str = ""
    tier: str = d.DEFAULT_TIER
    # The key's own allow list of methods (empty: its tier's) and the browser origins it
    # may be used from (empty: any; a call without Origin is not a browser's).
    methods: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)

    def check(self, path: str) -> None:
        require(
            KEY_NAME.fullmatch(self.name) is not None,
            f"{path}.name: 1 to 64 characters of A-Z a-z 0-9 . _ -",
        )
        require(
            CLIENT_KEY.fullmatch(self.key) is not None,
            f"{path}.key: {d.MIN_CLIENT_KEY_CHARS} to 256 characters of A-Z a-z 0-9 . _ ~ -",
        )


def check_client_keys(keys: list[ClientKeyConfig], tiers: Collection[str], path: str) -> None:
    """Each key's own rules, then: names and keys each used once, tiers that exist."""
    names: set[str] = set()
    secrets: set[str] = set()
    for i, key in enumerate(keys):
        where = f"{path}[{i}]"
        key.check(where)
        require(key.name not in names, f"{where}.name: {key.name!r} is used twice")
        require(key.key not in secrets, f"{where}.key: the same key as an earlier one")
        require(key.tier in tiers, f"{where}.tier: no [tiers.{key.tier}]")
        names.add(key.name)
        secrets.add(key.key)


@dataclass
class AuthConfig:
    """``[auth]``: API keys (chainrelay/access/keys.py). A key comes in ``Authorization:
    Bearer``, ``X-Api-Key`` or the URL's path; ``keys_file`` (TOML, ``[[keys]]`` tables) is
    read again on SIGHUP."""

    required: bool = d.AUTH_REQUIRED
    keys_file: str = ""
    keys: list[ClientKeyConfig] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        """Whether calls are asked for a key at all."""
        return self.required or bool(self.keys) or bool(self.keys_file)


@dataclass
class LimitsConfig:
    """``[limits]``: what one request, connection or client may cost."""

    max_body_bytes: int = positive(d.MAX_BODY_BYTES)
    max_batch_len: int = positive(d.MAX_BATCH_LEN)
    max_header_bytes: int = d.MAX_HEADER_BYTES
    max_pending_per_connection: int = d.MAX_PENDING_PER_CONNECTION
    max_pending_replies: int = positive(d.MAX_PENDING_REPLIES)
    max_connections_per_ip: int = d.MAX_CONNECTIONS_PER_IP
    keepalive_timeout: float = d.KEEPALIVE_TIMEOUT
    max_ws_message_bytes: int = d.MAX_WS_MESSAGE_BYTES
    max_ws_send_buffer: int = d.MAX_WS_SEND_BUFFER
    ws_close_timeout: float = positive(d.WS_CLOSE_TIMEOUT)
    max_buffered_bytes_per_ip: int = positive(d.MAX_BUFFERED_BYTES_PER_IP)
    max_buffered_bytes_total: int = positive(d.MAX_BUFFERED_BYTES_TOTAL)
    body_read_timeout: float = positive(d.BODY_READ_TIMEOUT)
    linger_timeout: float = positive(d.LINGER_TIMEOUT)
    linger_bytes: int = positive(d.LINGER_BYTES)
    max_requests_per_turn: int = positive(d.MAX_REQUESTS_PER_TURN)
    max_relay_hops: int = positive(d.MAX_RELAY_HOPS)
    max_hit_table_bytes: int = positive(d.MAX_HIT_TABLE_BYTES)
    max_hit_table_entries: int = positive(d.MAX_HIT_TABLE_ENTRIES)
    max_named_heads: int = positive(d.MAX_NAMED_HEADS)
    memo_max_params_bytes: int = positive(d.MEMO_MAX_PARAMS_BYTES)
    # Upstream calls under way for clients: node-wide (past it -32005 at once), per client
    # address (past it a client waits for its own earlier calls, within the call's deadline).
    max_upstream_in_flight: int = positive(d.MAX_UPSTREAM_IN_FLIGHT)
    max_upstream_in_flight_per_client: int = positive(d.MAX_UPSTREAM_IN_FLIGHT_PER_CLIENT)
    # What a call costs against its identity's bucket ([tiers.<name>] rate), by method, over
    # defaults.RATE_METHOD_COSTS (a method named here takes this cost); others default_cost.
    method_costs: dict[str, float] = field(default_factory=dict)
    default_cost: float = positive(d.RATE_DEFAULT_COST)
    max_rate_buckets: int = positive(d.MAX_RATE_BUCKETS)
    # eth_sendRawTransaction per sender address (0: no limit).
    sender_rate: float = d.SENDER_RATE
    sender_burst: float = positive(d.SENDER_BURST)

    def check(self) -> None:
        check_fields(self, "limits")
        require(self.sender_rate >= 0, "limits.sender_rate: 0 (no limit) or more")
        for method, cost in self.method_costs.items():
            require(cost >= 0, f"limits.method_costs.{method}: 0 or more")


@dataclass
class CacheConfig:
    """``[cache]``: the memory LRU and, for the "redis" and "tiered" backends, the Redis
    tier (chainrelay/rpc/shared_cache.py)."""

    backend: str = d.CACHE_BACKEND
    memory_bytes: int = positive(d.CACHE_MEMORY_BYTES)
    max_entry_bytes: int = positive(d.CACHE_MAX_ENTRY_BYTES)
    # Block logs held for eth_getLogs (chain/logstore.py), and the upstream sub-ranges a
    # window may be split into around them (0: only windows wholly held are answered here).
    logs_bytes: int = positive(d.CACHE_LOGS_BYTES)
    logs_max_upstream_ranges: int = d.CACHE_LOGS_MAX_UPSTREAM_RANGES
    redis_url: str = d.REDIS_URL
    redis_key_prefix: str = d.REDIS_KEY_PREFIX
    redis_max_entry_bytes: int = positive(d.REDIS_MAX_ENTRY_BYTES)
    redis_ttl_finalized: float = d.REDIS_TTL_FINALIZED  # 0: no TTL (maxmemory + LRU only)
    redis_ttl_unfinalized: float = positive(d.REDIS_TTL_UNFINALIZED)
    redis_lock_ttl: float = positive(d.REDIS_LOCK_TTL)
    redis_timeout: float = positive(d.REDIS_TIMEOUT)
    redis_connect_timeout: float = positive(d.REDIS_CONNECT_TIMEOUT)
    redis_retry_interval: float = positive(d.REDIS_RETRY_INTERVAL)
    redis_max_connections: int = positive(d.REDIS_MAX_CONNECTIONS)

    def check(self) -> None:
        require(
            self.backend in CACHE_BACKENDS,
            f"cache.backend: unknown backend {self.backend!r} (one of {', '.join(CACHE_BACKENDS)})",
        )
        check_fields(self, "cache")
        require(
            self.logs_max_upstream_ranges >= 0,
            "cache.logs_max_upstream_ranges: must be 0 (no split) or more",
        )
        require(
            not self.redis_ttl_finalized < 0,
            "cache.redis_ttl_finalized: must be 0 (no TTL) or positive",
        )
        require(
            self.backend == "memory" or self.redis_url.startswith(REDIS_SCHEMES),
            f"cache.redis_url: expected a {', '.join(REDIS_SCHEMES)} URL, got {self.redis_url!r}",
        )


@dataclass
class ChainConfig:
    """``[chain]``: which chain the node serves."""

    # A profile from chainrelay.chain.profiles ("bsc", "arbitrum", "devnet"); empty: by id.
    profile: str = ""
    # Expected chain id; upstreams on another chain are refused. 0: read from upstreams.
    chain_id: int = 0

    def check(self) -> None:
        require(
            not self.profile or self.profile in PROFILES,
            f"chain.profile: unknown profile {self.profile!r} (one of {sorted(PROFILES)})",
        )


@dataclass
class PoolConfig:
    """``[pool]``: picking, retrying and hedging among upstreams."""

    deadline: float = positive(d.CALL_DEADLINE)
    timeout: float = d.UPSTREAM_TIMEOUT
    max_attempts: int = positive(d.UPSTREAM_MAX_ATTEMPTS)
    hedge: bool = d.HEDGE
    hedge_quantile: float = d.HEDGE_QUANTILE
    hedge_min_delay: float = d.HEDGE_MIN_DELAY
    max_lag_blocks: int = d.MAX_LAG_BLOCKS
    max_consecutive_errors: int = d.MAX_CONSECUTIVE_ERRORS
    probe_interval: float = positive(d.PROBE_INTERVAL)
    retry_after_max: float = d.RETRY_AFTER_MAX
    connections: int = d.UPSTREAM_CONNECTIONS
    ws_ping_interval: float = positive(d.WS_PING_INTERVAL)
    ws_max_message_bytes: int = positive(d.WS_MAX_MESSAGE_BYTES)
    # Connections a WebSocket upstream spreads its single calls over (see WS_LANES).
    ws_lanes: int = positive(d.WS_LANES)
    # Calls per JSON-RPC batch sent upstream for a client batch's misses (1: no batches).
    batch_len: int = positive(d.UPSTREAM_BATCH_LEN)
    # Routing (README "Upstream routing"): the longest wait for an upstream's budget, how
    # long a method learnt unsupported stays so, and auto-tuning of max_rps from 429s.
    budget_wait: float = d.BUDGET_WAIT
    capability_ttl: float = positive(d.CAPABILITY_TTL)
    auto_tune: bool = d.AUTO_TUNE
    # HTTP upstreams: idle keep-alive, pipelining depth (1: none), answer bound, gzip.
    http_keepalive_timeout: float = positive(d.HTTP_UPSTREAM_KEEPALIVE)
    http_pipeline_depth: int = positive(d.HTTP_UPSTREAM_PIPELINE_DEPTH)
    http_max_answer_bytes: int = positive(d.HTTP_UPSTREAM_MAX_ANSWER_BYTES)
    http_accept_encoding: bool = d.HTTP_UPSTREAM_ACCEPT_ENCODING

    def check(self) -> None:
        check_fields(self, "pool")
        require(
            not (self.budget_wait < 0 or self.retry_after_max < 0),
            "pool: budget_wait and retry_after_max must be >= 0",
        )


@dataclass
class HeadConfig:
    """``[head]``: following the chain's head."""

    reorg_window: int = d.REORG_WINDOW
    backfill_blocks: int = d.BACKFILL_BLOCKS
    finality_refresh_blocks: int = d.FINALITY_REFRESH_BLOCKS
    fresh_blocks: float = d.HEAD_FRESH_BLOCKS
    poll_lead: float = d.HEAD_POLL_LEAD
    poll_near: float = positive(d.HEAD_POLL_NEAR)
    interval_alpha: float = positive(d.HEAD_INTERVAL_ALPHA)
    interval_min_factor: float = positive(d.HEAD_INTERVAL_MIN_FACTOR)
    interval_max_factor: float = d.HEAD_INTERVAL_MAX_FACTOR
    poll_backoff: float = d.HEAD_POLL_BACKOFF
    poll_min_interval: float = positive(d.HEAD_POLL_MIN_INTERVAL)
    poll_max_interval: float = d.HEAD_POLL_MAX_INTERVAL
    poll_probe_every: int = positive(d.HEAD_POLL_PROBE_EVERY)
    # Upstreams that must hold a block by hash for it to be the head (3 or more upstreams;
    # 0: a majority), how far above it an upstream may be, how often eth_syncing is asked.
    quorum: int = d.HEAD_QUORUM
    max_ahead_blocks: int = positive(d.HEAD_MAX_AHEAD_BLOCKS)
    syncing_every: float = positive(d.HEAD_SYNCING_EVERY)
    # How often a fallback's head is checked while the primaries serve (README "Upstream
    # routing"): at full cadence only while it serves.
    fallback_interval: float = positive(d.HEAD_FALLBACK_INTERVAL)

    def check(self) -> None:
        check_fields(self, "head")
        require(self.quorum >= 0, "head.quorum: must be 0 (a majority) or positive")
        require(
            # Written as refusals, so a NaN (valid TOML) passes exactly as it always has.
            not (self.poll_lead < 0 or self.interval_alpha > 1 or self.poll_backoff < 1),
            "head: poll_lead >= 0, interval_alpha <= 1 and poll_backoff >= 1",
        )
        require(
            not (
                self.interval_max_factor < self.interval_min_factor
                or self.poll_max_interval < self.poll_min_interval
            ),
            "head: interval_max_factor >= interval_min_factor and "
            "poll_max_interval >= poll_min_interval",
        )


@dataclass
class SubscriptionsConfig:
    """``[subscriptions]``: eth_subscribe, and when the block follower follows blocks."""

    max_per_connection: int = positive(d.MAX_SUBSCRIPTIONS_PER_CONNECTION)
    max_per_ip: int = positive(d.MAX_SUBSCRIPTIONS_PER_IP)
    max_total: int = positive(d.MAX_SUBSCRIPTIONS_TOTAL)
    max_log_filters: int = positive(d.MAX_LOG_FILTERS)
    max_log_filters_per_ip: int = positive(d.MAX_LOG_FILTERS_PER_IP)
    max_held_notifications: int = positive(d.MAX_HELD_NOTIFICATIONS)
    max_held_bytes: int = positive(d.MAX_HELD_BYTES)
    pending_tx_fetches: int = positive(d.PENDING_TX_FETCHES)
    slow_close_grace: float = positive(d.SLOW_CLOSE_GRACE)
    follow_blocks_always: bool = d.FOLLOW_BLOCKS_ALWAYS
    follow_blocks: str = d.FOLLOW_BLOCKS
    follow_recent_blocks: int = positive(d.FOLLOW_RECENT_BLOCKS)
    max_block_fills: int = positive(d.MAX_BLOCK_FILLS)
    filled_blocks_remembered: int = positive(d.FILLED_BLOCKS_REMEMBERED)
    # The recent window filled behind the follower's first block (chain/windowfill.py).
    fill_window_blocks: int = d.FILL_WINDOW_BLOCKS
    fill_window_at_once: int = positive(d.FILL_WINDOW_AT_ONCE)
    fill_window_after_misses: int = positive(d.FILL_WINDOW_AFTER_MISSES)
    feed_fetch_retry_delay: float = positive(d.FEED_FETCH_RETRY_DELAY)
    feed_fetch_attempts: int = positive(d.FEED_FETCH_ATTEMPTS)
    feed_block_passes: int = positive(d.FEED_BLOCK_PASSES)
    feed_receipts_retry_blocks: int = positive(d.FEED_RECEIPTS_RETRY_BLOCKS)
    pending_max_message: int = positive(d.PENDING_MAX_MESSAGE)

    def check(self) -> None:
        check_fields(self, "subscriptions")
        require(
            self.follow_blocks in FOLLOW_MODES,
            f"subscriptions.follow_blocks: expected one of {', '.join(FOLLOW_MODES)}, "
            f"got {self.follow_blocks!r}",
        )
        require(
            self.fill_window_blocks >= 0, "subscriptions.fill_window_blocks: must be >= 0 (0: off)"
        )

    @property
    def follow(self) -> str:
        """The follow mode in force: ``follow_blocks_always`` overrides ``follow_blocks``."""
        return "always" if self.follow_blocks_always else self.follow_blocks


@dataclass
class FiltersConfig:
    """``[filters]``: eth_newFilter & co."""

    idle_timeout: float = positive(d.FILTER_IDLE_TIMEOUT)
    max_filters: int = positive(d.MAX_FILTERS)
    max_changes: int = positive(d.MAX_FILTER_CHANGES)
    max_changes_total: int = positive(d.MAX_FILTER_CHANGES_TOTAL)
    max_per_ip: int = positive(d.MAX_FILTERS_PER_IP)
    max_addresses: int = positive(d.MAX_FILTER_ADDRESSES)
    max_topics_per_position: int = positive(d.MAX_TOPICS_PER_POSITION)

    def check(self) -> None:
        check_fields(self, "filters")


@dataclass
class TreeParentConfig:
    """One ``[[tree.parents]]`` entry: a node this one takes frames from."""

    url: str = ""  # the parent's feed: ws://HOST:PORT/feed
    rpc: str = ""  # its JSON-RPC endpoint; empty: the same host and port over http
    region: str = ""
    name: str = ""  # empty: "parent<index>"

    def check(self, path: str, index: int) -> None:
        require(self.url.startswith(("ws://", "wss://")), f"{path}.url: expected a ws(s):// URL")
        if not self.rpc:
            self.rpc = "http" + self.url[2:].split("/feed", 1)[0]
        require(
            self.rpc.startswith(("http://", "https://")), f"{path}.rpc: expected an http(s):// URL"
        )
        if not self.name:
            self.name = f"parent{index}"


@dataclass
class TreeConfig:
    """``[tree]``: this node's place in the relay tree (origin, relay or leaf), its parents
    and the bounds of its feed (see chainrelay/tree/hub.py). A node with ``key`` is an origin
    of its chain's block stream; a node with ``parents`` takes frames from them (and, without
    ``[[upstreams]]``, their JSON-RPC endpoints are its upstreams)."""

    region: str = ""
    key: str = ""  # the origin's secp256k1 key, hex (better: "${ENV_VAR}")
    key_file: str = ""  # or an eth-account keystore JSON (or a file holding the hex key)
    key_password: str = ""  # the keystore's password (better: "${ENV_VAR}")
    trust: list[str] = field(default_factory=list)  # origin addresses whose frames count
    streams: list[str] = field(default_factory=list)  # empty: "<profile>/blocks"
    parents: list[TreeParentConfig] = field(default_factory=list)
    parents_k: int = positive(d.TREE_PARENTS)
    resume_last: int = d.TREE_RESUME_LAST
    backlog_frames: int = positive(d.TREE_BACKLOG_FRAMES)
    backlog_bytes: int = positive(d.TREE_BACKLOG_BYTES)
    child_queue_frames: int = positive(d.TREE_CHILD_QUEUE_FRAMES)
    child_queue_bytes: int = positive(d.TREE_CHILD_QUEUE_BYTES)
    child_buffer_bytes: int = positive(d.TREE_CHILD_BUFFER_BYTES)
    dedup_entries: int = positive(d.TREE_DEDUP_ENTRIES)
    max_frame_bytes: int = positive(d.TREE_MAX_FRAME_BYTES)
    max_payload_bytes: int = positive(d.TREE_MAX_PAYLOAD_BYTES)
    max_children: int = positive(d.TREE_MAX_CHILDREN)
    stale_positions: int = positive(d.TREE_STALE_POSITIONS)
    probe_interval: float = positive(d.TREE_PROBE_INTERVAL)
    degrade_factor: float = positive(d.TREE_DEGRADE_FACTOR)
    min_gain: float = d.TREE_MIN_GAIN
    connect_timeout: float = positive(d.TREE_CONNECT_TIMEOUT)
    retry_delay: float = positive(d.TREE_RETRY_DELAY)
    retry_max: float = positive(d.TREE_RETRY_MAX)
    ping_interval: float = positive(d.TREE_PING_INTERVAL)
    probe_timeout: float = positive(d.TREE_PROBE_TIMEOUT)
    probe_failures_down: int = positive(d.TREE_PROBE_FAILURES_DOWN)
    link_failures_down: int = positive(d.TREE_LINK_FAILURES_DOWN)
    down_hold: float = d.TREE_DOWN_HOLD
    link_check_interval: float = positive(d.TREE_LINK_CHECK_INTERVAL)
    hello_timeout: float = positive(d.TREE_HELLO_TIMEOUT)
    stall_rounds: int = positive(d.TREE_STALL_ROUNDS)
    offered_max_bytes: int = positive(d.OFFERED_MAX_BYTES)
    # Who a feed child is (chainrelay/tree/auth.py, chainrelay/tree/admission.py).
    # Child relays' addresses, or secrets shared with them (better: "${ENV_VAR}"): a child
    # that proves one is a relay; any other is an anonymous subscriber.
    child_keys: list[str] = field(default_factory=list)
    node_key: str = ""  # this node's key as a child relay, hex (better: "${ENV_VAR}")
    node_key_file: str = ""  # or a file holding it (hex, or a keystore: key_password)
    node_secret: str = ""  # or a secret its parents list in their child_keys
    anon_per_address: int = positive(d.TREE_ANON_PER_ADDRESS)
    anon_max_sessions: int = positive(d.TREE_ANON_MAX_SESSIONS)
    anon_reconnect_cooldown: float = d.TREE_ANON_RECONNECT_COOLDOWN
    anon_idle_addresses: int = positive(d.TREE_ANON_IDLE_ADDRESSES)

    @property
    def enabled(self) -> bool:
        return bool(self.key or self.key_file or self.parents)

    def check(self, *, batch_streams: bool) -> None:
        """``batch_streams``: the node carries batch streams, whose sequencers it trusts
        (``[batches]``); a node with parents needs some origin to trust."""
        for i, a in enumerate(self.trust):
            require(
                ADDRESS.fullmatch(a) is not None,
                f"tree.trust[{i}]: expected a 0x-prefixed 20-byte address",
            )
        for i, name in enumerate(self.streams):
            require(
                STREAM.fullmatch(name) is not None,
                f"tree.streams[{i}]: expected <chain>/<kind>, e.g. bsc/blocks",
            )
        require(not (self.key and self.key_file), "tree: give key or key_file, not both")
        for i, p in enumerate(self.parents):
            p.check(f"tree.parents[{i}]", i)
        require(
            len({p.name for p in self.parents}) == len(self.parents),
            "tree.parents: names must be unique",
        )
        require(
            not (self.parents and not self.trust and not batch_streams),
            "tree.trust: a node with parents needs its origins' addresses",
        )
        check_fields(self, "tree")
        # A child owed one frame bigger than its queue would be closed at every resume.
        require(
            not self.child_queue_bytes < self.max_frame_bytes,
            "tree.child_queue_bytes: must be at least tree.max_frame_bytes",
        )
        require(
            not (self.resume_last < 0 or self.min_gain < 0 or self.down_hold < 0),
            "tree: resume_last, min_gain and down_hold must not be negative",
        )
        self._check_keys()

    def _check_keys(self) -> None:
        for i, k in enumerate(self.child_keys):
            require(
                ADDRESS.fullmatch(k) is not None or len(k) >= MIN_API_KEY_CHARS,
                f"tree.child_keys[{i}]: expected a 0x-prefixed 20-byte address or a secret"
                f" of at least {MIN_API_KEY_CHARS} characters",
            )
        require(
            sum(map(bool, (self.node_key, self.node_key_file, self.node_secret))) <= 1,
            "tree: give one of node_key, node_key_file and node_secret",
        )
        require(
            not self.node_secret
            or (
                len(self.node_secret) >= MIN_API_KEY_CHARS
                and not ADDRESS.fullmatch(self.node_secret)
            ),
            f"tree.node_secret: at least {MIN_API_KEY_CHARS} characters, and no address",
        )
        require(
            self.anon_reconnect_cooldown >= 0, "tree.anon_reconnect_cooldown: must not be negative"
        )


@dataclass
class BatchStreamConfig:
    """One sequencer's batch stream: who may sign it, for which chain, from which number."""

    name: str = ""  # e.g. "arbitrum/batches"
    chain_id: int = 0  # 0: the node's chain (its upstreams')
    sequencers: list[str] = field(default_factory=list)  # addresses whose batches count
    first_seq: int = 0  # the stream's first sequence number

    def check(self, path: str, taken: Collection[str]) -> None:
        """``taken``: the names of the streams before it (block streams included)."""
        require(
            STREAM.fullmatch(self.name) is not None,
            f"{path}.name: expected <chain>/<kind>, e.g. arbitrum/batches",
        )
        require(self.name not in taken, f"{path}.name: {self.name} is named twice")
        require(
            bool(self.sequencers), f"{path}.sequencers: name the addresses that sign its batches"
        )
        for j, a in enumerate(self.sequencers):
            require(
                ADDRESS.fullmatch(a) is not None,
                f"{path}.sequencers[{j}]: expected a 0x-prefixed address",
            )
        require(
            not (self.chain_id < 0 or self.first_seq < 0 or self.first_seq >= 2**63),
            f"{path}: chain_id and first_seq must not be negative",
        )


@dataclass
class BatchesConfig:
    """``[batches]``: the L2 batch streams a node carries (see chainrelay/batches/ingress.py).
    Every node that carries a batch stream names it here with its sequencers, so it can check
    each batch it relays; a node with ``log`` is also an ingress: sequencers push to it, and it
    keeps every batch durably."""

    streams: list[BatchStreamConfig] = field(default_factory=list)
    log: str = ""  # the durable log (sqlite3 file); set: this node takes pushes
    api_keys: list[str] = field(default_factory=list)  # a pusher's Bearer token (better: ${ENV})
    max_payload_bytes: int = positive(d.BATCH_MAX_PAYLOAD_BYTES)
    commit_max_batches: int = positive(d.BATCH_COMMIT_MAX_BATCHES)
    commit_max_bytes: int = positive(d.BATCH_COMMIT_MAX_BYTES)
    max_in_flight: int = positive(d.BATCH_MAX_IN_FLIGHT)
    recent_hashes: int = positive(d.BATCH_RECENT_HASHES)
    relay_ack_timeout: float = positive(d.BATCH_RELAY_ACK_TIMEOUT)
    backlog_frames: int = positive(d.BATCH_BACKLOG_FRAMES)
    backlog_bytes: int = positive(d.BATCH_BACKLOG_BYTES)
    order_max_held: int = positive(d.BATCH_ORDER_MAX_HELD)
    order_max_held_bytes: int = positive(d.BATCH_ORDER_MAX_HELD_BYTES)
    order_wait: float = positive(d.BATCH_ORDER_WAIT)
    child_queue_frames: int = positive(d.BATCH_CHILD_QUEUE_FRAMES)
    fetch_rounds: int = positive(d.BATCH_FETCH_ROUNDS)
    range_max_frames: int = positive(d.BATCH_RANGE_MAX_FRAMES)
    range_max_bytes: int = positive(d.BATCH_RANGE_MAX_BYTES)
    range_timeout: float = positive(d.BATCH_RANGE_TIMEOUT)

    def first_seqs(self) -> dict[str, int]:
        """Each stream's first sequence number, by name."""
        return {s.name: s.first_seq for s in self.streams}

    def check(self, taken: list[str]) -> None:
        """``taken``: stream names already carried (the tree's block streams)."""
        names = set(taken)
        for i, st in enumerate(self.streams):
            st.check(f"batches.streams[{i}]", names)
            names.add(st.name)
        require(
            not (self.log and not self.streams),
            "batches.log: an ingress needs batches.streams to take pushes for",
        )
        require(
            not (self.log and not self.api_keys),
            "batches.api_keys: an ingress takes pushes only with a key; name one",
        )
        for i, key in enumerate(self.api_keys):
            require(
                len(key) >= MIN_API_KEY_CHARS,
                f"batches.api_keys[{i}]: at least {MIN_API_KEY_CHARS} characters",
            )
        check_fields(self, "batches")
        # A duplicate of a batch still in flight must be found among the recent hashes:
        # the log holds only what is durable.
        require(
            not self.recent_hashes < self.max_in_flight,
            "batches.recent_hashes: must be at least batches.max_in_flight",
        )


@dataclass
class UpstreamConfig:
    """One ``[[upstreams]]`` entry: a node the relay forwards misses to."""

    url: str = ""
    name: str = ""  # empty: "upstream<index>"
    # Routing (README "Upstream routing"): "primary" or "fallback", a primary's share,
    # its budget (0: none), whether it holds every block, and what a provider asks to be
    # sent: headers (a table) and basic auth ("user:pass", ${ENV} expanded).
    role: str = d.UPSTREAM_ROLE
    weight: int = positive(d.UPSTREAM_WEIGHT)
    max_rps: float = d.UPSTREAM_MAX_RPS
    max_concurrency: int = d.UPSTREAM_MAX_CONCURRENCY
    archive: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    auth: str = ""

    def check(self, index: int) -> None:
        path = f"upstreams[{index}]"
        check_fields(self, path)
        require(
            self.role in UPSTREAM_ROLES,
            f"{path}.role: expected one of {', '.join(UPSTREAM_ROLES)}, got {self.role!r}",
        )
        require(
            not (self.max_rps < 0 or self.max_concurrency < 0 or self.max_rps != self.max_rps),
            f"{path}: max_rps and max_concurrency must be >= 0 (0: no bound)",
        )
        require(not self.auth or ":" in self.auth, f'{path}.auth: expected "user:pass"')
        for name, value in self.headers.items():
            require(
                HEADER_NAME.fullmatch(name) is not None,
                f"{path}.headers: {name!r} is not an HTTP header name",
            )
            require(
                isinstance(value, str) and not any(c in value for c in "\r\n\0"),
                f"{path}.headers.{name}: a string without line breaks",
            )

    # Keep-alive connections to it (0: [pool] connections).
    connections: int = 0
    # CA certificates (PEM) its TLS certificate is verified against, instead of the
    # system's: a private CA. Verification is never off.
    ca_file: str = ""
    # One node behind this URL: reads pinned to its own head go by number (see defaults).
    head_by_number: bool = d.UPSTREAM_HEAD_BY_NUMBER


def check_upstreams(upstreams: list[UpstreamConfig]) -> None:
    """The ``[[upstreams]]`` list: at least one, each a URL, names unique (and given)."""
    require(
        bool(upstreams),
        "upstreams: at least one [[upstreams]] entry (or [[tree.parents]]) is needed",
    )
    for i, u in enumerate(upstreams):
        require(
            u.url.startswith(("http://", "https://", "ws://", "wss://")),
            f"upstreams[{i}].url: expected an http(s):// or ws(s):// URL",
        )
        u.check(i)
        require(u.connections >= 0, f"upstreams[{i}].connections: must be >= 0")
        if u.url.startswith(("http://", "https://")):
            try:
                http_target(u.url)
            except ValueError as exc:
                raise ConfigError(f"upstreams[{i}].url: {exc}") from None
        require(
            not u.ca_file or u.url.startswith("https://"),
            f"upstreams[{i}].ca_file: only for an https:// URL",
        )
        if not u.name:
            u.name = f"upstream{i}"
    names = [u.name for u in upstreams]
    require(len(set(names)) == len(names), "upstreams: names must be unique")


@dataclass
class NitroInputConfig:
    """One ``[[nitro.inputs]]`` entry: a Nitro feed this node follows (a sequencer's feed or
    Nitro's relay), as a Nitro node's ``--node.feed.input.url``."""

    url: str = ""


@dataclass
class NitroConfig:
    """``[nitro]``: Arbitrum's sequencer feed in Nitro's broadcast format (chainrelay/nitro).
    It travels the tree as the batch stream ``stream`` (named in ``[[batches.streams]]``,
    its sequencers the entry nodes' node keys). An entry node (``inputs``, ``batches.log``,
    ``tree.node_key``) follows the feed; every node that carries the stream serves it at
    ``listen`` in Nitro's own protocol."""

    stream: str = d.NITRO_STREAM
    listen: str = d.NITRO_LISTEN  # empty: no Nitro endpoint on this node
    inputs: list[NitroInputConfig] = field(default_factory=list)
    # Addresses whose feed signatures a message must carry (empty: not checked), as a
    # Nitro node's --node.feed.input.verify.allowed-addresses.
    allowed_signers: list[str] = field(default_factory=list)
    max_message_bytes: int = positive(d.NITRO_MAX_MESSAGE_BYTES)
    order_max_held: int = positive(d.NITRO_ORDER_MAX_HELD)
    order_max_held_bytes: int = positive(d.NITRO_ORDER_MAX_HELD_BYTES)
    gap_wait: float = positive(d.NITRO_GAP_WAIT)
    retry_delay: float = positive(d.NITRO_RETRY_DELAY)
    retry_max: float = positive(d.NITRO_RETRY_MAX)
    connect_timeout: float = positive(d.NITRO_CONNECT_TIMEOUT)
    max_connections_per_ip: int = positive(d.NITRO_MAX_CONNECTIONS_PER_IP)
    max_connections: int = positive(d.NITRO_MAX_CONNECTIONS)
    send_queue_messages: int = positive(d.NITRO_SEND_QUEUE_MESSAGES)
    send_timeout: float = positive(d.NITRO_SEND_TIMEOUT)
    write_buffer_bytes: int = positive(d.NITRO_WRITE_BUFFER_BYTES)
    recent_messages: int = positive(d.NITRO_RECENT_MESSAGES)
    range_page: int = positive(d.NITRO_RANGE_PAGE)
    range_cache_bytes: int = positive(d.NITRO_RANGE_CACHE_BYTES)
    range_loads: int = positive(d.NITRO_RANGE_LOADS)
    log_keep_messages: int = positive(d.NITRO_LOG_KEEP_MESSAGES)
    log_keep_seconds: float = positive(d.NITRO_LOG_KEEP_SECONDS)
    log_trim_interval: float = positive(d.NITRO_LOG_TRIM_INTERVAL)
    compression: bool = True  # Nitro's or the standard permessage-deflate, when offered

    def check(self, batch_streams: Collection[str], ingress: bool) -> None:
        """``batch_streams``: the node's batch streams; ``ingress``: it has a batch log."""
        check_fields(self, "nitro")
        if self.listen:
            parse_listen(self.listen, "nitro.listen")
        for i, inp in enumerate(self.inputs):
            require(
                inp.url.startswith(("ws://", "wss://")),
                f"nitro.inputs[{i}].url: expected a ws:// or wss:// URL",
            )
        for j, a in enumerate(self.allowed_signers):
            require(
                ADDRESS.fullmatch(a) is not None,
                f"nitro.allowed_signers[{j}]: expected a 0x-prefixed address",
            )
        if self.inputs:
            require(
                self.stream in batch_streams,
                f"nitro.stream: name {self.stream} in [[batches.streams]], its sequencers "
                "the entry nodes' node keys",
            )
            require(ingress, "nitro.inputs: an entry node keeps the feed in batches.log; set it")
        require(self.retry_delay <= self.retry_max, "nitro.retry_delay: above nitro.retry_max")
