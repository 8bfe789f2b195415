"""eth_getLogs guards: how wide a query and how large an answer one call may be.

A log query's cost grows with its block range, its addresses and topics, and what it
matches: one ``{"fromBlock": "0x0"}`` with no address makes an upstream scan the whole
chain and the node hold every log of it. Past a guard the answer is -32005 (a limit, as
providers answer theirs) with a message that names the guard and its value and says what
to change, and ``data`` naming the config key, so a client can adapt:

* the block range (``[logs] max_block_range``; by default the chain profile's): tags
  (latest, safe, finalized, earliest, pending) are resolved against the node's head view
  first, a ``blockHash`` query is one block;
* the addresses and the topics per position (``max_addresses``,
  ``max_topics_per_position``);
* the answer's size in bytes (``max_answer_bytes``), whether it came from the block logs
  the node holds, an upstream or the shared cache tier; an answer past it is never cached.

Installed filters are held to the same guards: eth_newFilter at its creation (its range
resolved then), eth_getFilterLogs at each read; eth_getFilterChanges answers are paged at
``max_answer_bytes`` (subscriptions/filtertable.py).

Malformed params are not judged here: the upstream's own error is the transparent answer.
Sans-I/O: ``refusal`` reads params and a head view, ``oversize`` an answer's length.
"""

from __future__ import annotations

from typing import Any

import orjson

from chainrelay.rpc.policy import HeadView, ref_number

LIMIT_EXCEEDED = -32005


def _error(message: str, key: str, limit: int) -> bytes:
    return orjson.dumps(
        {"code": LIMIT_EXCEEDED, "message": message, "data": {"limit": key, "value": limit}}
    )


class LogGuards:
    """The guards of one node (its ``[logs]`` section, its chain's range)."""

    __slots__ = ("max_addresses", "max_answer_bytes", "max_block_range", "max_topics")

    def __init__(
        self, max_block_range: int, max_addresses: int, max_topics: int, max_answer_bytes: int
    ) -> None:
        self.max_block_range = max_block_range
        self.max_addresses = max_addresses
        self.max_topics = max_topics
        self.max_answer_bytes = max_answer_bytes

    def refusal(self, params: Any, head: HeadView, method: str = "eth_getLogs") -> bytes | None:
        """The error object (JSON) refusing eth_getLogs(``params``) at ``head``, or None.
        ``method``: the call the message names, for a filter held to the same guards
        (eth_newFilter at its creation, eth_getFilterLogs at each read)."""
        if not isinstance(params, list) or not params or not isinstance(params[0], dict):
            return None
        flt: dict[str, Any] = params[0]
        addresses = flt.get("address")
        if isinstance(addresses, list) and len(addresses) > self.max_addresses:
            return _error(
                f"{method} is limited to {self.max_addresses} addresses per query; "
                f"this query names {len(addresses)}",
                "logs.max_addresses",
                self.max_addresses,
            )
        topics = flt.get("topics")
        if isinstance(topics, list):
            for position, alternatives in enumerate(topics):
                if isinstance(alternatives, list) and len(alternatives) > self.max_topics:
                    return _error(
                        f"{method} is limited to {self.max_topics} topics per position; "
                        f"position {position} of this query has {len(alternatives)}",
                        "logs.max_topics_per_position",
                        self.max_topics,
                    )
        if "blockHash" in flt:
            return None  # one block
        lo = ref_number(flt.get("fromBlock", "latest"), head, pending=True)
        hi = ref_number(flt.get("toBlock", "latest"), head, pending=True)
        if lo is None or hi is None or hi < lo:
            return None  # unresolved, or an empty range: the upstream's to answer
        span = hi - lo + 1
        if span > self.max_block_range:
            return _error(
                f"{method} is limited to a {self.max_block_range} block range; this "
                f"query spans {span} blocks ({hex(lo)} to {hex(hi)}): ask for a smaller "
                "range, or page through it",
                "logs.max_block_range",
                self.max_block_range,
            )
        return None

    def oversize(self, size: int) -> bytes | None:
        """The error object refusing an answer of ``size`` bytes, or None."""
        if size <= self.max_answer_bytes:
            return None
        return _error(
            f"eth_getLogs response size exceeded: the answer is over {self.max_answer_bytes} "
            "bytes; ask for a smaller block range, or name an address or topics",
            "logs.max_answer_bytes",
            self.max_answer_bytes,
        )
