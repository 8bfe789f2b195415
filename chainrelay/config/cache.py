"""``[cache]``: the memory LRU and, for the "redis" and "tiered" backends, the Redis tier
(chainrelay/rpc/shared_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass

from chainrelay import defaults as d
from chainrelay.config.checks import check_fields, positive, require

# "memory": this process only. "tiered": the memory LRU in front of a shared Redis.
# "redis": Redis, with only a minimal memory tier (defaults.REDIS_MODE_MEMORY_BYTES).
CACHE_BACKENDS = ("memory", "redis", "tiered")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass
class CacheConfig:
    backend: str = d.CACHE_BACKEND
    memory_bytes: int = positive(d.CACHE_MEMORY_BYTES)
    max_entry_bytes: int = positive(d.CACHE_MAX_ENTRY_BYTES)
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
            not self.redis_ttl_finalized < 0,
            "cache.redis_ttl_finalized: must be 0 (no TTL) or positive",
        )
        require(
            self.backend == "memory" or self.redis_url.startswith(REDIS_SCHEMES),
            f"cache.redis_url: expected a {', '.join(REDIS_SCHEMES)} URL, got {self.redis_url!r}",
        )
