"""When the recent window behind the block follower is filled, and over which blocks
(``chain.windowfill``); no sockets, no event loop. How it is filled (bounded, each block
once, canonical blocks only) is in tests/pair/test_block_fill_bounds.py."""

from __future__ import annotations

from chainrelay import defaults
from chainrelay.chain.windowfill import WindowFill

HEAD = 1_000


def test_the_first_read_missing_in_the_window_fills_it_newest_first_once_per_run() -> None:
    window = WindowFill(64)
    window.following_after(HEAD)
    due = window.due(HEAD - 30, HEAD - 30)  # a receipt of a block 30 behind
    assert due is not None
    assert list(due) == list(range(HEAD, HEAD - 64, -1))
    assert window.due(HEAD - 19, HEAD) is None  # the same run: under way or done
    assert window.due(HEAD - 5, HEAD - 5) is None


def test_nothing_is_due_before_the_follower_follows_nor_with_a_depth_of_zero() -> None:
    window = WindowFill(64)
    assert window.due(HEAD - 3, HEAD) is None  # no run: no first block to fill behind
    off = WindowFill(0)
    off.following_after(HEAD)
    assert off.due(HEAD - 3, HEAD) is None


def test_reads_outside_the_window_leave_it_to_a_later_read_inside() -> None:
    window = WindowFill(64)
    window.following_after(HEAD)
    assert window.due(HEAD + 1, HEAD + 3) is None  # blocks the follower delivers
    assert window.due(HEAD - 500, HEAD - 64) is None  # older than the window
    assert window.due(0, 10) is None
    # A window of logs reaching into it from below does: its newest blocks are there.
    due = window.due(HEAD - 80, HEAD - 60)
    assert due is not None and due[0] == HEAD and due[-1] == HEAD - 63


def test_a_new_run_after_a_gap_has_a_window_of_its_own() -> None:
    window = WindowFill(64)
    window.following_after(HEAD)
    assert window.due(HEAD, HEAD) is not None
    # The automatic follower stopped; clients came back 100 blocks later.
    window.following_after(HEAD + 100)
    due = window.due(HEAD + 90, HEAD + 99)
    assert due is not None and list(due) == list(range(HEAD + 100, HEAD + 36, -1))
    assert window.due(HEAD + 90, HEAD + 99) is None
    # Restarted after the same block (a retried start): the window is not filled twice.
    window.following_after(HEAD + 100)
    assert window.due(HEAD + 95, HEAD + 95) is None


def test_the_window_stops_at_genesis_and_defaults_to_the_heads_backfill() -> None:
    window = WindowFill(64)
    window.following_after(10)
    due = window.due(3, 3)
    assert due is not None and list(due) == list(range(10, -1, -1))
    assert defaults.FILL_WINDOW_BLOCKS == defaults.BACKFILL_BLOCKS
    assert defaults.FILL_WINDOW_AT_ONCE <= defaults.MAX_BLOCK_FILLS


def test_the_window_waits_for_enough_reads_missing_there_and_counts_per_run() -> None:
    window = WindowFill(64, after_misses=3)
    window.following_after(HEAD)
    assert window.due(HEAD - 30, HEAD - 30) is None  # one wallet's one receipt: not yet
    assert window.due(HEAD + 5, HEAD + 5) is None  # outside the window: not counted
    assert window.due(HEAD - 3, HEAD - 3) is None
    due = window.due(HEAD - 40, HEAD - 20)  # the third read missing there
    assert due is not None and due[0] == HEAD
    # A new run counts its own reads.
    window.following_after(HEAD + 100)
    assert window.due(HEAD + 99, HEAD + 99) is None
    assert window.due(HEAD + 98, HEAD + 98) is None
    assert window.due(HEAD + 97, HEAD + 97) is not None
    assert defaults.FILL_WINDOW_AFTER_MISSES > 1
