"""Run every benchmark, one after the other, and rewrite RESULTS.md from their output.

    python -m benchmarks.run_all [--no-profile]

Each script runs in its own process with a time limit; one that fails leaves a note in
its section instead of numbers, and the others still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks import common

# Per-script ceiling, above each script's own budget: a hung script is killed, not waited on.
LIMIT_SECONDS = {
    "cache_hit": 200,
    "miss_overhead": 180,
    "upstream_ratio": 180,
    "subscribers": 330,
    "tree_bytes": 270,
    "tree_hop": 450,
    "tree_e2e": 390,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-profile", action="store_true", help="skip cache_hit.py's py-spy sample")
    args = ap.parse_args(argv)
    common.RESULTS.write_text(common.HEADER)
    failed = 0
    for name in common.SECTIONS:
        cmd = [sys.executable, str(common.HERE / f"{name}.py")]
        if name == "cache_hit" and not args.no_profile:
            cmd.append("--profile")
        print(f"== {name}", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=common.ROOT)
        try:
            rc = proc.wait(LIMIT_SECONDS[name])
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            common.stop_process(proc)
        elapsed = time.monotonic() - started
        print(f"== {name}: exit {rc} after {elapsed:.0f} s", flush=True)
        if rc != 0:
            failed += 1
            common.write_section(
                name,
                f"## `{name}.py`\n\nFailed (exit {rc} after {elapsed:.0f} s) on "
                f"{common.machine_line(common.machine())}; see its output.",
            )
    print(f"wrote {common.RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
