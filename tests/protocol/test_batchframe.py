"""The batch wire, bytes in and bytes out: the sequencer's signature travels in the frame
and is recovered end to end (checked against eth-keys, not only against ourselves), every
signed byte is bound to it, the origin time is the one byte range nobody signs, and the
push and range codecs refuse every malformed message with their own error. No sockets."""

from __future__ import annotations

import os
import struct

import eth_keys
import lz4.block
import pytest
from eth_account import Account
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from chainrelay.batches import frame as bf
from chainrelay.tree import frame as ff

STREAM = "arbitrum/batches"
CHAIN = 42161
MAX_PAYLOAD = 2 << 20
MAX_FRAME = MAX_PAYLOAD + ff.HEADER_LEN + ff.SIGNATURE_LEN + 64
SEQUENCER_KEY = keccak(b"batchframe test sequencer")
SEQUENCER = ff.Signer(SEQUENCER_KEY)
OTHER = ff.Signer(keccak(b"batchframe test someone else"))

# Byte ranges of a frame's header fields (feedframe.HEADER: >BBH32sQ32sQI).
FLAGS = range(2, 4)
STREAM_FIELD = range(4, 36)
IDENTITY = range(44, 76)
IDENTITY_MIDDLE = range(44 + 8, 44 + 24)
ORIGIN_TIME = range(76, 84)


def eth_address(key: bytes) -> bytes:
    return bytes.fromhex(Account.from_key(key).address[2:])


def batch(seq: int, payload: bytes, *, chain_id: int = CHAIN, origin_us: int = 1) -> bytes:
    sig = bf.sign_batch(SEQUENCER, chain_id, STREAM, seq, payload)
    return bf.encode_frame(
        chain_id=chain_id,
        stream=STREAM,
        seq=seq,
        payload=payload,
        signature=sig,
        origin_us=origin_us,
    )


def opened(raw: bytes) -> tuple[bytes, bytes]:
    return bf.open_frame(ff.decode(raw, MAX_FRAME), MAX_PAYLOAD)


