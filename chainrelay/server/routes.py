"""What the HTTP front door serves and who answers it: the paths besides JSON-RPC POSTs and
the services behind them, as ``HttpServer`` is given them (``Routes``)."""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Awaitable, Callable, Mapping

from chainrelay.access.identity import Identity
from chainrelay.server.pending import Owed
from chainrelay.server.ws import Subscriptions, WsSession

if typing.TYPE_CHECKING:
    from chainrelay.rpc.replay import Seen
    from chainrelay.rpc.service import Served

# A body's answer: now, or later (None later: a notification, nothing owed).
Handler = Callable[[bytes, Identity], bytes | Awaitable[bytes | None]]

# The path of the feed (the relay tree's frames) on the node's port.
FEED_PATH = b"/feed"
# Batch streams' frames by seq, from a backlog or a durable log: GET with a query.
RANGE_PATH = b"/feed/range"
# Where sequencers push batches: a WebSocket upgrade, or POST one push message.
BATCHES_PATH = b"/batches"
# An answer made elsewhere: status, body, content type.
Reply = tuple[int, bytes, bytes]


class Replayer(typing.Protocol):
    """The JSON-RPC side of replays (``RpcService``): a body's answer with the record that
    answered it, if one did, and the result of a record's call now for ``who``, or None
    when it must take the full path; for a body just forwarded uncached (given without
    its id), the head generation its call is remembered at (``passed``), and that call
    sent again under another id, its answer given to ``out`` (``again``; False: the full
    path)."""

    def serve(self, body: bytes, who: Identity) -> Served: ...

    def replay(self, record: Seen, who: Identity) -> bytes | None: ...

    def passed(self, rest: bytes) -> int | None: ...

    def again(self, body: bytes, token: bytes, rest: bytes, who: Identity, out: Owed) -> bool: ...


class FeedOpener(typing.Protocol):
    def __call__(
        self,
        transport: asyncio.Transport,
        *,
        ip: str,
        max_send_buffer: int,
        close_timeout: float,
    ) -> WsSession: ...


class BatchRoutes(typing.Protocol):
    """An ingress node's push endpoints (batches/ingress.py behind them)."""

    def authorized(self, header: bytes | None) -> bool: ...

    def refuse_unauthorized(self) -> None: ...

    def open(
        self, transport: asyncio.Transport, *, ip: str, max_send_buffer: int, close_timeout: float
    ) -> WsSession: ...

    def post(self, body: bytes) -> Awaitable[Reply]: ...


class Routes:
    """What the front door serves besides JSON-RPC POSTs."""

    def __init__(
        self,
        rpc: Handler,
        health: Callable[[], tuple[int, bytes]] | None,
        metrics_text: Callable[[], bytes | Awaitable[bytes]] | None,
        ws_subscriptions: Callable[[WsSession], Subscriptions] | None = None,
        replayer: Replayer | None = None,
        feed: FeedOpener | None = None,
        batches: BatchRoutes | None = None,
        feed_range: Callable[[bytes, bytes | None], Awaitable[Reply]] | None = None,
        pages: Mapping[bytes, Callable[[], Reply]] | None = None,
    ) -> None:
        self.rpc = rpc
        # Answers repeats of a POST without calling ``rpc`` (see HttpServer.learn_replay).
        self.replayer = replayer
        # GET /health and /metrics (None: not served here, 404); the admin listener's
        # metrics under workers come later (gathered from the other workers).
        self.health = health
        self.metrics_text = metrics_text
        # Opens the eth_subscribe state of each upgraded WebSocket connection.
        self.ws_subscriptions = ws_subscriptions
        # Opens a child's feed session for a WebSocket upgrade on FEED_PATH.
        self.feed = feed
        # An ingress node's BATCHES_PATH (pushes), and any tree node's RANGE_PATH
        # (called with the query string and the request's Via).
        self.batches = batches
        self.feed_range = feed_range
        # Other GETs by path, answered now with any content type (the admin listener's
        # status page and its JSON); none on the public port.
        self.pages: Mapping[bytes, Callable[[], Reply]] = pages or {}
