"""The recorded JSON-RPC corpora in ``tests/corpora``, read as exchanges and chain facts.

Two layouts (see the corpora's README.md):

* ``execution-apis/<method>/<name>.io``: lines ``>> request`` then ``<< response``, one JSON
  object per line, ``//`` comments; a file may hold several exchanges, in order. The chain
  they were recorded from is ``chain.rlp`` (blocks 1..head) beside ``genesis.json``.
* ``erigon-arb-sepolia/<method>/test_NN.json``: a JSON array of ``{"request", "response"}``.

Everything here is plain data and file reading: no sockets, no asyncio. JSON is read with the
standard library so integers of any size stay exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import keccak

# Kept inside the repository (with their origins and licences), so any clone runs them.
CORPORA = Path(__file__).resolve().parents[1] / "corpora"

# Corpus names used on the command line -> their folder under CORPORA.
FOLDERS: dict[str, str] = {
    "execution-apis": "execution-apis",
    "arb-sepolia": "erigon-arb-sepolia",
}


@dataclass(frozen=True, slots=True)
class Exchange:
    """One recorded request and the response the node gave to it."""

    source: str  # path inside the corpus folder, e.g. "eth_call/call-contract.io"
    index: int  # position of the exchange inside its file
    request: dict[str, Any]
    response: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.source}#{self.index}"

    @property
    def method(self) -> str:
        return str(self.request.get("method", ""))


def corpus_dir(name: str, root: Path = CORPORA) -> Path:
    """The folder of the corpus called ``name`` (a key of ``FOLDERS``)."""
    return root / FOLDERS[name]


def parse_io(text: str, source: str) -> list[Exchange]:
    """The exchanges of one ``.io`` file's text."""
    out: list[Exchange] = []
    pending: dict[str, Any] | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("//"):
            continue
        mark, body = line[:2], line[2:]
        if mark == ">>":
            if pending is not None:
                raise ValueError(f"{source}:{lineno}: a request follows a request")
            pending = _object(body, source, lineno)
        elif mark == "<<":
            if pending is None:
                raise ValueError(f"{source}:{lineno}: a response without a request")
            out.append(Exchange(source, len(out), pending, _object(body, source, lineno)))
            pending = None
        else:
            raise ValueError(f"{source}:{lineno}: expected '>>', '<<' or '//'")
    if pending is not None:
        raise ValueError(f"{source}: the last request has no response")
    return out


def _object(text: str, source: str, lineno: int) -> dict[str, Any]:
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError(f"{source}:{lineno}: expected one JSON object (batches are not recorded)")
    return doc


def load_execution_apis(folder: Path) -> list[Exchange]:
    """Every exchange of every ``.io`` file under ``folder``, files in sorted order."""
    out: list[Exchange] = []
    for path in sorted(folder.rglob("*.io")):
        out.extend(parse_io(path.read_text(), path.relative_to(folder).as_posix()))
    return out


def load_erigon(folder: Path) -> list[Exchange]:
    """Every exchange of the rpc-tests JSON files under ``folder``, files in sorted order."""
    out: list[Exchange] = []
    for path in sorted(folder.glob("*/*.json")):
        source = path.relative_to(folder).as_posix()
        doc = json.loads(path.read_text())
        if not isinstance(doc, list):
            raise ValueError(f"{source}: expected a JSON array of exchanges")
        for i, item in enumerate(doc):
            req, resp = item.get("request"), item.get("response")
            if not isinstance(req, dict) or not isinstance(resp, dict):
                raise ValueError(f"{source}[{i}]: expected single request and response objects")
            out.append(Exchange(source, i, req, resp))
    return out


def load(name: str, root: Path = CORPORA) -> list[Exchange]:
    folder = corpus_dir(name, root)
    if name == "execution-apis":
        return load_execution_apis(folder)
    return load_erigon(folder)


# --- chain.rlp ------------------------------------------------------------------------------
def _rlp_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(payload start, payload end, is_list) of the RLP item at ``pos``."""
    b = data[pos]
    if b < 0x80:
        return pos, pos + 1, 0
    if b < 0xB8:
        return pos + 1, pos + 1 + b - 0x80, 0
    if b < 0xC0:
        n = b - 0xB7
        size = int.from_bytes(data[pos + 1 : pos + 1 + n], "big")
        return pos + 1 + n, pos + 1 + n + size, 0
    if b < 0xF8:
        return pos + 1, pos + 1 + b - 0xC0, 1
    n = b - 0xF7
    size = int.from_bytes(data[pos + 1 : pos + 1 + n], "big")
    return pos + 1 + n, pos + 1 + n + size, 1


def _rlp_children(data: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """(offset, end) of each whole child item of the list payload ``data[start:end]``."""
    out = []
    pos = start
    while pos < end:
        _, item_end, _ = _rlp_item(data, pos)
        out.append((pos, item_end))
        pos = item_end
    return out


def chain_rlp_hashes(path: Path) -> dict[str, int]:
    """Block hash -> number for every block of an exported chain (concatenated RLP blocks).

    A block is ``[header, transactions, uncles, ...]``; its hash is keccak of the header's
    RLP bytes, and the header's ninth field is the block number.
    """
    data = path.read_bytes()
    out: dict[str, int] = {}
    pos = 0
    while pos < len(data):
        start, end, is_list = _rlp_item(data, pos)
        if not is_list:
            raise ValueError(f"{path}: expected an RLP list at offset {pos}")
        h_off, h_end = _rlp_children(data, start, end)[0]
        h_start, h_payload_end, _ = _rlp_item(data, h_off)
        fields = _rlp_children(data, h_start, h_payload_end)
        n_off = fields[8][0]
        n_start, n_payload_end, _ = _rlp_item(data, n_off)
        number = int.from_bytes(data[n_start:n_payload_end], "big")
        out["0x" + keccak(data[h_off:h_end]).hex()] = number
        pos = end
    return out
