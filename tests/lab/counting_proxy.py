"""A JSON-RPC proxy in front of a real node that counts the calls it forwards, per method.

Run as a process of its own (a test must be able to SIGKILL it)::

    python -m tests.lab.counting_proxy --upstream http://127.0.0.1:8545 --port 9001

* ``POST /`` (any path but ``/reset`` and ``/release``): a JSON-RPC body, forwarded as it is;
  the node's answer comes back byte for byte with the node's HTTP status.
* ``GET /counts``: ``{"method": calls, ...}`` since the start or the last reset (batch items
  are counted one by one, at arrival).
* ``GET /calls``: every call since the start or the last reset (at most ``MAX_CALLS``, the
  latest), in arrival order, as ``[peer port, method, params]``: the port of the client
  connection it came over, so a test can tell which process of the client made it.
* ``GET /params?method=M``: the params of each of those calls of ``M``, in arrival order.
* ``GET /requests``: ``{"requests": N, "counts": {...}}``, the HTTP requests and WebSocket
  messages that carried those calls (a batch is one) since the start or the last reset,
  with ``/counts`` of the same instant (a call arriving between two reads would skew them).
* ``POST /reset``: zero the counts and forget the calls.
* ``--refuse-batches``: a POSTed batch is answered HTTP 400 with one error object, as
  providers without batches answer (counted, never forwarded).
* ``--hold METHOD`` (repeatable): calls of that method wait, upstream not yet asked, until
  ``POST /release``; ``GET /held`` says how many wait. Lets a test line up concurrent callers
  behind one in-flight call without guessing how long the call takes. Over a proxied
  WebSocket the client's later messages wait behind a held call too; the node's messages
  (subscription notifications) keep flowing.
* ``--delay-ms N``: every forwarded call answers N ms later, like a node further away.
* WebSocket: a ``GET`` upgrade on any other path is proxied to the node's WebSocket (the
  upstream URL with ``ws://``), message for message both ways; the client's calls are
  counted like POSTed ones (``eth_subscribe`` included). ``POST /drop`` closes every
  proxied WebSocket at once, as a provider dropping its streams does; ``GET /ws`` says how
  many are open.

``CountingProxy`` starts one from a test through the ``procs`` fixture.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from chainrelay.devnet import free_port
from tests.lab.procs import ROOT, Procs, until
from tests.lab.timing import SECOND

JSON = "application/json"
# What ``--refuse-batches`` answers a batch with (a provider without batches).
BATCH_REFUSAL = (
    b'{"jsonrpc":"2.0","id":null,'
    b'"error":{"code":-32600,"message":"batch requests are not supported"}}'
)
# Calls ``GET /calls`` keeps: far more than a test makes, and a bound on what it holds.
MAX_CALLS = 100_000


def calls_of(body: bytes) -> list[tuple[str, Any]]:
    """The method and params of every call in a JSON-RPC body ("?" for what is not a call)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return [("?", None)]
    items = doc if isinstance(doc, list) else [doc]
    return [
        (str(o["method"]), o.get("params"))
        if isinstance(o, dict) and isinstance(o.get("method"), str)
        else ("?", None)
        for o in items
    ]


def peer_port(request: web.Request) -> int:
    """The client's port of the connection ``request`` came over (0 if unknown)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return int(peer[1]) if peer else 0


class Counter:
    """Calls per method, served at ``GET /counts``, and each call (``GET /calls``); both
    forgotten on ``POST /reset``."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.calls: collections.deque[tuple[int, str, Any]] = collections.deque(maxlen=MAX_CALLS)
        self.requests = 0

    def add(self, body: bytes, port: int) -> list[str]:
        """Count the calls in ``body``, which came over a connection from ``port``; their
        methods."""
        calls = calls_of(body)
        self.requests += 1
        methods = [method for method, _params in calls]
        self.counts.update(methods)
        self.calls.extend((port, method, params) for method, params in calls)
        return methods

    async def get_counts(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(dict(self.counts)), content_type=JSON)

    async def get_calls(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(list(self.calls)), content_type=JSON)

    async def get_params(self, request: web.Request) -> web.Response:
        method = request.query.get("method", "")
        got = [params for _port, m, params in self.calls if m == method]
        return web.Response(body=orjson.dumps(got), content_type=JSON)

    async def get_requests(self, _request: web.Request) -> web.Response:
        got = {"requests": self.requests, "counts": dict(self.counts)}
        return web.Response(body=orjson.dumps(got), content_type=JSON)

    async def post_reset(self, _request: web.Request) -> web.Response:
        self.requests = 0
        self.counts.clear()
        self.calls.clear()
        return web.Response(body=b"{}", content_type=JSON)


