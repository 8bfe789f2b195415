"""The app: composes a node from its config, one capability after another, and takes it
apart in reverse order, every stop running whatever the others raise (see composition.py).

Each capability is entered through the node's one ``Composition`` (an ``AsyncExitStack``),
and each service gets what it needs at construction. Three links close true cycles, where
each of two services calls the other: the pipeline and the block follower and filters, the
hub and the range endpoint, the hub and its parents. They are made in one place, the "Late
links" at the end of this module, before anything can use them.

Under ``serve --workers N`` each worker is a ``Node`` given its ``WorkerRole``
(``tree.siblings``): the feeder follows the chain, publishes every block on its private
listener and shares its head; the others link to it as tree children, take heads and
blocks from its frames and its finality from the shared head.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from chainrelay import defaults
from chainrelay.access.buckets import Costs, Limiter, TierRate
from chainrelay.access.configure import door_for
from chainrelay.access.identity import Identity
from chainrelay.access.methods import MethodRules, TierLists
from chainrelay.access.senders import SenderLimit
from chainrelay.access.sharedbuckets import SharedLimiter
from chainrelay.batches.ingress import Ingress, specs_of
from chainrelay.batches.log import BatchLog
from chainrelay.batches.ranges import BatchRange
from chainrelay.chain.follower import BlockFollower
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.locallogs import LocalLogs
from chainrelay.chain.logstore import LogStore
from chainrelay.chain.profiles import ChainProfile, profile_for
from chainrelay.collector import settle_startup_heap
from chainrelay.composition import Composition, on_leaving, running
from chainrelay.config import Config, load_keys, parse_listen
from chainrelay.errors import ConfigError
from chainrelay.looplag import LoopLag
from chainrelay.metrics import Metrics
from chainrelay.nitro.feedin import NitroFeedIn
from chainrelay.nitro.feedout import NitroServer
from chainrelay.rpc.cache import MemoryCache
from chainrelay.rpc.logguards import LogGuards
from chainrelay.rpc.logsplit import SplitRule
from chainrelay.rpc.service import RpcService
from chainrelay.rpc.shared_cache import RedisCache, lock_scope
from chainrelay.server.accesslog import AccessLog, LoggedHttpProtocol
from chainrelay.server.admin import (
    AdminProtocol,
    AdminRpc,
    KeyReload,
    WorkerAdmin,
    ask_worker,
    cordon_file,
    gather_metrics,
    load_cordoned,
    save_cordoned,
    worker_socket,
)
from chainrelay.server.compress import Compression
from chainrelay.server.http import HttpServer, Routes
from chainrelay.server.peer import new_via_name
from chainrelay.status.board import StatusBoard
from chainrelay.subscriptions.filters import FilterService
from chainrelay.subscriptions.service import SubscriptionService
from chainrelay.tree.auth import ChildKeys
from chainrelay.tree.choice import Candidate
from chainrelay.tree.hub import FeedHub, HubLimits
from chainrelay.tree.intake import FeedSource
from chainrelay.tree.link import FeedLink
from chainrelay.tree.origin import Origin, load_credentials, load_signer
from chainrelay.tree.parents import ParentSet
from chainrelay.tree.session import Gap
from chainrelay.tree.siblings import (
    FEEDER_NAME,
    FEEDER_URL,
    SiblingFeed,
    WorkerRole,
    origin_signer,
)
from chainrelay.tree.streams import BatchStream
from chainrelay.upstreams.make import make_upstream
from chainrelay.upstreams.pool import UpstreamPool

log = logging.getLogger(__name__)

# How long start() waits for a first head before serving without one.
FIRST_HEAD_TIMEOUT = 10.0


class Node:
    """One relay node. ``await node.start()``, serve, ``await node.stop()``."""

    def __init__(
        self, cfg: Config, *, via: str | None = None, worker: WorkerRole | None = None
    ) -> None:
        """``via``: the node's name in Via headers, shared by a node's worker processes
        (one is made when not given); ``worker``: this process's place among them."""
        self.cfg = cfg
        self.metrics = Metrics()
        self._composition = Composition()
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
        self.nitro_in: NitroFeedIn | None = None
        self.nitro_out: NitroServer | None = None
        self.worker = worker
        # Under workers: the feeder's private listener, or another worker's link to it.
        self.sibling_server: HttpServer | None = None
        self.sibling_link: FeedLink | None = None
        self.source: FeedSource | None = None  # blocks of the frames from parents
        # The node's own config makes it a tree node (or one carrying batch streams): its
        # hub serves /feed on the public port. Under workers every worker has a hub.
        self.in_tree = cfg.tree.enabled or bool(cfg.batches.streams)
        self.chain_id = 0
        # This node's name in the Via header of what it forwards (loop detection).
        self.via = via or new_via_name()
        # The admin JSON-RPC (served when [server] admin_listen names a port).
        self.admin = AdminRpc(self._cordon, self._uncordon, self.status)
        self.admin.reload_keys = self._reload_keys_everywhere
        self.admin_server: HttpServer | None = None

    async def start(self, *, reuse_port: bool = False) -> None:
        """Every capability in order; a failure stops what had started, then is raised."""
        try:
            await self._compose(reuse_port)
        except BaseException:
            await self.stop()
            raise

    async def _compose(self, reuse_port: bool) -> None:
        cfg = self.cfg
        await self._composition.enter(running(LoopLag(self.metrics)))
        pool = await self._upstreams()
        head = await self._head(pool)
        cache = await self._cache()
        limiter, senders = self._rate_limits()
        rpc = self.rpc = RpcService(
            cache,
            pool,
            head,
            self.metrics,
            self.chain_id,
            cfg.limits,
            shared=self.shared,
            methods=methods_of(cfg),
            log_guards=log_guards_of(cfg, head.profile),
            log_split=SplitRule(
                cfg.logs.split_blocks or head.profile.logs_split_blocks,
                cfg.logs.split_concurrency,
            ),
            tiers=cfg.tiers,
            limiter=limiter,
            senders=senders,
        )
        follower = await self._follower(pool, head, cache, rpc)
        filters = self.filters = await self._composition.enter(
            running(
                FilterService(
                    cfg.filters,
                    follower,
                    rpc.call,
                    self.metrics,
                    guards=rpc.log_guards,
                    view=rpc.view,
                )
            )
        )
        local_logs = LocalLogs(
            follower.logs,
            rpc.call,
            self.metrics,
            cfg.cache,
            cfg.filters,
            unheld=follower.note_unheld,
        )
        _link_rpc(rpc, filters, follower, local_logs)
        subs = self.subscriptions = SubscriptionService(
            follower, self.metrics, cfg.subscriptions, filters=cfg.filters, ask=rpc.call
        )
        await self._composition.enter(on_leaving(subs.stop))
        server = await self._server(rpc, subs, reuse_port)
        await self._admin_listener()
        if self.hub is not None:
            await self._composition.enter(on_leaving(self._close_children))
        worker = self.worker
        if worker is not None and worker.feeder:
            await self._serve_siblings(worker.feed)
        if worker is not None and not worker.feeder:
            await self._link_feeder(worker.feed)
        elif cfg.tree.parents:
            await self._link_parents()
        log.info(
            "serving chain %d (%s profile) on %s:%d with %d upstream(s), head %d",
            self.chain_id,
            head.profile.name,
            parse_listen(cfg.server.listen)[0],
            server.port,
            len(pool.upstreams),
            head.view.number,
        )

    async def _upstreams(self) -> UpstreamPool:
        """The pool, started, and the chain its upstreams serve."""
        cfg = self.cfg
        # Via before start: an HTTP upstream's session sends it by default.
        via = f"1.1 {self.via}"
        upstreams = [make_upstream(u, cfg.pool, via=via) for u in cfg.upstreams]
        pool = self.pool = await self._composition.enter(
            running(UpstreamPool(upstreams, cfg.pool, self.metrics))
        )
        self.chain_id = await pool.check_chain(cfg.chain.chain_id or None)
        if self.worker is not None and cfg.server.admin_listen:
            # Cordoned through the admin listener before this worker (re)started.
            for name in load_cordoned(cordon_file(self.worker.feed.directory)):
                pool.cordon(name)
        for u in pool.upstreams:
            self.metrics.upstream_healthy.labels(u.name).set(1)
        return pool

    async def _head(self, pool: UpstreamPool) -> HeadTracker:
        cfg = self.cfg
        profile = self.profile = profile_for(cfg.chain.profile or None, self.chain_id)
        tree = cfg.tree
        # A node whose upstreams are only its tree parents takes its heads from frames.
        # (Unless it trusts no block origin: a tree of batches alone brings no heads.)
        pushed_only = bool(tree.parents and tree.trust) and {u.url for u in cfg.upstreams} <= {
            p.rpc for p in tree.parents
        }
        # Under workers the feeder shares its head; every other worker takes its heads from
        # the feeder's frames, and reads the shared head.
        worker = self.worker
        share_to = shared = None
        if worker is not None and worker.feeder:
            share_to = worker.feed.head
        elif worker is not None:
            pushed_only, shared = True, worker.feed.head
        head = self.head = await self._composition.enter(
            running(
                HeadTracker(
                    pool,
                    profile,
                    self.metrics,
                    cfg.head,
                    pushed_only=pushed_only,
                    share_to=share_to,
                    shared=shared,
                    feeder_linked=self._feeder_linked if shared is not None else None,
                )
            )
        )
        if not await head.wait_ready(FIRST_HEAD_TIMEOUT):
            log.warning(
                "no head after %.0fs; serving, uncached until one arrives", FIRST_HEAD_TIMEOUT
            )
        return head

    async def _cache(self) -> MemoryCache:
        """The memory LRU, and the Redis tier behind it for the "redis"/"tiered" backends."""
        c = self.cfg.cache
        memory_bytes = c.memory_bytes
        if c.backend != "memory":
            scope = lock_scope([u.url for u in self.cfg.upstreams])
            shared = self.shared = RedisCache(c, self.chain_id, self.metrics, scope)
            await self._composition.enter(on_leaving(shared.close))
            await shared.start()  # an unreachable Redis is probed in the background
            if c.backend == "redis":
                memory_bytes = min(memory_bytes, defaults.REDIS_MODE_MEMORY_BYTES)
        return MemoryCache(memory_bytes, c.max_entry_bytes)

    def _rate_limits(self) -> tuple[Limiter | SharedLimiter | None, SenderLimit | None]:
        """The rate limits per identity and per sender, when a tier or the sender limit
        has a rate: in Redis when there is a shared tier (this process's buckets while it
        is down), else in this process."""
        cfg = self.cfg
        tiers = {
            name: TierRate(t.rate, t.burst, t.hit_cost_factor) for name, t in cfg.tiers.items()
        }
        lim = cfg.limits
        if not any(t.rate > 0 for t in tiers.values()) and lim.sender_rate <= 0:
            return None, None
        costs = Costs({**defaults.RATE_METHOD_COSTS, **lim.method_costs}, lim.default_cost)
        local = Limiter(tiers, costs, time.monotonic, lim.max_rate_buckets)
        limiter: Limiter | SharedLimiter = local
        if self.shared is not None:
            limiter = SharedLimiter(local, self.shared)
        senders = None
        if lim.sender_rate > 0:
            senders = SenderLimit(lim.sender_rate, lim.sender_burst, limiter)
        return (limiter if limiter.tiers else None), senders

    async def _follower(
        self, pool: UpstreamPool, head: HeadTracker, cache: MemoryCache, rpc: RpcService
    ) -> BlockFollower:
        """The block follower, started once the tree and batch streams built on it are in place
        (an origin listens before the first block); it stops after them."""
        cfg = self.cfg
        tree = cfg.tree
        sc = cfg.subscriptions
        if self.worker is not None or (tree.enabled and (tree.trust or tree.key or tree.key_file)):
            # Every block of the tree warms this node's cache. Under workers the feeder
            # publishes every block, and every other worker takes each into its cache.
            sc = dataclasses.replace(sc, follow_blocks_always=True)
        if self.worker is not None and not self.worker.feeder:
            # The recent window behind the first block is filled by the feeder alone (the
            # worker that follows the chain from the upstreams): every worker filling it
            # would ask the upstreams for it N times.
            sc = dataclasses.replace(sc, fill_window_blocks=0)
        follower = self.follower = BlockFollower(
            pool,
            head,
            cache,
            self.metrics,
            sc,
            window=cfg.head.reorg_window,
            offered_max_bytes=tree.offered_max_bytes,
            reads=rpc,
            logs=LogStore(head.view, cfg.cache.logs_bytes),
        )
        await self._composition.enter(on_leaving(follower.stop))
        if self.in_tree or self.worker is not None:
            hub = self._tree(head.profile.name, follower, head, pool)
            await self._composition.enter(on_leaving(hub.stop))
            await self._batches(hub)
        await follower.start()
        return follower

    def _tree(
        self, chain: str, follower: BlockFollower, head: HeadTracker, pool: UpstreamPool
    ) -> FeedHub:
        """The hub, and this node's place in the tree: origin (a key), relay or leaf.
        Under workers the feeder is the node's origin (see ``tree.siblings``), and every
        other worker a child of the feeder that trusts whoever signs the feeder's frames."""
        tree = self.cfg.tree
        worker = self.worker
        signer = load_signer(tree) if worker is None else None
        streams = tree.streams or [f"{chain}/blocks"]
        trust = {bytes.fromhex(a[2:]) for a in tree.trust}
        if worker is not None:
            feeder_signer = origin_signer(tree, worker.feed)
            if worker.feeder:
                signer = feeder_signer
            elif feeder_signer is not None:
                trust.add(feeder_signer.address)
        if signer is not None:
            trust.add(signer.address)
        # Blocks from the parents' frames go to the block follower, as if pushed upstream.
        source = self.source = (
            FeedSource(follower, head, pool, self.metrics, max_payload_bytes=tree.max_payload_bytes)
            if tree.parents or (worker is not None and not worker.feeder)
            else None
        )
        hub = self.hub = FeedHub(
            streams,
            self.metrics,
            trust=trust,
            batches=specs_of(self.cfg.batches, self.chain_id),
            limits=HubLimits.of(tree),
            listeners=[source.on_frame] if source is not None else (),
            child_keys=ChildKeys.of(tree.child_keys),
            name=self.via,
        )
        if worker is not None and worker.feeder:
            # Each head's header goes to the other workers as the feeder adopts it, before
            # its own newHeads subscribers get it (registered before any of theirs).
            follower.add_head_listener(hub.announce_head)
        if signer is not None:
            self.origin = Origin(hub, follower, signer, streams[0])
            if self.in_tree:
                log.info("origin of %s as 0x%s", streams[0], signer.address.hex())
        return hub

    async def _batches(self, hub: FeedHub) -> None:
        """Batch streams: the range endpoint on every node that carries them, and the
        ingress (durable log, pushes) on a node with ``[batches] log``."""
        cfg = self.cfg
        b = cfg.batches
        if not b.streams:
            return
        batch_log = None
        if b.log:
            batch_log = BatchLog(b)
            specs = [st.spec for st in hub.streams.values() if isinstance(st, BatchStream)]
            self.ingress = await self._composition.enter(
                running(Ingress(b, specs, batch_log, hub, self.metrics))
            )
        rng = self.range = await self._composition.enter(
            running(
                BatchRange(
                    hub,
                    b,
                    via=self.via,
                    max_hops=cfg.limits.max_relay_hops,
                    max_frame_bytes=cfg.tree.max_frame_bytes,
                    parents=self._parent_urls,
                    log_=batch_log,
                )
            )
        )
        _link_hub_range(hub, rng)
        await self._nitro(hub, rng)

    async def _nitro(self, hub: FeedHub, rng: BatchRange) -> None:
        """Nitro's sequencer feed, when the node carries its stream: followed from
        ``[[nitro.inputs]]`` at an entry node, served in Nitro's protocol at ``[nitro]
        listen``: under workers by every worker on the one port (each takes the stream's
        frames from the feeder, as every block)."""
        cfg = self.cfg
        n = cfg.nitro
        st = hub.streams.get(n.stream)
        if not isinstance(st, BatchStream):
            return
        if n.inputs and self.ingress is not None:
            signer = load_credentials(cfg.tree).signer
            if signer is None:
                raise ConfigError("nitro.inputs: the entry node signs with tree.node_key")
            self.nitro_in = await self._composition.enter(
                running(NitroFeedIn(n, st.spec, self.ingress, signer, self.metrics))
            )
        if n.listen:
            self.nitro_out = await self._composition.enter(
                running(
                    NitroServer(
                        n,
                        hub,
                        st.spec,
                        self.metrics,
                        read_range=lambda q: rng.serve(q, None),
                        max_frame_bytes=cfg.tree.max_frame_bytes,
                        reuse_port=self.worker is not None,
                    )
                )
            )

    async def _server(
        self, rpc: RpcService, subs: SubscriptionService, reuse_port: bool
    ) -> HttpServer:
        cfg = self.cfg
        # With an admin listener, the public port tells liveness alone and no metrics,
        # unless the operator wants them there too.
        admin = bool(cfg.server.admin_listen) and not cfg.server.public_metrics
        access = None
        if cfg.server.access_log:
            # Started before the server, so stopped after it: the last answers are logged.
            access = AccessLog(cfg.server, self.metrics, rpc.handle)
            await access.start()
            await self._composition.enter(on_leaving(access.stop))
            assert self.pool is not None
            access.watch(self.pool)
        server = self.server = HttpServer(
            Routes(
                rpc.handle if access is None else access.handle,
                self.liveness if admin else self.health,
                None if admin else self.metrics.render,
                subs.open,
                # With the access log on, every request takes the path that counts its
                # outcome (a replay is answered before anything could log it).
                replayer=rpc if access is None else None,
                feed=self.hub.open_child if self.hub is not None and self.in_tree else None,
                batches=self.ingress,
                feed_range=self.range.serve if self.range is not None else None,
            ),
            cfg.limits,
            self.metrics,
            cfg.server.cors_origins,
            via=self.via,
            request_id_max_bytes=cfg.server.request_id_max_bytes,
            protocol=None if access is None else LoggedHttpProtocol,
            access=access,
            compression=Compression(
                cfg.server.gzip_min_bytes, cfg.server.gzip_level, cfg.server.ws_deflate
            ),
            ipv6_prefix=cfg.server.ipv6_prefix,
            limiter=rpc.limiter,
            door=door_for(cfg, load_keys(cfg)),
            proxy_protocol=cfg.server.proxy_protocol,
            max_proxy_header_bytes=cfg.server.max_proxy_header_bytes,
        )
        host, port = parse_listen(cfg.server.listen)
        await _bind(
            server.start(host, port, reuse_port=reuse_port),
            "server.listen",
            (host, port),
            "give it a free HOST:PORT",
        )
        # Its stop is entered once it has started: a server that failed to bind has none.
        await self._composition.enter(on_leaving(server.stop))
        return server

    async def _admin_listener(self) -> None:
        """The admin listener, when configured: served by this process, or under workers
        by the feeder, every other worker serving its registry to the feeder instead."""
        s = self.cfg.server
        if not s.admin_listen:
            return
        worker = self.worker
        if worker is not None and not worker.feeder:
            pool = self.pool
            assert pool is not None
            own = WorkerAdmin(
                worker_socket(worker.feed.directory, worker.index),
                self.metrics.render,
                pool.cordon,
                pool.uncordon,
            )
            await own.start()
            await self._composition.enter(on_leaving(own.stop))
            return
        board = await self._composition.enter(
            running(StatusBoard(self, history=s.status_history, max_children=s.status_max_children))
        )
        server = self.admin_server = HttpServer(
            Routes(
                self.admin.handle,
                self.health,
                self.metrics.render if worker is None else self._workers_metrics,
                pages={b"/status": board.page, b"/status.json": board.json},
            ),
            self.cfg.limits,
            Metrics(),  # the node's metrics count its clients, not its operators
            [],  # no browser page is answered (see AdminProtocol)
            via=self.via,
            request_id_max_bytes=s.request_id_max_bytes,
            protocol=AdminProtocol,
        )
        host, port = parse_listen(s.admin_listen, "server.admin_listen")
        # Most often a second node on the host left at the default port.
        await _bind(
            server.start(host, port),
            "server.admin_listen",
            (host, port),
            'give each node on a host its own admin port, or "" to turn it off',
        )
        await self._composition.enter(on_leaving(server.stop))
        log.info("admin listener on %s:%d", host, server.port)

    async def _workers_metrics(self) -> bytes:
        """Every worker's metrics, summed (the feeder's admin listener, under workers)."""
        return await gather_metrics(
            self.metrics.render(),
            self._other_workers(),
            self.cfg.server.admin_scrape_timeout,
            self.metrics.worker_scrape_failures.inc,
        )

    def register_key_reload(self, hook: KeyReload) -> None:
        """The key table's reload, called by the admin ``chainrelay_reloadKeys``."""
        self.admin.reload_keys = hook

    def _other_workers(self) -> list[Path]:
        """The admin sockets of this node's other workers."""
        worker = self.worker
        assert worker is not None
        return [
            worker_socket(worker.feed.directory, i)
            for i in range(self.cfg.server.workers)
            if i != worker.index
        ]

    def _cordon(self, name: str) -> bool | Awaitable[bool]:
        return self._set_cordon(name, True)

    def _uncordon(self, name: str) -> bool | Awaitable[bool]:
        return self._set_cordon(name, False)

    def _set_cordon(self, name: str, on: bool) -> bool | Awaitable[bool]:
        """Cordon or uncordon ``name`` here; under workers, in every worker too, and kept
        in the supervisor's directory for a worker that starts later."""
        pool = self.pool
        if pool is None or not (pool.cordon(name) if on else pool.uncordon(name)):
            return False
        worker = self.worker
        if worker is None:
            return True
        save_cordoned(cordon_file(worker.feed.directory), pool.cordoned)
        return self._tell_workers((b"cordon " if on else b"uncordon ") + name.encode())

    async def _tell_workers(self, command: bytes) -> bool:
        timeout = self.cfg.server.admin_scrape_timeout
        others = self._other_workers()
        got = await asyncio.gather(*(ask_worker(p, command, timeout) for p in others))
        silent = sum(1 for g in got if g != b"true")
        if silent:
            # Restarting, or stuck: it reads the cordoned names when it starts.
            log.warning("%s: %d worker(s) did not confirm", command.decode(), silent)
        return True

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
            tree,
            wants=lambda: hub.wants(tree.resume_last),
            on_frame=lambda link, raw: hub.accept(raw, link.name),
            on_gap=_log_gap,
            on_confirmed=lambda _link, stream, seq, sig: hub.confirm(stream, seq, sig),
            node=self.via,
            credentials=load_credentials(tree),
            probe_urls={p.name: p.rpc for p in tree.parents},
            on_change=lambda names: metrics.feed_parents.set(len(names)),
        )
        _link_hub_parents(hub, self._tell_held)
        await self._composition.enter(running(parents))

    def _tell_held(self, stream: str, position: int) -> None:
        """Every parent hears what this node holds (an ingress acknowledging only once
        relays hold a batch counts on it)."""
        if self.parents is not None:
            for link in self.parents.links.values():
                link.held(stream, position)
        if self.sibling_link is not None:
            self.sibling_link.held(stream, position)

    def _feeder_linked(self) -> bool:
        link = self.sibling_link
        return link is not None and link.connected

    async def _serve_siblings(self, feed: SiblingFeed) -> None:
        """The feeder: the node's other workers' feed, on the private listener the
        supervisor made; nothing else is served there."""
        hub = self.hub
        assert hub is not None and feed.listener is not None
        server = self.sibling_server = HttpServer(
            Routes(_feed_only, None, None, feed=hub.open_sibling),
            self.cfg.limits,
            Metrics(),  # the node's metrics count its clients' connections, not its workers'
            via=self.via,
        )
        listener, feed.listener = feed.listener, None  # the server closes it when it stops
        await server.start_on(listener)
        await self._composition.enter(on_leaving(server.stop))

    async def _link_feeder(self, feed: SiblingFeed) -> None:
        """Another worker: a child of the feeder on its private listener, whatever parents
        the config names (the feeder links to those). Reconnected while the feeder is away;
        each session resumes after the last frame this worker took."""
        tree, hub, source = self.cfg.tree, self.hub, self.source
        assert hub is not None and source is not None
        link = self.sibling_link = FeedLink(
            FEEDER_URL,
            name=FEEDER_NAME,
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
            unix_path=feed.path,
            on_head=lambda _link, header: source.on_head(header),
        )
        _link_hub_parents(hub, self._tell_held)
        await self._composition.enter(running(link))

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def _ok(self) -> bool:
        head, pool = self.head, self.pool
        # Not while no upstream is in rotation (calls are refused then) or the head is stale.
        return bool(head and head.fresh and pool and pool.in_rotation)

    def liveness(self) -> tuple[int, bytes]:
        """The public /health while an admin listener serves the full one: 200 or 503,
        and nothing about the upstreams behind the node."""
        return (200, b'{"status":"ok"}') if self._ok() else (503, b'{"status":"degraded"}')

    def status(self) -> dict[str, object]:
        """The admin ``chainrelay_status``: role, chain, head, upstreams, cache."""
        head, pool, rpc = self.head, self.pool, self.rpc
        worker = self.worker
        tree = self.cfg.tree
        if self.origin is not None and self.in_tree:
            role = "origin"
        elif tree.parents:
            role = "relay" if self.in_tree else "leaf"
        else:
            role = "standalone"
        cache = rpc.cache if rpc is not None else None
        return {
            "role": role,
            "ingress": self.ingress is not None,
            "worker": None if worker is None else worker.index,
            "ok": self._ok(),
            "chainId": self.chain_id,
            "head": head.view.number if head else None,
            "finalized": head.view.finalized if head else None,
            "fresh": bool(head and head.fresh),
            "upstreams": [
                {
                    "name": u.name,
                    "state": "in" if pool is None else pool.state(u),
                    "latest": u.latest,
                    "latencyMs": round(u.latency * 1000, 3),
                    "calls": u.calls,
                    "errors": u.errors,
                }
                for u in (pool.upstreams if pool else [])
            ],
            "cache": None
            if cache is None
            else {
                "entries": len(cache),
                "bytes": cache.bytes,
                "maxBytes": cache.max_bytes,
                "evictions": cache.evictions,
            },
            "sharedCache": None if self.shared is None else ("up" if self.shared.up else "down"),
        }

    def health(self) -> tuple[int, bytes]:
        head, pool = self.head, self.pool
        ok = self._ok()
        body = {
            "status": "ok" if ok else "degraded",
            "chainId": self.chain_id,
            "head": head.view.number if head else None,
            "finalized": head.view.finalized if head else None,
            # Informational: a down Redis tier slows misses but never fails a request.
            "sharedCache": None if self.shared is None else ("up" if self.shared.up else "down"),
            "tree": self._tree_health(),
            "worker": self._worker_health(),
            "upstreams": [
                {
                    "name": u.name,
                    "healthy": u.healthy,
                    "latest": u.latest,
                    "latencyMs": round(u.latency * 1000, 3),
                    # Why its head is not used for latest (chain/quorum.py), or None.
                    "flagged": pool.head_flags.get(u.name) if pool else None,
                }
                for u in (pool.upstreams if pool else [])
            ],
        }
        return (200 if ok else 503), orjson.dumps(body)

    def _worker_health(self) -> dict[str, object] | None:
        """Under workers: which one answered, and whether it takes the feeder's frames."""
        worker = self.worker
        if worker is None:
            return None
        link = self.sibling_link
        return {
            "index": worker.index,
            "feeder": worker.feeder,
            "linked": None if link is None else link.connected,
        }

    def _tree_health(self) -> dict[str, object] | None:
        hub = self.hub
        if hub is None or not self.in_tree:
            return None
        return {
            "region": self.cfg.tree.region,
            "origin": self.origin is not None,
            "parents": list(self.parents.parents) if self.parents is not None else [],
            "children": len(hub.children) - len(hub.siblings),
            "streams": {name: st.newest for name, st in hub.streams.items()},
            "ingress": self.ingress is not None,
            "confirmed": {
                name: st.confirmed[0]
                for name, st in hub.streams.items()
                if isinstance(st, BatchStream) and st.confirmed is not None
            },
        }

    def reload_keys(self) -> dict[str, int]:
        """Read the API keys again (``[[auth.keys]]`` and ``auth.keys_file``): on SIGHUP,
        and for the admin call. Requests from now on are named by the new keys; a
        WebSocket session opened with a key no longer there is closed (1008). A file the
        node would refuse raises ``ConfigError`` and leaves the keys as they were."""
        keys = load_keys(self.cfg)
        if self.server is not None:
            self.server.set_door(door_for(self.cfg, keys))
        log.info("API keys read again: %d", len(keys))
        return {"keys": len(keys)}

    def _reload_keys_everywhere(self) -> dict[str, object]:
        """The admin ``chainrelay_reloadKeys``: the keys read again here (a file the node
        would refuse is the answer, and nothing changes), then, under workers, in every
        worker: the supervisor passes SIGHUP on to each, as for a ``kill -HUP``."""
        done: dict[str, object] = {"reloaded": True, **self.reload_keys()}
        if self.worker is not None:
            os.kill(os.getppid(), signal.SIGHUP)
            done["workers"] = self.cfg.server.workers
        return done

    def reload_keys_logged(self) -> None:
        """``reload_keys`` for a signal handler: a refused file is logged, not raised."""
        try:
            self.reload_keys()
        except ConfigError as exc:
            log.error("API keys not read again, the old ones stay: %s", exc)

    async def stop(self) -> None:
        """Stop what started, newest first. Every stop runs; their failures are raised
        together afterwards, as one ``StopFailed`` (an ``ExceptionGroup``)."""
        await self._composition.aclose()

    async def run_forever(self, stop: asyncio.Event, *, reuse_port: bool = False) -> None:
        await self.start(reuse_port=reuse_port)
        settle_startup_heap()
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


