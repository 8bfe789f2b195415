"""The HTTP upstream client's connections, bytes in and bytes out through a recording
transport: answers paired with requests in order (keep-alive, pipelining), framed by
Content-Length, chunks or the connection's end however the reads cut them, decoded from
gzip within a bound; every request on a connection failed when it breaks, times out or
says it closes; writes never pipelined. No sockets."""

from __future__ import annotations

import asyncio
import gzip
import zlib

import orjson
import pytest

from chainrelay.config import loads
from chainrelay.errors import ConfigError
from chainrelay.upstreams import httpwire
from chainrelay.upstreams.failures import BatchUnsupported, TransportError
from chainrelay.upstreams.httplink import HttpLink, LinkPool, Sent
from chainrelay.upstreams.make import make_upstream
from chainrelay.upstreams.upstream import HttpUpstream
from tests.lab.procs import until
from tests.lab.timing import SECOND
from tests.protocol.test_http_fast_path import RecordingTransport

MAX_ANSWER = 64 * 1024
ANSWER = b'{"jsonrpc":"2.0","id":1,"result":"0x38"}'


class Transport(RecordingTransport):
    def abort(self) -> None:
        self.closed = True


def ok(body: bytes = ANSWER, *head: bytes) -> bytes:
    lines = b"".join(h + b"\r\n" for h in head)
    return b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n%b" % (lines, len(body), body)


