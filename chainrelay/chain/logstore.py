"""Block logs the node holds, whatever their age, so eth_getLogs windows over them are
answered with no upstream call (or only for the blocks around them).

Kept per block (number, hash, logs): the blocks the block follower delivers (``note``, which
also forgets the blocks a reorg retracts) and blocks whose logs came another way (``hold``:
say a block's receipts fetched whole). Bounded in bytes, the lowest block numbers dropped
first: windows are asked near the head.

A held block answers only while this node can vouch for it being canonical:

* inside the head tracker's canonical window (``view.canonical``) its hash must be the one
  there;
* beyond the window it must be final, and have been seen canonical while final ("sealed").
  A block held while not final that leaves the window before finality reaches it, or is
  replaced in between, is dropped: nothing left could tell whether a reorg took it.

A block is taken in only when it can be vouched for at that moment: canonical inside the
window, or final beyond it (an old block's logs from an upstream, for a final number, are
trusted as the cache trusts any final answer).

``split`` cuts an eth_getLogs window into runs of held blocks, with their matching logs as
the node's JSON, and the sub-ranges between them that must be asked upstream.
Sans-I/O: no asyncio, no sockets.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import orjson

from chainrelay.chain.events import BlockEvent
from chainrelay.rpc.policy import HeadView
from chainrelay.subscriptions.logfilter import LogFilter
from chainrelay.wire.jsonrpc import kept

# A held log: its address and topics in lower case (what a filter tests), and its JSON as the
# node gave it (what an answer is made of).
HeldLog = tuple[str, tuple[str, ...], bytes]
# A block's logs made ready to hold (``held_logs_steps``): the held logs and what they weigh.
Held = tuple[list[HeldLog], int]

T = TypeVar("T")

_TUPLE_SIZE = sys.getsizeof((None, None, None))
# What a held block costs besides its logs: its record, its list, its hash, the indexes.
_BLOCK_SIZE = 400


@dataclass(slots=True)
class _Block:
    hash: str
    logs: list[HeldLog]
    raws: list[bytes]  # each log's JSON, in order: what a filter matching anything gets
    size: int
    sealed: bool  # seen canonical while final: usable beyond the canonical window


class Piece(NamedTuple):
    """One part of a window, blocks ``low``..``high``: held blocks (``logs``: the matching
    logs' JSON, in order; ``hashes``: the blocks' hashes, one per number) or a sub-range to
    ask upstream (both None)."""

    low: int
    high: int
    logs: list[bytes] | None
    hashes: tuple[str, ...] | None


class LogStore:
    def __init__(self, view: HeadView, max_bytes: int) -> None:
        """``view``: the head tracker's view, read at every call; ``max_bytes``: what the
        held logs may take (their JSON, and the strings kept apart for matching)."""
        self.view = view
        self.max_bytes = max_bytes
        self.bytes = 0
        self._blocks: dict[int, _Block] = {}
        self._numbers: list[int] = []  # the held numbers, ascending
        self._by_hash: dict[str, int] = {}
        self._unsealed: set[int] = set()  # held while not final yet
        self._settled = -1  # the view's generation at the last _settle

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, number: int) -> bool:
        return number in self._blocks

    # --- what comes in ---------------------------------------------------------------
    def note(
        self, events: Iterable[BlockEvent], ready: Mapping[str, Held | None] | None = None
    ) -> None:
        """The follower's events, as delivered: blocks held, retracted ones forgotten.
        ``ready``: blocks' logs made ready to hold beforehand, by block hash."""
        for ev in events:
            if ev.removed:
                self.forget(ev.number, ev.hash)
            elif ready is not None and ev.hash in ready:
                held = ready[ev.hash]
                if held is not None:
                    self.hold(ev.number, ev.hash, ev.logs, held)
            else:
                self.hold(ev.number, ev.hash, ev.logs)

    def hold(
        self,
        number: int,
        block_hash: str,
        logs: list[dict[str, Any]],
        ready: Held | None = None,
    ) -> bool:
        """Hold block ``number``'s logs: every log of the block, in log-index order, as the
        node answers them (a receipt's ``logs`` are the same objects). False when not taken:
        the block cannot be vouched for now (not canonical, or beyond the canonical window
        and not final), a log is malformed or of another block, or it outweighs the store.
        ``ready``: those logs made ready to hold (``held_logs_steps``), in slices of the
        event loop: a block of 3,000 logs is ~3.5 ms of encoding."""
        view = self.view
        if number < 0 or not view.known:
            return False
        self._settle()
        have = self._blocks.get(number)
        if have is not None and have.hash == block_hash:
            return True
        canonical = view.canonical.get(number)
        if canonical is None and number > view.finalized:
            return False
        if canonical is not None and canonical != block_hash:
            return False
        if ready is None:
            ready = run(held_logs_steps(logs, block_hash, 0))
            if ready is None:
                return False
        held, logs_size = ready
        raws = [raw for _, _, raw in held]
        size = _BLOCK_SIZE + sys.getsizeof(block_hash) + sys.getsizeof(raws) + logs_size
        if size > self.max_bytes:
            return False
        if have is not None:
            self._drop(number)
        sealed = number <= view.finalized
        self._blocks[number] = _Block(block_hash, held, raws, size, sealed)
        numbers = self._numbers
        if not numbers or number > numbers[-1]:
            numbers.append(number)
        else:
            bisect.insort(numbers, number)
        self._by_hash[block_hash] = number
        if not sealed:
            self._unsealed.add(number)
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(numbers[0])
        return True

    def forget(self, number: int, block_hash: str) -> None:
        """Block ``number`` is no longer held if it is the one with ``block_hash``."""
        got = self._blocks.get(number)
        if got is not None and got.hash == block_hash:
            self._drop(number)

    # --- what goes out ---------------------------------------------------------------
    def split(self, flt: LogFilter, low: int, high: int, max_upstream: int) -> list[Piece] | None:
        """Blocks ``low``..``high`` as pieces in block order: runs of held blocks this node
        vouches for, with the logs ``flt`` matches (its address and topics; its block bounds
        are ``low`` and ``high``), and the sub-ranges between them to ask upstream. None
        when no held block helps, or more than ``max_upstream`` sub-ranges would be asked:
        the window goes upstream whole."""
        view = self.view
        if low > high or low < 0 or high > view.number:
            return None
        self._settle()
        numbers = self._numbers
        start = bisect.bisect_left(numbers, low)
        end = bisect.bisect_right(numbers, high)
        pieces: list[Piece] = []
        upstream = 0
        run_low = -1  # the first block of the run of held blocks under way, -1: none
        logs: list[bytes] = []
        hashes: list[str] = []
        at = low  # the first block not in a piece yet
        for n in numbers[start:end]:
            block = self._blocks[n]
            if not self._usable(n, block):
                continue  # a sub-range asked upstream will cover it
            if n != at:
                if run_low >= 0:
                    pieces.append(Piece(run_low, at - 1, logs, tuple(hashes)))
                    run_low, logs, hashes = -1, [], []
                pieces.append(Piece(at, n - 1, None, None))
                upstream += 1
                if upstream > max_upstream:
                    return None
            if run_low < 0:
                run_low = n
            hashes.append(block.hash)
            logs.extend(_matching(flt, block))
            at = n + 1
        if run_low < 0:
            return None  # nothing held here: as good as asking the window whole
        pieces.append(Piece(run_low, at - 1, logs, tuple(hashes)))
        if at <= high:
            upstream += 1
            if upstream > max_upstream:
                return None
            pieces.append(Piece(at, high, None, None))
        return pieces

    def by_hash(self, flt: LogFilter, block_hash: str) -> list[bytes] | None:
        """The logs ``flt`` matches in the block with ``block_hash``, as JSON; None when
        that block is not held or cannot be vouched for."""
        self._settle()
        number = self._by_hash.get(block_hash)
        if number is None:
            return None
        block = self._blocks[number]
        if block.hash != block_hash or not self._usable(number, block):
            return None
        return list(_matching(flt, block))

    def vouches(self, pieces: list[Piece]) -> bool:
        """Whether the held blocks of ``pieces`` (from ``split``) are still canonical: asked
        again once the sub-ranges' answers are in, for the head may have moved meanwhile."""
        view = self.view
        canonical = view.canonical
        for piece in pieces:
            if piece.hashes is None:
                continue
            for n, h in enumerate(piece.hashes, piece.low):
                got = canonical.get(n)
                if got is None:
                    # Beyond the window now: only a final block keeps its word.
                    if n > view.finalized:
                        return False
                elif got != h:
                    return False
        return True

    # --- canonicality ----------------------------------------------------------------
    def _usable(self, number: int, block: _Block) -> bool:
        got = self.view.canonical.get(number)
        if got is not None:
            return got == block.hash
        return block.sealed

    def _settle(self) -> None:
        """Once per change of the head: seal the blocks finality reached while they are
        canonical; drop those a reorg replaced, and those that left the canonical window
        unsealed (nothing can vouch for them any more)."""
        view = self.view
        if view.generation == self._settled:
            return
        self._settled = view.generation
        if not self._unsealed:
            return
        canonical = view.canonical
        for n in sorted(self._unsealed):
            block = self._blocks[n]
            got = canonical.get(n)
            if got is None:
                if n <= view.number:
                    self._drop(n)  # out of the window, never seen final
                # else: past a head that went back (a shorter chain won): asked again later
            elif got != block.hash:
                self._drop(n)
            elif n <= view.finalized:
                block.sealed = True
                self._unsealed.discard(n)

    def _drop(self, number: int) -> None:
        block = self._blocks.pop(number)
        numbers = self._numbers
        if numbers[0] == number:
            del numbers[0]
        else:
            del numbers[bisect.bisect_left(numbers, number)]
        if self._by_hash.get(block.hash) == number:
            del self._by_hash[block.hash]
        self._unsealed.discard(number)
        self.bytes -= block.size


