"""L2 batches on the wire, sans-I/O: the sequencer's signed message, the push messages a
sequencer sends an ingress node, and the feed frame a batch travels the tree in.

The sequencer signs, with its secp256k1 key (65 bytes: r | s | recovery id 0/1, over the
digest itself, no message prefix)::

    batch:      keccak(BATCH_DOMAIN | chain id u64 | stream 32s | seq u64 | keccak(payload))
    confirmed:  keccak(CONFIRMED_DOMAIN | chain id u64 | stream 32s | seq u64)

(stream: ASCII, NUL-padded to 32 bytes; integers big-endian). ``confirmed`` says every
batch up to and including ``seq`` is final on L1: nodes may trim their backlogs below it.

A batch's feed frame is ``feedframe``'s layout with ``kind = KIND_BATCH``, position =
seq, identity = chain id u64 | 16 zero bytes | seq u64, the payload as it came or lz4
compressed (``FLAG_LZ4``, when that shrinks it), and **the sequencer's signature** in the
signature field: the frame is the sequencer's signed batch, so every relay and subscriber
checks the sequencer itself, end to end, and an ingress node cannot alter a batch. The
origin time (set by the ingress that accepted it) is the only field nobody signs; it is
used for latency only.

A push message (WebSocket binary message, or the body of ``POST /batches``)::

    type u8 (1 push, 2 confirmed) | relays u8 (acknowledge once this many relays hold it;
    0: once durable here) | reserved u16 (0) | stream 32s | seq u64 | signature 65s |
    payload (push only: the rest of the message)
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from urllib.parse import parse_qsl

import lz4.block

from chainrelay.tree.frame import (
    FLAG_LZ4,
    HEADER,
    KIND_BATCH,
    SIGNATURE_LEN,
    STREAM_MAX,
    VERSION,
    Frame,
    FrameError,
    Signer,
    keccak,
    recover,
    unpack,
)
from chainrelay.tree.session import POSITION_END

BATCH_DOMAIN = b"chainrelay/batch/v1\x00"
CONFIRMED_DOMAIN = b"chainrelay/confirmed/v1\x00"

PUSH = 1
CONFIRMED = 2
PUSH_HEADER = struct.Struct(">BBH32sQ65s")
PUSH_HEADER_LEN = PUSH_HEADER.size  # 109
_IDENTITY = struct.Struct(">Q16xQ")
_SIGNED = struct.Struct(">Q32sQ")
# lz4 is kept only when it saves at least this fraction: a batch is most often compressed
# already (brotli), and relays would decompress it for nothing to check its hash.
LZ4_MIN_SAVING = 1 / 16
# Bytes of a large payload tried first: enough for lz4 to find repeats in structured data.
LZ4_SAMPLE = 4096


@functools.lru_cache(maxsize=256)  # a node carries a handful of streams
def stream_field(stream: str) -> bytes:
    """``stream`` as its 32-byte field (``ValueError`` if it cannot be one)."""
    b = stream.encode("ascii")
    if not b or len(b) > STREAM_MAX or b"\x00" in b:
        raise ValueError(f"stream name must be 1-{STREAM_MAX} ASCII characters: {stream!r}")
    return b.ljust(STREAM_MAX, b"\x00")


def batch_digest(chain_id: int, stream: str, seq: int, payload_hash: bytes) -> bytes:
    """What the sequencer signs for batch ``seq`` (``payload_hash``: keccak of the payload)."""
    return keccak(BATCH_DOMAIN + _SIGNED.pack(chain_id, stream_field(stream), seq) + payload_hash)


def confirmed_digest(chain_id: int, stream: str, seq: int) -> bytes:
    """What the sequencer signs to say batches up to ``seq`` are final."""
    return keccak(CONFIRMED_DOMAIN + _SIGNED.pack(chain_id, stream_field(stream), seq))


def batch_identity(chain_id: int, seq: int) -> bytes:
    return _IDENTITY.pack(chain_id, seq)


def identity_parts(identity: bytes) -> tuple[int, int]:
    """``(chain id, seq)`` of a batch frame's identity; ``FrameError`` if it is not one."""
    if len(identity) != 32 or identity[8:24] != bytes(16):
        raise FrameError("identity", "not a batch identity")
    chain_id, seq = _IDENTITY.unpack(identity)
    return chain_id, seq


