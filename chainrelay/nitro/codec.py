"""Nitro's sequencer feed on the wire, sans-I/O: the ``BroadcastMessage`` a sequencer (or
Nitro's relay) sends as a WebSocket text message, split into its feed messages' exact
bytes, and built again from those bytes.

A broadcast message, as Nitro's Go encoder writes it (``json.Encoder``: compact, keys in
struct order, a trailing newline)::

    {"version":1,"messages":[<feed message>,...],
     "confirmedSequenceNumberMessage":{"sequenceNumber":N}}\\n

``messages`` and the confirmation are each optional. A feed message is an object with
``sequenceNumber``, ``message`` (``{"message":{"header":{...},"l2Msg":base64},
"delayedMessagesRead":N}``) and, in newer versions, ``blockHash``, ``signature`` or
``signatureV2`` (base64, or null) and ``blockMetadata``.

**A feed message is never re-serialized.** The tree carries each one as the bytes the
sequencer sent (``FeedMessage.raw``, a slice of the text it came in), and a leaf wraps
those bytes again; so whatever the sequencer signs or adds in a later version reaches
every Nitro node as it was, and a field this module does not know is not lost.

The sequencer's signature comes in two kinds, each over its own hash (go-ethereum's
``crypto.Sign``: 65 bytes r | s | v, v 0 or 1, over the hash itself):

- ``signatureV2`` (Nitro since November 2025, ``BroadcastFeedMessage.SignatureHash`` in
  ``broadcaster/message/message.go``), over the fields a node uses::

    keccak("Arbitrum Nitro Feed:" | chain id u64 | seq u64 | [block hash 32] |
           block metadata | delayed messages read u64 | kind u8 | poster 20 |
           L1 block number u64 | timestamp u64 | [request id 32] | [L1 base fee, big-endian,
           minimal] | l2 message)

  (integers big-endian; a bracketed part only when present);
- ``signature`` (Nitro before it: ``MessageWithMetadata.Hash`` in ``arbos/arbostypes/
  messagewithmeta.go``, removed by Nitro's commit 2b3cf21), over the RLP of the whole L1
  message, so a field added to it changes the hash::

    keccak("Arbitrum Nitro Feed:" | seq u64 | chain id u64 | delayed messages read u64 |
           rlp(L1IncomingMessage))

  with ``rlp(L1IncomingMessage)`` = ``[[kind, poster, L1 block number, timestamp,
  request id (absent: an empty list), L1 base fee (absent: empty)], l2 message,
  (optional) batchGasCost, (optional) [batchDataTokens.length, .nonzeros]]``.

A message with a ``signatureV2`` field is checked with the first (what a Nitro node of
today reads), one with only a ``signature`` field with the second (what the Nitro nodes
that wrote that field read).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from chainrelay.tree.frame import FrameError, keccak, recover

SIGNATURE_PREFIX = b"Arbitrum Nitro Feed:"
BROADCAST_VERSION = 1
# Headers of the feed's WebSocket upgrade (Nitro's wsbroadcastserver).
CLIENT_VERSION_HEADER = "Arbitrum-Feed-Client-Version"
SERVER_VERSION_HEADER = "Arbitrum-Feed-Server-Version"
REQUESTED_SEQ_HEADER = "Arbitrum-Requested-Sequence-Number"
CHAIN_ID_HEADER = "Arbitrum-Chain-Id"
FEED_VERSION = 2  # both sides' version number since Nitro's first release
SEQ_END = 2**63  # sqlite keeps signed 64-bit integers; Nitro's are uint64 in practice far less

_U64 = struct.Struct(">Q")
_STRUCTURAL = re.compile(rb'["\[\]{}]')
# The rest of a JSON string after its opening quote (escapes skipped whole), in C.
_STRING_REST = re.compile(rb'(?:[^"\\]|\\.)*"', re.DOTALL)
_WS = b" \t\r\n"


class NitroFormatError(ValueError):
    """A broadcast message that is not one: not JSON, not an object, a feed message
    without a usable sequence number. Its text says what, for the log line."""


@dataclass(frozen=True, slots=True)
class FeedMessage:
    """One feed message: its sequence number and its JSON, byte for byte as sent."""

    seq: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class Broadcast:
    """One broadcast message: its feed messages in the order sent, and the confirmation."""

    version: int
    messages: list[FeedMessage]
    confirmed: int | None = None


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise NitroFormatError(f"not JSON: {exc}") from None


def _loads_exact(data: bytes) -> Any:
    """JSON with integers read exactly: orjson reads one past 64 bits (an L1 base fee may
    be written as one) as a float, which would change the signed hash."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise NitroFormatError(f"not JSON: {exc}") from None


