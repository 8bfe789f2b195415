"""Choosing parents by round-trip time: the rules of chainrelay.tree.choice, case by
case, then as properties over generated candidate sets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chainrelay.tree.choice import (
    RTT_ALPHA,
    Candidate,
    RttEstimate,
    choose,
    feed_url,
    health_url,
)

MS = 0.001
FACTOR = 1.5
GAIN = 20 * MS


def c(name: str, region: str, rtt_ms: float | None, up: bool = True) -> Candidate:
    return Candidate(
        name, f"http://{name}:8545", region, None if rtt_ms is None else rtt_ms * MS, up=up
    )


def rtt_of(cand: Candidate) -> float:
    assert cand.rtt is not None, f"{cand.name} has no rtt"
    return cand.rtt


def pick(cands: list[Candidate], k: int = 2, current: tuple[str, ...] = ()) -> list[str]:
    return choose(cands, k, list(current), degrade_factor=FACTOR, min_gain=GAIN)


# --- first choice ---------------------------------------------------------------------------
def test_the_two_fastest_in_different_regions() -> None:
    cands = [c("a1", "eu", 30), c("a2", "eu", 10), c("b1", "us", 80), c("c1", "ap", 50)]
    assert pick(cands) == ["a2", "c1"]  # a1 is faster than c1 but shares a2's region


def test_fastest_first_in_the_answer() -> None:
    cands = [c("x", "eu", 90), c("y", "us", 20), c("z", "ap", 40)]
    assert pick(cands, k=3) == ["y", "z", "x"]


def test_fewer_regions_than_k_fill_with_the_best_of_the_rest() -> None:
    cands = [c("a1", "eu", 10), c("a2", "eu", 20), c("a3", "eu", 5), c("b1", "us", 90)]
    assert pick(cands, k=3) == ["a3", "a1", "b1"]  # both regions, then eu's next best


def test_one_region_only() -> None:
    cands = [c("a1", "eu", 30), c("a2", "eu", 10), c("a3", "eu", 20)]
    assert pick(cands) == ["a2", "a3"]


@pytest.mark.parametrize(
    "cand",
    [c("down", "us", 1, up=False), c("blind", "us", None)],
    ids=["down", "unmeasured"],
)
def test_unreachable_candidates_are_never_chosen(cand: Candidate) -> None:
    cands = [c("a", "eu", 50), cand]
    assert pick(cands) == ["a"]
    assert pick(cands, current=(cand.name,)) == ["a"]


def test_nothing_reachable_nothing_chosen() -> None:
    assert pick([c("a", "eu", None), c("b", "us", 5, up=False)]) == []
    assert pick([]) == []
    assert pick([c("a", "eu", 5)], k=0) == []


def test_ties_go_to_the_lower_name() -> None:
    cands = [c("b", "eu", 10), c("a", "eu", 10), c("d", "us", 10), c("c", "us", 10)]
    assert pick(cands) == ["a", "c"]
    assert pick(list(reversed(cands))) == ["a", "c"]


# --- hysteresis -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old_ms", "new_ms", "replaced"),
    [
        (10, 5, False),  # twice as fast, but 5 ms is no gain worth a change
        (100, 80, False),  # 20 ms faster, but only 1.25 times
        (100, 66, True),  # 1.52 times and 34 ms: worth it
        (31, 10, True),  # 3.1 times and 21 ms
        (29, 10, False),  # 2.9 times, 19 ms
    ],
)
def test_a_parent_is_replaced_only_past_both_thresholds(
    old_ms: float, new_ms: float, replaced: bool
) -> None:
    cands = [c("old", "eu", old_ms), c("new", "eu", new_ms), c("far", "us", 500)]
    got = pick(cands, current=("old", "far"))
    assert ("new" in got) is replaced
    assert ("old" in got) is not replaced
    assert "far" in got  # nothing faster in its region, the only other one


def test_no_flapping_between_two_similar_parents() -> None:
    a, b = c("a", "eu", 40), c("b", "eu", 42)
    cur = pick([a, b], k=1)
    assert cur == ["a"]
    for a_ms, b_ms in [(45, 40), (50, 41), (40, 48), (55, 39)]:
        a.rtt, b.rtt = a_ms * MS, b_ms * MS
        cur = pick([a, b], k=1, current=tuple(cur))
        assert cur == ["a"]
    a.rtt = 90 * MS  # now twice as slow and 51 ms worse
    assert pick([a, b], k=1, current=tuple(cur)) == ["b"]


def test_a_faster_candidate_that_would_cost_a_region_does_not_replace() -> None:
    # us2 is far faster than eu1 but would leave two parents in us while eu is reachable.
    cands = [c("eu1", "eu", 200), c("us1", "us", 15), c("us2", "us", 1)]
    assert pick(cands, current=("eu1", "us1")) == ["us1", "eu1"]


def test_the_worst_parent_is_replaced_by_the_best_that_may_take_its_place() -> None:
    cands = [c("eu1", "eu", 300), c("us1", "us", 100), c("ap1", "ap", 10), c("us2", "us", 5)]
    # Both could go. eu1, the worst, goes first, to ap1 (us2 would leave two parents in us);
    # then us1 goes to us2, in its own region.
    assert pick(cands, current=("eu1", "us1")) == ["us2", "ap1"]


def test_a_down_parent_is_replaced_whatever_the_hysteresis() -> None:
    cands = [c("a", "eu", 10, up=False), c("b", "us", 20), c("c", "ap", 21)]
    assert pick(cands, current=("a", "b")) == ["b", "c"]


def test_two_parents_in_one_region_split_when_another_region_is_reachable() -> None:
    cands = [c("a1", "eu", 10), c("a2", "eu", 11), c("b1", "us", 12)]
    # b1 is barely slower than a2: no hysteresis gain, yet regions come first.
    assert pick(cands, current=("a1", "a2")) == ["a1", "b1"]


def test_current_names_not_among_candidates_are_ignored() -> None:
    assert pick([c("a", "eu", 10)], current=("gone", "a")) == ["a"]


@pytest.mark.parametrize(
    ("k", "factor", "gain"),
    [(-1, 1.5, 0.0), (2, 0.9, 0.0), (2, 1.5, -0.001)],
)
def test_bad_arguments_are_refused(k: int, factor: float, gain: float) -> None:
    with pytest.raises(ValueError):
        choose([c("a", "eu", 1)], k, [], degrade_factor=factor, min_gain=gain)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        pick([c("a", "eu", 1), c("a", "us", 2)])


# --- the round-trip estimate ----------------------------------------------------------------
def test_rtt_estimate_starts_at_the_first_sample_and_moves_by_alpha() -> None:
    e = RttEstimate()
    assert e.value is None
    assert e.update(0.100) == 0.100
    assert e.update(0.200) == pytest.approx(0.100 + RTT_ALPHA * 0.100)
    e.reset()
    assert e.value is None
    assert e.update(0.050) == 0.050


def test_rtt_estimate_converges_to_a_new_level() -> None:
    e = RttEstimate()
    e.update(0.010)
    for _ in range(20):
        e.update(0.100)
    assert e.value == pytest.approx(0.100, rel=0.01)


@pytest.mark.parametrize("bad", [-0.001, float("nan")])
def test_rtt_estimate_refuses_nonsense_samples(bad: float) -> None:
    with pytest.raises(ValueError):
        RttEstimate().update(bad)


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_rtt_estimate_refuses_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError):
        RttEstimate(alpha)


# --- urls -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "feed", "health"),
    [
        ("http://10.0.0.2:8545", "ws://10.0.0.2:8545/feed", "http://10.0.0.2:8545/health"),
        ("ws://h:1/feed", "ws://h:1/feed", "http://h:1/health"),
        ("https://h.example/", "wss://h.example/feed", "https://h.example/health"),
        ("wss://[::1]:9/x?y=1", "wss://[::1]:9/feed", "https://[::1]:9/health"),
    ],
)
def test_feed_and_health_urls(url: str, feed: str, health: str) -> None:
    assert feed_url(url) == feed
    assert health_url(url) == health


@pytest.mark.parametrize("url", ["ftp://h:1", "h:1", "http://", ""])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        feed_url(url)


# --- properties -----------------------------------------------------------------------------
REGIONS = ["eu", "us", "ap", "sa"]


@st.composite
def candidate_sets(draw: st.DrawFn) -> tuple[list[Candidate], int, list[str]]:
    n = draw(st.integers(0, 9))
    cands = []
    for i in range(n):
        rtt = draw(st.one_of(st.none(), st.integers(0, 400)))
        cands.append(
            Candidate(
                f"n{i}",
                f"http://n{i}:1",
                draw(st.sampled_from(REGIONS)),
                None if rtt is None else rtt * MS,
                up=draw(st.booleans()) or draw(st.booleans()),
            )
        )
    k = draw(st.integers(0, 5))
    names = [x.name for x in cands] + ["gone"]
    current = draw(st.lists(st.sampled_from(names), max_size=4, unique=True))
    return cands, k, current


@settings(max_examples=400, deadline=None)
@given(candidate_sets(), st.sampled_from([1.0, 1.5, 3.0]), st.sampled_from([0.0, 0.02]))
def test_choice_properties(
    case: tuple[list[Candidate], int, list[str]], factor: float, gain: float
) -> None:
    cands, k, current = case
    got = choose(cands, k, current, degrade_factor=factor, min_gain=gain)
    by_name = {x.name: x for x in cands}
    reachable = [x for x in cands if x.reachable]

    assert len(got) == len(set(got))
    assert len(got) == min(k, len(reachable))
    assert all(by_name[n].reachable for n in got)
    regions = {by_name[n].region for n in got}
    assert len(regions) == min(len(got), len({x.region for x in reachable}))
    rtts = [rtt_of(by_name[n]) for n in got]
    assert rtts == sorted(rtts)
    # A faster candidate that could take a parent's place without costing a region is left
    # out only by the hysteresis: the parent is a current one, not worse by both thresholds.
    target = len(regions)
    for n in got:
        p = by_name[n]
        for x in reachable:
            if x.name in got or (x.rtt, x.name) >= (p.rtt, p.name):
                continue
            rest = {by_name[m].region for m in got if m != n}
            if len(rest | {x.region}) < target:
                continue
            assert n in current, f"{x.name} is faster than the new parent {n}"
            slower = rtt_of(p) > factor * rtt_of(x) and rtt_of(p) - rtt_of(x) >= gain
            assert not slower
    # Stable: the answer, given back as the current parents, is the answer again.
    assert choose(cands, k, got, degrade_factor=factor, min_gain=gain) == got
    # Deterministic: the candidates' order does not matter.
    assert choose(cands[::-1], k, current, degrade_factor=factor, min_gain=gain) == got


@settings(max_examples=300, deadline=None)
@given(candidate_sets())
def test_without_current_parents_each_region_gives_its_fastest(
    case: tuple[list[Candidate], int, list[str]],
) -> None:
    cands, k, _ = case
    got = choose(cands, k, [], degrade_factor=1.5, min_gain=0.02)
    reachable = sorted((x for x in cands if x.reachable), key=lambda x: (x.rtt, x.name))
    by_name = {x.name: x for x in cands}
    for n in got:
        chosen = by_name[n]
        best_of_region = next(x for x in reachable if x.region == chosen.region)
        if sum(by_name[m].region == chosen.region for m in got) == 1:
            assert chosen is best_of_region
    # A region left out has nothing faster than any parent chosen.
    if got:
        slowest = by_name[got[-1]]
        used = {by_name[n].region for n in got}
        for x in reachable:
            if x.region not in used:
                assert (x.rtt, x.name) > (slowest.rtt, slowest.name)
