"""What a feed client (``chainrelay.subscriber``, ``chainrelay.batchsubscriber``) needs to
reach a node and judge its frames: the node's endpoints, derived from the one URL a user
gives, the signer addresses it trusts, and ``FeedSubscription``, the links, queue and
lifecycle that a block and a batch subscription share, and ``print_items``, the printing
loop of ``chainrelay subscribe`` for either."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, Self, TextIO, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp
import orjson

from chainrelay.errors import BackfillFailed, ConfigError
from chainrelay.tree.link import FeedLink
from chainrelay.tree.session import Gap, Want

log = logging.getLogger(__name__)


def feed_url(url: str) -> str:
    """The ``/feed`` WebSocket URL of a node given as ``ws://host:port[/feed]`` or
    ``http://host:port``."""
    return ws_endpoint(url, "/feed", "a feed URL")


def ws_endpoint(url: str, path: str, what: str) -> str:
    """A node's WebSocket endpoint ``path`` from ``ws(s)://`` or ``http(s)://HOST:PORT``
    (a path given in ``url`` is kept); ``ConfigError`` naming ``what`` otherwise."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError(f"{what} is ws://HOST:PORT{path}: {url!r}")
    given = parts.path if parts.path not in ("", "/") else path
    return urlunsplit((scheme, parts.netloc, given, parts.query, ""))


def rpc_url(url: str) -> str:
    """The JSON-RPC endpoint of the node serving the feed at ``url``: same host and port."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "/", "", ""))


def range_url(url: str, stream: str, start: int, limit: int) -> str:
    """``GET /feed/range`` of the node serving the feed at ``url`` (same host and port):
    up to ``limit`` frames of ``stream`` from position ``start``, from its backlog or a
    durable log."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme == "wss" else "http"
    query = urlencode({"stream": stream, "from": start, "limit": limit})
    return urlunsplit((scheme, parts.netloc, "/feed/range", query, ""))


def signer_address(text: str) -> bytes:
    """A trusted signer given as 0x-hex (``ConfigError`` unless it is 20 bytes)."""
    raw = text[2:] if text[:2] in ("0x", "0X") else text
    try:
        address = bytes.fromhex(raw)
    except ValueError:
        address = b""
    if len(address) != 20:
        raise ConfigError(f"a trusted signer is a 20-byte hex address: {text!r}")
    return address


T = TypeVar("T")


async def in_rounds(
    order: list[FeedLink],
    attempt: Callable[[FeedLink], Awaitable[T]],
    *,
    rounds: int,
    retry_delay: float,
    retry_max: float,
    failed: str,
) -> T:
    """What ``attempt`` gets from the first link in ``order`` that answers, trying them all
    in up to ``rounds`` rounds with a doubling back-off between rounds (from ``retry_delay``
    to ``retry_max``). Call it to fetch what no link sent from the links' nodes. An attempt
    fails by raising ``OSError``, ``TimeoutError``, ``aiohttp.ClientError`` or
    ``ValueError``; the link that answered moves to the front of ``order``, so the next
    fetch asks it first. ``BackfillFailed`` (``failed``, then the last problems) when no
    round gives an answer."""
    delay = retry_delay
    problems: list[str] = []
    for round_ in range(rounds):
        for i, link in enumerate(order):
            try:
                got = await attempt(link)
            except (OSError, TimeoutError, aiohttp.ClientError, ValueError) as exc:
                problems.append(f"{link.name}: {exc}")
                continue
            if i:
                order.insert(0, order.pop(i))
            return got
        if round_ + 1 < rounds:
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry_max)
    raise BackfillFailed(f"{failed}: {'; '.join(problems[-3:])}")


class Queued(Protocol):
    """What a subscription's queue holds, as its shared part reads it."""

    link: FeedLink
    size: int  # counted against ``queue_bytes``


ItemT = TypeVar("ItemT")  # what the consumer gets: a block, a batch
QueuedT = TypeVar("QueuedT", bound=Queued)


