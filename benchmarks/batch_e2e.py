"""Sequencer to last subscriber: how long a batch takes from the publisher's send to its
arrival at the last of the subscribers at the leaves of a region tree, minus the link
delays on its path; beside it, a subscriber on the ingress through one link of the same
delay and no relay.

The tree (``tests/lab/tree.py`` in a ``RegionLab``: one network namespace per node, each
parent link through a delay link of its own round trip), as in
``tests/system/test_batch_tree.py``::

    publisher (this process) ─► ingress (a, beside anvil as chain 42161)
                                  ├─40 ms─► relay b ─┬─20 ms─► leaf1..leaf4 (both relays
                                  └─60 ms─► relay c ─┴─40 ms─►  are every leaf's parents)
                                  └─60 ms─► direct (a subscriber, no relay)

Round trips as drawn; a batch's first copy reaches a leaf through relay b: 20 + 10 = 30 ms
one way, the direct subscriber's single link is 30 ms one way too. Delays are emulated in
user space (this kernel has no ``netem``): each link is a Python process holding each chunk
for half its round trip, so links add their own scheduling delay, the more so on a loaded
machine. The publisher reaches the ingress through a link with no delay (the lab's way in
from the root namespace).

A subscriber is this script run with ``--follow`` inside a leaf's namespace (the batch
subscriber library, each batch checked as any subscriber does), printing each batch's seq
and its arrival (wall clock, µs; every namespace shares the host clock). The publisher's
send time is taken when ``Publisher.submit`` returns (signed and queued). Per round of
``--seconds`` at one of ``--rates`` batches/s (the rates take turns) of ``--size`` bytes:
per batch, the latest arrival over the leaves' subscribers minus the send time; p50 and
p99 per round; medians over ``--rounds`` rounds per rate.

    python -m benchmarks.batch_e2e [--rates 200,50] [--size 2048] [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

# The lab's helpers live with the tests (``tests/lab``), one level above this folder.
from benchmarks import common
from chainrelay.clients.batchsubscriber import BatchSubscription
from chainrelay.clients.publisher import Ack, Publisher
from chainrelay.tree.frame import Signer, keccak
from tests.lab.batches import payload_of
from tests.lab.chain import metric
from tests.lab.netns import Region, RegionLab, unavailable
from tests.lab.procs import Procs, until
from tests.lab.tree import (
    NODE_PORT,
    RTT_B_LEAF,
    RTT_C_LEAF,
    RTT_INGRESS_B,
    RTT_INGRESS_C,
    Subscriber,
    Tree,
    TreeNode,
    batch_tree,
)

BUDGET_SECONDS = 420
STREAM = "arbitrum/batches"
CHAIN = 42161
SEQUENCER_KEY = keccak(b"batch e2e sequencer")
SEQUENCER_HEX = "0x" + Signer(SEQUENCER_KEY).address.hex()
API_KEY = "bench-e2e-sequencer-key"
LEAVES = 4
# The first copy's path: ingress -> relay b -> leaf, one way.
PATH_ONE_WAY_MS = [RTT_INGRESS_B / 2, RTT_B_LEAF / 2]
# The direct subscriber's one link has the whole path's one-way delay.
RTT_DIRECT = 2 * sum(PATH_ONE_WAY_MS)
# Batches pushed (at the run's rate) before the measured rounds: links up, caches warm.
WARMUP_BATCHES = 200
NODE_READY_SECONDS = 60.0
# Every subscriber has a round's last batch this long after it was sent, or the run failed.
DRAIN_SECONDS = 60.0
# A follower stops by itself after this long, even if nobody stops it.
FOLLOW_MAX_SECONDS = BUDGET_SECONDS


# --- the follower (runs inside a leaf's namespace) ---------------------------------------------
async def follow(url: str, max_seconds: float) -> None:
    """Print one JSON line per batch: seq, arrival (µs, wall clock), fetched."""
    sub = BatchSubscription(url, STREAM, from_seq=0, trust=[SEQUENCER_HEX], chain_id=CHAIN)
    out = sys.stdout.buffer
    try:
        async with asyncio.timeout(max_seconds):
            async for b in sub:
                arrived = time.time_ns() // 1000
                line = {"seq": b.seq, "arrived_us": arrived, "fetched": b.fetched}
                out.write(orjson.dumps(line) + b"\n")
                out.flush()
    except TimeoutError:
        pass
    finally:
        await sub.aclose()


# --- the tree ----------------------------------------------------------------------------------
def spawn_follower(tree: Tree, place: Region, url: str, name: str) -> Subscriber:
    """This script with ``--follow`` inside namespace ``place``; stopped by ``tree.close``."""
    err_path = tree.tmp / f"{name}.err"
    with err_path.open("ab") as err:
        proc = place.spawn(
            [sys.executable, "-m", "benchmarks.batch_e2e", "--follow", url,
             "--max-seconds", str(FOLLOW_MAX_SECONDS)],
            stdout=subprocess.PIPE,
            stderr=err,
        )  # fmt: skip
    sub = Subscriber(proc, name, tree.tmp / f"{name}.jsonl", err_path)
    tree.subscribers.append(sub)
    return sub


def has_children(node: TreeNode, want: int) -> Callable[[], Awaitable[bool]]:
    """A condition for ``until``: ``node`` feeds ``want`` children the stream."""

    async def check() -> bool:
        with contextlib.suppress(OSError, ValueError, aiohttp.ClientError):
            got = metric(await node.metrics(), "chainrelay_feed_children", stream=STREAM)
            return got == want
        return False

    return check


# The ingress's own ack latency (push read to ack written), as its histogram's sum and count.
ACK_SUM = "chainrelay_batch_ack_seconds_sum"
ACK_COUNT = "chainrelay_batch_ack_seconds_count"
ROLES = ("ingress", "relays", "leaves", "links", "subscribers", "publisher", "anvil")


def role(argv: Sequence[str]) -> str:
    """Which part of the run a lab process is, by its command line."""
    if "tests.lab.delay_link" in argv:
        return "links"
    if "--follow" in argv:
        return "subscribers"
    if "serve" in argv:
        config = Path(argv[-1]).name
        return "ingress" if config == "ingress.toml" else "leaves" if "leaf" in config else "relays"
    return "anvil"


def lab_cpu_seconds(lab: RegionLab) -> dict[str, float]:
    """CPU seconds by role of this process (the publisher) and every process of the lab:
    the run's own work, not the other load on a shared machine."""
    total = dict.fromkeys(ROLES, 0.0)
    total["publisher"] = sum(os.times()[:2])
    for proc in lab.procs:
        with contextlib.suppress(OSError, ValueError):
            argv = [str(a) for a in proc.args] if isinstance(proc.args, list) else []
            total[role(argv)] += common.cpu_seconds(proc.pid)
    return total


