"""A fake upstream that replays a recorded corpus: ``python -m tests.lab.recorded_upstream
--port N --corpus execution-apis|arb-sepolia``.

A fake, not a node: it answers every JSON-RPC request from the recordings of
``tests.lab.corpora`` and nothing else, so a relay in front of it can be checked for
transparency against answers real clients gave.

A relay resolves block tags before forwarding (``latest`` may arrive as a hex number or as
``{"blockHash": H}``, an omitted block parameter may arrive explicit), so a request is
looked up in three steps:

1. **exact**: the method and params as recorded (parsed JSON, so key order is free);
2. **normalised**: every block reference (tag, hex number, block hash, ``{"blockHash": ..}``,
   ``{"blockNumber": ..}``, an omitted block parameter) replaced by the block number it names
   on the recorded chain;
3. **derived**: blocks by number or hash, with or without full transactions, built from any
   recorded copy of the block (what a relay's head tracker asks for).

Anything else gets a JSON-RPC error (``NOT_RECORDED``) and is logged and counted; GET
``/stats`` reports how each request was answered, for the test to check.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.lab.corpora import CORPORA, FOLDERS, Exchange, chain_rlp_hashes, corpus_dir, load

log = logging.getLogger("recorded_upstream")

# The answer to a request the recordings do not hold: in the server-error range that
# JSON-RPC leaves to implementations, and used by no node in the corpora.
NOT_RECORDED = -32099
# Requests kept for /stats: enough to diagnose a run, bounded so a loop cannot exhaust memory.
MAX_KEPT = 500

# Where each method takes its block parameter, and the tag a node assumes when it is omitted
# (None: the parameter is required). Independent of the relay's own table on purpose: this is
# the oracle the relay is checked against.
BLOCK_PARAM: dict[str, tuple[int, str | None]] = {
    "eth_getBalance": (1, "latest"),
    "eth_getTransactionCount": (1, "latest"),
    "eth_getCode": (1, "latest"),
    "eth_getStorageAt": (2, "latest"),
    "eth_getStorageValues": (1, "latest"),
    "eth_call": (1, "latest"),
    "eth_getProof": (2, "latest"),
    "eth_estimateGas": (1, "latest"),
    "eth_createAccessList": (1, "latest"),
    "eth_simulateV1": (1, "latest"),
    "debug_traceCall": (1, "latest"),
    "eth_getBlockByNumber": (0, None),
    "eth_getBlockReceipts": (0, None),
    "eth_getBlockTransactionCountByNumber": (0, None),
    "eth_getUncleCountByBlockNumber": (0, None),
    "eth_getTransactionByBlockNumberAndIndex": (0, None),
    "eth_getUncleByBlockNumberAndIndex": (0, None),
    "eth_feeHistory": (1, None),
    "debug_traceBlockByNumber": (0, None),
    "debug_getRawBlock": (0, None),
    "debug_getRawHeader": (0, None),
    "debug_getRawReceipts": (0, None),
}

# Methods whose results name canonical blocks: where hash -> number pairs are learnt.
# (eth_simulateV1 also returns block objects, of blocks that were never on the chain.)
_BLOCK_RESULTS = frozenset({"eth_getBlockByNumber", "eth_getBlockByHash"})
_ITEM_RESULTS = frozenset(
    {
        "eth_getTransactionByHash",
        "eth_getTransactionByBlockHashAndIndex",
        "eth_getTransactionByBlockNumberAndIndex",
        "eth_getTransactionReceipt",
        "eth_getBlockReceipts",
        "eth_getLogs",
    }
)


def _hexint(value: Any) -> int | None:
    if isinstance(value, str) and value[:2] in ("0x", "0X") and 2 < len(value) <= 18:
        try:
            return int(value, 16)
        except ValueError:
            return None
    return None


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 66 and value[:2] in ("0x", "0X")


def canonical(value: Any) -> str:
    """One spelling of a JSON value, for keys: sorted object keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass
