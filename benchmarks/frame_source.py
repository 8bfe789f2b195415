"""A feed parent under a benchmark's control: ``python -m benchmarks.frame_source --port N``.

It stands in for an origin so a relay can be measured with real full blocks (mainnet block
18,000,000 from the corpora) at a pace the benchmark sets. At start it builds a chain of
blocks from the corpus block: block ``BASE + i`` is the corpus block (or, for small frames,
the same block cut to its first transaction and receipt) with its number, hash and parent
hash rewritten so that the chain links (hash = the frame's identity), and signs one frame
per block. Then it serves, on 127.0.0.1:N:

* ``GET /feed``: the feed session (hello → welcome with an empty backlog → live frames);
  ``/feed?direct=1`` marks a benchmark's own direct child;
* ``POST /``: the JSON-RPC calls a relay makes at start and on a gap (chain id, blocks by
  number, tag or hash, receipts), answered from the chain published so far;
* ``GET /health``: 200;
* ``POST /publish``: sends the next frame to every relay session, then to every direct
  session, and answers the wall-clock time (``time.time()``) taken just before each write.

Frames go out big and small in turn (positions consecutive). The origin key is anvil's
first dev account's; the relay must trust its address (printed on the ready line).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from aiohttp import WSMsgType, web
from eth_utils import keccak

from chainrelay.devnet import DEV_KEYS
from chainrelay.tree import frame as feedframe
from chainrelay.tree.session import encode_welcome, parse_hello

MAINNET = "erigon-mainnet-block-18000000"
# A source never outlives a benchmark by much, even one that died without stopping it:
# tree_hop's whole budget is 600 s, and it passes its own bound.
DEFAULT_MAX_SECONDS = 600.0
STREAM = "bsc/blocks"
CHAIN_ID = 56
ORIGIN_KEY = bytes.fromhex(DEV_KEYS[0][2:])
# Transactions (and receipts) kept in a small block: about what an anvil block with one
# transfer carries.
SMALL_TXS = 1


@dataclass
class Block:
    number: int
    hash: str
    block_json: bytes
    receipts_json: bytes
    frame: bytes
    big: bool


@dataclass
class Chain:
    blocks: dict[int, Block] = field(default_factory=dict)
    by_hash: dict[str, Block] = field(default_factory=dict)
    base: int = 0
    published: int = 0  # number of the newest block sent (base: none yet)

    def add(self, b: Block) -> None:
        self.blocks[b.number] = b
        self.by_hash[b.hash] = b


def block_hash(number: int) -> str:
    return "0x" + keccak(b"chainrelay benchmark block " + number.to_bytes(8, "big")).hex()


def build(corpora: str, count: int) -> Chain:
    """The base block and ``count`` blocks after it, big and small in turn, each signed."""
    folder = f"{corpora}/{MAINNET}"
    with open(f"{folder}/eth_getBlockByNumber-full.json", "rb") as f:
        doc = orjson.loads(f.read())
    block = (doc[0] if isinstance(doc, list) else doc)["response"]["result"]
    with open(f"{folder}/eth_getBlockReceipts.json", "rb") as f:
        doc = orjson.loads(f.read())
    receipts = (doc[0] if isinstance(doc, list) else doc)["response"]["result"]
    big = (orjson.dumps(block), orjson.dumps(receipts))
    small_block = dict(block, transactions=block["transactions"][:SMALL_TXS])
    small = (orjson.dumps(small_block), orjson.dumps(receipts[:SMALL_TXS]))
    own_hash = block["hash"].encode()
    parent_hash = block["parentHash"].encode()
    own_number = b'"' + block["number"].encode() + b'"'
    signer = feedframe.Signer(ORIGIN_KEY)
    chain = Chain(base=int(block["number"], 16))
    chain.published = chain.base
    for i in range(count + 1):
        number = chain.base + i
        h = block_hash(number)
        is_big = i % 2 == 1
        bj, rj = big if is_big else small

        def rewrite(text: bytes, number: int = number, h: str = h) -> bytes:
            return (
                text.replace(own_hash, h.encode())
                .replace(parent_hash, block_hash(number - 1).encode())
                .replace(own_number, b'"' + hex(number).encode() + b'"')
            )

        bj, rj = rewrite(bj), rewrite(rj)
        frame = feedframe.encode(
            signer,
            kind=feedframe.KIND_BLOCK,
            stream=STREAM,
            position=number,
            identity=bytes.fromhex(h[2:]),
            plain=feedframe.block_payload(bj, rj),
        )
        chain.add(Block(number, h, bj, rj, frame, is_big))
    return chain


class Source:
    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self.relays: set[web.WebSocketResponse] = set()
        self.direct: set[web.WebSocketResponse] = set()

    async def feed(self, request: web.Request) -> web.WebSocketResponse:
        # No permessage-deflate: frames go out as the origin made them, as a node sends them.
        ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 16, autoping=True)
        await ws.prepare(request)
        group = self.direct if request.query.get("direct") else self.relays
        try:
            first = await ws.receive()
            if first.type != WSMsgType.TEXT:
                return ws
            hello = parse_hello(first.data)
            entries = [{"stream": w.stream, "oldest": None, "newest": None} for w in hello.wants]
            await ws.send_str(encode_welcome(entries).decode())
            group.add(ws)
            async for _msg in ws:
                pass  # pings are answered by aiohttp; nothing else is expected
        finally:
            group.discard(ws)
        return ws

    async def publish(self, _request: web.Request) -> web.Response:
        chain = self.chain
        b = chain.blocks.get(chain.published + 1)
        if b is None:
            raise web.HTTPConflict(text="no more blocks")
        chain.published = b.number
        times: dict[str, list[float]] = {"relay": [], "direct": []}
        for name, group in (("relay", self.relays), ("direct", self.direct)):
            for ws in list(group):
                times[name].append(time.time())
                await ws.send_bytes(b.frame)
        body = {"position": b.number, "bytes": len(b.frame), "big": b.big, **times}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def stats(self, _request: web.Request) -> web.Response:
        body = {"relays": len(self.relays), "direct": len(self.direct)}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    def _block(self, ref: Any) -> Block | None:
        chain = self.chain
        if ref in ("latest", "safe", "finalized", "pending"):
            return chain.blocks[chain.base if ref in ("safe", "finalized") else chain.published]
        if isinstance(ref, str) and ref.startswith("0x"):
            n = int(ref, 16)
            return chain.blocks.get(n) if n <= chain.published else None
        return None

    def answer(self, req: dict[str, Any]) -> bytes:
        method, params = req.get("method"), req.get("params") or []
        result: bytes
        if method == "eth_chainId":
            result = orjson.dumps(hex(CHAIN_ID))
        elif method == "net_version":
            result = orjson.dumps(str(CHAIN_ID))
        elif method == "eth_blockNumber":
            result = orjson.dumps(hex(self.chain.published))
        elif method in ("eth_getBlockByNumber", "eth_getBlockByHash", "eth_getBlockReceipts"):
            ref = params[0] if params else None
            if method == "eth_getBlockByHash":
                b = self.chain.by_hash.get(ref) if isinstance(ref, str) else None
                if b is not None and b.number > self.chain.published:
                    b = None
            else:
                b = self._block(ref)
            if b is None:
                result = b"null"
            elif method == "eth_getBlockReceipts":
                result = b.receipts_json
            elif len(params) > 1 and params[1]:
                result = b.block_json
            else:
                doc = orjson.loads(b.block_json)
                doc["transactions"] = [t["hash"] for t in doc["transactions"]]
                result = orjson.dumps(doc)
        else:
            err = {"code": -32601, "message": f"{method} not served by the frame source"}
            return orjson.dumps({"jsonrpc": "2.0", "id": req.get("id"), "error": err})
        rid = orjson.dumps(req.get("id"))
        return b'{"jsonrpc":"2.0","id":' + rid + b',"result":' + result + b"}"

    async def rpc(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        if isinstance(doc, list):
            body = b"[" + b",".join(self.answer(r) for r in doc) + b"]"
        else:
            body = self.answer(doc)
        return web.Response(body=body, content_type="application/json")


async def serve(port: int, chain: Chain, max_seconds: float) -> None:
    src = Source(chain)
    app = web.Application(client_max_size=1 << 20)
    app.router.add_get("/feed", src.feed)
    app.router.add_get("/health", src.health)
    app.router.add_get("/stats", src.stats)
    app.router.add_post("/publish", src.publish)
    app.router.add_post("/", src.rpc)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    address = "0x" + feedframe.Signer(ORIGIN_KEY).address.hex()
    sizes = sorted({len(b.frame) for b in chain.blocks.values()})
    print(f"ready {address} frame sizes {sizes}", flush=True)
    try:
        await asyncio.sleep(max_seconds)
        print(f"frame source: stopping after --max-seconds {max_seconds:g}", file=sys.stderr)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--blocks", type=int, required=True, help="blocks after the base block")
    ap.add_argument("--corpora", required=True, help="the shared corpora folder")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help="stop by itself after this long",
    )
    args = ap.parse_args(argv)
    if args.max_seconds <= 0:
        ap.error("--max-seconds must be > 0")
    chain = build(args.corpora, args.blocks)
    uvloop.run(serve(args.port, chain, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
