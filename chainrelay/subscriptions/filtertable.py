"""Installed filters (``eth_newFilter`` & co): the filter table and its change buffers.

Everything that decides what a poll returns lives here, with geth's semantics:

* A log filter collects the logs of every block the node adopts from the moment it is
  installed (bounded by a numeric ``fromBlock``/``toBlock``), and the same logs again with
  ``removed: true`` when their block is reorged away.
* A block filter collects the hashes of newly adopted blocks; a pending filter collects
  pending transaction hashes.
* ``eth_getFilterChanges`` returns what was collected since the last poll and empties it;
  an answer is at most ``max_answer_bytes`` (``[logs]``, as an eth_getLogs answer): past
  it, the oldest changes that fit are answered and the rest kept, in order, for the next
  poll (changes are never split: one larger than the bound is answered alone).
* A filter nobody polls for ``idle_timeout`` seconds is gone ("filter not found").
* A filter's buffer holds at most ``max_changes`` entries: a filter that would hold more
  stops collecting (its buffer freed, counted), so a filter polled too rarely cannot grow
  memory; its client's next poll is answered -32005 saying so, and the filter is removed,
  so the poll after gets "filter not found", on which web3.py and ethers install a new
  filter and catch up with ``eth_getLogs`` (dropping changes silently would lose logs).
* Every filter's buffers together hold at most ``max_changes_total``: at that bound the
  largest buffers (the filters polled least) stop the same way, until a tenth of it is
  free, so many filters that nobody polls cannot make the node hold the chain's logs
  once for each of them.
* A reorg's removed logs come first, oldest orphaned block first, each block's logs in
  log-index order (geth's ``core/blockchain.go`` reorg: "Deleted log emission on the API
  uses forward order"); then the new chain's logs.
* A client (its identity: its API key, else its address) holds at most ``max_per_owner``
  filters, the node ``max_filters``.

Matching a block costs work in proportion to the filters that could want its logs: log
filters are indexed by the addresses they name, or failing that by their first topic;
only filters with neither (a small "match-all" list) are tried against every log.

The table is fed by the node's own head stream, never by an upstream's filter, so a filter
survives the loss of any upstream. Sans-I/O: time is passed in as ``now``, ids come from an
injected source of random bytes; no asyncio, no sockets.
"""

from __future__ import annotations

import enum
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from chainrelay.errors import FilterNotFound, FilterOverflowed, InvalidParams, TooManyFilters
from chainrelay.subscriptions.ids import ID_BYTES, encode_id
from chainrelay.subscriptions.logfilter import (
    MAX_FILTER_ADDRESSES,
    MAX_TOPICS_PER_POSITION,
    LogFilter,
)

# The bounds a filter's buffer may meet (their config keys, named in the -32005).
PER_FILTER = "filters.max_changes"
TOTAL = "filters.max_changes_total"
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

    @property
    def number(self) -> int: ...


@dataclass(slots=True)
class Filter:
    id: str
    kind: FilterKind
    criteria: LogFilter | None
    last_poll: float
    changes: deque[Any] = field(default_factory=deque)
    owner: str = ""  # the identity that installed it (key or address); "": not counted per client
    # Its buffer filled up: collects nothing more, told at a poll; the config key of the
    # bound it met ("" while it collects).
    overflowed: str = ""


