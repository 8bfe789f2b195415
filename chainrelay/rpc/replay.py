"""Replay tables: what answered a request, found again by the request's bytes at one head.

Dapps poll: the same call, byte for byte but its id, comes again and again within a block.
A table keyed by those bytes (or by a call's method and params) lets a repeat skip the work
its first answer took: parsing, decoding, planning. Every such table in the node is a
``ReplayTable``: the HTTP front door's whole-request replays, the pipeline's seen bodies,
its forwarded bodies and its memo of plans.

A table holds entries of one head generation (``HeadView.generation``) only: the first
addition at a new generation starts it over, so it never keeps older cache entries alive
and never answers for another head. It is bounded by entries and by bytes (``[limits]
max_hit_table_entries`` / ``max_hit_table_bytes``): an addition that would pass either bound
starts it over too, which only costs the next repeats one trip through the full path.

Lookups are plain dict lookups (``get``): they are on the hot paths. An entry is valid
only at the table's ``generation``; a caller whose values do not carry their own
generation reads them through ``get_at``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from chainrelay.rpc.cache import Entry

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_ABSENT: object = object()


class ReplayTable(Generic[K, V]):
    """A dict scoped to one head generation and bounded in entries and bytes.

    ``size(key, value)``: what an entry is counted for against ``max_bytes`` (the bytes it
    keeps alive, with any overhead the caller counts). Written only through ``add``.
    """

    __slots__ = ("_entries", "_size", "bytes", "generation", "get", "max_bytes", "max_entries")

    def __init__(self, max_bytes: int, max_entries: int, size: Callable[[K, V], int]) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._size = size
        self._entries: dict[K, V] = {}
        # Bound once: the dict is only ever cleared, never replaced.
        self.get = self._entries.get
        self.generation = -1
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def get_at(self, key: K, generation: int, default: V | None = None) -> V | None:
        """The entry for ``key`` if the table holds one of ``generation``."""
        if generation != self.generation:
            return default
        return self._entries.get(key, default)

    def add(self, key: K, value: V, generation: int) -> None:
        """Hold ``value`` for ``key`` at ``generation``, replacing any entry of that key;
        the table starts over first when the entry is of a new generation or would take
        it past a bound."""
        entries = self._entries
        size = self._size(key, value)
        old = entries.get(key, _ABSENT) if generation == self.generation else _ABSENT
        freed = 0 if old is _ABSENT else self._size(key, old)  # type: ignore[arg-type]
        if (
            generation != self.generation
            or (old is _ABSENT and len(entries) >= self.max_entries)
            or self.bytes - freed + size > self.max_bytes
        ):
            self.clear()
            self.generation = generation
            freed = 0
        entries[key] = value
        self.bytes += size - freed

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


class Seen:
    """A call answered at one head (view generation) from cache or locally, recognised
    later by its bytes without its id: a repeat is answered with no decoding or planning.

    Whether an entry's block is canonical cannot change within a generation (every change
    of the canonical window bumps it), so the check made when the call was first answered
    holds for every repeat while ``entry`` is still the one the cache holds.
    """

    __slots__ = ("entry", "generation", "key", "method", "slot", "value")

    def __init__(
        self,
        generation: int,
        method: str,
        key: bytes | None,
        entry: Entry | None,
        value: bytes,
        slot: list[int],
    ) -> None:
        self.generation = generation
        self.method = method
        self.key = key  # None: a local answer (eth_chainId, eth_blockNumber), ``value``
        self.entry = entry
        self.value = value
        self.slot = slot  # the (method, outcome) counter in Metrics