def compressible(n: int) -> bytes:
    unit = b'{"tx":"0x' + b"ab" * 40 + b'"},'
    return (unit * (n // len(unit) + 1))[:n]


# --- the signed message ----------------------------------------------------------------------
def test_digest_is_the_documented_preimage() -> None:
    """Written out from the module docstring, so a sequencer in another language can sign."""
    payload = b"a batch"
    preimage = (
        b"chainrelay/batch/v1\x00"
        + CHAIN.to_bytes(8, "big")
        + STREAM.encode().ljust(32, b"\x00")
        + (7).to_bytes(8, "big")
        + keccak(payload)
    )
    assert bf.batch_digest(CHAIN, STREAM, 7, keccak(payload)) == keccak(preimage)
    confirmed = (
        b"chainrelay/confirmed/v1\x00"
        + CHAIN.to_bytes(8, "big")
        + STREAM.encode().ljust(32, b"\x00")
        + (7).to_bytes(8, "big")
    )
    assert bf.confirmed_digest(CHAIN, STREAM, 7) == keccak(confirmed)


def test_signature_recovers_with_eth_keys_to_the_eth_account_address() -> None:
    digest = bf.batch_digest(CHAIN, STREAM, 3, keccak(b"x"))
    sig = bf.sign_batch(SEQUENCER, CHAIN, STREAM, 3, b"x")
    assert len(sig) == ff.SIGNATURE_LEN and sig[64] in (0, 1)
    public = eth_keys.keys.Signature(sig).recover_public_key_from_msg_hash(digest)
    assert public.to_canonical_address() == eth_address(SEQUENCER_KEY) == SEQUENCER.address


@settings(max_examples=100, deadline=None)
@given(
    chain_id=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    payload_hash=st.binary(min_size=32, max_size=32),
)
def test_confirmed_digest_differs_from_every_batch_digest(
    chain_id: int, seq: int, payload_hash: bytes
) -> None:
    confirmed = bf.confirmed_digest(chain_id, STREAM, seq)
    assert confirmed != bf.batch_digest(chain_id, STREAM, seq, payload_hash)
    assert confirmed != bf.batch_digest(chain_id, STREAM, seq, keccak(b""))


def test_a_confirmed_signature_does_not_pass_as_a_batch() -> None:
    sig = bf.sign_confirmed(SEQUENCER, CHAIN, STREAM, 5)
    for payload in (b"", b"\x00" * 8):
        raw = bf.encode_frame(
            chain_id=CHAIN, stream=STREAM, seq=5, payload=payload, signature=sig, origin_us=1
        )
        assert opened(raw)[0] != SEQUENCER.address


# --- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "lz4"),
    [
        (b"", False),
        (b"tiny", False),
        (compressible(2048), True),
        (os.urandom(2048), False),
        (compressible(1 << 20), True),
        (os.urandom(1 << 20), False),
    ],
    ids=["empty", "tiny", "2k-compressible", "2k-random", "1mib-compressible", "1mib-random"],
)
def test_round_trip_gives_the_signer_and_the_payload(payload: bytes, lz4: bool) -> None:
    raw = batch(1234, payload, origin_us=1_700_000_000_000_000)
    frame = ff.decode(raw, MAX_FRAME)
    assert (frame.kind, frame.stream, frame.position) == (ff.KIND_BATCH, STREAM, 1234)
    assert frame.identity == bf.batch_identity(CHAIN, 1234)
    assert bf.identity_parts(frame.identity) == (CHAIN, 1234)
    assert bf.frame_chain_id(frame) == CHAIN
    assert frame.origin_us == 1_700_000_000_000_000
    assert bool(frame.flags & ff.FLAG_LZ4) is lz4
    assert not frame.flags & ff.FLAG_HEXPACK  # a batch is opaque bytes, never hex-packed
    assert bf.open_frame(frame, MAX_PAYLOAD) == (eth_address(SEQUENCER_KEY), payload)
    if lz4:
        assert len(raw) < len(payload)
    else:
        assert len(raw) == ff.HEADER_LEN + len(payload) + ff.SIGNATURE_LEN


@settings(max_examples=60, deadline=None)
@given(
    chain_id=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**63 - 1),
    payload=st.binary(max_size=600) | st.binary(max_size=8).map(lambda b: b * 90),
)
def test_any_batch_round_trips(chain_id: int, seq: int, payload: bytes) -> None:
    assert opened(batch(seq, payload, chain_id=chain_id)) == (SEQUENCER.address, payload)


def test_payload_over_the_limit_is_refused_even_when_it_compresses_small() -> None:
    raw = batch(1, bytes(MAX_PAYLOAD + 1))
    frame = ff.decode(raw, MAX_FRAME)
    assert frame.flags & ff.FLAG_LZ4 and len(raw) < 100_000
    with pytest.raises(ff.FrameError) as e:
        bf.open_frame(frame, MAX_PAYLOAD)
    assert e.value.reason == "payload"
    with pytest.raises(ff.FrameError):
        bf.open_frame(ff.decode(batch(1, os.urandom(4096)), MAX_FRAME), 4095)


def test_encode_frame_refuses_a_signature_of_the_wrong_length() -> None:
    with pytest.raises(ValueError):
        bf.encode_frame(
            chain_id=CHAIN,
            stream=STREAM,
            seq=1,
            payload=b"x",
            signature=b"\x00" * 64,
            origin_us=1,
        )


# --- lz4 only when it pays -------------------------------------------------------------------
def _lz4_saves_enough(payload: bytes) -> bool:
    packed = lz4.block.compress(payload, store_size=True)
    return len(packed) <= len(payload) * (1 - bf.LZ4_MIN_SAVING)


def test_lz4_is_kept_exactly_when_it_saves_a_sixteenth() -> None:
    """Random bytes followed by more and more zeros: the saving grows past 1/16 at some
    length of zeros; the frame is compressed from exactly there on."""
    noise = os.urandom(4096)
    flags = []
    for zeros in range(0, 1200, 8):
        payload = noise + bytes(zeros)
        frame = ff.decode(batch(1, payload), MAX_FRAME)
        assert opened(frame.raw)[1] == payload
        flags.append(bool(frame.flags & ff.FLAG_LZ4))
        assert flags[-1] is _lz4_saves_enough(payload)
    assert not flags[0] and flags[-1]  # both sides of the threshold were crossed
    assert flags == sorted(flags)  # one crossing, no flapping


