"""Installed filters (``eth_newFilter`` & co): the filter table and its change buffers.

Everything that decides what a poll returns lives here, with geth's semantics:

* A log filter collects the logs of every block the node adopts from the moment it is
  installed (bounded by a numeric ``fromBlock``/``toBlock``), and the same logs again with
  ``removed: true`` when their block is reorged away.
* A block filter collects the hashes of newly adopted blocks; a pending filter collects
  pending transaction hashes.
* ``eth_getFilterChanges`` returns what was collected since the last poll and empties it.
* A filter nobody polls for ``idle_timeout`` seconds is gone ("filter not found").
* A filter's buffer holds at most ``max_changes`` entries: past that the oldest are
  dropped and counted, so a filter polled too rarely cannot grow memory.

The table is fed by the node's own head stream, never by an upstream's filter, so a filter
survives the loss of any upstream. Sans-I/O: time is passed in as ``now``, ids come from an
injected source of random bytes; no asyncio, no sockets.
"""

from __future__ import annotations

import enum
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from chainrelay.errors import FilterNotFound, InvalidParams, TooManyFilters
from chainrelay.protocol.logfilter import LogFilter

# The methods this table answers; the policy table classes them as never cached.
FILTER_METHODS = frozenset(
    {
        "eth_newFilter",
        "eth_newBlockFilter",
        "eth_newPendingTransactionFilter",
        "eth_getFilterChanges",
        "eth_getFilterLogs",
        "eth_uninstallFilter",
    }
)

# geth's rpc.NewID: 16 random bytes.
_ID_BYTES = 16


class FilterKind(enum.Enum):
    LOGS = "logs"
    BLOCKS = "blocks"
    PENDING = "pending"


class BlockLike(Protocol):
    """What the table reads of one adopted (or reorged-away) block."""

    @property
    def hash(self) -> str: ...

    @property
    def logs(self) -> list[dict[str, Any]]: ...

    @property
    def removed(self) -> bool: ...


@dataclass(slots=True)
class Filter:
    id: str
    kind: FilterKind
    criteria: LogFilter | None
    last_poll: float
    changes: deque[Any] = field(default_factory=deque)
    dropped: int = 0  # entries dropped from a full buffer since install


