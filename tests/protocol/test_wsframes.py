"""The upstream link's WebSocket fast path against websockets' own protocol objects: the
frames it writes must parse as a server parses them, and it must find frame boundaries
where websockets writes them. Bytes in, bytes out; no sockets."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from chainrelay.wire import wsframes

MASK = b"\x01\x02\x03\x04"
SIZES = (0, 1, 125, 126, 127, 65535, 65536, 70000)


def server_frames(data: bytes) -> list[Frame]:
    server = ServerProtocol(state=State.OPEN, max_size=None)
    server.receive_data(data)
    events = server.events_received()
    assert server.state is State.OPEN, server.close_exc
    return [e for e in events if isinstance(e, Frame)]


def server_writes(payloads: list[bytes]) -> bytes:
    server = ServerProtocol(state=State.OPEN, max_size=None)
    for p in payloads:
        server.send_text(p)
    return b"".join(server.data_to_send())


@pytest.mark.parametrize("size", SIZES)
def test_encoded_text_frame_is_what_a_server_reads(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    frames = server_frames(wsframes.encode_text(payload, MASK))
    assert len(frames) == 1
    assert frames[0].opcode is Opcode.TEXT and frames[0].fin
    assert frames[0].data == payload


@pytest.mark.parametrize("size", SIZES)
def test_next_frame_finds_a_server_frame_only_once_complete(size: int) -> None:
    payload = b"x" * size
    wire = server_writes([payload])
    for cut in (0, 1, 2, 3, 9, len(wire) - 1):
        if cut < len(wire):
            assert wsframes.next_frame(wire[:cut], 0, 1 << 20) is None
    got = wsframes.next_frame(wire, 0, 1 << 20)
    assert got is not None
    first, start, end = got
    assert first == wsframes.FIN_TEXT
    assert end == len(wire)
    assert wire[start:end] == payload


def test_next_frame_walks_consecutive_frames_from_an_offset() -> None:
    payloads = [b'{"id":1}', b"y" * 300, b"", b"z" * 70000]
    wire = b"garbage" + server_writes(payloads)
    pos, found = len(b"garbage"), []
    while (got := wsframes.next_frame(bytearray(wire), pos, 1 << 20)) is not None:
        _, start, end = got
        found.append(wire[start:end])
        pos = end
    assert found == payloads
    assert pos == len(wire)


def test_next_frame_refuses_a_header_announcing_too_much() -> None:
    head = server_writes([b"a" * 70000])[:10]  # the header alone: payload not yet here
    with pytest.raises(wsframes.FrameTooLarge):
        wsframes.next_frame(head, 0, 65536)


def test_a_masked_frame_reports_its_payload_after_the_mask() -> None:
    wire = wsframes.encode_text(b"hello", MASK)
    got = wsframes.next_frame(wire, 0, 1024)
    assert got is not None
    first, start, end = got
    assert first == wsframes.FIN_TEXT and wire[1] & wsframes.MASK_BIT
    assert wire[start - 4 : start] == MASK and end == len(wire)
