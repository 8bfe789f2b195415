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

from chainrelay.errors import InvalidParams, MethodNotFound
from chainrelay.protocol.logfilter import LogFilter

NEW_HEADS = "newHeads"
LOGS = "logs"
PENDING = "newPendingTransactions"
SYNCING = "syncing"
KINDS = (NEW_HEADS, LOGS, PENDING, SYNCING)
# Bytes of randomness in a subscription id: geth's 16 (0x + 32 hex digits).
ID_BYTES = 16

_NOTE_HEAD = b'{"jsonrpc":"2.0","method":"eth_subscription","params":{"subscription":"'
_NOTE_MID = b'","result":'
_NOTE_TAIL = b"}}"
_FIN_TEXT = 0x81  # first byte of a final text frame: FIN set, opcode 1, no reserved bits


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    kind: str
    filter: LogFilter | None = None  # logs only


def parse_subscribe(params: Any) -> SubscribeRequest:
    """The subscription an ``eth_subscribe`` asks for.

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
        return SubscribeRequest(LOGS, LogFilter.parse(params[1] if len(params) > 1 else None))
    # geth accepts and ignores an options object after newPendingTransactions/syncing only
    # when it is null; anything more is an argument the subscription does not take.
    if len(params) > 1 and any(p is not None for p in params[1:]):
        raise InvalidParams("too many arguments, want at most 1")
    return SubscribeRequest(kind)


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
    """A subscription id from ``ID_BYTES`` random bytes, as geth writes them."""
    return "0x" + random.hex()


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
