"""eth_subscribe over WebSocket: every subscription of the node served from one block follower.

The node holds no subscription upstream per client: ``newHeads`` and ``logs`` come from the
``BlockFollower`` (one head stream and one fetch per block for the whole node), logs matched
locally with ``LogFilter``; ``newPendingTransactions`` from the follower's single upstream
pending stream. ``syncing`` is accepted and stays silent: a relay serves its followed head,
so, to its clients, it never starts or stops syncing.

newHeads go out as soon as the head tracker adopts a pushed header (the follower's head
listener), ahead of the block's fetch; logs follow with the fetched block. A head the follower
could not announce early comes with its block, as before.

Fan-out invariant: a block's notifications are written by one synchronous pass over the
subscribers; each result is encoded once per block (or log, or transaction) into a frame
template spliced with each subscription id; a connection's frames of one block go out in
one write (a newHeads-only connection's at once, the others' at the end of the pass); a
slow reader is closed by its own send bound, never waited on. Which logs filters a log is
matched against, the order of a reorg's logs and the frames held for a subscription not
yet announced are decided in ``subscriptions.fanout``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from chainrelay.chain.events import BlockEvent
from chainrelay.chain.follower import BlockFollower
from chainrelay.config import FiltersConfig, SubscriptionsConfig
from chainrelay.errors import (
    InvalidParams,
    LimitExceeded,
    PendingUnavailable,
    RequestError,
    SubscriptionNotFound,
)
from chainrelay.metrics import Metrics
from chainrelay.server.ws import WsSession
from chainrelay.subscriptions import registry as proto
from chainrelay.subscriptions.fanout import Held, HeldNotifications, LogRoutes, geth_order
from chainrelay.subscriptions.logfilter import LogFilter
from chainrelay.wire.jsonrpc import Answer

log = logging.getLogger(__name__)
_TRUE = b"true"
_FALSE = b"false"
_NULL = b"null"
# Internal kind of newPendingTransactions with geth's fullTx flag (counted as the kind).
_PENDING_FULL = proto.PENDING + "/full"
Ask = Callable[[str, Any], Awaitable[Answer]]
# Close code for a connection past its held-notification bound: "policy violation"
# (RFC 6455, 1008), with a reason saying which.
CLOSE_POLICY_VIOLATION = 1008
HELD_OVERFLOW_REASON = "too many notifications held for subscriptions not yet answered"


def _error(exc: RequestError) -> Answer:
    return Answer(None, orjson.dumps({"code": exc.code, "message": exc.message}))


class SubscriptionService:
    """Subscriptions of every WebSocket connection of the node, and their fan-out."""

    def __init__(
        self,
        follower: BlockFollower,
        metrics: Metrics,
        cfg: SubscriptionsConfig | None = None,
        random: Callable[[int], bytes] = os.urandom,
        filters: FiltersConfig | None = None,
        ask: Ask | None = None,
    ) -> None:
        self.follower = follower
        self.metrics = metrics
        self.cfg = cfg or SubscriptionsConfig()
        # A logs subscription's filter takes the node's filter bounds, like eth_newFilter.
        self.filters_cfg = filters or FiltersConfig()
        self._random = random
        # Pending transactions come from an upstream's eth_subscribe: only a WebSocket
        # upstream gives any (the filters code asks the same of the follower's pool).
        self.pool: Any = getattr(follower, "pool", None)
        # Reads through the node's pipeline: a full pending transaction is fetched once per
        # hash for all its subscribers. None: full transactions are refused.
        self._ask = ask
        self._fetches: set[asyncio.Task[None]] = set()
        # subscription id (ASCII bytes) -> its connection, by kind
        self._heads: dict[bytes, Connection] = {}
        self._logs: dict[bytes, tuple[Connection, LogFilter]] = {}
        # logs subscriptions grouped by filter and indexed (see ``LogRoutes``).
        self.routes: LogRoutes[Connection] = LogRoutes()
        # client address -> its logs subscriptions by filter (distinct filters per address)
        self._log_filters_by_ip: dict[str, collections.Counter[LogFilter]] = {}
        self._pending: dict[bytes, Connection] = {}
        self._pending_full: dict[bytes, Connection] = {}
        self._syncing: dict[bytes, Connection] = {}
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.total = 0
        self._following_blocks = False
        # Connections with frames queued in the pass under way, written at its end.
        self._dirty: list[Connection] = []
        self._following_pending = False
        self._gauges = {k: metrics.subscriptions.labels(k) for k in proto.KINDS}
        self._sent = {k: metrics.notifications.labels(k) for k in proto.KINDS}
        self._gauges[_PENDING_FULL] = self._gauges[proto.PENDING]

    def open(self, session: WsSession) -> Connection:
        """The subscriptions of a newly upgraded WebSocket connection, counted under its
        identity (``max_per_ip``, ``max_log_filters_per_ip``): the API key its upgrade
        carried, else its client's real address (a trusted proxy's header or PROXY line
        names it); the socket's peer only for a session that knows no identity."""
        name = session.who.name
        if not name:
            peer = session.transport.get_extra_info("peername")
            name = peer[0] if peer else ""
        return Connection(self, session, name)

    async def stop(self) -> None:
        for task in self._fetches:
            task.cancel()
        # Each table is read again after the ones before it closed their connections.
        tables: tuple[dict[bytes, Any], ...] = (
            self._heads,
            self._logs,
            self._pending,
            self._pending_full,
            self._syncing,
        )
        for table in tables:
            for entry in list(table.values()):
                conn = entry[0] if isinstance(entry, tuple) else entry
                conn.closed(False)
        self.update_listeners()

    # --- bookkeeping -----------------------------------------------------------------
    def _table(self, kind: str) -> dict[bytes, Any]:
        if kind == proto.NEW_HEADS:
            return self._heads
        if kind == proto.LOGS:
            return self._logs
        if kind == proto.PENDING:
            return self._pending
        if kind == _PENDING_FULL:
            return self._pending_full
        return self._syncing

    def register(self, conn: Connection, req: proto.SubscribeRequest) -> bytes:
        """A new subscription of ``conn``; raises ``LimitExceeded`` past a limit."""
        cfg = self.cfg
        if len(conn.subs) >= cfg.max_per_connection:
            raise LimitExceeded(
                f"limit exceeded: at most {cfg.max_per_connection} subscriptions per connection"
            )
        if self.per_ip[conn.ip] >= cfg.max_per_ip:
            raise LimitExceeded(
                f"limit exceeded: at most {cfg.max_per_ip} subscriptions per client"
                " (its API key, or its address)"
            )
        if self.total >= cfg.max_total:
            raise LimitExceeded("limit exceeded: this node holds all the subscriptions it can")
        if req.kind == proto.PENDING and not self.pending_available:
            raise PendingUnavailable(
                "pending transactions are not available from this node's upstreams"
                " (they need a WebSocket upstream)"
            )
        if req.full and self._ask is None:
            raise InvalidParams("full pending transactions are not served here, only hashes")
        kind = _PENDING_FULL if req.full else req.kind
        if req.kind == proto.LOGS:
            assert req.filter is not None
            self._check_log_filter(conn.ip, req.filter)
        sub_id = proto.new_id(self._random(proto.ID_BYTES)).encode()
        while sub_id in self._table(kind):
            sub_id = proto.new_id(self._random(proto.ID_BYTES)).encode()
        if req.kind == proto.LOGS:
            assert req.filter is not None
            self._logs[sub_id] = (conn, req.filter)
            self.routes.add(req.filter, sub_id, conn)
            self._log_filters_by_ip.setdefault(conn.ip, collections.Counter())[req.filter] += 1
        else:
            self._table(kind)[sub_id] = conn
        conn.subs[sub_id] = kind
        self.per_ip[conn.ip] += 1
        self.total += 1
        self._gauges[kind].inc()
        self.update_listeners()
        return sub_id

    def _check_log_filter(self, ip: str, flt: LogFilter) -> None:
        """Refuse a new distinct filter past the node's or the address's bound: matching
        work grows with distinct filters, not with subscribers sharing one."""
        cfg = self.cfg
        mine = self._log_filters_by_ip.get(ip)
        if mine is not None and flt in mine:
            return
        if mine is not None and len(mine) >= cfg.max_log_filters_per_ip:
            raise LimitExceeded(
                f"limit exceeded: at most {cfg.max_log_filters_per_ip} distinct logs filters"
                " per client (its API key, or its address)"
            )
        if flt not in self.routes.groups and len(self.routes.groups) >= cfg.max_log_filters:
            raise LimitExceeded(
                "limit exceeded: this node matches all the distinct logs filters it can"
            )

    @property
    def pending_available(self) -> bool:
        """True when some upstream can stream pending transactions (a WebSocket one)."""
        pool = self.pool
        return pool is None or any(u.is_ws for u in pool.upstreams)

    def parse(self, params: Any) -> proto.SubscribeRequest:
        """An ``eth_subscribe``'s params, a logs filter within the node's filter bounds."""
        f = self.filters_cfg
        return proto.parse_subscribe(
            params, max_addresses=f.max_addresses, max_topics_per_position=f.max_topics_per_position
        )

    def unregister(self, conn: Connection, sub_id: bytes) -> bool:
        """Cancel one subscription of ``conn``; False when it holds no such id."""
        kind = conn.subs.pop(sub_id, None)
        if kind is None:
            return False
        entry = self._table(kind).pop(sub_id, None)
        if kind == proto.LOGS and entry is not None:
            flt = entry[1]
            self.routes.remove(flt, sub_id)
            mine = self._log_filters_by_ip[conn.ip]
            mine[flt] -= 1
            if mine[flt] <= 0:
                del mine[flt]
                if not mine:
                    del self._log_filters_by_ip[conn.ip]
        self.per_ip[conn.ip] -= 1
        if self.per_ip[conn.ip] <= 0:
            del self.per_ip[conn.ip]
        self.total -= 1
        self._gauges[kind].dec()
        return True

    def update_listeners(self) -> None:
        """Listen to the follower only while a subscription needs it."""
        want_blocks = bool(self._heads or self._logs)
        if want_blocks != self._following_blocks:
            self._following_blocks = want_blocks
            if want_blocks:
                self.follower.add_head_listener(self._on_head)
                self.follower.add_listener(self._on_blocks)
            else:
                self.follower.remove_listener(self._on_blocks)
                self.follower.remove_head_listener(self._on_head)
        want_pending = bool(self._pending or self._pending_full)
        if want_pending != self._following_pending:
            self._following_pending = want_pending
            if want_pending:
                self.follower.add_pending_listener(self._on_pending)
            else:
                self.follower.remove_pending_listener(self._on_pending)

    # --- fan-out ---------------------------------------------------------------------
    def _on_head(self, header: dict[str, Any]) -> None:
        if self._heads:
            self._sent[proto.NEW_HEADS].inc(self._fan_out_head(header))
            self._write_out()

    def _on_blocks(self, events: list[BlockEvent]) -> None:
        # geth's order (``geth_order``): logs of removed blocks, oldest block first and
        # each block's logs in log-index order, then the new blocks, each announced by
        # newHeads with its logs (a head announced early has had its newHeads already).
        heads_sent = logs_sent = 0
        for ev in geth_order(events):
            if not ev.removed and not ev.announced and self._heads:
                heads_sent += self._fan_out_head(ev.header)
            if self._logs and ev.logs:
                logs_sent += self._fan_out_logs(ev.logs)
        self._write_out()
        if heads_sent:
            self._sent[proto.NEW_HEADS].inc(heads_sent)
        if logs_sent:
            self._sent[proto.LOGS].inc(logs_sent)

    def _fan_out_head(self, header: dict[str, Any]) -> int:
        frame = proto.NotificationFrames(orjson.dumps(header)).frame
        subs = list(self._heads.items())
        for sub_id, conn in subs:
            if len(conn.subs) == 1 and not conn.held and not conn.overflowed:
                # Its only subscription, one frame per block: written now, not at the end
                # of the pass, so the first subscribers do not wait for the last frame.
                conn.session.send_frames(frame(sub_id))
            else:
                conn.notify(sub_id, frame(sub_id))
        return len(subs)

    def _fan_out_logs(self, logs: list[dict[str, Any]]) -> int:
        # Nothing unsubscribes during the pass (a connection past a bound is closed at its
        # end, in ``_write_out``), so the groups are walked as they are.
        sent = 0
        route = self.routes.route
        for log in logs:
            groups = route(log)
            if not groups:
                continue
            frame = proto.NotificationFrames(orjson.dumps(log)).frame
            for members in groups:
                for sub_id, conn in members.items():
                    conn.notify(sub_id, frame(sub_id))
                sent += len(members)
        return sent

    def _on_pending(self, tx_hash: str) -> None:
        if self._pending_full:
            self._fetch_full(tx_hash)
        if not self._pending:
            return
        self._fan_out_pending(orjson.dumps(tx_hash), self._pending)

    def _fan_out_pending(self, result: bytes, table: dict[bytes, Connection]) -> None:
        frame = proto.NotificationFrames(result).frame
        subs = list(table.items())
        for sub_id, conn in subs:
            conn.notify(sub_id, frame(sub_id))
        self._write_out()
        if subs:
            self._sent[proto.PENDING].inc(len(subs))

    def _fetch_full(self, tx_hash: str) -> None:
        """Fetch one pending transaction for every fullTx subscriber at once; past the
        bound of fetches under way the hash is skipped and counted, never queued."""
        if len(self._fetches) >= self.cfg.pending_tx_fetches:
            self.metrics.pending_tx_skipped.inc()
            return
        task = asyncio.get_running_loop().create_task(self._send_full(tx_hash))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _send_full(self, tx_hash: str) -> None:
        assert self._ask is not None
        try:
            answer = await self._ask("eth_getTransactionByHash", [tx_hash])
        except Exception as exc:  # an upstream error costs this one transaction only
            log.info("pending transaction %s not fetched: %s", tx_hash, exc)
            self.metrics.pending_tx_skipped.inc()
            return
        # null: mined or dropped before it could be read; an error: not readable now.
        if answer.result is None or answer.result == _NULL:
            self.metrics.pending_tx_skipped.inc()
            return
        if self._pending_full:
            self._fan_out_pending(answer.result, self._pending_full)

    def _write_out(self) -> None:
        """End of a pass: each connection's queued frames in one write (one syscall); a
        connection past its held-notification bound is closed instead."""
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            out, conn.out = conn.out, b""
            if conn.overflowed:
                self.metrics.held_overflows.inc()
                conn.session.close_now(CLOSE_POLICY_VIOLATION, HELD_OVERFLOW_REASON)
            else:
                conn.session.send_frames(out)


