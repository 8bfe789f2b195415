"""Nitro's broadcast format (chainrelay.nitro.codec) against Nitro's own serialization
examples and signature vector, and the entry node's intake (chainrelay.nitro.intake):
each number once, in order, bad messages refused. Bytes in, bytes out."""

from __future__ import annotations

import base64
import json

import orjson
import pytest

from chainrelay.nitro.codec import (
    Broadcast,
    FeedMessage,
    NitroFormatError,
    encode_broadcast,
    feed_signer,
    l1_block_number,
    message_spans,
    parse_broadcast,
    signature_hash,
    signed_parts,
)
from chainrelay.nitro.intake import FeedIntake
from chainrelay.tree.frame import Signer
from tests.lab.nitro_messages import (
    example_messages,
    feed_message,
    realistic,
    serialization_examples,
)

EXAMPLES = serialization_examples()["examples"]
assert isinstance(EXAMPLES, list)
SEQUENCER = Signer(bytes.fromhex("11" * 32))
OTHER = Signer(bytes.fromhex("22" * 32))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: str(e["name"]))
def test_nitros_examples_parse_and_encode_to_their_exact_bytes(example: dict[str, object]) -> None:
    text = str(example["text"]).encode()
    b = parse_broadcast(text)
    assert [m.seq for m in b.messages] == example["sequence_numbers"]
    assert b.confirmed == example["confirmed"]
    assert encode_broadcast([m.raw for m in b.messages], b.confirmed) == text


def test_nitros_signature_hash_vector() -> None:
    v = serialization_examples()["signature_hash"]
    assert isinstance(v, dict)
    got = signature_hash(v["message"].encode(), v["chain_id"])
    assert "0x" + got.hex() == v["hash"]


def test_the_hash_covers_every_signed_field() -> None:
    base = feed_message(7, b"\x01\x02", block_hash=b"\xaa" * 32, block_metadata=b"\x00\x01")
    h = signature_hash(base, 42161)
    assert signature_hash(base, 42170) != h
    for changed in (
        feed_message(8, b"\x01\x02", block_hash=b"\xaa" * 32, block_metadata=b"\x00\x01"),
        feed_message(7, b"\x01\x03", block_hash=b"\xaa" * 32, block_metadata=b"\x00\x01"),
        feed_message(7, b"\x01\x02", block_hash=b"\xab" * 32, block_metadata=b"\x00\x01"),
        feed_message(7, b"\x01\x02", block_hash=b"\xaa" * 32, block_metadata=b"\x00\x02"),
        feed_message(
            7, b"\x01\x02", block_hash=b"\xaa" * 32, block_metadata=b"\x00\x01", l1_block=1
        ),
    ):
        assert signature_hash(changed, 42161) != h


def test_a_signed_message_recovers_its_signer() -> None:
    raw = feed_message(9, b"tx", signer=SEQUENCER)
    assert feed_signer(raw, 42161) == SEQUENCER.address
    assert feed_signer(raw, 1) != SEQUENCER.address  # another chain's hash
    assert feed_signer(feed_message(9, b"tx"), 42161) is None
    # A signature over one kind's hash does not pass for the other kind.
    moved = raw.replace(b'"signatureV2"', b'"signature"')
    assert feed_signer(moved, 42161) not in (None, SEQUENCER.address)


# Nitro's own signature test message (broadcaster/message/message_signature_test.go), as the
# Nitro of before November 2025 wrote it: "signature", no block metadata (not hashed then).
V1_MESSAGE = (
    b'{"sequenceNumber":12345,"message":{"message":{"header":{"kind":0,'
    b'"sender":"0x0000000000000000000000000000000000000000","blockNumber":0,"timestamp":0,'
    b'"requestId":"0x0000000000000000000000000000000000000000000000000000000000000000",'
    b'"baseFeeL1":0},"l2Msg":"3q2+7w=="},"delayedMessagesRead":3333},"signature":null}'
)
# Its older hash's input, written out by hand from MessageWithMetadata.Hash (arbos/
# arbostypes/messagewithmeta.go before Nitro's commit 2b3cf21) and go-ethereum's RLP.
V1_PREIMAGE = (
    b"Arbitrum Nitro Feed:"
    + bytes.fromhex("0000000000003039")  # sequence number 12345 (first, unlike the new hash)
    + bytes.fromhex("000000000000a4b1")  # chain id 0xa4b1
    + bytes.fromhex("0000000000000d05")  # delayed messages read 3333
    + bytes.fromhex("f841")  # rlp list, 65 bytes: the L1 message
    + bytes.fromhex("f83a")  # rlp list, 58 bytes: its header
    + bytes.fromhex("80")  # kind 0
    + bytes.fromhex("94")
    + bytes(20)  # poster
    + bytes.fromhex("8080")  # L1 block number 0, timestamp 0
    + bytes.fromhex("a0")
    + bytes(32)  # request id
    + bytes.fromhex("80")  # L1 base fee 0
    + bytes.fromhex("84deadbeef")  # the L2 message
)


