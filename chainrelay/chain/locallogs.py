"""eth_getLogs answered from the block logs this node holds (``chain.logstore``), tried by
the request pipeline on a miss before the upstreams.

A window whose blocks are all held costs no upstream call. A window reaching past them is
answered from the held runs, and by eth_getLogs upstream for each sub-range around them
(explicit ``fromBlock``/``toBlock``, the caller's address and topics as given), spliced in
block order: the answer is what the upstream would give for the whole window, the same
logs in the same order as the same JSON. At most ``[cache] logs_max_upstream_ranges``
sub-ranges; with more the window goes upstream whole.

The sub-ranges are asked through the pipeline (``RpcService.call``), not the pool: each is
then a cacheable call of its own, under the key a client's same request has, so the same
hole asked again (the next client's window, the next poll) is a cache hit, concurrent askers
share one upstream call, and the Redis tier serves it to the other processes. Where a
sub-range's answer fails, the whole answer is that failure (the upstream's error, as if the
window had been asked whole); never part of an answer.

Not answered here (None: the window goes upstream whole, and the upstream's own answer or
error is the transparent one): a filter this node would refuse, a tag left unresolved
("pending"), odd params, blocks it cannot vouch for, a sub-range answer that does not hold
together (another fork's blocks, not a list), or held blocks a reorg took meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from chainrelay.chain.logstore import LogStore, Piece
from chainrelay.config import CacheConfig, FiltersConfig
from chainrelay.errors import InvalidParams
from chainrelay.metrics import Metrics
from chainrelay.rpc.policy import Params
from chainrelay.subscriptions.logfilter import LogFilter
from chainrelay.wire.jsonrpc import Answer

# ``RpcService.call``: one call through the pipeline's cache, coalescer and pool.
Ask = Callable[[str, Params], Awaitable[Answer]]
# Told of a window reaching blocks whose logs are not held: (lowest, highest block number).
Unheld = Callable[[int, int], None]

_METHOD = "eth_getLogs"


class LocalLogs:
    def __init__(
        self,
        store: LogStore,
        ask: Ask,
        metrics: Metrics,
        cache: CacheConfig,
        filters: FiltersConfig,
        *,
        unheld: Unheld | None = None,
    ) -> None:
        """``cache``: how many sub-ranges a window may be split into; ``filters``: the
        filter bounds this node holds clients to (a filter past them goes upstream);
        ``unheld``: told of each window not wholly held (the block follower fills the
        recent window behind it: ``BlockFollower.note_unheld``)."""
        self.store = store
        self.unheld = unheld
        self.ask = ask
        self.metrics = metrics
        self.max_upstream = cache.logs_max_upstream_ranges
        self.max_addresses = filters.max_addresses
        self.max_topics_per_position = filters.max_topics_per_position
        metrics.log_store_bytes.set_function(lambda: store.bytes)
        metrics.log_store_blocks.set_function(lambda: len(store))

    async def answer(self, params: Params | None) -> Answer | None:
        """eth_getLogs(``params``) as planned by the pipeline (a range's bounds resolved to
        block numbers); None: ask the upstream for the whole window."""
        if not isinstance(params, list) or len(params) != 1 or not isinstance(params[0], dict):
            return None
        try:
            flt = LogFilter.parse(
                params[0],
                max_addresses=self.max_addresses,
                max_topics_per_position=self.max_topics_per_position,
            )
        except InvalidParams:
            return None
        store = self.store
        if flt.block_hash is not None:
            held = store.by_hash(flt, flt.block_hash)
            if held is None:
                return None
            self.metrics.local_logs.labels("local").inc()
            return Answer(_array(held), None)
        low, high = flt.from_block, flt.to_block
        if not isinstance(low, int) or not isinstance(high, int):
            return None
        pieces = store.split(flt, low, high, self.max_upstream)
        holes = [p for p in pieces if p.logs is None] if pieces is not None else []
        if (pieces is None or holes) and self.unheld is not None:
            self.unheld(low, high)
        if pieces is None:
            return None
        if not holes:
            self.metrics.local_logs.labels("local").inc()
            return Answer(_array(pieces[0].logs or []), None)  # one run: all of it held
        return await self._split(params[0], pieces, holes)

    async def _split(
        self, flt: dict[str, Any], pieces: list[Piece], holes: list[Piece]
    ) -> Answer | None:
        got = await asyncio.gather(
            *(
                self.ask(_METHOD, [{**flt, "fromBlock": hex(p.low), "toBlock": hex(p.high)}])
                for p in holes
            ),
            return_exceptions=True,
        )
        # The first failure in block order is the answer, as the whole window's would be.
        for answer in got:
            if isinstance(answer, BaseException):
                raise answer
            if answer.error is not None:
                return Answer(None, answer.error)
        parts: list[bytes] = []
        answers = iter(got)
        for piece in pieces:
            if piece.logs is not None:
                parts.extend(piece.logs)
                continue
            answer = next(answers)
            assert not isinstance(answer, BaseException)
            inner = self._inner(answer, piece.low, piece.high)
            if inner is None:
                return None
            if inner:
                parts.append(inner)
        if not self.store.vouches(pieces):
            return None
        self.metrics.local_logs.labels("split").inc()
        return Answer(_array(parts), None)

    def _inner(self, answer: Answer, low: int, high: int) -> bytes | None:
        """The logs of a sub-range's answer as the bytes between its brackets (b"" for
        none); None when the answer does not hold together with the held blocks: not a list
        of logs of blocks ``low``..``high``, or of a block this node knows another hash for."""
        raw = answer.result
        if raw is None:
            return None
        raw = raw.strip()
        if raw[:1] != b"[" or raw[-1:] != b"]":
            return None
        logs = answer.value if answer.value is not None else orjson.loads(raw)
        if not isinstance(logs, list):
            return None
        canonical = self.store.view.canonical
        for log in logs:
            if not isinstance(log, dict):
                return None
            number = _hex_int(log.get("blockNumber"))
            if number is None or not low <= number <= high:
                return None
            known = canonical.get(number)
            if known is not None and known != log.get("blockHash"):
                return None
        return raw[1:-1].strip()


def _array(parts: list[bytes]) -> bytes:
    """``parts`` as one JSON array, copied once: an answer runs to megabytes."""
    if not parts:
        return b"[]"
    first, last = parts[0], parts[-1]
    if len(parts) == 1:
        return b"[" + first + b"]"
    parts[0], parts[-1] = b"[" + first, last + b"]"
    try:
        return b",".join(parts)
    finally:
        parts[0], parts[-1] = first, last


def _hex_int(value: Any) -> int | None:
    if isinstance(value, str) and value[:2] == "0x" and 2 < len(value) <= 18:
        try:
            return int(value, 16)
        except ValueError:
            return None
    return None
