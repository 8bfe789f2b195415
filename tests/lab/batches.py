"""Batch-stream nodes for system tests: the lab's sequencer and its batches, the
``[batches]`` TOML of an ingress node or a relay (passed as ``relay_factory``'s extra
text), what a node's range endpoint holds read back and checked end to end, what a
subscription yields read and checked, and a node's push counters.

    ingress = await relay_factory([anvil.ws_url], batches_toml(SEQ, log=tmp / "a.sqlite",
                                                               api_keys=[KEY]), name="a")
    relay = await relay_factory([anvil.ws_url], batches_toml(SEQ, parents=[ingress]))
    got = await read_range(relay, SEQ, 0, 1000)     # {seq: payload}, each frame checked

or, for the lab's sequencer, all at once (anvil, ingress nodes, relays linked to them):

    lab = await start_ingress(anvil_factory, relay_factory, tmp_path, relays=1)
    ingress, relay = lab.ingresses[0], lab.relays[0]
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from chainrelay.batches.frame import decode_range, open_frame
from chainrelay.clients.batchsubscriber import FeedBatch
from chainrelay.clients.publisher import generated_payload
from chainrelay.tree.frame import Signer, decode, keccak
from tests.lab.chain import metric
from tests.lab.procs import Relay, fetch_metrics, until
from tests.lab.timing import SECOND

STREAM = "arbitrum/batches"
CHAIN_ID = 42161  # anvil_factory(chain_id=CHAIN_ID): Arbitrum One's
# Larger than any frame a lab node sends (payload limit 1 MiB, plus the frame's header).
MAX_FRAME = 2 * 1024 * 1024
# The lab's sequencer: the stream's one signer, pushing with the ingress's API key.
SEQUENCER_KEY = keccak(b"lab batch sequencer")
SEQUENCER_HEX = "0x" + Signer(SEQUENCER_KEY).address.hex()
API_KEY = "lab-sequencer-key"
# Batches cross node processes and may be read through range requests that climb to an
# ingress: seconds on a loaded two-core machine, not milliseconds.
READ_TIMEOUT = 30 * SECOND


def payload_of(seq: int, size: int = 1000) -> bytes:
    """Batch ``seq`` of the lab's stream: ``size`` bytes that differ per batch and that lz4
    cannot shrink, like a compressed batch."""
    return generated_payload(2, seq, size)


def streams_toml(sequencer: str = SEQUENCER_HEX) -> str:
    """``[[batches.streams]]``: ``STREAM`` of ``CHAIN_ID``, signed by ``sequencer``; to
    append to a node's TOML that has no other ``[batches]`` keys."""
    return (
        f'\n[[batches.streams]]\nname = "{STREAM}"\nchain_id = {CHAIN_ID}\n'
        f'sequencers = ["{sequencer}"]\n'
    )


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
    return "\n".join(lines) + "\n" + streams_toml(sequencer)


@dataclass(frozen=True, slots=True)
class IngressLab:
    """What ``start_ingress`` started."""

    anvil: Any  # the chain's anvil, each node's upstream
    ingresses: list[Relay]
    relays: list[Relay]


async def start_ingress(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
    *,
    names: Sequence[str] = ("ingress",),
    settings: str = "",
    relays: int = 0,
) -> IngressLab:
    """Anvil as ``CHAIN_ID``'s chain; an ingress node per name in ``names`` for the lab's
    sequencer (its durable log ``tmp_path/NAME.sqlite``, ``API_KEY``, ``settings`` as more
    ``[batches]`` lines); and ``relays`` relays whose parents they all are, returned once
    every ingress counts them all as children."""
    anvil = await anvil_factory(chain_id=CHAIN_ID, block_time=1.0)
    ingresses = [
        await relay_factory(
            [anvil.ws_url],
            batches_toml(
                SEQUENCER_HEX, log=tmp_path / f"{name}.sqlite", api_keys=[API_KEY],
                settings=settings,
            ),
            name=name,
        )
        for name in names
    ]  # fmt: skip
    relay_nodes = [
        await relay_factory(
            [anvil.ws_url],
            batches_toml(SEQUENCER_HEX, parents=ingresses),
            name="relay" if relays == 1 else f"relay{i}",
        )
        for i in range(relays)
    ]
    if relay_nodes:

        async def linked() -> bool:
            return all([await children(node) == relays for node in ingresses])

        await until(linked, READ_TIMEOUT, "every relay linked to every ingress")
    return IngressLab(anvil, ingresses, relay_nodes)


async def children(node: Relay) -> float:
    """How many feed children ``node`` serves ``STREAM`` to."""
    return metric(await fetch_metrics(node.url), "chainrelay_feed_children", stream=STREAM)


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


async def read_batches(batches: AsyncIterator[FeedBatch], count: int) -> list[FeedBatch]:
    """The next ``count`` batches of a subscription's iterator (taken once: ``aiter``),
    within ``READ_TIMEOUT``."""
    got: list[FeedBatch] = []
    async with asyncio.timeout(READ_TIMEOUT):
        async for b in batches:
            got.append(b)
            if len(got) == count:
                break
    return got


def check_batches(got: list[FeedBatch], first: int, sequencer: str = SEQUENCER_HEX) -> None:
    """``got`` is batches ``first, first+1, ...`` as ``payload_of`` made them, signed by
    ``sequencer``, with a latency exactly when sent down a link."""
    assert [b.seq for b in got] == list(range(first, first + len(got)))
    for b in got:
        assert b.payload == payload_of(b.seq), f"batch {b.seq}"
        assert b.signer == sequencer
        assert (b.latency_ms is None) == b.fetched
