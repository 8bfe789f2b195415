"""The app: builds a node's services from its config, starts them in order, stops them in
reverse order (collecting errors instead of stopping at the first)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson

from chainrelay.batches.ingress import Ingress, specs_of
from chainrelay.batches.log import BatchLog
from chainrelay.batches.ranges import BatchRange
from chainrelay.chain.follower import BlockFollower
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import ChainProfile, profile_for
from chainrelay.config import CacheConfig, Config, parse_listen
from chainrelay.errors import ChainRelayError
from chainrelay.metrics import Metrics
from chainrelay.rpc.cache import MemoryCache
from chainrelay.rpc.service import RpcService
from chainrelay.rpc.shared_cache import (
    REDIS_MODE_MEMORY_BYTES,
    RedisCache,
    RedisSettings,
    lock_scope,
)
from chainrelay.server.http import HttpServer, Routes
from chainrelay.server.peer import new_via_name
from chainrelay.subscriptions.filters import FilterService
from chainrelay.subscriptions.service import SubscriptionService
from chainrelay.tree.choice import Candidate
from chainrelay.tree.hub import FeedHub, HubLimits
from chainrelay.tree.intake import FeedSource
from chainrelay.tree.link import FeedLink
from chainrelay.tree.origin import Origin, load_signer
from chainrelay.tree.parents import ParentSet
from chainrelay.tree.session import Gap
from chainrelay.tree.streams import BatchStream
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import make_upstream

log = logging.getLogger(__name__)

# How long start() waits for a first head before serving without one.
FIRST_HEAD_TIMEOUT = 10.0


class Node:
    """One relay node. ``await node.start()``, serve, ``await node.stop()``."""

    def __init__(self, cfg: Config, *, via: str | None = None) -> None:
        """``via``: the node's name in Via headers, shared by a node's worker processes
        (one is made when not given)."""
        self.cfg = cfg
        self.metrics = Metrics()
        self._stack: list[Callable[[], Awaitable[None]]] = []
        self.pool: UpstreamPool | None = None
        self.head: HeadTracker | None = None
        self.rpc: RpcService | None = None
        self.server: HttpServer | None = None
        self.shared: RedisCache | None = None
        self.follower: BlockFollower | None = None
        self.filters: FilterService | None = None
        self.subscriptions: SubscriptionService | None = None
        self.profile: ChainProfile | None = None
        self.hub: FeedHub | None = None
        self.origin: Origin | None = None
        self.parents: ParentSet | None = None
        self.ingress: Ingress | None = None
        self.range: BatchRange | None = None
        self.chain_id = 0
        # This node's name in the Via header of what it forwards (loop detection).
        self.via = via or new_via_name()

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
        for u in upstreams:
            u.via = f"1.1 {self.via}"  # before start: an HTTP session sends it by default
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
            # A node whose upstreams are only its tree parents takes its heads from frames.
            # (Unless it trusts no block origin: a tree of batches alone brings no heads.)
            pushed_only=bool(cfg.tree.parents and cfg.tree.trust)
            and {u.url for u in cfg.upstreams} <= {p.rpc for p in cfg.tree.parents},
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
        tree = cfg.tree
        follow = "always" if sc.follow_blocks_always else sc.follow_blocks
        if tree.enabled and (tree.trust or tree.key or tree.key_file):
            follow = "always"  # every block of the tree warms this node's cache
        follower = self.follower = BlockFollower(
            pool,
            head,
            cache,
            self.metrics,
            window=cfg.head.reorg_window,
            follow=follow,
            follow_recent=sc.follow_recent_blocks,
            rpc_call=self.rpc.follower_call,
            fetch_retry_delay=cfg.subscriptions.feed_fetch_retry_delay,
            fetch_attempts=cfg.subscriptions.feed_fetch_attempts,
            block_passes=cfg.subscriptions.feed_block_passes,
            receipts_retry_blocks=cfg.subscriptions.feed_receipts_retry_blocks,
            pending_max_message=cfg.subscriptions.pending_max_message,
            offered_max_bytes=tree.offered_max_bytes,
        )
        self._stack.append(follower.stop)
        if tree.enabled or cfg.batches.streams:
            self._start_tree(profile.name, follower)
            await self._start_batches()
        await follower.start()
        filters = self.filters = FilterService(cfg.filters, follower, self.rpc.call, self.metrics)
        self._stack.append(filters.stop)
        await filters.start()
        self.rpc.filters = filters
        self.rpc.note_miss = follower.note_miss
        self.rpc.local_logs = follower.recent_logs
        subs = self.subscriptions = SubscriptionService(
            follower, self.metrics, cfg.subscriptions, filters=cfg.filters, ask=self.rpc.call
        )
        self._stack.append(subs.stop)
        server = self.server = HttpServer(
            Routes(
                self.rpc.handle,
                self.health,
                self.metrics.render,
                subs.open,
                replayer=self.rpc,
                feed=self.hub.open_child if self.hub is not None else None,
                batches=self.ingress,
                feed_range=self.range.serve if self.range is not None else None,
            ),
            cfg.limits,
            self.metrics,
            cfg.server.cors_origins,
            via=self.via,
        )
        host, port = parse_listen(cfg.server.listen)
        await server.start(host, port, reuse_port=reuse_port)
        self._stack.append(server.stop)
        if self.hub is not None:
            self._stack.append(self._close_children)
        if tree.parents:
            await self._link_parents()
        log.info(
            "serving chain %d (%s profile) on %s:%d with %d upstream(s), head %d",
            self.chain_id,
            profile.name,
            host,
            server.port,
            len(pool.upstreams),
            head.view.number,
        )

    def _start_tree(self, chain: str, follower: BlockFollower) -> None:
        """The hub, and this node's place in the tree: origin (a key), relay or leaf."""
        tree = self.cfg.tree
        assert self.head is not None and self.pool is not None
        signer = load_signer(tree)
        streams = tree.streams or [f"{chain}/blocks"]
        trust = {bytes.fromhex(a[2:]) for a in tree.trust}
        if signer is not None:
            trust.add(signer.address)
        hub = self.hub = FeedHub(
            streams,
            self.metrics,
            trust=trust,
            batches=specs_of(self.cfg.batches, self.chain_id),
            limits=HubLimits(
                backlog_frames=tree.backlog_frames,
                backlog_bytes=tree.backlog_bytes,
                child_queue_frames=tree.child_queue_frames,
                child_queue_bytes=tree.child_queue_bytes,
                child_buffer_bytes=tree.child_buffer_bytes,
                dedup_entries=tree.dedup_entries,
                max_frame_bytes=tree.max_frame_bytes,
                max_children=tree.max_children,
                stale_positions=tree.stale_positions,
                hello_timeout=tree.hello_timeout,
            ),
        )
        if signer is not None:
            self.origin = Origin(hub, follower, signer, streams[0])
            log.info("origin of %s as 0x%s", streams[0], signer.address.hex())
        if tree.parents:
            source = FeedSource(
                follower,
                self.head,
                self.pool,
                self.metrics,
                max_payload_bytes=tree.max_payload_bytes,
            )
            hub.listeners.append(source.on_frame)

    async def _start_batches(self) -> None:
        """Batch streams: the range endpoint on every node that carries them, and the
        ingress (durable log, pushes) on a node with ``[batches] log``."""
        cfg, hub = self.cfg, self.hub
        assert hub is not None
        self._stack.append(hub.stop)
        b = cfg.batches
        if not b.streams:
            return
        batch_log = None
        if b.log:
            batch_log = BatchLog(
                b.log,
                max_batches=b.commit_max_batches,
                max_bytes=b.commit_max_bytes,
                first_seqs={s.name: s.first_seq for s in b.streams},
            )
            ingress = self.ingress = Ingress(
                b,
                [st.spec for st in hub.streams.values() if isinstance(st, BatchStream)],
                batch_log,
                hub,
                self.metrics,
                {s.name: s.first_seq for s in b.streams},
            )
            self._stack.append(ingress.stop)
            await ingress.start()
        rng = self.range = BatchRange(
            hub,
            b,
            via=self.via,
            max_hops=cfg.limits.max_relay_hops,
            max_frame_bytes=cfg.tree.max_frame_bytes,
            parents=self._parent_urls,
            log_=batch_log,
        )
        self._stack.append(rng.stop)
        await rng.start()
        hub.fetch_range = rng.fetch

    def _parent_urls(self) -> list[str]:
        """The parents' HTTP endpoints: those linked now first, then the other candidates."""
        by_name = {p.name: p.rpc for p in self.cfg.tree.parents}
        linked = list(self.parents.parents) if self.parents is not None else []
        return [by_name[n] for n in linked] + [u for n, u in by_name.items() if n not in linked]

    async def _close_children(self) -> None:
        if self.hub is not None:
            self.hub.close_children()

    async def _link_parents(self) -> None:
        """Link to the nearest parents (after the server is up: children may come first)."""
        tree, hub = self.cfg.tree, self.hub
        assert hub is not None
        metrics = self.metrics
        parents = self.parents = ParentSet(
            [Candidate(p.name, p.url, p.region) for p in tree.parents],
            k=tree.parents_k,
            wants=lambda: hub.wants(tree.resume_last),
            on_frame=lambda link, raw: hub.accept(raw, link.name),
            on_gap=_log_gap,
            on_confirmed=lambda _link, stream, seq, sig: hub.confirm(stream, seq, sig),
            max_frame_bytes=tree.max_frame_bytes,
            connect_timeout=tree.connect_timeout,
            retry_delay=tree.retry_delay,
            retry_max=tree.retry_max,
            ping_interval=tree.ping_interval,
            node=self.via,
            probe_interval=tree.probe_interval,
            degrade_factor=tree.degrade_factor,
            min_gain=tree.min_gain,
            probe_urls={p.name: p.rpc for p in tree.parents},
            probe_timeout=tree.probe_timeout,
            probe_failures_down=tree.probe_failures_down,
            link_failures_down=tree.link_failures_down,
            down_hold=tree.down_hold,
            link_check_interval=tree.link_check_interval,
            stall_rounds=tree.stall_rounds,
            on_change=lambda names: metrics.feed_parents.set(len(names)),
        )
        self._stack.append(parents.stop)
        hub.on_held = self._tell_held
        await parents.start()

    def _tell_held(self, stream: str, position: int) -> None:
        """Every parent hears what this node holds (an ingress acknowledging only once
        relays hold a batch counts on it)."""
        if self.parents is not None:
            for link in self.parents.links.values():
                link.held(stream, position)

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
            "tree": self._tree_health(),
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

    def _tree_health(self) -> dict[str, object] | None:
        hub = self.hub
        if hub is None:
            return None
        return {
            "region": self.cfg.tree.region,
            "origin": self.origin is not None,
            "parents": list(self.parents.parents) if self.parents is not None else [],
            "children": len(hub.children),
            "streams": {name: st.newest for name, st in hub.streams.items()},
            "ingress": self.ingress is not None,
            "confirmed": {
                name: st.confirmed[0]
                for name, st in hub.streams.items()
                if isinstance(st, BatchStream) and st.confirmed is not None
            },
        }

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


def _log_gap(link: FeedLink, stream: str, gap: Gap) -> None:
    # The node itself needs nothing more: for blocks the head tracker links the next
    # frame's block back over the parent's JSON-RPC and the block follower fetches what it
    # skipped; for batches the hub holds what follows and fetches the missing ones from a
    # parent's range endpoint. Children see the jump and backfill the same ways.
    log.warning(
        "%s: positions %d-%d of %s are past its backlog; filled from its endpoints",
        link.name,
        gap.start,
        gap.end - 1,
        stream,
    )


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