@dataclass
class Round:
    sent_us: dict[int, int] = field(default_factory=dict)
    acked_us: dict[int, int] = field(default_factory=dict)


async def push(pub: Publisher, seqs: range, rate: float, size: int, r: Round) -> None:
    """Push ``seqs`` at ``rate`` a second; returns once every one is acknowledged."""
    loop = asyncio.get_running_loop()
    acks = []

    def acked(seq: int, _fut: asyncio.Future[Ack]) -> None:
        r.acked_us[seq] = time.time_ns() // 1000

    start = loop.time()
    for i, seq in enumerate(seqs):
        # Pacing: batch i is due at start + i / rate.
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        data = payload_of(seq, size)
        await pub.room(len(data))
        fut = pub.submit(seq, data)
        r.sent_us[seq] = time.time_ns() // 1000
        fut.add_done_callback(functools.partial(acked, seq))
        acks.append(fut)
    async with asyncio.timeout(DRAIN_SECONDS):
        await asyncio.gather(*acks)


@dataclass
class Measured:
    """One round's figures (ms) and the cores its parts kept busy (CPU s per second)."""

    rate: float
    p: dict[str, float]
    cpu: dict[str, float]


def stats(values: list[float]) -> tuple[float, float]:
    return common.median(values), common.quantile(values, 0.99)


def schedule(rates: Sequence[float], rounds: int) -> list[float]:
    """Each round's rate, the rates taking turns so a shared machine's load falls on each
    alike."""
    return [rate for _ in range(rounds) for rate in rates]


