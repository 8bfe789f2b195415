"""The delivered chain's decisions, objects in, objects out: gaps past the window are
reported once, and blocks at or below the finalized one are forgotten."""

from __future__ import annotations

from chainrelay.chain.blockorder import DeliveredChain


def chain(low: int, high: int, fork: str = "a") -> dict[int, str]:
    return {n: f"{fork}{n}" for n in range(low, high + 1)}


def deliver_all(d: DeliveredChain[int], canonical: dict[int, str], head: int) -> list[int]:
    step = d.step(canonical, head)
    for n, h in step.fetch:
        d.delivered(n, h, n)
    return [n for n, _ in step.fetch]


def test_a_gap_past_the_window_is_reported_once_and_the_rest_delivered() -> None:
    d: DeliveredChain[int] = DeliveredChain(window=4)
    d.start_after(10)
    assert deliver_all(d, chain(7, 12), 12) == [11, 12]
    # The feed was away for 20 blocks: only the window's last 4 can still be fetched.
    step = d.step(chain(29, 32), 32)
    assert step.skipped == 16  # 13..28
    assert [n for n, _ in step.fetch] == [29, 30, 31, 32]
    # Not fetched yet (the upstream was not ready): the same gap is not reported again...
    again = d.step(chain(29, 32), 32)
    assert again.skipped == 0
    assert [n for n, _ in again.fetch] == [29, 30, 31, 32]
    # ...but a block that falls out of the window meanwhile is.
    later = d.step(chain(29, 33), 33)
    assert later.skipped == 1
    assert [n for n, _ in later.fetch] == [30, 31, 32, 33]


def test_no_gap_when_delivery_keeps_up() -> None:
    d: DeliveredChain[int] = DeliveredChain(window=4)
    d.start_after(0)
    for head in range(1, 12, 3):
        assert d.step(chain(max(1, head - 3), head), head).skipped == 0
        deliver_all(d, chain(max(1, head - 3), head), head)


def test_finalized_blocks_are_forgotten_but_the_tip_still_links() -> None:
    d: DeliveredChain[int] = DeliveredChain(window=8)
    d.start_after(0)
    deliver_all(d, chain(1, 6), 6)
    d.prune_final(4)
    assert len(d) == 2 and d.hash_at(4) is None and d.hash_at(5) == "a5"
    d.prune_final(10)  # past the tip: the tip stays, so the next block is checked
    assert len(d) == 1 and d.tip == 6
    assert d.links(7, "a6") and not d.links(7, "b6")
    # Nothing is fetched again: the tip is still where it was.
    assert [n for n, _ in d.step(chain(1, 7), 7).fetch] == [7]


def test_a_reorg_above_the_finalized_block_retracts_newest_first() -> None:
    d: DeliveredChain[int] = DeliveredChain(window=8)
    d.start_after(0)
    deliver_all(d, chain(1, 6), 6)
    d.prune_final(3)
    new = {**chain(1, 4), **chain(5, 7, "b")}
    step = d.step(new, 7)
    assert step.retract == [6, 5]
    assert step.fetch == [(5, "b5"), (6, "b6"), (7, "b7")]