def new_id(token: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A filter id as geth makes one: ``0x`` and 16 random bytes of hex, leading zeros cut."""
    return "0x" + (token(_ID_BYTES).hex().lstrip("0") or "0")


def live_filter(obj: Any) -> LogFilter:
    """The criteria of ``eth_newFilter``: geth accepts only ranges that reach new blocks.

    ``fromBlock``/``toBlock`` may each be omitted, ``latest`` or a number; ``pending`` and the
    other tags are refused, as is ``blockHash`` (a filter on one block never has changes).
    """
    flt = LogFilter.parse(obj)
    if flt.block_hash is not None:
        raise InvalidParams("invalid filter: blockHash is not supported for installed filters")
    if "pending" in (flt.from_block, flt.to_block):
        raise InvalidParams("pending logs are not supported")
    for ref in (flt.from_block, flt.to_block):
        if isinstance(ref, str) and ref != "latest":
            raise InvalidParams(f"invalid from and to block combination: {ref!r} not supported")
    if isinstance(flt.from_block, str) and isinstance(flt.to_block, int):
        raise InvalidParams("invalid from and to block combination")
    return flt


class FilterTable:
    """Every filter installed on this node; the service calls it, nothing else mutates it."""

    def __init__(
        self,
        *,
        idle_timeout: float,
        max_filters: int,
        max_changes: int,
        token: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_filters = max_filters
        self.max_changes = max_changes
        self._token = token
        self.filters: dict[str, Filter] = {}
        # Log filters by the addresses they name, and those naming none: a block's logs are
        # matched only against filters that can want them.
        self._by_address: dict[str, set[str]] = {}
        self._any_address: set[str] = set()
        self._block_filters: set[str] = set()
        self._pending_filters: set[str] = set()
        self.dropped_total = 0  # entries dropped from full buffers, every filter together
        self.expired_total = 0

    def __len__(self) -> int:
        return len(self.filters)

    @property
    def wants_blocks(self) -> bool:
        """True while a log or block filter is installed: only then is the feed needed."""
        return bool(self._block_filters or self._any_address or self._by_address)

    @property
    def wants_pending(self) -> bool:
        return bool(self._pending_filters)

    # --- install / uninstall -------------------------------------------------------------
    def install(self, kind: FilterKind, criteria: LogFilter | None, now: float) -> str:
        """Install a filter and return its id; raises ``TooManyFilters`` when full."""
        if len(self.filters) >= self.max_filters:
            self.expire(now)
            if len(self.filters) >= self.max_filters:
                raise TooManyFilters(f"too many filters: at most {self.max_filters} per node")
        if kind is FilterKind.LOGS and criteria is None:
            raise ValueError("a log filter needs criteria")
        fid = new_id(self._token)
        while fid in self.filters:  # 128 random bits: never in practice, but cheap to rule out
            fid = new_id(self._token)
        self.filters[fid] = Filter(fid, kind, criteria, now)
        if kind is FilterKind.LOGS:
            assert criteria is not None
            if criteria.addresses is None:
                self._any_address.add(fid)
            else:
                for a in criteria.addresses:
                    self._by_address.setdefault(a, set()).add(fid)
        elif kind is FilterKind.BLOCKS:
            self._block_filters.add(fid)
        else:
            self._pending_filters.add(fid)
        return fid

    def uninstall(self, fid: Any) -> bool:
        """True when a filter of that id was installed (geth answers the same bool)."""
        f = self.filters.pop(fid, None) if isinstance(fid, str) else None
        if f is None:
            return False
        if f.kind is FilterKind.LOGS:
            assert f.criteria is not None
            if f.criteria.addresses is None:
                self._any_address.discard(fid)
            else:
                for a in f.criteria.addresses:
                    ids = self._by_address.get(a)
                    if ids is not None:
                        ids.discard(fid)
                        if not ids:
                            del self._by_address[a]
        elif f.kind is FilterKind.BLOCKS:
            self._block_filters.discard(fid)
        else:
            self._pending_filters.discard(fid)
        return True

    def get(self, fid: Any, now: float) -> Filter:
        """The live filter of that id, or ``FilterNotFound`` (an expired one is removed)."""
        f = self.filters.get(fid) if isinstance(fid, str) else None
        if f is None:
            raise FilterNotFound("filter not found")
        if now - f.last_poll > self.idle_timeout:
            self.uninstall(fid)
            self.expired_total += 1
            raise FilterNotFound("filter not found")
        return f

    # --- polls ---------------------------------------------------------------------------
    def poll(self, fid: Any, now: float) -> list[Any]:
        """``eth_getFilterChanges``: everything collected since the last poll, in order."""
        f = self.get(fid, now)
        f.last_poll = now
        out = list(f.changes)
        f.changes.clear()
        return out

    def expire(self, now: float) -> list[str]:
        """Remove every filter idle for longer than ``idle_timeout``; their ids."""
        gone = [fid for fid, f in self.filters.items() if now - f.last_poll > self.idle_timeout]
        for fid in gone:
            self.uninstall(fid)
        self.expired_total += len(gone)
        return gone

    # --- the head stream -------------------------------------------------------------------
    def _push(self, f: Filter, item: Any) -> None:
        changes = f.changes
        if len(changes) >= self.max_changes:
            changes.popleft()
            f.dropped += 1
            self.dropped_total += 1
        changes.append(item)

    def on_blocks(self, events: Iterable[BlockLike]) -> None:
        """Feed blocks adopted or reorged away, in the order the head stream reports them.

        The logs of a removed block are expected to carry ``removed: true`` already.
        """
        filters = self.filters
        for ev in events:
            if not ev.removed:
                for fid in self._block_filters:
                    self._push(filters[fid], ev.hash)
            if not self._any_address and not self._by_address:
                continue
            for lg in ev.logs:
                self._match_log(lg)

    def _match_log(self, lg: Mapping[str, Any]) -> None:
        address = lg.get("address")
        named = self._by_address.get(address.lower()) if isinstance(address, str) else None
        if named:
            candidates: Iterable[str] = self._any_address | named if self._any_address else named
        else:
            candidates = self._any_address
        filters = self.filters
        for fid in candidates:
            f = filters[fid]
            assert f.criteria is not None
            if f.criteria.matches(lg):
                self._push(f, lg)

    def on_pending(self, tx_hash: str) -> None:
        """Feed one pending transaction hash."""
        filters = self.filters
        for fid in self._pending_filters:
            self._push(filters[fid], tx_hash)
