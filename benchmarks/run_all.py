"""Run every benchmark, one after the other, and rewrite RESULTS.md from their output.

    python -m benchmarks.run_all [--no-profile]

Each script runs in its own process with a time limit; one that fails leaves a note in
its section instead of numbers, and the others still run. The scripts with a section in
RESULTS.md run first, in its order (``common.SECTIONS``), then the others (``scale_out``
rewrites SCALE_OUT.md, ``head_delay`` prints only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks import common

# Per-script ceiling, 30 s above each script's own budget (``common.budget``) at its
# defaults: a hung script is killed, not waited on.
LIMIT_SECONDS = {
    "cache_hit": 450,
    "miss_overhead": 180,
    "upstream_ratio": 180,
    "dapp_burst": 415,
    "logs_windows": 530,
    "intake_lag": 390,
    "subscribers": 330,
    "tree_bytes": 270,
    "tree_hop": 630,
    "tree_e2e": 390,
    "batch_ack": 1530,
    "batch_e2e": 450,
    "abuse": 225,
    "nitro_feed": 150,
    "scale_out": 312,
    "head_delay": 170,
}
# The benchmarks in the order they run.
SCRIPTS = (*common.SECTIONS, "scale_out", "head_delay")
# Processes the benchmarks start (floors, a frame source, a forwarder, an in-process
# measurement, a relay launcher with a loop-lag probe); each is run by the benchmark that
# needs it, never on its own.
HELPERS = frozenset(
    (
        "floor_server",
        "miss_floor",
        "batch_floor",
        "hop_floor",
        "frame_source",
        "hot_path",
        "lag_probe",
    )
)


def run(name: str, profile: bool, options: tuple[str, ...] = ()) -> int:
    """Run benchmark ``name`` as it is documented (with ``options``: a variant of it),
    within its ceiling; its exit status (-1 when it was stopped at the ceiling)."""
    args = ["--profile"] if name == "cache_hit" and profile else [*options]
    proc = common.spawn(f"benchmarks.{name}", *args)
    try:
        return proc.wait(LIMIT_SECONDS[name])
    except subprocess.TimeoutExpired:
        return -1
    finally:
        common.stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-profile", action="store_true", help="skip cache_hit.py's py-spy sample")
    args = ap.parse_args(argv)
    common.RESULTS.write_text(common.HEADER)
    failed = 0
    runs = [
        (section, script, options)
        for name in SCRIPTS
        for section, script, options in [
            (name, name, ()),
            *((v, of, o) for v, (of, o) in common.VARIANTS.items() if of == name),
        ]
    ]
    for name, script, options in runs:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        rc = run(script, not args.no_profile, options)
        elapsed = time.monotonic() - started
        print(f"== {name}: exit {rc} after {elapsed:.0f} s", flush=True)
        if rc == 0:
            continue
        failed += 1
        if name in common.SECTIONS or name in common.VARIANTS:
            common.write_section(
                name,
                f"## `{name}.py`\n\nFailed (exit {rc} after {elapsed:.0f} s) on "
                f"{common.machine_line(common.machine())}; see its output.",
            )
    print(f"wrote {common.RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
