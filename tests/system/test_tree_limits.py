"""The relay tree's limits, seen from outside a running node.

Real processes on 127.0.0.1: anvil (chain id 56, mining on demand so each test decides how
many blocks there are, with transfers so frames have size), an origin holding a key, and a
relay fed by it with its limits lowered in its ``[tree]`` and ``[limits]`` config. Clients
are real sockets: a feed child whose receive buffer is tiny and that stops reading, a peer
that upgrades and never says hello, raw websockets sessions, and the subscriber library.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from chainrelay.clients.subscriber import FeedBlock, Subscription
from chainrelay.devnet import Anvil
from chainrelay.tree import frame as feedframe
from chainrelay.tree.session import CLOSE_BAD_HELLO, CLOSE_LAGGING, Want, encode_hello
from tests.lab.chain import DEV_ACCOUNTS, Chain, heartbeat, metric, wait_same_head
from tests.lab.procs import Procs, Relay, until
from tests.lab.timing import SECOND
from tests.system.test_tree import (
    HOP_TIMEOUT,
    ORIGIN_ADDRESS,
    STREAM,
    Tree,
    feed_client,
    next_frame,
    node_config,
    rpc_get,
)

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS

# Asked of the kernel for the slow child's socket (it doubles it, to ~8 KiB): it announces
# a window that small, so what the relay sends piles up on the relay's side.
SLOW_RCVBUF = 4096
# Transfers in each block mined here (without calldata a frame is under 1 KB).
TXS_PER_BLOCK = 4
# Bounds the blocks mined while waiting for a child to be found lagging.
MAX_BLOCKS = 80
# Random calldata of each transfer in the slow child's test: a frame of ~134 KB (lz4 of
# 4 x 64 KB of hex), so the kernel's buffers for a child that stopped reading (~3 MB on
# loopback, measured: ~22 frames) fill within a couple dozen blocks.
CALLDATA = 32 * 1024
# The relay's bound on a frame, and so on a child's queue in bytes (the config requires
# child_queue_bytes >= max_frame_bytes): a few of those frames.
SMALL_FRAME_BYTES = 1024 * 1024
# The relay's write buffer per child before it skips that child: less than a frame.
SMALL_CHILD_BUFFER = 2048
# Frames a child may owe before it is closed: a handful of blocks.
CHILD_QUEUE_FRAMES = 4
# A short close handshake: a child that never reads is dropped a second after its close.
CLOSE_TIMEOUT = 1.0
HELLO_TIMEOUT = 1.0
# A backlog shorter than what the kernel's buffers hold for a child that stops reading.
SMALL_BACKLOG = 6


@pytest.fixture
def tree(procs: Procs, tmp_path: Path) -> Tree:
    return Tree(procs, tmp_path)


async def mine(node: Chain, blocks: int = 1, calldata: int = 0) -> None:
    """Mine ``blocks`` blocks of TXS_PER_BLOCK transfers each, each transfer carrying
    ``calldata`` random bytes (random: lz4 cannot shrink them, so frames have that size)."""
    for b in range(blocks):
        for i in range(TXS_PER_BLOCK):
            tx = {"from": A0, "to": A1, "value": hex(1 + b * TXS_PER_BLOCK + i)}
            if calldata:
                tx["data"] = "0x" + os.urandom(calldata).hex()
                # Prague's calldata floor (EIP-7623): 10 gas a token, 4 tokens a nonzero
                # byte; anvil takes a transaction below it into its pool but never mines it.
                tx["gas"] = hex(21_000 + 40 * calldata)
            await node.send(tx)
        await node.call("evm_mine")


@asynccontextmanager
async def on_demand_tree(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree, relay_tree: str, extra: str = ""
) -> AsyncIterator[tuple[Chain, Relay, Relay]]:
    """anvil mining on demand, an origin and a relay with ``relay_tree`` in its [tree]
    and ``extra`` appended to its config (other tables)."""
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        async with heartbeat(node):
            origin = await tree.origin(anvil)
            config = _child_config("relay", origin, relay_tree) + extra
            relay = await tree.node("relay", config)
        yield node, origin, relay


def _child_config(name: str, parent: Relay, tree_extra: str) -> str:
    return node_config(
        region=name, trust=[ORIGIN_ADDRESS], parents=[(f"{name}-p0", parent)], tree_extra=tree_extra
    )


async def health(node: Relay) -> dict[str, Any]:
    got = await rpc_get(node.url + "/health")
    assert isinstance(got, dict)
    return got


async def closes(node: Relay, reason: str) -> float:
    return metric(await node.metrics(), "chainrelay_feed_child_closes_total", reason=reason)


@dataclass
class Drained:
    """What a feed child read from its socket: frames' positions, text messages, and the
    close code if a close frame came before the end of the stream."""

    positions: list[int] = field(default_factory=list)
    texts: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    eof: bool = False


class RawChild:
    """A feed child on a plain socket driven through websockets' sans-I/O client, so it
    reads exactly when the test says: its receive buffer is SLOW_RCVBUF and nothing is
    read between ``open`` and ``drain``."""

    def __init__(self, node: Relay) -> None:
        self.proto = ClientProtocol(parse_uri(node.ws_url + "/feed"), max_size=None)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Before connect: the window the child announces is sized from it.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        self.sock.setblocking(False)
        self.port = node.port
        self.want = Want(STREAM)
        self.got = Drained()

    async def open(self, want: Want) -> dict[str, Any]:
        """Connect, upgrade, say hello; the welcome."""
        self.want = want
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        self.proto.send_request(self.proto.connect())
        await self._flush()
        welcome: dict[str, Any] | None = None
        async with asyncio.timeout(HOP_TIMEOUT):
            while welcome is None:
                await self._read_once()
                if self.got.texts:
                    welcome = self.got.texts.pop(0)
        assert welcome.get("type") == "welcome", welcome
        return welcome

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for chunk in self.proto.data_to_send():
            if chunk:
                await loop.sock_sendall(self.sock, chunk)

    async def _read_once(self) -> bool:
        """One recv fed to the protocol; False at the end of the stream."""
        loop = asyncio.get_running_loop()
        try:
            data = await loop.sock_recv(self.sock, 65536)
        except ConnectionResetError:
            data = b""
        if data:
            self.proto.receive_data(data)
        else:
            self.proto.receive_eof()
            self.got.eof = True
        for event in self.proto.events_received():
            if isinstance(event, Response):
                assert self.proto.handshake_exc is None, self.proto.handshake_exc
                self.proto.send_text(encode_hello([self.want]))
                continue
            assert isinstance(event, Frame), event  # a client is sent no requests
            if event.opcode is Opcode.BINARY:
                raw = bytes(event.data)
                self.got.positions.append(feedframe.decode(raw, len(raw)).position)
            elif event.opcode is Opcode.TEXT:
                self.got.texts.append(orjson.loads(event.data))
            elif event.opcode is Opcode.CLOSE and self.proto.close_rcvd is not None:
                self.got.close_code = self.proto.close_rcvd.code
        await self._flush()
        return bool(data)

    async def drain(self, timeout: float) -> Drained:
        """Read everything until the stream ends."""
        async with asyncio.timeout(timeout):
            while await self._read_once():
                pass
        return self.got

    def close(self) -> None:
        self.sock.close()


def relay_side_state(relay_port: int, child_port: int) -> str | None:
    """The TCP state of the relay's end of a loopback connection, from /proc/net/tcp
    (``01`` established), or None when the kernel has forgotten it."""
    local = f"0100007F:{relay_port:04X}"
    remote = f"0100007F:{child_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table:
            cols = line.split()
            if cols[1:3] == [local, remote]:
                return cols[3]
    return None


# --- 1: a slow child is closed; the others get every frame; it resumes without a gap ------
@pytest.mark.parametrize(
    ("bound", "reads_again"),
    [("frames", True), ("frames", False), ("bytes", True), ("backlog", True)],
    ids=["frames-reads-again", "frames-never-reads", "bytes-reads-again", "backlog-reads-again"],
)
async def test_slow_child_is_closed_lagging_others_unharmed_and_it_resumes_without_gap(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree, bound: str, reads_again: bool
) -> None:
    # The bound under test is the low one; the others are far out of reach. "backlog": the
    # frames the child still needs leave the relay's backlog before its queue fills.
    frames = CHILD_QUEUE_FRAMES if bound == "frames" else MAX_BLOCKS * 10
    queue_bytes = SMALL_FRAME_BYTES if bound == "bytes" else MAX_BLOCKS * SMALL_FRAME_BYTES
    backlog = SMALL_BACKLOG if bound == "backlog" else MAX_BLOCKS * 2
    relay_tree = (
        f"child_queue_frames = {frames}\n"
        f"child_buffer_bytes = {SMALL_CHILD_BUFFER}\n"
        f"child_queue_bytes = {queue_bytes}\n"
        f"max_frame_bytes = {SMALL_FRAME_BYTES}\n"
        f"backlog_frames = {backlog}"
    )
    # A child that reads again at once has the default close handshake time, far more
    # than it needs; one that does not is dropped a CLOSE_TIMEOUT after the close.
    extra = "" if reads_again else f"\n[limits]\nws_close_timeout = {CLOSE_TIMEOUT}\n"
    async with on_demand_tree(anvil_factory, tree, relay_tree, extra) as (node, _origin, relay):
        await mine(node)
        async with Chain.open(relay.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
        start = (await node.head())[0] + 1
        lagging_before = await closes(relay, "lagging")

        slow = RawChild(relay)
        try:
            await slow.open(Want(STREAM, from_position=start))
            slow_port = slow.sock.getsockname()[1]
            async with feed_client(relay, Want(STREAM, from_position=start)) as (_w, conn):
                normal: list[int] = []

                async def next_block() -> None:
                    normal.append((await next_frame(conn)).position)

                # One block at a time, each taken by the normal child before the next: it
                # never lags, so only the slow child can be the one closed.
                deadline = time.monotonic() + 12 * SECOND
                while await closes(relay, "lagging") == lagging_before:
                    assert len(normal) < MAX_BLOCKS, "the slow child was never closed"
                    assert time.monotonic() < deadline, "the slow child was never closed"
                    await mine(node, calldata=CALLDATA)
                    await next_block()
                closed_at = normal[-1]
                # Its place is freed with the close: only the normal child is left.
                assert (await health(relay))["tree"]["children"] == 1
                if reads_again:
                    drained = asyncio.create_task(slow.drain(HOP_TIMEOUT))
                else:
                    # Its close unanswered, the relay lets go of the connection.
                    await until(
                        lambda: relay_side_state(relay.port, slow_port) != "01",
                        CLOSE_TIMEOUT + 5 * SECOND,
                        "the relay to drop the child that never read",
                    )
                    drained = asyncio.create_task(slow.drain(HOP_TIMEOUT))
                # Live frames still reach the normal child after the slow one is gone.
                await mine(node, 2, calldata=CALLDATA)
                await next_block()
                await next_block()
                tip = normal[-1]
                got = await drained
            assert normal == list(range(start, tip + 1))
            if bound == "frames":
                assert closed_at - start + 1 > CHILD_QUEUE_FRAMES
        finally:
            slow.close()
        # What it took is a prefix of the stream: in order, no gap, no duplicate.
        assert got.positions == list(range(start, start + len(got.positions)))
        assert len(got.positions) < closed_at - start + 1
        if reads_again:
            assert got.texts == [{"type": "bye", "reason": "lagging"}]
            assert got.close_code == CLOSE_LAGGING
        else:
            # The bye and the close were still in the relay's own buffer when it gave up:
            # the child finds the end of the stream after the frames that had left.
            assert got.eof and got.close_code is None and got.texts == []

        # It comes back from its next position and gets the rest, with no gap.
        after = start + len(got.positions)
        if bound != "backlog":
            async with feed_client(relay, Want(STREAM, from_position=after)) as (welcome, conn):
                assert "gap" not in welcome["streams"][0], welcome
                rest = [(await next_frame(conn)).position for _ in range(tip + 1 - after)]
        else:  # past the backlog: what left it is backfilled over JSON-RPC, then frames
            resumed: list[FeedBlock] = []
            async with Subscription(
                relay.ws_url + "/feed", STREAM, from_block=after, trust=[ORIGIN_ADDRESS]
            ) as sub:
                async with asyncio.timeout(HOP_TIMEOUT):
                    async for block in sub:
                        resumed.append(block)
                        if block.number >= tip:
                            break
            rest = [b.number for b in resumed]
            assert [b.verified for b in resumed] == [n > tip - backlog for n in rest]
        assert got.positions + rest == list(range(start, tip + 1))
        assert await closes(relay, "lagging") == lagging_before + 1


# --- 2: an upgrade with no hello is closed after hello_timeout ----------------------------
async def test_peer_without_hello_is_closed_4400_after_hello_timeout(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=1.0)
    origin = await tree.origin(anvil, tree_extra=f"hello_timeout = {HELLO_TIMEOUT}")
    before = await closes(origin, "no_hello")
    assert (await health(origin))["tree"]["children"] == 0
    async with websockets.connect(origin.ws_url + "/feed", compression=None) as conn:
        opened = time.monotonic()
        # Counted as a child while it holds its place (read well within the timeout).
        assert (await health(origin))["tree"]["children"] == 1
        async with asyncio.timeout(HELLO_TIMEOUT + 5 * SECOND):
            message = await conn.recv()
        waited = time.monotonic() - opened
        # Told why, then closed.
        assert isinstance(message, str) and orjson.loads(message)["type"] == "error", message
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5 * SECOND):
                await conn.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_BAD_HELLO
    assert waited >= 0.9 * HELLO_TIMEOUT
    assert await closes(origin, "no_hello") == before + 1

    async def freed() -> bool:
        return (await health(origin))["tree"]["children"] == 0

    await until(freed, 5 * SECOND, "the peer's place to be freed")


async def test_silent_peer_holds_the_last_place_only_until_hello_timeout(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=1.0)
    extra = f"hello_timeout = {HELLO_TIMEOUT}\nmax_children = 1"
    origin = await tree.origin(anvil, tree_extra=extra)
    async with websockets.connect(origin.ws_url + "/feed", compression=None) as silent:
        # Its upgrade took the one place: a child that would say hello is refused for now.
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(origin.ws_url + "/feed", compression=None):
                pass
        assert refused.value.response.status_code == 503
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(HELLO_TIMEOUT + 5 * SECOND):
                while True:
                    await silent.recv()

    async def freed() -> bool:
        return (await health(origin))["tree"]["children"] == 0

    await until(freed, 5 * SECOND, "the silent peer's place to be freed")
    async with feed_client(origin, Want(STREAM, last=1)) as (welcome, conn):
        newest = welcome["streams"][0]["newest"]
        assert (await next_frame(conn)).position == newest


# --- 3: backlog_frames and max_children come from the config ------------------------------
async def test_backlog_frames_and_max_children_from_config(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    backlog = 3
    relay_tree = f"backlog_frames = {backlog}\nmax_children = 1"
    async with on_demand_tree(anvil_factory, tree, relay_tree) as (node, _origin, relay):
        await mine(node, 12)
        async with Chain.open(relay.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
        newest = (await node.head())[0]
        asked = newest - 10 + 1  # ten blocks back
        full_before = await closes(relay, "too_many_children")
        async with feed_client(relay, Want(STREAM, from_position=asked)) as (welcome, conn):
            oldest = newest - backlog + 1
            assert welcome["streams"] == [
                {"stream": STREAM, "oldest": oldest, "newest": newest, "gap": [asked, oldest]}
            ]
            assert [(await next_frame(conn)).position for _ in range(backlog)] == list(
                range(oldest, newest + 1)
            )
            # The one place is taken: a second child's upgrade is answered 503.
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(relay.ws_url + "/feed", compression=None):
                    pass
            assert refused.value.response.status_code == 503
            assert await closes(relay, "too_many_children") == full_before + 1

        async def freed() -> bool:
            return (await health(relay))["tree"]["children"] == 0

        await until(freed, 5 * SECOND, "the first child's place to be freed")
        async with feed_client(relay, Want(STREAM, last=1)) as (welcome, conn):
            assert (await next_frame(conn)).position == newest


# --- 4: the subscriber library far behind: backfill, then the feed, every block once ------
async def test_subscriber_far_behind_backfills_each_block_once_then_verified_frames(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    backlog = 4
    async with on_demand_tree(anvil_factory, tree, f"backlog_frames = {backlog}") as (
        node,
        _origin,
        relay,
    ):
        await mine(node, 20)
        async with Chain.open(relay.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
        newest = (await node.head())[0]
        start = newest - 20 + 1
        got: list[FeedBlock] = []
        async with Subscription(
            relay.ws_url + "/feed", STREAM, from_block=start, trust=[ORIGIN_ADDRESS]
        ) as sub:
            delivered = aiter(sub)
            # Blocks keep coming while it backfills: the live ones must not jump the queue.
            mined = 0
            async with asyncio.timeout(3 * HOP_TIMEOUT):
                while not got or got[-1].number < newest + 3:
                    if mined < 3:
                        await mine(node)
                        mined += 1
                    got.append(await anext(delivered))
            assert not sub.dropped
        tip = got[-1].number
        assert [b.number for b in got] == list(range(start, tip + 1))
        want = [(await node.block(hex(n)))["hash"] for n in range(start, tip + 1)]
        assert [b.hash for b in got] == want
        assert all(b.tx_count == TXS_PER_BLOCK for b in got)
        assert not any(b.reorg for b in got)
        # Backfilled first (unverified), then only verified frames, the first one right
        # after the last backfilled block.
        first = next(i for i, b in enumerate(got) if b.verified)
        assert first > 0 and all(not b.verified for b in got[:first])
        assert all(
            b.verified and (b.origin or "").lower() == ORIGIN_ADDRESS.lower() for b in got[first:]
        )
        assert got[first].number == got[first - 1].number + 1
        assert got[first].number >= newest - backlog + 1
        assert sub.backfilled == first


# --- 5: a frame over the relay's max_frame_bytes -------------------------------------------
# Oversized here: the relay's bound, lowered, under a frame of CALLDATA-carrying transfers.
SMALL_MAX_FRAME = 64 * 1024


async def test_frame_over_max_frame_bytes_is_dropped_and_the_feed_goes_on(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    relay_tree = f"max_frame_bytes = {SMALL_MAX_FRAME}\nchild_queue_bytes = {SMALL_MAX_FRAME}"
    async with on_demand_tree(anvil_factory, tree, relay_tree) as (node, _origin, relay):
        await mine(node)
        async with Chain.open(relay.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
            big = (await node.head())[0] + 1
            await mine(node, calldata=CALLDATA)  # its frame is over the relay's bound
            await mine(node, 3)
            tip = (await node.head())[0]
            # The block itself is served all the same (over JSON-RPC from the parent).
            want = (await node.block(hex(big)))["hash"]
            assert (await through.block(hex(big)))["hash"] == want

        async def past_it() -> bool:
            return (await health(relay))["tree"]["streams"][STREAM] == tip

        # The relay's feed goes on past the frame it could not take: its backlog reaches the
        # tip, and a child of it gets every frame after that one.
        await until(past_it, HOP_TIMEOUT, f"the relay's feed to reach block {tip}")
        async with feed_client(relay, Want(STREAM, from_position=big + 1)) as (_welcome, conn):
            got = [(await next_frame(conn)).position for _ in range(tip - big)]
        assert got == list(range(big + 1, tip + 1))
