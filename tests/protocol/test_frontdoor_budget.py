"""The front door's memory budget and the bounds around it, bytes in, bytes out.

What a client makes the front door hold between its reads (a body still coming in, a head
kept for its body, an unfinished WebSocket message, pongs queued for a peer that does not
read) counts per address and node-wide; past a bound the client is refused (429, 503,
close 1008/1013), never held. Also: a pipelined flood parsed a turn at a time, the
lingering close after a last answer, and close 1007 for a text message that is not UTF-8.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from typing import Any

import pytest
from websockets.frames import Close, Frame, Opcode

from chainrelay.allocator import give_back_freed_memory
from chainrelay.server.budget import Account, Budget, Over
from chainrelay.server.http import HttpProtocol
from chainrelay.server.phases import Phase
from tests.lab.procs import until
from tests.lab.timing import SECOND
from tests.protocol.test_http_fast_path import (
    UPGRADE,
    Front,
    RecordingTransport,
    answers,
    balance,
    post,
)

KiB = 1024


class Socket(RecordingTransport):
    """A transport that shuts its write side, pauses, and reports a write buffer."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        super().__init__()
        self.peer = peer
        self.eof = False
        self.reading = True
        self.buffered = 0  # what get_write_buffer_size reports

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof, "written after the write side was shut"
        super().write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default


def budgeted(per_ip: int, total: int, **limits: Any) -> Front:
    front = Front()
    server = front.server
    server.limits = dataclasses.replace(
        server.limits, max_buffered_bytes_per_ip=per_ip, max_buffered_bytes_total=total, **limits
    )
    server.budget = Budget(per_ip, total)
    return front


def connect(front: Front, peer: str = "127.0.0.1") -> tuple[HttpProtocol, Socket]:
    conn = HttpProtocol(front.server)
    transport = Socket(peer)
    conn.connection_made(transport)
    return conn, transport


def announce(n: int) -> bytes:
    """A POST head announcing an ``n``-byte body, and its first byte."""
    return post(b"{", headers=b"Content-Type: application/json\r\nContent-Length: %d\r\n" % n)


def test_budget_refuses_past_an_address_share_first_then_the_node() -> None:
    budget = Budget(per_ip=100, total=150)
    assert budget.take("a", 60) is None
    assert budget.take("a", 41) is Over.IDENTITY
    assert budget.take("b", 91) is Over.NODE  # within b's share, past the node's
    assert budget.take("b", 90) is None
    assert (budget.held, budget.of("a"), budget.of("b")) == (150, 60, 90)
    budget.give("a", 60)
    assert budget.by_ip == {"b": 90}, "an address holding nothing is forgotten"


def test_an_account_settles_to_what_it_holds_and_gives_it_all_back() -> None:
    budget = Budget(per_ip=100, total=1000)
    one, two = Account(budget, "a"), Account(budget, "a")
    assert one.settle(70) is None
    assert two.settle(40) is Over.IDENTITY and two.held == 0
    two.settle_anyway(40)  # already queued: counted past the bound
    assert budget.of("a") == 110
    assert one.settle(10) is None and budget.of("a") == 50
    one.release()
    two.release()
    assert budget.held == 0 and not budget.by_ip


async def test_a_body_over_the_address_share_is_refused_429_and_dropped() -> None:
    front = budgeted(per_ip=3 * KiB, total=100 * KiB, max_body_bytes=10 * KiB)
    conn, transport = connect(front)
    conn.data_received(announce(8 * KiB))
    conn.data_received(b"x" * KiB)
    assert front.server.budget.of("127.0.0.1") == 1 + KiB  # the body so far (head aside)
    conn.data_received(b"x" * (2 * KiB))
    (got,) = answers(transport.out)
    assert got.status == 429 and got.headers[b"connection"] == b"close"
    assert conn._phase is Phase.LINGERING and transport.eof and not transport.closed
    assert front.server.budget.held == 0
    # Another address is not refused for it.
    front.warm(b'"0x2a"')
    other, out = connect(front, "127.0.0.2")
    body = balance(1)
    other.data_received(post(body)[:-5])
    other.data_received(post(body)[-5:])
    assert [a.status for a in answers(out.out)] == [200]


def test_a_body_past_the_node_budget_is_refused_503() -> None:
    front = budgeted(per_ip=6 * KiB, total=8 * KiB, max_body_bytes=10 * KiB)
    first, _ = connect(front, "127.0.0.1")
    first.data_received(announce(8 * KiB) + b"x" * (5 * KiB))
    second, transport = connect(front, "127.0.0.2")
    second.data_received(announce(8 * KiB) + b"x" * (4 * KiB))
    assert [a.status for a in answers(transport.out)] == [503]
    assert front.server.budget.of("127.0.0.2") == 0