async def run(args: argparse.Namespace, tmp: Path) -> tuple[list[Measured], int]:
    """Build the tree, push the rounds; (each round's figures, batches read from a range
    endpoint by any subscriber)."""
    procs = Procs()
    try:
        with RegionLab(procs) as lab, Tree(lab, tmp) as tree:
            ingress, _, leaves = await batch_tree(
                tree,
                sequencer=SEQUENCER_HEX,
                api_key=API_KEY,
                leaves=LEAVES,
                timeout=NODE_READY_SECONDS,
            )
            # The direct subscriber: a namespace of its own, one link straight to the ingress.
            direct_place = lab.add_region("direct")
            host, port = lab.link(direct_place, ingress.place, NODE_PORT, RTT_DIRECT)
            subs = [
                spawn_follower(tree, leaf.place, leaf.feed_url, f"follow-{leaf.name}")
                for leaf in leaves
            ]
            direct = spawn_follower(tree, direct_place, f"ws://{host}:{port}/feed", "follow-direct")
            for leaf in leaves:
                await until(has_children(leaf, 1), NODE_READY_SECONDS, f"{leaf.name}'s follower")
            # Relays b and c and the direct follower.
            await until(has_children(ingress, 3), NODE_READY_SECONDS, "the ingress's children")
            url = ingress.place.url(NODE_PORT, scheme="ws")
            plan = [(max(args.rates), WARMUP_BATCHES)]
            plan += [(rate, int(rate * args.seconds)) for rate in schedule(args.rates, args.rounds)]
            pushed: list[tuple[float, Round, dict[str, float], float]] = []
            async with Publisher(
                url, key=SEQUENCER_KEY, stream=STREAM, chain_id=CHAIN, api_key=API_KEY
            ) as pub:
                seq = 0
                for n, (rate, count) in enumerate(plan):
                    r = Round()
                    busy0, wall0 = lab_cpu_seconds(lab), time.monotonic()
                    acks0 = await ingress.metrics()
                    await push(pub, range(seq, seq + count), rate, args.size, r)
                    seq += count
                    for sub in (*subs, direct):
                        await sub.wait_count(seq, DRAIN_SECONDS)
                    busy1, wall = lab_cpu_seconds(lab), time.monotonic() - wall0
                    acks1 = await ingress.metrics()
                    if n:  # the first is the warm-up
                        cpu = {k: (busy1[k] - busy0[k]) / wall for k in ROLES}
                        inside = (acks1[ACK_SUM] - acks0[ACK_SUM]) / (
                            acks1[ACK_COUNT] - acks0[ACK_COUNT]
                        )
                        pushed.append((rate, r, cpu, inside * 1000))
            arrivals = [{int(x["seq"]): int(x["arrived_us"]) for x in sub.blocks} for sub in subs]
            direct_at = {int(x["seq"]): int(x["arrived_us"]) for x in direct.blocks}
            fetched = sum(bool(x["fetched"]) for sub in (*subs, direct) for x in sub.blocks)
            out = []
            for rate, r, cpu, inside_ms in pushed:
                sent = r.sent_us.items()
                series = {
                    "last": [(max(a[s] for a in arrivals) - t) / 1000 for s, t in sent],
                    "first": [(min(a[s] for a in arrivals) - t) / 1000 for s, t in sent],
                    "direct": [(direct_at[s] - t) / 1000 for s, t in sent],
                    "ack": [(r.acked_us[s] - t) / 1000 for s, t in sent],
                }
                p: dict[str, float] = {}
                for name, values in series.items():
                    p[name + "_p50"], p[name + "_p99"] = stats(values)
                p["ack_inside_mean"] = inside_ms
                out.append(Measured(rate, p, cpu))
            return out, fetched
    finally:
        procs.close()


# --- the section in RESULTS.md ----------------------------------------------------------------
SECTION = "batch_e2e"


