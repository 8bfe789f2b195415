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
* *Nitro deflate*: that text compressed as Nitro's feed server does for a client that
  offers compression: each message on its own (no context takeover), flate at
  ``BestCompression`` (level 9). Nitro also primes its compressor with a static
  dictionary (``wsbroadcastserver/dictionary.go``), not copied here: its gain on 1-100 KB
  messages of base64 is small, and these numbers are without it.
* *leaf deflate*: the same texts through one permessage-deflate stream with context
  takeover, as websockets' default (level 6) sends them to one client of a leaf.
* *frame*: the tree's frame of the message (lz4 when it saves, the entry node's
  signature) with its WebSocket binary header: what each hop of the tree carries.

CPU per message (medians): at the entry node, parse + frame (lz4, keccak, one signature)
and, with ``allowed_signers``, Nitro's signature check; at every hop, the frame's check
(signature recovery); at a leaf, unpack and wrap once for all its clients.

    python -m benchmarks.nitro_feed [--count 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from collections.abc import Callable

from benchmarks import common
from chainrelay.batches.frame import encode_frame, open_frame, sign_batch
from chainrelay.nitro.codec import encode_broadcast, feed_signer, parse_broadcast
from chainrelay.tree.frame import Signer, decode, keccak, unpack
from chainrelay.wire.wsframes import binary_header, text_header
from tests.lab.nitro_messages import example_messages, realistic

BUDGET_SECONDS = 120
CHAIN_ID = 42161
STREAM = "arbitrum/nitro-feed"
SEQUENCER = Signer(keccak(b"benchmark nitro sequencer"))
ENTRY = Signer(keccak(b"benchmark nitro entry node"))
MAX = 64 * 1024 * 1024
# What a permessage-deflate message ends with and does not send (RFC 7692 7.2.1).
DEFLATE_TAIL = b"\x00\x00\xff\xff"


def nitro_deflate(text: bytes) -> int:
    """Bytes of ``text`` as Nitro's compressed output: one raw deflate stream per message."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = c.compress(text) + c.flush(zlib.Z_SYNC_FLUSH)
    if body.endswith(DEFLATE_TAIL):
        body = body[:-4]
    return len(text_header(len(body))) + len(body)


def stream_deflate(texts: list[bytes]) -> list[int]:
    """Bytes of each text through one deflate stream with context takeover (level 6)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = []
    for t in texts:
        body = c.compress(t) + c.flush(zlib.Z_SYNC_FLUSH)
        if body.endswith(DEFLATE_TAIL):
            body = body[:-4]
        out.append(len(text_header(len(body))) + len(body))
    return out


def med_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=200, help="generated messages")
    ap.add_argument("--repeats", type=int, default=5, help="timings per message")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    common.budget(BUDGET_SECONDS)
    m = common.machine()
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
        nitro_b = [nitro_deflate(t) for t in texts]
        leaf_b = stream_deflate(texts)
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
                    med_us(lambda raw=raw: feed_signer(raw, CHAIN_ID), args.repeats)
                )
                cpu["hop"].append(
                    med_us(lambda frame=frame: open_frame(decode(frame, MAX), MAX), args.repeats)
                )
                cpu["leaf"].append(
                    med_us(
                        lambda frame=frame: encode_broadcast([unpack(decode(frame, MAX), MAX)]),
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
            "each message compressed alone at level 9, as Nitro's feed server does (without "
            "its static dictionary, not copied here). *leaf deflate*: one permessage-deflate "
            "stream with context takeover at level 6, what a leaf sends a client that offers "
            "it. *frame*: the tree's frame of the message with its WebSocket header, what "
            "every hop carries.",
            common.table(
                [
                    "messages",
                    "n",
                    "JSON kB (mean)",
                    "Nitro deflate / JSON",
                    "leaf deflate / JSON",
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
    )
    print(body)
    if not args.no_write:
        common.write_section("nitro_feed", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
