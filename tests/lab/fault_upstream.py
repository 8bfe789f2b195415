"""A fake upstream that injects the faults a real node cannot be made to produce.

Run as a process of its own::

    python -m tests.lab.fault_upstream --mode 429 --upstream http://127.0.0.1:8545 --port 9002

The calls a relay makes to check an upstream and follow its head (``HEAD_METHODS``) are
forwarded to the real node, so the fake passes the relay's startup checks and stays caught
up; every other call gets the fault of ``--mode``:

* ``healthy``: every call is forwarded to the node (a fake to be switched to a fault, or
  back, with ``POST /mode``).
* ``rate``: a provider's quota: every call, ``HEAD_METHODS`` included, is forwarded while
  fewer than ``--rps`` were forwarded in the last second, and answered HTTP 429 with
  ``Retry-After: 1`` past it.
* ``429``: HTTP 429 Too Many Requests, as a rate-limited provider answers.
* ``429_storm``: the same, with ``Retry-After: STORM_RETRY_AFTER``, as a provider whose
  key is over its quota answers every call for a while.
* ``hang``: accepts the request and never answers.
* ``drip``: sends the answer's headers, then one byte of its body every ``DRIP_EVERY``
  seconds (for at most ``DRIP_FOR``): a connection that is never idle and never done.
* ``close_mid_answer``: sends the headers and half the body, then closes the connection.
* ``malformed``: HTTP 200 with a body that is not a JSON-RPC answer (cut-off JSON, a bare
  array, an object with neither result nor error), in turn.
* ``receipts_error``: every call is forwarded but ``eth_getBlockReceipts``, which gets the
  JSON-RPC error -32000 a node answers when it cannot serve a block's receipts for now
  (a pruned or lagging backend behind a provider's load balancer).
* ``pending_garbage``: a WebSocket proxy to the node (``counting_proxy``'s) whose first
  ``PENDING_GARBAGE`` ``eth_subscribe("newPendingTransactions")`` calls are answered with
  cut-off JSON, as a broken gateway sends; later ones, and every other call, reach the node.
* ``logs_range``: every call is forwarded but an eth_getLogs over more than
  ``LOGS_RANGE_CAP`` blocks (explicit numbers), answered as BSC's public endpoints refuse
  one: -32000 "exceed maximum block range: 2000".
* ``ws_garbage``: a WebSocket proxy to the node (``counting_proxy``'s) that answers every
  call but ``HEAD_METHODS`` and the head stream's ``eth_subscribe``/``eth_unsubscribe``
  with ``WS_GARBAGE``: the layout of an answer under the call's own id, but not JSON.

``--lacks METHOD`` (any mode): that method is answered -32601 in geth's words, as a node
or a provider's plan without it answers.

``GET /counts`` and ``POST /reset`` count calls per method like ``counting_proxy``;
``GET /calls`` lists them; ``GET /load`` gives the most requests ever in flight at once,
the most that arrived within one second, how many ``rate`` refused and how many it
forwarded after its first refusal.
``POST /mode`` with ``{"mode": M, "every": B}`` switches the fault at once (not for the
WebSocket modes); ``every`` true gives it to ``HEAD_METHODS`` too: a dead upstream, whose
head, chain id and probes fail like the rest (``--every`` at the start).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from tests.lab.counting_proxy import (
    JSON,
    Counter,
    CountingProxyApp,
    LabServer,
    peer_port,
    serve,
)
from tests.lab.procs import Procs

MODES = (
    "healthy",
    "rate",
    "429",
    "429_storm",
    "hang",
    "drip",
    "close_mid_answer",
    "malformed",
    "receipts_error",
    "logs_range",
    "pending_garbage",
    "ws_garbage",
)
# ``429_storm``'s Retry-After, in seconds.
STORM_RETRY_AFTER = 1
# ``drip``: a byte this often, for at most this long (then the connection is closed).
DRIP_EVERY = 0.5
DRIP_FOR = 60.0
# ``drip``'s announced length: far more bytes than it sends in DRIP_FOR.
DRIP_LENGTH = 100_000
# ``logs_range``: the widest eth_getLogs range forwarded.
LOGS_RANGE_CAP = 2000
# Pending-transaction subscriptions answered with garbage before they reach the node.
PENDING_GARBAGE = 2
# eth_chainId: the relay's chain check; eth_getBlockByNumber/ByHash: the head tracker;
# eth_blockNumber: the pool's probe that brings an upstream back into rotation.
HEAD_METHODS = frozenset(
    {"eth_chainId", "eth_getBlockByNumber", "eth_getBlockByHash", "eth_blockNumber"}
)
# ``ws_garbage``'s answer, %d the call's id: an answer's opening and closing brace around
# a value that is not JSON, as a broken gateway might send.
WS_GARBAGE = '{"jsonrpc":"2.0","id":%d,"result":0x1} trailing}'
MALFORMED = (
    b'{"jsonrpc":"2.0","id":1,"result":"0x',
    b"[]",
    b'{"jsonrpc":"2.0","id":1}',
    b"<html>502 Bad Gateway</html>",
)


class FaultUpstreamApp:
    def __init__(
        self, mode: str, upstream: str, every: bool = False, rps: float = 0.0, lacks: str = ""
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.mode = mode
        self.every = every
        self.upstream = upstream
        self.rps = rps
        self.lacks = lacks
        self.counter = Counter()
        self.session: aiohttp.ClientSession | None = None
        self._malformed = itertools.cycle(MALFORMED)
        # What ``GET /load`` reports: requests in flight (and the most at once), arrival
        # and forwarding times of the last second (and the most arrivals in one), refusals.
        self.in_flight = 0
        self.in_flight_peak = 0
        self.arrived: collections.deque[float] = collections.deque()
        self.window_peak = 0
        self.forwarded: collections.deque[float] = collections.deque()
        self.refused = 0
        self.served_after_refusal = 0  # calls forwarded once the first was refused

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/counts", self.counter.get_counts)
        app.router.add_get("/calls", self.counter.get_calls)
        app.router.add_get("/load", self.get_load)
        app.router.add_post("/reset", self.counter.post_reset)
        app.router.add_post("/mode", self.post_mode)
        app.router.add_post("/{tail:.*}", self.handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        self.session = aiohttp.ClientSession()

    async def _close(self, _app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def post_mode(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        mode = doc.get("mode")
        if mode not in MODES or mode in ("pending_garbage", "ws_garbage"):
            return web.Response(status=400, text=f"mode must be one of {MODES[:-2]}")
        self.mode = mode
        self.every = bool(doc.get("every", False))
        return web.json_response({"mode": self.mode, "every": self.every})

    async def get_load(self, _request: web.Request) -> web.Response:
        doc = {
            "in_flight_peak": self.in_flight_peak,
            "window_peak": self.window_peak,
            "refused": self.refused,
            "served_after_refusal": self.served_after_refusal,
        }
        return web.json_response(doc)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        arrived = self.arrived
        arrived.append(now)
        while arrived[0] <= now - 1.0:
            arrived.popleft()
        self.window_peak = max(self.window_peak, len(arrived))
        self.in_flight += 1
        self.in_flight_peak = max(self.in_flight_peak, self.in_flight)
        try:
            return await self._handle(request, now)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.Request, now: float) -> web.StreamResponse:
        body = await request.read()
        methods = self.counter.add(body, peer_port(request))
        if self.lacks and methods == [self.lacks]:  # a single call (batches: not needed)
            rid = orjson.loads(body).get("id")
            message = f"the method {self.lacks} does not exist/is not available"
            error = {"code": -32601, "message": message}
            return web.json_response({"jsonrpc": "2.0", "id": rid, "error": error})
        if self.mode == "rate":
            forwarded = self.forwarded
            while forwarded and forwarded[0] <= now - 1.0:
                forwarded.popleft()
            if len(forwarded) >= self.rps:
                self.refused += 1
                return web.Response(status=429, text="rate limited", headers={"Retry-After": "1"})
            forwarded.append(now)
            self.served_after_refusal += self.refused > 0
        if self.mode in ("healthy", "rate"):
            forward = True
        elif self.mode == "receipts_error":
            forward = "eth_getBlockReceipts" not in methods
        elif self.mode == "logs_range":
            forward = not _too_wide(body)
        else:
            forward = not self.every and all(m in HEAD_METHODS for m in methods)
        if forward:
            assert self.session is not None
            async with self.session.post(
                self.upstream, data=body, headers={"Content-Type": JSON}
            ) as resp:
                return web.Response(body=await resp.read(), status=resp.status, content_type=JSON)
        if self.mode == "429":
            return web.Response(status=429, text="rate limited", headers={"Retry-After": "1"})
        if self.mode == "429_storm":
            retry = {"Retry-After": str(STORM_RETRY_AFTER)}
            return web.Response(status=429, text="over quota", headers=retry)
        if self.mode == "hang":
            await asyncio.Event().wait()  # never set: cancelled when the caller gives up
        if self.mode == "drip":
            return await self._drip(request)
        if self.mode == "close_mid_answer":
            return await self._close_mid_answer(request, body)
        if self.mode == "receipts_error":
            rid = orjson.loads(body).get("id")
            error = {"code": -32000, "message": "receipts not available"}
            return web.json_response({"jsonrpc": "2.0", "id": rid, "error": error})
        if self.mode == "logs_range":
            rid = orjson.loads(body).get("id")
            error = {"code": -32000, "message": f"exceed maximum block range: {LOGS_RANGE_CAP}"}
            return web.json_response({"jsonrpc": "2.0", "id": rid, "error": error})
        return web.Response(body=next(self._malformed), content_type=JSON)

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": JSON})
        resp.content_length = DRIP_LENGTH
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        until = loop.time() + DRIP_FOR
        # Cancelled (handler_cancellation) when the caller gives up and closes.
        while loop.time() < until:
            await resp.write(b" ")
            await asyncio.sleep(DRIP_EVERY)
        _cut(request)
        return resp

    async def _close_mid_answer(self, request: web.Request, body: bytes) -> web.StreamResponse:
        rid = None
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
            rid = orjson.loads(body).get("id")
        answer = orjson.dumps({"jsonrpc": "2.0", "id": rid, "result": "0x" + "00" * 64})
        resp = web.StreamResponse(headers={"Content-Type": JSON})
        resp.content_length = len(answer)
        await resp.prepare(request)
        await resp.write(answer[: len(answer) // 2])
        _cut(request)
        return resp


def _too_wide(body: bytes) -> bool:
    """Whether ``body`` is one eth_getLogs over more than ``LOGS_RANGE_CAP`` blocks."""
    try:
        doc = orjson.loads(body)
        if not isinstance(doc, dict) or doc.get("method") != "eth_getLogs":
            return False
        flt = doc["params"][0]
        span = int(flt["toBlock"], 16) - int(flt["fromBlock"], 16) + 1
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
        return False
    return span > LOGS_RANGE_CAP


def _cut(request: web.Request) -> None:
    """Close the connection under a response that has not ended."""
    if request.transport is not None:
        request.transport.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="fault_upstream", description=__doc__)
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--every", action="store_true", help="fault HEAD_METHODS too")
    p.add_argument("--rps", type=float, default=0.0, help="rate: calls forwarded a second")
    p.add_argument("--lacks", default="", help="a method answered -32601")
    p.add_argument("--upstream", required=True, help="the real node, for HEAD_METHODS")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    if args.mode == "pending_garbage":
        app = pending_garbage_app(args.upstream)
    elif args.mode == "ws_garbage":
        app = ws_garbage_app(args.upstream)
    else:
        app = FaultUpstreamApp(args.mode, args.upstream, args.every, args.rps, args.lacks).app()
    asyncio.run(serve(app, args.host, args.port))


def pending_garbage_app(upstream: str) -> web.Application:
    proxy = CountingProxyApp(upstream, set(), 0.0)
    left = [PENDING_GARBAGE]

    def garbage(message: str) -> str | None:
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(message)
            if (
                isinstance(doc, dict)
                and doc.get("method") == "eth_subscribe"
                and doc.get("params") == ["newPendingTransactions"]
                and left[0] > 0
            ):
                left[0] -= 1
                return MALFORMED[0].decode()
        return None

    proxy.intercept = garbage
    return proxy.app()


def ws_garbage_app(upstream: str) -> web.Application:
    proxy = CountingProxyApp(upstream, set(), 0.0)
    passed = HEAD_METHODS | {"eth_subscribe", "eth_unsubscribe"}

    def garbage(message: str) -> str | None:
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(message)
            if (
                isinstance(doc, dict)
                and doc.get("method") not in passed
                and isinstance(doc.get("id"), int)
            ):
                return WS_GARBAGE % doc["id"]
        return None

    proxy.intercept = garbage
    return proxy.app()


class FaultUpstream(LabServer):
    module = "tests.lab.fault_upstream"

    def __init__(
        self,
        procs: Procs,
        mode: str,
        upstream: str,
        log_path: Path | None = None,
        every: bool = False,
        rps: float = 0.0,
        lacks: str = "",
    ) -> None:
        args = ["--mode", mode, "--upstream", upstream] + (["--every"] if every else [])
        args += ["--rps", str(rps), "--lacks", lacks]
        super().__init__(procs, args, log_path)
        self.mode = mode

    async def load(self) -> dict[str, int]:
        """``GET /load``: in_flight_peak, window_peak (arrivals in one second), refused,
        served_after_refusal."""
        return dict(await self._get("/load"))

    async def set_mode(self, mode: str, every: bool = False) -> None:
        """Switch the fault (``POST /mode``); ``every``: give it to ``HEAD_METHODS`` too."""
        doc = orjson.dumps({"mode": mode, "every": every})
        async with aiohttp.ClientSession() as s, s.post(self.url + "/mode", data=doc) as r:
            assert r.status == 200, f"POST /mode: HTTP {r.status} {await r.text()}"
        self.mode = mode

    async def fault_calls(self) -> int:
        """Calls that got the fault (every call outside ``HEAD_METHODS``, or every
        ``eth_getBlockReceipts`` in ``receipts_error`` mode)."""
        counts = await self.counts()
        if self.mode == "receipts_error":
            return counts.get("eth_getBlockReceipts", 0)
        passed = HEAD_METHODS
        if self.mode == "ws_garbage":
            passed = passed | {"eth_subscribe", "eth_unsubscribe"}
        return sum(n for m, n in counts.items() if m not in passed)


async def start_fault_upstream(
    procs: Procs,
    mode: str,
    upstream: str,
    log_path: Path | None = None,
    every: bool = False,
    *,
    rps: float = 0.0,
    lacks: str = "",
) -> FaultUpstream:
    fake = FaultUpstream(procs, mode, upstream, log_path, every, rps, lacks)
    fake.start()
    await fake.wait_ready()
    return fake


if __name__ == "__main__":
    main()
