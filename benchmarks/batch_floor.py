"""The floor under the ingress's push path: the same WebSocket session, no ingress logic.

uvloop + an asyncio Protocol that hands the upgrade to the ingress's own session class,
``chainrelay.batches.ingress.PushSession`` (the answers of one loop turn leave in one
write), like ``chainrelay.server.http``; each binary message is read as a push message
(``decode_push``) and answered at once with the ack the ingress would send. No API key,
no signature check, no sequence rules, no log: what a pusher measures against it is what
the ingress would reach if durability and its checks were free.

    python -m benchmarks.batch_floor --port 9003
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import typing

import orjson
import uvloop

from chainrelay import defaults
from chainrelay.batches.frame import PUSH_HEADER_LEN, decode_push
from chainrelay.batches.ingress import PushSession

# A request head larger than this is not an upgrade this floor takes.
MAX_HEAD_BYTES = 16 * 1024
# The node's own bounds (ingress.max_push_message with the default payload limit), so
# backpressure starts where the node's would.
MAX_MESSAGE_BYTES = 2 * defaults.BATCH_MAX_PAYLOAD_BYTES + PUSH_HEADER_LEN
MAX_SEND_BUFFER = defaults.MAX_WS_SEND_BUFFER
MAX_PENDING = defaults.BATCH_MAX_IN_FLIGHT


def answer(body: bytes) -> bytes:
    push = decode_push(body)
    return orjson.dumps({"type": "ack", "stream": push.stream, "seq": push.seq})


class Floor(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.ws: PushSession | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.data_received(data)
            return
        assert self.transport is not None
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HEAD_BYTES:
                self.transport.close()
            return
        head, rest = self.head[: end + 4], self.head[end + 4 :]
        self.head = b""
        session = PushSession(
            self.transport,
            answer,
            max_message_bytes=MAX_MESSAGE_BYTES,
            max_send_buffer=MAX_SEND_BUFFER,
            max_pending=MAX_PENDING,
        )
        if not session.accept(head):
            self.transport.close()
            return
        self.ws = session
        if rest:
            session.data_received(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ws is not None:
            self.ws.connection_lost()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port))


if __name__ == "__main__":
    main()
