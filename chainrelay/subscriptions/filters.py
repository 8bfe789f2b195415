"""``eth_newFilter`` & co, answered by the node itself from its own block follower.

An upstream's filter id lives on that upstream only: after a failover, or behind a pool
that spreads polls over several upstreams, every poll would answer "filter not found".
So filters are installed here, in the node's filter table (``subscriptions/filtertable.py``), and
fed from the node's block follower, which follows whichever upstream is healthy.

Every call but ``eth_getFilterLogs`` is answered without I/O; that one asks the node's
own request pipeline for ``eth_getLogs`` over the filter's range, so it is cached there.

Filters are counted per client (``[filters] max_per_ip``, despite its name): under the
identity of the request being served (``access.identity.current_identity``), its API key
when it carries one, else its real address (a trusted proxy's header names it).
Pending-transaction filters are refused when no upstream can stream pending transactions
(only a WebSocket upstream can), rather than installed to stay empty forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from chainrelay.access.identity import current_identity
from chainrelay.config import FiltersConfig
from chainrelay.errors import FilterNotFound, InvalidParams, PendingUnavailable, RequestError
from chainrelay.metrics import Metrics
from chainrelay.rpc.logguards import LogGuards
from chainrelay.rpc.policy import HeadView
from chainrelay.subscriptions.filtertable import BlockLike, FilterKind, FilterTable, live_filter
from chainrelay.wire.jsonrpc import Answer

log = logging.getLogger(__name__)

# Idle filters are swept at this fraction of the idle timeout: a poll of an expired filter
# is refused at once anyway, the sweep only returns the memory of ones nobody polls.
SWEEP_FRACTION = 0.25
# ...and at least this often, so a long idle timeout still frees memory within a minute.
MAX_SWEEP_INTERVAL = 60.0


class BlockSource(Protocol):
    """The part of the block follower (``chain.follower``) the filters listen to."""

    def add_listener(self, fn: Callable[[list[Any]], None]) -> None: ...

    def remove_listener(self, fn: Callable[[list[Any]], None]) -> None: ...

    def add_pending_listener(self, fn: Callable[[str], None]) -> None: ...

    def remove_pending_listener(self, fn: Callable[[str], None]) -> None: ...


class WsUpstream(Protocol):
    @property
    def is_ws(self) -> bool: ...


class UpstreamSet(Protocol):
    """The upstream pool, as far as the filters ask it: which upstreams are WebSocket."""

    @property
    def upstreams(self) -> Sequence[WsUpstream]: ...


# One call through the node's own request pipeline (RpcService.call): cached, coalesced.
Ask = Callable[[str, list[Any]], Awaitable[Answer]]


def _error(exc: RequestError) -> Answer:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.data is not None:
        error["data"] = exc.data
    return Answer(None, orjson.dumps(error))


def _result(value: Any) -> Answer:
    return Answer(orjson.dumps(value), None, value)


def _params(params: Any, method: str, least: int, most: int) -> Sequence[Any]:
    if params is None:
        params = []
    if not isinstance(params, list):
        raise InvalidParams(f"{method}: params must be an array")
    if len(params) < least:
        raise InvalidParams(f"missing value for required argument {len(params)}")
    if len(params) > most:
        raise InvalidParams(f"too many arguments, want at most {most}")
    return params


def _filter_id(params: Any, method: str) -> str:
    (fid,) = _params(params, method, 1, 1)
    if not isinstance(fid, str):
        raise InvalidParams("invalid argument 0: filter id must be a hex string")
    return fid


class FilterService:
    """Owns the filter table; ``call`` answers the six filter methods."""

    def __init__(
        self,
        cfg: FiltersConfig,
        follower: BlockSource,
        ask: Ask,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        pool: UpstreamSet | None = None,
        guards: LogGuards | None = None,
        view: HeadView | None = None,
    ) -> None:
        """``guards``: the eth_getLogs guards (``[logs]``) a log filter is held to, at
        ``view``'s head (None: the pipeline's own, when it reads the filter's logs)."""
        self.table = FilterTable(
            idle_timeout=cfg.idle_timeout,
            max_filters=cfg.max_filters,
            max_changes=cfg.max_changes,
            max_per_owner=cfg.max_per_ip,
            max_changes_total=cfg.max_changes_total,
        )
        self.max_addresses = cfg.max_addresses
        self.guards = guards
        self.view = view if view is not None else HeadView()
        self.max_topics_per_position = cfg.max_topics_per_position
        # The follower's pending transactions come from an upstream's eth_subscribe, so only a
        # WebSocket upstream gives any; the pool is the follower's own unless one is given.
        self.pool: UpstreamSet | None = (
            pool if pool is not None else getattr(follower, "pool", None)
        )
        self.follower = follower
        self.ask = ask
        self.clock = clock
        self._sweep_every = min(cfg.idle_timeout * SWEEP_FRACTION, MAX_SWEEP_INTERVAL)
        self._sweeper: asyncio.Task[None] | None = None
        self._running = False
        # Listening costs the follower two upstream calls per block (the block, its receipts),
        # so the service listens only while a filter needs it.
        self._listening = False
        self._listening_pending = False
        self._collector = _FilterCollector(self.table)
        self._metrics = metrics
        self._handlers: dict[str, Callable[[Any], Answer | Awaitable[Answer]]] = {
            "eth_newFilter": self._new_filter,
            "eth_newBlockFilter": self._new_block_filter,
            "eth_newPendingTransactionFilter": self._new_pending_filter,
            "eth_getFilterChanges": self._changes,
            "eth_getFilterLogs": self._filter_logs,
            "eth_uninstallFilter": self._uninstall,
        }

    async def start(self) -> None:
        self._running = True
        self._metrics.registry.register(self._collector)
        self._sweeper = asyncio.create_task(self._sweep(), name="filters-sweep")

    async def stop(self) -> None:
        self._running = False
        self._listen()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        with contextlib.suppress(KeyError):
            self._metrics.registry.unregister(self._collector)

    # --- the follower (called synchronously, in order) -------------------------------------
    def _listen(self) -> None:
        """Listen to the follower exactly while installed filters need it; call after every
        change to the table's membership."""
        blocks = self._running and self.table.wants_blocks
        if blocks != self._listening:
            if blocks:
                self.follower.add_listener(self._on_blocks)
            else:
                self.follower.remove_listener(self._on_blocks)
            self._listening = blocks
        pending = self._running and self.table.wants_pending
        if pending != self._listening_pending:
            if pending:
                self.follower.add_pending_listener(self._on_pending)
            else:
                self.follower.remove_pending_listener(self._on_pending)
            self._listening_pending = pending

    def _on_blocks(self, events: list[BlockLike]) -> None:
        if self._running and self.table.on_blocks(events):
            self._relisten_soon()

    def _on_pending(self, tx_hash: str) -> None:
        if self._running and self.table.on_pending(tx_hash):
            self._relisten_soon()

    def _relisten_soon(self) -> None:
        """Filters expired inside a follower callback: stop listening if none needs it, once
        the follower's own call is over (unlistening from inside it would cancel its task)."""
        asyncio.get_running_loop().call_soon(self._listen)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every)
            gone = self.table.expire(self.clock())
            if gone:
                log.debug("%d idle filter(s) expired", len(gone))
                self._listen()

    # --- calls -----------------------------------------------------------------------------
    async def call(self, method: str, params: Any) -> Answer:
        """The answer to one filter method; a caller's mistake is an error answer, as geth's."""
        handler = self._handlers[method]
        try:
            got = handler(params)
            if not isinstance(got, Answer):
                got = await got
        except RequestError as exc:
            return _error(exc)
        finally:
            self._listen()  # an install, uninstall or expiry may change what is needed
        return got

    def _new_filter(self, params: Any) -> Answer:
        (obj,) = _params(params, "eth_newFilter", 1, 1)
        # Refused now, as the same eth_getLogs would be: its range and its reads would be.
        why = self._refusal(obj, "eth_newFilter")
        if why is not None:
            return Answer(None, why)
        criteria = live_filter(
            obj,
            max_addresses=self.max_addresses,
            max_topics_per_position=self.max_topics_per_position,
        )
        return _result(
            self.table.install(FilterKind.LOGS, criteria, self.clock(), current_identity().name)
        )

    def _new_block_filter(self, params: Any) -> Answer:
        _params(params, "eth_newBlockFilter", 0, 0)
        return _result(
            self.table.install(FilterKind.BLOCKS, None, self.clock(), current_identity().name)
        )

    def _new_pending_filter(self, params: Any) -> Answer:
        got = _params(params, "eth_newPendingTransactionFilter", 0, 1)
        if got and got[0] not in (None, False):
            # geth's fullTx flag: the follower carries hashes only.
            raise InvalidParams("full pending transactions are not supported, only hashes")
        if not self.pending_available:
            raise PendingUnavailable(
                "pending transactions are not available from this node's upstreams"
                " (they need a WebSocket upstream)"
            )
        return _result(
            self.table.install(FilterKind.PENDING, None, self.clock(), current_identity().name)
        )

    @property
    def pending_available(self) -> bool:
        """True when some upstream can stream pending transactions (a WebSocket one)."""
        pool = self.pool
        return pool is None or any(u.is_ws for u in pool.upstreams)

    def _changes(self, params: Any) -> Answer:
        fid = _filter_id(params, "eth_getFilterChanges")
        bound = self.guards.max_answer_bytes if self.guards is not None else None
        return Answer(self.table.poll_encoded(fid, self.clock(), bound), None)

    def _uninstall(self, params: Any) -> Answer:
        fid = _filter_id(params, "eth_uninstallFilter")
        return _result(self.table.uninstall(fid))

    async def _filter_logs(self, params: Any) -> Answer:
        fid = _filter_id(params, "eth_getFilterLogs")
        f = self.table.get(fid, self.clock())
        if f.criteria is None:
            raise FilterNotFound("filter not found")  # geth: only log filters have logs
        query = f.criteria.to_params()
        why = self._refusal(query, "eth_getFilterLogs")  # its range grows with the chain
        if why is not None:
            return Answer(None, why)
        return await self.ask("eth_getLogs", [query])

    def _refusal(self, query: Any, method: str) -> bytes | None:
        guards = self.guards
        return None if guards is None else guards.refusal([query], self.view, method)


class _FilterCollector(Collector):
    """The filter table's numbers, read when scraped."""

    def __init__(self, table: FilterTable) -> None:
        self.table = table

    def collect(self) -> Iterator[Metric]:
        t = self.table
        yield GaugeMetricFamily("chainrelay_filters", "Filters installed on this node", len(t))
        yield CounterMetricFamily(
            "chainrelay_filters_overflowed",
            "Filters expired because their change buffer filled up (polled too rarely)",
            t.overflowed_total,
        )
        yield CounterMetricFamily(
            "chainrelay_filters_expired", "Filters removed after idling", t.expired_total
        )
