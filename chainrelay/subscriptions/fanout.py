"""What the subscription fan-out decides, apart from how it writes: which logs filters a
log can match, in which order a reorg's logs go out, and which notifications wait for the
answer that announces their subscription.

Sans-I/O: ids and frames are bytes in, lists of bytes out; the service writes them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from chainrelay.subscriptions.logfilter import LogFilter

M = TypeVar("M")


class LogRoutes(Generic[M]):
    """Logs subscriptions grouped by filter, the groups indexed by address and by topic0.

    Subscribers with one filter (one dapp, many users) share one group and one match per
    log. A group is found through its filter's addresses, else its topic0 values, else it
    sits in the match-all list: a log is matched only against the groups that can take it,
    not against every group of the node.
    """

    __slots__ = ("_by_address", "_by_topic0", "_match_all", "groups")

    def __init__(self) -> None:
        self.groups: dict[LogFilter, dict[bytes, M]] = {}
        self._by_address: dict[str, dict[LogFilter, dict[bytes, M]]] = {}
        self._by_topic0: dict[str, dict[LogFilter, dict[bytes, M]]] = {}
        self._match_all: dict[LogFilter, dict[bytes, M]] = {}

    def __bool__(self) -> bool:
        return bool(self.groups)

    def _places(self, flt: LogFilter) -> Iterator[dict[LogFilter, dict[bytes, M]]]:
        if flt.addresses is not None:
            for address in flt.addresses:
                yield self._by_address.setdefault(address, {})
        elif flt.topics and flt.topics[0] is not None:
            for topic in flt.topics[0]:
                yield self._by_topic0.setdefault(topic, {})
        else:
            yield self._match_all

    def add(self, flt: LogFilter, sub_id: bytes, member: M) -> bool:
        """Route ``flt``'s logs to ``sub_id`` too; True when no group had this filter yet."""
        group = self.groups.get(flt)
        if group is not None:
            group[sub_id] = member
            return False
        group = self.groups[flt] = {sub_id: member}
        for place in self._places(flt):
            place[flt] = group
        return True

    def remove(self, flt: LogFilter, sub_id: bytes) -> bool:
        """Stop routing to ``sub_id``; True when that emptied (and dropped) its group."""
        group = self.groups.get(flt)
        if group is None or group.pop(sub_id, None) is None or group:
            return False
        del self.groups[flt]
        if flt.addresses is not None:
            keys: Iterable[str] = flt.addresses
            index = self._by_address
        elif flt.topics and flt.topics[0] is not None:
            keys, index = flt.topics[0], self._by_topic0
        else:
            del self._match_all[flt]
            return True
        for key in keys:
            place = index[key]
            del place[flt]
            if not place:
                del index[key]
        return True

    def candidates(self, log: Mapping[str, Any]) -> list[tuple[LogFilter, dict[bytes, M]]]:
        """The groups whose filter can match ``log`` (each at most once), still to be
        matched with ``LogFilter.matches``."""
        out: list[tuple[LogFilter, dict[bytes, M]]] = []
        address = log.get("address")
        if self._by_address and isinstance(address, str):
            place = self._by_address.get(address.lower())
            if place:
                out.extend(place.items())
        if self._by_topic0:
            topics = log.get("topics")
            if isinstance(topics, list) and topics and isinstance(topics[0], str):
                place = self._by_topic0.get(topics[0].lower())
                if place:
                    out.extend(place.items())
        if self._match_all:
            out.extend(self._match_all.items())
        return out

    def route(self, log: Mapping[str, Any]) -> list[dict[bytes, M]]:
        """The subscriber groups ``log`` goes to."""
        return [group for flt, group in self.candidates(log) if flt.matches(log)]


class Block(Protocol):
    @property
    def number(self) -> int: ...

    @property
    def removed(self) -> bool: ...


B = TypeVar("B", bound=Block)


def geth_order(events: Sequence[B]) -> list[B]:
    """Blocks in the order their logs go out, as geth emits them after a reorg.

    go-ethereum's ``reorg()``: "Deleted log emission on the API uses forward order": each
    run of removed blocks goes out oldest block first (each block's logs in log-index
    order, as they come), then the new chain's blocks as they come. The feed hands removed
    blocks newest first, so each run of them is turned around here.
    """
    out: list[B] = []
    run: list[B] = []
    for ev in events:
        if ev.removed:
            run.append(ev)
            continue
        if run:
            out.extend(sorted(run, key=_number))
            run = []
        out.append(ev)
    if run:
        out.extend(sorted(run, key=_number))
    return out


def _number(ev: Block) -> int:
    return ev.number


class Held(enum.Enum):
    """What ``HeldNotifications.hold`` did with a frame."""

    SEND = "send"  # its subscription is announced: send it now
    HELD = "held"  # kept until the answer announcing its subscription goes out
    OVERFLOW = "overflow"  # past the connection's bound: the connection must be closed


class HeldNotifications:
    """Frames of one connection's subscriptions whose id has not reached the client yet.

    A notification must never reach a client before the answer naming its subscription, so
    its frames wait here; the bound is per connection, in frames and in bytes, and going
    past it is the caller's cue to close the connection (a client that never takes its
    answers cannot make the node hold memory for it).
    """

    __slots__ = ("_frames", "bytes", "count", "max_bytes", "max_count")

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._frames: dict[bytes, list[bytes]] = {}
        self.count = 0
        self.bytes = 0

    def __bool__(self) -> bool:
        return bool(self._frames)

    def __contains__(self, sub_id: bytes) -> bool:
        return sub_id in self._frames

    def wait(self, sub_id: bytes) -> None:
        """``sub_id`` was just given out: its frames wait for the answer naming it."""
        self._frames.setdefault(sub_id, [])

    def hold(self, sub_id: bytes, frame: bytes) -> Held:
        """Keep ``frame`` while ``sub_id`` is unannounced; SEND when it is announced."""
        frames = self._frames.get(sub_id)
        if frames is None:
            return Held.SEND
        if self.count + 1 > self.max_count or self.bytes + len(frame) > self.max_bytes:
            return Held.OVERFLOW
        frames.append(frame)
        self.count += 1
        self.bytes += len(frame)
        return Held.HELD

    def announced(self, payload: bytes) -> bytes:
        """An answer went out: the frames of the subscriptions it names, to send now."""
        out: list[bytes] = []
        # Quoted: a trimmed id may be the prefix of another id or of some hex in the answer.
        for sub_id in [s for s in self._frames if b'"' + s + b'"' in payload]:
            out.extend(self._drop(sub_id))
        return b"".join(out)

    def forget(self, sub_id: bytes) -> None:
        """``sub_id`` was cancelled: its held frames are never sent."""
        self._drop(sub_id)

    def _drop(self, sub_id: bytes) -> list[bytes]:
        frames = self._frames.pop(sub_id, None)
        if not frames:
            return []
        self.count -= len(frames)
        self.bytes -= sum(len(f) for f in frames)
        return frames

    def clear(self) -> None:
        self._frames.clear()
        self.count = self.bytes = 0
