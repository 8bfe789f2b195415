"""The entry node's feed in: it follows each ``[[nitro.inputs]]`` as a Nitro node follows
its ``--node.feed.input.url`` list, and puts every feed message into the tree once.

Each input is a WebSocket client of Nitro's feed server: it sends
``Arbitrum-Feed-Client-Version: 2`` and, once it has taken anything, the next number it
wants (``Arbitrum-Requested-Sequence-Number``), so a reconnect resumes with no gap; it
offers compression as a Nitro node does (``chainrelay.nitro.deflate``). What every input
sends goes through one ``FeedIntake`` (each number once, in order, checked), and each
message it passes on becomes a push into the node's batch ingress: signed by this node's
key over the exact bytes received, made durable in the batch log, then published to the
tree as one lz4 frame (position = the sequence number). A confirmation from the
sequencer becomes a signed confirmation of the stream (its backlogs are trimmed below
it, at every node).

Every bad input is logged and counted (``chainrelay_nitro_messages{where="in"}``): a
broadcast that is not JSON, or larger than ``max_message_bytes``, closes that input's
connection (it reconnects from the next number wanted); a message with a bad signature,
too large, or an input going backwards is dropped, its number still wanted from the
others. A number missing for ``gap_wait`` from every input reconnects them all from it.

The log keeps the feed by count and age (``log_keep_messages``, ``log_keep_seconds``),
trimmed every ``log_trim_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from chainrelay.batches.frame import CONFIRMED, GAP, PUSH, Push, sign_batch, sign_confirmed
from chainrelay.batches.ingress import Ingress
from chainrelay.batches.log import TRIM_ROWS
from chainrelay.config import NitroConfig
from chainrelay.errors import BatchLogError, BatchRefused
from chainrelay.metrics import Metrics
from chainrelay.nitro.codec import (
    CHAIN_ID_HEADER,
    CLIENT_VERSION_HEADER,
    FEED_VERSION,
    REQUESTED_SEQ_HEADER,
    FeedMessage,
    NitroFormatError,
    parse_broadcast,
)
from chainrelay.nitro.deflate import client_extensions
from chainrelay.nitro.intake import FeedIntake
from chainrelay.tree.frame import Signer
from chainrelay.tree.streams import BatchSpec

log = logging.getLogger(__name__)

CLOSE_TOO_BIG = 1009


class NitroFeedIn:
    """Follows every input of ``cfg`` into ``ingress``'s stream ``spec.name``."""

    def __init__(
        self,
        cfg: NitroConfig,
        spec: BatchSpec,
        ingress: Ingress,
        signer: Signer,
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.spec = spec
        self.ingress = ingress
        self.signer = signer
        self.metrics = metrics
        self.intake: FeedIntake | None = None
        self._conns: dict[str, ClientConnection] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Future[Any]] = set()
        self._counters: dict[str, Any] = {}
        self._begun = False
        self._confirmed_sent = -1
        self.linked: dict[str, bool] = {}  # each input's URL: connected now

    async def start(self) -> None:
        st = self.ingress.streams[self.spec.name]
        rules = st.rules
        # A log that holds the stream goes on from it; an empty one starts where the
        # inputs are (Nitro's numbers are in the hundreds of millions).
        self._begun = rules.next != rules.first
        self.intake = FeedIntake(
            chain_id=self.spec.chain_id,
            allowed_signers=frozenset(bytes.fromhex(a[2:]) for a in self.cfg.allowed_signers),
            max_payload_bytes=self.spec.max_payload_bytes,
            max_held=self.cfg.order_max_held,
            max_held_bytes=self.cfg.order_max_held_bytes,
            next_seq=rules.next if self._begun else None,
        )
        loop = asyncio.get_running_loop()
        for inp in self.cfg.inputs:
            self._tasks.append(loop.create_task(self._follow(inp.url)))
        self._tasks.append(loop.create_task(self._watch_gaps()))
        self._tasks.append(loop.create_task(self._retain()))
        log.info(
            "nitro feed in: %d input(s) into %s, next %s",
            len(self.cfg.inputs),
            self.spec.name,
            self.intake.next,
        )

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for fut in list(self._pending):
            fut.cancel()

    def _count(self, outcome: str, n: int = 1) -> None:
        c = self._counters.get(outcome)
        if c is None:
            c = self._counters[outcome] = self.metrics.nitro_messages.labels("in", outcome)
        c.inc(n)

    # --- each input -----------------------------------------------------------------------
    async def _follow(self, url: str) -> None:
        cfg = self.cfg
        delay = cfg.retry_delay
        while True:
            intake = self.intake
            assert intake is not None
            headers = {CLIENT_VERSION_HEADER: str(FEED_VERSION)}
            if intake.next is not None:
                headers[REQUESTED_SEQ_HEADER] = str(intake.next)
            try:
                async with asyncio.timeout(cfg.connect_timeout):
                    ws = await connect(
                        url,
                        additional_headers=headers,
                        max_size=cfg.max_message_bytes,
                        compression=None,
                        extensions=client_extensions() if cfg.compression else None,
                        open_timeout=None,
                        proxy=None,
                    )
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                log.warning("nitro input %s: cannot connect: %s", url, exc or type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.retry_max)
                continue
            try:
                if self._right_chain(url, ws):
                    delay = cfg.retry_delay
                    await self._read(url, ws)
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                if exc.sent is not None and exc.sent.code == CLOSE_TOO_BIG:
                    self._count("too_large")
                    log.warning(
                        "nitro input %s: a broadcast over %d bytes; reconnecting from %s",
                        url,
                        cfg.max_message_bytes,
                        intake.next,
                    )
                else:
                    log.info(
                        "nitro input %s closed (%s); reconnecting from %s",
                        url,
                        rcvd.code if rcvd is not None else "no close frame",
                        intake.next,
                    )
            finally:
                self._conns.pop(url, None)
                self.linked[url] = False
                await ws.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, cfg.retry_max)

    def _right_chain(self, url: str, ws: ClientConnection) -> bool:
        """False (and logged) if the input says it serves another chain."""
        assert ws.response is not None
        said = ws.response.headers.get(CHAIN_ID_HEADER)
        if said is not None and said.strip() != str(self.spec.chain_id):
            self._count("wrong_chain")
            log.error(
                "nitro input %s serves chain %s, not %d: not followed",
                url,
                said,
                self.spec.chain_id,
            )
            return False
        return True

    async def _read(self, url: str, ws: ClientConnection) -> None:
        intake = self.intake
        assert intake is not None
        intake.connected(url)
        self._conns[url] = ws
        self.linked[url] = True
        log.info("nitro input %s: following from %s", url, intake.next)
        while True:
            data = await ws.recv(decode=False)
            if not self._take(url, data):
                await ws.close(1003, "malformed broadcast message")
                return

    def _take(self, url: str, data: bytes) -> bool:
        """One broadcast message from input ``url``; False if it is malformed."""
        intake = self.intake
        assert intake is not None
        try:
            broadcast = parse_broadcast(data)
        except NitroFormatError as exc:
            self._count("malformed")
            log.warning("nitro input %s: malformed broadcast (%d bytes): %s", url, len(data), exc)
            return False
        taken = intake.take(url, broadcast)
        if taken.duplicates:
            self._count("duplicate", taken.duplicates)
        for r in taken.refused:
            self._count(r.outcome)
            log.warning(
                "nitro input %s: message %d refused (%s): %s", url, r.seq, r.outcome, r.reason
            )
        for msg in taken.released:
            self._submit(msg)
        if taken.confirmed is not None:
            self._confirm(taken.confirmed)
        return True

    # --- into the stream --------------------------------------------------------------------
    def _submit(self, msg: FeedMessage) -> None:
        spec = self.spec
        if not self._begun:
            self._begun = True
            self.ingress.begin_at(spec.name, msg.seq)
        sig = sign_batch(self.signer, spec.chain_id, spec.name, msg.seq, msg.raw)
        try:
            done = self.ingress.submit(Push(PUSH, spec.name, msg.seq, sig, msg.raw))
        except BatchRefused as exc:
            self._refused(msg.seq, exc)
            return
        self._count("accepted")
        self._watch(done, msg.seq)

    def _refused(self, seq: int, exc: BatchRefused) -> None:
        self._count("refused")
        log.error("nitro message %d not kept: %s (%d)", seq, exc.message, exc.code)
        if exc.code == GAP and isinstance(exc.data, dict) and "expected" in exc.data:
            # The log lost what was in flight (a failed commit): want it again, from
            # every input.
            self._resync(int(exc.data["expected"]))

    def _resync(self, expected: int) -> None:
        intake = self.intake
        assert intake is not None
        order = intake.order
        order.next = expected
        order.held.clear()
        order.held_bytes = 0
        for ws in list(self._conns.values()):
            ws.transport.abort()

    def _watch(self, done: Awaitable[int | None], seq: int) -> None:
        fut = asyncio.ensure_future(done)
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            return
        self._pending.add(fut)
        fut.add_done_callback(lambda f: self._settled(f, seq))

    def _settled(self, fut: asyncio.Future[Any], seq: int) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            return
        exc = fut.exception()
        if isinstance(exc, BatchRefused):
            self._refused(seq, exc)
        elif exc is not None:
            log.error("nitro message %d not kept: %s", seq, exc)

    def _confirm(self, seq: int) -> None:
        spec = self.spec
        nxt = self.ingress.hub.next_seq(spec.name)
        if nxt is None or not self._begun:
            return
        seq = min(seq, nxt - 1)  # only what is durable here
        if seq <= self._confirmed_sent or seq < self.ingress.streams[spec.name].rules.first:
            return
        sig = sign_confirmed(self.signer, spec.chain_id, spec.name, seq)
        try:
            self._watch(self.ingress.submit(Push(CONFIRMED, spec.name, seq, sig)), seq)
        except BatchRefused as exc:
            log.info("nitro confirmation %d not passed on: %s", seq, exc.message)
            return
        self._confirmed_sent = seq

    # --- retention ---------------------------------------------------------------------------
    async def _retain(self) -> None:
        """Trim the batch log to ``log_keep_messages`` and ``log_keep_seconds`` now and
        then: what a resume from the range endpoint can reach back to."""
        cfg = self.cfg
        while True:
            await asyncio.sleep(cfg.log_trim_interval)
            before_us = int((time.time() - cfg.log_keep_seconds) * 1e6)
            try:
                while True:
                    n = await self.ingress.log.trim(
                        self.spec.name, cfg.log_keep_messages, max(0, before_us)
                    )
                    if n:
                        log.info("nitro feed: %d old messages trimmed from the log", n)
                    if n < TRIM_ROWS:
                        break
            except BatchLogError as exc:
                log.warning("nitro feed: log retention failed: %s", exc)

    # --- numbers no input sends ----------------------------------------------------------------
    async def _watch_gaps(self) -> None:
        """A number missing for ``gap_wait`` while later ones are held: every input lost
        it (or sent it badly); each reconnects and asks from it."""
        intake = self.intake
        assert intake is not None
        since: float | None = None
        start: int | None = None
        while True:
            await asyncio.sleep(self.cfg.gap_wait / 4)
            missing = intake.missing()
            if missing is None:
                since = start = None
                continue
            now = time.monotonic()
            if start != missing.start or since is None:
                since, start = now, missing.start
                continue
            if now - since >= self.cfg.gap_wait:
                self._count("gap_reconnect")
                log.warning(
                    "nitro feed: messages %d-%d came from no input in %.1fs; reconnecting",
                    missing.start,
                    missing.end - 1,
                    self.cfg.gap_wait,
                )
                since = now
                for ws in list(self._conns.values()):
                    ws.transport.abort()