def test_short_payloads_are_never_compressed() -> None:
    payload = bytes(63)
    assert _lz4_saves_enough(payload)  # lz4 would shrink it, but it is too short to bother
    assert not ff.decode(batch(1, payload), MAX_FRAME).flags & ff.FLAG_LZ4
    assert ff.decode(batch(1, bytes(64)), MAX_FRAME).flags & ff.FLAG_LZ4


# --- tampering -------------------------------------------------------------------------------
def _outcome(raw: bytes) -> tuple[bytes, bytes] | None:
    """What a receiver gets from ``raw``: (address, payload), or None when it is dropped."""
    try:
        return opened(raw)
    except ff.FrameError:
        return None


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
@pytest.mark.parametrize(
    "payload", [compressible(300), os.urandom(300), b""], ids=["lz4", "plain", "empty"]
)
def test_every_tampered_byte_is_dropped_or_recovers_another_address(
    payload: bytes, mask: int
) -> None:
    """The one way to keep the signer is to keep the batch: the signature covers the
    payload, not its lz4 encoding, and an lz4 block can say the same bytes another way."""
    raw = batch(77, payload, origin_us=123_456)
    assert opened(raw) == (SEQUENCER.address, payload)
    dropped = recovered_other = 0
    for i in range(len(raw)):
        if i in ORIGIN_TIME:
            continue
        tampered = bytearray(raw)
        tampered[i] ^= mask
        got = _outcome(bytes(tampered))
        if got is None:
            dropped += 1
        elif got[0] == SEQUENCER.address:
            body = range(ff.HEADER_LEN, len(raw) - ff.SIGNATURE_LEN)
            assert got[1] == payload, f"byte {i} ^ {mask:#x} altered a signed batch"
            assert i in body and raw[FLAGS.stop - 1] & ff.FLAG_LZ4  # only an lz4 body
        else:
            recovered_other += 1
    assert dropped and recovered_other


def test_origin_time_is_not_signed() -> None:
    """Documented: the ingress sets it, for latency only; changing it keeps the signer."""
    payload = compressible(300)
    raw = batch(77, payload, origin_us=123_456)
    for i in ORIGIN_TIME:
        tampered = bytearray(raw)
        tampered[i] ^= 0xFF
        frame = ff.decode(bytes(tampered), MAX_FRAME)
        assert frame.origin_us != 123_456
        assert bf.open_frame(frame, MAX_PAYLOAD) == (SEQUENCER.address, payload)


@pytest.mark.parametrize("offset", list(STREAM_FIELD))
def test_any_byte_in_the_stream_field_is_bound_to_the_signature(offset: int) -> None:
    """Also the NUL padding: a name with a byte after its padding is not the stream."""
    raw = bytearray(batch(9, b"payload"))
    for value in (0x01, ord("a"), 0x00 if raw[offset] else 0x7F):
        tampered = bytearray(raw)
        tampered[offset] = value
        if bytes(tampered) == bytes(raw):
            continue
        got = _outcome(bytes(tampered))
        assert got is None or got[0] != SEQUENCER.address


def test_claiming_another_chain_id_or_seq_recovers_another_address() -> None:
    payload = b"the batch"
    sig = bf.sign_batch(SEQUENCER, CHAIN, STREAM, 10, payload)
    for chain_id, seq in ((CHAIN + 1, 10), (1, 10), (CHAIN, 11), (CHAIN, 9)):
        raw = bf.encode_frame(
            chain_id=chain_id,
            stream=STREAM,
            seq=seq,
            payload=payload,
            signature=sig,
            origin_us=1,
        )
        address, got = opened(raw)
        assert got == payload and address != SEQUENCER.address
    raw = bf.encode_frame(
        chain_id=CHAIN,
        stream="other/batches",
        seq=10,
        payload=payload,
        signature=sig,
        origin_us=1,
    )
    assert opened(raw)[0] != SEQUENCER.address


