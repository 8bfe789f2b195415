"""Clients that send and never read, on each endpoint of one real node.

Each attacker opens its socket with a tiny receive buffer (the window it announces is a few
KB, so what the node sends piles up on the node's side), makes the node owe it as much as
it can, and never reads a byte. The node must stop at its bound: stop reading the client
(it can no longer write: "paused") or close it (the close frame is what it finds once it
reads at last). Meanwhile its RSS grows by less than ``ATTACK_RSS_GROWTH`` and a
well-behaved client's p99 stays under ``BYSTANDER_P99``.

The node's per-connection bounds are lowered (``BOUNDS``) so each attack reaches them in
seconds: a WebSocket send buffer of 1 MiB instead of 16, a feed child's socket buffer of
1 MiB and its queue of 4 MiB instead of 4 and 32. The HTTP pipeline's bound
(``max_pending_replies``) and the range endpoint's answers are as shipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import orjson
import pytest

from chainrelay.batches.frame import PUSH, Push, encode_push
from chainrelay.tree.session import CLOSE_LAGGING
from tests.hostile import wsraw
from tests.hostile.nodes import HostileNode, hostile_node
from tests.lab.batches import API_KEY, STREAM
from tests.lab.hostile import ATTACK_RSS_GROWTH, BYSTANDER_P99, Bystander, MiB, Rss
from tests.lab.procs import fetch_metrics, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

BOUNDS = f"""
[limits]
max_ws_send_buffer = {1 * MiB}

[tree]
child_buffer_bytes = {1 * MiB}
child_queue_bytes = {4 * MiB}
max_frame_bytes = {2 * MiB}
"""
# A batch stream's backlog of 8 MiB, not 256: the batches the feed attack pushes are then
# not what the node's RSS grows by, and a child that falls out of it is lagging.
BATCH_BOUNDS = f"backlog_bytes = {8 * MiB}"
# Asked of the kernel for each attacker's socket (it doubles it): a window of a few KB.
RCVBUF = 4096
# How long a write may wait before the node counts as no longer reading the attacker.
STALL = 2 * SECOND
# How long the node may take to get to its bound once the attack is all sent.
SETTLE = 20 * SECOND
CLOSE_TRY_AGAIN_LATER = 1013
# Calls the bystander makes at least, during and just after each attack.
BYSTANDER_CALLS = 100
CHAIN_ID_CALL = b'{"jsonrpc":"2.0","id":%d,"method":"eth_chainId","params":[]}'
# A JSON-RPC batch of eth_chainId calls: ~30 KB in, ~20 KB of answers out, all from what
# the node knows, so only the answers' bytes grow.
BATCH = b"[" + b",".join(CHAIN_ID_CALL % i for i in range(500)) + b"]"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileNode]:
    with hostile_node(tmp_path_factory.mktemp("never-reading"), BOUNDS, BATCH_BOUNDS) as n:
        yield n


@dataclass
class Watch:
    """The node's RSS at its highest during an attack, over what it was before."""

    rss: Rss
    peak: int = 0

    def growth(self) -> int:
        return self.peak - self.rss.start


@contextlib.asynccontextmanager
async def attack(node: HostileNode) -> AsyncIterator[tuple[Watch, Bystander]]:
    """Watch the node's RSS and run a bystander while the body attacks; then check both,
    and that the node is still up with nothing unexpected in its log."""
    watch = Watch(Rss(node.pid))

    async def sample() -> None:
        while True:
            watch.peak = max(watch.peak, watch.rss.now())
            await asyncio.sleep(0.02)  # a sampling period, not a wait for anything

    sampler = asyncio.create_task(sample())
    try:
        async with Bystander(node.relay.url) as bystander:
            yield watch, bystander
            # Enough calls for a p99 that means something, however short the attack.
            await until(lambda: len(bystander.latencies) >= BYSTANDER_CALLS, SETTLE, "calls")
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    print(
        f"RSS +{watch.growth() / MiB:.1f} MiB at most; bystander: {bystander.summary()}",
    )
    assert node.alive(), node.relay.log_path.read_text()[-3000:]
    assert watch.growth() < ATTACK_RSS_GROWTH, f"grew {watch.growth() / MiB:.0f} MiB"
    assert bystander.p99() < BYSTANDER_P99, bystander.summary()
    assert not node.log_problems(), node.log_problems()[:5]


async def write_until_stalled(
    writer: asyncio.StreamWriter, chunks: Iterator[bytes], pace: float = 0.0
) -> bool:
    """Write ``chunks`` until the node stops taking them (True: paused) or they run out
    (False), ``pace`` seconds apart. A node that closed the connection counts as not
    stalled."""
    t0 = time.monotonic()
    sent = 0
    for chunk in chunks:
        if writer.is_closing():
            return False
        writer.write(chunk)
        sent += len(chunk)
        try:
            async with asyncio.timeout(STALL):
                await writer.drain()
        except TimeoutError:
            print(f"stalled after {sent} bytes, {time.monotonic() - t0:.1f} s")
            return True
        except ConnectionError:
            print(f"closed after {sent} bytes, {time.monotonic() - t0:.1f} s")
            return False
        if pace:
            await asyncio.sleep(pace)  # the attack's rate, not a wait for the node
    print(f"all {sent} bytes taken, {time.monotonic() - t0:.1f} s")
    return False


