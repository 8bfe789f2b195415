"""A transparent JSON-RPC proxy that counts, per method, every call sent through it.

Placed between a relay and anvil, it sees every call the relay makes upstream, the head
tracker's included (eth_subscribe, block fetches, finality refreshes), over HTTP and
WebSocket alike. Answers and notifications pass through unchanged.

    python benchmarks/wire_counter.py --http http://127.0.0.1:8545 --ws ws://127.0.0.1:8545 \
        --port 9001

* ``POST /`` (any path): a JSON-RPC body, forwarded to ``--http``; the answer comes back
  with the node's status.
* ``GET /`` with a WebSocket upgrade: a connection to ``--ws``; client messages are counted.
* ``GET /counts``: ``{"method": calls, ...}`` since the start (batch items one by one).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal

import aiohttp
import orjson
from aiohttp import web

JSON = "application/json"


def methods_of(body: bytes | str) -> list[str]:
    """The method of every call in a JSON-RPC body ("?" for what is not a call)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ["?"]
    items = doc if isinstance(doc, list) else [doc]
    return [
        str(o["method"]) if isinstance(o, dict) and isinstance(o.get("method"), str) else "?"
        for o in items
    ]


class Proxy:
    def __init__(self, http_url: str, ws_url: str) -> None:
        self.http_url = http_url
        self.ws_url = ws_url
        self.counts: collections.Counter[str] = collections.Counter()
        self.session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False
        )

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def counts_view(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(dict(self.counts)), content_type=JSON)

    async def post(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.counts.update(methods_of(body))
        assert self.session is not None
        async with self.session.post(
            self.http_url, data=body, headers={"Content-Type": JSON}
        ) as resp:
            data = await resp.read()
            return web.Response(body=data, status=resp.status, content_type=JSON)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(status=405, text="POST JSON-RPC or open a WebSocket")
        client = web.WebSocketResponse(max_msg_size=0)
        await client.prepare(request)
        assert self.session is not None
        async with self.session.ws_connect(self.ws_url, max_msg_size=0) as node:

            async def to_node() -> None:
                async for msg in client:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self.counts.update(methods_of(msg.data))
                        await node.send_str(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        self.counts.update(methods_of(msg.data))
                        await node.send_bytes(msg.data)
                await node.close()

            async def to_client() -> None:
                async for msg in node:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        await client.send_str(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        await client.send_bytes(msg.data)
                await client.close()

            tasks = [asyncio.create_task(to_node()), asyncio.create_task(to_client())]
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return client


async def serve(args: argparse.Namespace) -> None:
    proxy = Proxy(args.http, args.ws)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_get("/counts", proxy.counts_view)
    app.router.add_get("/{tail:.*}", proxy.websocket)
    app.router.add_post("/{tail:.*}", proxy.post)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()


def main() -> None:
    import uvloop

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--http", required=True, help="the node's HTTP URL")
    ap.add_argument("--ws", required=True, help="the node's WebSocket URL")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args))


if __name__ == "__main__":
    main()