def _resigned_header(raw: bytes, **fields: int | bytes) -> bytes:
    """``raw`` with header fields replaced; the signature stays the sequencer's (the
    frame's header is not what it signs, so only open_frame's own checks can refuse)."""
    names = ("version", "kind", "flags", "stream", "position", "identity", "origin", "length")
    values = dict(zip(names, ff.HEADER.unpack_from(raw), strict=True))
    values.update(fields)
    return ff.HEADER.pack(*values.values()) + raw[ff.HEADER_LEN :]


def test_identity_with_non_zero_middle_bytes_is_refused() -> None:
    raw = batch(5, b"x")
    for at in IDENTITY_MIDDLE:
        identity = bytearray(bf.batch_identity(CHAIN, 5))
        identity[at - IDENTITY.start] = 1
        with pytest.raises(ff.FrameError) as e:
            opened(_resigned_header(raw, identity=bytes(identity)))
        assert e.value.reason == "identity"
    with pytest.raises(ff.FrameError):
        bf.identity_parts(bytes(31))


def test_identity_seq_other_than_the_position_is_refused() -> None:
    raw = batch(5, b"x")
    for position in (4, 6, 2**64 - 1):
        with pytest.raises(ff.FrameError) as e:
            opened(_resigned_header(raw, position=position))
        assert e.value.reason == "identity"
    with pytest.raises(ff.FrameError) as e:
        opened(_resigned_header(raw, identity=bf.batch_identity(CHAIN, 6)))
    assert e.value.reason == "identity"


def test_a_block_frame_is_not_a_batch() -> None:
    raw = _resigned_header(batch(5, b"x"), kind=ff.KIND_BLOCK)
    with pytest.raises(ff.FrameError) as e:
        opened(raw)
    assert e.value.reason == "kind"


def test_another_key_signing_the_same_batch_is_another_address() -> None:
    sig = bf.sign_batch(OTHER, CHAIN, STREAM, 1, b"x")
    raw = bf.encode_frame(
        chain_id=CHAIN, stream=STREAM, seq=1, payload=b"x", signature=sig, origin_us=1
    )
    assert opened(raw) == (OTHER.address, b"x")


# --- push messages ---------------------------------------------------------------------------
SIG = bytes(range(65))


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from([bf.PUSH, bf.CONFIRMED]),
    relays=st.integers(0, 255),
    stream=st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=32),
    seq=st.integers(0, 2**63 - 1),
    signature=st.binary(min_size=65, max_size=65),
    payload=st.binary(max_size=300),
)
def test_push_round_trips(
    kind: int, relays: int, stream: str, seq: int, signature: bytes, payload: bytes
) -> None:
    if kind == bf.CONFIRMED:
        payload = b""
    push = bf.Push(kind, stream, seq, signature, payload, relays)
    data = bf.encode_push(push)
    assert len(data) == bf.PUSH_HEADER_LEN + len(payload)
    assert bf.decode_push(data) == push


def test_push_layout_is_the_documented_one() -> None:
    data = bf.encode_push(bf.Push(bf.PUSH, STREAM, 0x0102, SIG, b"body", relays=2))
    assert data[0] == 1 and data[1] == 2 and data[2:4] == b"\x00\x00"
    assert data[4:36] == STREAM.encode().ljust(32, b"\x00")
    assert data[36:44] == (0x0102).to_bytes(8, "big")
    assert data[44:109] == SIG and data[109:] == b"body"


def _push_bytes(
    kind: int = bf.PUSH,
    relays: int = 0,
    reserved: int = 0,
    stream: bytes = STREAM.encode(),
    seq: int = 1,
    payload: bytes = b"p",
) -> bytes:
    return bf.PUSH_HEADER.pack(kind, relays, reserved, stream, seq, SIG) + payload


