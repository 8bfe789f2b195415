"""A batch stream's order at a relay, sans-I/O: frames go on in sequence, never out of it.

Blocks may arrive in any order (several origins, reorgs); batches may not: every
subscriber must receive them in sequence. A node takes each stream's batches from two or
more parents, and one parent may lack a batch the other has (it lost its own parent for
a moment). The gate passes a batch on only when every batch before it has passed:

- ``offer(seq, item)`` returns what can go on now, in order: nothing when ``seq`` is
  below ``next`` (a duplicate), the item and every held one that now follows it when it
  is ``next``, nothing when it is past ``next`` (held, within ``max_held`` items and
  ``max_held_bytes``; past those, refused: the missing numbers must be fetched first).
- Before its first batch a gate has no ``next``: the first batch offered sets it (a node
  that starts with nothing starts where its parents are), unless ``next`` is given.
- ``missing()`` names the numbers the held batches wait for; the node fetches them from
  a parent's range endpoint (which climbs to an ingress node's durable log) and offers
  them like any other.
- ``skip()`` gives up on the missing numbers (none of the parents could give them):
  the held batches go on and the children see the jump, as a subscriber does, and fetch
  the missing numbers from the range endpoint themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Missing:
    """Numbers ``[start, end)`` the held batches wait for."""

    start: int
    end: int


@dataclass(slots=True)
class BatchOrder(Generic[T]):
    max_held: int
    max_held_bytes: int
    next: int | None = None
    held: dict[int, tuple[T, int]] = field(default_factory=dict)
    held_bytes: int = 0

    def offer(self, seq: int, item: T, size: int) -> list[T] | None:
        """What goes on now, in order (possibly nothing); None when ``seq`` is past
        ``next`` and cannot be held (the bounds are reached, or it is held already)."""
        if self.next is None:
            self.next = seq
        if seq < self.next:
            return []
        if seq > self.next:
            full = len(self.held) >= self.max_held or self.held_bytes + size > self.max_held_bytes
            if seq in self.held or (self.held and full):
                return None
            self.held[seq] = (item, size)
            self.held_bytes += size
            return []
        self.next = seq + 1
        return self._drain([item])

    def _drain(self, out: list[T]) -> list[T]:
        """``out`` and every held batch that follows on from ``next``, in order."""
        held = self.held
        while held and self.next in held:
            got, n = held.pop(self.next)
            self.held_bytes -= n
            out.append(got)
            self.next += 1
        return out

    def is_new(self, seq: int) -> bool:
        """False for a number already passed on or held: a copy, dropped unchecked."""
        return (self.next is None or seq >= self.next) and seq not in self.held

    def missing(self) -> Missing | None:
        if not self.held or self.next is None:
            return None
        return Missing(self.next, min(self.held))

    def skip(self) -> list[T]:
        """Give up on the missing numbers: the held batches from the lowest on go on (up
        to the next hole, if any)."""
        if not self.held:
            return []
        self.next = min(self.held)
        return self._drain([])
