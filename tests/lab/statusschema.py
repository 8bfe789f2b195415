"""The schema of ``/status.json`` (``chainrelay/status/board.py``, version 1), checked key
by key: what the status page reads, each with the types it may hold. A key added to the
document without a place here fails the check, so the page, this schema and the document
move together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_INT = (int, type(None))
OPT_STR = (str, type(None))
OPT_BOOL = (bool, type(None))

NODE = {
    "name": (str,),
    "role": (str,),
    "region": OPT_STR,
    "ingress": (bool,),
    "worker": OPT_INT,
    "ok": (bool,),
}
CHAIN = {
    "chainId": (int,),
    "profile": OPT_STR,
    "head": OPT_INT,
    "finalized": OPT_INT,
    "fresh": (bool,),
    "lagBlocks": OPT_INT,
}
PARENT = {
    "name": (str,),
    "region": (str,),
    "url": (str,),
    "linked": (bool,),
    "connected": (bool,),
    "rttMs": OPT_NUM,
    "up": (bool,),
    "failures": (int,),
    "frames": (int,),
    "firstCopies": (int,),
    "lastError": OPT_STR,
}
CHILD = {
    "name": (str,),
    "address": (str,),
    "relay": (bool,),
    "proven": OPT_STR,
    "streams": (list,),
    "rttMs": OPT_NUM,
}
STREAM = {
    "name": (str,),
    "kind": (str,),
    "newest": OPT_INT,
    "children": (int,),
    "frames": (int,),
    "framesPerSecond": OPT_NUM,
    "latencyMs": OPT_NUM,
    "bySource": (dict,),
    "confirmed": OPT_INT,
}
UPSTREAM = {
    "name": (str,),
    "url": (str,),
    "role": (str,),
    "state": (str,),
    "latest": OPT_INT,
    "latencyMs": NUM,
    "calls": (int,),
    "errors": (int,),
    "consecutiveErrors": (int,),
    "slowedSeconds": NUM,
    "routing": (str,),
    "weight": (int,),
    "maxRps": NUM,
    "maxConcurrency": (int,),
    "inFlight": (int,),
    "flagged": (str, type(None)),
}
SUBSCRIPTIONS = {"byKind": (dict,), "total": (int,), "filters": (int,)}
CACHE = {"entries": (int,), "bytes": (int,), "maxBytes": (int,), "evictions": (int,)}
SERIES = {
    "t": (list,),
    "callsPerSecond": (list,),
    "hitRatio": (list,),
    "upstreamPerCall": (list,),
    "framesPerSecond": (dict,),
    "latencyMs": (dict,),
}
TOP = {
    "version": (int,),
    "time": NUM,
    "uptimeSeconds": NUM,
    "node": (dict,),
    "chain": (dict,),
    "summary": (dict,),
    "parents": (list,),
    "children": (dict,),
    "streams": (list,),
    "upstreams": (list,),
    "subscriptions": (dict,),
    "cache": (dict, type(None)),
    "series": (dict,),
}


def _keys(doc: Any, spec: Mapping[str, tuple[type, ...]], where: str) -> None:
    assert isinstance(doc, dict), f"{where}: an object expected, got {doc!r}"
    assert set(doc) == set(spec), f"{where}: keys {sorted(doc)} != {sorted(spec)}"
    for key, types in spec.items():
        value = doc[key]
        # bool is an int to Python; a flag where a number belongs (or back) is wrong.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        assert ok, f"{where}.{key}: {value!r} is not {types}"


def check_status(doc: Any) -> None:
    """Fail with the path of the first key that breaks the schema."""
    _keys(doc, TOP, "$")
    assert doc["version"] == 1
    _keys(doc["node"], NODE, "$.node")
    _keys(doc["chain"], CHAIN, "$.chain")
    summary = doc["summary"]
    base = {
        "seconds": NUM,
        "callsPerSecond": OPT_NUM,
        "hitRatio": OPT_NUM,
        "upstreamPerCall": OPT_NUM,
    }
    if "totals" in summary:
        _keys(summary, {**base, "totals": (dict,)}, "$.summary")
        totals = {"calls": (int,), "hits": (int,), "misses": (int,), "upstreamCalls": (int,)}
        _keys(summary["totals"], totals, "$.summary.totals")
    else:
        _keys(summary, base, "$.summary")
    for r in ("hitRatio", "upstreamPerCall"):
        assert summary[r] is None or summary[r] >= 0, f"$.summary.{r}: {summary[r]}"
    assert summary["hitRatio"] is None or summary["hitRatio"] <= 1
    for i, p in enumerate(doc["parents"]):
        _keys(p, PARENT, f"$.parents[{i}]")
    children = doc["children"]
    _keys(children, {"count": (int,), "relays": (int,), "listed": (list,)}, "$.children")
    assert len(children["listed"]) <= children["count"]
    for i, c in enumerate(children["listed"]):
        _keys(c, CHILD, f"$.children.listed[{i}]")
    for i, st in enumerate(doc["streams"]):
        _keys(st, STREAM, f"$.streams[{i}]")
        assert st["kind"] in ("blocks", "batches")
        for source, got in st["bySource"].items():
            _keys(got, {"firstCopies": (int,), "latencyMs": NUM}, f"$.streams[{i}].{source}")
    for i, u in enumerate(doc["upstreams"]):
        _keys(u, UPSTREAM, f"$.upstreams[{i}]")
        assert u["state"] in ("in", "out", "cordoned"), u["state"]
        assert u["role"] in ("parent", "node"), u["role"]
    _keys(doc["subscriptions"], SUBSCRIPTIONS, "$.subscriptions")
    if doc["cache"] is not None:
        _keys(doc["cache"], CACHE, "$.cache")
    series = doc["series"]
    _keys(series, SERIES, "$.series")
    n = len(series["t"])
    for key in ("callsPerSecond", "hitRatio", "upstreamPerCall"):
        assert len(series[key]) == n, f"$.series.{key}: {len(series[key])} points, {n} times"
    for key in ("framesPerSecond", "latencyMs"):
        for name, points in series[key].items():
            assert len(points) == n, f"$.series.{key}.{name}: {len(points)} points, {n} times"
    assert series["t"] == sorted(series["t"])
