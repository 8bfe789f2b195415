"""The floor under the relay's miss path: the same hop, no relay work.

uvloop + asyncio Protocols + httptools, like the relay: each client connection gets one
keep-alive connection to the upstream; a request's body is framed anew and written
upstream, and the upstream's answer body is framed anew and written back, one
``transport.write`` each way, nothing parsed but HTTP. Its overhead over calling the
upstream directly is what one more loopback hop costs on this machine: what the relay
would add if its own work per forwarded call were free.

    python -m benchmarks.miss_floor --port 9003 --upstream 127.0.0.1:8545
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import typing

import httptools

REQUEST_HEAD = (
    b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
)
ANSWER_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


class Upstream(asyncio.Protocol):
    """The upstream side of one client connection: answers go back in request order."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        self.body = []
        self.client.answer(ANSWER_HEAD % len(body) + body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.waiting: collections.deque[bytes] = collections.deque()
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.create_connection(lambda: Upstream(self), self.host, self.port)
        )
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[tuple[asyncio.BaseTransport, Upstream]]) -> None:
        if task.exception() is not None:
            self.close()
            return
        self.upstream = task.result()[1]
        while self.waiting:
            self._forward(self.waiting.popleft())

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        self.body = []
        if self.upstream is None:
            self.waiting.append(body)
        else:
            self._forward(body)

    def _forward(self, body: bytes) -> None:
        assert self.upstream is not None and self.upstream.transport is not None
        host = b"%s:%d" % (self.host.encode(), self.port)
        self.upstream.transport.write(REQUEST_HEAD % (host, len(body)) + body)

    def answer(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


async def serve(port: int, host: str, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(host, upstream_port), "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    import uvloop

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the JSON-RPC node")
    args = ap.parse_args(argv)
    host, _, up_port = args.upstream.rpartition(":")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, host, int(up_port)))


if __name__ == "__main__":
    main()
