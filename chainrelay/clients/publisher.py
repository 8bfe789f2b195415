"""Pushing a sequencer's signed batches to ingress nodes: the publisher library, and
``chainrelay publish``.

``push`` returns once an ingress node has the batch durably::

    from chainrelay.clients.publisher import Publisher

    async with Publisher(["ws://ingress-a:8545", "ws://ingress-b:8545"], key=SEQUENCER_KEY,
                         stream="arbitrum/batches", chain_id=42161, api_key=KEY) as pub:
        ack = await pub.push(seq, payload)        # one at a time
        futures = [pub.submit(s, p) for s, p in batches]   # or pipelined
        await pub.confirm(last_final_seq)         # batches up to it are final on L1

Each URL is one ingress node, held by its own connection; every batch goes to every node,
and a batch's future is resolved by the first node that acknowledges it (durable there):
the others catch up in the background. Each connection keeps the batches its node has not
acknowledged (bounded in bytes: a lagging node loses the oldest ones another node already
acknowledged) and sends up to ``window`` of them at a time.

A connection that breaks is reconnected after a back-off that doubles from ``retry_delay``
to ``retry_max``; every batch its node has not acknowledged is then sent again in seq
order (a duplicate is acknowledged again: pushes are idempotent). With no connection to
any node for ``give_up_after`` seconds, the waiting futures fail (``PublishError``). A node
that refuses the API key (HTTP 401 at the upgrade) fails everything at once
(``PublishUnauthorized``): a wrong key is not retried.

Refusals are answered at once, acknowledgements only after an fsync, so one node's
refusal often comes before another node's ack of the same batch; what a refusal does
depends on whose fault it is:

- The sequencer's (conflict, signer, signature, size, unknown stream, malformed): no node
  will take the batch; its future fails at once with ``PublishRefused``.
- One node's state (a gap, not held by enough relays, not durable): a gap is answered by
  sending the node the missing batches again when the connection still holds them, -32047
  by sending again (each at most ``resync_limit`` times without an ack in between); past
  that the node's connection forgets the batch, and its future fails only when no other
  connection still holds it unacknowledged: an ack from any node resolves it.
- A node whose gap starts at a batch its connection forgot while other nodes had it (it
  was down longer than ``max_unacked_bytes`` lasts) can never catch up from this
  publisher: it is marked ``behind``, logged once, and no longer sent to until the
  publisher restarts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from chainrelay import defaults as d
from chainrelay.batches.frame import (
    CONFIRMED,
    GAP,
    NOT_DURABLE,
    NOT_HELD,
    PUSH,
    PUSH_HEADER_LEN,
    Push,
    encode_push,
    sign_batch,
    sign_confirmed,
    stream_field,
)
from chainrelay.clients.feed import ws_endpoint
from chainrelay.errors import ConfigError, PublishError, PublishRefused, PublishUnauthorized
from chainrelay.tree.frame import Signer

log = logging.getLogger(__name__)

# Refusals about one node's state, not the batch: another node may still acknowledge it.
NODE_REFUSALS = frozenset({GAP, NOT_HELD, NOT_DURABLE})


# --- pieces without I/O -----------------------------------------------------------------------
def ingress_url(url: str) -> str:
    """The push endpoint of ``url``: ``ws://HOST:PORT`` (or http://) means its ``/batches``."""
    return ws_endpoint(url, "/batches", "an ingress URL")


def private_key(key: bytes | str) -> bytes:
    """The 32 raw bytes of a secp256k1 key given as bytes or hex (``0x`` optional)."""
    if isinstance(key, str):
        text = key.strip()
        text = text[2:] if text[:2] in ("0x", "0X") else text
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise ConfigError("a sequencer key is 32 bytes of hex") from None
    if len(key) != 32:
        raise ConfigError(f"a sequencer key is 32 bytes, got {len(key)}")
    return bytes(key)


def generated_payload(seed: int, seq: int, size: int) -> bytes:
    """Batch ``seq`` of a generated stream: the same bytes for the same ``(seed, seq,
    size)`` (a rerun resends the same batches), and as incompressible as a brotli'd batch."""
    return hashlib.shake_256(f"chainrelay publish {seed} {seq}".encode()).digest(size)