def parse_broadcast(data: bytes, max_messages: int = 100_000) -> Broadcast:
    """A broadcast message's parts; ``NitroFormatError`` for anything that is not one.
    Each feed message's ``raw`` is its slice of ``data``, untouched."""
    doc = _loads(data)
    if not isinstance(doc, dict):
        raise NitroFormatError("a broadcast message is a JSON object")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise NitroFormatError("version missing or not an integer")
    confirmed = None
    conf = doc.get("confirmedSequenceNumberMessage")
    if conf is not None:
        if not isinstance(conf, dict):
            raise NitroFormatError("confirmedSequenceNumberMessage is not an object")
        confirmed = _seq(conf.get("sequenceNumber"), "confirmedSequenceNumberMessage")
    items = doc.get("messages")
    if items is None:
        return Broadcast(version, [], confirmed)
    if not isinstance(items, list):
        raise NitroFormatError("messages is not a list")
    if len(items) > max_messages:
        raise NitroFormatError(f"{len(items)} messages in one broadcast (at most {max_messages})")
    spans = message_spans(data)
    if len(spans) != len(items):
        raise NitroFormatError("every feed message must be a JSON object")
    out = []
    for item, (a, b) in zip(items, spans, strict=True):
        if not isinstance(item, dict):
            raise NitroFormatError("a feed message is not an object")
        out.append(FeedMessage(_seq(item.get("sequenceNumber"), "feed message"), data[a:b]))
    return Broadcast(version, out, confirmed)