class CountingProxyApp:
    def __init__(
        self, upstream: str, hold: set[str], delay: float, refuse_batches: bool = False
    ) -> None:
        self.upstream = upstream
        self.refuse_batches = refuse_batches
        self.hold = hold
        self.delay = delay
        self.counter = Counter()
        self.released = asyncio.Event()
        self.held = 0
        self.session: aiohttp.ClientSession | None = None
        self.sockets: set[web.WebSocketResponse] = set()
        self.ws_upstream = "ws" + upstream[4:] if upstream.startswith("http") else upstream
        # A client WebSocket message -> the answer to send back instead of forwarding it
        # (None: forward). For fakes built on this proxy (``fault_upstream``).
        self.intercept: Callable[[str], str | None] | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/counts", self.counter.get_counts)
        app.router.add_get("/calls", self.counter.get_calls)
        app.router.add_get("/params", self.counter.get_params)
        app.router.add_get("/requests", self.counter.get_requests)
        app.router.add_post("/reset", self.counter.post_reset)
        app.router.add_get("/held", self.get_held)
        app.router.add_post("/release", self.post_release)
        app.router.add_post("/hold", self.post_hold)
        app.router.add_post("/drop", self.post_drop)
        app.router.add_get("/ws", self.get_ws)
        app.router.add_post("/{tail:.*}", self.forward)
        app.router.add_get("/{tail:.*}", self.forward_ws)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    async def _close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def get_held(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"held": self.held}), content_type=JSON)

    async def post_release(self, _request: web.Request) -> web.Response:
        self.released.set()
        return web.Response(body=b"{}", content_type=JSON)

    async def post_hold(self, _request: web.Request) -> web.Response:
        """Hold the ``--hold`` methods again after a release (calls from now on)."""
        self.released.clear()
        return web.Response(body=b"{}", content_type=JSON)

    async def get_ws(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"open": len(self.sockets)}), content_type=JSON)

    async def post_drop(self, _request: web.Request) -> web.Response:
        dropped = len(self.sockets)
        for ws in list(self.sockets):
            await ws.close(code=1001, message=b"dropped by the lab")
        return web.Response(body=orjson.dumps({"dropped": dropped}), content_type=JSON)

    async def forward_ws(self, request: web.Request) -> web.StreamResponse:
        """Proxy one WebSocket to the node, counting the client's calls."""
        client = web.WebSocketResponse(max_msg_size=64 * 1024 * 1024)
        await client.prepare(request)
        assert self.session is not None
        try:
            node = await self.session.ws_connect(self.ws_upstream, max_msg_size=64 * 1024 * 1024)
        except (aiohttp.ClientError, OSError):
            await client.close(code=1011, message=b"upstream unreachable")
            return client
        self.sockets.add(client)

        async def down() -> None:
            async for msg in node:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await client.send_str(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    await client.send_bytes(msg.data)
            await client.close()

        pump = asyncio.create_task(down())
        port = peer_port(request)
        try:
            async for msg in client:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    methods = self.counter.add(msg.data.encode(), port)
                    await self._wait_if_held(methods)
                    instead = self.intercept(msg.data) if self.intercept is not None else None
                    if instead is not None:
                        await client.send_str(instead)
                        continue
                    await node.send_str(msg.data)
                elif msg.type is aiohttp.WSMsgType.BINARY:
                    methods = self.counter.add(msg.data, port)
                    await self._wait_if_held(methods)
                    await node.send_bytes(msg.data)
        finally:
            self.sockets.discard(client)
            await node.close()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, OSError):
                await pump
        return client

    async def _wait_if_held(self, methods: list[str]) -> None:
        """Until ``POST /release`` when one of ``methods`` is held."""
        if self.hold.intersection(methods) and not self.released.is_set():
            self.held += 1
            try:
                await self.released.wait()
            finally:
                self.held -= 1

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        methods = self.counter.add(body, peer_port(request))
        if self.refuse_batches and body.lstrip()[:1] == b"[":
            return web.Response(body=BATCH_REFUSAL, status=400, content_type=JSON)
        await self._wait_if_held(methods)
        assert self.session is not None
        try:
            async with self.session.post(
                self.upstream, data=body, headers={"Content-Type": JSON}
            ) as resp:
                answer = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError) as exc:
            return web.Response(status=502, text=f"upstream: {exc}")
        if self.delay:
            await asyncio.sleep(self.delay)  # the latency being simulated, not a wait for state
        return web.Response(body=answer, status=status, content_type=JSON)


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; a call left waiting is cancelled, not drained."""
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="counting_proxy", description=__doc__)
    p.add_argument("--upstream", required=True, help="the node's HTTP JSON-RPC URL")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--hold", action="append", default=[], help="hold this method's calls")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--refuse-batches", action="store_true")
    args = p.parse_args(argv)
    proxy = CountingProxyApp(
        args.upstream, set(args.hold), args.delay_ms / 1000, args.refuse_batches
    )
    asyncio.run(serve(proxy.app(), args.host, args.port))


class LabServer:
    """A lab HTTP server in a process of its own, started through ``Procs``."""

    module = ""

    def __init__(self, procs: Procs, args: list[str], log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs = procs
        self.args = args
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", self.module, "--port", str(self.port), *self.args]
        if self.log_path is not None:
            with self.log_path.open("ab") as log:
                self.proc = self.procs.spawn(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        else:
            self.proc = self.procs.spawn(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
            )

    async def wait_ready(self, timeout: float = 20 * SECOND) -> None:
        async def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.module} exited with {self.proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with aiohttp.ClientSession() as s, s.get(self.url + "/counts") as r:
                    return r.status == 200
            return False

        await until(up, timeout, f"{self.module} on port {self.port}")

    async def _get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as r:
            assert r.status == 200, f"GET {path}: HTTP {r.status}"
            return orjson.loads(await r.read())

    async def _post(self, path: str) -> None:
        async with aiohttp.ClientSession() as s, s.post(self.url + path) as r:
            assert r.status == 200, f"POST {path}: HTTP {r.status}"

    async def counts(self) -> dict[str, int]:
        return dict(await self._get("/counts"))

    async def params(self, method: str) -> list[Any]:
        """The params of each call of ``method`` since the last reset, in arrival order."""
        return list(await self._get(f"/params?method={method}"))

    async def calls(self) -> list[tuple[int, str, Any]]:
        """Every call since the start or the last reset: (client port, method, params)."""
        got = await self._get("/calls")
        return [(int(port), str(method), params) for port, method, params in got]

    async def requests(self) -> int:
        """HTTP requests and WebSocket messages since the last reset (a batch is one)."""
        return (await self.tally())[0]

    async def tally(self) -> tuple[int, dict[str, int]]:
        """``requests()`` and ``counts()`` read at one instant."""
        got = await self._get("/requests")
        return int(got["requests"]), dict(got["counts"])

    async def reset(self) -> None:
        await self._post("/reset")

    def kill(self) -> None:
        """SIGKILL: the process vanishes mid-call, as a crashed node does."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class CountingProxy(LabServer):
    """``python -m tests.lab.counting_proxy`` in front of ``upstream``."""

    module = "tests.lab.counting_proxy"

    def __init__(
        self,
        procs: Procs,
        upstream: str,
        *,
        hold: tuple[str, ...] = (),
        delay_ms: float = 0.0,
        log_path: Path | None = None,
        refuse_batches: bool = False,
    ) -> None:
        args = ["--upstream", upstream, "--delay-ms", str(delay_ms)]
        for method in hold:
            args += ["--hold", method]
        if refuse_batches:
            args.append("--refuse-batches")
        super().__init__(procs, args, log_path)

    async def held(self) -> int:
        return int((await self._get("/held"))["held"])

    async def release(self) -> None:
        await self._post("/release")

    async def hold(self) -> None:
        await self._post("/hold")

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def drop_websockets(self) -> None:
        """Close every proxied WebSocket (the relay's head stream among them)."""
        await self._post("/drop")

    async def open_websockets(self) -> int:
        return int((await self._get("/ws"))["open"])


async def start_proxy(
    procs: Procs,
    upstream: str,
    *,
    hold: tuple[str, ...] = (),
    delay_ms: float = 0.0,
    log_path: Path | None = None,
    refuse_batches: bool = False,
) -> CountingProxy:
    proxy = CountingProxy(
        procs,
        upstream,
        hold=hold,
        delay_ms=delay_ms,
        log_path=log_path,
        refuse_batches=refuse_batches,
    )
    proxy.start()
    await proxy.wait_ready()
    return proxy


if __name__ == "__main__":
    main()
