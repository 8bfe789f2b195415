"""A wide eth_getLogs asked as chunks (``rpc/logsplit.py``): a few at a time, each chunk
refused as too large asked again in halves, the answers spliced in block order.

``scan`` runs at most ``concurrency`` chunk calls at once, whatever the range: a scan of
100,000 blocks in chunks of 2,000 holds four upstream calls, not fifty. The answer is bounded
as it grows: past ``max_bytes`` the scan stops and answers the size guard's error, so a scan
never holds more than the guard plus the chunks under way. The first error that is not
"too large" ends the scan with that error, as one call over the range would have answered
it; never part of an answer.

The answer is a ``Spliced``: each chunk was stored under its own key as it came, and those
serve every later scan that covers them, so the whole is not stored again (it would hold
every chunk's bytes twice, for a key that only the same window meets).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from chainrelay.rpc import logsplit
from chainrelay.wire.jsonrpc import Answer

# (params of one chunk, the chunk's index: spreads chunks over the upstreams) -> its answer.
AskChunk = Callable[[list[Any], int], Awaitable[Answer]]


class Spliced(Answer):
    """An answer spliced from chunks each stored under its own key: not stored whole."""

    __slots__ = ()


class _Stop(Exception):
    """The scan's answer is an error (a chunk's, or the size guard's)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer


async def scan(
    flt: dict[str, Any],
    lo: int,
    hi: int,
    size: int,
    concurrency: int,
    ask: AskChunk,
    max_bytes: int,
    oversize: Callable[[int], bytes | None],
) -> Answer:
    """eth_getLogs(``flt``) over [lo, hi] in chunks of ``size`` blocks; ``oversize``: the
    size guard's error for an answer of that many bytes (None: within it)."""
    ranges = logsplit.chunks(lo, hi, size)
    parts: list[bytes] = [b"[]"] * len(ranges)
    total = 0
    todo = iter(enumerate(ranges))

    async def worker() -> None:
        nonlocal total
        for i, (a, b) in todo:
            got = await _range(flt, a, b, i, ask)
            total += len(got)
            if total > max_bytes:
                why = oversize(total)
                if why is not None:
                    raise _Stop(Answer(None, why))
            parts[i] = got

    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(ranges)))]
    try:
        await asyncio.gather(*workers)
    except _Stop as stop:
        return stop.answer
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    merged = logsplit.splice(parts)
    if merged is None:
        raise ValueError("eth_getLogs chunk answered something else than a list")
    return Spliced(merged, None)


async def _range(flt: dict[str, Any], a: int, b: int, index: int, ask: AskChunk) -> bytes:
    """The raw answer over [a, b], halved while refused as too large (down to one block)."""
    answer = await ask(logsplit.chunk_params(flt, a, b), index)
    if answer.error is None and answer.result is not None:
        return answer.result
    split = logsplit.halves(a, b) if logsplit.too_large(answer.error) else None
    if split is None:
        raise _Stop(answer)
    (a1, b1), (a2, b2) = split
    first = await _range(flt, a1, b1, index, ask)
    second = await _range(flt, a2, b2, index + 1, ask)
    merged = logsplit.splice([first, second])
    if merged is None:
        raise _Stop(answer)
    return merged
