"""JSON-RPC batches to an upstream: the request of a chunk of calls, and its answers read
back one per call, paired by id.

Sans-I/O. Each call's answer is cut out of the batch's answer as the bytes the upstream
wrote for it, then read by ``parse_answer`` as a single call's answer is: a call answered
in a batch carries exactly the result (or error) it would carry alone.

An answer that is not an array of answers to every id sent (an error object, as providers
that refuse batches answer, or an array missing ids) is ``NotABatchAnswer``: the chunk is
then asked call by call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import orjson

from chainrelay.wire.jsonrpc import Answer, Params, encode_request, parse_answer

# (method, params) of one call of a chunk; params None: the member is left out.
BatchCall = tuple[str, Params | None]

_WS = " \t\r\n"


class NotABatchAnswer(ValueError):
    """The upstream's answer to a batch answers not every call of it."""


def encode_batch(first_id: int, calls: Sequence[BatchCall]) -> bytes:
    """The request of ``calls``, their ids ``first_id`` onwards in order."""
    return (
        b"["
        + b",".join(encode_request(first_id + i, m, p) for i, (m, p) in enumerate(calls))
        + b"]"
    )


def parse_batch(raw: bytes, first_id: int, n: int) -> list[Answer]:
    """The answers of the ``n`` calls sent with ids ``first_id`` onwards, in that order.

    Raises ``NotABatchAnswer`` when ``raw`` is not an array holding an answer to each of
    them (extra or unknown members are ignored, as a duplicate of one)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None  # a number beyond a float, or not JSON: the exact reader below decides
    if doc is not None and not isinstance(doc, list):
        raise NotABatchAnswer("an object, not an array")
    members = _members(raw, doc)
    got: list[Answer | None] = [None] * n
    for value, body in members:
        rid = value.get("id") if isinstance(value, dict) else None
        if not isinstance(rid, int) or isinstance(rid, bool):
            continue
        at = rid - first_id
        if 0 <= at < n and got[at] is None:
            try:
                got[at] = parse_answer(body)
            except ValueError as exc:
                raise NotABatchAnswer(f"answer to id {rid}: {exc}") from None
    missing = sum(1 for a in got if a is None)
    if missing:
        raise NotABatchAnswer(f"{missing} of {n} calls unanswered")
    return [a for a in got if a is not None]


def _members(raw: bytes, doc: list[object] | None) -> list[tuple[object, bytes]]:
    """Each member of the array ``raw``, decoded and as the bytes the upstream wrote.

    The usual case costs one encoding: an answer written compactly (geth, erigon, anvil)
    is its members' compact encodings joined, and each is then its own bytes. Any other
    spelling is cut by the stdlib's scanner, which gives each member's end."""
    if doc is not None:
        try:
            parts = [orjson.dumps(v) for v in doc]
        except TypeError:
            parts = []
        if len(parts) == len(doc) and b"[" + b",".join(parts) + b"]" == raw:
            return list(zip(doc, parts, strict=True))
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise NotABatchAnswer("not UTF-8") from None
    decoder = json.JSONDecoder()
    out: list[tuple[object, bytes]] = []
    i = _skip(text, 0)
    if not text.startswith("[", i):
        raise NotABatchAnswer("not an array")
    i = _skip(text, i + 1)
    if text.startswith("]", i):
        return out
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            raise NotABatchAnswer("not JSON") from None
        out.append((value, text[i:end].encode()))
        i = _skip(text, end)
        if text.startswith(",", i):
            i = _skip(text, i + 1)
            continue
        if text.startswith("]", i) and not text[i + 1 :].strip(_WS):
            return out
        raise NotABatchAnswer("not a JSON array")


def _skip(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i