def test_the_older_signature_hashes_the_rlp_of_the_l1_message() -> None:
    assert signed_parts(V1_MESSAGE, 0xA4B1).hash_input == V1_PREIMAGE
    assert signed_parts(V1_MESSAGE, 0xA4B1).version == 1
    # The same message as Nitro writes it now hashes to Nitro's own vector.
    v2 = V1_MESSAGE.replace(b'"signature":null', b'"signatureV2":null,"blockMetadata":"3q2+rw=="')
    assert signature_hash(v2, 0xA4B1).hex() == (
        "3d79853de5f9e4354e5d6c6d4cad19dcd969f9646f0cab21e5bdfee4902dfa2e"
    )
    assert signature_hash(V1_MESSAGE, 0xA4B1) != signature_hash(v2, 0xA4B1)
    # Absent fields as go-ethereum writes them: a nil request id an empty list, a nil base
    # fee the empty string (lists of 32 and 26 bytes); the optional fields only up to the
    # last one present, a nil one before it the empty string.
    bare = V1_MESSAGE.replace(
        b'"requestId":"0x0000000000000000000000000000000000000000000000000000000000000000",'
        b'"baseFeeL1":0',
        b'"requestId":null,"baseFeeL1":null',
    )
    assert signed_parts(bare, 1).hash_input.endswith(
        bytes.fromhex("e0" + "da" + "80" + "94" + "00" * 20 + "8080" + "c0" + "80" + "84deadbeef")
    )
    gas = V1_MESSAGE.replace(b'"l2Msg":"3q2+7w=="}', b'"l2Msg":"3q2+7w==","batchGasCost":1000}')
    assert signed_parts(gas, 1).hash_input.endswith(bytes.fromhex("84deadbeef8203e8"))
    stats = V1_MESSAGE.replace(
        b'"l2Msg":"3q2+7w=="}', b'"l2Msg":"3q2+7w==","batchDataTokens":{"length":5,"nonzeros":3}}'
    )
    assert signed_parts(stats, 1).hash_input.endswith(bytes.fromhex("84deadbeef80c20503"))


def test_each_kind_of_signature_is_checked_with_its_own_hash() -> None:
    v1 = feed_message(9, b"tx", signer=SEQUENCER, kind=1)
    v2 = feed_message(9, b"tx", signer=SEQUENCER, kind=2)
    assert b'"signature":"' in v1 and b'"signatureV2":"' in v2
    assert signature_hash(v1, 42161) != signature_hash(v2, 42161)
    assert signature_hash(v1, 42161) == signature_hash(v2, 42161, 1)
    assert feed_signer(v1, 42161) == SEQUENCER.address
    assert feed_signer(v2, 42161) == SEQUENCER.address
    # Each signature under the other kind's name recovers someone else.
    assert feed_signer(v1.replace(b'"signature"', b'"signatureV2"'), 42161) != SEQUENCER.address
    assert feed_signer(v2.replace(b'"signatureV2"', b'"signature"'), 42161) != SEQUENCER.address
    # The older hash covers the chain id too: another chain's copy does not verify.
    assert feed_signer(feed_message(9, b"tx", signer=SEQUENCER, kind=1, chain_id=1), 42161) != (
        SEQUENCER.address
    )
    # An intake with allowed signers takes either kind, and refuses either kind forged.
    intake = _intake(next_seq=9, allowed_signers=frozenset({SEQUENCER.address}))
    forged = feed_message(9, b"tx", signer=OTHER, kind=1)
    t = intake.take("a", Broadcast(1, [FeedMessage(9, forged)]))
    assert [r.outcome for r in t.refused] == ["signer"]
    t = intake.take("b", Broadcast(1, [FeedMessage(9, v1)]))
    assert [m.raw for m in t.released] == [v1]
    v2_10 = feed_message(10, b"tx", signer=SEQUENCER)
    t = intake.take("b", Broadcast(1, [FeedMessage(10, v2_10)]))
    assert [m.raw for m in t.released] == [v2_10]