def _seq(v: object, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < SEQ_END:
        raise NitroFormatError(f"{where}: sequenceNumber missing or out of range")
    return v


def message_spans(data: bytes) -> list[tuple[int, int]]:
    """``[(start, end)]`` of each object in the top-level ``messages`` array of valid JSON
    ``data`` (checked already), found without building anything: strings (the bulk: base64
    L2 messages) are skipped by one regex match each."""
    spans: list[tuple[int, int]] = []
    depth = 0
    pos = 0
    in_messages = False
    found = False
    start = -1
    search, rest = _STRUCTURAL.search, _STRING_REST.match
    while (m := search(data, pos)) is not None:
        i = m.start()
        c = data[i]
        if c == 0x22:  # a string
            r = rest(data, i + 1)
            if r is None:
                raise NitroFormatError("unterminated string")
            end = r.end()
            if depth == 1 and data[i + 1 : end - 1] == b"messages":
                j = _skip_ws(data, end)
                if data[j : j + 1] == b":":
                    k = _skip_ws(data, j + 1)
                    if data[k : k + 1] == b"[":
                        if found:
                            raise NitroFormatError("messages given twice")
                        found = in_messages = True
                        depth = 2
                        pos = k + 1
                        continue
            pos = end
            continue
        if c in (0x7B, 0x5B):  # { [
            depth += 1
            if in_messages and depth == 3 and c == 0x7B:
                start = i
        else:
            if in_messages and depth == 3 and c == 0x7D:
                spans.append((start, i + 1))
            depth -= 1
            if in_messages and depth == 1:
                in_messages = False
        pos = i + 1
    return spans


def _skip_ws(data: bytes, i: int) -> int:
    n = len(data)
    while i < n and data[i] in _WS:
        i += 1
    return i


def encode_broadcast(raws: Sequence[bytes], confirmed: int | None = None) -> bytes:
    """A broadcast message holding the feed messages ``raws`` (their bytes as they came)
    and the confirmation, as Nitro's encoder writes it: a Nitro node's copy of a feed
    message it reads from a leaf is byte for byte the sequencer's."""
    parts = [b'{"version":1']
    if raws:
        parts.append(b',"messages":[')
        parts.append(b",".join(raws))
        parts.append(b"]")
    if confirmed is not None:
        parts.append(b',"confirmedSequenceNumberMessage":{"sequenceNumber":%d}' % confirmed)
    parts.append(b"}\n")
    return b"".join(parts)


# --- the sequencer's signature ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Signed:
    """What a feed message's signature covers, the signature (None: not signed), and its
    kind (2: ``signatureV2``, 1: the older ``signature``)."""

    hash_input: bytes
    signature: bytes | None
    version: int = 2


def _b64(v: object, where: str) -> bytes:
    if v is None:
        return b""
    if not isinstance(v, str):
        raise NitroFormatError(f"{where} is not base64")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise NitroFormatError(f"{where} is not base64") from None


def _hex(v: object, size: int, where: str) -> bytes:
    if not isinstance(v, str) or not v.startswith("0x") or len(v) != 2 + 2 * size:
        raise NitroFormatError(f"{where} is not {size} hex bytes")
    try:
        return bytes.fromhex(v[2:])
    except ValueError:
        raise NitroFormatError(f"{where} is not {size} hex bytes") from None


def _uint(v: object, where: str, bits: int = 64) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**bits:
        raise NitroFormatError(f"{where} is not an unsigned integer")
    return v


def signed_parts(raw: bytes, chain_id: int, version: int | None = None) -> Signed:
    """The bytes a feed message's signature hashes and its signature: ``signatureV2`` over
    ``SignatureHash``'s input, or (no such field) ``signature`` over the older hash's input
    (``version`` 1 or 2: that kind's, whatever the message carries); ``NitroFormatError``
    if a field it needs is missing or malformed."""
    doc = _loads_exact(raw)
    if not isinstance(doc, dict):
        raise NitroFormatError("a feed message is a JSON object")
    seq = _seq(doc.get("sequenceNumber"), "feed message")
    mwm = doc.get("message")
    if not isinstance(mwm, dict) or not isinstance(mwm.get("message"), dict):
        raise NitroFormatError("message.message missing")
    msg = mwm["message"]
    header = msg.get("header")
    if not isinstance(header, dict):
        raise NitroFormatError("message.message.header missing")
    delayed = _U64.pack(_uint(mwm.get("delayedMessagesRead", 0), "delayedMessagesRead"))
    if version is None:
        # Which Nitro wrote it: each writes its own field always (null when unsigned), and
        # a Nitro node of today reads only "signatureV2".
        version = 1 if "signatureV2" not in doc and "signature" in doc else 2
    if version == 1:
        signature = _b64(doc.get("signature"), "signature") or None
        v1 = [SIGNATURE_PREFIX, _U64.pack(seq), _U64.pack(chain_id), delayed, _rlp_message(msg)]
        return Signed(b"".join(v1), signature, 1)
    signature = _b64(doc.get("signatureV2"), "signatureV2") or None
    parts = [SIGNATURE_PREFIX, _U64.pack(chain_id), _U64.pack(seq)]
    block_hash = doc.get("blockHash")
    if block_hash is not None:
        parts.append(_hex(block_hash, 32, "blockHash"))
    parts.append(_b64(doc.get("blockMetadata"), "blockMetadata"))
    parts.append(delayed)
    parts.append(bytes((_uint(header.get("kind"), "header.kind", 8),)))
    parts.append(_hex(header.get("sender"), 20, "header.sender"))
    parts.append(_U64.pack(_uint(header.get("blockNumber"), "header.blockNumber")))
    parts.append(_U64.pack(_uint(header.get("timestamp"), "header.timestamp")))
    request_id = header.get("requestId")
    if request_id is not None:
        parts.append(_hex(request_id, 32, "header.requestId"))
    base_fee = header.get("baseFeeL1")
    if base_fee is not None:
        fee = _uint(base_fee, "header.baseFeeL1", 256)
        parts.append(fee.to_bytes((fee.bit_length() + 7) // 8, "big"))
    parts.append(_b64(msg.get("l2Msg"), "l2Msg"))
    return Signed(b"".join(parts), signature, 2)


# --- RLP, as go-ethereum's rlp.EncodeToBytes writes the older hash's L1 message ----------------
def _rlp_length(n: int, offset: int) -> bytes:
    if n < 56:
        return bytes((offset + n,))
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((offset + 55 + len(size),)) + size


def _rlp_bytes(b: bytes) -> bytes:
    if len(b) == 1 and b[0] < 0x80:
        return b
    return _rlp_length(len(b), 0x80) + b


def _rlp_uint(v: int) -> bytes:
    return _rlp_bytes(v.to_bytes((v.bit_length() + 7) // 8, "big"))  # 0: the empty string


def _rlp_list(items: Sequence[bytes]) -> bytes:
    body = b"".join(items)
    return _rlp_length(len(body), 0xC0) + body


def _rlp_message(msg: dict[str, Any]) -> bytes:
    """``rlp.EncodeToBytes(L1IncomingMessage)``: the header (a nil request id is an empty
    list, ``rlp:"nilList"``; a nil base fee the empty string), the L2 message, then the
    optional fields, left out from the last one present."""
    h = msg["header"]
    request_id = h.get("requestId")
    base_fee = h.get("baseFeeL1")
    header = _rlp_list(
        [
            _rlp_uint(_uint(h.get("kind"), "header.kind", 8)),
            _rlp_bytes(_hex(h.get("sender"), 20, "header.sender")),
            _rlp_uint(_uint(h.get("blockNumber"), "header.blockNumber")),
            _rlp_uint(_uint(h.get("timestamp"), "header.timestamp")),
            b"\xc0" if request_id is None else _rlp_bytes(_hex(request_id, 32, "header.requestId")),
            b"\x80" if base_fee is None else _rlp_uint(_uint(base_fee, "header.baseFeeL1", 256)),
        ]
    )
    items = [header, _rlp_bytes(_b64(msg.get("l2Msg"), "l2Msg"))]
    gas = msg.get("batchGasCost")
    stats = msg.get("batchDataTokens")
    optional: list[bytes | None] = [
        None if gas is None else _rlp_uint(_uint(gas, "batchGasCost")),
        None if stats is None else _rlp_stats(stats),
    ]
    while optional and optional[-1] is None:
        optional.pop()
    items += [b"\x80" if o is None else o for o in optional]  # a nil *uint64: empty
    return _rlp_list(items)


def _rlp_stats(stats: object) -> bytes:
    if not isinstance(stats, dict):
        raise NitroFormatError("batchDataTokens is not an object")
    return _rlp_list(
        [
            _rlp_uint(_uint(stats.get("length", 0), "batchDataTokens.length")),
            _rlp_uint(_uint(stats.get("nonzeros", 0), "batchDataTokens.nonzeros")),
        ]
    )


def signature_hash(raw: bytes, chain_id: int, version: int | None = None) -> bytes:
    """The hash the signature of feed message ``raw`` on chain ``chain_id`` signs: Nitro's
    ``SignatureHash``, or for a message carrying only the older ``signature`` (or with
    ``version`` 1), the older hash."""
    return keccak(signed_parts(raw, chain_id, version).hash_input)


def feed_signer(raw: bytes, chain_id: int) -> bytes | None:
    """The 20-byte address that signed feed message ``raw`` (None: it carries no
    signature); ``NitroFormatError`` for a malformed message or an unreadable signature."""
    signed = signed_parts(raw, chain_id)
    if signed.signature is None:
        return None
    try:
        return recover(signed.signature, keccak(signed.hash_input))
    except FrameError:
        raise NitroFormatError("signature unreadable (65 bytes r|s|v, v 0 or 1)") from None


def l1_block_number(raw: bytes) -> int | None:
    """The L1 block number in a feed message's header (None if it has none): for a tail's
    line, not for anything that decides."""
    try:
        doc = _loads(raw)
        n = doc["message"]["message"]["header"]["blockNumber"]
    except (NitroFormatError, KeyError, TypeError):
        return None
    return n if isinstance(n, int) else None
