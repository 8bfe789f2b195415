"""Nitro's feed compression (``chainrelay.nitro.deflate``), sans-I/O: the upgrade's
extension negotiation with the exact header strings Nitro's ends send, and messages
compressed as Nitro's broadcaster compresses them.

Where the strings come from (OffchainLabs/nitro, gobwas/ws, gobwas/httphead):

- ``wsbroadcastserver/utils.go`` ``init``: the extension's name is ``"Arbitrum-" +
  wsflate.ExtensionNameBytes``;
- ``broadcastclient/broadcastclient.go``: a node with ``enable-compression`` offers
  ``wsflate.DefaultParameters.Option()`` (gobwas ``wsflate/helper.go``: both
  ``no_context_takeover`` parameters), written by httphead ``WriteOptions`` (``;``, no
  spaces); it counts compression as agreed only if the answer ``Equal``s that option;
- ``wsbroadcastserver/wsbroadcastserver.go``: the server negotiates with
  ``wsflate.Extension{Parameters: wsflate.DefaultParameters}`` (gobwas ``wsflate/
  extension.go`` ``Negotiate``), which answers ``want.Option()``: the same string;
- ``wsbroadcastserver/clientmanager.go`` ``serializeMessage``: ``flate.NewWriterDict(...,
  BestCompression, GetStaticCompressorDictionary())`` closed per message, RSV1 set.
"""

from __future__ import annotations

import hashlib
import zlib

import pytest
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.headers import parse_extension
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from chainrelay.nitro.codec import encode_broadcast
from chainrelay.nitro.deflate import (
    NITRO,
    NITRO_ANSWER,
    NITRO_EXTENSION,
    NITRO_OFFER,
    STANDARD,
    FeedDeflate,
    SharedDeflate,
    client_extensions,
    server_extensions,
)
from chainrelay.nitro.dictionary import FEED_DICTIONARY, FEED_DICTIONARY_SHA256
from tests.lab.nitro_messages import realistic

# What a Nitro node with enable-compression writes, and what Nitro's relay answers.
NITRO_CLIENT_OFFERS = (
    "Arbitrum-permessage-deflate;server_no_context_takeover;client_no_context_takeover"
)
NITRO_SERVER_ANSWERS = (
    "Arbitrum-permessage-deflate;server_no_context_takeover;client_no_context_takeover"
)


def upgrade(
    offer: str | None, shared: SharedDeflate | None = None
) -> tuple[Response, ServerProtocol]:
    server = ServerProtocol(extensions=server_extensions(shared or SharedDeflate(1 << 20)))
    h = Headers()
    h["Host"] = "leaf"
    h["Upgrade"] = "websocket"
    h["Connection"] = "Upgrade"
    h["Sec-WebSocket-Key"] = "dGhlIHNhbXBsZSBub25jZQ=="
    h["Sec-WebSocket-Version"] = "13"
    if offer is not None:
        h["Sec-WebSocket-Extensions"] = offer
    response = server.accept(Request("/", h))
    assert response.status_code == 101
    server.send_response(response)
    return response, server


def answered(response: Response) -> list[tuple[str, set[tuple[str, str | None]]]]:
    """The answer's extensions as gobwas compares them: name, and the parameters as a set."""
    return [
        (name, set(params))
        for value in response.headers.get_all("Sec-WebSocket-Extensions")
        for name, params in parse_extension(value)
    ]


def test_the_constants_are_nitros_strings() -> None:
    assert NITRO_OFFER == NITRO_CLIENT_OFFERS
    assert NITRO_ANSWER == NITRO_SERVER_ANSWERS
    assert NITRO_EXTENSION == "Arbitrum-permessage-deflate"
    assert len(FEED_DICTIONARY) == 20023
    assert hashlib.sha256(FEED_DICTIONARY).hexdigest() == FEED_DICTIONARY_SHA256
    assert FEED_DICTIONARY.startswith(
        b"ADDUAtcQABTAABSAAEBCAoAEABUAABAOABAUACshAFYAACAKAAOAAHoSABAa"
    )