def test_raw_slices_are_the_bytes_sent_not_a_reserialization() -> None:
    # Whitespace, key order and escapes as a sender wrote them are kept byte for byte.
    odd = (
        b'{ "messages" : [ {"message":{"message":{"header":{"kind":3,"sender":"0x'
        + b"00" * 20
        + b'","blockNumber":1,"timestamp":2,"requestId":null,"baseFeeL1":1e0},'
        b'"l2Msg":"AA=="},"delayedMessagesRead":0}, "x\\"}]{": "]}",'
        b' "sequenceNumber" : 5 } ,{"sequenceNumber":6,"extra":[1,{"a":"}"}]}],'
        b' "version": 1, "note":"messages"}'
    )
    b = parse_broadcast(odd)
    assert [m.seq for m in b.messages] == [5, 6]
    assert b.messages[0].raw.startswith(b'{"message":') and b.messages[0].raw.endswith(b": 5 }")
    assert b.messages[1].raw == b'{"sequenceNumber":6,"extra":[1,{"a":"}"}]}'
    assert orjson.loads(b.messages[0].raw)['x"}]{'] == "]}"


def test_realistic_messages_round_trip_in_one_broadcast() -> None:
    made = realistic(6, signer=SEQUENCER)
    text = encode_broadcast([m.raw for m in made], 149_999_999)
    b = parse_broadcast(text)
    assert [(m.seq, m.raw) for m in b.messages] == [(m.seq, m.raw) for m in made]
    assert b.confirmed == 149_999_999
    assert all(feed_signer(m.raw, 42161) == SEQUENCER.address for m in b.messages)
    assert l1_block_number(made[0].raw) == 19_000_000
    # Go's encoder and Python's agree on the wrapper: the JSON itself is the same document.
    assert json.loads(text)["messages"][0] == json.loads(made[0].raw)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        (b"{not json", "not JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"messages":[]}', "version"),
        (b'{"version":1,"messages":{}}', "not a list"),
        (b'{"version":1,"messages":[1]}', "object"),
        (b'{"version":1,"messages":[{"sequenceNumber":-1}]}', "sequenceNumber"),
        (b'{"version":1,"messages":[{"sequenceNumber":"5"}]}', "sequenceNumber"),
        (b'{"version":1,"messages":[{"sequenceNumber":true}]}', "sequenceNumber"),
        (b'{"version":1,"messages":[{"sequenceNumber":9223372036854775808}]}', "range"),
        (b'{"version":1,"confirmedSequenceNumberMessage":5}', "not an object"),
        (
            b'{"version":1,"messages":[{"sequenceNumber":1}],"messages":[{"sequenceNumber":2}]}',
            "twice",
        ),
    ],
)
def test_malformed_broadcasts_are_refused_with_a_reason(text: bytes, what: str) -> None:
    with pytest.raises(NitroFormatError, match=what):
        parse_broadcast(text)


def test_a_huge_base_fee_is_read_past_64_bits() -> None:
    raw = feed_message(1, b"x", base_fee=2**70, signer=SEQUENCER)
    assert feed_signer(raw, 42161) == SEQUENCER.address
    assert parse_broadcast(encode_broadcast([raw])).messages[0].raw == raw


def test_spans_find_only_the_top_level_messages() -> None:
    text = b'{"a":{"messages":[{"x":1}]},"messages":[{"sequenceNumber":1,"messages":[{}]}]}'
    spans = message_spans(text)
    assert [text[a:b] for a, b in spans] == [b'{"sequenceNumber":1,"messages":[{}]}']


def test_examples_yield_their_feed_messages() -> None:
    assert len(example_messages()) == 2


# --- the intake ------------------------------------------------------------------------------
def _intake(**kw: object) -> FeedIntake:
    args: dict[str, object] = {
        "chain_id": 42161,
        "allowed_signers": frozenset(),
        "max_payload_bytes": 200_000,
        "max_held": 100,
        "max_held_bytes": 10_000_000,
    }
    args.update(kw)
    return FeedIntake(**args)  # type: ignore[arg-type]


def _b(*seqs: int, made: dict[int, bytes], confirmed: int | None = None) -> Broadcast:
    return Broadcast(1, [FeedMessage(s, made[s]) for s in seqs], confirmed)


def test_two_inputs_overlapping_out_of_order_give_each_number_once_in_order() -> None:
    made = {m.seq: m.raw for m in realistic(12, first_seq=100, sizes=(100, 2000))}
    intake = _intake(next_seq=100)
    out: list[int] = []
    dups = 0
    # Input a is ahead and skips 103 (it lost it), b is late, resends and fills the hole.
    script = [
        ("a", (100, 101, 102)),
        ("b", (100,)),
        ("a", (104, 105)),
        ("b", (101, 102, 103)),
        ("a", (106, 107, 108)),
        ("b", (104, 105, 106, 107, 108, 109)),
        ("a", (110, 111)),
        ("b", (110, 111)),
    ]
    for source, seqs in script:
        t = intake.take(source, _b(*seqs, made=made))
        assert not t.refused
        out += [m.seq for m in t.released]
        dups += t.duplicates
        for m in t.released:
            assert m.raw == made[m.seq]
    assert out == list(range(100, 112))
    assert dups == sum(len(s) for _, s in script) - 12


