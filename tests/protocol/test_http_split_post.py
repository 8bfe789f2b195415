"""A POST whose head and body arrive in two reads, as Python's http.client writes them
(so requests and web3.py's HTTPProvider): the head is held until its body's read, and the
joined request takes the same shortcuts as one read would. Bytes in, bytes out."""

from __future__ import annotations

from tests.protocol.test_http_fast_path import MAX_BODY, Front, answers, balance, post

HIT = b'{"jsonrpc":"2.0","id":7,"result":"0x2a"}'


def head_and_body(request: bytes) -> tuple[bytes, bytes]:
    end = request.index(b"\r\n\r\n") + 4
    return request[:end], request[end:]


def test_head_then_body_is_answered_as_one_read_and_learned_for_replay() -> None:
    front = Front()
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    head, body = head_and_body(post(balance(7)))
    conn.data_received(head)
    assert transport.out == b"", "nothing is answered before the body"
    conn.data_received(body)
    got = answers(transport.out)
    assert [a.body for a in got] == [HIT]
    # Learned for replay: only the one-read shortcut does that, so the joined read took it.
    assert front.server.replays
    head, body = head_and_body(post(balance(8)))
    conn.data_received(head)
    conn.data_received(body)
    got = answers(transport.out)
    assert got[1].doc == {"jsonrpc": "2.0", "id": 8, "result": "0x2a"}
    assert front.hits() == 2 and transport.writes == 2


def test_body_split_again_and_a_pipelined_request_are_answered_in_order() -> None:
    front = Front()
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    first, second = post(balance(1)), post(balance(2))
    head, body = head_and_body(first)
    conn.data_received(head)
    conn.data_received(body[:5])
    conn.data_received(body[5:] + second)
    assert [a.doc["id"] for a in answers(transport.out)] == [1, 2]


def test_heads_that_must_not_wait_are_not_held() -> None:
    front = Front()
    front.warm(b'"0x2a"')
    body = balance(3)
    expect = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    for headers in (
        expect + b"Expect: 100-continue\r\n",  # the client waits for a 100 before its body
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
    ):
        conn, _ = front.connect()
        conn.data_received(head_and_body(post(body, headers=headers))[0])
        assert conn._held == b""
    # Too long a body announced: refused at once, not awaited.
    conn, transport = front.connect()
    conn.data_received(post(b"", headers=b"Content-Length: %d\r\n" % (MAX_BODY + 1)))
    assert [a.status for a in answers(transport.out)] == [413]
    # No body announced: answered at once (an empty body is a parse error).
    got = front.exchange(post(b""))
    assert len(got) == 1 and got[0].doc["error"]["code"] == -32700