async def closed_with(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int | None:
    """The close code the node sent, read at last; None when it ended the connection with
    no close frame left to read (a close followed by unread pushes is a reset, which
    discards what the attacker had not read). A connection the node keeps open is a
    TimeoutError."""
    wsraw.read_fast(writer)
    async with asyncio.timeout(SETTLE):
        return await wsraw.close_code(reader)


async def test_pipelined_http_requests_never_read_stop_being_read(node: HostileNode) -> None:
    request = (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BATCH), BATCH)
    )
    async with attack(node):
        _reader, writer = await wsraw.connect(node.port, RCVBUF)
        try:
            # 2,000 requests (60 MB in, 40 MB of answers): far past any bound.
            paused = await write_until_stalled(writer, (request * 20 for _ in range(100)))
        finally:
            writer.transport.abort()
    assert paused, "the node read every pipelined request of a client that reads nothing"


async def test_a_websocket_client_that_never_reads_its_answers_is_closed(
    node: HostileNode,
) -> None:
    subscribe = b'{"jsonrpc":"2.0","id":%d,"method":"eth_subscribe","params":["newHeads"]}'
    slow_before = await slow_closes(node)
    async with attack(node):
        reader, writer = await wsraw.upgrade(node.port, "/", rcvbuf=RCVBUF)
        try:
            writer.write(b"".join(wsraw.frame(wsraw.OP_TEXT, subscribe % i) for i in range(10)))
            # 400 batches, ~8 MB of answers, owed to a reader of a few KB.
            messages = (wsraw.frame(wsraw.OP_TEXT, BATCH) for _ in range(400))
            stalled = await write_until_stalled(writer, messages)
            if not stalled:
                code = await closed_with(reader, writer)
        finally:
            writer.transport.abort()
    if stalled:
        # Its answers filled the socket: the node stopped reading it (backpressure), and
        # what it holds for it stayed within its bounds (the attack's RSS check).
        assert await slow_closes(node) in (slow_before, slow_before + 1)
        return
    # Closed for reading too slowly: the close frame, or the reset it became when the
    # node closed with the attacker's messages unread.
    assert code in (CLOSE_TRY_AGAIN_LATER, None), code
    assert await slow_closes(node) == slow_before + 1


async def slow_closes(node: HostileNode) -> float:
    """Subscribers the node closed (1013) for reading too slowly."""
    samples = await fetch_metrics(node.relay.url)
    return samples.get("chainrelay_slow_subscriber_disconnects_total", 0.0)


async def test_a_feed_child_that_never_reads_is_closed_as_lagging(node: HostileNode) -> None:
    hello = {"type": "hello", "version": 1, "streams": [{"stream": STREAM}]}
    async with attack(node):
        reader, writer = await wsraw.upgrade(node.port, "/feed", rcvbuf=RCVBUF)
        try:
            writer.write(wsraw.frame(wsraw.OP_TEXT, orjson.dumps(hello)))
            await writer.drain()
            # 16 MB of live batches: past the child's socket buffers (1 MiB here, up to
            # 4 MiB in the kernel), its queue (4 MiB) and the backlog (8 MiB).
            await node.push(250, 64 * 1024, step=4)
            code = await closed_with(reader, writer)
        finally:
            writer.transport.abort()
    assert code == CLOSE_LAGGING, code


async def test_range_requests_never_read_stop_being_read(node: HostileNode) -> None:
    if node.pushed < 120:  # range answers of up to 8 MB each (range_max_bytes)
        await node.push(120 - node.pushed, 64 * 1024)
    # Each request padded to 8 KB, so the kernel's buffers take a few hundred of them at
    # most and a node that stops reading shows as a client that cannot write.
    head = f"GET /feed/range?stream={STREAM}&from=0&limit=1000 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    request = head.encode() + b"X-Pad: " + b"p" * 8000 + b"\r\n\r\n"
    async with attack(node):
        _reader, writer = await wsraw.connect(node.port, RCVBUF)
        try:
            # 2,000 requests (16 MB in; gigabytes of answers).
            paused = await write_until_stalled(writer, (request * 50 for _ in range(40)))
            # Watched a while with the client stalled: the most the node holds for it.
            await observe(2 * SECOND)
        finally:
            writer.transport.abort()
    assert paused, "the node read every range request of a client that reads nothing"


async def test_a_pusher_that_never_reads_its_answers_is_closed(node: HostileNode) -> None:
    # Pushes to a stream the node does not carry: answered at once (-32045, ~140 bytes),
    # before any signature is checked: the most answer for the least work.
    stream = "x" * 32
    push = encode_push(Push(PUSH, stream, 0, bytes(65), b"p" * 16))
    message = wsraw.frame(wsraw.OP_BINARY, push)
    auth = b"Authorization: Bearer " + API_KEY.encode()
    async with attack(node):
        reader, writer = await wsraw.upgrade(node.port, "/batches", [auth], rcvbuf=RCVBUF)
        try:
            # 60,000 pushes, ~8 MB of answers: past the send buffer (1 MiB here) and the
            # kernel's (up to 4 MiB). Paced at ~50,000 pushes/s, a sequencer's burst: all at
            # once, the node reads megabytes of them in one loop turn and holds everyone
            # else for that long (a matter of the front door's reading, not of answers).
            chunks = (message * 250 for _ in range(240))
            await write_until_stalled(writer, chunks, pace=0.005)
            code = await closed_with(reader, writer)
        finally:
            writer.transport.abort()
    # Closed for reading too slowly: the close frame, or the reset it became.
    assert code in (CLOSE_TRY_AGAIN_LATER, None), code


async def observe(seconds: float) -> None:
    """An observation window (the RSS sampler runs meanwhile), not a wait for an event."""
    await asyncio.sleep(seconds)
