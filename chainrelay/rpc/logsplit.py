"""eth_getLogs over a wide range, asked as chunks: where the chunks fall, how their answers
are joined, and which refusals mean "ask for less".

Providers refuse a log query past a few thousand blocks (or past a count of logs), and the
refusal reaching the client unchanged is the most common complaint about RPC proxies. A
range wider than ``[logs] split_blocks`` is asked as chunks instead (``RpcService``'s
``_split_logs`` drives them), each a plain eth_getLogs of its own:

* Chunks are aligned to multiples of the chunk size (``chunks``): two scans that overlap
  ask the same inner chunks, so a finalized chunk read once (cached by its exact range, for
  ever) serves every later scan that covers it, whatever its own bounds.
* The answer is the chunks' raw answers spliced in block order (``splice``): the logs of a
  range come ordered by block then log index, chunks do not overlap, so the bytes are
  those one call over the whole range returns. No log is decoded or encoded again.
* A chunk refused as too large (``too_large``: a provider's wording from ``TOO_LARGE``)
  is asked again as two halves (``halves``), down to one block.

Sans-I/O: ranges in, ranges out; bytes in, bytes out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class SplitRule:
    """How one node splits: ``blocks`` a chunk's blocks (a range wider is split; 0: never
    split), ``concurrency`` the chunk calls one query has under way at once."""

    blocks: int
    concurrency: int


# Lower-cased fragments of the refusals that mean "this range or answer is too large: ask
# for less", as providers and nodes word them. Any other error is the upstream's answer
# and goes back as it is.
TOO_LARGE: tuple[str, ...] = (
    # geth's own cap on results (eth/filters, also Infura, Alchemy):
    # "query returned more than 10000 results"
    "query returned more than",
    # BSC nodes and the public BSC/Arbitrum endpoints (publicnode, bnbchain):
    # "exceed maximum block range: 5000"
    "exceed maximum block range",
    # Alchemy: "Log response size exceeded. You can make eth_getLogs requests with up to a
    # 2K block range and no limit on the response size ..."
    "log response size exceeded",
    # Frontier-based nodes, Ankr: "block range is too wide (maximum 1024)"
    "block range is too wide",
    # QuickNode and others: "eth_getLogs is limited to a 10,000 range", "range is too large"
    "is limited to a",
    "range is too large",
    "block range too large",
    "requested range too large",
    # dRPC: "ranges over 10000 blocks are not supported on freetier"
    "ranges over",
    # Polygon-derived nodes: "block range exceeds configured limit"
    "block range exceeds",
    # Chainstack/Erigon: "query exceeds max results 20000", "exceeds max block range"
    "query exceeds max",
    "max block range",
    # Besu: "Requested range exceeds maximum range limit"
    "exceeds maximum range",
    # This node's own answer guard (rpc/logguards.py), met by a parent relay's answer.
    "response size exceeded",
)


def too_large(error: bytes | None) -> bool:
    """Whether the JSON-RPC error object ``error`` (raw) refuses a range as too large."""
    if error is None:
        return False
    try:
        obj = orjson.loads(error)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(obj, dict):
        return False
    text = str(obj.get("message", "")).lower()
    data = obj.get("data")
    if isinstance(data, str):
        text += " " + data.lower()
    return any(fragment in text for fragment in TOO_LARGE)


def chunks(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi] as ranges of at most ``size`` blocks, aligned to multiples of ``size``
    (the first and last may be shorter), in order."""
    out: list[tuple[int, int]] = []
    start = lo
    while start <= hi:
        end = min(hi, (start // size + 1) * size - 1)
        out.append((start, end))
        start = end + 1
    return out


def halves(lo: int, hi: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """[lo, hi] in two; None for one block (it cannot be asked for less)."""
    if hi <= lo:
        return None
    mid = (lo + hi) // 2
    return (lo, mid), (mid + 1, hi)


def chunk_params(flt: dict[str, Any], lo: int, hi: int) -> list[Any]:
    """The params of eth_getLogs over [lo, hi] with the rest of the filter ``flt``."""
    return [{**flt, "fromBlock": hex(lo), "toBlock": hex(hi)}]


def splice(parts: list[bytes]) -> bytes | None:
    """The JSON arrays ``parts`` (raw) as one array of their elements in order, their
    bytes untouched; None when a part is not an array."""
    inner: list[bytes] = []
    for part in parts:
        body = part.strip()
        if len(body) < 2 or body[0] != 0x5B or body[-1] != 0x5D:  # '[' ... ']'
            return None
        elements = body[1:-1].strip()
        if elements:
            inner.append(elements)
    return b"[" + b",".join(inner) + b"]"
