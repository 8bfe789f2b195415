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


async def nitro_node_reads(
    port: int, from_seq: int, count: int, timeout: float
) -> tuple[bytes, list[tuple[bool, bytes]]]:
    """What a Nitro node with ``enable-compression`` reads from the feed at ``port``, at the
    byte level: it upgrades with Nitro's client's exact headers (``NITRO_OFFER``), and
    reads ``count`` data messages. The answer's head, and each message's RSV1 bit and
    payload (its fragments joined), as sent."""
    import asyncio

    from chainrelay.nitro.deflate import NITRO_OFFER
    from tests.hostile.wsraw import OP_CLOSE, OP_CONT, read_frame_bits, upgrade_request

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(timeout):
            writer.write(
                upgrade_request(
                    "/",
                    [
                        b"Arbitrum-Feed-Client-Version: 2",
                        b"Arbitrum-Requested-Sequence-Number: %d" % from_seq,
                        b"Sec-WebSocket-Extensions: " + NITRO_OFFER.encode(),
                    ],
                )
            )
            head = await reader.readuntil(b"\r\n\r\n")
            out: list[tuple[bool, bytes]] = []
            rsv1 = False
            parts: list[bytes] = []
            while len(out) < count:
                b0, payload = await read_frame_bits(reader)
                opcode = b0 & 0x0F
                if opcode == OP_CLOSE:
                    raise AssertionError(f"closed after {len(out)} messages")
                if opcode >= 0x8:
                    continue  # a ping: a Nitro node answers it, the test need not
                if opcode != OP_CONT:
                    rsv1, parts = bool(b0 & 0x40), []
                parts.append(payload)
                if b0 & 0x80:
                    out.append((rsv1, b"".join(parts)))
            return head, out
    finally:
        writer.close()
