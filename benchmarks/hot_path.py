"""The relay's own CPU per cache hit, without sockets.

A node runs in this process against ``--upstream``; its cache is warmed with the bodies
of ``--bodies`` (one JSON-RPC request per line), then its HTTP protocol object is fed the
same requests wrk sends (each body under several ids), its answers written to a transport
that drops them. Prints JSON: ``total_us`` (CPU per request, HTTP + JSON-RPC: after its
first answer at a head, a request is replayed), ``full_us`` (the same with replays off:
httptools-free parsing, then ``RpcService.handle``), ``rpc_us`` (``RpcService.handle``
alone), ``used`` (bodies answered from cache; by-number reads of blocks older than the
node's first head are not).

    python -m benchmarks.hot_path --upstream ws://127.0.0.1:8545 --bodies FILE

Run by ``cache_hit.py``; it leans on the node's internals (``Node``, ``HttpProtocol``),
so it runs in a process of its own that may fail without taking the benchmark down.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks.wrk import IDS_PER_BODY
from chainrelay import config as configmod
from chainrelay.app import Node
from chainrelay.server.http import HttpProtocol


class NullTransport(asyncio.Transport):
    """Takes the relay's answers and drops them."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def writelines(self, list_of_data: Any) -> None:
        for d in list_of_data:
            self.write(d)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


async def measure(upstream: str, bodies: list[bytes], seconds: float) -> dict[str, float]:
    cfg = configmod.quick([upstream], "127.0.0.1:0")
    # The chain does not move during the benchmark: keep the head fresh (see cache_hit.py).
    cfg.head.fresh_blocks = 1_000_000.0
    node = Node(cfg)
    await node.start()
    try:
        assert node.rpc is not None and node.server is not None
        for b in bodies:  # warm the cache
            got = node.rpc.handle(b)
            if not isinstance(got, bytes):
                await got
        hits = []
        for b in bodies:
            got = node.rpc.handle(b)
            if isinstance(got, bytes):
                hits.append(b)
            else:
                await got
        if not hits:
            raise RuntimeError("no body is answered from cache")
        requests = []
        for k in range(1, len(hits) * IDS_PER_BODY + 1):  # as the wrk script (wrk.lua_script)
            rid = b'"r%d"' % k if k % 3 == 0 else b"%d" % k
            b = hits[(k - 1) % len(hits)].replace(b'"id":0,', b'"id":' + rid + b",", 1)
            requests.append(
                b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(b), b)
            )
        routes = node.server.routes
        total, n = feed(node, requests, seconds)
        replayer, routes.replayer = routes.replayer, None  # no replays: the full path
        node.server.replays.clear()
        full, n_full = feed(node, requests, seconds / 2)
        routes.replayer = replayer
        handle = node.rpc.handle
        rounds = max(1, n // len(hits) // 4)
        t0 = time.process_time()
        for _ in range(rounds):
            for b in hits:
                handle(b)
        rpc = time.process_time() - t0
        return {
            "total_us": total / n * 1e6,
            "full_us": full / n_full * 1e6,
            "rpc_us": rpc / (rounds * len(hits)) * 1e6,
            "used": len(hits),
            "requests": n,
        }
    finally:
        await node.stop()


def feed(node: Node, requests: list[bytes], seconds: float) -> tuple[float, int]:
    """Feed ``requests`` in turn to a new connection for ``seconds``: (CPU seconds, count)."""
    assert node.server is not None
    conn = HttpProtocol(node.server)
    transport = NullTransport()
    conn.connection_made(transport)
    n = 0
    # CPU time, not wall time: a shared machine may take the CPU away meanwhile.
    cpu0 = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for r in requests:
            conn.data_received(r)
        n += len(requests)
    used = time.process_time() - cpu0
    conn.connection_lost(None)
    if transport.written == 0:
        raise RuntimeError("the node wrote no answer")
    return used, n


def main(argv: list[str] | None = None) -> int:
    import uvloop

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--bodies", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args(argv)
    bodies = [b for b in args.bodies.read_bytes().splitlines() if b.strip()]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(measure(args.upstream, bodies, args.seconds))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
