"""The app: builds a node's services from its config, starts them in order, stops them in
reverse order (collecting errors instead of stopping at the first)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson

from chainrelay.config import CacheConfig, Config, parse_listen
from chainrelay.errors import ChainRelayError
from chainrelay.protocol.chains import ChainProfile, profile_for
from chainrelay.services.blocks import BlockFeed
from chainrelay.services.cache import MemoryCache
from chainrelay.services.filters import FilterService
from chainrelay.services.head import HeadTracker
from chainrelay.services.http import HttpServer, Routes
from chainrelay.services.metrics import Metrics
from chainrelay.services.pool import UpstreamPool
from chainrelay.services.rpc import RpcService
from chainrelay.services.shared_cache import (
    REDIS_MODE_MEMORY_BYTES,
    RedisCache,
    RedisSettings,
    lock_scope,
)
from chainrelay.services.subscriptions import SubscriptionService
from chainrelay.services.upstream import make_upstream

log = logging.getLogger(__name__)

# How long start() waits for a first head before serving without one.
FIRST_HEAD_TIMEOUT = 10.0


class Node:
    """One relay node. ``await node.start()``, serve, ``await node.stop()``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self._stack: list[Callable[[], Awaitable[None]]] = []
        self.pool: UpstreamPool | None = None
        self.head: HeadTracker | None = None
        self.rpc: RpcService | None = None
        self.server: HttpServer | None = None
        self.shared: RedisCache | None = None
        self.blocks: BlockFeed | None = None
        self.filters: FilterService | None = None
        self.subscriptions: SubscriptionService | None = None
        self.profile: ChainProfile | None = None
        self.chain_id = 0

    async def start(self, *, reuse_port: bool = False) -> None:
        try:
            await self._start(reuse_port)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, reuse_port: bool) -> None:
        cfg = self.cfg
        p = cfg.pool
        upstreams = [
            make_upstream(
                u.name,
                u.url,
                timeout=p.timeout,
                connections=p.connections,
                ws_ping_interval=p.ws_ping_interval,
                ws_max_message_bytes=p.ws_max_message_bytes,
            )
            for u in cfg.upstreams
        ]
        pool = self.pool = UpstreamPool(upstreams, p, self.metrics)
        self._stack.append(pool.stop)
        await pool.start()
        self.chain_id = await pool.check_chain(cfg.chain.chain_id or None)
        for u in pool.upstreams:
            self.metrics.upstream_healthy.labels(u.name).set(1)
        profile = self.profile = profile_for(cfg.chain.profile or None, self.chain_id)
        head = self.head = HeadTracker(
            pool,
            profile,
            self.metrics,
            window=cfg.head.reorg_window,
            backfill=cfg.head.backfill_blocks,
            finality_refresh_blocks=cfg.head.finality_refresh_blocks,
            fresh_blocks=cfg.head.fresh_blocks,
            poll={
                "lead": cfg.head.poll_lead,
                "near": cfg.head.poll_near,
                "alpha": cfg.head.interval_alpha,
                "min_factor": cfg.head.interval_min_factor,
                "max_factor": cfg.head.interval_max_factor,
                "backoff": cfg.head.poll_backoff,
                "min_interval": cfg.head.poll_min_interval,
                "max_interval": cfg.head.poll_max_interval,
                "probe_every": cfg.head.poll_probe_every,
            },
        )
        self._stack.append(head.stop)
        await head.start()
        if not await head.wait_ready(FIRST_HEAD_TIMEOUT):
            log.warning(
                "no head after %.0fs; serving, uncached until one arrives", FIRST_HEAD_TIMEOUT
            )
        c = cfg.cache
        memory_bytes = c.memory_bytes
        if c.backend != "memory":
            scope = lock_scope([u.url for u in cfg.upstreams])
            shared = RedisCache(redis_settings(c), self.chain_id, self.metrics, scope)
            self.shared = shared
            self._stack.append(shared.close)
            await shared.start()  # an unreachable Redis is probed in the background
            if c.backend == "redis":
                memory_bytes = min(memory_bytes, REDIS_MODE_MEMORY_BYTES)
        cache = MemoryCache(memory_bytes, c.max_entry_bytes)
        self.rpc = RpcService(
            cache,
            pool,
            head,
            self.metrics,
            self.chain_id,
            max_batch_len=cfg.limits.max_batch_len,
            shared=self.shared,
            max_hit_table_bytes=cfg.limits.max_hit_table_bytes,
            max_hit_table_entries=cfg.limits.max_hit_table_entries,
            memo_max_params_bytes=cfg.limits.memo_max_params_bytes,
        )
        sc = cfg.subscriptions
        blocks = self.blocks = BlockFeed(
            pool,
            head,
            cache,
            self.metrics,
            window=cfg.head.reorg_window,
            follow="always" if sc.follow_blocks_always else sc.follow_blocks,
            follow_recent=sc.follow_recent_blocks,
            feed_call=self.rpc.feed_call,
            fetch_retry_delay=cfg.subscriptions.feed_fetch_retry_delay,
            fetch_attempts=cfg.subscriptions.feed_fetch_attempts,
            block_passes=cfg.subscriptions.feed_block_passes,
            receipts_retry_blocks=cfg.subscriptions.feed_receipts_retry_blocks,
            pending_max_message=cfg.subscriptions.pending_max_message,
        )
        self._stack.append(blocks.stop)
        await blocks.start()
        filters = self.filters = FilterService(cfg.filters, blocks, self.rpc.call, self.metrics)
        self._stack.append(filters.stop)
        await filters.start()
        self.rpc.filters = filters
        self.rpc.note_miss = blocks.note_miss
        subs = self.subscriptions = SubscriptionService(
            blocks, self.metrics, cfg.subscriptions, filters=cfg.filters, ask=self.rpc.call
        )
        self._stack.append(subs.stop)
        server = self.server = HttpServer(
            Routes(self.rpc.handle, self.health, self.metrics.render, subs.open, replayer=self.rpc),
            cfg.limits,
            self.metrics,
            cfg.server.cors_origins,
        )
        host, port = parse_listen(cfg.server.listen)
        await server.start(host, port, reuse_port=reuse_port)
        self._stack.append(server.stop)
        log.info(
            "serving chain %d (%s profile) on %s:%d with %d upstream(s), head %d",
            self.chain_id,
            profile.name,
            host,
            server.port,
            len(pool.upstreams),
            head.view.number,
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def health(self) -> tuple[int, bytes]:
        head, pool = self.head, self.pool
        ok = bool(head and head.fresh and pool and any(u.healthy for u in pool.upstreams))
        body = {
            "status": "ok" if ok else "degraded",
            "chainId": self.chain_id,
            "head": head.view.number if head else None,
            "finalized": head.view.finalized if head else None,
            # Informational: a down Redis tier slows misses but never fails a request.
            "sharedCache": None if self.shared is None else ("up" if self.shared.up else "down"),
            "upstreams": [
                {
                    "name": u.name,
                    "healthy": u.healthy,
                    "latest": u.latest,
                    "latencyMs": round(u.latency * 1000, 3),
                }
                for u in (pool.upstreams if pool else [])
            ],
        }
        return (200 if ok else 503), orjson.dumps(body)

    async def stop(self) -> None:
        errors: list[BaseException] = []
        while self._stack:
            stop = self._stack.pop()
            try:
                await stop()
            except Exception as exc:  # keep stopping the rest
                errors.append(exc)
        if errors:
            raise ChainRelayError(f"errors while stopping: {errors!r}")

    async def run_forever(self, stop: asyncio.Event, *, reuse_port: bool = False) -> None:
        await self.start(reuse_port=reuse_port)
        try:
            await stop.wait()
        finally:
            await self.stop()


def redis_settings(c: CacheConfig) -> RedisSettings:
    return RedisSettings(
        url=c.redis_url,
        key_prefix=c.redis_key_prefix,
        max_entry_bytes=c.redis_max_entry_bytes,
        ttl_finalized=c.redis_ttl_finalized,
        ttl_unfinalized=c.redis_ttl_unfinalized,
        lock_ttl=c.redis_lock_ttl,
        timeout=c.redis_timeout,
        connect_timeout=c.redis_connect_timeout,
        retry_interval=c.redis_retry_interval,
        max_connections=c.redis_max_connections,
    )