def test_a_body_handed_over_and_a_held_head_give_their_bytes_back() -> None:
    front = budgeted(per_ip=100 * KiB, total=100 * KiB)
    front.warm(b'"0x2a"')
    budget = front.server.budget
    conn, transport = connect(front)
    request = post(balance(1))
    head_end = request.index(b"\r\n\r\n") + 4
    conn.data_received(request[:head_end])
    assert conn._phase is Phase.HELD and budget.held == head_end
    conn.data_received(request[head_end:])
    assert budget.held == 0
    for cut in (head_end + 3, 10):  # a body over two reads (through httptools), a head
        conn.data_received(request[:cut])
        assert budget.held == max(0, cut - head_end) or conn._phase is Phase.HEAD
        conn.data_received(request[cut:])
        assert budget.held == 0
    assert [a.status for a in answers(transport.out)] == [200, 200, 200]
    conn.data_received(announce(500))
    assert budget.held > 0
    conn.connection_lost(None)
    assert budget.held == 0


async def test_a_request_not_finished_in_time_is_dropped_with_408() -> None:
    front = budgeted(per_ip=100 * KiB, total=100 * KiB)
    conn, transport = connect(front)
    conn.data_received(announce(900))
    assert conn.progress() == (1, True)
    conn.drop_unfinished()
    assert [a.status for a in answers(transport.out)] == [408]
    assert front.server.budget.held == 0 and conn._phase is Phase.LINGERING
    idle, _ = connect(front)
    assert idle.progress() == (0, False)


async def test_after_a_413_the_rest_is_read_and_dropped_then_closed() -> None:
    front = budgeted(per_ip=100 * KiB, total=100 * KiB, linger_bytes=4 * KiB)
    conn, transport = connect(front)
    conn.data_received(announce(2000))  # over MAX_BODY (1000): refused at its head
    (got,) = answers(transport.out)
    assert got.status == 413 and got.headers[b"connection"] == b"close"
    # The write side is shut, not the connection: the client reads its 413, no reset.
    assert transport.eof and not transport.closed and transport.reading
    conn.data_received(b"x" * (3 * KiB))
    conn.data_received(post(balance(1)))  # nothing more is answered
    assert len(answers(transport.out)) == 1 and not transport.closed
    conn.data_received(b"x" * (2 * KiB))  # past linger_bytes
    assert transport.closed


async def test_a_pipelined_flood_is_parsed_a_turn_at_a_time_and_answered_in_order() -> None:
    per_turn = 16
    front = budgeted(per_ip=100 * KiB, total=100 * KiB, max_requests_per_turn=per_turn)
    front.warm(b'"0x2a"')
    conn, transport = connect(front)
    n = 500
    flood = b"".join(post(balance(i)) for i in range(n))
    conn.data_received(flood)
    first = len(answers(transport.out))
    assert per_turn <= first < per_turn + 60, "one turn's requests (and a slice's) only"
    assert not transport.reading, "no more is read while the read is not parsed"
    for _ in range(200):
        if len(answers(transport.out)) == n:
            break
        await asyncio.sleep(0)
    got = answers(transport.out)
    assert [a.doc["id"] for a in got] == list(range(n))
    assert transport.reading and conn._rest == b""


# --- WebSocket --------------------------------------------------------------------------


def frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


def upgraded(front: Front, peer: str = "127.0.0.1") -> tuple[HttpProtocol, Socket]:
    conn, transport = connect(front, peer)
    conn.data_received(UPGRADE)
    assert conn.ws is not None
    transport.out.clear()
    return conn, transport


def close_code(out: bytes | bytearray) -> int:
    """The code of the close frame a server wrote last (unmasked, short payload)."""
    at = bytes(out).rfind(b"\x88")
    assert at >= 0, f"no close frame in {bytes(out)[-40:]!r}"
    length = out[at + 1]
    return Close.parse(bytes(out[at + 2 : at + 2 + length])).code