class RecordedChain:
    """What the recordings say about the chain they were taken from."""

    head: int
    safe: int | None = None
    finalized: int | None = None
    numbers: dict[str, int] = field(default_factory=dict)  # block hash (lower case) -> number
    # number -> recorded block objects: "full" (with transaction objects) and/or "hashes".
    blocks: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def from_recordings(
        cls, exchanges: Iterable[Exchange], extra_numbers: dict[str, int] | None = None
    ) -> RecordedChain:
        """The chain seen through the recordings.

        The head is eth_blockNumber's recorded answer; when that is not a number (a recording
        that elides it), the highest block recorded whole. safe/finalized come from the
        recorded eth_getBlockByNumber("safe"/"finalized") answers, when there are any.
        """
        numbers = {k.lower(): v for k, v in (extra_numbers or {}).items()}
        blocks: dict[int, dict[str, dict[str, Any]]] = {}
        head: int | None = None
        tags: dict[str, int] = {}
        for ex in exchanges:
            result = ex.response.get("result")
            method = ex.method
            params = ex.request.get("params") or []
            if method == "eth_blockNumber":
                head = _hexint(result) if head is None else head
            elif method in _BLOCK_RESULTS and isinstance(result, dict):
                number = _hexint(result.get("number"))
                if number is None or not _is_hash(result.get("hash")):
                    continue
                numbers[result["hash"].lower()] = number
                txs = result.get("transactions") or []
                kind = "full" if txs and isinstance(txs[0], dict) else "hashes"
                blocks.setdefault(number, {})[kind] = result
                if not txs:  # no transactions: both forms are the same object
                    blocks[number]["full"] = result
                if (
                    method == "eth_getBlockByNumber"
                    and params
                    and params[0] in ("safe", "finalized")
                ):
                    tags[params[0]] = number
            elif method in _ITEM_RESULTS:
                for item in result if isinstance(result, list) else [result]:
                    if isinstance(item, dict):
                        n = _hexint(item.get("blockNumber"))
                        if n is not None and _is_hash(item.get("blockHash")):
                            numbers[item["blockHash"].lower()] = n
        if head is None:
            if not blocks:
                raise ValueError("the recordings name no head: no eth_blockNumber, no blocks")
            head = max(blocks)
        return cls(head, tags.get("safe"), tags.get("finalized"), numbers, blocks)

    def resolve(self, ref: Any) -> int | None:
        """The number of the block ``ref`` names, None when it names none we know."""
        if isinstance(ref, dict):
            if "blockHash" in ref:
                return self.resolve(ref["blockHash"]) if _is_hash(ref["blockHash"]) else None
            if "blockNumber" in ref:
                return self.resolve(ref["blockNumber"])
            return None
        if not isinstance(ref, str):
            return None
        if ref == "latest":
            return self.head
        if ref == "earliest":
            return 0
        if ref == "safe":
            return self.safe
        if ref == "finalized":
            return self.finalized
        if _is_hash(ref):
            return self.numbers.get(ref.lower())
        return _hexint(ref)  # "pending" and malformed references stay as they are

    def block(self, number: int, full: bool) -> dict[str, Any] | None:
        """The recorded block ``number``; the hashes-only form is derived from a full copy."""
        forms = self.blocks.get(number, {})
        if full:
            return forms.get("full")
        if "hashes" in forms:
            return forms["hashes"]
        whole = forms.get("full")
        if whole is None:
            return None
        return {**whole, "transactions": [tx["hash"] for tx in whole["transactions"]]}


def _marker(number: int) -> str:
    # Not a valid block reference in any client, so it cannot collide with a recorded one.
    return f"#block:{number}"


def normalise(method: str, params: Any, chain: RecordedChain) -> str:
    """The lookup key of a call with every block reference replaced by its block number."""
    if not isinstance(params, list):
        return method + canonical(params)
    out = list(params)
    where = BLOCK_PARAM.get(method)
    if where is not None:
        index, default = where
        if len(out) == index and default is not None:
            out.append(default)
        if len(out) > index:
            n = chain.resolve(out[index])
            if n is not None:
                out[index] = _marker(n)
    elif method == "eth_getLogs" and len(out) == 1 and isinstance(out[0], dict):
        flt = dict(out[0])
        if "blockHash" in flt:
            n = chain.resolve(flt["blockHash"])
            if n is not None:
                flt["blockHash"] = _marker(n)
        else:
            for name in ("fromBlock", "toBlock"):
                n = chain.resolve(flt.get(name, "latest"))
                if n is not None:
                    flt[name] = _marker(n)
        out[0] = flt
    return method + canonical(out)


def exact_key(method: str, params: Any) -> str:
    return method + canonical([] if params is None else params)


