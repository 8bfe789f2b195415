"""The sender limit: eth_sendRawTransaction per sender address, as proxyd's.

A flood of transactions from one account (a bot resubmitting, a spammer) is one sender
whatever identities and addresses it sends through, so its transactions are counted under
the address that signed them, recovered from the signed transaction itself. A raw
transaction that does not decode is refused with -32602 before any upstream sees it.
"""

from __future__ import annotations

from typing import Any, Protocol

import orjson
from eth_account import Account

from chainrelay.access.buckets import NEVER
from chainrelay.errors import InvalidParams

# Keys of senders' buckets, apart from identities' names (an address, "key:<name>").
SENDER_PREFIX = "sender:"


def sender_of(params: Any) -> str:
    """The checksummed address that signed the raw transaction in ``params`` (a list of
    one hex string); InvalidParams when there is none."""
    if not isinstance(params, list) or len(params) != 1 or not isinstance(params[0], str):
        raise InvalidParams("eth_sendRawTransaction takes one signed transaction, as hex")
    raw = params[0]
    if not raw.startswith(("0x", "0X")) or len(raw) < 4:
        raise InvalidParams("signed transaction: expected 0x-prefixed hex")
    try:
        return str(Account.recover_transaction(raw))
    except Exception as exc:  # rlp, eth_keys and hexbytes each raise their own
        raise InvalidParams(f"signed transaction does not decode: {type(exc).__name__}") from None


def _error(code: int, message: str, data: Any = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return orjson.dumps(err)


class Admits(Protocol):
    async def admit(self, name: str, cost: float, rate: float, burst: float) -> float: ...


class SenderLimit:
    """Transactions per second (``rate``) and at once (``burst``) of one sender, counted
    where ``buckets`` counts (this process's buckets, or Redis' under a shared tier)."""

    def __init__(self, rate: float, burst: float, buckets: Admits) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets = buckets

    async def check(self, params: Any) -> bytes | None:
        """The JSON-RPC error member refusing this transaction, or None: send it."""
        try:
            sender = sender_of(params)
        except InvalidParams as exc:
            return _error(exc.code, exc.message)
        wait = await self.buckets.admit(SENDER_PREFIX + sender, 1.0, self.rate, self.burst)
        if wait == 0.0:
            return None
        data = {"sender": sender, "retry_after": None if wait == NEVER else round(wait, 3)}
        return _error(-32005, "limit exceeded: sender limit", data)
