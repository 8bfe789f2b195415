"""The HTTP connection's phases: the transition table, and a connection moved by it."""

from __future__ import annotations

import asyncio

from chainrelay.server.phases import TRANSITIONS, Event, Phase, on
from tests.protocol.test_http_fast_path import (
    MAX_BODY,
    REQUEST_ID_LINE,
    Front,
    answers,
    balance,
    post,
)
from tests.protocol.test_rpc_hits import ADDR


def test_every_phase_but_the_last_two_leads_back_to_idle() -> None:
    back = {Phase.IDLE}
    grew = True
    while grew:
        before = len(back)
        back |= {phase for (phase, _), after in TRANSITIONS.items() if after in back}
        grew = len(back) > before
    assert back == set(Phase) - {Phase.UPGRADED, Phase.LINGERING}
    assert not any(phase is Phase.UPGRADED for phase, _ in TRANSITIONS), "upgraded for good"
    # Once the last answer is out, every event leaves a connection lingering.
    assert all(
        after is Phase.LINGERING
        for (phase, _), after in TRANSITIONS.items()
        if phase is Phase.LINGERING
    )


def test_the_rows_of_each_event_are_the_table() -> None:
    rows = {(phase, event): after for event in Event for phase, after in on(event).items()}
    assert rows == TRANSITIONS


def test_a_request_read_by_httptools_ends_idle_and_a_lone_head_is_held() -> None:
    front = Front()
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    assert conn._phase is Phase.IDLE
    conn.data_received(post(balance(1)) + post(balance(2)))  # two in one read: httptools
    assert conn._phase is Phase.IDLE
    request = post(balance(3))
    head_end = request.index(b"\r\n\r\n") + 4
    conn.data_received(request[:head_end])
    assert conn._phase is Phase.HELD
    conn.data_received(request[head_end:])
    assert conn._phase is Phase.IDLE
    assert [a.doc["id"] for a in answers(transport.out)] == [1, 2, 3]


def test_a_head_split_over_reads_is_read_in_the_head_phase() -> None:
    front = Front()
    conn, _ = front.connect()
    conn.data_received(b"POST / HTTP/1.1\r\nHost: x\r\n")
    assert conn._phase is Phase.HEAD
    conn.data_received(b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert conn._phase is Phase.BODY
    conn.data_received(b"{}")
    assert conn._phase is Phase.IDLE


def test_a_body_over_the_limit_is_refused_and_the_rest_of_it_ignored() -> None:
    front = Front()
    conn, transport = front.connect()
    conn.data_received(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (MAX_BODY + 1)
        + b"x" * (MAX_BODY + 1)
    )
    assert conn._phase is Phase.LINGERING  # the 413 was its last answer
    assert [a.status for a in answers(transport.out)] == [413]
    assert transport.closed


async def test_a_notification_answered_later_is_written_as_one_answered_at_once() -> None:
    front = Front()
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    conn.data_received(
        post(
            b'{"jsonrpc":"2.0","method":"eth_getBalance","params":["%s","latest"]}' % ADDR.encode()
        )
    )
    at_once = bytes(transport.out)
    transport.out.clear()
    later: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
    conn._answer(later, True)
    later.set_result(None)  # what the pipeline gives a notification's call: nothing owed
    conn._flush()  # as its done-callback will
    # The same answer but for its own id.
    assert REQUEST_ID_LINE.sub(b"", bytes(transport.out)) == REQUEST_ID_LINE.sub(b"", at_once)
    assert [(a.status, a.body) for a in answers(at_once)] == [(200, b"")]
