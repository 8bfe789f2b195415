"""Which head to trust when upstreams disagree: a quorum by block hash, and the upstreams
whose heads are not to be used for ``latest``.

Taking the highest head any upstream reports lets one upstream on a fork of its own, or one
that reports a head far ahead of the rest, move the head every client sees. Instead:

* With 3 upstreams or more in rotation and not syncing, the head is the highest block
  (among those the upstreams reported as their heads) that a quorum of them (``[head]
  quorum``; a majority when 0) holds: as its head, or as an ancestor of its head. What
  each upstream holds is what it reported (its heads, and each head's parent, over the
  last ``window`` blocks), and its block at the agreed height when the tracker asked.
* With 2, the higher head, as before, unless it is more than ``max_ahead_blocks`` above
  the other; with 1, its head. Upstreams out of rotation (dead, cordoned) do not count:
  two of three down leave the third's head followed, not frozen. Nor does a fallback whose
  head is checked only now and then while the primaries serve (``chain/head.py``): a
  report that old would flag the primaries "ahead"; it counts while it serves.
* An upstream is flagged, and its head not counted, while: it reports ``eth_syncing``
  (``syncing``); its head is more than ``max_ahead_blocks`` above the trusted head
  (``ahead``); its hash at the trusted head's height (or, behind it, at its own head's)
  is not the one a quorum holds there (``fork``). Flags are worked out again from what
  each upstream reports, so an upstream that agrees again is unflagged at once.

Sans-I/O: headers in (``saw``), the trusted header and the flags out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

FORK = "fork"
AHEAD = "ahead"
SYNCING = "syncing"


class HeaderLike(Protocol):
    @property
    def number(self) -> int: ...
    @property
    def hash(self) -> str: ...
    @property
    def parent_hash(self) -> str: ...


@dataclass(slots=True)
class _Reports:
    """What one upstream reported: its heads by number, and the hash it holds at each
    number (its heads' and their parents')."""

    head: HeaderLike | None = None
    heads: dict[int, HeaderLike] = field(default_factory=dict)
    hashes: dict[int, str] = field(default_factory=dict)
    syncing: bool = False
    out: bool = False  # out of the pool's rotation: its reports are not counted


class HeadQuorum:
    def __init__(self, names: list[str], quorum: int, max_ahead: int, window: int) -> None:
        """``names``: the upstreams; ``quorum``: how many must hold a block (0: a majority
        of them); ``max_ahead``: blocks an upstream may be above the trusted head;
        ``window``: blocks of each upstream's reports kept."""
        self.names = list(names)
        self.configured = quorum
        self.max_ahead = max_ahead
        self.window = window
        self._reports = {name: _Reports() for name in names}

    def saw(self, name: str, h: HeaderLike) -> None:
        """``name`` reports ``h`` as its head."""
        r = self._reports[name]
        r.head = h
        r.heads[h.number] = h
        r.hashes[h.number] = h.hash
        if h.number > 0:
            r.hashes[h.number - 1] = h.parent_hash
        # A head lower than before (a reorg to a shorter chain) drops what it replaced.
        for n in [n for n in r.hashes if n > h.number]:
            del r.hashes[n]
            r.heads.pop(n, None)
        floor = h.number - self.window
        for n in [n for n in r.hashes if n < floor]:
            del r.hashes[n]
            r.heads.pop(n, None)

    def holds(self, name: str, number: int, block_hash: str) -> None:
        """``name`` holds ``block_hash`` at ``number`` (an ancestor of its head, asked)."""
        r = self._reports[name]
        if r.head is not None and r.head.number - self.window <= number <= r.head.number:
            r.hashes[number] = block_hash

    def unknown_below(self, name: str) -> int | None:
        """The trusted head's number when ``name``'s head is above it and what ``name``
        holds there is not known: ask ``name`` for that block (``holds``), or a fork of
        its own cannot be told from an upstream that is merely ahead."""
        got = self.trusted()
        r = self._reports[name]
        if got is None or r.head is None:
            return None
        number = got[0].number
        if r.head.number > number and number not in r.hashes:
            return number
        return None

    def set_syncing(self, name: str, syncing: bool) -> None:
        self._reports[name].syncing = syncing

    def set_out(self, name: str, out: bool) -> None:
        """``name`` is out of the pool's rotation (dead, cordoned), or a fallback checked
        slowly: not counted, so two upstreams of three down leave the third's head
        followed, not frozen."""
        self._reports[name].out = out

    def _counted(self) -> dict[str, _Reports]:
        return {
            n: r
            for n, r in self._reports.items()
            if not r.syncing and not r.out and r.head is not None
        }

    def _voters(self) -> int:
        """Upstreams that count, whether they reported a head yet or not: the rule (quorum
        or two-upstream) is theirs."""
        return sum(1 for r in self._reports.values() if not r.syncing and not r.out)

    def _required(self, counted: int) -> int:
        """How many of ``counted`` upstreams must hold a block: the configured quorum, at
        most all of them; a majority of them when none is configured."""
        if self.configured > 0:
            return min(self.configured, counted)
        return counted // 2 + 1

    def trusted(self) -> tuple[HeaderLike, str] | None:
        """The head to follow and an upstream that holds it; None while none is agreed."""
        counted = self._counted()
        if not counted:
            return None
        voters = self._voters()
        if voters < 3:
            return self._highest_within_bound(counted)
        required = self._required(voters)
        numbers = sorted({n for r in counted.values() for n in r.heads}, reverse=True)
        for number in numbers:
            votes = Counter(r.hashes.get(number) for r in counted.values())
            for block_hash, count in votes.most_common():
                if block_hash is None or count < required:
                    continue
                for name, r in counted.items():
                    h = r.heads.get(number)
                    if h is not None and h.hash == block_hash:
                        return h, name
        return None

    def _highest_within_bound(self, counted: dict[str, _Reports]) -> tuple[HeaderLike, str]:
        """Two upstreams (or one): the higher head, unless it is too far above the other."""
        ranked = sorted(counted.items(), key=lambda item: _number(item[1]), reverse=True)
        best_name, best = ranked[0]
        if len(ranked) > 1 and _number(best) - _number(ranked[1][1]) > self.max_ahead:
            best_name, best = ranked[1]
        assert best.head is not None
        return best.head, best_name

    def flags(self) -> dict[str, str]:
        """Upstreams whose heads are not to be used for ``latest``, with why."""
        out = {name: SYNCING for name, r in self._reports.items() if r.syncing}
        got = self.trusted()
        if got is None:
            return out
        top, _ = got
        counted = self._counted()
        voters = self._voters()
        required = self._required(voters)
        for name, r in counted.items():
            assert r.head is not None
            if r.head.number - top.number > self.max_ahead:
                out[name] = AHEAD
                continue
            if voters < 3:
                continue
            at = min(r.head.number, top.number)
            mine = r.hashes.get(at)
            if mine is None:
                continue
            votes = Counter(o.hashes.get(at) for o in counted.values())
            held, count = next(((h, c) for h, c in votes.most_common() if h is not None), (None, 0))
            if count >= required and held != mine:
                out[name] = FORK
        return out


def _number(r: _Reports) -> int:
    return r.head.number if r.head is not None else -1