class Connection:
    """The subscriptions of one WebSocket connection (see ``ws.Subscriptions``)."""

    def __init__(self, service: SubscriptionService, session: WsSession, ip: str) -> None:
        self.service = service
        self.session = session
        self.ip = ip
        self.subs: dict[bytes, str] = {}
        # Subscriptions whose id is not yet with the client, and the frames they would have
        # sent: a notification must never reach a client before the answer naming its id.
        cfg = service.cfg
        self.held = HeldNotifications(cfg.max_held_notifications, cfg.max_held_bytes)
        self.overflowed = False  # past the held bound: closed at the end of the pass
        self._closed = False
        # Frames of the fan-out pass under way, written by the service at the pass's end.
        self.out = b""

    def call(self, method: str, params: Any) -> Answer:
        if self._closed:  # a call still in flight as its connection closed
            return Answer(_FALSE, None)
        try:
            if method == "eth_unsubscribe":
                sub_id = proto.parse_unsubscribe(params).encode()
                self.held.forget(sub_id)
                if not self.service.unregister(self, sub_id):
                    # geth's answer (BSC runs geth); anvil answers false instead.
                    raise SubscriptionNotFound("subscription not found")
                self.service.update_listeners()
                return Answer(_TRUE, None)
            req = self.service.parse(params)
            sub_id = self.service.register(self, req)
        except RequestError as exc:
            return _error(exc)
        self.held.wait(sub_id)
        return Answer(b'"' + sub_id + b'"', None)

    def notify(self, sub_id: bytes, frame: bytes) -> None:
        """Queue one notification frame for the end of the fan-out pass."""
        if self.held:
            verdict = self.held.hold(sub_id, frame)
            if verdict is Held.HELD:
                return
            if verdict is Held.OVERFLOW:
                if not self.overflowed:
                    self.overflowed = True
                    self.held.clear()
                    if not self.out:
                        self.service._dirty.append(self)
                    self.out = b""
                return
        if self.overflowed:
            return
        if self.out:
            self.out += frame
        else:
            self.out = frame
            self.service._dirty.append(self)

    def answered(self, payload: bytes) -> None:
        if not self.held:
            return
        frames = self.held.announced(payload)
        if frames:
            self.session.send_frames(frames)

    def closed(self, slow: bool) -> None:
        if self._closed:
            return
        self._closed = True
        svc = self.service
        for sub_id in list(self.subs):
            svc.unregister(self, sub_id)
        self.held.clear()
        svc.update_listeners()
        if slow:
            svc.metrics.slow_subscribers.inc()
            # The reader may never take its close frame: drop it after a grace period.
            asyncio.get_running_loop().call_later(svc.cfg.slow_close_grace, self.session.abort)