def sign_batch(key: Signer, chain_id: int, stream: str, seq: int, payload: bytes) -> bytes:
    return key.sign(batch_digest(chain_id, stream, seq, keccak(payload)))


def sign_confirmed(key: Signer, chain_id: int, stream: str, seq: int) -> bytes:
    return key.sign(confirmed_digest(chain_id, stream, seq))


# --- the frame ------------------------------------------------------------------------------
def encode_frame(
    *,
    chain_id: int,
    stream: str,
    seq: int,
    payload: bytes,
    signature: bytes,
    origin_us: int,
) -> bytes:
    """A batch's feed frame, made once by the ingress node that accepted it."""
    if len(signature) != SIGNATURE_LEN:
        raise ValueError("a signature is 65 bytes")
    flags = 0
    body = payload
    if len(payload) >= 64 and _worth_lz4(payload):
        packed = lz4.block.compress(payload, store_size=True)
        if len(packed) <= len(payload) * (1 - LZ4_MIN_SAVING):
            body, flags = packed, FLAG_LZ4
    header = HEADER.pack(
        VERSION,
        KIND_BATCH,
        flags,
        stream_field(stream),
        seq,
        batch_identity(chain_id, seq),
        origin_us,
        len(body),
    )
    return b"".join((header, body, signature))


def _worth_lz4(payload: bytes) -> bool:
    """Whether lz4 may save ``LZ4_MIN_SAVING`` of a large payload, judged by its first
    ``LZ4_SAMPLE`` bytes: a compressed batch (the common case) is then not compressed in
    full for nothing (80 µs for 100 KB)."""
    if len(payload) <= 2 * LZ4_SAMPLE:
        return True
    sample = payload[:LZ4_SAMPLE]
    return len(lz4.block.compress(sample, store_size=False)) <= LZ4_SAMPLE * (1 - LZ4_MIN_SAVING)


def open_frame(frame: Frame, max_payload_bytes: int) -> tuple[bytes, bytes]:
    """``(sequencer address, payload)`` of a batch frame, the signature checked against the
    frame's own chain id, stream, seq and payload; ``FrameError`` for any frame that is not
    a well-formed batch (the payload is unpacked within ``max_payload_bytes``)."""
    if frame.kind != KIND_BATCH:
        raise FrameError("kind", str(frame.kind))
    chain_id, seq = identity_parts(frame.identity)
    if seq != frame.position:
        raise FrameError("identity", f"seq {seq} at position {frame.position}")
    try:
        stream_field(frame.stream)
    except ValueError:  # feedframe.decode keeps bytes after a NUL; no sequencer signs them
        raise FrameError("stream", repr(frame.stream)) from None
    payload = unpack(frame, max_payload_bytes)
    digest = batch_digest(chain_id, frame.stream, seq, keccak(payload))
    return recover(frame.signature, digest), payload


def frame_chain_id(frame: Frame) -> int:
    return identity_parts(frame.identity)[0]


# --- answers to pushes -----------------------------------------------------------------------
# A refused push's error code (JSON-RPC server range), as the ingress answers it and the
# publisher acts on it.
GAP = -32040  # not the next expected number; data.expected
CONFLICT = -32041  # another payload is accepted for this number
SIGNER = -32042  # the signature is not a sequencer's of this stream
SIGNATURE = -32043  # the signature is unreadable
TOO_LARGE = -32044  # payload over the limit; data.limit
UNKNOWN_STREAM = -32045
NOT_HELD = -32046  # durable, but not held by the relays asked for in time
NOT_DURABLE = -32047  # the log failed: push it again
MALFORMED = -32600
INTERNAL = -32603


# --- push messages --------------------------------------------------------------------------
class PushError(ValueError):
    """A push message that cannot be read at all (answered -32600)."""


@dataclass(frozen=True, slots=True)
class Push:
    """One push message: a batch (``kind == PUSH``) or a confirmation (``CONFIRMED``)."""

    kind: int
    stream: str
    seq: int
    signature: bytes
    payload: bytes = b""
    relays: int = 0  # acknowledge once this many relays hold the batch (0: once durable)


def encode_push(push: Push) -> bytes:
    header = PUSH_HEADER.pack(
        push.kind, push.relays, 0, stream_field(push.stream), push.seq, push.signature
    )
    return header + push.payload if push.payload else header


