"""Bytes on the wire per block: one feed frame against the two JSON-RPC answers a child
would otherwise fetch (``eth_getBlockByNumber(n, true)`` + ``eth_getBlockReceipts(n)``).

Blocks measured:

* Ethereum mainnet block 18,000,000 from the corpora (94 transactions; block and receipts
  as recorded, sent as compact JSON);
* an anvil block with hundreds of transactions, made here: ``--transfers`` signed EIP-1559
  transfers and ``--emits`` calls to a contract that logs a Transfer event, mined as one
  block; its answers are the bytes anvil sent, HTTP headers included;
* the Arbitrum One block from the corpora (its receipts are not recorded: block only, and
  the frame carries ``null`` receipts).

JSON-RPC over HTTP: each answer's body plus its HTTP response headers (anvil's own header
set, as captured from anvil, for every block); gzip: the same bodies compressed as a node
does when the client sends ``Accept-Encoding: gzip`` (geth does, anvil does not); over
WebSocket: each answer as one unmasked text frame. Requests are not counted (about 100
bytes each). The frame: ``feedframe.encode`` plus its WebSocket binary header.

CPU per block, medians of ``--repeats``: encode (the origin, once per block), verify
(every hop: ``decode`` + ``signer``) and unpack (every hop that uses the block).

    python -m benchmarks.tree_bytes [--transfers 300] [--emits 100] [--repeats 15]
"""

from __future__ import annotations

import argparse
import gzip
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from eth_account import Account

from benchmarks import common
from chainrelay.devnet import DEV_ACCOUNTS, DEV_KEYS, transfer_emitter_initcode
from chainrelay.tree import frame as feedframe
from chainrelay.wire.wsframes import binary_header

GOAL_RATIO = 0.4
BUDGET_SECONDS = 240
CORPORA = common.ROOT / "tests" / "corpora"
MAINNET = CORPORA / "erigon-mainnet-block-18000000"
ARBITRUM = CORPORA / "arbitrum-one-block-0x1db7fd9c.json"
# Any key signs as fast as any other; this one is anvil's first dev account's.
ORIGIN_KEY = bytes.fromhex(DEV_KEYS[0][2:])
# Frames and plain payloads are bounded by the tree's defaults; these are only for decoding.
MAX_FRAME = 64 * 1024 * 1024
MAX_PLAIN = 256 * 1024 * 1024
# zlib's default level: what Go's gzip.DefaultCompression (geth) and most servers use.
GZIP_LEVEL = 6
# Gas of one call to the Transfer emitter (log3 + calldata), with room to spare.
EMIT_GAS = 60_000


@dataclass
class Answers:
    """One block's JSON-RPC answers as a node sends them, and the frame of the same block."""

    name: str
    txs: int
    block_body: bytes  # the whole JSON-RPC response object
    receipts_body: bytes | None
    header_bytes: int  # HTTP response headers of one answer (status line to blank line)
    block_json: bytes  # the result alone: what the origin puts in the frame
    receipts_json: bytes
    number: int
    identity: bytes


def ws_text_frame_bytes(n: int) -> int:
    """Size of one unmasked (server) WebSocket text frame carrying ``n`` bytes."""
    return len(binary_header(n)) + n


def response(result_json: bytes, id_: int = 1) -> bytes:
    return b'{"jsonrpc":"2.0","id":%d,"result":' % id_ + result_json + b"}"


