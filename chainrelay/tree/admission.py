"""Anonymous feed sessions, sans-I/O: how many each address and the node may hold, and how
fast one address may open them.

A child that proves no ``child_keys`` key (``tree.auth``) is an anonymous subscriber. Its
address (its identity's name: an IPv6 address stands for its /64, one subscriber line's
prefix, which its owner can fill with addresses at will; chainrelay/access/identity.py) may
hold ``per_address`` sessions, and every address together
``max_sessions``, fewer than the node's ``max_children``: anonymous subscribers never take
the places of the relays it serves. Sessions that upgraded but sent no hello yet are
bounded per address the same way (``pending``): until its hello a child is nobody, and an
address must not hold more than its share of places that way.

Opening a session costs the node a replay, so each address has a token bucket: it may open
``per_address`` sessions at once, then one per ``cooldown`` seconds. An address refused
is told when to try again (``Refusal.retry_after``).

State kept per address: its sessions (bounded by the node's caps) and, once none is open,
its bucket until it is full again, at most ``idle_addresses`` of those (least recently seen
forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an anonymous session is refused, and in how many seconds to try again."""

    reason: str  # a counter label
    message: str
    retry_after: float


class _Address:
    __slots__ = ("at", "pending", "sessions", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.sessions = 0
        self.pending = 0
        self.tokens = tokens
        self.at = now  # when ``tokens`` was last brought up to date


class Admission:
    """The anonymous sessions of one hub, by address (an identity's name)."""

    def __init__(
        self, *, per_address: int, max_sessions: int, cooldown: float, idle_addresses: int
    ) -> None:
        self.per_address = per_address
        self.max_sessions = max_sessions
        self.cooldown = cooldown
        self.idle_addresses = idle_addresses
        self.sessions = 0  # anonymous sessions open, node-wide
        self._open: dict[str, _Address] = {}  # groups with a session or a pending one
        self._idle: OrderedDict[str, _Address] = OrderedDict()  # groups still owed tokens

    def __len__(self) -> int:
        """Address groups whose state is kept."""
        return len(self._open) + len(self._idle)

    def _get(self, group: str, now: float) -> _Address:
        a = self._open.get(group)
        if a is None:
            a = self._idle.pop(group, None)
            if a is None:
                a = _Address(float(self.per_address), now)
            self._open[group] = a
        # The bucket refills one token per cooldown, up to the burst.
        if self.cooldown > 0:
            a.tokens = min(float(self.per_address), a.tokens + (now - a.at) / self.cooldown)
        else:
            a.tokens = float(self.per_address)
        a.at = now
        return a

    def _settle(self, group: str, a: _Address) -> None:
        """Move ``group`` out of the open table once nothing of it is open."""
        if a.sessions or a.pending:
            return
        del self._open[group]
        if a.tokens >= self.per_address:
            return  # a full bucket is what a new address gets: nothing to remember
        self._idle[group] = a
        self._idle.move_to_end(group)
        while len(self._idle) > self.idle_addresses:
            self._idle.popitem(last=False)

    def upgrade(self, group: str, now: float) -> Refusal | None:
        """A ``/feed`` upgrade from ``group``, before its hello: refused when the group
        already waits on its share of hellos; else it holds one more place (``pending``)
        until ``hello`` or ``gone``."""
        a = self._get(group, now)
        # Pending places only: the group's counted sessions are checked at the hello, once
        # it is known whether this one is anonymous (a relay beside subscribers on one
        # address is never refused for them).
        if a.pending >= self.per_address:
            self._settle(group, a)
            return self._full(group)
        a.pending += 1
        return None

    def hello(self, group: str, now: float, *, anonymous: bool) -> Refusal | None:
        """``group``'s pending session said hello: an authenticated one leaves the
        anonymous bounds; an anonymous one is counted, or refused (and forgotten)."""
        a = self._get(group, now)
        a.pending = max(0, a.pending - 1)
        if not anonymous:
            self._settle(group, a)
            return None
        refusal = None
        if self.sessions >= self.max_sessions:
            refusal = Refusal(
                "anon_node_full",
                f"this node serves {self.max_sessions} anonymous feed sessions already;"
                f" retry in {self.cooldown:g} s",
                self.cooldown,
            )
        elif a.sessions >= self.per_address:
            refusal = self._full(group)
        elif a.tokens < 1:
            wait = (1 - a.tokens) * self.cooldown
            refusal = Refusal(
                "anon_cooldown",
                f"anonymous feed sessions from {group} come too fast: retry in {wait:.1f} s",
                wait,
            )
        if refusal is not None:
            self._settle(group, a)
            return refusal
        a.tokens -= 1
        a.sessions += 1
        self.sessions += 1
        return None

    def gone(self, group: str, now: float, *, counted: bool) -> None:
        """A session of ``group`` ended: a counted anonymous one (``counted``), or one that
        never said hello."""
        a = self._open.get(group)
        if a is None:
            return
        if counted:
            a.sessions -= 1
            self.sessions -= 1
        else:
            a.pending = max(0, a.pending - 1)
        self._get(group, now)
        self._settle(group, a)

    def _full(self, group: str) -> Refusal:
        return Refusal(
            "anon_per_address",
            f"{group} holds {self.per_address} anonymous feed sessions already;"
            f" close one, or retry in {self.cooldown:g} s",
            self.cooldown,
        )
