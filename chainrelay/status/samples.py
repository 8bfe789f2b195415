"""The last minutes of a node, one sample a second, for the status page's plots.

Sans-I/O: the board (``status.board``) reads the node's running totals once a second and
hands them here as a ``Totals``; this module keeps a bounded ring of them and turns
neighbouring samples into rates. Nothing here runs per call: the totals are counters the
node keeps anyway (``Metrics.hits``, ``Metrics.misses``, the request and upstream slots), so
the cache-hit path pays nothing for the page.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Totals:
    """Running totals at one instant (``t``, seconds): each only ever grows, but for
    ``latency_ms``, the origin-to-here time of the last frame of each stream that second
    (None: no frame came)."""

    t: float
    calls: int = 0  # client calls answered, any outcome
    hits: int = 0
    misses: int = 0
    upstream_calls: int = 0  # calls this node sent to its upstreams, any outcome
    frames: Mapping[str, int] = field(default_factory=dict)  # frames kept, by stream
    latency_ms: Mapping[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Series:
    """Rates between neighbouring samples, oldest first: one point per interval. A ratio
    with nothing to divide by (no cacheable call, no client call) is None, a gap in the
    plot, never a made-up 0 or 1."""

    t: list[float]
    calls_per_s: list[float]
    hit_ratio: list[float | None]
    upstream_per_call: list[float | None]
    frames_per_s: dict[str, list[float]]
    latency_ms: dict[str, list[float | None]]

    def as_json(self) -> dict[str, object]:
        return {
            "t": self.t,
            "callsPerSecond": self.calls_per_s,
            "hitRatio": self.hit_ratio,
            "upstreamPerCall": self.upstream_per_call,
            "framesPerSecond": self.frames_per_s,
            "latencyMs": self.latency_ms,
        }


class SampleRing:
    """The newest ``size`` samples; ``add`` drops the oldest past it."""

    def __init__(self, size: int) -> None:
        if size < 2:
            raise ValueError("a ring of rates needs at least two samples")
        self._samples: collections.deque[Totals] = collections.deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, sample: Totals) -> None:
        """Keep ``sample``. One older than the newest (a clock stepped back) restarts the
        ring: a negative interval would give rates of nonsense."""
        if self._samples and sample.t <= self._samples[-1].t:
            self._samples.clear()
        self._samples.append(sample)

    def totals(self, seconds: float) -> tuple[Totals, Totals] | None:
        """The first and last samples of the last ``seconds``, for one rate over them."""
        if len(self._samples) < 2:
            return None
        last = self._samples[-1]
        first = next((s for s in self._samples if s.t >= last.t - seconds), self._samples[0])
        return (first, last) if first is not last else (self._samples[-2], last)

    def series(self) -> Series:
        samples = list(self._samples)
        streams = sorted({name for s in samples for name in s.frames})
        out = Series([], [], [], [], {n: [] for n in streams}, {n: [] for n in streams})
        for before, now in itertools.pairwise(samples):
            dt = now.t - before.t
            calls = now.calls - before.calls
            cacheable = (now.hits - before.hits) + (now.misses - before.misses)
            out.t.append(round(now.t, 3))
            out.calls_per_s.append(round(calls / dt, 3))
            out.hit_ratio.append(ratio(now.hits - before.hits, cacheable))
            out.upstream_per_call.append(ratio(now.upstream_calls - before.upstream_calls, calls))
            for name in streams:
                n = now.frames.get(name, 0) - before.frames.get(name, 0)
                out.frames_per_s[name].append(round(max(n, 0) / dt, 3))
                out.latency_ms[name].append(now.latency_ms.get(name))
        return out


def ratio(part: int, whole: int) -> float | None:
    """``part / whole`` to four places, None when ``whole`` is 0 (nothing to say)."""
    return None if whole <= 0 else round(part / whole, 4)
