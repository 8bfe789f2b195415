"""The feed frame codec, bytes in and bytes out: real blocks round-trip exactly, the signer
is the address eth-account gives for the origin's key, any tampered or malformed frame is
dropped with a named reason, and unpacking never allocates past its limit. No sockets."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import eth_keys
import lz4.block
import pytest
from eth_account import Account
from eth_utils import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainrelay.tree import frame as ff
from tests.lab.corpora import CORPORA, load

MAINNET = CORPORA / "erigon-mainnet-block-18000000"
# The largest frame a test here builds (the mainnet pair compresses to about 270 kB).
MAX_FRAME = 4 << 20
MAX_PLAIN = 8 << 20
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAEDCE6AF48A03BBFD25E8CD0364141
# Reasons ``decode`` gives for a frame of the wrong shape (before any signature check).
SHAPE_REASONS = {"version", "kind", "flags", "truncated", "stream", "too_large"}


def key_for(label: str) -> bytes:
    return keccak(label.encode())


ORIGIN_KEY = key_for("feedframe test origin")
ORIGIN = ff.Signer(ORIGIN_KEY)


def eth_address(key: bytes) -> bytes:
    return bytes.fromhex(Account.from_key(key).address[2:])


def compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def mainnet_pair() -> tuple[dict[str, Any], bytes, bytes]:
    block = json.loads((MAINNET / "eth_getBlockByNumber-full.json").read_text())
    receipts = json.loads((MAINNET / "eth_getBlockReceipts.json").read_text())
    result = block[0]["response"]["result"]
    return result, compact(result), compact(receipts[0]["response"]["result"])


def small_blocks() -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """Every block of the execution-apis corpus (a dev chain's small blocks, like anvil's),
    with its receipts' JSON when the corpus holds them, else ``null``."""
    exchanges = load("execution-apis")
    receipts: dict[str, bytes] = {}
    for e in exchanges:
        r = e.response.get("result")
        if e.method == "eth_getBlockReceipts" and isinstance(r, list) and r:
            receipts[r[0]["blockHash"]] = compact(r)
    for e in exchanges:
        r = e.response.get("result")
        if e.method.startswith("eth_getBlockBy") and isinstance(r, dict):
            yield e.name, r, receipts.get(r["hash"], b"null")


SMALL_BLOCKS = list(small_blocks())


def block_frame(block: dict[str, Any], block_json: bytes, receipts_json: bytes, **kw: Any) -> bytes:
    return ff.encode(
        ORIGIN,
        kind=ff.KIND_BLOCK,
        stream="devnet/blocks",
        position=int(block["number"], 16),
        identity=bytes.fromhex(block["hash"][2:]),
        plain=ff.block_payload(block_json, receipts_json),
        **kw,
    )


def signed(
    payload: bytes,
    *,
    flags: int = ff.FLAG_LZ4,
    version: int = ff.VERSION,
    kind: int = ff.KIND_BLOCK,
    stream: bytes = b"devnet/blocks",
    length: int | None = None,
) -> bytes:
    """A frame with any payload and header fields, signed as the origin signs: what a
    faulty or hostile origin could send, which only unpacking can catch."""
    header = ff.HEADER.pack(
        version,
        kind,
        flags,
        stream,
        7,
        b"\x07" * 32,
        1,
        len(payload) if length is None else length,
    )
    digest = keccak(ff.DOMAIN + header + keccak(payload))
    return header + payload + ORIGIN.sign(digest)


def check(raw: bytes, max_frame: int = MAX_FRAME) -> ff.Frame:
    frame = ff.decode(raw, max_frame)
    assert ff.signer(frame) == ORIGIN.address
    return frame