def test_an_unfinished_message_counts_and_past_the_share_closes_1008() -> None:
    front = budgeted(per_ip=8 * KiB, total=100 * KiB)
    conn, transport = upgraded(front)
    budget = front.server.budget
    conn.data_received(frame(Opcode.TEXT, b"[" + b"1," * KiB, fin=False))
    assert budget.held == 2 * KiB + 1
    # A frame not yet complete is held by websockets' reader: counted too.
    big = frame(Opcode.CONT, b"1," * (5 * KiB))
    conn.data_received(big[: 4 * KiB])
    header = 2 + 2 + 4  # opcode and length, extended length, mask
    assert budget.held == 2 * KiB + 1 + 4 * KiB - header
    assert conn.progress() == (0, True)
    conn.data_received(big[4 * KiB : 7 * KiB])  # 9 KiB held, over 8 KiB
    assert close_code(transport.out) == 1008
    # Failed: its bytes dropped, the write side shut; what still comes is not read.
    assert budget.held == 0 and transport.eof
    conn.data_received(big[7 * KiB :])
    assert budget.held == 0 and conn.progress() == (0, False)


def test_a_message_not_finished_in_time_closes_1008() -> None:
    front = budgeted(per_ip=100 * KiB, total=100 * KiB)
    conn, transport = upgraded(front)
    conn.data_received(frame(Opcode.TEXT, b'{"jsonrpc"', fin=False))
    assert conn.progress() == (0, True)
    conn.drop_unfinished()
    assert close_code(transport.out) == 1008 and front.server.budget.held == 0


def test_pongs_stop_reading_while_the_peer_does_not_read_them() -> None:
    front = budgeted(per_ip=100 * KiB, total=1000 * KiB)
    conn, transport = upgraded(front)
    conn.data_received(frame(Opcode.PING, b"p" * 100) * 10)
    assert transport.out.count(b"p" * 100) == 10
    transport.buffered = 200 * KiB  # the transport is past its high-water mark
    conn.pause_writing()
    assert not transport.reading
    transport.buffered = 0
    conn.resume_writing()
    assert transport.reading


def test_pongs_past_the_address_share_close_1008() -> None:
    front = budgeted(per_ip=100 * KiB, total=1000 * KiB)
    conn, transport = upgraded(front)
    transport.buffered = 101 * KiB  # what the pongs of this read left queued
    conn.data_received(frame(Opcode.PING, b"p"))
    assert close_code(transport.out) == 1008


def test_text_that_is_not_utf8_closes_1007_binary_is_not_checked() -> None:
    front = budgeted(per_ip=100 * KiB, total=100 * KiB)
    conn, transport = upgraded(front)
    conn.data_received(frame(Opcode.BINARY, b"\xff"))
    assert b"-32700" in transport.out and not transport.closed
    # "é" split over two fragments is UTF-8 once whole.
    ok = '"\u00e9"'.encode()
    conn.data_received(frame(Opcode.TEXT, ok[:2], fin=False) + frame(Opcode.CONT, ok[2:]))
    assert not transport.closed
    conn.data_received(frame(Opcode.TEXT, b'{"a":"\xc3"}'))
    assert close_code(transport.out) == 1007 and transport.eof


@pytest.mark.parametrize("length", [0, 125])
def test_close_code_reads_what_websockets_writes(length: int) -> None:
    payload = struct.pack("!H", 1008) + b"r" * max(0, length - 2)
    assert close_code(Frame(Opcode.CLOSE, payload).serialize(mask=False, extensions=[])) == 1008


async def test_a_head_split_over_reads_counts_until_it_ends() -> None:
    front = budgeted(per_ip=100, total=100 * KiB)
    front.warm(b'"0x2a"')
    conn, transport = connect(front)
    request = post(balance(1))
    conn.data_received(request[:60])
    assert conn._phase is Phase.HEAD and front.server.budget.held == 60
    conn.data_received(request[60:])
    assert front.server.budget.held == 0
    conn.data_received(b"POST / HTTP/1.1\r\nHost: relay\r\nX-Padding: " + b"p" * 80)
    assert [a.status for a in answers(transport.out)] == [200, 429]


async def test_a_body_that_ends_in_its_read_is_answered_on_a_full_node() -> None:
    front = budgeted(per_ip=1 * KiB, total=1 * KiB, max_body_bytes=10 * KiB)
    front.warm(b'"0x2a"')
    hog, _ = connect(front, "127.0.0.2")
    hog.data_received(announce(4 * KiB) + b" " * (KiB - 1))  # the node's whole budget
    assert front.server.budget.held == front.server.budget.total
    conn, transport = connect(front)
    request = post(balance(1))
    head_end = request.index(b"\r\n\r\n") + 4
    # Head and body in two reads, the head alone not kept (the node is full): the body's
    # one piece ends it, handed over at once, never counted.
    conn.data_received(request[:head_end])
    assert conn._phase is Phase.BODY
    conn.data_received(request[head_end:])
    assert [a.status for a in answers(transport.out)] == [200]


