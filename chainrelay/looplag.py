"""Event-loop lag: how long a callback that became due waits before it runs.

A timer is due every ``LAG_SAMPLE_EVERY`` seconds; how late it fires is the wait a request
arriving at that instant would have seen before the loop looked at it (a block being taken in,
a long callback). Samples go to ``chainrelay_event_loop_lag_seconds``, whose p99 is the tail a
burst of clients feels from the node's own work. An idle loop reads 0.1 to 0.3 ms (the timer's
own granularity).

The garbage collector's pauses are measured beside it (``chainrelay_gc_pause_seconds``, by
generation): a collection of the oldest generation walks every object the node holds and
is the usual cause of a lag spike that no code of the node's shows.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from chainrelay.metrics import Metrics

# 200 samples a second: a 2 ms stall once a second is seen in about 1 sample in 500, enough
# for a p99 over a minute; a sample costs a few microseconds (0.1% of a core).
LAG_SAMPLE_EVERY = 0.005


class LoopLag:
    """Samples the running loop's lag into ``metrics.loop_lag`` while started."""

    def __init__(self, metrics: Metrics, every: float = LAG_SAMPLE_EVERY) -> None:
        self.metrics = metrics
        self.every = every
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gc_started = 0.0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arm()
        gc.callbacks.append(self._gc)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_started
            self.metrics.gc_pause.labels(str(info.get("generation", ""))).observe(pause)

    def _arm(self) -> None:
        assert self._loop is not None
        due = time.perf_counter() + self.every
        self._timer = self._loop.call_later(self.every, self._fired, due)

    def _fired(self, due: float) -> None:
        self.metrics.loop_lag.observe(max(0.0, time.perf_counter() - due))
        self._arm()
