"""The HTTP head poll schedule: fed poll times and answers, read "next poll at"; no I/O.

A simulated chain produces blocks at given times; a simulated poller asks it at the times
the schedule answers. What is checked: polls per block, how long each block waits to be
seen, and the waits on a stalled chain.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from chainrelay import defaults
from chainrelay.chain.headpoll import HeadPollSchedule
from chainrelay.config import HeadConfig, loads
from chainrelay.errors import ConfigError

BLOCK = 1.0
# Today's fixed schedule polled every block time / 4: a block waited block time / 8 on
# average, and it cost 4 polls a block.
OLD_MEAN_DELAY = BLOCK / 8
OLD_POLLS_PER_BLOCK = 4.0


def run(
    schedule: HeadPollSchedule,
    produced: Sequence[float],
    until: float,
    *,
    numbers: Sequence[int] | None = None,
    lag: float = 0.0,
) -> tuple[list[float], list[float]]:
    """Poll a chain whose block ``numbers[i]`` appears at ``produced[i]`` (seen by the
    upstream ``lag`` seconds later) until ``until``; return the poll times and, per
    block, the delay until a poll saw it."""
    numbers = list(numbers) if numbers is not None else list(range(1, len(produced) + 1))
    polls: list[float] = []
    seen_at: dict[int, float] = {}
    now = 0.0
    while now < until:
        polls.append(now)
        visible = [n for t, n in zip(produced, numbers, strict=True) if t + lag <= now]
        head = max(visible) if visible else 0
        for t, n in zip(produced, numbers, strict=True):
            if t + lag <= now and n not in seen_at and n <= head:
                seen_at[n] = now
        nxt = schedule.polled(now, head)
        assert nxt > now
        now = nxt
    delays = [seen_at[n] - t for t, n in zip(produced, numbers, strict=True) if n in seen_at]
    return polls, delays


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def test_regular_blocks_are_seen_sooner_with_fewer_polls() -> None:
    produced = [0.37 + i * BLOCK for i in range(100)]
    s = HeadPollSchedule(BLOCK, HeadConfig())
    polls, delays = run(s, produced, produced[-1] + 0.01)
    settled = delays[10:]
    assert median(settled) < OLD_MEAN_DELAY
    per_block = len([t for t in polls if t > produced[10]]) / (len(produced) - 11)
    assert per_block < 1.6  # one poll a block, and a second for one block in four
    assert s.interval == pytest.approx(BLOCK, rel=0.05)


def test_a_wrong_profile_block_time_is_learned() -> None:
    # anvil mining every second under the BSC profile's 0.75 s.
    produced = [0.5 + i * 1.0 for i in range(60)]
    s = HeadPollSchedule(0.75, HeadConfig())
    polls, delays = run(s, produced, produced[-1] + 0.01)
    assert s.interval == pytest.approx(1.0, rel=0.1)
    assert median(delays[20:]) < 0.75 / 8
    assert len([t for t in polls if t > produced[20]]) / 39 < 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_jittery_intervals(seed: int) -> None:
    rng = random.Random(seed)
    produced = []
    t = 0.2
    for _ in range(200):
        t += BLOCK * rng.uniform(0.7, 1.3)
        produced.append(t)
    s = HeadPollSchedule(BLOCK, HeadConfig())
    polls, delays = run(s, produced, produced[-1] + BLOCK)
    assert len(delays) == len(produced)
    assert median(delays) <= OLD_MEAN_DELAY
    # Once the first blocks taught the rhythm, a block that came early waits about as
    # long as it was early (up to 30 % here), not more.
    settled = sorted(delays[10:])
    assert settled[int(0.9 * len(settled))] < 0.4 * BLOCK
    assert len(polls) / len(produced) < OLD_POLLS_PER_BLOCK
    assert s.interval == pytest.approx(BLOCK, rel=0.2)


def test_a_stalled_chain_is_asked_less_and_less_but_at_least_every_max_interval() -> None:
    produced = [0.1 + i * BLOCK for i in range(10)]
    s = HeadPollSchedule(BLOCK, HeadConfig(poll_max_interval=2.0))
    stall_end = produced[-1] + 30.0
    polls, _ = run(s, [*produced, stall_end], stall_end + 5.0)
    during = [t for t in polls if produced[-1] + 2 * BLOCK < t < stall_end]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(gaps))  # backing off
    assert max(gaps) == pytest.approx(2.0)
    assert len(during) < 30 / 2.0 + 5
    # The learned interval did not take the stall for the chain's block time.
    assert s.interval <= BLOCK * 3.0
    # The block after the stall was seen within one max interval.
    assert s.number == len(produced) + 1


def test_after_a_stall_the_rhythm_returns() -> None:
    first = [0.1 + i * BLOCK for i in range(10)]
    second = [first[-1] + 20.0 + i * BLOCK for i in range(30)]
    s = HeadPollSchedule(BLOCK, HeadConfig())
    _polls, delays = run(s, [*first, *second], second[-1] + 0.01)
    assert median(delays[-15:]) < OLD_MEAN_DELAY
    assert s.interval == pytest.approx(BLOCK, rel=0.1)


def test_a_skipped_block_counts_as_two_intervals() -> None:
    # The upstream's head jumps from 10 to 12: the interval is not learned as 2 s.
    produced = [0.3 + i * BLOCK for i in range(30)]
    numbers = list(range(1, 31))
    shown = [(t, n) for t, n in zip(produced, numbers, strict=True) if n not in (11, 21)]
    s = HeadPollSchedule(BLOCK, HeadConfig())
    _polls, delays = run(
        s, [t for t, _ in shown], shown[-1][0] + 0.01, numbers=[n for _, n in shown]
    )
    assert s.interval == pytest.approx(BLOCK, rel=0.1)
    assert median(delays[-10:]) < OLD_MEAN_DELAY


def test_a_reorg_at_the_same_height_or_lower_changes_no_plan() -> None:
    s = HeadPollSchedule(BLOCK, HeadConfig())
    for i in range(5):
        s.polled(i * BLOCK, i + 1)
    due, interval = s.due, s.interval
    # A sibling of block 5 (same number), then a lagging or reorged-back answer (4).
    nxt = s.polled(4 * BLOCK + 0.01, 5)
    assert s.polled(4 * BLOCK + 0.02, 4) == nxt
    assert (s.due, s.interval) == (due, interval)


def test_a_lagging_upstream_is_followed_on_its_own_rhythm() -> None:
    # The upstream shows each block 0.3 s after it is produced: its schedule locks on that.
    produced = [0.1 + i * BLOCK for i in range(50)]
    s = HeadPollSchedule(BLOCK, HeadConfig())
    _polls, delays = run(s, produced, produced[-1] + 0.5, lag=0.3)
    assert median([d - 0.3 for d in delays[10:]]) < OLD_MEAN_DELAY


def test_failed_polls_are_retried_near_the_due_time() -> None:
    s = HeadPollSchedule(BLOCK, HeadConfig())
    s.polled(0.0, 1)
    s.polled(1.0, 2)
    due = s.due
    assert due is not None
    nxt = s.polled(due - 0.01, None)
    assert nxt - (due - 0.01) <= 0.1 * BLOCK + 1e-9


def test_no_wait_exceeds_the_max_interval_even_for_long_blocks() -> None:
    s = HeadPollSchedule(12.0, HeadConfig(poll_max_interval=2.0))
    now = 0.0
    for n in (1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3):
        nxt = s.polled(now, n)
        assert 0 < nxt - now <= 2.0
        now = nxt


def test_the_first_poll_answers_soon() -> None:
    s = HeadPollSchedule(0.25, HeadConfig())
    assert s.polled(10.0, None) - 10.0 <= 0.25


def test_blocks_faster_than_the_profile_are_learned_by_the_probes() -> None:
    # A poll just after the due time cannot tell how early a block came; the probes can.
    produced = [0.5 + i * 0.8 for i in range(80)]
    s = HeadPollSchedule(1.0, HeadConfig())
    _polls, delays = run(s, produced, produced[-1] + 0.01)
    assert s.interval == pytest.approx(0.8, rel=0.05)
    assert median(delays[40:]) < 0.8 / 8


# --- configuration ---------------------------------------------------------------------------
UPSTREAM = '[[upstreams]]\nurl = "http://127.0.0.1:8545"\n'


def test_head_poll_settings_are_read_from_head() -> None:
    cfg = loads("[head]\npoll_near = 0.2\npoll_probe_every = 8\n" + UPSTREAM, {})
    assert (cfg.head.poll_near, cfg.head.poll_probe_every) == (0.2, 8)
    assert cfg.head.poll_lead == defaults.HEAD_POLL_LEAD


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("poll_near = 0", "head.poll_near"),
        ("poll_probe_every = 0", "head.poll_probe_every"),
        ("poll_backoff = 0.5", "poll_backoff"),
        ("poll_lead = -0.1", "poll_lead"),
        ("poll_max_interval = 0.01", "poll_max_interval"),
        ("interval_max_factor = 0.1", "interval_max_factor"),
    ],
)
def test_bad_head_poll_settings_are_refused(line: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        loads(f"[head]\n{line}\n" + UPSTREAM, {})
    assert key in str(exc.value)
