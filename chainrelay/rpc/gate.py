"""The door client misses pass before they call upstream: ``rpc/inflight.py``'s counts, and
the waiting of a client past its own bound.

A client past its own bound waits for its own earlier calls to end, first come first
served among its waiters (a batch's chunks go a few at a time), until the call's deadline:
then it is answered -32005. The node's bound is never waited for: past it a call is
answered -32005 at once ("node overloaded, retry later"), since queueing there is how
latency collapses for everyone.

One client call that becomes several upstream calls at once (a wide eth_getLogs asked as
chunks, ``rpc/logscan.py``) holds a slot for each beyond its first (``more``): taken only
when free, never waited for, so a client at its bound has its chunks asked one at a time
within the slot its call holds, and one call cannot put more upstream work in flight than
the client's bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import deque

from chainrelay.errors import UpstreamOverloaded
from chainrelay.rpc.inflight import InFlight, Refusal

NODE_OVERLOADED = "node overloaded, retry later"
CLIENT_OVERLOADED = "too many calls of this client under way, retry later"

# The identity whose gated call the running task serves (set around it by ``RpcService``;
# a coalesced call's task inherits it from the caller that started it): the one whose slots
# a call's extra upstream calls take (``UpstreamGate.more``). None: the node's own work.
CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)


class UpstreamGate:
    def __init__(self, node_max: int, client_max: int) -> None:
        self.counts = InFlight(node_max, client_max)
        # Identity -> its calls waiting for its own bound: (calls, future told True once
        # they are counted, False when shed).
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[bool]]]] = {}
        self.shed = 0  # calls answered -32005, for metrics and tests

    def enter_now(self, who: str, n: int) -> bool:
        """Count ``n`` calls of ``who`` if they may start at once (the fast path of a
        single miss); False: call ``enter``, which waits or sheds."""
        if who in self._waiting:
            return False  # behind its own waiters
        return self.counts.take(who, n) is None

    def more(self, who: str, n: int) -> int:
        """Count up to ``n`` more calls of ``who``, of those free now (not waited for, and
        none ahead of ``who``'s own waiters); how many were counted, each to ``leave``."""
        if who in self._waiting:
            return 0
        taken = 0
        counts = self.counts
        while taken < n and counts.take(who, 1) is None:
            taken += 1
        return taken

    async def enter(self, who: str, n: int, deadline: float, method: str = "") -> None:
        """Count ``n`` calls of ``who`` once they may start; ``leave`` them when they end.
        Raises ``UpstreamOverloaded`` when the node is at its bound, or when ``who`` is
        still at its own at ``deadline`` (a ``perf_counter`` time, as the pool's)."""
        queue = self._waiting.get(who)
        if queue is None:
            refused = self.counts.take(who, n)
            if refused is None:
                return
            if refused is Refusal.NODE:
                raise self._shed(NODE_OVERLOADED, method, n)
        left = deadline - time.perf_counter()
        if left <= 0.0:
            raise self._shed(CLIENT_OVERLOADED, method, n)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        if queue is None:
            queue = self._waiting[who] = deque()
        queue.append(entry)
        try:
            async with asyncio.timeout(left):
                admitted = await fut
        except TimeoutError:
            self._abandon(who, entry)
            raise self._shed(CLIENT_OVERLOADED, method, n) from None
        except BaseException:
            self._abandon(who, entry)
            raise
        if not admitted:
            raise self._shed(NODE_OVERLOADED, method, n)

    def leave(self, who: str, n: int) -> None:
        """``n`` calls of ``who`` counted by ``enter`` are over: its waiters that fit now
        are counted and let go, first come first served."""
        self.counts.give(who, n)
        self._wake(who)

    def _wake(self, who: str) -> None:
        queue = self._waiting.get(who)
        if queue is None:
            return
        counts = self.counts
        while queue:
            want, fut = queue[0]
            if fut.done():
                queue.popleft()
                continue
            refused = counts.take(who, want)
            if refused is Refusal.CLIENT:
                break
            queue.popleft()
            fut.set_result(refused is None)  # False: the node is at its bound, shed
        if not queue:
            del self._waiting[who]

    def _abandon(self, who: str, entry: tuple[int, asyncio.Future[bool]]) -> None:
        """A waiter that stopped waiting (its deadline, or cancelled): its calls given back
        if they had been counted as it stopped, else its place given up."""
        n, fut = entry
        if fut.done() and not fut.cancelled() and fut.result():
            self.leave(who, n)
            return
        fut.cancel()
        queue = self._waiting.get(who)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(entry)
        self._wake(who)  # those behind it may fit

    def _shed(self, message: str, method: str, n: int) -> UpstreamOverloaded:
        self.shed += n
        return UpstreamOverloaded(message, method=method)