def write_section(body: str, path: Path = common.RESULTS) -> None:
    """Replace this script's section of RESULTS.md, or append it; nothing else is touched."""
    begin, end = f"<!-- BEGIN {SECTION} -->", f"<!-- END {SECTION} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text()
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def report(args: argparse.Namespace, m: dict[str, str], got: list[Measured], fetched: int) -> str:
    """The RESULTS.md section: a row per round, then medians per rate."""
    path_ms = sum(PATH_ONE_WAY_MS)
    med = common.median

    def pair(p: dict[str, float], key: str) -> str:
        return f"{p[key + '_p50']:.1f} / {p[key + '_p99']:.1f}"

    rows = [
        [str(i), f"{g.rate:.0f}", pair(g.p, "ack"), f"{g.p['ack_inside_mean']:.1f}",
         pair(g.p, "first"), pair(g.p, "last"), pair(g.p, "direct"),
         f"{sum(g.cpu.values()):.2f}"]
        for i, g in enumerate(got, 1)
    ]  # fmt: skip
    summary = []
    cpu_lines = []
    reading = []
    for rate in args.rates:
        mine = [g for g in got if g.rate == rate]

        def m_of(key: str, mine: list[Measured] = mine) -> float:
            return med([g.p[key] for g in mine])

        last50, last99 = m_of("last_p50"), m_of("last_p99")
        dir50, dir99 = m_of("direct_p50"), m_of("direct_p99")
        summary.append(
            [f"{rate:.0f}", f"{m_of('ack_p50'):.1f} / {m_of('ack_p99'):.1f}",
             f"{path_ms:.0f}", f"{last50:.1f} / {last99:.1f}",
             f"**{last50 - path_ms:.1f} / {last99 - path_ms:.1f}**",
             f"{dir50:.1f} / {dir99:.1f}", f"{dir50 - path_ms:.1f} / {dir99 - path_ms:.1f}",
             f"{last50 - dir50:.1f} / {last99 - dir99:.1f}"]
        )  # fmt: skip
        busy = med([sum(g.cpu.values()) for g in mine])
        reading.append(
            f"at {rate:.0f}/s the last leaf's p50 is {last50 - path_ms:.1f} ms above the "
            f"links' {path_ms:.0f} ms: the durable ack takes {m_of('ack_p50'):.1f} of it "
            f"(the ingress publishes a batch once it is fsynced; "
            f"{m_of('ack_inside_mean'):.1f} ms inside the ingress), the two relay hops and "
            f"the leaf {last50 - dir50:.1f} (last - direct), with the lab's processes keeping "
            f"{busy:.2f} of the 2 cores busy"
        )
        cpu_lines.append(
            f"{rate:.0f}/s: " + ", ".join(f"{k} {med([g.cpu[k] for g in mine]):.2f}" for k in ROLES)
        )
    return "\n\n".join(
        [
            "## Sequencer to last subscriber through a region tree (`batch_e2e.py`)",
            common.machine_line(m) + f" · {os.cpu_count()} vCPU, shared with other work",
            "Publisher (this process) → ingress (region a, beside anvil as chain 42161) → "
            f"relay b ({RTT_INGRESS_B:.0f} ms round trip) and relay c "
            f"({RTT_INGRESS_C:.0f} ms) → {LEAVES} leaves, each with both relays as parents "
            f"(b {RTT_B_LEAF:.0f} ms, c {RTT_C_LEAF:.0f} ms) → a subscriber beside each "
            "leaf (the batch subscriber library, every batch checked); each node in its own "
            "network namespace. A batch's first copy reaches a leaf through b: "
            f"{' + '.join(f'{d:.0f}' for d in PATH_ONE_WAY_MS)} = {path_ms:.0f} ms one way. "
            f"Beside it, a direct subscriber on the ingress through one {path_ms:.0f} ms "
            "link, no relay. **Delays are emulated in user space** (this kernel has no "
            "netem): each link is a Python process holding each chunk for half its round "
            "trip, so every link on the path adds its own scheduling delay, more on a loaded "
            f"machine. {args.rounds} rounds of {args.seconds:.0f} s at each rate "
            f"({', '.join(f'{r:.0f}' for r in args.rates)} batches/s, taking turns) of "
            f"{args.size}-byte batches, after {WARMUP_BATCHES} warm-up batches. "
            "*Latency*: per batch, a subscriber's arrival (wall clock) minus the publisher's "
            "send (when `submit` returned, signed and queued; one host clock); *last* is the "
            "latest of the leaf subscribers, *first* the earliest; *ack*: send to the "
            "ingress's durable ack; *ack inside*: the ingress's own figure (push read to ack "
            "written; its `chainrelay_batch_ack_seconds`), the mean over the round. p50 / p99, "
            "ms; *cores busy*: CPU seconds per second of the "
            "round (push and drain) of the lab's processes (nodes, links, subscribers, anvil) "
            "and the publisher's, out of 2. Batches read from a range "
            f"endpoint (not live): {fetched}.",
            common.table(
                [
                    "round",
                    "batches/s",
                    "ack",
                    "ack inside (mean)",
                    "first leaf",
                    "last leaf",
                    "direct",
                    "cores busy",
                ],
                rows,
            ),
            "Medians over rounds (p50 / p99, ms):",
            common.table(
                [
                    "batches/s",
                    "ack",
                    "path link delays",
                    "last leaf",
                    "last leaf - link delays",
                    "direct",
                    "direct - link delays",
                    "two relay hops (last - direct)",
                ],
                summary,
            ),
            "Reading: " + "; ".join(reading) + ". The machine is shared: the load average "
            "above is other work's as much as this run's, and a process waiting for a core "
            "shows here as latency (the durable ack's fsync shares the disk too).",
            "Cores busy by part (medians over rounds): "
            + "; ".join(cpu_lines)
            + f" ({LEAVES + 3} nodes: the ingress, 2 relays, {LEAVES} leaves; "
            f"{2 + 2 * LEAVES + 1} delay links carrying batches, one more from the publisher; "
            f"{LEAVES + 1} subscribers).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[200.0, 50.0],
        help="batches per second, comma-separated; the rounds take turns",
    )
    ap.add_argument("--size", type=int, default=2048, help="payload bytes")
    ap.add_argument("--seconds", type=float, default=10.0, help="of each round")
    ap.add_argument("--rounds", type=int, default=3, help="per rate")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--follow", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--max-seconds", type=float, default=FOLLOW_MAX_SECONDS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.follow:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(follow(args.follow, args.max_seconds))
        return 0
    reason = unavailable()
    if reason:
        raise SystemExit(f"no region lab here: {reason}")
    common.budget(BUDGET_SECONDS)
    m = common.machine()
    with tempfile.TemporaryDirectory(prefix="chainrelay-batch-e2e-") as tmp:
        got, fetched = asyncio.run(run(args, Path(tmp)))
    body = report(args, m, got, fetched)
    print(body)
    if not args.no_write:
        write_section(body)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
