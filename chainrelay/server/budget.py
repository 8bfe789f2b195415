"""The front door's memory budget: the bytes clients make it hold, per client address and
node-wide.

What a client can make the front door hold between two of its reads is counted here: a
request body still coming in (and a POST head kept for its body), a WebSocket message not
yet whole (its fragments and the frame websockets is still reading), answers and control
frames queued for a client that does not read them. Each connection counts what it holds
in its own ``Account``, so all of it is given back when the connection goes. One
connection's own bounds are those of one message (``limits.max_header_bytes``,
``max_body_bytes``, ``max_ws_message_bytes``) and of its send buffer (the transport's
high-water mark, past which it is not read, then ``max_ws_send_buffer``); this budget bounds
them all together, per address (``max_buffered_bytes_per_ip``) and in all
(``max_buffered_bytes_total``).

At a bound the caller refuses what would grow (HTTP 429 for an address over its share, 503
when the node is full; WebSocket close 1008 and 1013) or stops reading; it never grows
past. Counters only: no I/O, no clock.
"""

from __future__ import annotations

import enum


class Over(enum.Enum):
    """Which bound a take would pass."""

    IDENTITY = "identity"  # the client's address holds its share (429, close 1008)
    NODE = "node"  # the node holds all it may (503, close 1013)


class Budget:
    """Bytes held, per client address and in all; ``take`` refuses past either bound."""

    __slots__ = ("by_ip", "held", "peak", "per_ip", "total")

    def __init__(self, per_ip: int, total: int) -> None:
        self.per_ip = per_ip
        self.total = total
        self.held = 0
        # The most held since the last ``let_go`` (what a burst made the node hold).
        self.peak = 0
        self.by_ip: dict[str, int] = {}

    def take(self, ip: str, n: int) -> Over | None:
        """Count ``n`` more bytes held for ``ip``; None when taken, else the bound it would
        pass (and nothing is counted). The address's own share is checked first: a client
        over it is told so (429) rather than that the node is full."""
        mine = self.by_ip.get(ip, 0) + n
        if mine > self.per_ip:
            return Over.IDENTITY
        if self.held + n > self.total:
            return Over.NODE
        self.by_ip[ip] = mine
        self.held += n
        if self.held > self.peak:
            self.peak = self.held
        return None

    def force(self, ip: str, n: int) -> None:
        """Count ``n`` bytes already held whatever the bounds (answers queued: they are
        there; counting them makes new input wait instead)."""
        self.by_ip[ip] = self.by_ip.get(ip, 0) + n
        self.held += n
        if self.held > self.peak:
            self.peak = self.held

    def give(self, ip: str, n: int) -> None:
        """``n`` bytes held for ``ip`` are no longer."""
        mine = self.by_ip[ip] - n
        if mine:
            self.by_ip[ip] = mine
        else:
            del self.by_ip[ip]
        self.held -= n

    def of(self, ip: str) -> int:
        return self.by_ip.get(ip, 0)

    def let_go(self, at_least: int) -> bool:
        """Whether a burst is over: at least ``at_least`` bytes let go of since the peak,
        or everything let go of after a peak of a quarter of that (the end of a burst whose
        bulk was let go of earlier, when the heap was trimmed already); if so the peak
        starts again from what is held now."""
        gone = self.peak - self.held
        if gone < at_least and not (self.held == 0 and gone >= at_least // 4):
            return False
        self.peak = self.held
        return True


class Account:
    """What one connection holds against a ``Budget``, in one direction (what it reads, or
    what is queued for it), given back whole by ``release``."""

    __slots__ = ("budget", "held", "ip")

    def __init__(self, budget: Budget, ip: str) -> None:
        self.budget = budget
        self.ip = ip
        self.held = 0

    def take(self, n: int) -> Over | None:
        over = self.budget.take(self.ip, n)
        if over is None:
            self.held += n
        return over

    def give(self, n: int) -> None:
        if n:
            self.budget.give(self.ip, n)
            self.held -= n

    def settle(self, n: int) -> Over | None:
        """Hold exactly ``n`` bytes: take or give the difference. Past a bound nothing
        changes and the bound is returned."""
        more = n - self.held
        if more > 0:
            return self.take(more)
        self.give(-more)
        return None

    def settle_anyway(self, n: int) -> None:
        """Hold exactly ``n`` bytes, past the bounds if need be (bytes already queued)."""
        more = n - self.held
        if more > 0:
            self.budget.force(self.ip, more)
            self.held = n
        else:
            self.give(-more)

    def release(self) -> None:
        self.give(self.held)