# What the feeder's private listener answers to anything but its feed.
_FEED_ONLY = (
    b'{"jsonrpc":"2.0","id":null,"error":{"code":-32601,'
    b'"message":"this listener serves only the feed of the node\'s workers"}}'
)


def _feed_only(_body: bytes, _who: Identity) -> bytes:
    return _FEED_ONLY


# --- Which calls are served ---------------------------------------------------------------
def methods_of(cfg: Config) -> MethodRules:
    """The allow lists of ``[methods]`` and every ``[tiers.<name>]``."""
    tiers = {n: TierLists(t.enable_methods, t.disable_methods) for n, t in cfg.tiers.items()}
    return MethodRules(cfg.methods.enable, cfg.methods.disable, tiers)


def log_guards_of(cfg: Config, profile: ChainProfile) -> LogGuards:
    """The eth_getLogs guards of ``[logs]``, the range the chain profile's when unset."""
    logs = cfg.logs
    return LogGuards(
        logs.max_block_range or profile.logs_max_block_range,
        logs.max_addresses,
        logs.max_topics_per_position,
        logs.max_answer_bytes,
    )


# --- Late links ----------------------------------------------------------------------------
# Each closes a cycle (either side calls the other, so one must exist before the other is
# told of it): an attribute set once, here, before anything can use it: before the server
# takes requests, and before the parents' links bring frames.