def chunked(body: bytes, size: int = 7) -> bytes:
    chunks = b"".join(
        b"%x\r\n%b\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


def pool_of(*, size: int = 2, keepalive: float = 10 * SECOND) -> LinkPool:
    return LinkPool(
        httpwire.target("http://node.example:8545/"),
        size=size,
        depth=4,
        keepalive=keepalive,
        max_answer_bytes=MAX_ANSWER,
    )


def link_of(pool: LinkPool) -> tuple[HttpLink, Transport]:
    link = HttpLink(pool)
    transport = Transport()
    link.connection_made(transport)
    pool.links.add(link)
    return link, transport


def send(link: HttpLink, budget: float = 10 * SECOND, batch: bool = False) -> asyncio.Future[bytes]:
    fut: asyncio.Future[bytes] = link.loop.create_future()
    link.send(
        httpwire.frame(link.pool.target.head, b"{}"),
        Sent(fut, link.loop.time() + budget, budget, batch),
    )
    return fut


def failure(fut: asyncio.Future[bytes]) -> TransportError:
    exc = fut.exception()
    assert isinstance(exc, TransportError), exc
    return exc


async def test_keep_alive_answers_in_order_and_the_link_returns_to_the_pool() -> None:
    pool = pool_of()
    link, transport = link_of(pool)
    for i in range(3):
        fut = send(link)
        assert pool.ready(False) is None  # busy: not idle, and writes never pipeline
        body = b'{"jsonrpc":"2.0","id":1,"result":"0x%d"}' % i
        link.data_received(ok(body, b"Date: today", b"Content-Type: application/json"))
        assert fut.result() == body
        assert pool.ready(False) is link  # idle again, taken
    assert transport.out.count(b"POST / HTTP/1.1\r\nHost: node.example:8545\r\n") == 3


async def test_pipelined_answers_reach_their_own_waiters_however_the_reads_cut_them() -> None:
    bodies = [b'{"id":1,"result":"%d"}' % i + b" " * i * 50 for i in range(4)]
    wire = ok(bodies[0]) + chunked(bodies[1]) + ok(bodies[2]) + chunked(bodies[3], 1)
    for cut in (1, 3, 17, 64, len(wire)):
        pool = pool_of(size=1)
        link, _ = link_of(pool)
        link.proven = True  # it answered keep-alive before
        futs = [send(link)]
        for _ in range(3):
            assert pool.ready(True) is link  # the pool is full: pipelined
            futs.append(send(link))
        assert pool.ready(True) is None  # its line is full (depth 4)
        for i in range(0, len(wire), cut):
            link.data_received(wire[i : i + cut])
        assert [f.result() for f in futs] == bodies
        assert not link.closed and pool.idle == [link]


async def test_a_link_never_pipelines_before_it_answered_keep_alive_over_http_1_1() -> None:
    pool = pool_of(size=1)
    link, _ = link_of(pool)
    send(link)
    assert pool.ready(True) is None
    link.data_received(ok())
    assert link.proven


async def test_an_upstream_closing_mid_answer_fails_every_request_on_the_link() -> None:
    pool = pool_of(size=1)
    link, _ = link_of(pool)
    link.proven = True
    futs = [send(link), send(link), send(link)]
    link.data_received(ok()[:-5])  # half the first answer, then the connection ends
    link.connection_lost(ConnectionResetError("reset by peer"))
    assert "reset by peer" in str(failure(futs[0])) and failure(futs[0]).counts
    # Failed with it, asked again, but one fault counts once against the upstream.
    assert all("connection closed" in str(failure(f)) for f in futs[1:])
    assert not any(failure(f).counts for f in futs[1:])
    assert link not in pool.links and pool.ready(True) is None
    # Pipelined requests dropped by the upstream: no more pipelining to it.
    assert not pool.pipelining


async def test_connection_close_is_honoured_after_its_answer() -> None:
    pool = pool_of(size=1)
    link, transport = link_of(pool)
    link.proven = True
    first, second = send(link), send(link)
    link.data_received(ok(ANSWER, b"Connection: close"))
    assert first.result() == ANSWER
    assert not failure(second).counts  # never read by the upstream: asked again, no fault
    assert transport.closed and link not in pool.links and pool.idle == []


async def test_an_answer_framed_by_the_connections_end_is_whole_at_its_end() -> None:
    pool = pool_of()
    link, _ = link_of(pool)
    fut = send(link)
    link.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + ANSWER[:9])
    link.data_received(ANSWER[9:])
    assert not fut.done()
    link.eof_received()
    link.connection_lost(None)
    assert fut.result() == ANSWER


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw deflate"])
async def test_encoded_answers_are_decoded(encoding: str) -> None:
    body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "result": ["0x" + "ab" * 32] * 100})
    if encoding == "gzip":
        packed = gzip.compress(body)
    elif encoding == "deflate":
        packed = zlib.compress(body)
    else:
        c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        packed = c.compress(body) + c.flush()
    name = encoding.split()[-1].encode()
    link, _ = link_of(pool_of())
    fut = send(link)
    link.data_received(ok(packed, b"Content-Encoding: " + name))
    assert fut.result() == body


async def test_a_gzip_bomb_is_refused_at_the_bound_and_a_long_answer_closes_the_link() -> None:
    pool = pool_of()
    link, _ = link_of(pool)
    fut = send(link)
    bomb = gzip.compress(b" " * (MAX_ANSWER + 1))
    link.data_received(ok(bomb, b"Content-Encoding: gzip"))
    assert "once decoded" in str(failure(fut)) and not link.closed
    fut = send(link)
    link.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (10 * MAX_ANSWER))
    link.data_received(b" " * (MAX_ANSWER + 1))
    assert f"over {MAX_ANSWER} bytes" in str(failure(fut)) and not failure(fut).counts
    assert link.closed and link not in pool.links


