"""The event-loop lag sampler: a stall of the loop shows in the histogram as it lasted."""

from __future__ import annotations

import asyncio
import time

from chainrelay.looplag import LoopLag
from chainrelay.metrics import Metrics


def lag_samples(m: Metrics) -> dict[float, float]:
    """Cumulative counts per upper bound of chainrelay_event_loop_lag_seconds."""
    out: dict[float, float] = {}
    for family in m.registry.collect():
        if family.name == "chainrelay_event_loop_lag_seconds":
            for s in family.samples:
                if s.name.endswith("_bucket"):
                    out[float(s.labels["le"])] = s.value
    return out


async def test_a_stall_of_the_loop_is_sampled_as_lag() -> None:
    m = Metrics()
    lag = LoopLag(m, every=0.001)
    await lag.start()
    try:
        fired = asyncio.Event()
        deadline = time.monotonic() + 10
        while lag_samples(m)[float("inf")] < 20:  # sampling runs
            assert time.monotonic() < deadline, "the sampler never fired"
            await asyncio.sleep(0.001)
        before = lag_samples(m)
        stalled_at = time.perf_counter()
        while time.perf_counter() - stalled_at < 0.03:  # a 30 ms stall, no await
            pass
        loop = asyncio.get_running_loop()
        loop.call_later(0.002, fired.set)
        await fired.wait()
        after = lag_samples(m)
        # The timer due during the stall fired at its end: one sample past 25 ms.
        assert (after[float("inf")] - after[0.025]) - (before[float("inf")] - before[0.025]) >= 1
    finally:
        await lag.stop()


async def test_a_full_collection_is_measured_as_a_gc_pause() -> None:
    import gc

    m = Metrics()
    lag = LoopLag(m)
    await lag.start()
    try:
        gc.collect()
    finally:
        await lag.stop()
    gc.collect()  # not measured once stopped
    count = m.registry.get_sample_value("chainrelay_gc_pause_seconds_count", {"generation": "2"})
    assert count == 1
