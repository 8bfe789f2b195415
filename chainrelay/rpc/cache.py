"""The in-process answer cache: an LRU bounded in bytes.

A cached value is the raw JSON of a result (see ``wire.jsonrpc``). Entries that belong to a
block carry that block's (number, hash) so a hit can be refused once the block has been
reorged away; realtime entries carry an expiry.
"""

from __future__ import annotations

import time
import typing
from collections import OrderedDict
from typing import Final

if typing.TYPE_CHECKING:
    from chainrelay.rpc.policy import Storing

# Per-entry bookkeeping (key, tuple, dict slot) on CPython, counted against the byte bound.
ENTRY_OVERHEAD = 120


# A cached answer: (value, expires, anchor_number, anchor_hash), a plain tuple. ``expires``:
# a monotonic deadline, 0 for never; the anchor: the block it belongs to (number, hash), or
# (-1, None). A tuple of such atoms is untracked by the cyclic garbage collector the first
# time it survives a collection, so no collection walks the cached answers one by one,
# nor counts them toward the next full collection: with an object of a class of its own
# per entry, a cache of 300,000 answers made every full collection take 75 ms on a 2-core
# machine (a stall of the event loop), and came round every few blocks of a busy chain as
# the cache was refilled; as plain tuples, 21 ms (the LRU's dict, still walked). A tuple
# subclass (a NamedTuple) is never untracked: 93 ms.
Entry = tuple[bytes, float, int, str | None]
VALUE: Final = 0
EXPIRES: Final = 1
ANCHOR_NUMBER: Final = 2
ANCHOR_HASH: Final = 3


def new_entry(
    value: bytes, expires: float = 0.0, anchor_number: int = -1, anchor_hash: str | None = None
) -> Entry:
    return (value, expires, anchor_number, anchor_hash)


def stored_entry(value: bytes, how: Storing) -> Entry:
    """The entry that holds ``value`` as ``policy.store_decision`` said (``how``).

    Held in an allocation of its own size: a value encoded here by orjson (a block's part
    warmed from the follower's answer, a derived receipt) keeps the buffer orjson grew for
    it otherwise (from 3.12 on it is never trimmed: a 700-byte answer holds 4-8 KiB), which
    the byte bound, counting ``len``, would not see."""
    expires = time.monotonic() + how.lifetime if how.lifetime else 0.0
    return (bytes(memoryview(value)), expires, how.anchor_number, how.anchor_hash)


class MemoryCache:
    """An LRU over raw answers, never holding more than ``max_bytes`` (keys included).

    ``get`` is synchronous and allocation-free on a hit: it is on the cache-hit hot path.
    """

    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.bytes = 0
        self._data: OrderedDict[bytes, Entry] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> Entry | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires = entry[EXPIRES]
        if expires and expires < time.monotonic():
            self._drop(key, entry)
            return None
        self._data.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> bool:
        """Store ``entry``; False when it alone is over the per-entry limit."""
        size = len(key) + len(entry[VALUE]) + ENTRY_OVERHEAD
        if size > self.max_entry_bytes or size > self.max_bytes:
            return False
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= len(key) + len(old[VALUE]) + ENTRY_OVERHEAD
        self._data[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            k, e = self._data.popitem(last=False)
            self.bytes -= len(k) + len(e[VALUE]) + ENTRY_OVERHEAD
            self.evictions += 1
        return True

    def discard(self, key: bytes) -> None:
        entry = self._data.get(key)
        if entry is not None:
            self._drop(key, entry)

    def _drop(self, key: bytes, entry: Entry) -> None:
        del self._data[key]
        self.bytes -= len(key) + len(entry[VALUE]) + ENTRY_OVERHEAD