def peak_bytes_during(fn: Any) -> tuple[int, BaseException | None]:
    """Peak bytes the Python allocators (lz4's included) held while ``fn`` ran."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        exc = None
    except BaseException as e:  # returned for the caller to assert on
        exc = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, exc


# --- round trips ---------------------------------------------------------------------------
def test_mainnet_block_pair_round_trips_and_compresses_below_four_tenths() -> None:
    block, block_json, receipts_json = mainnet_pair()
    assert len(block["transactions"]) > 50  # the realistic pair, not an empty block
    plain = ff.block_payload(block_json, receipts_json)
    raw = block_frame(block, block_json, receipts_json)
    frame = check(raw)
    assert frame.flags == ff.FLAG_LZ4 | ff.FLAG_HEXPACK
    assert (frame.version, frame.kind, frame.stream) == (ff.VERSION, ff.KIND_BLOCK, "devnet/blocks")
    assert frame.position == 18_000_000
    assert frame.identity.hex() == block["hash"][2:]
    assert frame.raw is raw
    assert ff.unpack(frame, MAX_PLAIN) == plain
    assert ff.split_block_payload(ff.unpack(frame, MAX_PLAIN)) == (block_json, receipts_json)
    ratio = len(raw) / len(plain)
    lz4_only = len(block_frame(block, block_json, receipts_json, hexpack=False)) / len(plain)
    print(
        f"mainnet block 18000000: {len(plain)} B JSON -> {len(raw)} B frame ({ratio:.3f}); "
        f"lz4 without hex packing {lz4_only:.3f}"
    )
    assert ratio <= 0.4
    assert ratio < lz4_only  # hex packing is what earns the ratio


def test_mainnet_block_pair_round_trips_without_hex_packing() -> None:
    block, block_json, receipts_json = mainnet_pair()
    frame = check(block_frame(block, block_json, receipts_json, hexpack=False))
    assert frame.flags == ff.FLAG_LZ4
    assert ff.unpack(frame, MAX_PLAIN) == ff.block_payload(block_json, receipts_json)


@pytest.mark.parametrize(
    ("block", "receipts_json"),
    [(b, r) for _, b, r in SMALL_BLOCKS],
    ids=[n for n, _, _ in SMALL_BLOCKS],
)
def test_small_corpus_blocks_round_trip(block: dict[str, Any], receipts_json: bytes) -> None:
    block_json = compact(block)
    frame = check(block_frame(block, block_json, receipts_json))
    assert frame.position == int(block["number"], 16)
    assert "0x" + frame.identity.hex() == block["hash"]
    assert ff.split_block_payload(ff.unpack(frame, MAX_PLAIN)) == (block_json, receipts_json)


def test_small_corpus_holds_blocks_with_and_without_receipts() -> None:
    assert any(r != b"null" for _, _, r in SMALL_BLOCKS)
    assert any(r == b"null" for _, _, r in SMALL_BLOCKS)


hex_bytes = st.binary(min_size=0, max_size=40).map(lambda b: "0x" + b.hex())
quantity = st.integers(0, 2**64).map(hex)
address = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())


@st.composite
def anvil_blocks(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """A block and receipts shaped like anvil's answers: a handful of transactions,
    quantities of odd hex length, empty ``0x`` input and data, a zero logs bloom."""
    number = draw(st.integers(0, 2**40))
    block_hash = "0x" + draw(st.binary(min_size=32, max_size=32)).hex()
    txs: list[dict[str, Any]] = []
    for i in range(draw(st.integers(0, 3))):
        txs.append(
            {
                "hash": "0x" + draw(st.binary(min_size=32, max_size=32)).hex(),
                "blockHash": block_hash,
                "blockNumber": hex(number),
                "transactionIndex": hex(i),
                "from": "0x" + draw(st.binary(min_size=20, max_size=20)).hex(),
                "to": draw(st.none() | address),
                "value": draw(quantity),
                "gas": draw(quantity),
                "input": draw(hex_bytes),
                "nonce": hex(i),
                "type": "0x2",
                "chainId": "0x7a69",
                "accessList": [],
                "v": "0x1",
                "r": draw(quantity),
                "s": draw(quantity),
            }
        )
    block = {
        "hash": block_hash,
        "parentHash": "0x" + draw(st.binary(min_size=32, max_size=32)).hex(),
        "number": hex(number),
        "timestamp": draw(quantity),
        "logsBloom": "0x" + "00" * 256,
        "extraData": "0x",
        "gasUsed": draw(quantity),
        "baseFeePerGas": draw(quantity),
        "transactions": txs,
        "uncles": [],
        "withdrawals": [],
    }
    if draw(st.booleans()):
        return block, None
    receipts = [
        {
            "transactionHash": tx["hash"],
            "blockHash": block_hash,
            "blockNumber": hex(number),
            "status": "0x1",
            "contractAddress": None,
            "logs": [{"address": tx["from"], "topics": [tx["hash"]], "data": draw(hex_bytes)}],
            "logsBloom": "0x" + draw(st.binary(min_size=256, max_size=256)).hex(),
        }
        for tx in txs
    ]
    return block, receipts


@given(anvil_blocks())
@settings(max_examples=60, deadline=None)
def test_anvil_shaped_blocks_round_trip(
    pair: tuple[dict[str, Any], list[dict[str, Any]] | None],
) -> None:
    block, receipts = pair
    block_json, receipts_json = compact(block), compact(receipts)
    frame = check(block_frame(block, block_json, receipts_json))
    assert frame.position == int(block["number"], 16)
    assert ff.split_block_payload(ff.unpack(frame, MAX_PLAIN)) == (block_json, receipts_json)


@pytest.mark.parametrize("kind", sorted(ff.KINDS))
@pytest.mark.parametrize("plain", [b"", b"\x00", b"\x01\x01", b'{"a":"0x00"}' * 1000])
def test_any_plain_payload_round_trips(kind: int, plain: bytes) -> None:
    raw = ff.encode(
        ORIGIN,
        kind=kind,
        stream="arbitrum/batches",
        position=2**64 - 1,
        identity=ff.position_identity(2**64 - 1),
        plain=plain,
        origin_us=5,
    )
    frame = check(raw)
    assert (frame.kind, frame.position, frame.origin_us) == (kind, 2**64 - 1, 5)
    assert int.from_bytes(frame.identity, "big") == 2**64 - 1
    assert ff.unpack(frame, len(plain)) == plain


def test_origin_time_defaults_to_now_in_microseconds() -> None:
    before = time.time_ns() // 1000
    frame = check(
        ff.encode(
            ORIGIN,
            kind=ff.KIND_BLOCK,
            stream="bsc/blocks",
            position=1,
            identity=bytes(32),
            plain=b"{}",
        )
    )
    assert before <= frame.origin_us <= time.time_ns() // 1000


@pytest.mark.parametrize("stream", ["", "x" * 33, "a\x00b", "bsc/blöcks"])
def test_encode_refuses_a_stream_name_no_frame_can_carry(stream: str) -> None:
    with pytest.raises(ValueError):
        ff.encode(
            ORIGIN, kind=ff.KIND_BLOCK, stream=stream, position=1, identity=bytes(32), plain=b""
        )


@pytest.mark.parametrize("identity", [b"", bytes(31), bytes(33)])
def test_encode_refuses_an_identity_not_32_bytes(identity: bytes) -> None:
    with pytest.raises(ValueError):
        ff.encode(
            ORIGIN,
            kind=ff.KIND_BLOCK,
            stream="bsc/blocks",
            position=1,
            identity=identity,
            plain=b"",
        )


def test_a_stream_name_of_32_characters_fills_the_field() -> None:
    frame = check(
        ff.encode(
            ORIGIN, kind=ff.KIND_BLOCK, stream="s" * 32, position=1, identity=bytes(32), plain=b""
        )
    )
    assert frame.stream == "s" * 32


# --- hex packing -----------------------------------------------------------------------------
@given(st.binary(max_size=3000).filter(lambda b: b"\x01" not in b))
@settings(max_examples=300, deadline=None)
def test_pack_hex_round_trips_any_bytes_without_the_marker(text: bytes) -> None:
    packed = ff.pack_hex(text)
    assert ff.unpack_hex(packed, len(text)) == text


def hex_token(digits: str, case: str) -> str:
    return digits.upper() if case == "upper" else digits


@st.composite
def json_ish(draw: st.DrawFn) -> bytes:
    """Text full of what the packer must take, leave or not be fooled by: hex strings of
    every length (odd, empty ``"0x"``, upper and mixed case), escaped quotes around hex,
    adjacent strings, numbers, and stray quotes and ``0x`` fragments."""
    parts = []
    for _ in range(draw(st.integers(0, 30))):
        digits = draw(st.text("0123456789abcdef", max_size=70))
        piece = draw(
            st.sampled_from(
                [
                    f'"0x{digits}"',
                    f'"0x{digits.upper()}"',
                    f'"0X{digits}"',
                    f'"0x{digits}',
                    f'0x{digits}"',
                    f'\\"0x{digits}\\"',
                    f'"\\"0x{digits}\\""',
                    '"0x"',
                    '"',
                    "0x",
                    f'"0x{digits}0x{digits}"',
                    f'"{digits}"',
                ]
            )
        )
        parts.append(piece)
        parts.append(draw(st.sampled_from(["", ",", ":", "[", "]", "{", "}", " ", "\n", "\\"])))
    if draw(st.booleans()):
        parts.append(draw(st.text(max_size=20).filter(lambda s: "\x01" not in s)))
    return "".join(parts).encode()


@given(json_ish())
@settings(max_examples=400, deadline=None)
def test_pack_hex_round_trips_json_ish_text_byte_exactly(text: bytes) -> None:
    packed = ff.pack_hex(text)
    assert ff.unpack_hex(packed, len(text)) == text
    if len(text):
        with pytest.raises(ff.FrameError) as exc:
            ff.unpack_hex(packed, len(text) - 1)
        assert exc.value.reason == "payload"


@pytest.mark.parametrize(
    ("text", "taken"),
    [
        (b'"0xab"', True),
        (b'"0x' + b"ab" * 300 + b'"', True),  # a length past the one-byte table
        (b'"0x"', False),
        (b'"0xabc"', False),
        (b'"0xAB"', False),
        (b'"0xaB"', False),
        (b'"0Xab"', False),
        (b'"0xab', False),
        (b"0xab", False),
        (b'"0xag"', False),
    ],
)
def test_pack_hex_takes_only_quoted_even_lower_case_hex(text: bytes, taken: bool) -> None:
    packed = ff.pack_hex(text)
    skel_len, count, _ = ff._PACKED.unpack_from(packed)
    skeleton = packed[ff._PACKED.size : ff._PACKED.size + skel_len]
    assert count == int(taken)
    assert skeleton == (b"\x01" if taken else text)
    assert ff.unpack_hex(packed, len(text)) == text


def test_hex_packing_shrinks_what_it_takes_to_half() -> None:
    text = b'["0x' + b"5a" * 1000 + b'","0x' + b"a5" * 10 + b'"]'
    assert len(ff.pack_hex(text)) < len(text) // 2 + 64


def test_text_holding_the_marker_byte_is_sent_without_hex_packing() -> None:
    plain = b'{"a":"0xabcd","b":"\x01"}'
    frame = check(
        ff.encode(
            ORIGIN,
            kind=ff.KIND_BLOCK,
            stream="bsc/blocks",
            position=1,
            identity=bytes(32),
            plain=plain,
        )
    )
    assert frame.flags == ff.FLAG_LZ4
    assert ff.unpack(frame, len(plain)) == plain


# --- signatures --------------------------------------------------------------------------------
@given(st.integers(1, SECP256K1_N - 1), st.binary(max_size=200))
@settings(max_examples=50, deadline=None)
def test_signer_is_the_eth_account_address_of_the_key(secret: int, plain: bytes) -> None:
    key = secret.to_bytes(32, "big")
    origin = ff.Signer(key)
    assert origin.address == eth_address(key)
    raw = ff.encode(
        origin,
        kind=ff.KIND_BATCH,
        stream="arbitrum/batches",
        position=secret % 99,
        identity=ff.position_identity(secret % 99),
        plain=plain,
    )
    frame = ff.decode(raw, MAX_FRAME)
    assert ff.signer(frame) == eth_address(key)
    # What eth-account recovers from the same digest, computed here from the layout.
    digest = keccak(ff.DOMAIN + raw[: ff.HEADER_LEN] + keccak(raw[ff.HEADER_LEN : -65]))
    assert frame.digest() == digest
    sig = raw[-65:]
    assert Account._recover_hash(digest, signature=sig[:64] + bytes([sig[64] + 27])) == (
        Account.from_key(key).address
    )
    pub = eth_keys.keys.Signature(sig).recover_public_key_from_msg_hash(digest)
    assert pub.to_canonical_address() == eth_address(key)


def test_the_signature_is_only_valid_as_a_feed_frame() -> None:
    raw = ff.encode(
        ORIGIN, kind=ff.KIND_BLOCK, stream="bsc/blocks", position=1, identity=bytes(32), plain=b"{}"
    )
    sig = raw[-65:]
    without_domain = keccak(raw[: ff.HEADER_LEN] + keccak(raw[ff.HEADER_LEN : -65]))
    other = Account._recover_hash(without_domain, signature=sig[:64] + bytes([sig[64] + 27]))
    assert other != Account.from_key(ORIGIN_KEY).address


def tampered_outcome(raw: bytes, at: int, mask: int) -> str:
    bad = bytearray(raw)
    bad[at] ^= mask
    try:
        frame = ff.decode(bytes(bad), MAX_FRAME)
    except ff.FrameError as exc:
        assert exc.reason in SHAPE_REASONS, exc
        return exc.reason
    try:
        who = ff.signer(frame)
    except ff.FrameError as exc:
        assert exc.reason == "signature", exc
        return "signature"
    assert who != ORIGIN.address, f"byte {at} ^ {mask:#x} kept the origin's signature"
    return "other signer"


MASKS = (0x01, 0x80, 0xFF)


def test_tampering_any_byte_of_a_small_frame_loses_the_origin_signature() -> None:
    _, block, receipts = SMALL_BLOCKS[0]
    raw = block_frame(block, compact(block), receipts)
    outcomes: dict[str, int] = {}
    for at in range(len(raw)):
        for mask in MASKS:
            reason = tampered_outcome(raw, at, mask)
            outcomes[reason] = outcomes.get(reason, 0) + 1
    assert outcomes["other signer"] > 0 and outcomes["signature"] > 0
    assert {"version", "kind", "flags", "truncated"} <= set(outcomes)


def test_tampering_the_mainnet_frame_loses_the_origin_signature() -> None:
    block, block_json, receipts_json = mainnet_pair()
    raw = block_frame(block, block_json, receipts_json)
    # Every header and signature byte; payload bytes at its ends and spread through it.
    spots = [*range(ff.HEADER_LEN + 64), *range(len(raw) - 65 - 64, len(raw))]
    spots += range(ff.HEADER_LEN, len(raw) - 65, 1999)
    for at in spots:
        tampered_outcome(raw, at, 0x01)


def test_every_header_field_is_covered_by_the_signature() -> None:
    raw = ff.encode(
        ORIGIN,
        kind=ff.KIND_BLOCK,
        stream="bsc/blocks",
        position=10,
        identity=b"\x0a" * 32,
        plain=b"{}",
        origin_us=10,
    )
    fields = list(ff.HEADER.unpack_from(raw))
    changed = [
        (2, ff.FLAG_LZ4),  # flags: drop hex packing, still known
        (1, ff.KIND_BATCH),
        (3, b"bsc/blocks\x00\x00x".ljust(32, b"\x00")),
        (3, b"bsc/blockz".ljust(32, b"\x00")),
        (4, 11),
        (5, b"\x0b" * 32),
        (6, 11),
    ]
    for index, value in changed:
        header = list(fields)
        header[index] = value
        forged = ff.HEADER.pack(*header) + raw[ff.HEADER_LEN :]
        frame = ff.decode(forged, MAX_FRAME)
        try:
            assert ff.signer(frame) != ORIGIN.address, index
        except ff.FrameError as exc:
            assert exc.reason == "signature"


@pytest.mark.parametrize("recovery_id", [2, 3, 4, 27, 255])
def test_a_recovery_id_no_key_gives_is_a_signature_error(recovery_id: int) -> None:
    raw = ff.encode(
        ORIGIN, kind=ff.KIND_BLOCK, stream="bsc/blocks", position=1, identity=bytes(32), plain=b"{}"
    )
    frame = ff.decode(raw[:-1] + bytes([recovery_id]), MAX_FRAME)
    with pytest.raises(ff.FrameError) as exc:
        ff.signer(frame)
    assert exc.value.reason == "signature"


@pytest.mark.parametrize(
    "rs",
    [bytes(64), b"\xff" * 64, bytes(32) + b"\x01" * 32, b"\x01" * 32 + bytes(32)],
    ids=["zero", "overflow", "r zero", "s zero"],
)
def test_an_impossible_signature_is_a_signature_error(rs: bytes) -> None:
    raw = ff.encode(
        ORIGIN, kind=ff.KIND_BLOCK, stream="bsc/blocks", position=1, identity=bytes(32), plain=b"{}"
    )
    frame = ff.decode(raw[:-65] + rs + b"\x00", MAX_FRAME)
    with pytest.raises(ff.FrameError) as exc:
        ff.signer(frame)
    assert exc.value.reason == "signature"


# --- shape ----------------------------------------------------------------------------------
SMALL_RAW = ff.encode(
    ORIGIN,
    kind=ff.KIND_BLOCK,
    stream="bsc/blocks",
    position=3,
    identity=bytes(32),
    plain=b'{"number":"0x03"}\x00null',
)


def reason_of(raw: bytes, max_frame: int = MAX_FRAME) -> str:
    with pytest.raises(ff.FrameError) as exc:
        ff.decode(raw, max_frame)
    return exc.value.reason


def test_every_length_shorter_than_header_and_signature_is_truncated() -> None:
    for n in range(ff.HEADER_LEN + ff.SIGNATURE_LEN):
        assert reason_of(SMALL_RAW[:n]) == "truncated", n


def test_a_frame_cut_anywhere_or_with_bytes_after_it_is_truncated() -> None:
    for n in range(ff.HEADER_LEN + ff.SIGNATURE_LEN, len(SMALL_RAW)):
        assert reason_of(SMALL_RAW[:n]) == "truncated", n
    for extra in (b"\x00", b"x" * 65):
        assert reason_of(SMALL_RAW + extra) == "truncated"


@pytest.mark.parametrize("delta", [-100, -1, 1, 2**31])
def test_a_payload_length_that_disagrees_with_the_frame_is_truncated(delta: int) -> None:
    payload = SMALL_RAW[ff.HEADER_LEN : -65]
    raw = signed(payload, length=max(0, min(2**32 - 1, len(payload) + delta)))
    assert reason_of(raw) == "truncated"


def test_a_frame_of_exactly_header_and_signature_has_an_empty_payload() -> None:
    frame = check(signed(b"", flags=0))
    assert len(frame.payload) == 0
    assert ff.unpack(frame, 0) == b""


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"version": 0}, "version"),
        ({"version": 2}, "version"),
        ({"version": 255}, "version"),
        ({"kind": 0}, "kind"),
        ({"kind": 3}, "kind"),
        ({"kind": 255}, "kind"),
        ({"flags": 0x0004}, "flags"),
        ({"flags": 0x8000 | ff.FLAG_LZ4}, "flags"),
        ({"flags": 0xFFFF}, "flags"),
        ({"stream": b""}, "stream"),
        ({"stream": b"\x00" * 32}, "stream"),
        ({"stream": b"bsc/bl\xf6cks"}, "stream"),
    ],
)
def test_an_unknown_header_field_is_dropped_with_its_name(
    fields: dict[str, Any], reason: str
) -> None:
    assert reason_of(signed(b"\x00\x00\x00\x00", **fields)) == reason


def test_a_frame_over_the_size_limit_is_too_large_before_anything_else() -> None:
    assert reason_of(SMALL_RAW, len(SMALL_RAW) - 1) == "too_large"
    assert check(SMALL_RAW, len(SMALL_RAW)).raw == SMALL_RAW
    assert reason_of(b"\xff" * 10_000, 9_999) == "too_large"


# --- unpacking: bombs and malformed payloads --------------------------------------------------
LIMIT = 1 << 20


def unpack_reason(raw: bytes, limit: int = LIMIT) -> str:
    frame = check(raw)
    with pytest.raises(ff.FrameError) as exc:
        ff.unpack(frame, limit)
    return exc.value.reason


def test_a_payload_of_exactly_the_limit_unpacks_and_one_byte_more_does_not() -> None:
    plain = b'{"hash":"0x' + b"ab" * 500 + b'","n":"0x1"}'
    for hexpack in (True, False):
        raw = ff.encode(
            ORIGIN,
            kind=ff.KIND_BLOCK,
            stream="bsc/blocks",
            position=1,
            identity=bytes(32),
            plain=plain,
            hexpack=hexpack,
        )
        assert ff.unpack(check(raw), len(plain)) == plain
        assert unpack_reason(raw, len(plain) - 1) == "payload"
    raw = signed(plain, flags=0)
    assert ff.unpack(check(raw), len(plain)) == plain
    assert unpack_reason(raw, len(plain) - 1) == "payload"


def test_an_lz4_bomb_with_an_honest_size_is_refused_before_allocating() -> None:
    bomb = lz4.block.compress(b"\x00" * (32 << 20), store_size=True)
    assert len(bomb) < 200_000
    frame = check(signed(bomb))
    peak, exc = peak_bytes_during(lambda: ff.unpack(frame, LIMIT))
    assert isinstance(exc, ff.FrameError) and exc.reason == "payload"
    assert peak < LIMIT


@pytest.mark.parametrize("claimed", [LIMIT, LIMIT // 2, 100, 1, 0])
def test_an_lz4_bomb_whose_size_prefix_lies_small_is_refused_within_the_limit(
    claimed: int,
) -> None:
    bomb = lz4.block.compress(b"\x00" * (32 << 20), store_size=True)
    frame = check(signed(claimed.to_bytes(4, "little") + bomb[4:]))
    peak, exc = peak_bytes_during(lambda: ff.unpack(frame, LIMIT))
    assert isinstance(exc, ff.FrameError) and exc.reason == "payload"
    assert peak < LIMIT + (64 << 10)


@pytest.mark.parametrize("claimed", [LIMIT + 1, 2**31 - 1, 2**31, 2**32 - 1])
def test_a_size_prefix_past_the_limit_is_refused_before_allocating(claimed: int) -> None:
    frame = check(signed(claimed.to_bytes(4, "little") + b"\x10a"))
    peak, exc = peak_bytes_during(lambda: ff.unpack(frame, LIMIT))
    assert isinstance(exc, ff.FrameError) and exc.reason == "payload"
    assert peak < 64 << 10


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x05",
        b"\x05\x00\x00",
        b"\x05\x00\x00\x00",
        b"\x05\x00\x00\x00\xff\xff\xff",
        (1000).to_bytes(4, "little") + lz4.block.compress(b"a" * 10, store_size=False),
    ],
    ids=["empty", "1 byte", "3 bytes", "size only", "garbage", "prefix too big"],
)
def test_a_corrupt_lz4_payload_is_a_payload_error(payload: bytes) -> None:
    assert unpack_reason(signed(payload)) == "payload"


def test_a_hex_packed_text_that_would_unpack_past_the_limit_is_refused_early() -> None:
    # A blob of LIMIT bytes: its hex digits would take twice that, the joined text as much
    # again; the refusal comes before either.
    text = b'["0x' + b"5a" * LIMIT + b'"]'
    packed = ff.pack_hex(text)
    assert len(packed) < LIMIT + 64
    compressed = check(
        signed(lz4.block.compress(packed, store_size=True), flags=ff.FLAG_LZ4 | ff.FLAG_HEXPACK)
    )
    assert ff.unpack(compressed, len(text)) == text
    assert unpack_reason(compressed.raw, len(text) - 1) == "payload"
    # Measured without lz4, which holds its output twice while it copies it out.
    frame = check(signed(packed, flags=ff.FLAG_HEXPACK))
    assert ff.unpack(frame, len(text)) == text
    peak, exc = peak_bytes_during(lambda: ff.unpack(frame, len(text) - 1))
    assert isinstance(exc, ff.FrameError) and exc.reason == "payload"
    assert peak < len(packed) + (64 << 10)  # the packed body and no more


def malformed_packings() -> Iterator[tuple[str, bytes]]:
    good = ff.pack_hex(b'{"a":"0x' + b"cd" * 300 + b'","b":"0xab","c":"0xab"}')
    skel_len, count, long_count = ff._PACKED.unpack_from(good)
    assert long_count == 1
    rest = good[ff._PACKED.size :]
    yield "empty", b""
    yield "header cut", good[:11]
    yield "skeleton cut", good[: ff._PACKED.size + skel_len - 1]
    yield "lengths cut", good[: ff._PACKED.size + skel_len + count - 1]
    yield "long lengths cut", good[: ff._PACKED.size + skel_len + count + 2]
    yield "blob cut", good[:-1]
    yield "blob too long", good + b"\x00"
    yield "skeleton longer", ff._PACKED.pack(skel_len + 1, count, long_count) + rest
    yield "skeleton shorter", ff._PACKED.pack(skel_len - 1, count, long_count) + rest
    yield "more tokens", ff._PACKED.pack(skel_len, count + 1, long_count) + rest
    yield "fewer tokens", ff._PACKED.pack(skel_len, count - 1, long_count) + rest
    yield "no long lengths", ff._PACKED.pack(skel_len, count, 0) + rest
    yield "more long lengths", ff._PACKED.pack(skel_len, count, 2) + rest
    yield "huge long count", ff._PACKED.pack(skel_len, count, 2**32 - 1) + rest
    yield "huge skeleton", ff._PACKED.pack(2**32 - 1, count, long_count) + rest
    yield "huge count", ff._PACKED.pack(skel_len, 2**32 - 1, long_count) + rest
    short_start = ff._PACKED.size + skel_len
    two_long = bytearray(good)
    two_long[short_start + 1] = 255  # a second long marker with no length behind it
    yield "long marker without length", bytes(two_long)
    fewer_markers = good.replace(b"\x01", b"x", 1)
    yield "marker missing", fewer_markers
    yield "marker extra", good[:12] + b"\x01" + good[13:]


MALFORMED = list(malformed_packings())


@pytest.mark.parametrize("packed", [p for _, p in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_hex_packing_is_a_payload_error(packed: bytes) -> None:
    with pytest.raises(ff.FrameError) as exc:
        ff.unpack_hex(packed, MAX_PLAIN)
    assert exc.value.reason == "payload"
    for flags, payload in (
        (ff.FLAG_HEXPACK, packed),
        (ff.FLAG_HEXPACK | ff.FLAG_LZ4, lz4.block.compress(packed, store_size=True)),
    ):
        assert unpack_reason(signed(payload, flags=flags), MAX_PLAIN) == "payload"


@given(st.binary(max_size=600), st.integers(0, 3000))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_unpack_hex_of_any_bytes_gives_text_or_a_payload_error(packed: bytes, limit: int) -> None:
    try:
        text = ff.unpack_hex(packed, limit)
    except ff.FrameError as exc:
        assert exc.reason == "payload"
    else:
        assert len(text) <= limit


@given(st.binary(max_size=600), st.sampled_from([0, 1, 2, 3]), st.integers(0, 3000))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_unpack_of_any_signed_payload_gives_text_or_a_payload_error(
    payload: bytes, flags: int, limit: int
) -> None:
    frame = check(signed(payload, flags=flags))
    try:
        plain = ff.unpack(frame, limit)
    except ff.FrameError as exc:
        assert exc.reason == "payload"
    else:
        assert len(plain) <= limit


@given(st.binary(max_size=400), st.integers(ff.HEADER_LEN + 65, 600))
@settings(max_examples=300, deadline=None)
def test_decode_of_any_bytes_gives_a_frame_or_a_named_reason(raw: bytes, limit: int) -> None:
    try:
        frame = ff.decode(raw, limit)
    except ff.FrameError as exc:
        assert exc.reason in SHAPE_REASONS
        return
    try:
        ff.signer(frame)
    except ff.FrameError as exc:
        assert exc.reason == "signature"


def test_a_block_payload_without_its_separator_is_a_payload_error() -> None:
    with pytest.raises(ff.FrameError) as exc:
        ff.split_block_payload(b'{"number":"0x1"}')
    assert exc.value.reason == "payload"
    assert ff.split_block_payload(ff.block_payload(b"{}", b"null")) == (b"{}", b"null")
    assert ff.split_block_payload(ff.block_payload(b"{}", b"a\x00b")) == (b"{}", b"a\x00b")
