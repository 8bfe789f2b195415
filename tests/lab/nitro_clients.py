"""Clients of Nitro's feed protocol for tests: each collects what ``chainrelay.nitro.tail.
follow`` yields from a node's Nitro endpoint (as a Nitro node follows a feed: the next
number on each reconnect), for comparison with what the sequencer sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from chainrelay.nitro.tail import Received, follow
from tests.lab.procs import until


class Collector:
    """A Nitro-protocol client's messages, by arrival."""

    def __init__(self, url: str, from_seq: int | None, compression: bool = True) -> None:
        self.url = url
        self.got: list[Received] = []
        self.task = asyncio.ensure_future(self._run(url, from_seq, compression))

    async def _run(self, url: str, from_seq: int | None, compression: bool) -> None:
        async for r in follow(url, from_seq, compression=compression, retry_max=0.5):
            self.got.append(r)

    def messages(self) -> list[tuple[int, bytes]]:
        return [(r.seq, r.raw) for r in self.got if not r.confirmation]

    def confirmations(self) -> list[int]:
        return [r.seq for r in self.got if r.confirmation]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def collecting(*cs: Collector) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for c in cs:
            await c.close()


async def has(
    c: Collector, sent: Mapping[int, bytes], start: int, end: int, timeout: float
) -> None:
    """Until ``c`` has messages ``start``..``end - 1``; then each must be exactly what the
    sequencer sent, in order, once."""
    await until(
        lambda: len(c.messages()) >= end - start, timeout, f"messages {start}-{end - 1} at {c.url}"
    )
    got = c.messages()
    assert [s for s, _ in got[: end - start]] == list(range(start, end))
    assert got[: end - start] == [(s, sent[s]) for s in range(start, end)]