def _link_rpc(
    rpc: RpcService, filters: FilterService, follower: BlockFollower, local_logs: LocalLogs
) -> None:
    """The pipeline answers filter calls from the filter service, which asks the pipeline;
    tells the follower of misses (and of the blocks they name, to fill), while the follower
    fetches through the pipeline; answers eth_getLogs from the logs the node holds, which
    asks the pipeline for what it lacks."""
    rpc.filters = filters
    rpc.note_miss = follower.note_miss
    rpc.note_block_of = follower.fill
    rpc.local_logs = local_logs.answer


def _link_hub_range(hub: FeedHub, rng: BatchRange) -> None:
    """The hub fetches missing batches through the range endpoint, which serves the hub's."""
    hub.fetch_range = rng.fetch


def _link_hub_parents(hub: FeedHub, tell_held: Callable[[str, int], None]) -> None:
    """What the hub holds is told to the parents, whose frames go to the hub."""
    hub.on_held = tell_held


async def _bind(start: Awaitable[None], key: str, where: tuple[str, int], hint: str) -> None:
    """Await a listener's ``start``; a port that cannot be had (taken, not ours to bind,
    an address not on this host) is said as a config error naming ``key`` (exit 2), not
    a traceback."""
    try:
        await start
    except OSError as exc:
        host, port = where
        raise ConfigError(
            f"{key}: cannot listen on {host}:{port} ({exc.strerror or exc}); {hint}"
        ) from None