def decode_push(data: bytes) -> Push:
    """A push message; ``PushError`` for anything malformed."""
    if len(data) < PUSH_HEADER_LEN:
        raise PushError(f"a push message is at least {PUSH_HEADER_LEN} bytes, got {len(data)}")
    kind, relays, reserved, stream_b, seq, signature = PUSH_HEADER.unpack_from(data)
    if kind not in (PUSH, CONFIRMED):
        raise PushError(f"unknown push message type {kind}")
    if reserved:
        raise PushError("reserved bits set")
    name = stream_b.rstrip(b"\x00")
    try:
        stream = name.decode("ascii")
    except UnicodeDecodeError:
        raise PushError("stream name is not ASCII") from None
    if not stream or b"\x00" in name:
        raise PushError("stream name is empty or holds NUL bytes")
    if seq >= POSITION_END:
        raise PushError("seq out of range")  # sqlite keeps signed 64-bit integers
    payload = data[PUSH_HEADER_LEN:]
    if kind == CONFIRMED and payload:
        raise PushError("a confirmed message carries no payload")
    return Push(kind, stream, seq, signature, payload, relays)


# --- range requests and answers (GET /feed/range) ---------------------------------------------
_LEN = struct.Struct(">I")
# Fields a range query may have: stream, from, limit, and room for a proxy's or a cache
# buster's one or two more; parsing a query of thousands of fields is work for nothing.
MAX_RANGE_FIELDS = 8
# A seq or a count as a range query writes it: plain decimal digits, no sign, no blanks,
# no underscores (Python's int() takes all three), at most 19 (2^63 has 19 digits).
_DECIMAL = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True, slots=True)
class RangeQuery:
    """``GET /feed/range?stream=S&from=N[&limit=K]``: batches of ``stream`` from seq
    ``start``, at most ``limit`` of them (None: as many as the node serves at once)."""

    stream: str
    start: int
    limit: int | None = None


def parse_range_query(query: bytes) -> RangeQuery:
    """A range request's query string; ``ValueError`` with a message a client can act on
    for anything else (answered 400): every integer is checked for type and range here,
    none reaches the log or the backlog unchecked."""
    try:
        pairs = parse_qsl(
            query.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_RANGE_FIELDS,
        )
    except UnicodeDecodeError:
        raise ValueError("the query must be ASCII (percent-encode the rest)") from None
    except ValueError:
        raise ValueError(f"at most {MAX_RANGE_FIELDS} query fields") from None
    fields: dict[str, str] = {}
    for key, value in pairs:
        if key in fields and key in ("stream", "from", "limit"):
            raise ValueError(f"{key} given twice")
        fields[key] = value
    stream = fields.get("stream", "")
    try:
        stream_field(stream)
    except (ValueError, UnicodeEncodeError):
        raise ValueError(f"stream must be 1-{STREAM_MAX} ASCII characters") from None
    start = _query_int(fields.get("from"), "from", 0)
    limit = fields.get("limit")
    return RangeQuery(stream, start, None if limit is None else _query_int(limit, "limit", 1))


def _query_int(text: str | None, name: str, low: int) -> int:
    if text is None or not _DECIMAL.fullmatch(text) or not low <= int(text) < POSITION_END:
        raise ValueError(f"{name} must be an integer from {low} to 2^63-1")
    return int(text)


def encode_range(frames: list[bytes]) -> bytes:
    """A range answer's body: each frame as ``u32 length | frame``, back to back."""
    parts: list[bytes] = []
    for f in frames:
        parts.append(_LEN.pack(len(f)))
        parts.append(f)
    return b"".join(parts)


def decode_range(body: bytes, max_frame_bytes: int) -> list[bytes]:
    """The frames of a range answer; ``FrameError("range")`` if it is cut or a length lies."""
    out: list[bytes] = []
    at, n = 0, len(body)
    while at < n:
        if at + 4 > n:
            raise FrameError("range", "cut inside a length")
        (size,) = _LEN.unpack_from(body, at)
        at += 4
        if size > max_frame_bytes or at + size > n:
            raise FrameError("range", f"frame of {size} bytes at {at}")
        out.append(body[at : at + size])
        at += size
    return out
