"""An entry node's Nitro parts in-process, on loopback sockets: a real ``Ingress`` over a
real ``BatchLog`` (sqlite3 in tmp_path) and ``FeedHub``, the feed in (``NitroFeedIn``)
following fake Nitro feeds (``tests/lab/fake_nitro_feed.py``: the faults a real sequencer
cannot be made to produce), and the Nitro endpoint (``NitroServer``) with clients of its
protocol.

Two inputs sending overlapping numbers out of order give each number once, in order; a
broadcast past the size limit closes that input, counted, and it resumes from the next
number; the endpoint's upgrade answers as Nitro's does (headers, 400 for an old client or
a malformed number, 429 past the per-address limit, deflate when offered); a client that
never reads is disconnected, and what the node queues for it stays within its bound; the
log keeps the feed by count and age.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from chainrelay.batches.frame import encode_frame
from chainrelay.batches.ingress import Ingress, specs_of
from chainrelay.batches.log import BatchLog
from chainrelay.config import BatchesConfig, BatchStreamConfig, NitroConfig, NitroInputConfig
from chainrelay.metrics import Metrics
from chainrelay.nitro.feedin import NitroFeedIn
from chainrelay.nitro.feedout import NitroServer
from chainrelay.nitro.tail import Received, follow
from chainrelay.tree.frame import Signer, keccak
from chainrelay.tree.hub import FeedHub
from tests.lab.fake_nitro_feed import FakeNitroFeed
from tests.lab.nitro_messages import Made, realistic
from tests.lab.procs import until
from tests.lab.timing import SECOND

STREAM = "arbitrum/nitro-feed"
CHAIN = 42161
ENTRY = Signer(keccak(b"nitro pair entry node"))
WAIT = 10 * SECOND
FIRST = 1000


@dataclass
class Node:
    hub: FeedHub
    ingress: Ingress
    feed_in: NitroFeedIn | None
    server: NitroServer
    metrics: Metrics

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}"

    def count(self, where: str, outcome: str) -> float:
        return float(self.metrics.nitro_messages.labels(where, outcome)._value.get())


@contextlib.asynccontextmanager
async def node(tmp_path: Path, inputs: list[str], **nitro: object) -> AsyncIterator[Node]:
    bcfg = BatchesConfig(
        streams=[BatchStreamConfig(STREAM, CHAIN, ["0x" + ENTRY.address.hex()])],
        log=str(tmp_path / "nitro.sqlite"),
        api_keys=["pair-nitro-api-key"],
    )
    ncfg = NitroConfig(listen="127.0.0.1:0", inputs=[NitroInputConfig(u) for u in inputs], **nitro)  # type: ignore[arg-type]
    metrics = Metrics()
    specs = specs_of(bcfg, CHAIN)
    hub = FeedHub([], metrics, batches=specs)
    ingress = Ingress(bcfg, specs, BatchLog(bcfg), hub, metrics)
    await ingress.start()
    feed_in = NitroFeedIn(ncfg, specs[0], ingress, ENTRY, metrics) if inputs else None
    server = NitroServer(ncfg, hub, specs[0], metrics, max_frame_bytes=4 << 20)
    await server.start()
    if feed_in is not None:
        await feed_in.start()
    try:
        yield Node(hub, ingress, feed_in, server, metrics)
    finally:
        if feed_in is not None:
            await feed_in.stop()
        await server.stop()
        await hub.stop()
        await ingress.stop()


async def collect(url: str, from_seq: int | None, n: int) -> list[Received]:
    got: list[Received] = []
    async with asyncio.timeout(WAIT):
        async for r in follow(url, from_seq):
            if not r.confirmation:
                got.append(r)
            if len(got) >= n:
                return got
    return got


def by_seq(made: list[Made]) -> dict[int, Made]:
    return {m.seq: m for m in made}


async def test_two_inputs_overlapping_out_of_order_give_each_number_once(tmp_path: Path) -> None:
    made = by_seq(realistic(12, first_seq=FIRST, sizes=(500, 5000)))
    async with FakeNitroFeed(CHAIN) as a, FakeNitroFeed(CHAIN) as b:
        async with node(tmp_path, [a.url, b.url]) as n:
            await until(
                lambda: (
                    n.feed_in is not None
                    and all(n.feed_in.linked.values())
                    and len(n.feed_in.linked) == 2
                ),
                WAIT,
                "both inputs linked",
            )
            reader = asyncio.ensure_future(collect(n.url, FIRST, 12))
            # a is ahead and lost 1003; b is behind, sends some late and out of order.
            a.publish([made[s] for s in (1000, 1001, 1002)])
            b.publish([made[1000]])
            a.publish([made[s] for s in (1004, 1005)])
            b.publish([made[s] for s in (1001, 1002, 1003)])
            a.publish([made[s] for s in (1006, 1007, 1008, 1009)])
            b.publish([made[s] for s in (1005, 1004)])  # out of order on b
            b.publish([made[s] for s in (1006, 1007, 1008, 1009, 1010, 1011)])
            a.publish([made[s] for s in (1010, 1011)])
            got = await reader
            assert [(r.seq, r.raw) for r in got] == [(s, made[s].raw) for s in range(1000, 1012)]
            await until(lambda: n.count("in", "duplicate") >= 10, WAIT, "duplicates counted")
            assert n.count("in", "accepted") == 12
            assert n.count("in", "backwards") == 1  # b's 1004 after its 1005


async def test_a_huge_broadcast_closes_the_input_and_it_resumes(tmp_path: Path) -> None:
    made = realistic(6, first_seq=FIRST, sizes=(500, 2000))
    async with FakeNitroFeed(CHAIN) as feed:
        async with node(tmp_path, [feed.url], max_message_bytes=64 * 1024) as n:
            feed.publish(made[:3])
            reader = asyncio.ensure_future(collect(n.url, FIRST, 6))
            await until(lambda: n.hub.next_seq(STREAM) == FIRST + 3, WAIT, "the first three")
            huge = b'{"version":1,"messages":[{"sequenceNumber":1003,"pad":"' + b"x" * 100_000
            feed.send_raw(huge + b'"}]}')
            await until(lambda: n.count("in", "too_large") == 1, WAIT, "the huge one counted")
            feed.publish(made[3:])
            got = await reader
            assert [r.raw for r in got] == [m.raw for m in made]
            # The reconnect asked for the next number: nothing was sent twice.
            assert feed.connects[-1] == FIRST + 3
            assert n.count("in", "duplicate") == 0


async def _upgrade(url: str, headers: dict[str, str]) -> int:
    try:
        async with connect(url, additional_headers=headers, proxy=None):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_the_upgrade_answers_as_nitros_does(tmp_path: Path) -> None:
    async with node(tmp_path, [], max_connections_per_ip=2) as n:
        async with connect(
            n.url, additional_headers={"Arbitrum-Feed-Client-Version": "2"}, proxy=None
        ) as ws:
            assert ws.response is not None
            h = ws.response.headers
            assert h["Arbitrum-Feed-Server-Version"] == "2"
            assert h["Arbitrum-Chain-Id"] == str(CHAIN)
            assert "permessage-deflate" in h.get("Sec-WebSocket-Extensions", "")
        async with connect(n.url, compression=None, proxy=None) as ws:
            assert ws.response is not None
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
        assert await _upgrade(n.url, {"Arbitrum-Feed-Client-Version": "1"}) == 400
        assert await _upgrade(n.url, {"Arbitrum-Requested-Sequence-Number": "-5"}) == 400
        assert await _upgrade(n.url, {"Arbitrum-Requested-Sequence-Number": "1e9"}) == 400
        assert n.count("out", "bad_request") == 3
        async with connect(n.url, proxy=None), connect(n.url, proxy=None):
            assert await _upgrade(n.url, {}) == 429
        assert n.count("out", "refused_limit") == 1
        # Both closed: the address may connect again.
        await until(lambda: n.server._clients == 0, WAIT, "the connections released")
        assert await _upgrade(n.url, {}) == 101


async def test_a_client_that_never_reads_is_disconnected(tmp_path: Path) -> None:
    made = realistic(60, first_seq=FIRST, sizes=(60_000, 100_000))
    async with FakeNitroFeed(CHAIN) as feed:
        async with node(
            tmp_path,
            [feed.url],
            send_timeout=1.0,
            write_buffer_bytes=256 * 1024,
            max_message_bytes=8 << 20,
        ) as n:
            # A raw socket: the upgrade, then never a read (its receive buffer kept small).
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", n.server.port))
            key = base64.b64encode(b"0123456789abcdef").decode()
            sock.sendall(
                (
                    f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                    f"Arbitrum-Requested-Sequence-Number: {FIRST}\r\n\r\n"
                ).encode()
            )
            reader = asyncio.ensure_future(collect(n.url, FIRST, 60))  # a good client
            try:
                for i in range(0, 60, 5):
                    feed.publish(made[i : i + 5])
                await until(lambda: n.count("out", "too_slow") == 1, WAIT, "the reader dropped")
                got = await reader
                assert [r.raw for r in got] == [m.raw for m in made]
                # Both gone (the good one has closed): no slot is held by the dropped one.
                await until(lambda: n.server._clients == 0, WAIT, "the slots released")
            finally:
                sock.close()


@pytest.mark.parametrize("compression", [True, False])
async def test_a_client_asking_for_nothing_gets_the_whole_backlog(
    tmp_path: Path, compression: bool
) -> None:
    made = realistic(5, first_seq=FIRST, sizes=(500, 2000))
    async with FakeNitroFeed(CHAIN) as feed:
        async with node(tmp_path, [feed.url]) as n:
            feed.publish(made)
            await until(lambda: n.hub.next_seq(STREAM) == FIRST + 5, WAIT, "all five")
            got: list[Received] = []
            async with asyncio.timeout(WAIT):
                async for r in follow(n.url, None, compression=compression):
                    got.append(r)
                    if len(got) == 5:
                        break
            assert [r.raw for r in got] == [m.raw for m in made]


async def test_clients_catching_up_share_one_read_and_one_compression(tmp_path: Path) -> None:
    made = realistic(40, first_seq=FIRST, sizes=(2_000, 8_000))
    async with FakeNitroFeed(CHAIN) as feed:
        # Four recent messages, a client holding at most 16 KiB of older ones at a time:
        # the rest comes from pages of the backlog, read once for every client.
        async with node(tmp_path, [feed.url], recent_messages=4, write_buffer_bytes=16 * 1024) as n:
            feed.publish(made)
            await until(lambda: n.count("in", "accepted") == 40, WAIT, "all taken in")
            want = [(m.seq, m.raw) for m in made]
            first = await collect(n.url, FIRST, 40)
            assert [(r.seq, r.raw) for r in first] == want
            loads = n.server.loads
            assert loads >= 1
            more = await asyncio.gather(*(collect(n.url, FIRST, 40) for _ in range(6)))
            assert all([(r.seq, r.raw) for r in got] == want for got in more)
            assert n.server.loads == loads  # the older ones were read once, for all
            assert n.server.deflate.compressed == 40  # each compressed once, for all


async def test_the_log_keeps_the_feed_by_count_and_age(tmp_path: Path) -> None:
    bcfg = BatchesConfig(
        streams=[BatchStreamConfig(STREAM, CHAIN, ["0x" + ENTRY.address.hex()])],
        log=str(tmp_path / "trim.sqlite"),
        api_keys=["pair-nitro-api-key"],
    )
    log = BatchLog(bcfg)
    await log.start()
    try:
        # Frames 0-9 made at t = 1000 + seq seconds (the frame's origin time, in µs).
        for seq in range(10):
            raw = encode_frame(
                chain_id=CHAIN,
                stream=STREAM,
                seq=seq,
                payload=b"m%d" % seq,
                signature=bytes(65),
                origin_us=(1000 + seq) * 1_000_000,
            )
            await log.append(STREAM, seq, keccak(raw), raw)
        assert await log.trim(STREAM, 8, 0) == 2  # by count: the newest 8 stay
        assert (await log.frames(STREAM, 0, 100, 1 << 20)) == []
        assert len(await log.frames(STREAM, 2, 100, 1 << 20)) == 8
        assert await log.trim(STREAM, 100, 1005 * 1_000_000) == 3  # by age: 2, 3, 4
        assert len(await log.frames(STREAM, 5, 100, 1 << 20)) == 5
        # Everything is old: the newest record stays, where the stream goes on from.
        assert await log.trim(STREAM, 1, 2000 * 1_000_000) == 4
        assert await log.last_seq(STREAM) == 9
    finally:
        await log.stop()


async def test_an_entry_node_trims_its_log_as_it_follows(tmp_path: Path) -> None:
    made = realistic(12, first_seq=FIRST, sizes=(200, 500))
    async with FakeNitroFeed(CHAIN) as feed:
        async with node(tmp_path, [feed.url], log_keep_messages=5, log_trim_interval=0.05) as n:
            feed.publish(made)
            await until(lambda: n.hub.next_seq(STREAM) == FIRST + 12, WAIT, "all twelve")

            async def trimmed() -> bool:
                return len(await n.ingress.log.frames(STREAM, FIRST, 100, 1 << 20)) == 0

            await until(trimmed, WAIT, "the oldest trimmed")
            kept = await n.ingress.log.frames(STREAM, FIRST + 7, 100, 1 << 20)
            assert len(kept) == 5
