"""The floor under the relay's cache-hit path: the same transport stack, no relay logic.

uvloop + an asyncio Protocol + httptools, like ``chainrelay.server.http``, answering
every POST with ready-made answers taken in turn (one ``transport.write`` per answer),
the same bytes the relay sends for the benchmark's mix. What it reaches under wrk is
what the relay could reach if its own work per request were free.

    python -m benchmarks.floor_server --port 9002 [--answers FILE]

``FILE`` holds one JSON-RPC answer per line; without it every answer is a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import typing
from pathlib import Path

import httptools

ANSWER = b'{"jsonrpc":"2.0","id":1,"result":"0x38"}'
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


class Floor(asyncio.Protocol):
    def __init__(self, responses: list[bytes]) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.responses = responses
        self.next = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's own class

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.transport.write(self.responses[self.next])
        self.next = (self.next + 1) % len(self.responses)


async def serve(port: int, responses: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Floor(responses), "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    import uvloop

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--answers", type=Path, help="one JSON-RPC answer per line")
    args = ap.parse_args(argv)
    answers = args.answers.read_bytes().splitlines() if args.answers else [ANSWER]
    responses = [HEAD % len(a) + a for a in answers if a.strip()]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, responses))


if __name__ == "__main__":
    main()