def raw_http(port: int, body: bytes) -> tuple[bytes, bytes]:
    """POST ``body`` to 127.0.0.1:``port`` on a plain socket: (response headers, body),
    byte for byte as the node sent them."""
    req = (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(req)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("closed before the headers")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = None
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        if length is None:
            raise RuntimeError(f"no content-length: {head!r}")
        while len(rest) < length:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise RuntimeError("closed before the body")
            rest += chunk
        return head + b"\r\n\r\n", rest


def anvil_block(transfers: int, emits: int) -> tuple[Answers, bytes]:
    """Mine one anvil block of ``transfers`` + ``emits`` transactions; its answers as anvil
    sent them, and anvil's response header block (reused for the corpus blocks)."""
    anvil = common.start_anvil(block_time=None)
    client = common.RpcClient(anvil.url, timeout=60)
    try:
        emitter = common.deploy(client, transfer_emitter_initcode())
        client.call("evm_setAutomine", [False])
        latest = client.call("eth_getBlockByNumber", ["latest", False])
        base_fee = int(latest["baseFeePerGas"], 16)
        # Room for every transaction in one block.
        client.call("evm_setBlockGasLimit", [hex(transfers * 21_000 + emits * EMIT_GAS + 10**6)])
        key = DEV_KEYS[0]
        nonce = int(client.call("eth_getTransactionCount", [DEV_ACCOUNTS[0], "pending"]), 16)
        for i in range(transfers):
            signed = Account.sign_transaction(
                {
                    "type": 2,
                    "chainId": 56,
                    "nonce": nonce + i,
                    "to": DEV_ACCOUNTS[1 + i % 2],
                    "value": 10**12 + i,
                    "gas": 21_000,
                    "maxPriorityFeePerGas": 10**9,
                    "maxFeePerGas": 4 * base_fee + 10**9,
                },
                key,
            )
            client.call("eth_sendRawTransaction", ["0x" + signed.raw_transaction.hex()])
        for i in range(emits):
            to = DEV_ACCOUNTS[i % 3][2:].lower().rjust(64, "0")
            data = "0x" + to + f"{i + 1:064x}"
            client.call(
                "eth_sendTransaction",
                [{"from": DEV_ACCOUNTS[1], "to": emitter, "data": data, "gas": hex(EMIT_GAS)}],
            )
        client.call("evm_mine", [])
        number = int(client.call("eth_blockNumber", []), 16)
        port = int(anvil.url.rsplit(":", 1)[1])
        head, block_body = raw_http(
            port, common.request_body("eth_getBlockByNumber", [hex(number), True], 1)
        )
        _, receipts_body = raw_http(
            port, common.request_body("eth_getBlockReceipts", [hex(number)], 2)
        )
    finally:
        client.close()
        anvil.stop()
    block = orjson.loads(block_body)["result"]
    receipts = orjson.loads(receipts_body)["result"]
    if len(block["transactions"]) != transfers + emits:
        raise RuntimeError(f"mined {len(block['transactions'])} of {transfers + emits} txs")
    return (
        Answers(
            f"anvil, {transfers} transfers + {emits} log calls",
            len(block["transactions"]),
            block_body,
            receipts_body,
            len(head),
            orjson.dumps(block),
            orjson.dumps(receipts),
            number,
            bytes.fromhex(block["hash"][2:]),
        ),
        head,
    )


def corpus_blocks(header_bytes: int) -> list[Answers]:
    """The mainnet pair and the Arbitrum block, as compact JSON answers."""
    doc = orjson.loads((MAINNET / "eth_getBlockByNumber-full.json").read_bytes())
    block = (doc[0] if isinstance(doc, list) else doc)["response"]["result"]
    doc = orjson.loads((MAINNET / "eth_getBlockReceipts.json").read_bytes())
    receipts = (doc[0] if isinstance(doc, list) else doc)["response"]["result"]
    arb = orjson.loads(ARBITRUM.read_bytes())["result"]
    out = []
    for name, b, r in (
        ("Ethereum mainnet 18,000,000 (corpus)", block, receipts),
        ("Arbitrum One 0x1db7fd9c (corpus, no receipts)", arb, None),
    ):
        bj = orjson.dumps(b)
        rj = orjson.dumps(r)
        out.append(
            Answers(
                name,
                len(b["transactions"]),
                response(bj),
                None if r is None else response(rj, 2),
                header_bytes,
                bj,
                rj,
                int(b["number"], 16),
                bytes.fromhex(b["hash"][2:]),
            )
        )
    return out


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of one call of ``fn``."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000)
    return common.median(runs)


@dataclass
class Measured:
    a: Answers
    plain: int
    frame: int  # frame + WebSocket header
    http: int
    http_gzip: int
    ws: int
    encode_ms: float
    verify_ms: float
    unpack_ms: float
    gzip_ms: float


def measure(a: Answers, repeats: int) -> Measured:
    signer = feedframe.Signer(ORIGIN_KEY)
    plain = feedframe.block_payload(a.block_json, a.receipts_json)

    def encode() -> bytes:
        return feedframe.encode(
            signer,
            kind=feedframe.KIND_BLOCK,
            stream="bench/blocks",
            position=a.number,
            identity=a.identity,
            plain=plain,
        )

    raw = encode()
    frame = feedframe.decode(raw, MAX_FRAME)
    if feedframe.signer(frame) != signer.address or feedframe.unpack(frame, MAX_PLAIN) != plain:
        raise RuntimeError(f"{a.name}: the frame does not round-trip")
    bodies = [a.block_body] + ([a.receipts_body] if a.receipts_body is not None else [])
    return Measured(
        a,
        len(plain),
        len(binary_header(len(raw))) + len(raw),
        sum(a.header_bytes + len(b) for b in bodies),
        sum(a.header_bytes + 24 + len(gzip.compress(b, GZIP_LEVEL)) for b in bodies),
        sum(ws_text_frame_bytes(len(b)) for b in bodies),
        timed(encode, repeats),
        timed(lambda: feedframe.signer(feedframe.decode(raw, MAX_FRAME)), repeats),
        timed(lambda: feedframe.unpack(feedframe.decode(raw, MAX_FRAME), MAX_PLAIN), repeats),
        timed(lambda: [gzip.compress(b, GZIP_LEVEL) for b in bodies], repeats),
    )


def kb(n: int) -> str:
    return f"{n / 1000:,.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transfers", type=int, default=300)
    ap.add_argument("--emits", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    common.budget(BUDGET_SECONDS)
    m = common.machine()
    anvil_answers, anvil_head = anvil_block(args.transfers, args.emits)
    blocks = [*corpus_blocks(len(anvil_head)), anvil_answers]
    blocks = [blocks[0], blocks[2], blocks[1]]
    results = [measure(a, args.repeats) for a in blocks]

    rows = []
    for r in results:
        rows.append(
            [
                r.a.name,
                str(r.a.txs),
                kb(r.plain),
                kb(r.http),
                kb(r.http_gzip),
                kb(r.ws),
                f"**{kb(r.frame)}**",
                f"**{r.frame / r.http:.3f}x**",
                f"{r.frame / r.ws:.3f}x",
                f"{r.frame / r.http_gzip:.2f}x",
            ]
        )
    cpu_rows = [
        [
            r.a.name,
            f"{r.encode_ms:.2f}",
            f"{r.verify_ms:.3f}",
            f"{r.unpack_ms:.2f}",
            f"{r.plain / 1e6 / (r.unpack_ms / 1000):,.0f}",
            f"{r.gzip_ms:.2f}",
        ]
        for r in results
    ]
    worst = max(r.frame / r.http for r in results)
    met = "met" if worst <= GOAL_RATIO else "NOT met"
    lo = min(r.frame / r.http_gzip for r in results)
    hi = max(r.frame / r.http_gzip for r in results)
    body = "\n\n".join(
        [
            "## Feed frame vs JSON-RPC bytes (`tree_bytes.py`)",
            common.machine_line(m),
            "Bytes per block (kB = 1,000 bytes). *plain*: block JSON + NUL + receipts JSON, "
            "what the frame carries. *HTTP*: the answers of `eth_getBlockByNumber(n, true)` + "
            "`eth_getBlockReceipts(n)`, bodies plus anvil's own response headers "
            f"({len(anvil_head)} bytes each; the anvil row is anvil's answers byte for byte). "
            "*HTTP gzip*: the same bodies gzip-compressed, as a node sends them to a client "
            "asking for it (geth does; anvil does not). *WS*: the same answers as unmasked "
            "WebSocket text frames. *frame*: one feed frame with its WebSocket header. "
            "Requests (about 100 bytes each) are not counted. Corpus answers are compact "
            "JSON, as nodes send them (block 623 kB + receipts 304 kB; the recorded files are "
            "indented, 654 + 474 kB).",
            common.table(
                [
                    "block",
                    "txs",
                    "plain kB",
                    "HTTP kB",
                    "HTTP gzip kB",
                    "WS kB",
                    "frame kB",
                    "frame / HTTP",
                    "frame / WS",
                    "frame / gzip",
                ],
                rows,
            ),
            f"CPU per block, ms, medians of {args.repeats} (one thread of this process): "
            "encode is paid once, at the origin (hex packing, lz4, keccak, one secp256k1 "
            "signature); verify at every hop before forwarding (header decode + signature "
            "recovery: keccak over the payload, no decompression); unpack at every node that "
            "uses the block (lz4 + hex unpacking; bounded by the plain size limit). For "
            "comparison, gzip of the two answers: what a JSON-RPC node pays per child that "
            "asks for compressed answers.",
            common.table(
                [
                    "block",
                    "encode ms",
                    "verify ms",
                    "unpack ms",
                    "unpack MB/s (plain)",
                    "gzip of the answers ms",
                ],
                cpu_rows,
            ),
            f"Goal: frame ≤ {GOAL_RATIO}x the HTTP answers: **{met}** (worst {worst:.3f}x). "
            f"gzip comes to about the frame's size ({lo:.2f}-{hi:.2f}x) but is paid by the serving "
            "node per child and per answer; the frame is compressed and signed once at the "
            "origin and forwarded as is.",
        ]
    )
    print(body)
    if not args.no_write:
        common.write_section("tree_bytes", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