class Recordings:
    """Answers requests from a corpus's exchanges. Sans-I/O: a request in, a response out."""

    def __init__(self, exchanges: list[Exchange], chain: RecordedChain) -> None:
        self.chain = chain
        self.exact: dict[str, dict[str, Any]] = {}
        self.normalised: dict[str, dict[str, Any]] = {}
        # Keys recorded with different responses, and where: answered with an error, since
        # no single recorded answer is the right one.
        self.conflicts: dict[str, list[str]] = {}
        self.stats: Counter[str] = Counter()
        self.unmatched: list[dict[str, Any]] = []
        # Requests that matched only once their block references were normalised.
        self.rewritten: list[dict[str, Any]] = []
        for table, key_of in (
            (self.exact, lambda ex: exact_key(ex.method, ex.request.get("params"))),
            (self.normalised, lambda ex: normalise(ex.method, ex.request.get("params"), chain)),
        ):
            where: dict[str, list[str]] = {}
            for ex in exchanges:
                key = key_of(ex)
                body = {k: v for k, v in ex.response.items() if k != "id"}
                where.setdefault(key, []).append(ex.name)
                if key in table and table[key] != body:
                    self.conflicts[key] = where[key]
                table.setdefault(key, body)
            for key in where:
                if key in self.conflicts:
                    table.pop(key, None)

    def answer(self, request: Any) -> dict[str, Any]:
        """The recorded response to one request object, with the request's id."""
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            return self._error(None, -32600, "invalid request", "invalid")
        rid = request.get("id")
        method: str = request["method"]
        params = request.get("params")
        key = exact_key(method, params)
        if key in self.exact:
            return self._found(rid, self.exact[key], "exact")
        norm = normalise(method, params, self.chain)
        if norm in self.normalised:
            if len(self.rewritten) < MAX_KEPT:
                self.rewritten.append({"method": method, "params": params})
            return self._found(rid, self.normalised[norm], "normalised")
        derived = self._derive(method, params)
        if derived is not None:
            return self._found(rid, {"jsonrpc": "2.0", "result": derived}, "derived")
        if key in self.conflicts or norm in self.conflicts:
            where = self.conflicts.get(key) or self.conflicts[norm]
            return self._error(rid, NOT_RECORDED, f"conflicting recordings: {where}", "conflict")
        if len(self.unmatched) < MAX_KEPT:
            self.unmatched.append({"method": method, "params": params})
        log.warning("not in the recordings: %s %s", method, canonical(params)[:300])
        return self._error(rid, NOT_RECORDED, f"not in the recordings: {method}", "unmatched")

    def _derive(self, method: str, params: Any) -> dict[str, Any] | None:
        if not isinstance(params, list) or len(params) != 2 or not isinstance(params[1], bool):
            return None
        if method == "eth_getBlockByNumber":
            n = self.chain.resolve(params[0])
        elif method == "eth_getBlockByHash" and _is_hash(params[0]):
            n = self.chain.numbers.get(params[0].lower())
        else:
            return None
        return None if n is None else self.chain.block(n, params[1])

    def _found(self, rid: Any, body: dict[str, Any], how: str) -> dict[str, Any]:
        self.stats[how] += 1
        return {"jsonrpc": "2.0", "id": rid, **{k: v for k, v in body.items() if k != "jsonrpc"}}

    def _error(self, rid: Any, code: int, message: str, how: str) -> dict[str, Any]:
        self.stats[how] += 1
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


def recordings_for(name: str, root: Path = CORPORA) -> Recordings:
    """The replay of the corpus ``name`` (a key of ``corpora.FOLDERS``)."""
    exchanges = load(name, root)
    rlp = corpus_dir(name, root) / "chain.rlp"
    extra = chain_rlp_hashes(rlp) if rlp.exists() else None
    return Recordings(exchanges, RecordedChain.from_recordings(exchanges, extra))


# --- the server -----------------------------------------------------------------------------
def make_app(rec: Recordings) -> web.Application:
    async def rpc(request: web.Request) -> web.Response:
        try:
            doc = json.loads(await request.read())
        except ValueError:
            out: Any = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse"}}
        else:
            out = [rec.answer(d) for d in doc] if isinstance(doc, list) else rec.answer(doc)
        return web.Response(body=json.dumps(out).encode(), content_type="application/json")

    async def stats(_: web.Request) -> web.Response:
        body = {
            "answered": dict(rec.stats),
            "unmatched": rec.unmatched,
            "rewritten": rec.rewritten,
            "conflicts": rec.conflicts,
            "head": rec.chain.head,
        }
        return web.json_response(body)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/stats", stats)
    app.router.add_post("/{tail:.*}", rpc)
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.lab.recorded_upstream")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--corpus", choices=sorted(FOLDERS), required=True)
    ap.add_argument("--root", type=Path, default=CORPORA, help="the corpora folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rec = recordings_for(args.corpus, args.root)
    log.info(
        "%s: %d exact, %d normalised keys, head %d, %d conflicting keys",
        args.corpus,
        len(rec.exact),
        len(rec.normalised),
        rec.chain.head,
        len(rec.conflicts),
    )
    # run_app ends cleanly on SIGTERM, which is how the lab stops its processes.
    web.run_app(make_app(rec), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