def test_push_bytes_helper_makes_a_valid_message() -> None:
    assert bf.decode_push(_push_bytes()) == bf.Push(bf.PUSH, STREAM, 1, SIG, b"p")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(_push_bytes()[: bf.PUSH_HEADER_LEN - 1], id="short-by-one"),
        pytest.param(_push_bytes()[:40], id="short"),
        pytest.param(_push_bytes(kind=0), id="type-0"),
        pytest.param(_push_bytes(kind=3), id="type-3"),
        pytest.param(_push_bytes(kind=255), id="type-255"),
        *(pytest.param(_push_bytes(reserved=1 << b), id=f"reserved-bit-{b}") for b in range(16)),
        pytest.param(_push_bytes(stream=b"arbitrum/\xe9"), id="stream-latin1"),
        pytest.param(_push_bytes(stream=b"\xff" * 32), id="stream-ff"),
        pytest.param(_push_bytes(stream=b""), id="stream-empty"),
        pytest.param(_push_bytes(stream=b"a\x00b"), id="stream-nul-inside"),
        pytest.param(_push_bytes(stream=b"\x00" * 31 + b"a"), id="stream-nul-first"),
        pytest.param(_push_bytes(seq=2**63), id="seq-2**63"),
        pytest.param(_push_bytes(seq=2**64 - 1), id="seq-max"),
        pytest.param(_push_bytes(kind=bf.CONFIRMED, payload=b"x"), id="confirmed-payload"),
    ],
)
def test_malformed_push_raises_push_error(data: bytes) -> None:
    with pytest.raises(bf.PushError):
        bf.decode_push(data)


def test_highest_seq_and_confirmed_without_payload_are_fine() -> None:
    assert bf.decode_push(_push_bytes(seq=2**63 - 1)).seq == 2**63 - 1
    confirmed = bf.decode_push(_push_bytes(kind=bf.CONFIRMED, payload=b""))
    assert (confirmed.kind, confirmed.payload) == (bf.CONFIRMED, b"")
    assert bf.decode_push(_push_bytes(payload=b"")).payload == b""  # an empty batch


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_push_or_raise_push_error(data: bytes) -> None:
    try:
        push = bf.decode_push(data)
    except bf.PushError:
        return
    assert bf.encode_push(push) == data


def test_encode_push_refuses_a_stream_that_cannot_be_a_field() -> None:
    for stream in ("", "x" * 33, "a\x00b", "é"):
        with pytest.raises(ValueError):
            bf.encode_push(bf.Push(bf.PUSH, stream, 1, SIG))


# --- range answers ---------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=100), max_size=8))
def test_range_round_trips(frames: list[bytes]) -> None:
    body = bf.encode_range(frames)
    assert len(body) == sum(4 + len(f) for f in frames)
    assert bf.decode_range(body, 100) == frames


def test_range_of_real_frames_round_trips() -> None:
    frames = [batch(s, os.urandom(s * 10)) for s in range(5)]
    got = bf.decode_range(bf.encode_range(frames), MAX_FRAME)
    assert [opened(f) for f in got] == [opened(f) for f in frames]
    assert bf.decode_range(b"", MAX_FRAME) == []


def test_range_cut_anywhere_inside_a_frame_or_length_is_refused() -> None:
    frames = [b"abc", b"", b"defgh"]
    body = bf.encode_range(frames)
    boundaries = {0, 7, 11, len(body)}
    for cut in range(1, len(body)):
        if cut in boundaries:
            continue
        with pytest.raises(ff.FrameError) as e:
            bf.decode_range(body[:cut], 100)
        assert e.value.reason == "range"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(struct.pack(">I", 4) + b"abc", id="length-past-the-end"),
        pytest.param(struct.pack(">I", 2**32 - 1) + b"abc", id="length-huge"),
        pytest.param(struct.pack(">I", 101) + bytes(101), id="frame-over-the-limit"),
        pytest.param(struct.pack(">I", 1) + b"a" + b"\x00\x00", id="trailing-partial-length"),
    ],
)
def test_range_with_a_lying_length_is_refused(body: bytes) -> None:
    with pytest.raises(ff.FrameError) as e:
        bf.decode_range(body, 100)
    assert e.value.reason == "range"
