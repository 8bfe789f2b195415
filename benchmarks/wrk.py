"""wrk, the load of the cache-hit benchmarks (``cache_hit``, ``scale_out``): the mix as a
Lua script, the command line, and what a run printed.

wrk formats every request once, at start (the script's ``init``), and cycles through
them, so what it measures is the server, not the script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BIN = "/usr/bin/wrk"
CONNECTIONS = 32
THREADS = 2
# Ids per body in the rotation: every body is sent under several ids.
IDS_PER_BODY = 8

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass(frozen=True)
class Output:
    """The figures of one wrk run."""

    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx answers and socket errors


def lua_script(
    bodies: list[bytes], path: Path, *, string_ids: bool, headers: dict[str, str] | None = None
) -> None:
    """Write a wrk script cycling through every body under ``IDS_PER_BODY`` ids; with
    ``string_ids`` every third id is a string ("r3"), as some clients send; ``headers``:
    lines every request carries besides Content-Type (an API key)."""
    parts = []
    for b in bodies:
        text = b.decode()
        if '"id":0,' not in text:
            raise ValueError(f"unexpected body layout: {text}")
        parts.append("  [==[" + text.replace('"id":0,', '"id":__ID__,', 1) + "]==],")
    ids = "    if k % 3 == 0 then id = '\"r' .. k .. '\"' end\n" if string_ids else ""
    path.write_text(
        "local bodies = {\n" + "\n".join(parts) + "\n}\n"
        f"local ids_per_body = {IDS_PER_BODY}\n"
        """local reqs = {}
local i = 0
local headers = {["Content-Type"] = "application/json"}
"""
        + "".join(f'headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
        + """init = function(args)
  for k = 1, #bodies * ids_per_body do
    local id = tostring(k)
"""
        + ids
        + """    local body = bodies[(k - 1) % #bodies + 1]
    reqs[k] = wrk.format("POST", "/", headers, (string.gsub(body, "__ID__", id)))
  end
end
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
"""
    )


def command(url: str, script: Path, seconds: float) -> list[str]:
    """The wrk command line for one run of ``script`` against ``url``, latencies included."""
    return [
        *(BIN, "-t", str(THREADS), "-c", str(CONNECTIONS), "-d", f"{seconds:g}s"),
        *("--latency", "-s", str(script), url),
    ]


def printed(pattern: str, out: str) -> str:
    """The first group of ``pattern`` in wrk's output, which must have it."""
    found = re.search(pattern, out)
    assert found is not None, f"wrk printed nothing like {pattern!r}:\n{out}"
    return found.group(1)


def parse(out: str) -> Output:
    """What wrk printed, as figures."""
    rps = float(printed(r"Requests/sec:\s+([\d.]+)", out))
    requests = int(printed(r"(\d+) requests in", out))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: (.*)"):
        m = re.search(pattern, out)
        if m:
            errors += sum(int(x) for x in re.findall(r"\d+", m.group(1)))
    return Output(rps, requests, _ms(lat["50"]), _ms(lat["99"]), errors)


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"unexpected latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]