def test_a_nitro_nodes_offer_is_answered_as_nitros_relay_answers() -> None:
    response, server = upgrade(NITRO_CLIENT_OFFERS)
    # Equal to the offer, as Nitro's client requires: the name and exactly both parameters.
    assert answered(response) == [
        (
            NITRO_EXTENSION,
            {("server_no_context_takeover", None), ("client_no_context_takeover", None)},
        )
    ]
    assert [e.name for e in server.extensions] == [NITRO_EXTENSION]


@pytest.mark.parametrize(
    ("offer", "agreed"),
    [
        # gobwas Negotiate: any server_max_window_bits is declined (it wants none) ...
        ("Arbitrum-permessage-deflate;server_max_window_bits=15", []),
        # ... client_max_window_bits is accepted and not echoed; no parameter at all is fine.
        ("Arbitrum-permessage-deflate; client_max_window_bits", [NITRO_EXTENSION]),
        ("Arbitrum-permessage-deflate", [NITRO_EXTENSION]),
        # The first acceptable offer wins, and only one compression extension is agreed.
        (f"{NITRO_CLIENT_OFFERS}, permessage-deflate", [NITRO_EXTENSION]),
        (
            "permessage-deflate; client_max_window_bits, " + NITRO_CLIENT_OFFERS,
            ["permessage-deflate"],
        ),
        (
            "Arbitrum-permessage-deflate;server_max_window_bits=10, permessage-deflate",
            ["permessage-deflate"],
        ),
        # A name is compared exactly, as gobwas compares bytes.
        ("arbitrum-permessage-deflate", []),
        ("Arbitrum-permessage-deflate;x=1", []),
        (None, []),
    ],
)
def test_offers(offer: str | None, agreed: list[str]) -> None:
    response, server = upgrade(offer)
    assert [e.name for e in server.extensions] == agreed
    assert [name for name, _ in answered(response)] == agreed
    for _, params in answered(response):
        assert params == {
            ("server_no_context_takeover", None),
            ("client_no_context_takeover", None),
        }


def client_with(answer: str) -> ClientProtocol:
    client = ClientProtocol(parse_uri("ws://relay:9642"), extensions=client_extensions())
    request = client.connect()
    # Nitro's offer comes first; websockets writes "; " between parameters, which gobwas
    # reads as the same option (httphead skips the spaces).
    offered = request.headers["Sec-WebSocket-Extensions"]
    name, params = parse_extension(offered)[0]
    assert (name, params) == parse_extension(NITRO_CLIENT_OFFERS)[0]
    assert [n for n, _ in parse_extension(offered)] == [NITRO_EXTENSION, "permessage-deflate"]
    h = Headers()
    h["Upgrade"] = "websocket"
    h["Connection"] = "Upgrade"
    from websockets.utils import accept_key

    h["Sec-WebSocket-Accept"] = accept_key(request.headers["Sec-WebSocket-Key"])
    h["Sec-WebSocket-Extensions"] = answer
    client.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in h.raw_items())
        + b"\r\n"
    )
    assert client.handshake_exc is None, client.handshake_exc
    client.events_received()  # the response
    return client


