"""Upstream calls in flight for clients: counted node-wide and per identity (client address).

Sans-I/O: ``take`` says whether ``n`` more calls may start, and counts them when they may;
``give`` gives them back. The waiting (a client past its own bound waits for its own
earlier calls) is ``rpc/gate.py``'s. Only clients' calls are counted: the node's own (block
follower, head tracker, filters) never pass here, so they are never shed.

Both bounds admit a call of any size when nothing of theirs is under way: a chunk larger
than a bound set below it still goes, alone.
"""

from __future__ import annotations

import enum


class Refusal(enum.Enum):
    """Why ``InFlight.take`` refused."""

    NODE = "node"  # the node's bound: shed at once
    CLIENT = "client"  # the identity's own bound: it may wait for its own earlier calls


class InFlight:
    __slots__ = ("client_max", "held", "node_max", "total")

    def __init__(self, node_max: int, client_max: int) -> None:
        self.node_max = node_max
        self.client_max = client_max
        self.total = 0
        # Identity -> its calls under way; an identity with none is not listed.
        self.held: dict[str, int] = {}

    def take(self, who: str, n: int) -> Refusal | None:
        """Count ``n`` calls of ``who`` as started; None when they may start, else why not
        (nothing counted then). The node's bound is checked first: a node at its bound
        sheds whoever asks."""
        total = self.total
        if total and total + n > self.node_max:
            return Refusal.NODE
        held = self.held.get(who, 0)
        if held and held + n > self.client_max:
            return Refusal.CLIENT
        self.total = total + n
        self.held[who] = held + n
        return None

    def give(self, who: str, n: int) -> None:
        """``n`` calls of ``who`` counted by ``take`` are over."""
        self.total -= n
        left = self.held[who] - n
        if left:
            self.held[who] = left
        else:
            del self.held[who]
