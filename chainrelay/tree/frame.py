"""Feed frames: one signed, compressed message of a stream, sans-I/O.

A frame is one WebSocket binary message, laid out as::

    header (88 bytes, big-endian)
        version u8 | kind u8 | flags u16 | stream 32s (ASCII, NUL-padded) | position u64 |
        identity 32s | origin time u64 (microseconds since the epoch) | payload length u32
    payload  (payload-length bytes: lz4 block with its size, optionally hex-packed inside)
    signature (65 bytes: r | s | recovery id), by the origin's secp256k1 key, over
        keccak(DOMAIN | header | keccak(payload))

The origin encodes a frame once; every relay forwards the same bytes. Checking a frame
(``decode`` then ``signer``) needs no decompression, so a relay verifies and forwards
before it unpacks; unpacking (``unpack``) is bounded by a decompressed-size limit, so an
lz4 bomb costs nothing.

Hex packing: Ethereum JSON is mostly ``"0x…"`` strings, which lz4 (no entropy coding)
cannot shrink by itself. Before compressing, every ``"0x"`` string of an even number of
lower-case hex digits becomes one marker byte in the text (the "skeleton") and its bytes go
to a side blob; unpacking puts back exactly the same bytes. Text holding a marker byte
(never valid JSON) is sent unpacked.

A block frame's plain payload is the JSON of the full block (``eth_getBlockByHash(h,
true)``'s result, as its upstream sent it), a NUL byte, then the JSON of its receipts.
"""

from __future__ import annotations

import ctypes
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import coincurve
import lz4.block
from Crypto.Hash import keccak as _keccak

VERSION = 1
KIND_BLOCK = 1
KIND_BATCH = 2
KINDS = frozenset((KIND_BLOCK, KIND_BATCH))

FLAG_LZ4 = 0x0001
FLAG_HEXPACK = 0x0002
KNOWN_FLAGS = FLAG_LZ4 | FLAG_HEXPACK

HEADER = struct.Struct(">BBH32sQ32sQI")
HEADER_LEN = HEADER.size  # 88
SIGNATURE_LEN = 65
STREAM_MAX = 32
# Keeps a feed signature from ever being valid as any other kind of signed message.
DOMAIN = b"chainrelay/feed/v1\x00"
# Separates a block frame's block JSON from its receipts JSON (never in valid JSON text).
BLOCK_SEPARATOR = b"\x00"

_MARKER = 0x01
_MARKER_BYTE = b"\x01"
# A length this long or longer goes to the long-lengths list (one byte per token otherwise).
_LONG = 255
# Any lower-case hex string; odd-length ones are put back as text. (A pattern that asks
# for pairs of digits makes the scan four times slower.)
_HEX = re.compile(rb'"0x([0-9a-f]+)"')
_PACKED = struct.Struct(">III")  # skeleton length, token count, long-token count


def keccak(data: bytes | memoryview) -> bytes:
    """keccak-256; takes a memoryview, so a frame's payload is hashed where it lies."""
    if data.__class__ is bytes:
        return _keccak_bytes(data)
    return _keccak.new(digest_bits=256, data=data).digest()


def _load_keccak() -> ctypes.CDLL:
    """pycryptodome's own keccak library, called directly: its Python wrapper costs about
    5 µs a hash in objects around the C calls, a few times per batch pushed."""
    lib = ctypes.CDLL(str(Path(_keccak.__file__).with_name("_keccak.abi3.so")))
    lib.keccak_init.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint8]
    lib.keccak_absorb.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.keccak_digest.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint8]
    lib.keccak_destroy.argtypes = [ctypes.c_void_p]
    return lib


_LIB: ctypes.CDLL | None
try:
    _LIB = _load_keccak()
except (OSError, AttributeError):  # another build of pycryptodome: its wrapper then
    _LIB = None

_KECCAK_CAPACITY = 64  # bytes: 2 x the 256-bit digest
_KECCAK_ROUNDS = 24
_KECCAK_PADDING = 0x01  # keccak's, not SHA-3's 0x06


def _keccak_bytes(data: bytes) -> bytes:
    lib = _LIB
    if lib is None:
        return _keccak.new(digest_bits=256, data=data).digest()
    state = ctypes.c_void_p()
    if lib.keccak_init(ctypes.byref(state), _KECCAK_CAPACITY, _KECCAK_ROUNDS):
        raise MemoryError("keccak state")
    try:
        lib.keccak_absorb(state, data, len(data))
        out = ctypes.create_string_buffer(32)
        lib.keccak_digest(state, out, 32, _KECCAK_PADDING)
    finally:
        lib.keccak_destroy(state)
    return out.raw


