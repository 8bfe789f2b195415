"""End-to-end delivery through a relay tree across emulated regions: what the nodes on a
path add to its link delays, per hop.

The tree (``tests/lab/tree.py`` in a ``RegionLab``: one network namespace per node, every
parent link through a delay link of its own round trip)::

    anvil + origin (eu) ──80 ms──► relay us ───30 ms──► leaf us1
                        └─150 ms─► relay asia ─30 ms──► leaf asia1

Each node has exactly one parent candidate, so each path is known. anvil mines a block
every ``--block-time`` seconds with a few transfers in it; a ``chainrelay subscribe``
process inside every node's namespace prints each block with its latency (its arrival
minus the frame's origin time stamp; every namespace shares the host clock). Per node:
the median latency over ``--blocks`` blocks, minus the one-way delays of the links on its
path (round trip / 2 each), is what the nodes and links added.

The floor: frames of the same size sent through delay links of the same delays chained
the same way, with no relay (delay-link processes on this host's loopback, a plain socket
at each end): what the user-space delay links alone cost on top of their nominal delays.
Delays are emulated in user space (this kernel has no ``netem``): each link is a Python
process holding every chunk for the one-way delay, so links add their own scheduling
delay, the more so on a loaded machine; the floor measures that.

    python -m benchmarks.tree_e2e [--blocks 20] [--block-time 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The lab's helpers live with the tests (``tests/lab``), one level above this folder.
from benchmarks import common
from chainrelay import devnet
from tests.lab.netns import RegionLab, read_ready, unavailable
from tests.lab.procs import Procs
from tests.lab.tree import Subscriber, Tree, TreeNode

BUDGET_SECONDS = 360
STREAM = "bsc/blocks"
# Round trips of the tree's links, ms (as in tests/system/test_tree_regions.py).
RTT_US, RTT_ASIA, RTT_LEAF = 80.0, 150.0, 30.0
# Probes and reconnects quick enough for a short run; one parent each, so no re-choosing.
TREE_EXTRA = {"probe_interval": 1.0, "retry_delay": 0.1, "retry_max": 1.0, "ping_interval": 1.0}
# Blocks every subscriber prints before the measured ones: links connected, caches warm.
WARMUP_BLOCKS = 3
# Transfers anvil mines into each block (devnet.traffic): blocks with a body, as on a chain.
TX_PER_BLOCK = 2
# Frames sent through each chain of delay links for the floor; their median.
FLOOR_FRAMES = 15
FLOOR_GAP = 0.05  # between floor frames, so they never queue behind each other
LINK_READY_SECONDS = 10.0
TREE_NODE_READY_SECONDS = 60.0


@dataclass
class Route:
    node: str
    hops: int
    one_way_ms: list[float]  # the links' one-way delays, origin first

    @property
    def delay(self) -> float:
        return sum(self.one_way_ms)


PATHS = [
    Route("origin", 0, []),
    Route("relayus", 1, [RTT_US / 2]),
    Route("relayasia", 1, [RTT_ASIA / 2]),
    Route("us1", 2, [RTT_US / 2, RTT_LEAF / 2]),
    Route("asia1", 2, [RTT_ASIA / 2, RTT_LEAF / 2]),
]


async def run_tree(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """Build the tree, collect each node's subscriber latencies (ms) per block."""
    procs = Procs()
    try:
        with RegionLab(procs) as lab, Tree(lab, tmp) as tree:
            anvil = await tree.chain("eu", block_time=args.block_time)
            stop = asyncio.Event()
            traffic = asyncio.create_task(devnet.traffic(anvil, stop, per_block=TX_PER_BLOCK))
            try:
                origin = tree.origin("origin", "eu", tree_extra=TREE_EXTRA)
                relayus = tree.node("relayus", "us", tree_extra=TREE_EXTRA)
                relayasia = tree.node("relayasia", "asia", tree_extra=TREE_EXTRA)
                us1 = tree.node("us1", "us", tree_extra=TREE_EXTRA)
                asia1 = tree.node("asia1", "asia", tree_extra=TREE_EXTRA)
                tree.parent(relayus, origin, RTT_US)
                tree.parent(relayasia, origin, RTT_ASIA)
                tree.parent(us1, relayus, RTT_LEAF)
                tree.parent(asia1, relayasia, RTT_LEAF)
                await tree.start(origin, timeout=TREE_NODE_READY_SECONDS)
                await tree.start(relayus, relayasia, timeout=TREE_NODE_READY_SECONDS)
                await tree.start(us1, asia1, timeout=TREE_NODE_READY_SECONDS)
                nodes: list[TreeNode] = [origin, relayus, relayasia, us1, asia1]
                subs: dict[str, Subscriber] = {
                    n.name: tree.subscribe(n, STREAM, label=f"sub-{n.name}") for n in nodes
                }
                want = WARMUP_BLOCKS + args.blocks
                timeout = (want + 10) * args.block_time * 3
                for sub in subs.values():
                    await sub.wait_count(want, timeout)
                return {
                    name: [
                        b["latency_ms"]
                        for b in sub.blocks[WARMUP_BLOCKS:want]
                        if b["latency_ms"] is not None
                    ]
                    for name, sub in subs.items()
                }
            finally:
                stop.set()
                await traffic
    finally:
        procs.close()


