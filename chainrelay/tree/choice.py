"""Which candidate parents a node links to, sans-I/O: the choice and the round-trip estimate.

Rules (everything that decides which parents a node keeps lives here):

- A candidate is **reachable** when it is ``up`` and its round-trip time has been measured:
  a parent is never chosen blind.
- The node links to ``min(k, reachable)`` parents, never the same one twice.
- **Regions**: at most one parent per region while another region still has a reachable
  candidate; with fewer regions than ``k``, the remaining places go to the best of the rest.
  A node whose two parents share a region loses both when that region does, so this rule
  comes before the hysteresis below: two current parents of one region are split as soon
  as another region is reachable.
- **Lower round-trip time first**; ties go to the lower name, so the same input always gives
  the same answer.
- **Hysteresis**: a current parent that is reachable is kept unless a candidate that could
  take its place (without costing a region) is faster by both ``degrade_factor`` times and
  ``min_gain`` seconds. Two parents of similar distance never flap: the factor alone
  would swap 4 ms for 1 ms (a gain no child notices), the gain alone 500 ms for 470 ms
  (noise at that distance).
- The worst current parent is replaced first, by the best candidate that may take its
  place; replacing repeats until none qualifies. Each replacement lowers the parents' total
  round-trip time, so it ends; the result, given back as ``current``, is kept as it is.

The round-trip time is an exponentially weighted average (``RttEstimate``) of probe
samples, so one slow probe moves it a fraction of the way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

# Weight of a new sample in the smoothed round-trip time. TCP's 1/8 (RFC 6298) suits one
# sample per packet; with one probe every few seconds a quarter lets a parent that really
# slowed down show within about four probes (68% of the step), while one outlier moves the
# estimate by a quarter of its excess only.
RTT_ALPHA = 0.25


@dataclass(slots=True)
class Candidate:
    """A parent the node may link to, as last measured."""

    name: str
    url: str
    region: str
    rtt: float | None = None  # smoothed seconds; None = not measured (or lost) yet
    failures: int = 0  # consecutive failed probes or connects
    up: bool = True

    @property
    def reachable(self) -> bool:
        return self.up and self.rtt is not None


class RttEstimate:
    """A smoothed round-trip time: feed it every probe's sample, read ``value``."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = RTT_ALPHA) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.value: float | None = None

    def update(self, sample: float) -> float:
        """Fold in one sample (seconds); the first sample is the estimate."""
        if sample < 0.0 or sample != sample:
            raise ValueError("a round-trip time is a non-negative number")
        v = self.value
        self.value = sample if v is None else v + self.alpha * (sample - v)
        return self.value

    def reset(self) -> None:
        """Forget the estimate: call when the candidate was lost, so its return is measured
        afresh instead of starting from a time that no longer holds."""
        self.value = None


def _key(c: Candidate) -> tuple[float, str]:
    assert c.rtt is not None
    return (c.rtt, c.name)


def _regions(chosen: Sequence[Candidate]) -> int:
    return len({c.region for c in chosen})


def choose(
    cands: Sequence[Candidate],
    k: int,
    current: Sequence[str],
    *,
    degrade_factor: float,
    min_gain: float,
) -> list[str]:
    """The names of the parents to link to, fastest first; call every time a measurement
    changes. ``current`` is the names linked now (kept unless the rules above drop them)."""
    if k < 0:
        raise ValueError("k must be non-negative")
    if degrade_factor < 1.0:
        raise ValueError("degrade_factor below 1 would replace a parent by a slower one")
    if min_gain < 0.0:
        raise ValueError("min_gain must be non-negative")
    names = [c.name for c in cands]
    if len(set(names)) != len(names):
        raise ValueError("candidate names must be unique")

    reachable = sorted((c for c in cands if c.reachable), key=_key)
    want = min(k, len(reachable))
    target_regions = min(want, _regions(reachable))
    sticky = set(current)

    # Current parents first, then the rest, each by round-trip time: one per region, then
    # the best of the rest while places are left.
    order = [c for c in reachable if c.name in sticky] + [
        c for c in reachable if c.name not in sticky
    ]
    chosen: list[Candidate] = []
    seen_regions: set[str] = set()
    for c in order:
        if len(chosen) == want:
            break
        if c.region not in seen_regions:
            chosen.append(c)
            seen_regions.add(c.region)
    for c in order:
        if len(chosen) == want:
            break
        if c not in chosen:
            chosen.append(c)

    # Hysteresis: replace the worst parent by the best candidate that may take its place
    # (one that costs no region) when it is faster by both the factor and the gain.
    # Ends: every replacement is strictly faster (degrade_factor >= 1), so the parents'
    # total round-trip time falls each time, and there are finitely many choices.
    while swap := _best_swap(chosen, reachable, target_regions, degrade_factor, min_gain):
        old, new = swap
        chosen[chosen.index(old)] = new

    return [c.name for c in sorted(chosen, key=_key)]


def _best_swap(
    chosen: list[Candidate],
    reachable: list[Candidate],
    target_regions: int,
    degrade_factor: float,
    min_gain: float,
) -> tuple[Candidate, Candidate] | None:
    unchosen = [c for c in reachable if c not in chosen]  # already by round-trip time
    for old in sorted(chosen, key=_key, reverse=True):
        assert old.rtt is not None
        rest = [c for c in chosen if c is not old]
        for new in unchosen:
            assert new.rtt is not None
            if _regions([*rest, new]) < target_regions:
                continue
            if old.rtt > degrade_factor * new.rtt and old.rtt - new.rtt >= min_gain:
                return old, new
            break  # the best that may take its place is not enough; slower ones are not
    return None


# --- where a candidate is reached ----------------------------------------------------------
_HTTP_SCHEME = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
FEED_PATH = "/feed"
HEALTH_PATH = "/health"


def _with(url: str, schemes: dict[str, str], path: str) -> str:
    parts = urlsplit(url)
    scheme = schemes.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"a parent's url is http(s):// or ws(s)://host:port, not {url!r}")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def feed_url(url: str) -> str:
    """The feed endpoint of the node at ``url`` (its base URL, or its feed URL itself)."""
    return _with(url, _WS_SCHEME, FEED_PATH)


def health_url(url: str) -> str:
    """The HTTP health endpoint of the node at ``url``: timed to measure the round trip."""
    return _with(url, _HTTP_SCHEME, HEALTH_PATH)
