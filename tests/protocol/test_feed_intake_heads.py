"""The header a node's worker gives newHeads for a block its feeder sent (``FeedSource``):
the header the feeder sent ahead of the block's frame, whether or not it could go out early
(the worker's subscribers not due that head yet), so every worker's heads are its feeder's;
geth's header fields of the block only when no header came. No sockets: the follower and
the head tracker are stand-ins that record what the intake gives them."""

from __future__ import annotations

import typing
from typing import Any

import orjson

from chainrelay.chain.announce import HeadAnnouncer
from chainrelay.chain.events import geth_header
from chainrelay.chain.follower import BlockFollower
from chainrelay.chain.head import Header, HeadTracker
from chainrelay.metrics import Metrics
from chainrelay.tree import frame as ff
from chainrelay.tree.intake import FeedSource
from chainrelay.upstreams.pool import UpstreamPool

ORIGIN = ff.Signer(b"\x01" * 32)


class Heads:
    """The head tracker's side of the intake: headers kept and pushed."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}
        self.taken: list[Any] = []

    def keep_pushed(self, h: Header, obj: Any) -> None:
        self.pushed[h.hash] = obj

    def push_header(self, u: object, obj: Any) -> None:
        self.keep_pushed(typing.cast(Header, Header.parse(obj)), obj)
        self.taken.append(obj)


class Follower:
    def __init__(self) -> None:
        self.heads = HeadAnnouncer()
        self.offered: list[str] = []

    def offer(self, block: dict[str, Any], block_raw: bytes, receipts_raw: bytes | None) -> None:
        self.offered.append(block["hash"])


class Pool:
    upstreams = [type("U", (), {"name": "up", "healthy": True})()]


def block(n: int) -> dict[str, Any]:
    return {
        "number": hex(n),
        "hash": "0x" + f"{n:064x}",
        "parentHash": "0x" + f"{n - 1:064x}",
        "timestamp": hex(1000 + n),
        "gasLimit": "0x1c9c380",
        "transactions": [],
        "uncles": [],
        "size": "0x220",
    }


def frame_of(b: dict[str, Any]) -> ff.Frame:
    raw = ff.encode(
        ORIGIN,
        kind=ff.KIND_BLOCK,
        stream="devnet/blocks",
        position=int(b["number"], 16),
        identity=bytes.fromhex(b["hash"][2:]),
        plain=ff.block_payload(orjson.dumps(b), b"[]"),
    )
    return ff.decode(raw, 1 << 20)


def intake() -> tuple[FeedSource, Heads, Follower]:
    heads, follower = Heads(), Follower()
    source = FeedSource(
        typing.cast(BlockFollower, follower),
        typing.cast(HeadTracker, heads),
        typing.cast(UpstreamPool, Pool()),
        Metrics(),
        max_payload_bytes=1 << 20,
    )
    return source, heads, follower


def test_a_header_sent_ahead_goes_with_its_block_even_when_it_could_not_go_out_early() -> None:
    source, heads, follower = intake()
    seen: list[Any] = []
    follower.heads.add_listener(seen.append)
    follower.heads.reset(1, "0x" + f"{1:064x}")  # its subscribers are due block 2, not 3
    b = block(3)
    pushed = {**b, "totalDifficulty": "0x0"}  # as the feeder's upstream pushed it
    source.on_head(pushed)
    assert seen == []  # not the next head: not announced early
    source.on_frame(frame_of(b), "up")
    assert follower.offered == [b["hash"]]
    assert heads.taken == [pushed]  # its newHeads payload: the feeder's, not derived


def test_a_block_whose_header_did_not_come_ahead_gets_geths_header_fields() -> None:
    source, heads, _ = intake()
    b = block(5)
    source.on_frame(frame_of(b), "up")
    assert heads.taken == [geth_header(b)]
