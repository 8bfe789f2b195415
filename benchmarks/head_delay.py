"""Head detection delay and head polls with an HTTP upstream.

anvil mines a block a second. One WebSocket subscriber on anvil's own ``newHeads`` and one
on the relay's ``newHeads`` stamp each block hash as it arrives, in this process's clock;
the delay of a block is the relay's stamp minus anvil's. The relay follows anvil over HTTP
(polling) through ``tests/lab/counting_proxy.py``, so the head tracker's
``eth_getBlockByNumber`` calls are counted on the wire. No client load: every such call is
the head tracker's.

    python -m benchmarks.head_delay [--blocks 40]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from typing import Any

import aiohttp
import orjson

from benchmarks import common

# Blocks skipped after both subscriptions are live: the relay's first heads are its start.
WARMUP_BLOCKS = 3


async def _stamp(url: str, stamps: dict[str, float], done: asyncio.Event) -> None:
    """Record the arrival time of every newHeads notification from ``url`` by block hash."""
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        await ws.send_bytes(
            orjson.dumps(
                {"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe", "params": ["newHeads"]}
            )
        )
        while not done.is_set():
            try:
                msg = await asyncio.wait_for(ws.receive(), 1.0)
            except TimeoutError:
                continue
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                return
            doc: Any = orjson.loads(msg.data)
            if doc.get("method") == "eth_subscription":
                head = doc["params"]["result"]
                stamps.setdefault(head["hash"], time.monotonic())


async def measure(anvil_ws: str, relay_ws: str, blocks: int) -> list[float]:
    at_node: dict[str, float] = {}
    at_relay: dict[str, float] = {}
    done = asyncio.Event()
    tasks = [
        asyncio.create_task(_stamp(anvil_ws, at_node, done)),
        asyncio.create_task(_stamp(relay_ws, at_relay, done)),
    ]
    deadline = time.monotonic() + (blocks + WARMUP_BLOCKS) * 1.5 + 10
    try:
        while len(at_node) < blocks + WARMUP_BLOCKS + 1:
            if time.monotonic() > deadline:
                raise RuntimeError("anvil did not mine the blocks in time")
            if any(t.done() for t in tasks):
                raise RuntimeError("a newHeads subscription ended")
            await asyncio.sleep(0.1)
    finally:
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    hashes = list(at_node)[WARMUP_BLOCKS : WARMUP_BLOCKS + blocks]
    return [at_relay[h] - at_node[h] for h in hashes if h in at_relay]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=40)
    args = ap.parse_args(argv)
    common.budget(int(60 + args.blocks * 2))
    with contextlib.ExitStack() as stack:
        anvil = common.start_anvil(block_time=1.0)
        stack.callback(anvil.stop)
        counter, counter_url = common.start_counter(anvil)
        stack.callback(common.stop_process, counter)
        relay = common.Relay(counter_url)
        stack.callback(relay.stop)
        relay.start()
        before = orjson.loads(common.http_get(counter_url + "/counts"))
        started = time.monotonic()
        relay_ws = relay.url.replace("http://", "ws://") + "/"
        delays = asyncio.run(measure(anvil.ws_url, relay_ws, args.blocks))
        seconds = time.monotonic() - started
        after = orjson.loads(common.http_get(counter_url + "/counts"))
    polls = after.get("eth_getBlockByNumber", 0) - before.get("eth_getBlockByNumber", 0)
    ms = sorted(1000 * d for d in delays)
    print(
        f"{len(ms)} of {args.blocks} blocks seen by the relay; delay after anvil's newHeads: "
        f"median {common.median(ms):.0f} ms, p90 {common.quantile(ms, 0.9):.0f} ms, "
        f"max {ms[-1]:.0f} ms; eth_getBlockByNumber on the wire {polls} in {seconds:.0f} s "
        f"({polls / seconds:.2f}/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