@pytest.mark.parametrize(
    ("answer", "batch", "want"),
    [
        (
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n",
            False,
            "slow 7",
        ),
        (b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nContent-Length: 0\r\n\r\n", False, "slow 2"),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", False, "fails"),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad", False, "fails"),
        (b"HTTP/1.1 508 Loop Detected\r\nContent-Length: 0\r\n\r\n", False, "loop"),
        (ok(ANSWER).replace(b"200 OK", b"400 Bad Request"), False, "answer"),
        (ok(ANSWER).replace(b"200 OK", b"400 Bad Request"), True, "batch refused"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found", False, "fails"),
    ],
)
async def test_statuses(answer: bytes, batch: bool, want: str) -> None:
    link, _ = link_of(pool_of())
    fut = send(link, batch=batch)
    link.data_received(answer)
    if want == "answer":
        assert fut.result() == ANSWER
        return
    exc = failure(fut)
    if want.startswith("slow"):
        assert exc.retry_after == float(want.split()[1]) and not exc.counts
    elif want == "loop":
        assert exc.loop and not exc.counts
    elif want == "batch refused":
        assert isinstance(exc, BatchUnsupported)
    else:
        assert exc.counts and exc.retry_after is None
    assert not link.closed  # a status is an answer: the connection stays


async def test_garbage_and_an_answer_to_no_request_close_the_link() -> None:
    pool = pool_of()
    link, _ = link_of(pool)
    fut = send(link)
    link.data_received(b"SSH-2.0-OpenSSH_9.6\r\n")
    assert "not an HTTP answer" in str(failure(fut)) and link.closed
    link, _ = link_of(pool)
    link.data_received(ok())
    assert link.closed and link not in pool.links


async def test_a_late_answer_fails_its_request_and_those_behind_it_by_its_deadline() -> None:
    pool = pool_of(size=1)
    link, _ = link_of(pool)
    link.proven = True
    late = send(link, budget=0.05 * SECOND)
    behind = send(link)
    started = link.loop.time()
    await until(lambda: late.done(), 5 * SECOND, "the deadline")
    assert link.loop.time() - started >= 0.05 * SECOND
    assert failure(late).timeout and not failure(behind).timeout and not failure(behind).counts
    assert link.closed and link not in pool.links


async def test_an_idle_link_is_closed_after_the_keep_alive_timeout() -> None:
    pool = pool_of(keepalive=0.05 * SECOND)
    link, transport = link_of(pool)
    fut = send(link)
    link.data_received(ok())
    assert fut.result() == ANSWER and pool.idle == [link]
    await until(lambda: transport.closed, 5 * SECOND, "the idle link closed")
    assert link not in pool.links and pool.idle == []


async def test_a_waiter_that_went_away_leaves_its_answer_to_be_read_and_dropped() -> None:
    pool = pool_of(size=1)
    link, _ = link_of(pool)
    link.proven = True
    gone, kept = send(link), send(link)
    gone.cancel()  # a hedge lost
    link.data_received(ok(b'{"a":1}') + ok(b'{"b":2}'))
    assert kept.result() == b'{"b":2}' and not link.closed


async def test_stop_fails_requests_under_way_and_closes_every_link() -> None:
    pool = pool_of()
    (a, ta), (_, tb) = link_of(pool), link_of(pool)
    fut = send(a)
    pool.close()
    assert "stopped" in str(failure(fut)) and ta.closed and tb.closed and not pool.links
    with pytest.raises(TransportError):
        await pool.acquire(False, pool.loop.time() + SECOND, SECOND)


async def test_the_upstream_pipelines_reads_but_never_a_write() -> None:
    up = HttpUpstream(
        "a", "http://u:p%40ss@node.example/rpc?key=1", timeout=5 * SECOND, connections=1, via="me"
    )
    await up.start()
    links = up._links
    assert links is not None
    link, transport = link_of(links)
    link.proven = True
    first = asyncio.ensure_future(up.call("eth_getBalance", ["0x" + "00" * 20, "latest"]))
    await until(lambda: len(link.sent) == 1, 5 * SECOND, "the first call sent")
    second = asyncio.ensure_future(up.call("eth_call", [{}, "latest"]))
    write = asyncio.ensure_future(up.call("eth_sendRawTransaction", ["0x00"]))
    await until(lambda: len(link.sent) == 2, 5 * SECOND, "the read pipelined")
    await asyncio.sleep(0)
    assert len(link.sent) == 2  # the write waits for a connection of its own
    link.data_received(ok(ANSWER) + ok(ANSWER))
    await until(lambda: len(link.sent) == 1, 5 * SECOND, "the write sent once the link was idle")
    link.data_received(ok(b'{"jsonrpc":"2.0","id":1,"result":"0xfeed"}'))
    assert (await first).value == (await second).value == "0x38"
    assert (await write).value == "0xfeed"
    head = bytes(transport.out).split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"POST /rpc?key=1 HTTP/1.1\r\nHost: node.example\r\n")
    assert b"\r\nAuthorization: Basic dTpwQHNz\r\n" in head  # "u:p@ss"
    assert b"\r\nVia: me\r\n" in head and b"\r\nAccept-Encoding: gzip, deflate\r\n" in head
    await up.stop()


