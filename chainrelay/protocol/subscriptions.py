"""eth_subscribe / eth_unsubscribe: their params, subscription ids and notification bytes.

A notification is spliced from pre-encoded parts: the result is encoded once per block (or
log, or transaction) and shared by every subscriber; only the subscription id differs.
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
