"""Nitro's sequencer feed through the tree: bytes on the wire per feed message, against the
feed's own JSON and against permessage-deflate as Nitro sends it, and the CPU each node
pays per message. In-process: nothing is started.

Messages: ``--count`` generated feed messages (``tests/lab/nitro_messages.realistic``:
L2 messages of 1-100 KB, log-uniform, every other one compressible like RLP transactions,
the others random like compressed data; each signed as a sequencer signs it, with a block
hash and block metadata), and Nitro's two serialization examples (tests/corpora/nitro-feed).

Per message:

* *JSON*: the broadcast message a Nitro node reads (``{"version":1,"messages":[...]}``
  and its newline) in one unmasked WebSocket text frame: what the sequencer's feed, Nitro's
  relay, and a chainrelay leaf without compression send.
* *Nitro deflate*: that text compressed as Nitro's feed server, and now a leaf, sends it
  to a Nitro node (``Arbitrum-permessage-deflate``, ``chainrelay.nitro.deflate.NITRO``):
  each message on its own (no context takeover), flate at ``BestCompression`` (level 9)
  primed with Nitro's static dictionary; compressed once for all clients.
* *standard deflate*: what a leaf sends a client offering the standard permessage-deflate
  (``STANDARD``): the same, without the dictionary.
* *frame*: the tree's frame of the message (lz4 when it saves, the entry node's
  signature) with its WebSocket binary header: what each hop of the tree carries.

CPU per message (medians): at the entry node, parse + frame (lz4, keccak, one signature)
and, with ``allowed_signers``, Nitro's signature check; at every hop, the frame's check
(signature recovery); at a leaf, unpack and wrap once for all its clients.

Latency (``--seconds`` > 0): real processes on loopback. A fake Nitro feed (this process,
``tests/lab/fake_nitro_feed.py``) → entry node (its batch log fsynced per message group)
→ relay → leaf, each tree link through a delay link (``tests/lab/delay_link.py``, a
process holding each chunk ``--link-ms`` one way). At Arbitrum's rate (4 messages a
second) and at 10x it, for ``--seconds`` each: per message, the time from the feed's send
to a Nitro-protocol client of the leaf (this process) minus the two links' delays, p50 and
p99. Then ``--clients`` Nitro-protocol clients on the leaf (plain text, this process) at
4 a second: per message, the last client's arrival minus the send (p50, p99), and the
leaf's CPU per GB it sent. The clients share this process (and two CPUs) with the feed and
the nodes, so the last client's times include this one process reading a thousand sockets
(132 MB/s of JSON at these message sizes).

    python -m benchmarks.nitro_feed [--count 200] [--repeats 5] [--seconds 15] [--clients 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.client import connect

from benchmarks import common
from chainrelay.batches.frame import encode_frame, open_frame, sign_batch
from chainrelay.devnet import free_port
from chainrelay.nitro.codec import encode_broadcast, feed_signer, parse_broadcast
from chainrelay.nitro.deflate import NITRO, STANDARD, Flavor
from chainrelay.tree.frame import Signer, decode, keccak, unpack
from chainrelay.wire.wsframes import binary_header, text_header
from tests.lab.fake_nitro_feed import FakeNitroFeed
from tests.lab.netns import read_ready
from tests.lab.nitro_messages import Made, example_messages, realistic
from tests.lab.procs import until

BUDGET_SECONDS = 240
CHAIN_ID = 42161
STREAM = "arbitrum/nitro-feed"
SEQUENCER = Signer(keccak(b"benchmark nitro sequencer"))
ENTRY = Signer(keccak(b"benchmark nitro entry node"))
MAX = 64 * 1024 * 1024


def deflated(flavor: Flavor, text: bytes) -> int:
    """Bytes of ``text`` on the wire as ``flavor`` compresses it, its frame header included."""
    body = flavor.compress(text)
    return len(text_header(len(body))) + len(body)


def all_arrived(msgs: list[Made], arrivals: dict[int, float]) -> bool:
    return all(m.seq in arrivals for m in msgs)


def hop(frame: bytes) -> object:
    """What a relay hop does with a frame: opened, its signature checked."""
    return open_frame(decode(frame, MAX), MAX)


def leaf(frame: bytes) -> bytes:
    """What a leaf does with a frame: the broadcast message its clients are sent."""
    return encode_broadcast([unpack(decode(frame, MAX), MAX)])


def med_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


# --- latency and fan-out through real processes ---------------------------------------------
ARBITRUM_RATE = 4.0  # feed messages a second on Arbitrum One
_SEQ = re.compile(rb'"sequenceNumber":(\d+)')


@dataclass
class Tree:
    anvil: object
    entry: common.Relay
    relay: common.Relay
    leaf: common.Relay
    leaf_nitro: int
    links: list[subprocess.Popen[bytes]]

    def stop(self) -> None:
        for r in (self.leaf, self.relay, self.entry):
            r.stop()
        for link in self.links:
            common.stop_process(link)
        self.anvil.stop()  # type: ignore[attr-defined]


def _link(port: int, delay_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    proc = common.spawn(
        "tests.lab.delay_link",
        "--listen", "127.0.0.1:0", "--to", f"127.0.0.1:{port}", "--delay-ms", str(delay_ms),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    return proc, read_ready(proc, 15.0)


def _streams() -> str:
    return (
        f'[[batches.streams]]\nname = "{STREAM}"\nchain_id = {CHAIN_ID}\n'
        f'sequencers = ["0x{ENTRY.address.hex()}"]\n'
    )


def start_tree(feed_url: str, link_ms: float, log_dir: str) -> Tree:
    anvil = common.start_anvil(block_time=1.0, chain_id=CHAIN_ID)
    ws = f"ws://127.0.0.1:{anvil.port}"
    entry = common.Relay(
        ws,
        f'[tree]\nnode_key = "0x{keccak(b"benchmark nitro entry node").hex()}"\n\n'
        f'[batches]\nlog = "{log_dir}/entry.sqlite"\napi_keys = ["benchmark-entry-key"]\n\n'
        f'[nitro]\nlisten = "127.0.0.1:{free_port()}"\n\n'
        f'[[nitro.inputs]]\nurl = "{feed_url}"\n\n' + _streams(),
    )
    entry.start()
    links = []
    proc, port = _link(entry.port, link_ms)
    links.append(proc)
    relay = common.Relay(
        ws,
        f'[tree]\n\n[[tree.parents]]\nname = "entry"\nurl = "ws://127.0.0.1:{port}/feed"\n\n'
        f'[nitro]\nlisten = ""\n\n' + _streams(),
    )
    relay.start()
    proc, port = _link(relay.port, link_ms)
    links.append(proc)
    leaf_nitro = free_port()
    leaf = common.Relay(
        ws,
        f'[tree]\n\n[[tree.parents]]\nname = "relay"\nurl = "ws://127.0.0.1:{port}/feed"\n\n'
        f'[nitro]\nlisten = "127.0.0.1:{leaf_nitro}"\nmax_connections_per_ip = 5000\n\n'
        + _streams(),
    )
    leaf.start()
    return Tree(anvil, entry, relay, leaf, leaf_nitro, links)


async def _reader(
    url: str, arrivals: dict[int, float], ready: asyncio.Event, from_seq: int | None = None
) -> None:
    """A Nitro-protocol client that notes each message's arrival (wall clock), from
    ``from_seq`` (None: the whole backlog the leaf holds)."""
    headers = {"Arbitrum-Feed-Client-Version": "2"}
    if from_seq is not None:
        headers["Arbitrum-Requested-Sequence-Number"] = str(from_seq)
    async with connect(
        url,
        additional_headers=headers,
        compression=None,
        max_size=None,
        proxy=None,
    ) as ws:
        ready.set()
        while True:
            data = await ws.recv(decode=False)
            now = time.time()
            # The number only, not the whole parse: a thousand clients share this process.
            m = _SEQ.search(data, 0, 200)
            if m is not None:
                arrivals[int(m.group(1))] = now


async def paced(feed: FakeNitroFeed, msgs: list, rate: float, sent: dict[int, float]) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, m in enumerate(msgs):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        sent[m.seq] = time.time()
        feed.publish([m])


async def measure_latency(args: argparse.Namespace, tmp: str) -> tuple[list[list[str]], str]:
    rows: list[list[str]] = []
    next_seq = 10_000_000
    async with FakeNitroFeed(CHAIN_ID) as feed:
        tree = await asyncio.to_thread(start_tree, feed.url, args.link_ms, tmp)
        try:
            url = f"ws://127.0.0.1:{tree.leaf_nitro}"
            # Warm-up: the first message starts the stream at every node.
            warm = realistic(1, first_seq=next_seq, seed=99)
            arrivals: dict[int, float] = {}
            ready = asyncio.Event()
            reader = asyncio.ensure_future(_reader(url, arrivals, ready))
            await ready.wait()
            feed.publish(warm)
            next_seq += 1
            await until(lambda: next_seq - 1 in arrivals, 60, "the first message at the leaf")
            for rate in (ARBITRUM_RATE, 10 * ARBITRUM_RATE):
                n = int(rate * args.seconds)
                msgs = realistic(n, first_seq=next_seq, seed=int(rate))
                next_seq += n
                sent: dict[int, float] = {}
                await paced(feed, msgs, rate, sent)
                with contextlib.suppress(AssertionError):  # what is missing is counted
                    await until(functools.partial(all_arrived, msgs, arrivals), 30, "all")
                excess = [
                    (arrivals[s] - t) * 1000 - 2 * args.link_ms
                    for s, t in sent.items()
                    if s in arrivals
                ]
                rows.append(
                    [
                        f"{rate:g}/s",
                        f"{len(excess)}/{n}",
                        f"{common.median(excess):.1f}",
                        f"{common.quantile(excess, 0.99):.1f}",
                    ]
                )
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            fan = await fanout(args, feed, tree, url, next_seq)
        finally:
            await asyncio.to_thread(tree.stop)
    return rows, fan


async def fanout(
    args: argparse.Namespace, feed: FakeNitroFeed, tree: Tree, url: str, first: int
) -> str:
    if args.clients <= 0:
        return ""
    per: list[dict[int, float]] = [{} for _ in range(args.clients)]
    readies = [asyncio.Event() for _ in range(args.clients)]
    readers = []
    for i in range(args.clients):
        # From the next message: live only, no replay of what the leaf holds.
        readers.append(asyncio.ensure_future(_reader(url, per[i], readies[i], first)))
        if i % 50 == 49:
            await asyncio.gather(*(r.wait() for r in readies[: i + 1]))
    await asyncio.gather(*(r.wait() for r in readies))
    assert tree.leaf.proc is not None
    n = int(ARBITRUM_RATE * args.seconds)
    msgs = realistic(n, first_seq=first, seed=5)
    cpu0 = common.cpu_seconds(tree.leaf.proc.pid)
    sent: dict[int, float] = {}
    await paced(feed, msgs, ARBITRUM_RATE, sent)
    with contextlib.suppress(AssertionError):  # what is missing is counted
        await until(lambda: all(msgs[-1].seq in d for d in per), 30, "the last at every client")
    cpu = common.cpu_seconds(tree.leaf.proc.pid) - cpu0
    last = []
    missing = 0
    for s, t in sent.items():
        got = [d[s] for d in per if s in d]
        missing += args.clients - len(got)
        if got:
            last.append((max(got) - t) * 1000 - 2 * args.link_ms)
    wire = sum(len(encode_broadcast([m.raw])) for m in msgs) * args.clients
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    return (
        f"**{args.clients} Nitro-protocol clients on the leaf** at {ARBITRUM_RATE:g} messages/s "
        f"for {args.seconds:g} s ({n} messages, {wire / 1e9:.3f} GB of JSON sent in all; "
        f"deliveries missed: {missing}): last client's arrival minus the send, minus the two "
        f"links' {2 * args.link_ms:g} ms: p50 **{common.median(last):.1f} ms**, p99 "
        f"**{common.quantile(last, 0.99):.1f} ms**. Leaf CPU: {cpu:.2f} s, "
        f"**{cpu / (wire / 1e9):.1f} s per GB** sent."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200, help="generated messages")
    ap.add_argument("--repeats", type=int, default=5, help="timings per message")
    ap.add_argument("--seconds", type=float, default=15.0, help="per latency rate (0: none)")
    ap.add_argument("--link-ms", type=float, default=20.0, help="one-way delay of each link")
    ap.add_argument("--clients", type=int, default=1000, help="Nitro clients on the leaf")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    common.budget(BUDGET_SECONDS)
    m = common.machine()
    lat_rows: list[list[str]] = []
    fan = ""
    if args.seconds > 0:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="nitro-bench-") as tmp:
            lat_rows, fan = asyncio.run(measure_latency(args, tmp))
    made = realistic(args.count, signer=SEQUENCER, chain_id=CHAIN_ID)
    groups = {
        "compressible (RLP-like)": [x.raw for i, x in enumerate(made) if i % 2 == 0],
        "incompressible (random)": [x.raw for i, x in enumerate(made) if i % 2 == 1],
        "Nitro's examples": example_messages(),
    }
    rows = []
    cpu: dict[str, list[float]] = {"entry": [], "check": [], "hop": [], "leaf": []}
    for name, raws in groups.items():
        texts = [encode_broadcast([r]) for r in raws]
        json_b = [len(text_header(len(t))) + len(t) for t in texts]
        nitro_b = [deflated(NITRO, t) for t in texts]
        leaf_b = [deflated(STANDARD, t) for t in texts]
        frames = []
        for seq, (raw, text) in enumerate(zip(raws, texts, strict=True)):

            def entry(raw: bytes = raw, text: bytes = text, seq: int = seq) -> bytes:
                msg = parse_broadcast(text).messages[0]
                sig = sign_batch(ENTRY, CHAIN_ID, STREAM, seq, msg.raw)
                return encode_frame(
                    chain_id=CHAIN_ID,
                    stream=STREAM,
                    seq=seq,
                    payload=msg.raw,
                    signature=sig,
                    origin_us=0,
                )

            frame = entry()
            frames.append(len(binary_header(len(frame))) + len(frame))
            if name != "Nitro's examples":
                cpu["entry"].append(med_us(entry, args.repeats))
                cpu["check"].append(
                    med_us(functools.partial(feed_signer, raw, CHAIN_ID), args.repeats)
                )
                cpu["hop"].append(med_us(functools.partial(hop, frame), args.repeats))
                cpu["leaf"].append(
                    med_us(
                        functools.partial(leaf, frame),
                        args.repeats,
                    )
                )
        total = sum(json_b)
        rows.append(
            [
                name,
                str(len(raws)),
                f"{total / len(raws) / 1000:.1f}",
                f"{sum(nitro_b) / total:.3f}x",
                f"{sum(leaf_b) / total:.3f}x",
                f"**{sum(frames) / total:.3f}x**",
                f"{sum(frames) / sum(nitro_b):.2f}x",
            ]
        )
    cpu_rows = [
        [what, f"{statistics.median(v):.0f}", f"{max(v):.0f}"]
        for what, v in (
            ("entry: parse + frame (lz4, keccak, signature)", cpu["entry"]),
            ("entry: Nitro signature check (allowed_signers)", cpu["check"]),
            ("every hop: the frame's check", cpu["hop"]),
            ("leaf: unpack + wrap, once for all its clients", cpu["leaf"]),
        )
    ]
    body = "\n\n".join(
        [
            "## Nitro's feed through the tree: bytes per message (`nitro_feed.py`)",
            common.machine_line(m),
            f"{args.count} generated feed messages (L2 messages of 1-100 KB, log-uniform; "
            "half RLP-like, half random; signed, with block hash and metadata) and Nitro's "
            "two serialization examples. Sizes relative to *JSON*: the broadcast text in "
            "one WebSocket text frame, what Nitro's feed sends uncompressed. *Nitro deflate*: "
            "each message compressed alone at level 9 with Nitro's static dictionary "
            "(Arbitrum-permessage-deflate), as Nitro's feed server and a leaf send it to a "
            "Nitro node. *standard deflate*: the same without the dictionary, what a leaf "
            "sends a client offering the standard permessage-deflate. *frame*: the tree's "
            "frame of the message with its WebSocket header, what "
            "every hop carries.",
            common.table(
                [
                    "messages",
                    "n",
                    "JSON kB (mean)",
                    "Nitro deflate / JSON",
                    "standard deflate / JSON",
                    "frame / JSON",
                    "frame / Nitro deflate",
                ],
                rows,
            ),
            f"CPU per generated message, µs (median and worst of {len(cpu['entry'])} "
            f"messages, each the median of {args.repeats}):",
            common.table(["where", "median µs", "worst µs"], cpu_rows),
            "lz4 has no entropy coding: on base64 text (the l2Msg field) it finds repeats "
            "but cannot win back base64's 4/3, which deflate's Huffman stage does; so the "
            "frame is smaller than the JSON only where the message repeats itself, and "
            "larger than deflated JSON. What the frame buys is that it is made once, at "
            "the entry node, and checked, not recompressed, at every hop.",
        ]
        + (
            [
                f"Latency from the feed's send to a Nitro-protocol client two hops down "
                f"(entry → relay → leaf, each link {args.link_ms:g} ms one way, real "
                "processes on loopback; the entry commits each message to its sqlite log, "
                f"fsynced, before publishing it), minus the links' {2 * args.link_ms:g} ms, "
                f"{args.seconds:g} s per rate:",
                common.table(["rate", "arrived", "p50 ms", "p99 ms"], lat_rows),
            ]
            if lat_rows
            else []
        )
        + ([fan] if fan else [])
    )
    print(body)
    if not args.no_write:
        common.write_section("nitro_feed", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