def read_batches(lines: Sequence[str] | TextIO, *, name: str = "batches") -> list[bytes]:
    """Batches from text, one per line in hex (``0x`` optional); blank lines are skipped.
    ``ConfigError`` names the first line that is not hex."""
    out: list[bytes] = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        text = text[2:] if text[:2] in ("0x", "0X") else text
        try:
            payload = bytes.fromhex(text)
        except ValueError:
            raise ConfigError(f"{name} line {number}: not hex") from None
        if not payload:
            raise ConfigError(f"{name} line {number}: an empty batch")
        out.append(payload)
    return out


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of values sorted ascending (0.0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * fraction // 1))
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


@dataclass(frozen=True, slots=True)
class Ack:
    """A batch acknowledged: durable at ``url`` (held by ``relays`` relays when asked)."""

    stream: str
    seq: int
    url: str  # the ingress node that acknowledged it first
    ms: float  # from submit to that acknowledgement
    relays: int | None = None


@dataclass(slots=True)
class _Batch:
    seq: int
    message: bytes
    future: asyncio.Future[Ack]
    submitted: float  # time.monotonic() at submit


# --- one ingress node -------------------------------------------------------------------------
class _Ingress:
    """One ingress node's connection, with the batches it has not acknowledged."""

    def __init__(self, pub: Publisher, url: str) -> None:
        self.pub = pub
        self.url = url
        self.queue: dict[int, _Batch] = {}  # not acknowledged by this node, submit order
        self.queue_bytes = 0
        self.to_send: collections.deque[int] = collections.deque()
        self.in_flight: set[int] = set()
        self.confirm: tuple[int, bytes] | None = None  # the highest not answered by this node
        self.confirm_sent = False  # on this connection
        self.connected = False
        self.failures = 0  # connects in a row that failed
        self.sessions = 0
        self.resyncs = 0  # resends since the last acknowledgement
        self.dropped = 0  # batches forgotten unacknowledged: another node had them
        # The highest seq forgotten here unacknowledged while another node had it or could
        # still take it: a gap at or below it is one this connection cannot fill.
        self.lost_through = -1
        self.behind = False  # hopelessly behind: no longer sent to
        self.acks = 0
        self.last_error: str | None = None
        self.task: asyncio.Task[None] | None = None
        self._conn: ClientConnection | None = None
        self._wake = asyncio.Event()
        self._resyncing = False
        self._closing: set[asyncio.Task[None]] = set()

    def add(self, batch: _Batch) -> bool:
        """Queue ``batch`` for this node; False when the node is behind (not sent to)."""
        if self.behind:
            self.dropped += 1
            return False
        if batch.seq in self.queue:
            self.queue_bytes -= len(self.queue[batch.seq].message)
        self.queue[batch.seq] = batch
        self.queue_bytes += len(batch.message)
        self.to_send.append(batch.seq)
        self._wake.set()
        # Bounded: a node far behind keeps only what no node has acknowledged yet (the
        # publisher bounds that) plus the newest others did, up to max_unacked_bytes.
        while self.queue_bytes > self.pub.max_unacked_bytes:
            oldest = next(iter(self.queue.values()))
            if not oldest.future.done():
                break
            self.forget(oldest.seq)
            self.dropped += 1
            self.lost_through = max(self.lost_through, oldest.seq)
        return True

    def forget(self, seq: int) -> _Batch | None:
        batch = self.queue.pop(seq, None)
        if batch is not None:
            self.queue_bytes -= len(batch.message)
        self.in_flight.discard(seq)
        return batch

    def send_confirm(self, seq: int, message: bytes) -> None:
        if self.confirm is None or seq > self.confirm[0]:
            self.confirm = (seq, message)
            self.confirm_sent = False
            self._wake.set()

    def _backoff(self) -> float:
        if self.failures == 0:
            return self.pub.retry_delay
        return min(self.pub.retry_max, self.pub.retry_delay * 2 ** (self.failures - 1))

    async def run(self) -> None:
        while True:
            reached = False
            try:
                reached = await self._session()
                why = "closed"
            except asyncio.CancelledError:
                raise
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in (401, 403):
                    self.pub.fatal(
                        PublishUnauthorized(
                            f"{self.url} refused the API key (HTTP {status}): "
                            "check --api-key / CHAINRELAY_API_KEY"
                        )
                    )
                    return
                why = f"HTTP {status} at the upgrade"
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                why = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                # A bug must not end the connection for good: logged, reconnected.
                why = f"{type(exc).__name__}: {exc}"
                log.exception("publisher connection to %s failed", self.url)
            finally:
                self._conn = None
                if self.connected:
                    self.connected = False
                    self.pub.went_down()
                self.in_flight.clear()
            if self.behind:
                self.last_error = "behind: it lacks batches only other nodes acknowledged"
                return
            self.last_error = why
            self.failures = 0 if reached else self.failures + 1
            log.info("publisher connection to %s ended: %s", self.url, why)
            await asyncio.sleep(self._backoff())

    async def _session(self) -> bool:
        """One connection until it ends; True once it was open (the back-off resets)."""
        async with connect(
            self.url,
            additional_headers={"Authorization": f"Bearer {self.pub.api_key}"},
            max_size=self.pub.max_message_bytes,
            compression=None,  # batches are compressed already; answers are tiny
            open_timeout=self.pub.connect_timeout,
            close_timeout=self.pub.connect_timeout,
            ping_interval=self.pub.ping_interval,
            ping_timeout=self.pub.ping_interval,
            proxy=None,  # an ingress node is dialled directly, whatever the environment says
        ) as conn:
            self._conn = conn
            self._resyncing = False
            self.confirm_sent = False
            self.in_flight.clear()
            # Everything not acknowledged, again, in seq order: the node acknowledges again
            # what it has, and takes the rest as if for the first time.
            self.to_send = collections.deque(sorted(self.queue))
            self.connected = True
            self.sessions += 1
            self.pub.went_up()
            sender = asyncio.create_task(self._send(conn), name=f"publisher send {self.url}")
            try:
                async for message in conn:
                    if isinstance(message, str):
                        self._answer(message)
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        return True

    async def _send(self, conn: ClientConnection) -> None:
        """Send queued batches, at most ``window`` unanswered; a confirmation once every
        batch up to it is sent."""
        window = self.pub.window
        try:
            while True:
                while self.to_send and len(self.in_flight) < window:
                    seq = self.to_send.popleft()
                    batch = self.queue.get(seq)
                    if batch is None or seq in self.in_flight:
                        continue  # acknowledged, refused or forgotten meanwhile
                    self.in_flight.add(seq)
                    await conn.send(batch.message)
                confirm = self.confirm
                if (
                    confirm is not None
                    and not self.confirm_sent
                    and (not self.to_send or self.to_send[0] > confirm[0])
                ):
                    self.confirm_sent = True  # kept until answered: a reconnect sends it again
                    await conn.send(confirm[1])
                self._wake.clear()
                await self._wake.wait()
        except websockets.ConnectionClosed:
            return
        except Exception:
            log.exception("publisher sender for %s failed", self.url)
            await conn.close(1011, "publisher error")

    def _answer(self, text: str) -> None:
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            log.warning("%s sent a message that is not JSON: %.100r", self.url, text)
            return
        if not isinstance(msg, dict) or msg.get("stream") != self.pub.stream:
            log.warning("%s sent an answer for another stream: %.200r", self.url, text)
            return
        seq = msg.get("seq")
        if not isinstance(seq, int):
            log.warning("%s sent an answer without a seq: %.200r", self.url, text)
            return
        kind = msg.get("type")
        if kind == "ack":
            relays = msg.get("relays")
            self._acked(seq, relays if isinstance(relays, int) else None)
        elif kind == "confirmed":
            if self.confirm is not None and seq >= self.confirm[0]:
                self.confirm = None
            self.pub.confirmed(seq)
        elif kind == "error":
            code = msg.get("code")
            data = msg.get("data")
            self._refused(
                seq,
                code if isinstance(code, int) else 0,
                str(msg.get("message", "")),
                data if isinstance(data, dict) else {},
            )
        else:
            log.warning("%s sent an unknown answer: %.200r", self.url, text)

    def _acked(self, seq: int, relays: int | None) -> None:
        batch = self.forget(seq)
        self._wake.set()
        if batch is None:
            return  # a second ack of a batch resent, or one forgotten
        self.acks += 1
        self.resyncs = 0
        self.pub.resolve(batch, self.url, relays)

    def _refused(self, seq: int, code: int, message: str, data: dict[str, Any]) -> None:
        self.in_flight.discard(seq)
        self._wake.set()
        if self.behind:
            return  # answers still in flight when it was marked: nothing is held for it
        if seq not in self.queue:
            if self.confirm is not None and self.confirm[0] == seq:
                self.confirm = None
                self.pub.confirm_refused(seq, code, message, data, self.url)
            return
        refused = PublishRefused(code, message, data, url=self.url, seq=seq)
        if code not in NODE_REFUSALS:
            batch = self.forget(seq)
            assert batch is not None
            self.pub.fail(batch, refused)  # no node will take it: gone from every queue
            return
        expected = data.get("expected")
        if code == GAP and isinstance(expected, int) and expected < seq:
            if expected in self.queue:
                # The node lost batches it never acknowledged: they are here to send again.
                if self._resync(f"{code} at {seq}, expected {expected}"):
                    return
            elif expected <= self.lost_through:
                self._fall_behind(expected, seq)
                return
        elif code == NOT_DURABLE and self._resync(f"{code} at {seq}"):
            return
        # This node will not take it from this connection; another node still may.
        batch = self.forget(seq)
        assert batch is not None
        self.dropped += 1
        log.info("%s refused batch %d: %s (%d)", self.url, seq, message, code)
        if self.pub.forgotten(batch, refused):
            self.lost_through = max(self.lost_through, seq)

    def _fall_behind(self, expected: int, seq: int) -> None:
        """The node needs ``expected``, which this connection forgot while other nodes had
        it: nothing it sends can fill the gap, so it stops sending to the node for good and
        leaves every batch to the others."""
        self.behind = True
        log.warning(
            "%s is behind: it expects batch %d (refused %d), which only other nodes hold; "
            "no longer pushing to it until the publisher restarts",
            self.url,
            expected,
            seq,
        )
        batches = list(self.queue.values())
        for batch in batches:
            self.forget(batch.seq)
        self.dropped += len(batches)
        self.to_send.clear()
        for batch in batches:
            self.pub.forgotten(
                batch,
                PublishRefused(
                    GAP,
                    f"behind: it expects {expected}, held by no node's connection",
                    {"expected": expected},
                    url=self.url,
                    seq=batch.seq,
                ),
            )
        self._close("behind")

    def _close(self, reason: str) -> None:
        conn = self._conn
        if conn is not None:
            task = asyncio.get_running_loop().create_task(conn.close(1000, reason))
            self._closing.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._closing.discard)

    def _resync(self, why: str) -> bool:
        """Close the connection to send every unacknowledged batch again after the reconnect;
        False when that already failed ``resync_limit`` times without an acknowledgement."""
        if self._resyncing:
            return True
        if self.resyncs >= self.pub.resync_limit:
            return False
        self.resyncs += 1
        self._resyncing = True
        if self._conn is not None:
            log.info("%s: %s; resending what it has not acknowledged", self.url, why)
            self._close("resend")
        return True


