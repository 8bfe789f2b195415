"""Integers from the wire, bounded before they reach the batch log, on a real ingress node.

The log is sqlite, whose integers are signed 64-bit: ``GET /feed/range?from=2^63`` once
reached it and was answered 500 (an OverflowError). Every seq, count and position a client
sends (the range query, a feed child's hello) is now checked for type and range where it
is parsed: out of range is a 400 with a JSON reason, or the feed's own refusal (close
4400), and the node serves on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from chainrelay.tree.session import CLOSE_BAD_HELLO, POSITION_END
from tests.lab.batches import API_KEY, CHAIN_ID, SEQUENCER_HEX, STREAM, batches_toml
from tests.lab.procs import Relay
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

TIMEOUT = 20 * SECOND
OUT_OF_RANGE = [
    f"from={POSITION_END}",
    f"from={2**64}",
    f"from={10**30}",
    "from=" + "9" * 5000,
    "from=-1",
    "from=1_0",
    "from=0&limit=0",
    f"from=0&limit={POSITION_END}",
    "from=0&from=1",
]


async def test_out_of_range_integers_are_refused_and_the_node_serves_on(
    anvil_factory: Callable[..., Awaitable[Any]],
    relay_factory: Callable[..., Awaitable[Relay]],
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=CHAIN_ID, block_time=1.0)
    node = await relay_factory(
        [anvil.url],
        batches_toml(SEQUENCER_HEX, log=tmp_path / "ingress.sqlite", api_keys=[API_KEY]),
        name="ingress",
    )
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for query in OUT_OF_RANGE:
            url = f"{node.url}/feed/range?stream={STREAM}&{query}"
            async with s.get(url) as r:
                body = await r.read()
                assert r.status == 400, (query[:40], r.status, body[:200])
                assert orjson.loads(body)["error"], query[:40]
        # The top of the range is a seq like any other: nothing there yet (the log's
        # ``from + limit`` must not overflow either).
        async with s.get(f"{node.url}/feed/range?stream={STREAM}&from={POSITION_END - 1}") as r:
            assert (r.status, await r.read()) == (200, b"")
    for hello in (
        {"stream": STREAM, "from": POSITION_END},
        {"stream": STREAM, "last": 2**64},
        {"stream": "é" * 120},  # its refusal's reason is longer than a close frame takes
    ):
        msg = {"type": "hello", "version": 1, "streams": [hello]}
        async with connect(f"{node.ws_url}/feed", open_timeout=TIMEOUT) as ws:
            await ws.send(json.dumps(msg))  # orjson writes no integer past 64 bits
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_BAD_HELLO
    assert (await node.health())["status"] in ("ok", "degraded")
    log = node.log_path.read_text()
    assert "Traceback" not in log and "OverflowError" not in log, log[-3000:]
