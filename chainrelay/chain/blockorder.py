"""Which blocks the block follower must deliver, retract or fetch, so that its listeners see the
canonical chain in order: no gap, no duplicate, reorged blocks retracted newest first.

The feed compares what it has delivered (number -> hash, bounded by the reorg window) with
the head tracker's canonical chain after every head change. Comparing states, rather than
replaying the tracker's change events, makes missed heads, reconnected head streams and
merged changes all the same case. Sans-I/O: no asyncio, no upstream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Step(Generic[T]):
    """What to do after a head change: retract ``retract`` (newest first), then fetch and
    deliver ``fetch`` ((number, hash), oldest first). ``skipped``: blocks between the last
    delivered one and ``fetch`` that fell out of the window and will never be delivered
    (the feed fell further behind than the window): the feed logs and counts them."""

    retract: list[T]
    fetch: list[tuple[int, str]]
    skipped: int = 0


class DeliveredChain(Generic[T]):
    """The blocks delivered so far, each with what the feed delivered for it (``T``)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._blocks: dict[int, tuple[str, T]] = {}
        # Nothing at or below this is ever delivered: blocks from before the feed started.
        self.floor = -1

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def tip(self) -> int:
        """The highest number delivered, or ``floor`` when nothing above it was."""
        return max(max(self._blocks, default=self.floor), self.floor)

    def hash_at(self, number: int) -> str | None:
        got = self._blocks.get(number)
        return None if got is None else got[0]

    def start_after(self, number: int) -> None:
        """Forget everything; deliver only blocks above ``number`` from now on."""
        self._blocks.clear()
        self.floor = number

    def step(self, canonical: Mapping[int, str], head: int) -> Step[T]:
        """Bring the delivered chain in line with ``canonical`` (number -> hash) up to ``head``.

        Delivered blocks the canonical chain no longer holds (another hash at their number,
        or a number past ``head``) are retracted, with every block above them, and leave the
        delivered chain now; every canonical block above what stays is to be fetched, in
        order. A number the canonical map does not hold (outside its window) is neither
        retracted nor fetched.
        """
        stale = [n for n, (h, _) in self._blocks.items() if n > head or canonical.get(n, h) != h]
        retract: list[T] = []
        if stale:
            fork = min(stale)
            for n in sorted((n for n in self._blocks if n >= fork), reverse=True):
                retract.append(self._blocks.pop(n)[1])
            # A retracted block is replaced, never skipped: the new chain starts at the fork.
            self.floor = fork - 1
        tip = self.tip
        low = max(tip + 1, head - self.window + 1)
        fetch = [(n, canonical[n]) for n in range(low, head + 1) if n in canonical]
        skipped = low - (tip + 1)
        if skipped > 0:
            # Given up for good: the next step must not report the same gap again.
            self.floor = low - 1
        return Step(retract, fetch, max(0, skipped))

    def links(self, number: int, parent_hash: str) -> bool:
        """Whether a block at ``number`` with ``parent_hash`` extends the delivered chain
        (always true when its parent was never delivered)."""
        got = self._blocks.get(number - 1)
        return got is None or got[0] == parent_hash

    def delivered(self, number: int, block_hash: str, item: T) -> None:
        """Record a delivered block; blocks older than the window are forgotten."""
        self._blocks[number] = (block_hash, item)
        floor = number - self.window
        for n in [n for n in self._blocks if n <= floor]:
            del self._blocks[n]

    def prune_final(self, finalized: int) -> None:
        """Forget delivered blocks at or below ``finalized``: no reorg can retract them, so
        what they hold is memory for nothing. The highest delivered block stays, so the
        next block is still checked against its parent."""
        tip = self.tip
        gone = [n for n in self._blocks if n <= finalized and n < tip]
        for n in gone:
            del self._blocks[n]
        if gone:
            self.floor = max(self.floor, max(gone))
