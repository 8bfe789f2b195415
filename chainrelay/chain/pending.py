"""Pending transaction hashes for the node's listeners, from one
``eth_subscribe("newPendingTransactions")`` on a WebSocket upstream, held while anyone
listens, reconnected with a growing back-off when it breaks or answers garbage. With no
WebSocket upstream there is no such stream (``available`` is False).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import orjson
import websockets

from chainrelay import defaults
from chainrelay.metrics import Metrics
from chainrelay.server.peer import detached
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import Upstream

log = logging.getLogger(__name__)

# First back-off after the pending-transaction stream of a WebSocket upstream broke; it
# doubles with each failure in a row up to PENDING_RETRY_MAX, so a broken upstream is not
# hammered and a blip costs a second.
PENDING_RETRY_DELAY = 1.0
# Longest back-off of the pending stream: ten BSC blocks of pending hashes at most missed.
PENDING_RETRY_MAX = 30.0

PendingListener = Callable[[str], None]


class PendingStream:
    def __init__(
        self,
        pool: UpstreamPool,
        metrics: Metrics,
        *,
        max_message: int = defaults.PENDING_MAX_MESSAGE,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.max_message = max_message
        self._listeners: list[PendingListener] = []
        self._task: asyncio.Task[None] | None = None
        self._started = False

    @property
    def available(self) -> bool:
        """Whether pending transactions can be followed: only a WebSocket upstream has
        the stream."""
        return any(u.is_ws for u in self.pool.upstreams)

    def add_listener(self, fn: PendingListener) -> None:
        """Call ``fn`` with each pending transaction hash the upstream stream reports."""
        self._listeners.append(fn)
        if self._started and (self._task is None or self._task.done()):
            self._task = detached(self._follow(), name="pending")

    def remove_listener(self, fn: PendingListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)
        if not self._listeners and self._task is not None:
            self._task.cancel()
            self._task = None

    def start(self) -> None:
        self._started = True
        if self._listeners:
            self._task = detached(self._follow(), name="pending")

    def stop(self) -> asyncio.Task[None] | None:
        """Stop following; the cancelled task (if any) for the caller to await."""
        self._started = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def _follow(self) -> None:
        """Hold one newPendingTransactions stream on a WebSocket upstream while anyone
        listens, moving to another upstream (or reconnecting) when it breaks."""
        ws = [u for u in self.pool.upstreams if u.is_ws]
        if not ws:
            log.info("no WebSocket upstream: pending transaction listeners get nothing")
            return
        turn = 0
        delay = PENDING_RETRY_DELAY
        while self._listeners:
            healthy = [u for u in ws if u.healthy] or ws
            u = healthy[turn % len(healthy)]
            turn += 1
            try:
                if await self._stream(u):
                    delay = PENDING_RETRY_DELAY  # it worked for a while: a blip
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                log.info("pending stream of %s broke: %s", u.name, exc)
                self.metrics.feed_problems.labels("pending_stream").inc()
            except Exception:
                # Garbage from the upstream (a malformed answer) must not end the stream
                # for good: logged, counted, asked again after the back-off.
                log.exception("pending stream of %s failed", u.name)
                self.metrics.feed_problems.labels("pending_stream").inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, PENDING_RETRY_MAX)

    async def _stream(self, u: Upstream) -> bool:
        """Follow ``u``'s pending stream until it ends; True if it was subscribed."""
        async with websockets.connect(
            u.url, max_size=self.max_message, compression=None, open_timeout=u.timeout
        ) as conn:
            await conn.send(
                b'{"jsonrpc":"2.0","id":1,"method":"eth_subscribe",'
                b'"params":["newPendingTransactions"]}',
                text=True,
            )
            async with asyncio.timeout(u.timeout):
                raw = await conn.recv(decode=False)
            try:
                answer = orjson.loads(raw)
            except orjson.JSONDecodeError:
                log.warning("upstream %s answered eth_subscribe with no JSON: %.200r", u.name, raw)
                self.metrics.feed_problems.labels("pending_stream").inc()
                return False
            sub_id = answer.get("result") if isinstance(answer, dict) else None
            if not isinstance(sub_id, str):
                log.info("upstream %s refused newPendingTransactions: %.200r", u.name, raw)
                return False
            async for message in conn:
                try:
                    doc = orjson.loads(message)
                except orjson.JSONDecodeError:
                    continue
                params = doc.get("params") if isinstance(doc, dict) else None
                if not isinstance(params, dict) or params.get("subscription") != sub_id:
                    continue
                tx_hash = params.get("result")
                if isinstance(tx_hash, str):
                    for fn in list(self._listeners):
                        try:
                            fn(tx_hash)
                        except Exception:
                            log.exception("pending listener failed")
        return True