class FrameError(ValueError):
    """A frame that must be dropped; ``reason`` names why, for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class Frame:
    """A decoded frame. ``raw`` is the whole message, forwarded as it came."""

    version: int
    kind: int
    flags: int
    stream: str
    position: int
    identity: bytes
    origin_us: int
    raw: bytes

    @property
    def payload(self) -> memoryview:
        return memoryview(self.raw)[HEADER_LEN : len(self.raw) - SIGNATURE_LEN]

    @property
    def signature(self) -> bytes:
        return self.raw[-SIGNATURE_LEN:]

    def digest(self) -> bytes:
        """What the origin signed."""
        return keccak(DOMAIN + self.raw[:HEADER_LEN] + keccak(self.payload))


def _stream_bytes(stream: str) -> bytes:
    b = stream.encode("ascii")
    if not b or len(b) > STREAM_MAX or b"\x00" in b:
        raise ValueError(f"stream name must be 1-{STREAM_MAX} ASCII characters: {stream!r}")
    return b


def decode(raw: bytes, max_frame_bytes: int) -> Frame:
    """Parse a frame's header; checks its shape, not its signature (``signer``)."""
    n = len(raw)
    if n > max_frame_bytes:
        raise FrameError("too_large", f"{n} bytes > {max_frame_bytes}")
    if n < HEADER_LEN + SIGNATURE_LEN:
        raise FrameError("truncated", f"{n} bytes")
    version, kind, flags, stream_b, position, identity, origin_us, length = HEADER.unpack_from(raw)
    if version != VERSION:
        raise FrameError("version", str(version))
    if kind not in KINDS:
        raise FrameError("kind", str(kind))
    if flags & ~KNOWN_FLAGS:
        raise FrameError("flags", hex(flags))
    if HEADER_LEN + length + SIGNATURE_LEN != n:
        raise FrameError("truncated", f"payload length {length} in a {n}-byte frame")
    stream_b = stream_b.rstrip(b"\x00")
    try:
        stream = stream_b.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("stream", repr(stream_b)) from None
    if not stream:
        raise FrameError("stream", "empty")
    return Frame(version, kind, flags, stream, position, identity, origin_us, raw)


def signer(frame: Frame) -> bytes:
    """The 20-byte address that signed block frame ``frame``; ``FrameError("signature")``
    if none can. (A batch frame is the sequencer's: ``batchframe.open_frame``.)"""
    return recover(frame.signature, frame.digest())


def recover(sig: bytes, digest: bytes) -> bytes:
    """The 20-byte address whose key made ``sig`` over ``digest``; ``FrameError("signature")``
    if none did."""
    if len(sig) != SIGNATURE_LEN or sig[64] > 3:
        raise FrameError("signature", "recovery id")
    try:
        pub = coincurve.PublicKey.from_signature_and_message(sig, digest, hasher=None)
    except Exception as exc:  # coincurve raises plain Exception/ValueError
        raise FrameError("signature", str(exc)) from None
    key = pub.format(compressed=False)
    address = _ADDRESSES.get(key)
    if address is None:
        if len(_ADDRESSES) >= _ADDRESSES_MAX:
            _ADDRESSES.clear()  # keys forged at random would otherwise grow it
        address = _ADDRESSES[key] = keccak(key[1:])[12:]
    return address


# Public key -> address of the signers seen lately: a stream has a few origins or
# sequencers, so the keccak of the key is taken once per key, not once per frame.
_ADDRESSES: dict[bytes, bytes] = {}
_ADDRESSES_MAX = 1024


class Signer:
    """An origin's key. Built from the raw key eth-account loads (``Account.from_key`` or
    a decrypted keystore); signs with coincurve, which is what makes once-per-block cheap."""

    def __init__(self, private_key: bytes) -> None:
        self._key = coincurve.PrivateKey(private_key)
        self.address = keccak(self._key.public_key.format(compressed=False)[1:])[12:]

    def sign(self, digest: bytes) -> bytes:
        return self._key.sign_recoverable(digest, hasher=None)


def encode(
    signer_: Signer,
    *,
    kind: int,
    stream: str,
    position: int,
    identity: bytes,
    plain: bytes,
    origin_us: int | None = None,
    hexpack: bool = True,
) -> bytes:
    """One frame, ready for every child: payload packed, compressed and signed."""
    if len(identity) != 32:
        raise ValueError("identity must be 32 bytes")
    flags = FLAG_LZ4
    body = plain
    if hexpack and _MARKER_BYTE not in plain:
        body = pack_hex(plain)
        flags |= FLAG_HEXPACK
    payload = lz4.block.compress(body, store_size=True)
    if origin_us is None:
        origin_us = time.time_ns() // 1000
    header = HEADER.pack(
        VERSION,
        kind,
        flags,
        _stream_bytes(stream),
        position,
        identity,
        origin_us,
        len(payload),
    )
    digest = keccak(DOMAIN + header + keccak(payload))
    return b"".join((header, payload, signer_.sign(digest)))