# --- the publisher ----------------------------------------------------------------------------
class Publisher:
    """A sequencer's pushes of one stream to one or more ingress nodes (see the module)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        key: bytes | str,
        stream: str,
        chain_id: int,
        api_key: str,
        relays: int = 0,
        # Limits
        window: int = d.PUBLISHER_WINDOW,
        max_unacked_bytes: int = d.PUBLISHER_MAX_UNACKED_BYTES,
        max_message_bytes: int = d.PUBLISHER_MAX_MESSAGE_BYTES,
        resync_limit: int = d.PUBLISHER_RESYNC_LIMIT,
        # Timeouts
        connect_timeout: float = d.PUBLISHER_CONNECT_TIMEOUT,
        retry_delay: float = d.PUBLISHER_RETRY_DELAY,
        retry_max: float = d.PUBLISHER_RETRY_MAX,
        give_up_after: float = d.PUBLISHER_GIVE_UP_AFTER,
        ping_interval: float = d.PUBLISHER_PING_INTERVAL,
    ) -> None:
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ConfigError("a publisher needs at least one ingress URL")
        self.urls = [ingress_url(u) for u in url_list]
        if len(set(self.urls)) != len(self.urls):
            raise ConfigError("an ingress URL is given twice")
        stream_field(stream)  # ValueError for a name that cannot be a stream
        if not 0 <= relays <= 255:
            raise ConfigError(f"relays is 0-255, got {relays}")
        if window < 1 or max_unacked_bytes < 1:
            raise ConfigError("window and max_unacked_bytes must be positive")
        if not api_key:
            raise ConfigError("a publisher needs an API key")
        self.signer = Signer(private_key(key))
        self.address = "0x" + self.signer.address.hex()
        self.stream = stream
        self.chain_id = chain_id
        self.api_key = api_key
        self.relays = relays
        self.window = window
        self.max_unacked_bytes = max_unacked_bytes
        self.max_message_bytes = max_message_bytes
        self.resync_limit = resync_limit
        self.connect_timeout = connect_timeout
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        self.give_up_after = give_up_after
        self.ping_interval = ping_interval
        self.nodes = [_Ingress(self, u) for u in self.urls]
        self._pending: dict[int, _Batch] = {}  # acknowledged by no node yet
        self._unacked_bytes = 0
        self._room = asyncio.Event()
        self._confirms: dict[int, tuple[asyncio.Future[None], float]] = {}
        self._fatal: PublishError | None = None
        self._down_since = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Spawn one connection per ingress node; returns at once."""
        if self._watchdog is not None:
            return
        self._down_since = time.monotonic()
        for node in self.nodes:
            node.task = asyncio.create_task(node.run(), name=f"publisher {node.url}")
        self._watchdog = asyncio.create_task(self._watch(), name="publisher watchdog")

    async def close(self) -> None:
        """Close every connection; batches not acknowledged yet fail (``PublishError``)."""
        self._closed = True
        tasks = [n.task for n in self.nodes if n.task is not None]
        if self._watchdog is not None:
            tasks.append(self._watchdog)
        for node in self.nodes:
            node.task = None
        self._watchdog = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(PublishError("publisher closed before the batch was acknowledged"))

    @property
    def connected(self) -> int:
        """Ingress nodes connected now."""
        return sum(n.connected for n in self.nodes)

    @property
    def unacked(self) -> int:
        """Batches acknowledged by no node yet."""
        return len(self._pending)

    # --- pushing ----------------------------------------------------------------------------
    def submit(self, seq: int, payload: bytes) -> asyncio.Future[Ack]:
        """Sign and queue batch ``seq`` for every node; the future resolves with the first
        acknowledgement. Pipelined: call it in seq order without awaiting; ``PublishError``
        at once when closed, unauthorised, or ``max_unacked_bytes`` would be passed (await
        ``room()`` first, or use ``push``)."""
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise PublishError("publisher closed")
        if seq in self._pending:
            raise PublishError(f"batch {seq} is already waiting for acknowledgement")
        signature = sign_batch(self.signer, self.chain_id, self.stream, seq, payload)
        message = encode_push(Push(PUSH, self.stream, seq, signature, payload, self.relays))
        if self._pending and self._unacked_bytes + len(message) > self.max_unacked_bytes:
            raise PublishError(
                f"{self._unacked_bytes} bytes wait for acknowledgement already "
                f"(max_unacked_bytes {self.max_unacked_bytes})"
            )
        batch = _Batch(seq, message, asyncio.get_running_loop().create_future(), time.monotonic())
        self._pending[seq] = batch
        self._unacked_bytes += len(message)
        taken = [node.add(batch) for node in self.nodes]
        if not any(taken):
            self.fail(batch, PublishError("every ingress node is behind: restart the publisher"))
        return batch.future

    async def room(self, size: int = 0) -> None:
        """Wait until a batch of ``size`` payload bytes fits in ``max_unacked_bytes``."""
        need = size + PUSH_HEADER_LEN
        while self._pending and self._unacked_bytes + need > self.max_unacked_bytes:
            if self._fatal is not None:
                raise self._fatal
            self._room.clear()
            await self._room.wait()

    async def push(self, seq: int, payload: bytes) -> Ack:
        """Push batch ``seq``; returns once an ingress node has it durably."""
        await self.room(len(payload))
        return await self.submit(seq, payload)

    async def confirm(self, seq: int) -> None:
        """Tell every node, signed, that batches up to ``seq`` are final on L1 (they trim
        their backlogs below it); returns once one node took it."""
        if self._fatal is not None:
            raise self._fatal
        signature = sign_confirmed(self.signer, self.chain_id, self.stream, seq)
        message = encode_push(Push(CONFIRMED, self.stream, seq, signature))
        entry = self._confirms.get(seq)
        if entry is None:
            entry = (asyncio.get_running_loop().create_future(), time.monotonic())
            self._confirms[seq] = entry
        for node in self.nodes:
            node.send_confirm(seq, message)
        await asyncio.shield(entry[0])

    # --- called by the connections ----------------------------------------------------------
    def resolve(self, batch: _Batch, url: str, relays: int | None) -> None:
        if batch.future.done():
            self._settled(batch)  # cancelled by its caller: its bytes are free all the same
            return
        ms = (time.monotonic() - batch.submitted) * 1000
        batch.future.set_result(Ack(self.stream, batch.seq, url, ms, relays))
        self._settled(batch)

    def fail(self, batch: _Batch, exc: PublishError) -> None:
        if batch.future.done():
            self._settled(batch)
            return
        batch.future.set_exception(exc)
        self._settled(batch)
        for node in self.nodes:  # nothing after it can be taken either: no resend
            node.forget(batch.seq)

    def forgotten(self, batch: _Batch, exc: PublishError) -> bool:
        """One node's connection forgot ``batch`` unacknowledged: it fails with ``exc`` when
        no other connection holds it to be acknowledged. True when it is still acknowledged
        or may be (by another node)."""
        if batch.future.cancelled():
            return False
        if batch.future.done():
            return batch.future.exception() is None
        if any(batch.seq in node.queue for node in self.nodes):
            return True
        self.fail(batch, exc)
        return False

    @property
    def behind(self) -> list[str]:
        """The ingress nodes marked behind (no longer pushed to)."""
        return [node.url for node in self.nodes if node.behind]

    def _settled(self, batch: _Batch) -> None:
        if self._pending.get(batch.seq) is batch:
            del self._pending[batch.seq]
            self._unacked_bytes -= len(batch.message)
            self._room.set()

    def confirmed(self, seq: int) -> None:
        for s in [s for s in self._confirms if s <= seq]:
            future, _ = self._confirms.pop(s)
            if not future.done():
                future.set_result(None)

    def confirm_refused(
        self, seq: int, code: int, message: str, data: dict[str, Any], url: str
    ) -> None:
        entry = self._confirms.pop(seq, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(PublishRefused(code, message, data, url=url, seq=seq))
            entry[0].exception()  # retrieved: confirm() raises its own copy through shield

    def went_up(self) -> None:
        self._down_since = 0.0

    def went_down(self) -> None:
        if not any(n.connected for n in self.nodes):
            self._down_since = time.monotonic()

    def fatal(self, exc: PublishError) -> None:
        """Nothing can succeed (the API key is refused): fail everything, stop connecting."""
        log.error("%s", exc)
        self._fatal = exc
        self._fail_all(exc)
        self._room.set()
        current = asyncio.current_task()
        for node in self.nodes:
            if node.task is not None and node.task is not current:
                node.task.cancel()

    def _fail_all(self, exc: PublishError) -> None:
        for batch in list(self._pending.values()):
            self.fail(batch, exc)
        for future, _ in self._confirms.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()
        self._confirms.clear()

    async def _watch(self) -> None:
        """Fail what waited ``give_up_after`` seconds while no node was connected."""
        interval = min(1.0, self.give_up_after / 4)
        while True:
            await asyncio.sleep(interval)
            if self._down_since == 0.0:
                continue
            now = time.monotonic()
            errors = "; ".join(f"{n.url}: {n.last_error}" for n in self.nodes)
            for batch in list(self._pending.values()):
                if now - max(self._down_since, batch.submitted) < self.give_up_after:
                    break  # submit order: the later ones waited less
                self.fail(
                    batch,
                    PublishError(
                        f"no ingress node reachable for {self.give_up_after:g} s ({errors})"
                    ),
                )
            for seq, (future, since) in list(self._confirms.items()):
                if now - max(self._down_since, since) >= self.give_up_after:
                    del self._confirms[seq]
                    if not future.done():
                        future.set_exception(
                            PublishError(f"no ingress node reachable for confirmation {seq}")
                        )
                        future.exception()


# --- ``chainrelay publish`` -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PublishPlan:
    """What ``chainrelay publish`` sends, checked before anything connects."""

    urls: list[str]
    stream: str
    chain_id: int
    key: bytes
    api_key: str
    first_seq: int
    count: int
    size: int  # generated payloads; 0 for a file's
    seed: int
    batches: list[bytes] | None  # a file's, else generated
    rate: float | None
    relays: int
    window: int
    confirm_every: int

    def payload(self, index: int) -> bytes:
        if self.batches is not None:
            return self.batches[index]
        return generated_payload(self.seed, self.first_seq + index, self.size)


def publish_plan(
    urls: Sequence[str],
    *,
    stream: str,
    chain_id: int,
    key: str | None = None,
    key_file: str | None = None,
    api_key: str | None = None,
    file: str | None = None,
    count: int | None = None,
    size: int | None = None,
    seed: int = 0,
    from_seq: int = 0,
    rate: float | None = None,
    relays: int = 0,
    window: int = d.PUBLISHER_WINDOW,
    confirm_every: int = 0,
    env: dict[str, str] | None = None,
) -> PublishPlan:
    """``chainrelay publish``'s arguments checked (``ConfigError`` names the wrong one)."""
    env = dict(os.environ) if env is None else env
    if (key is None) == (key_file is None):
        raise ConfigError("give the sequencer key with exactly one of --key and --key-file")
    if key_file is not None:
        try:
            key = Path(key_file).read_text()
        except OSError as exc:
            raise ConfigError(f"--key-file {key_file}: {exc.strerror}") from None
    assert key is not None
    raw_key = private_key(key)
    api_key = api_key or env.get("CHAINRELAY_API_KEY", "")
    if not api_key:
        raise ConfigError("an API key is needed: --api-key or CHAINRELAY_API_KEY")
    try:
        stream_field(stream)
    except ValueError as exc:
        raise ConfigError(f"--stream: {exc}") from None
    if chain_id < 0 or chain_id >= 2**64:
        raise ConfigError("--chain-id is an unsigned 64-bit number")
    if from_seq < 0 or from_seq >= 2**63:
        raise ConfigError("--from is 0 to 2^63-1")
    if rate is not None and rate <= 0:
        raise ConfigError("--rate must be positive")
    if not 0 <= relays <= 255:
        raise ConfigError("--relays is 0-255")
    if window < 1:
        raise ConfigError("--window must be at least 1")
    if confirm_every < 0:
        raise ConfigError("--confirm-every must not be negative")
    batches: list[bytes] | None = None
    if file is not None:
        if count is not None or size is not None:
            raise ConfigError("--file and --count/--size exclude each other")
        try:
            with open(file, encoding="ascii", errors="replace") as fh:
                batches = read_batches(fh, name=file)
        except OSError as exc:
            raise ConfigError(f"--file {file}: {exc.strerror}") from None
        count, size = len(batches), 0
    else:
        if count is None or size is None:
            raise ConfigError("give --file PATH, or --count N and --size BYTES")
        if count < 1 or size < 1:
            raise ConfigError("--count and --size must be positive")
    if from_seq + count > 2**63:
        raise ConfigError("--from + the batch count passes 2^63")
    return PublishPlan(
        urls=[ingress_url(u) for u in urls],
        stream=stream,
        chain_id=chain_id,
        key=raw_key,
        api_key=api_key,
        first_seq=from_seq,
        count=count,
        size=size,
        seed=seed,
        batches=batches,
        rate=rate,
        relays=relays,
        window=window,
        confirm_every=confirm_every,
    )


async def run_publish(
    urls: Sequence[str], *, out: TextIO = sys.stdout, err: TextIO = sys.stderr, **options: Any
) -> int:
    """``chainrelay publish``: the arguments checked (``publish_plan``, ``ConfigError``
    before anything connects), then ``publish``. Returns the exit code."""
    return await publish(publish_plan(urls, **options), out=out, err=err)


async def publish(plan: PublishPlan, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Push the plan's batches, wait for every acknowledgement, print one JSON summary line
    on ``out`` (progress on ``err``). The exit code: 0 all acknowledged, 2 the API key
    refused, 1 anything else refused or given up."""
    pub = Publisher(
        plan.urls,
        key=plan.key,
        stream=plan.stream,
        chain_id=plan.chain_id,
        api_key=plan.api_key,
        relays=plan.relays,
        window=plan.window,
    )
    acks: collections.deque[asyncio.Future[Ack]] = collections.deque()
    ack_ms: list[float] = []
    sent_bytes = 0
    failure: PublishError | None = None
    started = time.monotonic()
    last_report = started

    def progress(now: float, done: int) -> None:
        print(
            f"publish: {done}/{plan.count} acknowledged, {pub.unacked} waiting, "
            f"{pub.connected}/{len(pub.nodes)} ingress connected, "
            f"{done / max(now - started, 1e-9):.0f} batches/s",
            file=err,
            flush=True,
        )

    async def settle(block: bool) -> None:
        """Take the acknowledgements that came, oldest first (all of them when ``block``)."""
        nonlocal failure, last_report
        while acks and (block or acks[0].done()):
            future = acks.popleft()
            try:
                ack = await future
            except PublishError as exc:
                failure = failure or exc
                continue
            ack_ms.append(ack.ms)
            if plan.confirm_every and len(ack_ms) % plan.confirm_every == 0 and not failure:
                await pub.confirm(ack.seq)
        now = time.monotonic()
        if now - last_report >= 1.0:
            last_report = now
            progress(now, len(ack_ms))

    async with pub:
        for index in range(plan.count):
            if failure is not None:
                break
            payload = plan.payload(index)
            if plan.rate is not None:
                due = started + index / plan.rate
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())  # pacing, not waiting on state
            while len(acks) >= plan.window and failure is None:
                await asyncio.wait({acks[0]})
                await settle(False)
            try:
                await pub.room(len(payload))
                acks.append(pub.submit(plan.first_seq + index, payload))
            except PublishError as exc:
                failure = failure or exc
                break
            sent_bytes += len(payload)
            await settle(False)
        await settle(True)
    seconds = time.monotonic() - started
    ack_ms.sort()
    summary = {
        "stream": plan.stream,
        "from": plan.first_seq,
        "batches": len(ack_ms),
        "bytes": sent_bytes,
        "seconds": round(seconds, 3),
        "batches_per_s": round(len(ack_ms) / seconds, 1) if seconds > 0 else 0.0,
        "ack_ms": {
            "p50": round(percentile(ack_ms, 0.50), 3),
            "p90": round(percentile(ack_ms, 0.90), 3),
            "p99": round(percentile(ack_ms, 0.99), 3),
            "max": round(ack_ms[-1], 3) if ack_ms else 0.0,
        },
        "ingress": {
            n.url: {
                "acks": n.acks,
                "sessions": n.sessions,
                "dropped": n.dropped,
                "behind": n.behind,
            }
            for n in pub.nodes
        },
    }
    if failure is not None:
        summary["error"] = str(failure)
    print(orjson.dumps(summary).decode(), file=out, flush=True)
    if failure is not None:
        print(f"chainrelay publish: {failure}", file=err, flush=True)
        return 2 if isinstance(failure, PublishUnauthorized) else 1
    return 0