def _matching(flt: LogFilter, block: _Block) -> list[bytes]:
    """The JSON of the logs of ``block`` that ``flt`` matches, in order (the block's own
    list when it matches all: copy it to keep it). The usual filters (none, addresses only,
    an event signature) are tested inline."""
    addresses, positions = flt.addresses, flt.topics
    if not positions:
        if addresses is None:
            return block.raws
        return [raw for address, _, raw in block.logs if address in addresses]
    first = positions[0]
    if len(positions) == 1 and first is not None:
        return [
            raw
            for address, topics, raw in block.logs
            if topics and topics[0] in first and (addresses is None or address in addresses)
        ]
    return [raw for address, topics, raw in block.logs if flt.matches_fields(address, topics)]


def held_logs_steps(
    logs: list[dict[str, Any]], block_hash: str, step: int
) -> Generator[None, None, Held | None]:
    """A block's logs as held, with their weight; None if one is not a log of this block.
    Yields after every ``step`` logs (0: never)."""
    held: list[HeldLog] = []
    size = 0
    for at, log in enumerate(logs, 1):
        if step and at % step == 0:
            yield
        if not isinstance(log, Mapping) or log.get("blockHash") != block_hash:
            return None
        address = log.get("address")
        topics = log.get("topics")
        if log.get("removed") or not isinstance(address, str) or not isinstance(topics, list):
            return None
        if not all(isinstance(t, str) for t in topics):
            return None
        # Its own allocation: orjson's output keeps the buffer it grew (4 KiB and more).
        raw = kept(orjson.dumps(log))
        one = (address.lower(), tuple(t.lower() for t in topics), raw)
        held.append(one)
        size += _log_size(one)
    return held, size


def run(steps: Generator[None, None, T]) -> T:
    """A steps generator run to its end at once."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def _log_size(log: HeldLog) -> int:
    address, topics, raw = log
    getsizeof = sys.getsizeof
    return (
        _TUPLE_SIZE
        + getsizeof(address)
        + getsizeof(topics)
        + sum(getsizeof(t) for t in topics)
        + getsizeof(raw)
    )
