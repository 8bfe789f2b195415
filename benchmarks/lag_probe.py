"""A relay with an event-loop lag probe of the benchmark's own: the same instrument in a
relay of any commit, also one from before ``chainrelay_event_loop_lag_seconds`` existed.

    LAG_PROBE_OUT=FILE python -m benchmarks.lag_probe [chainrelay arguments]

Runs ``chainrelay.cli.main`` with the arguments given, in this process, and puts on its
event loop a timer due every 5 ms (as ``chainrelay/looplag.py`` does): how late it fires is
observed into a histogram with finer buckets than the relay's, beside the garbage
collector's pauses by generation, and beside the part of that lateness the process's own
work can explain (``LAG_CPU``): the lateness, or the loop thread's CPU time since the timer
was set when that is less. An upper bound of it: a sample late only because the kernel ran
other processes counts there only as far as the thread worked since the timer was set. Once
a second, from the loop, the cumulative buckets are written to ``LAG_PROBE_OUT`` in the
Prometheus text format, named as the relay names its own
(``chainrelay_event_loop_lag_seconds``, ``chainrelay_gc_pause_seconds``), so that the
benchmark reads both the same way. A write is a few hundred bytes: a few microseconds.

With ``LAG_PROBE_IDLE=1`` the process runs no relay: an idle event loop with the probe
alone, whose lag is the machine's floor (how late a process that does nothing is woken).

Run from the relay's own tree (the working directory is first on ``sys.path``, so its
``chainrelay`` is imported) with this clone's root on ``PYTHONPATH`` for this module. The
loop is hooked where the relay makes it, ``uvloop.new_event_loop``, which every commit's
``cli._run`` calls; nothing of the relay's code is changed.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

# As chainrelay/looplag.py: a timer due this often.
SAMPLE_EVERY = 0.005
# Bucket bounds (seconds): the relay's, plus 0.25, 1.5, 3, 7.5, 15 ms and 0.5 s, for a p99
# near the 2 ms goal read between closer bounds.
BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
WRITE_EVERY = 1.0
LAG = "chainrelay_event_loop_lag_seconds"
LAG_CPU = "chainrelay_event_loop_lag_cpu_seconds"
GC = "chainrelay_gc_pause_seconds"


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last: past the last bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out = []
        cum = 0
        for le, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            cum += n
            bound = "+Inf" if le == float("inf") else repr(le)
            out.append(f'{name}_bucket{{{labels}le="{bound}"}} {cum}')
        out.append(f"{name}_count{{{labels.rstrip(',')}}} {cum}")
        out.append(f"{name}_sum{{{labels.rstrip(',')}}} {self.total}")
        return out


class Probe:
    def __init__(self, loop: asyncio.AbstractEventLoop, out: Path) -> None:
        self.loop = loop
        self.out = out
        self.tmp = out.with_suffix(".tmp")
        self.lag = Histogram()
        self.lag_cpu = Histogram()
        self.gc: dict[str, Histogram] = {}
        self.gc_started = 0.0
        self.next_write = time.perf_counter() + WRITE_EVERY
        gc.callbacks.append(self._gc)
        self._arm()

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.gc_started = time.perf_counter()
        else:
            generation = str(info.get("generation", ""))
            hist = self.gc.setdefault(generation, Histogram())
            hist.observe(time.perf_counter() - self.gc_started)

    def _arm(self) -> None:
        due = time.perf_counter() + SAMPLE_EVERY
        self.loop.call_later(SAMPLE_EVERY, self._fired, due, time.thread_time())

    def _fired(self, due: float, cpu: float) -> None:
        now = time.perf_counter()
        late = max(0.0, now - due)
        self.lag.observe(late)
        self.lag_cpu.observe(min(late, time.thread_time() - cpu))
        if now >= self.next_write:
            self.next_write = now + WRITE_EVERY
            self.write()
        self._arm()

    def write(self) -> None:
        lines = self.lag.lines(LAG) + self.lag_cpu.lines(LAG_CPU)
        for generation, hist in sorted(self.gc.items()):
            lines += hist.lines(GC, f'generation="{generation}",')
        self.tmp.write_text("\n".join(lines) + "\n")
        os.replace(self.tmp, self.out)


def main(argv: list[str] | None = None) -> int:
    out = os.environ.get("LAG_PROBE_OUT")
    make_loop = uvloop.new_event_loop

    def probed_loop() -> uvloop.Loop:
        loop = make_loop()
        if out:
            Probe(loop, Path(out))
        return loop

    uvloop.new_event_loop = probed_loop
    if os.environ.get("LAG_PROBE_IDLE"):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.Event().wait())  # until killed
        return 0
    from chainrelay.cli import main as relay_main

    return relay_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
