"""The head a node's feeder worker follows, shared with the node's other workers
(``serve --workers N``) through memory the supervisor maps before it forks them.

The feeder's head tracker writes four numbers each time it takes a header in: its head's
number, when an upstream last confirmed that head (``time.monotonic()``, CLOCK_MONOTONIC:
one clock for every process of the host), and its finalized and safe block numbers. The
other workers take their heads from the feeder's frames; from these numbers they learn that
the head they hold is still the chain's (so they need not poll an upstream to keep it fresh)
and the finality their cache keys depend on (so they need not ask an upstream for it).

Each number is written and read on its own, without a lock: a reader may see one number of
an update together with another of the update before. Every such mix is harmless: a head
number with an older confirmation time makes a worker poll a little sooner; a newer time
with the previous head number vouches for a head one block old, whose successor's frame is
on its way; finalized and safe only ever rise on both sides (readers keep the highest they
saw, and keep safe at or above finalized).

Sans-I/O: ``cells`` is any mutable sequence of floats (a ``multiprocessing`` RawArray
between processes, a list in tests). Floats hold block numbers exactly up to 2**53.
"""

from __future__ import annotations

from collections.abc import MutableSequence
from dataclasses import dataclass

SLOTS = 4
_NUMBER, _CONFIRMED, _FINALIZED, _SAFE = range(SLOTS)


@dataclass(frozen=True, slots=True)
class Finality:
    finalized: int
    safe: int


class SharedHead:
    """Made once, before the workers fork (it starts empty); every worker then holds the
    same cells."""

    def __init__(self, cells: MutableSequence[float]) -> None:
        if len(cells) < SLOTS:
            raise ValueError(f"a shared head needs {SLOTS} cells")
        self.cells = cells
        for i in range(SLOTS):
            cells[i] = -1.0

    # --- the feeder ------------------------------------------------------------------
    def publish(self, number: int, confirmed_at: float, finalized: int, safe: int) -> None:
        """The feeder's head ``number``, confirmed by an upstream at ``confirmed_at``, and
        its finality."""
        cells = self.cells
        cells[_FINALIZED] = finalized
        cells[_SAFE] = safe
        cells[_CONFIRMED] = confirmed_at
        cells[_NUMBER] = number

    # --- the other workers -----------------------------------------------------------
    def confirmed_for(self, number: int) -> float:
        """When the feeder last had its head confirmed, if that head is at most one block
        past ``number`` (a worker holding ``number`` is then as current as the feeder, or
        the next block's frame is on its way to it); else 0.0: this vouches for nothing."""
        cells = self.cells
        head = cells[_NUMBER]
        if head < 0 or head > number + 1:
            return 0.0
        return cells[_CONFIRMED]

    def finality(self, now: float, within: float) -> Finality | None:
        """The feeder's finality when it had a head confirmed within ``within`` seconds of
        ``now``; None when it has not (it is away, or has no head yet)."""
        cells = self.cells
        if cells[_NUMBER] < 0 or now - cells[_CONFIRMED] >= within:
            return None
        return Finality(int(cells[_FINALIZED]), int(cells[_SAFE]))