def test_the_first_message_sets_the_start_when_nothing_is_kept() -> None:
    made = {m.seq: m.raw for m in realistic(3, first_seq=5, sizes=(100, 200))}
    intake = _intake()
    assert [m.seq for m in intake.take("a", _b(6, 7, made=made)).released] == [6, 7]
    assert intake.take("b", _b(5, made=made)).duplicates == 1  # before the start


def test_an_input_going_backwards_is_refused_until_it_reconnects() -> None:
    made = {m.seq: m.raw for m in realistic(5, first_seq=0, sizes=(100, 200))}
    intake = _intake(next_seq=0)
    intake.take("a", _b(0, 1, 2, made=made))
    t = intake.take("a", _b(1, made=made))
    assert [(r.seq, r.outcome) for r in t.refused] == [(1, "backwards")]
    intake.connected("a")  # a reconnect replays from what it asked for: no longer backwards
    t = intake.take("a", _b(1, 2, 3, made=made))
    assert not t.refused and t.duplicates == 2 and [m.seq for m in t.released] == [3]


def test_signatures_are_checked_when_signers_are_allowed() -> None:
    intake = _intake(next_seq=1, allowed_signers=frozenset({SEQUENCER.address}))
    good = feed_message(1, b"tx", signer=SEQUENCER)
    forged = feed_message(1, b"tx", signer=OTHER)
    unsigned = feed_message(1, b"tx")
    tampered = good.replace(
        b'"l2Msg":"' + base64.b64encode(b"tx"), b'"l2Msg":"' + base64.b64encode(b"tX")
    )
    cases = (("forged", forged, "signer"), ("unsigned", unsigned, "signature"))
    for source, raw, outcome in (*cases, ("tampered", tampered, "signer")):
        t = intake.take(source, Broadcast(1, [FeedMessage(1, raw)]))
        assert [r.outcome for r in t.refused] == [outcome] and not t.released
    # Refused copies leave the number missing: the good one is still taken.
    t = intake.take("good", Broadcast(1, [FeedMessage(1, good)]))
    assert [m.raw for m in t.released] == [good]


def test_a_refused_message_does_not_make_the_next_good_one_backwards() -> None:
    intake = _intake(next_seq=1, allowed_signers=frozenset({SEQUENCER.address}))
    forged_ahead = feed_message(5, b"tx", signer=OTHER)
    forged = feed_message(1, b"tx", signer=OTHER)
    t = intake.take("a", Broadcast(1, [FeedMessage(5, forged_ahead), FeedMessage(1, forged)]))
    assert [r.outcome for r in t.refused] == ["signer", "signer"]
    good = [feed_message(s, b"tx", signer=SEQUENCER) for s in (1, 2)]
    t = intake.take(
        "a", Broadcast(1, [FeedMessage(s, g) for s, g in zip((1, 2), good, strict=True)])
    )
    assert not t.refused and [m.raw for m in t.released] == good


def test_too_large_and_too_much_held_are_refused() -> None:
    made = {m.seq: m.raw for m in realistic(6, first_seq=0, sizes=(100, 200))}
    intake = _intake(next_seq=0, max_held=2, max_payload_bytes=150)
    big = FeedMessage(0, b"x" * 151)
    t = intake.take("a", Broadcast(1, [big]))
    assert [r.outcome for r in t.refused] == ["too_large"]
    intake = _intake(next_seq=0, max_held=2)
    t = intake.take("a", _b(1, 2, 3, made=made))
    assert [(r.seq, r.outcome) for r in t.refused] == [(3, "held_full")]
    assert intake.missing() is not None and intake.missing().start == 0  # type: ignore[union-attr]
    t = intake.take("b", _b(0, 1, 2, 3, made=made))
    assert [m.seq for m in t.released] == [0, 1, 2, 3]


def test_confirmations_only_move_forward() -> None:
    intake = _intake(next_seq=0)
    assert intake.take("a", Broadcast(1, [], 10)).confirmed == 10
    assert intake.take("b", Broadcast(1, [], 9)).confirmed is None
    assert intake.take("b", Broadcast(1, [], 10)).confirmed is None
    assert intake.take("b", Broadcast(1, [], 11)).confirmed == 11
