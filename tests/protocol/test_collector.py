"""A serving process's heap after start (``collector.settle_startup_heap``): what starting
built is out of every collection's reach, and the collector runs at the serving thresholds
(shorter young collections, rarer full ones: ``defaults.GC_THRESHOLDS``). Run in a process
of its own: freezing this one's heap would keep its later garbage cycles."""

from __future__ import annotations

import subprocess
import sys

import orjson

from chainrelay import defaults

PROBE = """
import gc, json
held = [[i] for i in range(1000)]  # containers built while starting, alive after it
from chainrelay.collector import settle_startup_heap
before = gc.get_threshold()
settle_startup_heap()
print(json.dumps({"before": before, "after": gc.get_threshold(),
                  "frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""


def test_what_starting_built_is_frozen_and_the_serving_thresholds_are_set() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, check=True, timeout=60
    )
    got = orjson.loads(done.stdout)
    assert got["before"] == [700, 10, 10]  # Python's own, until the node sets its
    assert tuple(got["after"]) == defaults.GC_THRESHOLDS
    assert got["frozen"] > 1000  # the probe's lists among them
    assert got["tracked"] < 100, got  # nothing left for a collection to walk