class FeedSubscription(Generic[ItemT, QueuedT]):
    """What a block subscription and a batch subscription share: one ``FeedLink`` per
    parent URL, the bounded queue between the links' read loops and the consumer, the
    resynchronisation after it overflowed, the drop counters, and iterating once then
    closing. A subclass checks frames (``on_frame``), says where each parent resumes
    (``_wants``, ``_on_gap``) and turns a queued item into what the consumer gets
    (``_hand_over``)."""

    # Log lines name the subscriber and what it queues.
    noun = "subscriber"
    unit = "frames"

    def __init__(
        self,
        urls: str | Sequence[str],
        stream: str,
        *,
        queue_items: int,
        queue_bytes: int,
        max_frame_bytes: int,
        connect_timeout: float,
        retry_delay: float,
        retry_max: float,
        ping_interval: float,
    ) -> None:
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ConfigError("a subscription needs at least one node URL")
        self.stream = stream
        self.queue_items = queue_items
        self.queue_bytes = queue_bytes
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        # Counters: frames dropped by reason, copies already had, every signer accepted.
        self.dropped: collections.Counter[str] = collections.Counter()
        self.duplicates = 0
        self.signers: set[str] = set()
        self.links = [
            FeedLink(
                feed_url(u),
                name=f"parent{i}",
                wants=self._wants,
                on_frame=self.on_frame,
                on_gap=self._on_gap,
                max_frame_bytes=max_frame_bytes,
                connect_timeout=connect_timeout,
                retry_delay=retry_delay,
                retry_max=retry_max,
                ping_interval=ping_interval,
            )
            for i, u in enumerate(url_list)
        ]
        self.queue: collections.deque[QueuedT] = collections.deque()
        self._queued_bytes = 0
        self._arrived = asyncio.Event()
        self._overflow = False
        self._stale: dict[FeedLink, int] = {}  # link -> session whose frames are ignored
        self._gen: AsyncGenerator[ItemT, None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._closed = False

    # --- what a subclass says -------------------------------------------------------------
    def on_frame(self, link: FeedLink, raw: bytes) -> None:
        """Check one frame from ``link`` and queue it, or count why not (a ``FeedLink``
        callback, run in its read loop: never blocks)."""
        raise NotImplementedError

    def _wants(self) -> list[Want]:
        raise NotImplementedError

    def _on_gap(self, link: FeedLink, stream: str, gap: Gap) -> None:
        raise NotImplementedError

    def _hand_over(self, item: QueuedT) -> AsyncIterator[ItemT]:
        """What the consumer gets for one queued item: none (a copy, a bad payload), it,
        or the positions missing before it and then it."""
        raise NotImplementedError

    def _resume_point(self) -> object:
        """Where the parents replay from after a resync, for the log."""
        raise NotImplementedError

    # --- the consumer side ----------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[ItemT]:
        if self._gen is not None or self._closed:
            raise RuntimeError(f"a {type(self).__name__} is iterated once")
        self._gen = self._items()
        return self._gen

    async def closing(self) -> AsyncGenerator[ItemT, None]:
        """Each item, as ``async for`` gives them; the subscription closed when the
        iteration ends, however it ends (the body of ``subscribe``)."""
        try:
            async for item in self:
                yield item
        finally:
            await self.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every link and forget what is queued; safe to call more than once."""
        self._closed = True
        self._arrived.set()
        gen, self._gen = self._gen, None
        if gen is not None:
            with contextlib.suppress(RuntimeError):  # closed from another task mid-step
                await gen.aclose()
        for link in self.links:
            await link.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None
        self.queue.clear()
        self._queued_bytes = 0

    async def _items(self) -> AsyncGenerator[ItemT, None]:
        for link in self.links:
            await link.start()
        try:
            while True:
                item = await self._take()
                if item is None:
                    return
                async for out in self._hand_over(item):
                    yield out
        finally:
            for link in self.links:
                await link.stop()

    async def _take(self) -> QueuedT | None:
        """The next queued item; None once the subscription is closed."""
        while not self.queue:
            if self._closed:
                return None
            if self._overflow:
                self._resync()
            self._arrived.clear()
            await self._arrived.wait()
        item = self.queue.popleft()
        self._queued_bytes -= item.size
        return item

    def _resync(self) -> None:
        """Every frame that did not fit was dropped; the queue is empty now: reconnect each
        link so its parent replays from the first position not queued."""
        self._overflow = False
        for link in self.links:
            self._stale[link] = link.sessions
            link.reset("resync after the queue overflowed")
        log.warning(
            "%s fell behind its parents; resynchronising from %s", self.noun, self._resume_point()
        )

    def _session(self) -> aiohttp.ClientSession:
        """The HTTP session for fetching what no link sent, opened on first use."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http

    # --- the links' side: called from their read loops, never blocking -------------------
    def _refused(self, link: FeedLink) -> bool:
        """True (and counted) for a frame that arrives while the queue is overflowing or
        from a session a resync is replacing."""
        if self._overflow or self._stale.get(link) == link.sessions:
            self.dropped["overflow"] += 1
            return True
        return False

    def _full(self) -> bool:
        """True (counted, and the queue overflowing until it drains) when the queue has no
        room for one more item; one item always fits an empty queue."""
        if not self.queue or (
            len(self.queue) < self.queue_items and self._queued_bytes < self.queue_bytes
        ):
            return False
        self._overflow = True
        self.dropped["overflow"] += 1
        log.warning(
            "%s queue full (%d %s): dropping until it drains", self.noun, len(self.queue), self.unit
        )
        return True

    def _enqueue(self, item: QueuedT) -> None:
        self.queue.append(item)
        self._queued_bytes += item.size
        self._arrived.set()

    def _drop(self, link: FeedLink | None, reason: str, detail: object = "") -> None:
        self.dropped[reason] += 1
        level = logging.WARNING if self.dropped[reason] == 1 else logging.DEBUG
        where = "a range answer" if link is None else f"{link.name} ({link.url})"
        log.log(level, "%s dropped a frame from %s: %s %s", self.noun, where, reason, detail)


async def print_items(
    sub: FeedSubscription[ItemT, Any],
    what: str,
    line: Callable[[ItemT], dict[str, object]],
    signed_by: Callable[[ItemT], str | None],
    *,
    trusted: bool,
    count: int | None,
    max_seconds: float | None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """The body of ``chainrelay subscribe`` for a subscription of ``what`` (``blocks``,
    ``batches``): one JSON ``line`` per item on ``out``, until ``count`` items or
    ``max_seconds``; without ``trusted`` signers, a warning and each new signer (``signed_by``,
    None for an item no signer vouches for) on ``err``, then the drop counters. Closes ``sub``;
    returns the exit code."""
    if not trusted:
        print(
            f"chainrelay subscribe: no --trust given: {what} signed by any key are accepted",
            file=err,
            flush=True,
        )
    warned: set[str] = set()
    n = 0
    try:
        async with asyncio.timeout(max_seconds):
            async for item in sub:
                signer = None if trusted else signed_by(item)
                if signer is not None and signer not in warned:
                    warned.add(signer)
                    print(f"chainrelay subscribe: {what} signed by {signer}", file=err, flush=True)
                out.write(orjson.dumps(line(item)).decode() + "\n")
                out.flush()
                n += 1
                if count is not None and n >= count:
                    break
    except TimeoutError:
        pass
    finally:
        await sub.aclose()
        if sub.dropped:
            print(f"chainrelay subscribe: dropped frames {dict(sub.dropped)}", file=err, flush=True)
    return 0