def new_id(token: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A filter id as geth makes one: ``0x`` and 16 random bytes of hex, leading zeros cut."""
    return encode_id(token(ID_BYTES))


def live_filter(
    obj: Any,
    *,
    max_addresses: int = MAX_FILTER_ADDRESSES,
    max_topics_per_position: int = MAX_TOPICS_PER_POSITION,
) -> LogFilter:
    """The criteria of ``eth_newFilter``: geth accepts only ranges that reach new blocks.

    ``fromBlock``/``toBlock`` may each be omitted, ``latest`` or a number; ``pending`` and the
    other tags are refused, as is ``blockHash`` (a filter on one block never has changes).
    """
    flt = LogFilter.parse(
        obj, max_addresses=max_addresses, max_topics_per_position=max_topics_per_position
    )
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
        max_per_owner: int | None = None,
        max_changes_total: int | None = None,
        token: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_filters = max_filters
        self.max_changes = max_changes
        self.max_changes_total = (
            max_filters * max_changes if max_changes_total is None else max_changes_total
        )
        self.buffered = 0  # changes held in every filter's buffer together
        self.max_per_owner = max_filters if max_per_owner is None else max_per_owner
        self._token = token
        self.filters: dict[str, Filter] = {}
        self._per_owner: dict[str, int] = {}
        # Log filters by the addresses they name; those naming none by their first topic;
        # those with neither in the match-all set. Each log filter is in exactly one of the
        # three, so a log is matched once against each filter that can want it.
        self._by_address: dict[str, set[str]] = {}
        self._by_topic0: dict[str, set[str]] = {}
        self._match_all: set[str] = set()
        self._block_filters: set[str] = set()
        self._pending_filters: set[str] = set()
        self._overflowed: list[str] = []
        self.overflowed_total = 0  # filters expired because their buffer filled up
        self.expired_total = 0  # filters expired because nobody polled them

    def __len__(self) -> int:
        return len(self.filters)

    @property
    def wants_blocks(self) -> bool:
        """True while a log or block filter is installed: only then is the feed needed."""
        return bool(self._block_filters or self._match_all or self._by_address or self._by_topic0)

    @property
    def wants_pending(self) -> bool:
        return bool(self._pending_filters)

    def owned_by(self, owner: str) -> int:
        """How many filters the client ``owner`` (an identity's name) holds."""
        return self._per_owner.get(owner, 0)

    # --- install / uninstall -------------------------------------------------------------
    def install(
        self, kind: FilterKind, criteria: LogFilter | None, now: float, owner: str = ""
    ) -> str:
        """Install a filter for the client ``owner`` (an identity's name; "" when unknown:
        counted only against the node's limit) and return its id; raises ``TooManyFilters``
        when the node or that client holds as many as allowed."""
        if kind is FilterKind.LOGS and criteria is None:
            raise ValueError("a log filter needs criteria")
        if len(self.filters) >= self.max_filters or (
            owner and self._per_owner.get(owner, 0) >= self.max_per_owner
        ):
            self.expire(now)
            if len(self.filters) >= self.max_filters:
                raise TooManyFilters(f"too many filters: at most {self.max_filters} per node")
            if owner and self._per_owner.get(owner, 0) >= self.max_per_owner:
                raise TooManyFilters(
                    f"too many filters: at most {self.max_per_owner} per client"
                    " (its API key, or its address)"
                )
        fid = new_id(self._token)
        while fid in self.filters:  # 128 random bits: never in practice, but cheap to rule out
            fid = new_id(self._token)
        self.filters[fid] = Filter(fid, kind, criteria, now, owner=owner)
        if owner:
            self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        if kind is FilterKind.LOGS:
            assert criteria is not None
            places = self._index_of(criteria)
            if not places:
                self._match_all.add(fid)
            for index, keys in places:
                for key in keys:
                    index.setdefault(key, set()).add(fid)
        elif kind is FilterKind.BLOCKS:
            self._block_filters.add(fid)
        else:
            self._pending_filters.add(fid)
        return fid

    def _index_of(self, criteria: LogFilter) -> tuple[tuple[dict[str, set[str]], Any], ...]:
        """Where a log filter is indexed: (index, its keys) pairs, or none for match-all."""
        if criteria.addresses is not None:
            return ((self._by_address, criteria.addresses),)
        if criteria.topics and criteria.topics[0] is not None:
            return ((self._by_topic0, criteria.topics[0]),)
        return ()

    def uninstall(self, fid: Any) -> bool:
        """True when a filter of that id was installed (geth answers the same bool)."""
        f = self.filters.pop(fid, None) if isinstance(fid, str) else None
        if f is None:
            return False
        self.buffered -= len(f.changes)
        if f.owner:
            left = self._per_owner[f.owner] - 1
            if left:
                self._per_owner[f.owner] = left
            else:
                del self._per_owner[f.owner]
        self._unindex(f)
        return True

    def _unindex(self, f: Filter) -> None:
        """Match nothing more for ``f`` (uninstalled, or its buffer full)."""
        fid = f.id
        if f.kind is FilterKind.LOGS:
            assert f.criteria is not None
            places = self._index_of(f.criteria)
            if not places:
                self._match_all.discard(fid)
            for index, keys in places:
                for key in keys:
                    ids = index.get(key)
                    if ids is not None:
                        ids.discard(fid)
                        if not ids:
                            del index[key]
        elif f.kind is FilterKind.BLOCKS:
            self._block_filters.discard(fid)
        else:
            self._pending_filters.discard(fid)

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
        return orjson.loads(self.poll_encoded(fid, now))

    def poll_encoded(self, fid: Any, now: float, max_bytes: int | None = None) -> bytes:
        """``eth_getFilterChanges``' result, encoded: what was collected since the last
        poll, in order; when that is over ``max_bytes``, the oldest changes that fit (one
        at least), the others kept for the next poll. ``FilterOverflowed`` (and the filter
        removed) when its buffer filled up since the last poll."""
        f = self.get(fid, now)
        f.last_poll = now
        if f.overflowed:
            self.uninstall(fid)
            raise self._overflow_error(f.overflowed)
        changes = f.changes
        whole = orjson.dumps(list(changes))
        if max_bytes is None or len(whole) <= max_bytes:
            self.buffered -= len(changes)
            changes.clear()
            return whole
        # The rare page: each change encoded alone, to find where the bound falls.
        parts: list[bytes] = []
        size = 2  # the brackets
        while changes:
            one = orjson.dumps(changes[0])
            if parts and size + len(one) + 1 > max_bytes:
                break
            parts.append(one)
            size += len(one) + 1
            changes.popleft()
        self.buffered -= len(parts)
        return b"[" + b",".join(parts) + b"]"

    def _overflow_error(self, key: str) -> FilterOverflowed:
        if key == TOTAL:
            what = f"this node's filters hold {self.max_changes_total} changes in all"
            value = self.max_changes_total
        else:
            what = f"more than {self.max_changes} changes since the last poll"
            value = self.max_changes
        return FilterOverflowed(
            f"filter changes overflowed ({what}): changes were not kept, and the filter is "
            "removed; install a new filter and read the blocks since the last poll with "
            "eth_getLogs",
            {"limit": key, "value": value},
        )

    def expire(self, now: float) -> list[str]:
        """Remove every filter idle for longer than ``idle_timeout``; their ids."""
        gone = [fid for fid, f in self.filters.items() if now - f.last_poll > self.idle_timeout]
        for fid in gone:
            self.uninstall(fid)
        self.expired_total += len(gone)
        return gone

    # --- the head stream -------------------------------------------------------------------
    def _push(self, f: Filter, item: Any) -> None:
        if f.overflowed:
            return
        if len(f.changes) >= self.max_changes:
            self._stop(f, PER_FILTER)
            return
        if self.buffered >= self.max_changes_total:
            self._shed()
            if f.overflowed:
                return
        f.changes.append(item)
        self.buffered += 1

    def _stop(self, f: Filter, key: str) -> None:
        # Stopped, not trimmed: a poll must never look complete when changes were lost.
        f.overflowed = key
        self.buffered -= len(f.changes)
        f.changes = deque()
        self._overflowed.append(f.id)

    def _shed(self) -> None:
        """Every buffer together reached ``max_changes_total``: stop the largest (the
        filters polled least) until a tenth of it is free. Rare, so a sort is fine."""
        target = self.max_changes_total - self.max_changes_total // 10
        for f in sorted(self.filters.values(), key=_buffered, reverse=True):
            if self.buffered <= target or not f.changes:
                break
            self._stop(f, TOTAL)

    def _expire_overflowed(self) -> list[str]:
        """Stop matching for the filters whose buffer filled up in this feed call: they
        stay installed (and counted) until their next poll says so, or they idle out."""
        gone, self._overflowed = self._overflowed, []
        for fid in gone:
            f = self.filters.get(fid)
            if f is not None:
                self._unindex(f)
        self.overflowed_total += len(gone)
        return gone

    def on_blocks(self, events: Sequence[BlockLike]) -> list[str]:
        """Feed blocks adopted or reorged away, as the head stream reports them; the ids
        of filters whose buffer filled up (they match nothing more).

        The logs of a removed block are expected to carry ``removed: true`` already. The
        removed blocks of a reorg are reported oldest first, whatever order they come in.
        """
        filters = self.filters
        indexed = self._match_all or self._by_address or self._by_topic0
        i, n = 0, len(events)
        while i < n:
            ev = events[i]
            if ev.removed:
                j = i + 1
                while j < n and events[j].removed:
                    j += 1
                run: Iterable[BlockLike] = sorted(events[i:j], key=_number)
                i = j
            else:
                run = (ev,)
                i += 1
                for fid in self._block_filters:
                    self._push(filters[fid], ev.hash)
            if not indexed:
                continue
            for block in run:
                for lg in block.logs:
                    self._match_log(lg)
        return self._expire_overflowed() if self._overflowed else []

    def _match_log(self, lg: Mapping[str, Any]) -> None:
        filters = self.filters
        address = lg.get("address")
        if isinstance(address, str) and self._by_address:
            named = self._by_address.get(address.lower())
            if named:
                for fid in named:
                    f = filters[fid]
                    if f.criteria.matches(lg):  # type: ignore[union-attr]
                        self._push(f, lg)
        if self._by_topic0:
            topics = lg.get("topics")
            if isinstance(topics, list) and topics and isinstance(topics[0], str):
                named = self._by_topic0.get(topics[0].lower())
                if named:
                    for fid in named:
                        f = filters[fid]
                        if f.criteria.matches(lg):  # type: ignore[union-attr]
                            self._push(f, lg)
        for fid in self._match_all:
            f = filters[fid]
            if f.criteria.matches(lg):  # type: ignore[union-attr]
                self._push(f, lg)

    def on_pending(self, tx_hash: str) -> list[str]:
        """Feed one pending transaction hash; the ids of filters whose buffer filled up."""
        filters = self.filters
        for fid in self._pending_filters:
            self._push(filters[fid], tx_hash)
        return self._expire_overflowed() if self._overflowed else []


def _number(block: BlockLike) -> int:
    return block.number


def _buffered(f: Filter) -> int:
    return len(f.changes)
