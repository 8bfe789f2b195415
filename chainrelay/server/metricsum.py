"""One node's Prometheus text from its workers' (``serve --workers N``): sans-I/O, text in,
text out.

Each worker keeps its own registry; the admin listener's ``/metrics`` (worker 0) gathers
the others' expositions and sums them series by series, so a dashboard sees one node
whatever N. Counters, histograms and summaries add up. A gauge adds up only when it
counts what each worker holds (connections, cache bytes, subscriptions); any other gauge
(the head block, an upstream's health, ``chainrelay_worker``) says one thing about the node,
and the first exposition's value (worker 0's own, the feeder that follows the chain) is
kept, any series only another worker has included. ``_created`` samples are timestamps:
the first one is kept.
"""

from __future__ import annotations

from collections.abc import Iterable

# Gauges that count what each worker holds: the node's value is their sum.
ADDITIVE_GAUGES = frozenset(
    {
        "chainrelay_connections",
        "chainrelay_cache_bytes",
        "chainrelay_subscriptions",
        "chainrelay_log_store_bytes",
        "chainrelay_feed_children",
        "chainrelay_shared_cache_waiting",
        "chainrelay_access_log_buffered_bytes",
    }
)
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created", "_gsum", "_gcount", "_info")


def _family(sample: str, types: dict[str, str]) -> str:
    """The family a sample name belongs to (``x_total`` -> ``x``), as its TYPE line named it."""
    if sample in types:
        return sample
    for suffix in _SUFFIXES:
        if sample.endswith(suffix) and sample[: -len(suffix)] in types:
            return sample[: -len(suffix)]
    return sample


def sum_expositions(texts: Iterable[str]) -> str:
    """The expositions ``texts`` (the first one this process's own) as one: see the module's
    docstring. Lines that are not samples or HELP/TYPE comments are dropped."""
    comments: dict[str, list[str]] = {}  # family -> its HELP and TYPE lines, first seen
    types: dict[str, str] = {}
    series: dict[str, float] = {}  # sample key ("name{labels}") -> value
    family_of: dict[str, str] = {}
    for text in texts:
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    lines = comments.setdefault(parts[2], [])
                    if len(lines) < 2 and line not in lines:
                        lines.append(line)
                    if parts[1] == "TYPE" and len(parts) == 4:
                        types.setdefault(parts[2], parts[3])
                continue
            if not line or line.startswith("#"):
                continue
            key, _, raw = line.rpartition(" ")
            try:
                value = float(raw)
            except ValueError:
                continue
            name = key.split("{", 1)[0]
            family = family_of.get(key)
            if family is None:
                family = family_of[key] = _family(name, types)
            if key not in series:
                series[key] = value
            elif _adds_up(name, family, types):
                series[key] += value
    out: list[str] = []
    by_family: dict[str, list[str]] = {}
    for key, family in family_of.items():
        by_family.setdefault(family, []).append(key)
    for family, keys in by_family.items():
        out.extend(comments.get(family, ()))
        out.extend(f"{key} {_number(series[key])}" for key in keys)
    return "\n".join(out) + "\n"


def _adds_up(name: str, family: str, types: dict[str, str]) -> bool:
    if name.endswith("_created"):
        return False
    kind = types.get(family, "untyped")
    return kind != "gauge" or family in ADDITIVE_GAUGES


def _number(value: float) -> str:
    return repr(value) if value != int(value) or abs(value) >= 1e16 else f"{value:.1f}"