def floor(one_way_ms: list[float], size: int) -> list[float]:
    """Milliseconds for ``size`` bytes to cross delay links of ``one_way_ms`` chained on
    this host's loopback, one frame at a time (each a fresh write, like a frame)."""
    if not one_way_ms:
        return []
    sink = socket.create_server(("127.0.0.1", 0))
    links: list[subprocess.Popen[bytes]] = []
    conns: list[socket.socket] = []
    try:
        to = sink.getsockname()[1]
        for delay in reversed(one_way_ms):  # the last link first: each one needs its next
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.lab.delay_link", "--listen", "127.0.0.1:0",
                 "--to", f"127.0.0.1:{to}", "--delay-ms", str(delay),
                 "--max-seconds", str(BUDGET_SECONDS)],
                stdout=subprocess.PIPE,
                cwd=common.ROOT,
            )  # fmt: skip
            links.append(proc)
            to = read_ready(proc, LINK_READY_SECONDS)
        sender = socket.create_connection(("127.0.0.1", to))
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(sender)
        sink.settimeout(LINK_READY_SECONDS)
        # The links connect onward only once data flows: a first byte opens the chain.
        sender.sendall(b"!")
        receiver, _ = sink.accept()
        conns.append(receiver)
        receiver.settimeout(LINK_READY_SECONDS)
        receiver.recv(1)
        data = b"x" * size
        out = []
        for _ in range(FLOOR_FRAMES):
            t0 = time.time()
            sender.sendall(data)
            got = 0
            while got < size:
                chunk = receiver.recv(1 << 20)
                if not chunk:
                    raise RuntimeError("delay link closed")
                got += len(chunk)
            out.append((time.time() - t0) * 1000)
            time.sleep(FLOOR_GAP)
        return out
    finally:
        for s in (*conns, sink):
            s.close()
        for proc in links:
            common.stop_process(proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--block-time", type=float, default=1.0)
    ap.add_argument("--frame-bytes", type=int, default=4000, help="floor frame size")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    reason = unavailable()
    if reason:
        raise SystemExit(f"no region lab here: {reason}")
    common.budget(BUDGET_SECONDS)
    m = common.machine()
    with tempfile.TemporaryDirectory(prefix="chainrelay-e2e-") as tmp:
        lat = asyncio.run(run_tree(args, Path(tmp)))
    floors = {p.node: floor(p.one_way_ms, args.frame_bytes) for p in PATHS}

    med = common.median
    rows = []
    over: dict[str, float] = {}
    for p in PATHS:
        got = lat.get(p.node, [])
        fl = floors[p.node]
        floor_ms = med(fl) if fl else 0.0
        over[p.node] = med(got) - floor_ms if got else float("nan")
        rows.append(
            [
                p.node,
                str(p.hops),
                " + ".join(f"{d:.0f}" for d in p.one_way_ms) or "0",
                str(len(got)),
                f"{med(got):.1f}" if got else "-",
                f"{common.quantile(got, 0.9):.1f}" if got else "-",
                f"{med(got) - p.delay:.1f}" if got else "-",
                f"{floor_ms:.1f}" if fl else "-",
                f"**{over[p.node]:.1f}**",
            ]
        )
    per_hop = []
    for leaf, relay in (("us1", "relayus"), ("asia1", "relayasia")):
        per_hop.append(
            f"{relay} (hop 1): {over[relay] - over['origin']:.1f} ms; {leaf} (hop 2): "
            f"{over[leaf] - over[relay]:.1f} ms"
        )
    body = "\n\n".join(
        [
            "## End to end through a region tree (`tree_e2e.py`)",
            common.machine_line(m),
            "anvil + origin in eu; relay us (80 ms round trip to the origin), relay asia "
            "(150 ms); a leaf under each (30 ms); each node in its own network namespace, one "
            "parent each; a `chainrelay subscribe` beside every node. **Delays are emulated in "
            "user space** (this kernel has no netem): each link is a Python process holding "
            f"each chunk for half its round trip. anvil mines a block every "
            f"{args.block_time:.1f} s with {TX_PER_BLOCK} transfers; {args.blocks} blocks "
            f"after {WARMUP_BLOCKS} of warm-up. *latency*: the subscriber's arrival minus the "
            "frame's origin time stamp (one host clock). *floor*: "
            f"{args.frame_bytes}-byte writes through delay links of the same delays chained "
            f"the same way, no relay (median of {FLOOR_FRAMES}). ms.",
            common.table(
                [
                    "node",
                    "relay hops",
                    "one-way link delays",
                    "blocks",
                    "latency p50",
                    "latency p90",
                    "p50 - link delays",
                    "floor (links alone)",
                    "p50 - floor",
                ],
                rows,
            ),
            "What each hop adds (p50 - floor, less its parent's): " + "; ".join(per_hop) + ". "
            "The origin row is the origin's own subscriber: frame made to frame read beside "
            "it, no link.",
        ]
    )
    print(body)
    if not args.no_write:
        common.write_section("tree_e2e", body)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