async def test_the_sweep_drops_a_body_not_finished_in_time_and_keeps_a_finished_one() -> None:
    front = budgeted(per_ip=100 * KiB, total=100 * KiB, body_read_timeout=0.05)
    front.warm(b'"0x2a"')
    stuck, stuck_out = connect(front)
    fine, fine_out = connect(front)
    stuck.data_received(announce(500))
    fine.data_received(post(balance(1)))
    sweep = asyncio.create_task(front.server._sweep())
    try:
        await until(lambda: bool(stuck_out.out), 100 * 0.05 * SECOND, "the 408")
    finally:
        sweep.cancel()
    assert [a.status for a in answers(stuck_out.out)] == [408]
    assert [a.status for a in answers(fine_out.out)] == [200] and not fine_out.eof


def test_answers_queued_past_the_address_share_close_1013() -> None:
    front = budgeted(per_ip=100 * KiB, total=1000 * KiB)
    front.warm(b'"0x2a"')
    conn, transport = upgraded(front)
    conn.data_received(frame(Opcode.TEXT, balance(1)))
    assert b'"result":"0x2a"' in transport.out
    transport.buffered = 150 * KiB  # the peer reads nothing; far below max_ws_send_buffer
    conn.data_received(frame(Opcode.TEXT, balance(2)))
    assert close_code(transport.out) == 1013 and transport.closed
    conn.connection_lost(None)
    assert front.server.budget.held == 0


async def test_nothing_pipelined_behind_a_last_answer_is_answered_nor_upgraded() -> None:
    front = budgeted(per_ip=100 * KiB, total=100 * KiB)
    front.warm(b'"0x2a"')
    conn, transport = connect(front)
    too_large = post(b"", headers=b"Content-Length: 2000\r\n") + b"x" * 2000
    conn.data_received(too_large + post(balance(1)) + UPGRADE)
    assert [a.status for a in answers(transport.out)] == [413]
    assert conn.ws is None and conn._phase is Phase.LINGERING


async def test_a_session_closed_then_lost_keeps_no_timer() -> None:
    """The drop of a peer told to close is due close_timeout later; a connection that ends
    first cancels it, so its session is not kept alive that long (thousands of refused
    upgrades would pin their sessions for close_timeout each)."""
    front = budgeted(per_ip=100 * KiB, total=1000 * KiB)
    conn, _transport = upgraded(front)
    ws = conn.ws
    assert ws is not None
    conn.data_received(frame(Opcode.TEXT, b'{"a":"\xc3"}'))  # closed 1007
    timer = ws._abort_timer
    assert timer is not None and not timer.cancelled()
    conn.connection_lost(None)
    assert timer.cancelled() and ws._abort_timer is None


def test_a_lost_connection_lets_go_of_what_it_read_at_once() -> None:
    """An unfinished body or message is dropped when its connection is lost, not when the
    collector gets to the protocol object (it is in cycles with its transport)."""
    front = budgeted(per_ip=100 * KiB, total=1000 * KiB)
    conn, _transport = connect(front)
    conn.data_received(announce(900))  # the front's body limit is 1000 bytes
    conn.data_received(b" " * 500)
    assert conn._body
    conn.connection_lost(None)
    assert not conn._body and front.server.budget.held == 0
    conn, _transport = upgraded(front)
    ws = conn.ws
    assert ws is not None
    conn.data_received(frame(Opcode.TEXT, b"[" + b"1," * KiB, fin=False))
    conn.data_received(frame(Opcode.CONT, b"1," * (5 * KiB))[: 4 * KiB])
    assert ws._fragments and ws.proto.reader.buffer
    conn.connection_lost(None)
    assert not ws._fragments and not ws.proto.reader.buffer


def test_a_burst_let_go_of_is_seen_once_and_the_heap_trimmed() -> None:
    budget = Budget(100 * KiB, 1000 * KiB)
    for ip in ("a", "b", "c"):
        assert budget.take(ip, 90 * KiB) is None
    assert not budget.let_go(100 * KiB)  # all still held
    budget.give("a", 90 * KiB)
    budget.give("b", 90 * KiB)
    assert budget.let_go(100 * KiB)
    assert not budget.let_go(100 * KiB)  # the same burst, once
    budget.give("c", 90 * KiB)  # its end, less than a trim's worth: all held is let go of
    assert budget.let_go(100 * KiB)
    assert not budget.let_go(100 * KiB)
    assert budget.take("a", 10 * KiB) is None
    budget.give("a", 10 * KiB)
    assert not budget.let_go(100 * KiB)  # too little to be worth a trim
    assert give_back_freed_memory()  # glibc, as on every machine this runs on