def test_targets() -> None:
    t = httpwire.target("https://[::1]:8443", via="", accept_encoding=False)
    assert (t.host, t.port, t.secure) == ("::1", 8443, True)
    assert t.head == (
        b"POST / HTTP/1.1\r\nHost: [::1]:8443\r\nContent-Type: application/json\r\n"
        b"User-Agent: chainrelay\r\nContent-Length: "
    )
    assert httpwire.relayed_head(t, "a", "b").endswith(b"\r\nVia: a, b\r\nContent-Length: ")
    assert httpwire.frame(b"H: ", b"{}") == b"H: 2\r\n\r\n{}"
    bad_urls = ('url = "http://x/a b"', 'url = "https://:443/"')
    for bad in (*bad_urls, "ftp://x/", "http:///nohost", "http://x/a b"):
        with pytest.raises(ValueError):
            httpwire.target(bad)


def test_config_an_upstreams_connections_and_ca_file_reach_it() -> None:
    cfg = loads(
        "[pool]\nconnections = 8\nhttp_pipeline_depth = 1\n"
        '[[upstreams]]\nurl = "https://node.example/"\nconnections = 2\nca_file = "/ca.pem"\n'
        '[[upstreams]]\nurl = "http://other.example/"\n'
    )
    first, second = (make_upstream(u, cfg.pool) for u in cfg.upstreams)
    assert isinstance(first, HttpUpstream) and isinstance(second, HttpUpstream)
    assert (first.connections, first.ca_file, first.pipeline_depth) == (2, "/ca.pem", 1)
    assert second.connections == 8
    for bad in (
        'url = "http://node.example/"\nca_file = "/ca.pem"',
        'url = "http://x/"\nconnections = -1',
    ):
        with pytest.raises(ConfigError, match="upstreams\\[0\\]"):
            loads(f"[[upstreams]]\n{bad}\n")


@pytest.mark.parametrize(
    ("answer", "want"),
    [
        # Connection: close is honoured (the link closes after its answer).
        (ok(ANSWER, b"Connection: close"), "answer, closed"),
        (ok(gzip.compress(ANSWER), b"Content-Encoding: gzip"), "answer"),
        # Two lengths, or a bare LF inside the head: the parser's verdict, not a guess.
        (ok(ANSWER, b"Content-Length: 3"), "broken"),
        (ok(ANSWER, b"X-Odd: a\nContent-Length: 3"), "broken"),
        # HTTP/1.0 does not keep alive unless it says so.
        (ok(ANSWER).replace(b"HTTP/1.1", b"HTTP/1.0"), "answer, closed"),
        # Two answers in one read: the first is this request's, the second a stray one.
        (ok(ANSWER) + ok(ANSWER), "answer, closed"),
        (ok(ANSWER, b"Content-Length: +40"), "broken"),
    ],
)
async def test_answers_out_of_the_ordinary_are_read_by_the_parser(answer: bytes, want: str) -> None:
    link, _ = link_of(pool_of())
    fut = send(link)
    link.data_received(answer)
    if want == "broken":
        assert "not an HTTP answer" in str(failure(fut)) and link.closed
        return
    assert fut.result() == ANSWER
    assert link.closed == want.endswith("closed")
