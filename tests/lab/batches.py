"""Batch-stream nodes for system tests: the ``[batches]`` TOML of an ingress node or a
relay (passed as ``relay_factory``'s extra text), what a node's range endpoint holds read
back and checked end to end, and its push counters.

    ingress = await relay_factory([anvil.ws_url], batches_toml(SEQ, log=tmp / "a.sqlite",
                                                               api_keys=[KEY]), name="a")
    relay = await relay_factory([anvil.ws_url], batches_toml(SEQ, parents=[ingress]))
    got = await read_range(relay, SEQ, 0, 1000)     # {seq: payload}, each frame checked
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aiohttp

from chainrelay.wire.batchframe import decode_range, open_frame
from chainrelay.wire.feedframe import decode
from tests.lab.procs import Relay, fetch_metrics

STREAM = "arbitrum/batches"
CHAIN_ID = 42161  # anvil_factory(chain_id=CHAIN_ID): Arbitrum One's
# Larger than any frame a lab node sends (payload limit 1 MiB, plus the frame's header).
MAX_FRAME = 2 * 1024 * 1024


def batches_toml(
    sequencer: str,
    *,
    log: Path | None = None,
    api_keys: Sequence[str] = (),
    parents: Sequence[Relay] = (),
    settings: str = "",
) -> str:
    """``[batches]`` with one stream (``STREAM`` of ``CHAIN_ID``, signed by ``sequencer``)
    and, for a relay, ``[tree]`` with ``parents`` (each its own region). ``log`` makes
    the node an ingress; ``settings`` are more ``[batches]`` lines, e.g. limits."""
    lines = []
    if parents:
        lines.append("[tree]")
        for i, parent in enumerate(parents):
            lines += [
                "",
                "[[tree.parents]]",
                f'name = "p{i}"',
                f'region = "p{i}"',
                f'url = "{parent.ws_url}/feed"',
            ]
        lines.append("")
    lines.append("[batches]")
    if log is not None:
        lines.append(f'log = "{log}"')
    if api_keys:
        lines.append("api_keys = [" + ", ".join(f'"{k}"' for k in api_keys) + "]")
    if settings:
        lines.append(settings)
    lines += [
        "",
        "[[batches.streams]]",
        f'name = "{STREAM}"',
        f"chain_id = {CHAIN_ID}",
        f'sequencers = ["{sequencer}"]',
    ]
    return "\n".join(lines) + "\n"


async def range_status(node: Relay, start: int, limit: int = 1) -> tuple[int, list[bytes]]:
    """``GET /feed/range`` of ``node`` from ``start``: the status and, on 200, the frames."""
    params = {"stream": STREAM, "from": str(start), "limit": str(limit)}
    async with (
        aiohttp.ClientSession() as s,
        s.get(node.url + "/feed/range", params=params) as r,
    ):
        body = await r.read()
        return r.status, decode_range(body, MAX_FRAME) if r.status == 200 else []


async def read_range(node: Relay, sequencer: str, start: int, end: int) -> dict[int, bytes]:
    """Batches ``start .. end-1`` from the node's range endpoint, in pages, each frame
    checked: consecutive seqs, this stream and chain, signed by ``sequencer``. Fails when
    a page is empty or refused before ``end``."""
    got: dict[int, bytes] = {}
    at = start
    while at < end:
        status, frames = await range_status(node, at, min(1000, end - at))
        assert status == 200 and frames, f"range from {at} of {node.url}: {status}"
        for raw in frames:
            frame = decode(raw, MAX_FRAME)
            assert frame.position == at and frame.stream == STREAM, (frame.position, at)
            address, payload = open_frame(frame, MAX_FRAME)
            assert "0x" + address.hex() == sequencer.lower(), f"signer of {at}"
            got[at] = payload
            at += 1
    return got


async def pushes(node: Relay) -> dict[str, float]:
    """The node's ``chainrelay_batch_pushes_total`` by outcome (summed over streams)."""
    out: dict[str, float] = {}
    for key, value in (await fetch_metrics(node.url)).items():
        if key.startswith("chainrelay_batch_pushes_total{"):
            outcome = key.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = out.get(outcome, 0.0) + value
    return out
