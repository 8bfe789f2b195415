"""Nitro feed messages for tests and benchmarks: Nitro's published serialization examples
(tests/corpora/nitro-feed), and generated messages of realistic size written as Nitro's
Go encoder writes them (compact JSON, fields in struct order, base64 bytes), optionally
signed as a Nitro sequencer signs them (``SignatureHash``, go-ethereum's ``crypto.Sign``).
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass
from pathlib import Path

from chainrelay.nitro.codec import encode_broadcast, signature_hash
from chainrelay.tree.frame import Signer

CORPUS = Path(__file__).resolve().parent.parent / "corpora" / "nitro-feed"


def serialization_examples() -> dict[str, object]:
    data: dict[str, object] = json.loads((CORPUS / "serialization_examples.json").read_text())
    return data


def example_messages() -> list[bytes]:
    """The feed messages of Nitro's serialization examples, as their bytes in those texts."""
    from chainrelay.nitro.codec import parse_broadcast

    out = []
    examples = serialization_examples()["examples"]
    assert isinstance(examples, list)
    for e in examples:
        out += [m.raw for m in parse_broadcast(e["text"].encode()).messages]
    return out


def l2_payload(rng: random.Random, size: int, compressible: bool) -> bytes:
    """An L2 message body: RLP-ish transactions (repeated addresses, zero runs) when
    ``compressible``, else random bytes (a brotli-compressed batch, a blob)."""
    if not compressible:
        return rng.randbytes(size)
    words = [rng.randbytes(20) for _ in range(16)] + [bytes(32), b"\xa9\x05\x9c\xbb" + bytes(8)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
        out += rng.randbytes(rng.randint(1, 8))
    return bytes(out[:size])


@dataclass(frozen=True, slots=True)
class Made:
    seq: int
    raw: bytes


def feed_message(
    seq: int,
    l2: bytes,
    *,
    chain_id: int = 42161,
    signer: Signer | None = None,
    block_hash: bytes | None = None,
    block_metadata: bytes | None = None,
    l1_block: int = 19_000_000,
    timestamp: int = 1_700_000_000,
    delayed: int = 1_500_000,
    base_fee: int = 30_000_000_000,
    kind: int = 2,
) -> bytes:
    """One feed message's JSON as Nitro's encoder writes it (signed if ``signer``): with
    ``kind`` 2 as Nitro writes it now (``signatureV2``), with 1 as it did before
    November 2025 (``signature``, over the older hash)."""
    b64 = base64.b64encode

    def render(signature: bytes | None) -> bytes:
        header = (
            '{"kind":3,"sender":"0xa4b000000000000000000073657175656e636572",'
            f'"blockNumber":{l1_block},"timestamp":{timestamp},"requestId":null,'
            f'"baseFeeL1":{base_fee}}}'
        )
        parts = [
            f'{{"sequenceNumber":{seq},"message":{{"message":{{"header":{header},'
            f'"l2Msg":"{b64(l2).decode()}"}},"delayedMessagesRead":{delayed}}}'
        ]
        if block_hash is not None:
            parts.append(f',"blockHash":"0x{block_hash.hex()}"')
        sig = "null" if signature is None else f'"{b64(signature).decode()}"'
        field = "signatureV2" if kind == 2 else "signature"
        parts.append(f',"{field}":{sig}')
        if block_metadata:
            parts.append(f',"blockMetadata":"{b64(block_metadata).decode()}"')
        parts.append("}")
        return "".join(parts).encode()

    unsigned = render(None)
    if signer is None:
        return unsigned
    return render(signer.sign(signature_hash(unsigned, chain_id, kind)))


def realistic(
    n: int,
    *,
    first_seq: int = 150_000_000,
    seed: int = 1,
    signer: Signer | None = None,
    chain_id: int = 42161,
    sizes: tuple[int, int] = (1_000, 100_000),
) -> list[Made]:
    """``n`` consecutive feed messages of 1-100 KB (log-uniform), every other one
    compressible, each with a block hash and block metadata as Nitro's newer versions send."""
    rng = random.Random(seed)
    lo, hi = sizes
    out = []
    for i in range(n):
        size = int(lo * (hi / lo) ** rng.random())
        l2 = l2_payload(rng, size, compressible=i % 2 == 0)
        raw = feed_message(
            first_seq + i,
            l2,
            chain_id=chain_id,
            signer=signer,
            block_hash=rng.randbytes(32),
            block_metadata=b"\x00" + rng.randbytes(2),
            l1_block=19_000_000 + i // 20,
        )
        out.append(Made(first_seq + i, raw))
    return out


def broadcast(messages: list[Made], confirmed: int | None = None) -> bytes:
    return encode_broadcast([m.raw for m in messages], confirmed)