def go_frames(text: bytes, fragment: int | None = None) -> list[bytes]:
    """``text`` as Nitro's relay writes it to a compressing client: one closed deflate
    stream with the dictionary, RSV1 on the first frame, cut into fragments of
    ``fragment`` bytes (a gobwas ``wsutil.Writer`` flushes when its buffer fills)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=FEED_DICTIONARY)
    body = c.compress(text) + c.flush(zlib.Z_FINISH)
    parts = (
        [body]
        if fragment is None
        else [body[i : i + fragment] for i in range(0, len(body), fragment)]
    )
    out = []
    for i, part in enumerate(parts):
        fin = i == len(parts) - 1
        b0 = (0x80 if fin else 0) | (0x40 if i == 0 else 0) | (Opcode.TEXT.value if i == 0 else 0)
        n = len(part)
        head = (
            bytes([b0, n])
            if n < 126
            else bytes([b0, 126]) + n.to_bytes(2, "big")
            if n < 65536
            else bytes([b0, 127]) + n.to_bytes(8, "big")
        )
        out.append(head + part)
    return out


def test_our_client_takes_nitros_answer_and_reads_its_messages() -> None:
    client = client_with(NITRO_SERVER_ANSWERS)
    assert [e.name for e in client.extensions] == [NITRO_EXTENSION]
    msgs = realistic(3, sizes=(2_000, 60_000))
    for m in msgs:
        text = encode_broadcast([m.raw])
        for f in go_frames(text, fragment=4096):
            client.receive_data(f)
        frames = client.events_received()
        assert all(isinstance(f, Frame) for f in frames) and frames[-1].fin  # type: ignore[union-attr]
        assert b"".join(f.data for f in frames) == text  # type: ignore[union-attr]
    assert client.state.name == "OPEN"


def test_our_client_refuses_an_answer_keeping_the_servers_context() -> None:
    client = ClientProtocol(parse_uri("ws://relay:9642"), extensions=client_extensions())
    request = client.connect()
    from websockets.utils import accept_key

    client.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + f"Sec-WebSocket-Accept: {accept_key(request.headers['Sec-WebSocket-Key'])}\r\n".encode()
        + b"Sec-WebSocket-Extensions: Arbitrum-permessage-deflate\r\n\r\n"
    )
    assert client.handshake_exc is not None


def test_each_message_is_compressed_once_for_every_client() -> None:
    text = encode_broadcast([realistic(1)[0].raw])
    # Room for the message and one compressed copy, not much more.
    shared = SharedDeflate(len(text) * 3 // 2)
    a, b = FeedDeflate(NITRO, shared), FeedDeflate(NITRO, shared)
    fa = a.encode(Frame(Opcode.TEXT, text))
    fb = b.encode(Frame(Opcode.TEXT, bytes(text)))  # the same message, another object
    assert fa.rsv1 and fb.rsv1 and fa.data == fb.data
    assert shared.compressed == 1
    # Nitro's form: one closed stream with the dictionary, inflating to the very bytes.
    d = zlib.decompressobj(-15, zdict=FEED_DICTIONARY)
    assert d.decompress(bytes(fa.data)) == text and d.eof
    # Without the dictionary it is not readable: why the extension has a name of its own.
    with pytest.raises(zlib.error):
        zlib.decompressobj(-15).decompress(bytes(fa.data))
    # The standard extension in RFC 7692's form: a sync flush, its tail cut.
    fs = FeedDeflate(STANDARD, shared).encode(Frame(Opcode.TEXT, text))
    assert zlib.decompressobj(-15).decompress(bytes(fs.data) + b"\x00\x00\xff\xff") == text
    assert shared.compressed == 2
    assert shared.get(STANDARD, text) and shared.compressed == 3  # past the bound: not kept
    for i in range(5):  # the oldest go first: the message's copy is made again
        a.encode(Frame(Opcode.TEXT, encode_broadcast([], i) + b" " * (len(text) // 4)))
    a.encode(Frame(Opcode.TEXT, text))
    assert shared.compressed == 9


def test_a_compressed_message_past_the_size_limit_is_refused() -> None:
    ext = FeedDeflate(NITRO, None)
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=FEED_DICTIONARY)
    body = bomb.compress(b"0" * 1_000_000) + bomb.flush(zlib.Z_FINISH)
    assert len(body) < 2_000
    with pytest.raises(PayloadTooBig):
        ext.decode(Frame(Opcode.TEXT, body, rsv1=True), max_size=64 * 1024)
    small = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=FEED_DICTIONARY)
    ok = small.compress(b"0" * 1000) + small.flush(zlib.Z_FINISH)
    assert ext.decode(Frame(Opcode.TEXT, ok, rsv1=True), max_size=1000).data == b"0" * 1000
