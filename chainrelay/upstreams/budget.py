"""One upstream's budget: calls per second and calls in flight, kept below a provider's quota.

A provider billed per call, or one that answers 429 past N calls a second, is asked at most
``max_rps`` calls a second (a token bucket holding ``BUDGET_BURST_SECONDS`` of its rate)
and ``max_concurrency`` at once. Every call sent spends from it (``spend``), the head
tracker's and the probes' too; the pool reads ``open`` to route a read elsewhere, or to wait
for the budget up to ``[pool] budget_wait``.

Auto-tuning (``[pool] auto_tune``, erpc's ``rateLimitAutoTune``): each period in which the
provider said "slow down" cuts the rate by ``AUTO_TUNE_DECREASE``; each quiet period raises
it by ``AUTO_TUNE_INCREASE`` back up to ``max_rps``. An upstream with no ``max_rps`` starts
from the rate it was being sent when the first 429 came.

Sans-I/O: ``now`` is the caller's ``perf_counter``; nothing here sleeps or awaits.
"""

from __future__ import annotations

import math

from chainrelay import defaults as d


class Budget:
    """Calls per second and in flight for one upstream. ``rate`` 0 and ``concurrency`` 0:
    no bound (``open`` is then always true, ``spend`` a no-op but for auto-tuning's count)."""

    __slots__ = (
        "_count",
        "_period_start",
        "_slowed_in_period",
        "_stamp",
        "auto_tune",
        "ceiling",
        "concurrency",
        "rate",
        "tokens",
    )

    def __init__(
        self, max_rps: float = 0.0, max_concurrency: int = 0, *, auto_tune: bool = False
    ) -> None:
        self.ceiling = max_rps  # the configured rate: auto-tuning never goes past it
        self.rate = max_rps
        self.concurrency = max_concurrency
        self.auto_tune = auto_tune
        self.tokens = self._burst()
        self._stamp = 0.0
        # Auto-tuning: calls spent and whether a "slow down" came, in the current period.
        self._period_start = 0.0
        self._count = 0
        self._slowed_in_period = False

    @property
    def bounded(self) -> bool:
        """Whether any bound is set (else the pool skips every check)."""
        return self.rate > 0.0 or self.concurrency > 0 or self.auto_tune

    def _burst(self) -> float:
        return max(1.0, self.rate * d.BUDGET_BURST_SECONDS)

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self.tokens = min(self._burst(), self.tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def open(self, now: float, in_flight: int) -> bool:
        """Whether one more call may be sent now without passing a bound."""
        if self.concurrency and in_flight >= self.concurrency:
            return False
        if self.rate <= 0.0:
            return True
        self._refill(now)
        return self.tokens >= 1.0

    def wait(self, now: float, in_flight: int) -> float:
        """Seconds until the rate allows a call (0.0: now); ``math.inf`` when only a call
        ending can open it (concurrency), which the caller waits for otherwise."""
        if self.concurrency and in_flight >= self.concurrency:
            return math.inf
        if self.rate <= 0.0:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def spend(self, now: float, calls: int = 1) -> None:
        """``calls`` sent now (a batch spends one per call, as providers bill it). May
        overdraw (the head tracker does not ask first): later calls then wait the debt out."""
        if self.auto_tune:
            self._tick(now)
            self._count += calls
        if self.rate > 0.0:
            self._refill(now)
            self.tokens -= calls

    def slowed(self, now: float) -> None:
        """The upstream said "slow down" (a 429, or its wording): auto-tuning cuts the rate,
        once a period however many 429s one burst brought back."""
        if not self.auto_tune:
            return
        if self.rate <= 0.0:
            # No bound known: start from what was being sent in the period under way.
            sent = self._count / max(now - self._period_start, d.AUTO_TUNE_PERIOD)
            self._tick(now)  # no rate to raise yet
            self.rate = max(d.AUTO_TUNE_FLOOR, sent)
            self.tokens = 0.0
            self._stamp = now
        else:
            self._tick(now)
        if self._slowed_in_period:
            return
        self._slowed_in_period = True
        self.rate = max(d.AUTO_TUNE_FLOOR, self.rate * d.AUTO_TUNE_DECREASE)
        self.tokens = min(self.tokens, self._burst())

    def _tick(self, now: float) -> None:
        """Close the auto-tuning periods that ended by ``now``: a quiet one raises the rate."""
        if self._period_start == 0.0:
            self._period_start = now  # the first period starts with the first call
            return
        if now - self._period_start < d.AUTO_TUNE_PERIOD:
            return
        if not self._slowed_in_period and self.rate > 0.0:
            raised = self.rate * d.AUTO_TUNE_INCREASE
            self.rate = raised if self.ceiling <= 0.0 else min(self.ceiling, raised)
        self._period_start = now
        self._count = 0
        self._slowed_in_period = False