def unpack(frame: Frame, max_plain_bytes: int) -> bytes:
    """The frame's plain payload; ``FrameError("payload")`` for anything that would
    decompress past ``max_plain_bytes`` or does not decompress at all."""
    payload = frame.payload
    body: bytes
    if frame.flags & FLAG_LZ4:
        if len(payload) < 4:
            raise FrameError("payload", "no size")
        size = int.from_bytes(payload[:4], "little")
        # Checked before lz4 allocates: the size prefix is what it would allocate, and a
        # lying prefix makes decompression fail, never overrun. Hex-packed text is at most
        # its packing header longer than the text it unpacks to (each token shrinks).
        bound = max_plain_bytes + _PACKED.size if frame.flags & FLAG_HEXPACK else max_plain_bytes
        if size > bound:
            raise FrameError("payload", f"decompresses to {size} bytes > {bound}")
        try:
            body = lz4.block.decompress(payload)
        except lz4.block.LZ4BlockError as exc:
            raise FrameError("payload", str(exc)) from None
    else:
        body = bytes(payload)
    if frame.flags & FLAG_HEXPACK:
        body = unpack_hex(body, max_plain_bytes)
    if len(body) > max_plain_bytes:
        raise FrameError("payload", f"{len(body)} bytes > {max_plain_bytes}")
    return body


def pack_hex(text: bytes) -> bytes:
    """``text`` with its even-length lower-case ``"0x…"`` strings moved to a binary blob."""
    parts = _HEX.split(text)  # text, hex digits, text, hex digits, ..., text
    tokens: list[bytes] = []
    piece = [parts[0]]
    pieces = [piece]
    for i in range(1, len(parts), 2):
        digits, after = parts[i], parts[i + 1]
        if len(digits) & 1:
            piece.extend((b'"0x', digits, b'"', after))  # odd: a quantity, stays text
        else:
            tokens.append(digits)
            piece = [after]
            pieces.append(piece)
    skeleton = _MARKER_BYTE.join(b"".join(p) for p in pieces)
    blob = bytes.fromhex(b"".join(tokens).decode("ascii"))
    sizes = [len(t) >> 1 for t in tokens]
    short = bytes(s if s < _LONG else _LONG for s in sizes)
    long = [s for s in sizes if s >= _LONG]
    return b"".join(
        (
            _PACKED.pack(len(skeleton), len(sizes), len(long)),
            skeleton,
            short,
            struct.pack(f">{len(long)}I", *long),
            blob,
        )
    )


def unpack_hex(packed: bytes, max_bytes: int) -> bytes:
    """The exact text ``pack_hex`` was given; ``FrameError("payload")`` if malformed."""
    try:
        skel_len, count, long_count = _PACKED.unpack_from(packed)
    except struct.error:
        raise FrameError("payload", "hex packing header") from None
    at = _PACKED.size
    skeleton = packed[at : at + skel_len]
    at += skel_len
    short = packed[at : at + count]
    at += count
    try:
        long = struct.unpack_from(f">{long_count}I", packed, at) if long_count else ()
    except struct.error:
        raise FrameError("payload", "hex packing lengths truncated") from None
    at += 4 * long_count
    blob = memoryview(packed)[at:]
    if len(skeleton) != skel_len or len(short) != count:
        raise FrameError("payload", "hex packing truncated")
    pieces = skeleton.split(_MARKER_BYTE)
    if len(pieces) != count + 1:
        raise FrameError("payload", "hex packing markers")
    if long_count:
        it = iter(long)
        try:
            sizes = [s if s != _LONG else next(it) for s in short]
        except StopIteration:
            raise FrameError("payload", "hex packing lengths") from None
    else:
        sizes = list(short)
    total = sum(sizes)
    if total != len(blob):
        raise FrameError("payload", "hex packing blob")
    # Each byte of blob comes back as two hex digits plus the quotes and "0x".
    if len(skeleton) - count + 2 * total + 4 * count > max_bytes:
        raise FrameError("payload", f"unpacks past {max_bytes} bytes")
    digits = blob.hex().encode("ascii")
    out = [pieces[0]]
    pos = 0
    for size, piece in zip(sizes, pieces[1:], strict=True):
        end = pos + 2 * size
        out.append(b'"0x' + digits[pos:end] + b'"')
        out.append(piece)
        pos = end
    return b"".join(out)


def block_payload(block_json: bytes, receipts_json: bytes) -> bytes:
    return block_json + BLOCK_SEPARATOR + receipts_json


def split_block_payload(plain: bytes) -> tuple[bytes, bytes]:
    """``(block JSON, receipts JSON)`` of a block frame's plain payload."""
    at = plain.find(BLOCK_SEPARATOR)
    if at < 0:
        raise FrameError("payload", "block frame without receipts")
    return plain[:at], plain[at + 1 :]


def position_identity(number: int) -> bytes:
    """A sequence number as a 32-byte identity (batches are identified by their number)."""
    return number.to_bytes(32, "big")
