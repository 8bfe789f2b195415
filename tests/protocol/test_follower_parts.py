"""The block follower's sans-I/O parts, objects in, objects out: when it follows, which
heads go out ahead of their block, and how offered blocks are bounded."""

from __future__ import annotations

from typing import Any

import pytest

from chainrelay.chain.announce import HeadAnnouncer
from chainrelay.chain.followmode import FollowMode
from chainrelay.chain.head import Header
from chainrelay.chain.offers import OfferedBlocks


def test_an_automatic_follower_follows_for_recent_blocks_after_a_miss_of_block_data() -> None:
    mode = FollowMode("auto", follow_recent=3)
    assert not mode.wanted(listening=False, head=10)
    assert not mode.note_miss("eth_call", 10)  # not data following would have cached
    assert not mode.wanted(listening=False, head=10)
    assert mode.note_miss("eth_getTransactionReceipt", 10)
    assert mode.wanted(listening=False, head=13)
    assert not mode.wanted(listening=False, head=14)
    assert mode.wanted(listening=True, head=14)


def test_reads_that_hit_keep_an_automatic_follower_following() -> None:
    mode = FollowMode("auto", follow_recent=3)
    mode.note_reads(0, 10)
    assert not mode.wanted(listening=False, head=10)
    assert mode.note_miss("eth_getTransactionReceipt", 10)
    mode.note_reads(5, 11)  # reads answered at head 10 (hits of what following warmed)
    mode.note_reads(9, 14)  # and at head 13
    assert mode.wanted(listening=False, head=16)
    mode.note_reads(9, 15)  # none at 14: interest runs out 3 blocks past the last read
    assert mode.wanted(listening=False, head=16)
    assert not mode.wanted(listening=False, head=17)


def test_reads_never_make_a_never_follower_follow() -> None:
    mode = FollowMode("never", follow_recent=3)
    mode.note_reads(7, 10)
    assert not mode.wanted(listening=False, head=10)


@pytest.mark.parametrize(("follow", "idle"), [("always", True), ("never", False)])
def test_always_and_never_ignore_misses(follow: str, idle: bool) -> None:
    mode = FollowMode(follow, follow_recent=3)
    assert not mode.note_miss("eth_getBlockByNumber", 10)
    assert mode.wanted(listening=False, head=11) is idle
    assert mode.wanted(listening=True, head=11)


def test_an_unknown_follow_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        FollowMode("sometimes")


def test_only_the_next_pushed_head_goes_out_early_and_each_head_once() -> None:
    heads = HeadAnnouncer()
    got: list[dict[str, Any]] = []
    heads.add_listener(got.append)
    heads.reset(10, "h10")
    heads.announce(Header(11, "h11", "h10"), {"number": "0xb"})
    heads.announce(Header(13, "h13", "h12"), {"number": "0xd"})  # a gap: waits for its block
    heads.announce(Header(12, "h12", "h11"), None)  # polled: its header comes from the fetch
    assert got == [{"number": "0xb"}]
    assert heads.delivered(11, "h11")  # went out early: its event says so
    assert not heads.delivered(12, "h12")  # goes out with its block, and is the tip now
    heads.announce(Header(13, "h13", "h12"), {"number": "0xd"})
    assert got == [{"number": "0xb"}, {"number": "0xd"}]


def test_a_head_given_up_is_the_tip_the_next_one_follows() -> None:
    heads = HeadAnnouncer()
    got: list[dict[str, Any]] = []
    heads.add_listener(got.append)
    heads.reset(10, "h10")
    heads.passed_over(11, "h11")
    heads.announce(Header(12, "h12", "h11"), {"number": "0xc"})
    assert got == [{"number": "0xc"}]


def test_offered_blocks_are_bounded_by_the_window_oldest_dropped_first() -> None:
    offers = OfferedBlocks(window=2, max_bytes=1 << 20)
    for n in range(4):
        offers.offer({"hash": f"h{n}"}, b"x" * 10, b"[]")
    offers.offer({"hash": "h3"}, b"y" * 99, None)  # offered already: ignored
    offers.offer({"number": "0x5"}, b"z", None)  # no hash: ignored
    assert list(offers.blocks) == ["h2", "h3"]
    assert offers.bytes == 2 * 12
    assert offers.take("h2") == ({"hash": "h2"}, b"x" * 10, b"[]")
    assert offers.take("h2") is None
    assert offers.bytes == 12
