"""Log filters: parse a filter object once, then test logs against it.

Used by ``eth_newFilter``, ``eth_getLogs`` ranges and ``eth_subscribe("logs")`` alike, so
the node matches logs from its own head stream instead of holding a filter on one upstream
(which an upstream failover would lose). Semantics are geth's ``eth/filters`` package:

* ``address`` is one address or a list (OR); an empty list or ``null`` matches any.
* ``topics`` is a list of positions; each is ``null`` / ``[]`` (any), one topic, or a list
  (OR) in which a ``null`` makes the whole position a wildcard.
* A filter with fewer positions than a log has topics matches on the positions it names;
  one with *more* positions than the log has topics never matches, wildcards included.
* Hex is compared case-insensitively; everything is kept lower-case.

Sans-I/O: no asyncio, no sockets.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from chainrelay import defaults
from chainrelay.errors import InvalidParams

# geth's maxTopics: the EVM's LOG0..LOG4 carry at most four topics, so a fifth position
# could never match.
MAX_TOPIC_POSITIONS = 4
# The defaults of the per-filter bounds (reasons in defaults.py); parse takes others.
MAX_FILTER_ADDRESSES = defaults.MAX_FILTER_ADDRESSES
MAX_TOPICS_PER_POSITION = defaults.MAX_TOPICS_PER_POSITION

BLOCK_TAGS = frozenset({"latest", "earliest", "pending", "safe", "finalized"})
_HEX = frozenset("0123456789abcdef")
_ADDRESS_LEN = 2 + 40
_TOPIC_LEN = 2 + 64


def _hex_of_length(value: Any, length: int, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidParams(f"invalid {what}: expected a hex string, got {type(value).__name__}")
    low = value.lower()
    if not low.startswith("0x"):
        raise InvalidParams(f"invalid {what} {value[:80]!r}: missing 0x prefix")
    if len(low) != length or not _HEX.issuperset(low[2:]):
        nbytes = (length - 2) // 2
        raise InvalidParams(f"invalid {what} {value[:80]!r}: expected {nbytes} bytes of hex")
    return low


def _parse_addresses(raw: Any, most: int) -> frozenset[str] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return frozenset((_hex_of_length(raw, _ADDRESS_LEN, "address"),))
    if isinstance(raw, list):
        if len(raw) > most:
            raise InvalidParams(f"too many addresses: at most {most}")
        if not raw:
            return None
        return frozenset(_hex_of_length(a, _ADDRESS_LEN, "address") for a in raw)
    raise InvalidParams("invalid address: expected a string or a list of strings")


def _parse_position(raw: Any, most: int) -> frozenset[str] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return frozenset((_hex_of_length(raw, _TOPIC_LEN, "topic"),))
    if isinstance(raw, list):
        if len(raw) > most:
            raise InvalidParams(f"too many topics in one position: at most {most}")
        out: set[str] = set()
        wildcard = not raw
        for item in raw:
            if item is None:
                # geth: a null inside an OR list matches anything at this position, but the
                # rest of the list must still be well-formed.
                wildcard = True
                continue
            out.add(_hex_of_length(item, _TOPIC_LEN, "topic"))
        return None if wildcard else frozenset(out)
    raise InvalidParams("invalid topic: expected null, a string or a list")


def _parse_topics(raw: Any, most: int) -> tuple[frozenset[str] | None, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidParams("invalid topics: expected a list")
    if len(raw) > MAX_TOPIC_POSITIONS:
        raise InvalidParams(f"exceed max topics: at most {MAX_TOPIC_POSITIONS} positions")
    return tuple(_parse_position(p, most) for p in raw)


def _parse_block(raw: Any, what: str) -> str | int | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidParams(f"invalid {what}: expected a block tag or a hex number")
    if raw in BLOCK_TAGS:
        return raw
    low = raw.lower()
    # 0x plus at most 16 digits: a 64-bit block number, like geth's BlockNumber.
    if not low.startswith("0x") or not 2 < len(low) <= 18 or not _HEX.issuperset(low[2:]):
        raise InvalidParams(f"invalid {what} {raw[:80]!r}: expected a block tag or a hex number")
    return int(low, 16)


def block_param(ref: str | int | None) -> str | None:
    """The JSON-RPC form of a parsed ``from_block``/``to_block`` (None stays None)."""
    if ref is None or isinstance(ref, str):
        return ref
    return hex(ref)


def _hex_int(value: Any) -> int | None:
    if isinstance(value, str) and value[:2] in ("0x", "0X") and 2 < len(value) <= 18:
        try:
            return int(value, 16)
        except ValueError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


@dataclass(frozen=True, slots=True)
class LogFilter:
    """A parsed filter object; ``matches`` decides whether one log belongs to it."""

    addresses: frozenset[str] | None  # lower-case 0x hex; None = any
    topics: tuple[frozenset[str] | None, ...]  # per position; None = wildcard
    from_block: str | int | None = None  # tag or number, for eth_newFilter/eth_getLogs ranges
    to_block: str | int | None = None
    block_hash: str | None = None

    @classmethod
    def parse(
        cls,
        obj: Any,
        *,
        max_addresses: int = MAX_FILTER_ADDRESSES,
        max_topics_per_position: int = MAX_TOPICS_PER_POSITION,
    ) -> LogFilter:
        """Parse a JSON-RPC filter object; raises ``InvalidParams`` naming what is wrong.

        Call once per request or subscription, never per log: matching then does no
        parsing. Unknown keys are ignored, as geth does. The bounds are the node's
        configured ones (``[filters]``); a longer list is refused, never truncated.
        """
        if obj is None:
            obj = {}
        if not isinstance(obj, Mapping):
            raise InvalidParams("invalid filter: expected an object")
        block_hash_raw = obj.get("blockHash")
        from_raw, to_raw = obj.get("fromBlock"), obj.get("toBlock")
        block_hash = None
        if block_hash_raw is not None:
            if from_raw is not None or to_raw is not None:
                raise InvalidParams(
                    "cannot specify both BlockHash and FromBlock/ToBlock, choose one or the other"
                )
            block_hash = _hex_of_length(block_hash_raw, _TOPIC_LEN, "blockHash")
        from_block = _parse_block(from_raw, "fromBlock")
        to_block = _parse_block(to_raw, "toBlock")
        if isinstance(from_block, int) and isinstance(to_block, int) and from_block > to_block:
            raise InvalidParams(
                f"invalid block range: fromBlock {from_block} is after toBlock {to_block}"
            )
        return cls(
            addresses=_parse_addresses(obj.get("address"), max_addresses),
            topics=_parse_topics(obj.get("topics"), max_topics_per_position),
            from_block=from_block,
            to_block=to_block,
            block_hash=block_hash,
        )

    def matches(self, log: Mapping[str, Any]) -> bool:
        """True when ``log`` (a JSON-RPC log object) passes this filter.

        Numeric ``from_block``/``to_block`` bound the log's ``blockNumber`` as geth's event
        system does for installed filters; tags bound nothing here (the caller resolves
        them against its head). A malformed log never matches and never raises.
        """
        if self.addresses is not None:
            address = log.get("address")
            if not isinstance(address, str) or address.lower() not in self.addresses:
                return False
        if isinstance(self.from_block, int) or isinstance(self.to_block, int):
            number = _hex_int(log.get("blockNumber"))
            if number is None:
                return False
            if isinstance(self.from_block, int) and number < self.from_block:
                return False
            if isinstance(self.to_block, int) and number > self.to_block:
                return False
        if not self.topics:
            return True
        topics = log.get("topics")
        if not isinstance(topics, list) or len(self.topics) > len(topics):
            return False
        for wanted, got in zip(self.topics, topics, strict=False):
            if wanted is None:
                continue
            if not isinstance(got, str) or got.lower() not in wanted:
                return False
        return True

    def matches_fields(self, address: str, topics: tuple[str, ...]) -> bool:
        """``matches`` for a log already reduced to its lower-case address and topics (the
        block bounds aside): the logs a node holds are matched without a dict per log."""
        if self.addresses is not None and address not in self.addresses:
            return False
        if not self.topics:
            return True
        if len(self.topics) > len(topics):
            return False
        for wanted, got in zip(self.topics, topics, strict=False):
            if wanted is not None and got not in wanted:
                return False
        return True

    def to_params(self) -> dict[str, Any]:
        """This filter as an ``eth_getLogs`` filter object (lower-case hex)."""
        out: dict[str, Any] = {}
        if self.block_hash is not None:
            out["blockHash"] = self.block_hash
        else:
            if self.from_block is not None:
                out["fromBlock"] = block_param(self.from_block)
            if self.to_block is not None:
                out["toBlock"] = block_param(self.to_block)
        if self.addresses is not None:
            out["address"] = sorted(self.addresses)
        if self.topics:
            out["topics"] = [None if p is None else sorted(p) for p in self.topics]
        return out


def _log_index(log: Mapping[str, Any]) -> int:
    index = _hex_int(log.get("logIndex"))
    return -1 if index is None else index


def logs_of_receipts(receipts: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every log of a block's receipts, in log-index order.

    Receipts come in transaction order, so their logs already are in order; the sort is
    stable and only repairs an upstream that returns receipts shuffled.
    """
    steps = logs_of_receipts_steps(receipts, 0)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def logs_of_receipts_steps(
    receipts: Iterable[Mapping[str, Any]], step: int
) -> Generator[None, None, list[dict[str, Any]]]:
    """``logs_of_receipts``, yielding after every ``step`` receipts (0: never): a block of
    1,500 receipts is ~1.3 ms of work, taken in slices by the block follower."""
    logs: list[dict[str, Any]] = []
    keys: list[int] = []
    ordered = True
    last = -1
    for at, receipt in enumerate(receipts, 1):
        if isinstance(receipt, Mapping):
            got = receipt.get("logs")
            if isinstance(got, list):
                for log in got:
                    if isinstance(log, dict):
                        key = _log_index(log)
                        ordered = ordered and key >= last
                        last = key
                        logs.append(log)
                        keys.append(key)
        if step and at % step == 0:
            yield
    if not ordered:  # a stable sort by the keys found, as logs.sort(key=_log_index)
        order = sorted(range(len(logs)), key=keys.__getitem__)
        logs = [logs[i] for i in order]
    return logs
