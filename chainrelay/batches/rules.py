"""The ingress rules of one batch stream, sans-I/O: which pushes a node accepts.

- Sequence numbers are contiguous: the first batch of a stream is its configured
  ``first_seq``; after that only ``next`` is accepted. A push past it is a **gap**,
  refused with the next expected number (the sequencer resends from there).
- The first payload accepted for a number is the batch. A push of the same number with
  the same payload (hash) is a **duplicate**: acknowledged again once that batch is
  durable (a sequencer that lost an ack, or pushes to two ingress nodes, retries safely).
  Another payload for an accepted number is a **conflict**, refused loudly.
- A push is accepted before it is durable (it is then in flight in the log's group
  commit); ``next`` counts it, so the next push can be accepted at once. A commit that
  fails takes its batches back (``rollback``): their numbers are expected again.
- What is accepted and durable survives a restart: ``StreamRules.restored`` starts from
  the log's next number. Hashes of older numbers than ``recent`` holds are the log's to
  tell (``decide`` answers LOOKUP, then ``decide_known``).

The rules decide; they hold no payloads and do no I/O.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass


class Verdict(enum.Enum):
    ACCEPT = "accept"  # new: write it, acknowledge once durable
    DUPLICATE = "duplicate"  # already accepted with this payload: acknowledge (once durable)
    CONFLICT = "conflict"  # already accepted with another payload: refuse
    GAP = "gap"  # past the next expected number: refuse, naming ``expected``
    BEFORE_START = "before_start"  # below the stream's first number: refuse
    LOOKUP = "lookup"  # older than the hashes held: ask the log, then ``decide_known``


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    expected: int  # the next number the stream accepts (after this decision)


class StreamRules:
    """One stream's sequence: what is accepted, what is expected next."""

    def __init__(self, first_seq: int, next_seq: int | None = None, recent: int = 65_536) -> None:
        """``next_seq``: the number after the last batch in the durable log (None: the log
        is empty, the stream starts at ``first_seq``). ``recent``: accepted hashes kept
        for duplicate checks without the log."""
        if recent < 1:
            raise ValueError("recent must be positive")
        self.first = first_seq
        self.next = first_seq if next_seq is None else next_seq
        if self.next < first_seq:
            raise ValueError("the log ends before the stream's first number")
        self.recent = recent
        self._hashes: OrderedDict[int, bytes] = OrderedDict()

    @classmethod
    def restored(
        cls, first_seq: int, tail: list[tuple[int, bytes]], recent: int = 65_536
    ) -> StreamRules:
        """Rules after a restart, from the log's last entries ``[(seq, hash)]`` in order."""
        rules = cls(first_seq, tail[-1][0] + 1 if tail else None, recent)
        for seq, h in tail[-recent:]:
            rules._remember(seq, h)
        return rules

    def _remember(self, seq: int, payload_hash: bytes) -> None:
        h = self._hashes
        h[seq] = payload_hash
        if len(h) > self.recent:
            h.popitem(last=False)

    def decide(self, seq: int, payload_hash: bytes) -> Decision:
        if seq == self.next:
            self._remember(seq, payload_hash)
            self.next += 1
            return Decision(Verdict.ACCEPT, self.next)
        if seq > self.next:
            return Decision(Verdict.GAP, self.next)
        if seq < self.first:
            return Decision(Verdict.BEFORE_START, self.next)
        known = self._hashes.get(seq)
        if known is None:
            return Decision(Verdict.LOOKUP, self.next)
        return self.decide_known(seq, payload_hash, known)

    def decide_known(self, seq: int, payload_hash: bytes, stored_hash: bytes | None) -> Decision:
        """The verdict for an accepted number, given the hash the log holds for it (None:
        the log does not hold it: a number it lost, never acknowledged; taken as a gap)."""
        if stored_hash is None:
            return Decision(Verdict.GAP, self.next)
        if stored_hash == payload_hash:
            return Decision(Verdict.DUPLICATE, self.next)
        return Decision(Verdict.CONFLICT, self.next)

    def hash_of(self, seq: int) -> bytes | None:
        return self._hashes.get(seq)

    def rollback(self, seq: int) -> None:
        """Batches from ``seq`` on were not made durable: they are expected again."""
        if seq >= self.next:
            return
        for s in [s for s in self._hashes if s >= seq]:
            del self._hashes[s]
        self.next = max(seq, self.first)
