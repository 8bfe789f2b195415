"""The subscriber library and its feed links against feed parents in the test process.

Pair tier: a ``Parent`` here speaks the feed session (hello, welcome, replay then live,
bye) from a real ``Backlog`` and ``Cursor`` on 127.0.0.1, and answers the JSON-RPC a
subscriber backfills with on the same port, as a node does; frames are made with the real
codec from the mainnet corpus block and from small synthetic blocks. The parent is a test
stand-in because it must misbehave on demand: drop its sessions, say bye, skip positions,
forward bad frames.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypedDict

import orjson
import pytest
from aiohttp import web

from chainrelay.clients.subscriber import Subscription, feed_url, rpc_url, subscribe
from chainrelay.errors import BackfillFailed, ConfigError
from chainrelay.tree.frame import KIND_BLOCK, Signer, block_payload, encode, keccak
from chainrelay.tree.session import (
    CLOSE_LAGGING,
    CLOSE_UNKNOWN_STREAM,
    Backlog,
    Cursor,
    Hello,
    Want,
    encode_bye,
    encode_error,
    encode_welcome,
    parse_hello,
    welcome_entry,
)
from tests.lab.corpora import CORPORA
from tests.lab.procs import ROOT, until
from tests.lab.subscriptions import FeedReader
from tests.lab.timing import SECOND

STREAM = "devnet/blocks"
ORIGIN = Signer(keccak(b"origin key"))
STRANGER = Signer(keccak(b"someone else's key"))
TRUST = ["0x" + ORIGIN.address.hex()]
# Fast reconnects keep the tests short; the back-off itself is the link's.


class Timeouts(TypedDict):
    retry_delay: float
    retry_max: float
    connect_timeout: float


FAST: Timeouts = {"retry_delay": 0.02, "retry_max": 0.2, "connect_timeout": 2 * SECOND}


@dataclass
class Made:
    """A block as the origin published it: its frame and what JSON-RPC answers for it."""

    number: int
    hash: str
    block: dict[str, Any]
    receipts: list[Any]
    raw: bytes


def make_block(n: int, *, salt: bytes = b"", signer: Signer = ORIGIN, txs: int = 2) -> Made:
    h = keccak(b"block %d" % n + salt)
    block: dict[str, Any] = {
        "number": hex(n),
        "hash": "0x" + h.hex(),
        "parentHash": "0x" + keccak(b"block %d" % (n - 1)).hex(),
        "transactions": [
            {"hash": "0x" + keccak(h + bytes([i])).hex(), "blockNumber": hex(n)} for i in range(txs)
        ],
    }
    receipts = [{"transactionIndex": hex(i), "status": "0x1"} for i in range(txs)]
    raw = encode(
        signer,
        kind=KIND_BLOCK,
        stream=STREAM,
        position=n,
        identity=h,
        plain=block_payload(orjson.dumps(block), orjson.dumps(receipts)),
    )
    return Made(n, block["hash"], block, receipts, raw)


class Parent:
    """A feed parent on 127.0.0.1: ``/feed`` sessions replayed then live from a backlog,
    and ``/`` answering eth_getBlockByNumber / eth_getBlockReceipts from ``chain``."""

    def __init__(self, backlog_frames: int = 64) -> None:
        self.backlog = Backlog(backlog_frames, 1 << 30)
        self.chain: dict[int, Made] = {}
        self.hellos: list[Hello] = []
        self.rpc_calls: list[tuple[str, list[Any]]] = []
        self.sockets: set[web.WebSocketResponse] = set()
        self._wakers: set[asyncio.Event] = set()
        app = web.Application()
        app.router.add_get("/feed", self._feed)
        app.router.add_post("/", self._rpc)
        self._runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> Parent:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}/feed"
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    def publish(self, made: Made, *, rpc_too: bool = True) -> None:
        """Append a block's frame to the backlog (every session sends it)."""
        if rpc_too:
            self.chain[made.number] = made
        self.send_raw(made.raw, made.number, bytes.fromhex(made.hash[2:]))

    def send_raw(self, raw: bytes, position: int, identity: bytes) -> None:
        self.backlog.append(position, identity, raw)
        for wake in self._wakers:
            wake.set()

    async def close_all(self, code: int, bye: str | None = None) -> None:
        for ws in list(self.sockets):
            if bye is not None:
                await ws.send_str(encode_bye(bye).decode())
            await ws.close(code=code)

    async def _feed(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 16)
        await ws.prepare(request)
        msg = await ws.receive()
        hello = parse_hello(msg.data)
        self.hellos.append(hello)
        want = hello.wants[0]
        if want.stream != STREAM:
            await ws.send_str(encode_error(f"no stream {want.stream}").decode())
            await ws.close(code=CLOSE_UNKNOWN_STREAM)
            return ws
        seq, gap = self.backlog.resume(want.from_position, want.last)
        cursor = Cursor(seq, 1 << 20, 1 << 40)
        await ws.send_str(encode_welcome([welcome_entry(want, self.backlog, gap)]).decode())
        wake = asyncio.Event()
        self._wakers.add(wake)
        self.sockets.add(ws)

        async def drain() -> None:
            async for _ in ws:
                pass
            wake.set()

        reader = asyncio.create_task(drain())
        try:
            while not ws.closed and not reader.done():
                if cursor.lagging(self.backlog):  # its next frame left the backlog
                    await ws.send_str(encode_bye("lagging").decode())
                    await ws.close(code=CLOSE_LAGGING)
                    break
                frames = cursor.take(self.backlog, 1 << 20)
                for raw in frames:
                    await ws.send_bytes(raw)
                if not frames:
                    await wake.wait()
                    wake.clear()
        finally:
            self._wakers.discard(wake)
            self.sockets.discard(ws)
            reader.cancel()
        return ws

    async def _rpc(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        calls = body if isinstance(body, list) else [body]
        answers = []
        for call in calls:
            method, params = call["method"], call["params"]
            self.rpc_calls.append((method, params))
            made = self.chain.get(int(params[0], 16))
            result: Any = None
            if made is not None and method == "eth_getBlockByNumber":
                result = made.block
            elif made is not None and method == "eth_getBlockReceipts":
                result = made.receipts
            answers.append({"jsonrpc": "2.0", "id": call["id"], "result": result})
        out = answers if isinstance(body, list) else answers[0]
        return web.Response(body=orjson.dumps(out), content_type="application/json")


# Fixtures: parents(**Parent's arguments) starts one; consumers(sub) reads a subscription.
Parents = Callable[..., Awaitable[Parent]]
Consumers = Callable[[Subscription], FeedReader]


@pytest.fixture
async def parents() -> AsyncIterator[Parents]:
    made: list[Parent] = []

    async def start(**kw: int) -> Parent:
        p = await Parent(**kw).start()
        made.append(p)
        return p

    yield start
    for p in made:
        await p.stop()


@pytest.fixture
async def consumers() -> AsyncIterator[Consumers]:
    made: list[FeedReader] = []

    def start(sub: Subscription) -> FeedReader:
        c = FeedReader(sub)
        made.append(c)
        return c

    yield start
    for c in made:
        await c.close()


def corpus_block() -> Made:
    folder = CORPORA / "erigon-mainnet-block-18000000"
    block = json.loads((folder / "eth_getBlockByNumber-full.json").read_text())[0]["response"]
    receipts = json.loads((folder / "eth_getBlockReceipts.json").read_text())[0]["response"]
    b, r = block["result"], receipts["result"]
    n = int(b["number"], 16)
    raw = encode(
        ORIGIN,
        kind=KIND_BLOCK,
        stream=STREAM,
        position=n,
        identity=bytes.fromhex(b["hash"][2:]),
        plain=block_payload(orjson.dumps(b), orjson.dumps(r)),
    )
    return Made(n, b["hash"], b, r, raw)


async def test_blocks_arrive_in_order_checked_and_whole(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    real = corpus_block()
    n = real.number
    parent.publish(real)
    sub = Subscription(parent.url, STREAM, from_block=n, trust=TRUST, **FAST)
    c = consumers(sub)
    await c.wait(1, "the replayed corpus block")
    for k in range(1, 4):
        parent.publish(make_block(n + k))
    got = await c.wait(4, "the live blocks")
    assert c.numbers == [n, n + 1, n + 2, n + 3]
    first = got[0]
    assert first.hash == real.hash
    assert first.block == real.block and first.receipts == real.receipts
    assert first.tx_count == len(real.block["transactions"]) > 0
    assert all(b.verified and not b.reorg and b.origin == TRUST[0] for b in got)
    assert all(b.latency_ms is not None and b.latency_ms >= 0 for b in got)
    assert [b.hash for b in got[1:]] == [make_block(n + k).hash for k in range(1, 4)]
    assert parent.hellos[0].wants == [Want(STREAM, from_position=n)]
    assert not sub.dropped and not parent.rpc_calls


async def test_first_copy_wins_across_two_parents(parents: Parents, consumers: Consumers) -> None:
    a, b = await parents(), await parents()
    sub = Subscription([a.url, b.url], STREAM, from_block=1, trust=TRUST, **FAST)
    c = consumers(sub)
    for link in sub.links:
        assert await link.wait_connected(5 * SECOND)
    blocks = [make_block(k) for k in range(1, 7)]
    for m in blocks[:4]:
        a.publish(m)
    await c.wait(4, "the first parent's blocks")
    for m in blocks[:5]:  # the second parent is behind, then first with block 5
        b.publish(m)
    await c.wait(5, "block 5 from the second parent")
    a.publish(blocks[4])
    a.publish(blocks[5])
    b.publish(blocks[5])
    await c.wait(6, "block 6")
    await until(lambda: sub.duplicates >= 6, 5 * SECOND, "both copies of block 6")
    assert c.numbers == [1, 2, 3, 4, 5, 6]
    assert sub.duplicates == 6  # b's 1-4, a's 5, the later copy of 6
    assert not sub.dropped and not a.rpc_calls and not b.rpc_calls


async def test_frame_from_an_untrusted_signer_is_dropped_and_counted(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    sub = Subscription(parent.url, STREAM, from_block=1, trust=TRUST, **FAST)
    c = consumers(sub)
    parent.publish(make_block(1))
    forged = make_block(2, salt=b"forged", signer=STRANGER)
    parent.publish(forged, rpc_too=False)
    parent.publish(make_block(2))
    parent.publish(make_block(3))
    got = await c.wait(3)
    assert c.numbers == [1, 2, 3]
    assert got[1].hash == make_block(2).hash
    assert sub.dropped == {"untrusted": 1}
    assert not parent.rpc_calls


async def test_any_signer_is_accepted_and_reported_without_trust(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    sub = Subscription(parent.url, STREAM, from_block=1, **FAST)
    c = consumers(sub)
    parent.publish(make_block(1, signer=STRANGER))
    got = await c.wait(1)
    assert got[0].origin == "0x" + STRANGER.address.hex()
    assert sub.signers == {got[0].origin}


async def test_truncated_frame_and_lz4_bomb_are_dropped_and_the_session_kept(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    limit = 1 << 20
    sub = Subscription(
        parent.url, STREAM, from_block=1, trust=TRUST, max_payload_bytes=limit, **FAST
    )
    c = consumers(sub)
    parent.publish(make_block(1))
    good2 = make_block(2)
    parent.send_raw(good2.raw[:-7], 2, keccak(b"truncated"))
    bomb = encode(
        ORIGIN,
        kind=KIND_BLOCK,
        stream=STREAM,
        position=2,
        identity=keccak(b"bomb"),
        plain=b"\0" * (8 * limit),
        hexpack=False,
    )
    assert len(bomb) < limit // 8  # small on the wire, 8 MiB unpacked
    parent.send_raw(bomb, 2, keccak(b"bomb"))
    parent.publish(good2)
    await c.wait(2)
    assert c.numbers == [1, 2]
    assert sub.dropped == {"truncated": 1, "payload": 1}
    assert len(parent.hellos) == 1 and sub.links[0].sessions == 1
    assert not parent.rpc_calls


async def test_resume_after_the_parent_drops_the_session_no_gap_no_duplicate(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    sub = Subscription(parent.url, STREAM, from_block=1, trust=TRUST, **FAST)
    c = consumers(sub)
    for k in range(1, 4):
        parent.publish(make_block(k))
    await c.wait(3)
    await parent.close_all(1011)
    for k in range(4, 7):  # published while the child is away
        parent.publish(make_block(k))
    await c.wait(6, "the blocks published during the outage")
    parent.publish(make_block(7))
    await c.wait(7, "a live block after the reconnect")
    assert c.numbers == [1, 2, 3, 4, 5, 6, 7]
    assert [h.wants[0].from_position for h in parent.hellos] == [1, 4]
    assert sub.links[0].sessions == 2
    assert not parent.rpc_calls and not sub.dropped


async def test_bye_lagging_then_the_link_reconnects_and_resumes(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    sub = Subscription(parent.url, STREAM, from_block=1, trust=TRUST, **FAST)
    c = consumers(sub)
    parent.publish(make_block(1))
    parent.publish(make_block(2))
    await c.wait(2)
    await parent.close_all(CLOSE_LAGGING, bye="lagging")
    await until(lambda: len(parent.hellos) == 2, 5 * SECOND, "the reconnect")
    assert sub.links[0].last_error == "bye: lagging"
    assert sub.links[0].failures == 0  # a bye is no failed connect: no back-off
    parent.publish(make_block(3))
    await c.wait(3)
    assert c.numbers == [1, 2, 3]
    assert parent.hellos[1].wants[0].from_position == 3


async def test_welcome_gap_backfilled_over_a_jsonrpc_answerer(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents(backlog_frames=3)
    blocks = [make_block(k) for k in range(1, 11)]
    for m in blocks:
        parent.publish(m)  # the backlog keeps 8-10; JSON-RPC answers every block
    sub = Subscription(parent.url, STREAM, from_block=3, trust=TRUST, **FAST)
    c = consumers(sub)
    got = await c.wait(8)
    assert c.numbers == list(range(3, 11))
    assert [b.verified for b in got] == [False] * 5 + [True] * 3
    for b in got[:5]:
        m = blocks[b.number - 1]
        assert (b.hash, b.block, b.receipts) == (m.hash, m.block, m.receipts)
        assert b.origin is None and b.latency_ms is None
    assert sub.backfilled == 5
    assert [p[0] for p in parent.rpc_calls] == [
        "eth_getBlockByNumber",
        "eth_getBlockReceipts",
    ] * 5
    assert [p[1][0] for p in parent.rpc_calls[::2]] == [hex(k) for k in range(3, 8)]


async def test_position_jump_backfilled_over_a_jsonrpc_answerer(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    sub = Subscription(parent.url, STREAM, from_block=1, trust=TRUST, **FAST)
    c = consumers(sub)
    blocks = [make_block(k) for k in range(1, 6)]
    parent.publish(blocks[0])
    parent.publish(blocks[1])
    await c.wait(2)
    parent.chain[3], parent.chain[4] = blocks[2], blocks[3]  # the parent missed their frames
    parent.publish(blocks[4])
    got = await c.wait(5)
    assert c.numbers == [1, 2, 3, 4, 5]
    assert [b.verified for b in got] == [True, True, False, False, True]
    assert [b.hash for b in got] == [m.hash for m in blocks]


async def test_a_gap_its_parent_cannot_fill_is_fetched_from_the_other_parent(
    parents: Parents, consumers: Consumers
) -> None:
    a, b = await parents(), await parents()
    sub = Subscription([a.url, b.url], STREAM, from_block=1, trust=TRUST, **FAST)
    c = consumers(sub)
    blocks = [make_block(k) for k in range(1, 5)]
    a.publish(blocks[0])
    a.publish(blocks[1])
    await c.wait(2)
    b.chain[3] = blocks[2]  # a answers null for block 3; b has it
    a.publish(blocks[3])
    got = await c.wait(4)
    assert c.numbers == [1, 2, 3, 4]
    assert got[2].hash == blocks[2].hash and not got[2].verified
    assert ("eth_getBlockByNumber", ["0x3", True]) in a.rpc_calls
    assert ("eth_getBlockByNumber", ["0x3", True]) in b.rpc_calls


async def test_a_gap_no_endpoint_can_fill_ends_the_subscription(parents: Parents) -> None:
    parent = await parents()
    parent.publish(make_block(1))
    parent.publish(make_block(3), rpc_too=True)  # block 2: no frame, no JSON-RPC answer
    sub = Subscription(parent.url, STREAM, from_block=1, trust=TRUST, backfill_rounds=2, **FAST)
    got: list[int] = []
    with pytest.raises(BackfillFailed, match="block 2"):
        async with sub:
            async for b in sub:
                got.append(b.number)
    assert got == [1]


async def test_a_new_block_at_a_delivered_height_is_a_reorg(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    sub = Subscription(parent.url, STREAM, from_block=1, trust=TRUST, **FAST)
    c = consumers(sub)
    old = [make_block(k) for k in (1, 2, 3)]
    new = [make_block(k, salt=b"other") for k in (2, 3, 4)]
    for m in old + new:
        parent.publish(m)
    got = await c.wait(6)
    assert c.numbers == [1, 2, 3, 2, 3, 4]
    assert [b.reorg for b in got] == [False, False, False, True, True, False]
    assert [b.hash for b in got[3:]] == [m.hash for m in new]


async def test_frames_below_the_position_asked_for_are_stale_not_reorgs(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    parent.publish(make_block(1))
    sub = Subscription(parent.url, STREAM, from_block=5, trust=TRUST, **FAST)
    c = consumers(sub)
    assert await sub.links[0].wait_connected(5 * SECOND)
    # A relay that took its own parent's replay in late forwards it after the hello.
    for k in (2, 3, 4, 5, 6):
        parent.publish(make_block(k))
    await c.wait(2)
    assert c.numbers == [5, 6]
    assert sub.dropped == {"stale": 3}
    assert not any(b.reorg for b in c.got) and not parent.rpc_calls


async def test_a_reorg_frame_past_a_missed_height_backfills_it_as_a_reorg(
    parents: Parents, consumers: Consumers
) -> None:
    parent = await parents()
    sub = Subscription(parent.url, STREAM, from_block=1, trust=TRUST, **FAST)
    c = consumers(sub)
    old = [make_block(k) for k in (1, 2, 3, 4)]
    new = {k: make_block(k, salt=b"other") for k in (2, 3, 4)}
    for m in old:
        parent.publish(m)
    await c.wait(4)
    parent.publish(new[2])
    # The parent misses the new 3 (JSON-RPC has it) and sends the new 4.
    parent.chain[3] = new[3]
    parent.publish(new[4])
    got = await c.wait(7)
    assert c.numbers == [1, 2, 3, 4, 2, 3, 4]
    assert [b.reorg for b in got] == [False] * 4 + [True] * 3
    assert [b.verified for b in got[4:]] == [True, False, True]
    assert [b.hash for b in got[4:]] == [new[k].hash for k in (2, 3, 4)]


async def test_a_consumer_that_falls_behind_is_resynchronised_from_the_backlog(
    parents: Parents,
) -> None:
    parent = await parents()
    sub = Subscription(parent.url, STREAM, from_block=1, trust=TRUST, queue_blocks=2, **FAST)
    it = aiter(sub)
    parent.publish(make_block(1))
    got = [await anext(it)]
    for k in range(2, 11):  # nobody reads: the queue holds 2
        parent.publish(make_block(k))
    await until(lambda: sub.dropped["overflow"] > 0, 5 * SECOND, "the queue to overflow")
    async with asyncio.timeout(5 * SECOND):
        while len(got) < 10:
            got.append(await anext(it))
    await sub.aclose()
    assert [b.number for b in got] == list(range(1, 11))
    assert all(b.verified for b in got)
    assert not parent.rpc_calls
    assert len(parent.hellos) >= 2


async def test_a_resync_past_the_parents_backlog_backfills_what_it_lost(
    parents: Parents,
) -> None:
    parent = await parents(backlog_frames=4)
    sub = Subscription(parent.url, STREAM, from_block=1, trust=TRUST, queue_blocks=2, **FAST)
    it = aiter(sub)
    parent.publish(make_block(1))
    got = [await anext(it)]
    for k in range(2, 13):  # nobody reads; the backlog keeps only the last 4
        parent.publish(make_block(k))
    await until(lambda: sub.dropped["overflow"] > 0, 5 * SECOND, "the queue to overflow")
    async with asyncio.timeout(5 * SECOND):
        while len(got) < 12:
            got.append(await anext(it))
    await sub.aclose()
    assert [b.number for b in got] == list(range(1, 13))
    assert [b.hash for b in got] == [make_block(k).hash for k in range(1, 13)]
    unverified = [b.number for b in got if not b.verified]
    assert unverified and unverified == list(range(unverified[0], 9))  # 9-12: the backlog
    assert sub.backfilled == len(unverified)


async def test_closing_the_generator_stops_every_link(parents: Parents) -> None:
    a, b = await parents(), await parents()
    a.publish(make_block(1))
    gen = subscribe([a.url, b.url], STREAM, from_block=1, trust=TRUST)
    first = await anext(gen)
    assert first.number == 1
    await until(lambda: len(a.sockets) == 1 and len(b.sockets) == 1, 5 * SECOND, "both links")
    await gen.aclose()
    await until(lambda: not a.sockets and not b.sockets, 5 * SECOND, "both sessions to end")


async def test_cli_prints_one_json_line_per_block(parents: Parents) -> None:
    parent = await parents()
    for k in range(1, 4):
        parent.publish(make_block(k, txs=k))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chainrelay",
        "subscribe",
        parent.url,
        "--stream",
        STREAM,
        "--from",
        "1",
        "--count",
        "3",
        "--max-seconds",
        str(10 * SECOND),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(15 * SECOND):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [(x["number"], x["hash"], x["txs"]) for x in lines] == [
        (k, make_block(k, txs=k).hash, k) for k in range(1, 4)
    ]
    assert all(x["verified"] and not x["reorg"] and x["latency_ms"] >= 0 for x in lines)
    assert b"no --trust" in err and ("0x" + ORIGIN.address.hex()).encode() in err


async def test_cli_ends_cleanly_on_sigint_and_reports_drops(parents: Parents) -> None:
    parent = await parents()
    parent.publish(make_block(1))
    parent.publish(make_block(2, signer=STRANGER), rpc_too=False)
    parent.publish(make_block(2))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainrelay", "subscribe", parent.url, "--stream", STREAM,
        "--from", "1", "--trust", TRUST[0],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(15 * SECOND):
            lines = [await proc.stdout.readline() for _ in range(2)]
            proc.send_signal(signal.SIGINT)
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert [orjson.loads(x)["number"] for x in lines] == [1, 2] and not out
    assert b"Traceback" not in err and b"'untrusted': 1" in err
    assert b"no --trust" not in err


async def test_cli_refuses_a_bad_trust_address() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainrelay", "subscribe", "ws://127.0.0.1:1/feed",
        "--stream", STREAM, "--trust", "0x1234",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        async with asyncio.timeout(15 * SECOND):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2 and b"20-byte hex address" in err


def test_node_urls_name_the_feed_and_its_jsonrpc_endpoint() -> None:
    assert feed_url("ws://10.0.0.1:8545/feed") == "ws://10.0.0.1:8545/feed"
    assert feed_url("http://10.0.0.1:8545") == "ws://10.0.0.1:8545/feed"
    assert feed_url("wss://relay.example/") == "wss://relay.example/feed"
    assert rpc_url("ws://10.0.0.1:8545/feed") == "http://10.0.0.1:8545/"
    assert rpc_url("wss://relay.example/feed") == "https://relay.example/"
    for bad in ("10.0.0.1:8545", "ftp://x/feed", "ws:///feed"):
        with pytest.raises(ConfigError):
            feed_url(bad)
