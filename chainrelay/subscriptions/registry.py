"""eth_subscribe / eth_unsubscribe: their params, subscription ids and notification bytes.

A notification is spliced from pre-encoded parts: the result is encoded once per block (or
log, or transaction) and shared by every subscriber; only the subscription id differs. The
fan-out splices whole WebSocket frames the same way (``NotificationFrames``): a server's
frame is unmasked, and with no extension negotiated a final text frame is its length
header and the payload, so one template per result serves every subscriber.
Sans-I/O: randomness comes in as bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chainrelay.defaults import MAX_FILTER_ADDRESSES, MAX_TOPICS_PER_POSITION
from chainrelay.errors import InvalidParams, MethodNotFound
from chainrelay.subscriptions.ids import ID_BYTES as ID_BYTES  # the service draws this many
from chainrelay.subscriptions.ids import encode_id
from chainrelay.subscriptions.logfilter import LogFilter

NEW_HEADS = "newHeads"
LOGS = "logs"
PENDING = "newPendingTransactions"
SYNCING = "syncing"
KINDS = (NEW_HEADS, LOGS, PENDING, SYNCING)

_NOTE_HEAD = b'{"jsonrpc":"2.0","method":"eth_subscription","params":{"subscription":"'
_NOTE_MID = b'","result":'
_NOTE_TAIL = b"}}"
_FIN_TEXT = 0x81  # first byte of a final text frame: FIN set, opcode 1, no reserved bits


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    kind: str
    filter: LogFilter | None = None  # logs only
    full: bool = False  # newPendingTransactions only: full transaction objects, not hashes


def parse_subscribe(
    params: Any,
    *,
    max_addresses: int = MAX_FILTER_ADDRESSES,
    max_topics_per_position: int = MAX_TOPICS_PER_POSITION,
) -> SubscribeRequest:
    """The subscription an ``eth_subscribe`` asks for; a logs filter within the node's
    configured bounds (``[filters]``).

    Raises ``MethodNotFound`` for an unknown kind (geth's answer) and ``InvalidParams`` for
    params of the wrong shape.
    """
    if not isinstance(params, list) or not params:
        raise InvalidParams("missing value for required argument 0")
    kind = params[0]
    if not isinstance(kind, str):
        raise InvalidParams("invalid argument 0: expected a subscription name")
    if kind not in KINDS:
        raise MethodNotFound(f'no "{kind}" subscription in eth namespace')
    if kind == LOGS:
        if len(params) > 2:
            raise InvalidParams("too many arguments, want at most 2")
        flt = LogFilter.parse(
            params[1] if len(params) > 1 else None,
            max_addresses=max_addresses,
            max_topics_per_position=max_topics_per_position,
        )
        return SubscribeRequest(LOGS, live_logs(flt))
    if kind == PENDING and len(params) == 2 and isinstance(params[1], bool):
        # geth's fullTx flag (web3.py sends True for full transactions).
        return SubscribeRequest(PENDING, full=params[1])
    # geth accepts and ignores an options object after newPendingTransactions/syncing only
    # when it is null; anything more is an argument the subscription does not take.
    if len(params) > 1 and any(p is not None for p in params[1:]):
        raise InvalidParams("too many arguments, want at most 1")
    return SubscribeRequest(kind)


def live_logs(flt: LogFilter) -> LogFilter:
    """The filter of a logs subscription: new logs only, as geth's subscriptions allow.

    geth refuses pending logs and block ranges for a subscription; ``fromBlock``/``toBlock``
    may be omitted or ``latest`` only, and no ``blockHash``. The tags are dropped so that
    subscribers asking the same thing share one filter group.
    """
    if flt.block_hash is not None:
        raise InvalidParams("invalid filter: blockHash is not supported for subscriptions")
    for name, ref in (("fromBlock", flt.from_block), ("toBlock", flt.to_block)):
        if ref is not None and ref != "latest":
            raise InvalidParams(
                f"invalid filter: {name} {ref!r} not supported, subscriptions deliver new"
                " logs only (omit it or use latest)"
            )
    if flt.from_block is None and flt.to_block is None:
        return flt
    return LogFilter(flt.addresses, flt.topics)


def parse_unsubscribe(params: Any) -> str:
    """The subscription id an ``eth_unsubscribe`` names."""
    if not isinstance(params, list) or not params:
        raise InvalidParams("missing value for required argument 0")
    if len(params) > 1:
        raise InvalidParams("too many arguments, want at most 1")
    sub_id = params[0]
    if not isinstance(sub_id, str):
        raise InvalidParams("invalid argument 0: expected a subscription id")
    return sub_id


def new_id(random: bytes) -> str:
    """A subscription id from ``ID_BYTES`` random bytes, as geth writes them (leading
    zeros trimmed, like filter ids: one helper for both)."""
    return encode_id(random)


def encode_notification(sub_id: bytes, result: bytes) -> bytes:
    """One notification from the subscription id (ASCII) and the raw JSON of its result."""
    return _NOTE_HEAD + sub_id + _NOTE_MID + result + _NOTE_TAIL


def text_frame_head(n: int) -> bytes:
    """The header of a server's final, unmasked text frame of ``n`` payload bytes
    (RFC 6455 section 5.2; no extension negotiated, so no reserved bit is set)."""
    if n < 126:
        return bytes((_FIN_TEXT, n))
    if n < 65536:
        return bytes((_FIN_TEXT, 126)) + n.to_bytes(2, "big")
    return bytes((_FIN_TEXT, 127)) + n.to_bytes(8, "big")


class NotificationFrames:
    """The WebSocket frames of one result's notifications, one per subscription id.

    Built once per block (or log, or transaction) before the pass over its subscribers:
    each frame is then one concatenation of a prefix, the id and a suffix. Ids of one
    length (every id this node gives out) share one prefix; another length gets its own.
    """

    __slots__ = ("_base", "_n", "_prefix", "_suffix")

    def __init__(self, result: bytes) -> None:
        self._suffix = _NOTE_MID + result + _NOTE_TAIL
        self._base = len(_NOTE_HEAD) + len(self._suffix)
        self._n = -1  # id length the prefix was built for
        self._prefix = b""

    def frame(self, sub_id: bytes) -> bytes:
        """The final text frame carrying ``sub_id``'s notification."""
        if len(sub_id) != self._n:
            self._n = len(sub_id)
            self._prefix = text_frame_head(self._base + self._n) + _NOTE_HEAD
        return self._prefix + sub_id + self._suffix
