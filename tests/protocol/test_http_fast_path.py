"""The HTTP front door's shortcuts, fed bytes through a transport that records what is written.

A read holding exactly one plain keep-alive POST skips httptools (``_plain_post``), and a
read that repeats such a POST answered from cache, its id aside, skips decoding too
(a replay). Each must answer exactly what the full path answers, and every request
shape the shortcuts do not understand must reach httptools untouched. No sockets: the
pipeline behind the protocol object is a real ``RpcService`` over an upstream that fails
the test if it is ever asked.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import orjson
import pytest

from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import HeadConfig, LimitsConfig, PoolConfig
from chainrelay.metrics import REPLAY_TIMED_EVERY, Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import MemoryCache, new_entry
from chainrelay.rpc.service import RpcService
from chainrelay.server.http import HttpProtocol, HttpServer, Routes
from chainrelay.server.pending import Ready
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.wire.jsonrpc import parse_body
from tests.lab.timing import SECOND
from tests.protocol.test_rpc_hits import ADDR, NoUpstream, head_at

MAX_BODY = 1000


class RecordingTransport(asyncio.Transport):
    """Keeps every byte written; closing only marks it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.writes = 0
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.out += data
        self.writes += 1

    def writelines(self, list_of_data: Any) -> None:
        for d in list_of_data:
            self.write(d)

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


# An answer's X-Request-Id line, as the front door writes it.
REQUEST_ID_LINE = re.compile(rb"X-Request-Id: [^\r]*\r\n")


class Answer:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        # Every answer's own id, apart: the other headers compare equal between two ways in.
        self.request_id = headers.pop(b"x-request-id", None)
        self.headers = headers
        self.body = body

    @property
    def doc(self) -> Any:
        return orjson.loads(self.body)


def answers(out: bytes | bytearray) -> list[Answer]:
    """Split what a connection wrote into responses (Content-Length framing only)."""
    got = []
    data = bytes(out)
    while data:
        end = data.index(b"\r\n\r\n")
        lines = data[:end].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            k, v = line.split(b":", 1)
            assert k.lower() not in headers, f"header {k!r} twice"
            headers[k.lower()] = v.strip()
        n = int(headers.get(b"content-length", b"0"))
        got.append(Answer(status, headers, data[end + 4 : end + 4 + n]))
        data = data[end + 4 + n :]
    return got


class Front:
    """One node's pipeline and HTTP server, and connections to it."""

    def __init__(
        self,
        cors: list[str] | None = None,
        hit_table_bytes: int = 1 << 20,
        replays: bool = True,
    ) -> None:
        self.metrics = Metrics()
        pool = UpstreamPool(
            [NoUpstream("none", "none://", timeout=1, connections=1)], PoolConfig(), self.metrics
        )
        head = HeadTracker(pool, PROFILES["devnet"], self.metrics, HeadConfig())
        head.confirmed_at = float("inf")  # the head stays fresh: local answers allowed
        head_at(head.view, 100)
        cache = MemoryCache(1 << 20, 1 << 16)
        limits = LimitsConfig(max_body_bytes=MAX_BODY, max_hit_table_bytes=hit_table_bytes)
        self.rpc = RpcService(cache, pool, head, self.metrics, 56, limits)
        routes = Routes(
            self.rpc.handle,
            lambda: (200, b"{}"),
            lambda: b"",
            replayer=self.rpc if replays else None,
        )
        self.server = HttpServer(routes, limits, self.metrics, cors)

    def warm(self, value: bytes, block: str = "latest") -> bytes:
        """Cache ``value`` as the balance of ADDR at ``block``; the cache key."""
        (call,), _ = parse_body(balance(0, block), 10)
        assert not isinstance(call, bytes)
        key = policy.plan(call.method, call.params, self.rpc.view).key
        assert key is not None
        self.rpc.cache.put(key, new_entry(value))
        return key

    def connect(self) -> tuple[HttpProtocol, RecordingTransport]:
        conn = HttpProtocol(self.server)
        transport = RecordingTransport()
        conn.connection_made(transport)
        return conn, transport

    def exchange(self, *reads: bytes) -> list[Answer]:
        """Feed ``reads`` to a new connection; the responses it wrote."""
        conn, transport = self.connect()
        for r in reads:
            conn.data_received(r)
        return answers(transport.out)

    def hits(self) -> int:
        return sum(n[0] for (_, outcome), n in self.metrics._requests.items() if outcome == "hit")


def balance(id_: object, block: str = "latest") -> bytes:
    return orjson.dumps(
        {"jsonrpc": "2.0", "id": id_, "method": "eth_getBalance", "params": [ADDR, block]}
    )


def post(body: bytes, *, version: bytes = b"1.1", headers: bytes | None = None) -> bytes:
    if headers is None:
        headers = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return b"POST / HTTP/" + version + b"\r\nHost: relay\r\n" + headers + b"\r\n" + body


@pytest.fixture
def front() -> Front:
    return Front()


def test_a_plain_post_is_answered_as_httptools_would(front: Front) -> None:
    front.warm(b'"0x2a"')
    request = post(balance(7))
    fast = front.exchange(request)
    # The same request in two reads never takes a shortcut.
    slow = front.exchange(request[:20], request[20:])
    assert len(fast) == len(slow) == 1
    assert fast[0].status == slow[0].status == 200
    assert fast[0].headers == slow[0].headers
    assert fast[0].body == slow[0].body == b'{"jsonrpc":"2.0","id":7,"result":"0x2a"}'
    assert fast[0].headers[b"access-control-allow-origin"] == b"*"


def test_repeats_are_replayed_with_their_own_ids_and_counted(front: Front) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    ids: list[object] = [10, 11, 99, "ab", '"x"', None, 5, 123, "abcdef", 0]
    for id_ in ids:
        conn.data_received(post(balance(id_)))
    got = answers(transport.out)
    assert [a.doc for a in got] == [{"jsonrpc": "2.0", "id": id_, "result": "0x2a"} for id_ in ids]
    assert all(a.status == 200 for a in got)
    assert front.server.replays, "repeats of a hit are learned"
    assert front.hits() == len(ids) == front.metrics.hits
    assert transport.writes == len(ids)


def test_replays_are_counted_exactly_and_timed_one_in_so_many(front: Front) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    n = 3 * REPLAY_TIMED_EVERY
    for i in range(n):
        conn.data_received(post(balance(100 + i)))
    got = answers(transport.out)
    assert [a.doc["id"] for a in got] == [100 + i for i in range(n)]
    assert front.hits() == front.metrics.hits == n
    timed = front.metrics._latency["hit"]
    assert 3 <= sum(timed[:-1]) < 3 + 3, "the first hit and one replay in so many are timed"


@pytest.mark.parametrize(
    "bad",
    [
        b'{"jsonrpc":"2.0","id":01,"method":"eth_getBalance","params":["%s","latest"]}',
        b'{"jsonrpc":"2.0","id":-1,"method":"eth_getBalance","params":["%s","latest"]}',
        b'{"jsonrpc":"2.0","id":"\x01b","method":"eth_getBalance","params":["%s","latest"]}',
        b'{"jsonrpc":"2.0","id":"\xffb","method":"eth_getBalance","params":["%s","latest"]}',
        b'{"jsonrpc":"2.0","id":1e,"method":"eth_getBalance","params":["%s","latest"]}',
    ],
)
def test_an_id_of_the_same_length_but_another_spelling_is_not_replayed(
    front: Front, bad: bytes
) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    good = b'{"jsonrpc":"2.0","id":12,"method":"eth_getBalance","params":["%s","latest"]}'
    conn.data_received(post(good % ADDR.encode()))
    conn.data_received(post(good % ADDR.encode()))  # learned and replayed
    conn.data_received(post(bad % ADDR.encode()))
    got = answers(transport.out)
    assert got[0].body == got[1].body
    full = front.exchange(post(bad % ADDR.encode()))  # a fresh node would answer this
    assert got[2].body == full[0].body
    doc = got[2].doc
    if doc.get("result") is not None:  # -1 is a valid id: a hit through the full path
        assert doc["id"] == -1
    else:
        assert doc["error"]["code"] == -32700


def test_an_id_that_is_not_the_calls_own_is_never_learned(front: Front) -> None:
    front.warm(b'"0x2a"')
    # The only literal "id" member is nested; the call's own id is spelled with an escape.
    body = (
        b'{"jsonrpc":"2.0","\\u0069d":7,"method":"eth_getBalance",'
        b'"params":["%s","latest"],"x":{"id":7}}' % ADDR.encode()
    )
    conn, transport = front.connect()
    conn.data_received(post(body))
    conn.data_received(post(body.replace(b'{"id":7}', b'{"id":8}')))
    got = answers(transport.out)
    assert [a.doc["id"] for a in got] == [7, 7]
    assert not front.rpc._seen and not front.server.replays


def test_an_id_length_never_seen_takes_the_full_path(front: Front) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    for id_ in (1, 2, 1000, 100000000):
        conn.data_received(post(balance(id_)))
    got = answers(transport.out)
    assert [a.doc for a in got] == [
        {"jsonrpc": "2.0", "id": i, "result": "0x2a"} for i in (1, 2, 1000, 100000000)
    ]


def test_a_new_head_ends_replays(front: Front) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    conn.data_received(post(balance(1)))
    conn.data_received(post(balance(2)))
    head_at(front.rpc.view, 101)  # "latest" is block 101 now
    front.warm(b'"0x2b"')
    conn.data_received(post(balance(3)))
    conn.data_received(post(balance(4)))
    got = answers(transport.out)
    assert [a.doc["result"] for a in got] == ["0x2a", "0x2a", "0x2b", "0x2b"]


def test_a_reorg_at_the_same_height_ends_replays(front: Front) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    conn.data_received(post(balance(1)))
    conn.data_received(post(balance(2)))
    view = front.rpc.view
    view.hash = "0x" + "b" * 64  # block 100 replaced: another block at the same height
    view.canonical[100] = view.hash
    view.generation += 1
    front.warm(b'"0x2c"')
    conn.data_received(post(balance(3)))
    got = answers(transport.out)
    assert [a.doc["result"] for a in got] == ["0x2a", "0x2a", "0x2c"]


def test_an_entry_replaced_or_dropped_from_the_cache_is_not_replayed(front: Front) -> None:
    key = front.warm(b'"0x2a"')
    conn, transport = front.connect()
    conn.data_received(post(balance(1)))
    conn.data_received(post(balance(2)))
    front.rpc.cache.put(key, new_entry(b'"0x2d"'))
    conn.data_received(post(balance(3)))
    conn.data_received(post(balance(4)))
    got = answers(transport.out)
    assert [a.doc["result"] for a in got] == ["0x2a", "0x2a", "0x2d", "0x2d"]


async def test_a_dropped_entry_goes_upstream_instead(front: Front) -> None:
    key = front.warm(b'"0x2a"')
    conn, transport = front.connect()
    conn.data_received(post(balance(1)))
    conn.data_received(post(balance(2)))
    front.rpc.cache.discard(key)
    conn.data_received(post(balance(3)))
    assert conn._queue, "a miss is under way, not a replay of the dropped entry"
    miss = conn._queue[0][0]
    assert isinstance(miss, asyncio.Future)
    # The upstream refuses at once; the answer is written by the future's done callback.
    await asyncio.wait_for(asyncio.gather(miss, return_exceptions=True), 5 * SECOND)
    got = answers(transport.out)
    assert [a.doc.get("result") for a in got] == ["0x2a", "0x2a", None]
    assert got[2].doc["id"] == 3


async def test_local_answers_are_replayed_while_the_head_is_fresh(front: Front) -> None:
    conn, transport = front.connect()
    body = b'{"jsonrpc":"2.0","id":%d,"method":"eth_blockNumber"}'
    conn.data_received(post(body % 1))
    conn.data_received(post(body % 2))
    front.rpc.head.confirmed_at = 0.0  # stale: eth_blockNumber must go upstream now
    conn.data_received(post(body % 3))
    got = answers(transport.out)
    assert [a.doc.get("result") for a in got[:2]] == ["0x64", "0x64"]
    assert conn._queue, "a stale head sends eth_blockNumber upstream"
    for entry in conn._queue:
        assert not isinstance(entry, Ready), entry  # every answer here is under way
        entry.answer.cancel()


def test_pipelined_requests_in_one_read_are_all_answered_in_order(front: Front) -> None:
    front.warm(b'"0x2a"')
    front.exchange(post(balance(1)), post(balance(2)))  # learned: replays are possible
    got = front.exchange(post(balance(3)) + post(balance(4)) + post(balance(5)))
    assert [a.doc["id"] for a in got] == [3, 4, 5]
    assert [a.doc["result"] for a in got] == ["0x2a"] * 3


async def test_a_cancelled_answer_still_takes_its_place_in_the_pipeline(front: Front) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    conn.data_received(post(balance(1, "0x5")) + post(balance(2)))  # a miss, then a hit
    miss = conn._queue[0][0]
    assert isinstance(miss, asyncio.Future)
    miss.cancel()
    await asyncio.wait_for(asyncio.gather(miss, return_exceptions=True), 5 * SECOND)
    got = answers(transport.out)
    # One answer per request, in order: the hit is not read as the miss's answer.
    assert len(got) == 2
    assert got[0].doc["error"]["code"] == -32603
    assert got[1].doc == {"jsonrpc": "2.0", "id": 2, "result": "0x2a"}
    assert not transport.closed


def test_a_body_split_across_reads_is_answered_once(front: Front) -> None:
    front.warm(b'"0x2a"')
    front.exchange(post(balance(1)), post(balance(2)))
    request = post(balance(3))
    at = request.index(b"\r\n\r\n") + 10
    got = front.exchange(request[:at], request[at:])
    assert [a.doc for a in got] == [{"jsonrpc": "2.0", "id": 3, "result": "0x2a"}]


def test_a_read_with_a_truncated_body_waits_for_the_rest(front: Front) -> None:
    front.warm(b'"0x2a"')
    front.exchange(post(balance(1)), post(balance(2)))
    # Same bytes as a learned request but for the last one: never taken for it.
    request = post(balance(3))
    conn, transport = front.connect()
    conn.data_received(request[:-1])
    assert not transport.out
    conn.data_received(request[-1:])
    assert [a.doc["id"] for a in answers(transport.out)] == [3]


def test_http_1_0_closes_after_answering(front: Front) -> None:
    front.warm(b'"0x2a"')
    front.exchange(post(balance(1)), post(balance(2)))
    conn, transport = front.connect()
    conn.data_received(post(balance(3), version=b"1.0"))
    got = answers(transport.out)
    assert [a.doc["id"] for a in got] == [3]
    assert got[0].headers.get(b"connection") == b"close"
    assert transport.closed


@pytest.mark.parametrize(
    "length_header",
    [b"content-length: %d", b"CONTENT-LENGTH: %d", b"Content-Length:   %d  ", b"Content-Length:%d"],
)
def test_header_case_and_spacing_do_not_change_the_answer(
    front: Front, length_header: bytes
) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    for id_ in (1, 2, 3):
        body = balance(id_)
        headers = b"Content-Type: application/json\r\n" + length_header % len(body) + b"\r\n"
        conn.data_received(post(body, headers=headers))
    assert [a.doc["id"] for a in answers(transport.out)] == [1, 2, 3]


def test_a_connection_header_takes_the_full_path(front: Front) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    for id_ in (1, 2):
        body = balance(id_)
        headers = b"Connection: close\r\nContent-Length: %d\r\n" % len(body)
        conn.data_received(post(body, headers=headers))
        if transport.closed:
            break
    got = answers(transport.out)
    assert [a.doc["id"] for a in got] == [1]
    assert got[0].headers.get(b"connection") == b"close"
    assert not front.server.replays


def test_an_oversized_body_gets_413_even_in_one_read(front: Front) -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":["' + b"x" * MAX_BODY
    body += b'"]}'
    got = front.exchange(post(body))
    assert [a.status for a in got] == [413]


def test_an_oversized_declared_length_gets_413_before_the_body(front: Front) -> None:
    conn, transport = front.connect()
    conn.data_received(post(b"", headers=b"Content-Length: %d\r\n" % (MAX_BODY + 1)))
    assert [a.status for a in answers(transport.out)] == [413]
    assert transport.closed


def test_a_listed_origin_is_echoed_and_others_get_no_cors_header() -> None:
    front = Front(cors=["https://dapp.example"])
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    for id_, origin in ((1, b"https://dapp.example"), (2, b"https://evil.example")) * 2:
        body = balance(id_)
        headers = b"Origin: %s\r\nContent-Length: %d\r\n" % (origin, len(body))
        conn.data_received(post(body, headers=headers))
    got = answers(transport.out)
    assert [a.doc["id"] for a in got] == [1, 2, 1, 2]
    allowed = [a.headers.get(b"access-control-allow-origin") for a in got]
    assert allowed == [b"https://dapp.example", None, b"https://dapp.example", None]


def test_a_notification_gets_an_empty_answer(front: Front) -> None:
    front.warm(b'"0x2a"')
    note = b'{"jsonrpc":"2.0","method":"eth_getBalance","params":["%s","latest"]}'
    got = front.exchange(*(post(note % ADDR.encode()) for _ in range(3)))
    assert [(a.status, a.body) for a in got] == [(200, b"")] * 3


def test_a_batch_is_never_replayed(front: Front) -> None:
    front.warm(b'"0x2a"')
    batch = b"[" + balance(1) + b"]"
    got = front.exchange(post(batch), post(batch), post(batch.replace(b'"id":1', b'"id":2')))
    assert [[d["id"] for d in a.doc] for a in got] == [[1], [1], [2]]
    assert not front.server.replays


def test_a_longer_id_under_a_learned_content_length_is_not_replayed(front: Front) -> None:
    front.warm(b'"0x2a"')
    front.exchange(post(balance(12)), post(balance(13)))  # learned for two-digit ids
    # The head of a two-digit request, a three-digit id: the body runs one byte past its
    # Content-Length, which httptools reads as the start of another request.
    liar = post(
        balance(123),
        headers=b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(balance(12)),
    )
    got = front.exchange(liar)
    assert got, "answered, by the full path"
    assert got[0].doc.get("id") != 123


def test_an_id_member_in_the_head_is_never_taken_for_the_calls(front: Front) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    for trace in (5, 6, 7):
        body = balance(5)
        headers = b'X-Trace: "id":%d,\r\nContent-Length: %d\r\n' % (trace, len(body))
        conn.data_received(post(body, headers=headers))
    assert [a.doc["id"] for a in answers(transport.out)] == [5, 5, 5]


def test_bodies_spaced_as_json_dumps_spaces_them_are_replayed(front: Front) -> None:
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    ids = [1, 2, 3, 4]
    for id_ in ids:  # web3.py's spelling: the stdlib's default separators, id last
        doc = {"jsonrpc": "2.0", "method": "eth_getBalance", "params": [ADDR, "latest"]}
        conn.data_received(post(json.dumps({**doc, "id": id_}).encode()))
    assert [a.doc["id"] for a in answers(transport.out)] == ids
    assert front.server.replays
    assert front.hits() == len(ids)


def test_the_hit_tables_stay_within_their_bytes() -> None:
    bound = 4000
    front = Front(hit_table_bytes=bound)
    conn, transport = front.connect()
    blocks = [hex(n) for n in range(90, 101)]  # distinct hot calls, more than fit
    for n, block in enumerate(blocks):
        front.warm(b'"0x%x"' % n, block)
    for round_ in range(3):
        for block in blocks:
            conn.data_received(post(balance(10 + round_, block)))
            assert front.server.replays.bytes <= bound
            assert front.rpc._seen.bytes <= bound
    got = answers(transport.out)
    assert [a.doc["result"] for a in got] == [hex(n) for n in range(len(blocks))] * 3
    assert front.hits() == 3 * len(blocks)
    assert 0 < len(front.server.replays) < len(blocks), "the table started over"


async def written(front: Front, *reads: bytes) -> tuple[bytes, bool]:
    """What a new connection writes for ``reads`` once every answer owed is written, and
    whether it was closed."""
    conn, transport = front.connect()
    for r in reads:
        if transport.closed:
            break
        conn.data_received(r)
    pending = [e[0] for e in conn._queue if isinstance(e[0], asyncio.Future)]
    # Misses fail at once (the upstream refuses); their answers are written by callbacks.
    await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5 * SECOND)
    # Each answer's X-Request-Id is its own: what is compared is everything else.
    return REQUEST_ID_LINE.sub(b"", bytes(transport.out)), transport.closed


def mutations(request: bytes, rng: random.Random) -> list[bytes]:
    """Reads that differ from a learned request in ways a replay must not paper over."""
    at = request.index(b'"id":') + 5
    end = request.index(b",", at)
    body_at = request.index(b"\r\n\r\n") + 4
    tokens = [b"0", b"7", b"99", b"01", b"-1", b"-0", b"1.0", b"1e2", b'"ab"', b'"a\\"', b'"\x01"']
    tokens += [b'"\xc3\xa9"', b"null", b"true", b"nul", b'"x', b"[1]", b"{}", b"", b" 5", b"5 "]
    out = []
    for t in tokens:
        lying = request[:at] + t + request[end:]  # Content-Length left as it was
        body = lying[body_at:]
        honest = lying[:body_at].replace(
            b"Content-Length: %d" % (len(request) - body_at), b"Content-Length: %d" % len(body)
        )
        out += [lying, honest + body]
    for _ in range(60):
        i = rng.randrange(len(request))
        out.append(request[:i] + bytes([rng.randrange(256)]) + request[i + 1 :])
        out.append(request[:i] + request[i + 1 :])
        out.append(request[:i] + bytes([rng.choice(b' "{}:,0a\\')]) + request[i:])
    out += [request + request, request + request[:40], request[:-1], request + b"\r\n"]
    return out


def fresh() -> Front:
    """A node that has seen nothing: its answers take the full path, decoding included."""
    front = Front(replays=False)
    front.warm(b'"0x2a"')
    return front


async def test_a_replay_answers_every_near_miss_as_a_fresh_node_does() -> None:
    rng = random.Random(7)
    fast = Front()
    fast.warm(b'"0x2a"')
    # Learned for ids of one, two and four bytes.
    await written(fast, *(post(balance(i)) for i in (1, 2, 12, 13, 1234, 1235)))
    assert len(fast.server.replays) == 3
    replayed = fast.hits()
    for read in mutations(post(balance(12)), rng):
        assert await written(fast, read) == await written(fresh(), read), read
    assert fast.hits() - replayed >= 6, "some near misses are valid repeats, replayed"


async def test_a_listed_origin_is_echoed_on_answers_that_wait_for_the_upstream() -> None:
    front = Front(cors=["https://dapp.example"])
    front.warm(b'"0x2a"')

    def from_origin(body: bytes, origin: bytes) -> bytes:
        return post(body, headers=b"Origin: %s\r\nContent-Length: %d\r\n" % (origin, len(body)))

    # A miss (block 5 is not cached: the upstream is asked, and refuses) from a listed
    # origin, then a hit from another, in one read: the hit waits for the miss.
    out, _ = await written(
        front,
        from_origin(balance(1, "0x5"), b"https://dapp.example")
        + from_origin(balance(2), b"https://evil.example"),
    )
    got = answers(out)
    assert [a.doc["id"] for a in got] == [1, 2]
    assert "error" in got[0].doc and got[1].doc["result"] == "0x2a"
    allowed = [a.headers.get(b"access-control-allow-origin") for a in got]
    assert allowed == [b"https://dapp.example", None]
    assert got[0].headers.get(b"vary") == b"Origin"


def short_lines(head_bytes: int) -> bytes:
    """3,700 header lines ``X<i>:y`` then the length, making the head of ``POST / HTTP/1.1``
    exactly ``head_bytes`` long: lines without blanks, whose raw size the parsed names and
    values (plus ": " and CRLF) overstate by a byte each."""
    length = b"Content-Length: %d" % len(balance(7))
    lines = [b"X%d:y\r\n" % i for i in range(3700)]
    room = head_bytes - len(b"POST / HTTP/1.1\r\n") - len(length) - sum(map(len, lines))
    lines[0] = b"X0:" + b"y" * (1 + room) + b"\r\n"
    return b"".join(lines) + length


HEADS = {  # request heads for balance(7), and whether the one-read shortcut may take them
    "plain": (b"Host: r\r\nContent-Length: {n}", True),
    "tab around the length": (b"Host: r\r\nContent-Length:\t{n}\t", True),
    "leading zero in the length": (b"Host: r\r\nContent-Length: 0{n}", True),
    "no Host": (b"Content-Length: {n}", True),
    "Connection: keep-alive": (b"Host: r\r\nConnection: keep-alive\r\nContent-Length: {n}", True),
    "connection:Keep-Alive": (b"Host: r\r\nconnection:Keep-Alive \r\nContent-Length: {n}", True),
    "Connection: close": (b"Host: r\r\nConnection: close\r\nContent-Length: {n}", False),
    "keep-alive, Upgrade": (
        b"Host: r\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nContent-Length: {n}",
        False,
    ),
    "space before a colon": (b"Host: r\r\nContent-Length : {n}", False),
    "plus sign in the length": (b"Host: r\r\nContent-Length: +{n}", False),
    "the length twice": (b"Host: r\r\nContent-Length: {n}\r\nContent-Length: {n}", False),
    "folded Transfer-Encoding": (
        b"Host: r\r\nContent-Length: {n}\r\nX: a\r\n Transfer-Encoding: chunked",
        False,
    ),
    "bare LF": (b"Host: r\nContent-Length: {n}", False),
    "space in a name": (b"Ho st: r\r\nContent-Length: {n}", False),
    "control character in a value": (b"Host: r\x01\r\nContent-Length: {n}", False),
    "empty name": (b"Host: r\r\n: x\r\nContent-Length: {n}", False),
    "line without a colon": (b"Host: r\r\nJunk\r\nContent-Length: {n}", False),
    "Transfer-Encoding: identity": (
        b"Host: r\r\nTransfer-Encoding: identity\r\nContent-Length: {n}",
        False,
    ),
    "3,700 short lines, head at the limit": (short_lines(LimitsConfig().max_header_bytes), True),
    "3,700 short lines, head a byte over": (
        short_lines(LimitsConfig().max_header_bytes + 1),
        False,
    ),
}


@pytest.mark.parametrize("name", list(HEADS))
async def test_the_one_read_shortcut_answers_every_head_as_httptools_does(name: str) -> None:
    headers, shortcut = HEADS[name]
    body = balance(7)
    for line in (b"POST / HTTP/1.1", b"POST /a b HTTP/1.1", b"POST / HTTP/1.10"):
        request = line + b"\r\n" + headers.replace(b"{n}", b"%d" % len(body)) + b"\r\n\r\n"
        request += body
        one, split = Front(), Front()
        for front in (one, split):
            front.warm(b'"0x2a"')
        # A read split after its first byte never takes a shortcut: httptools answers it.
        assert await written(one, request) == await written(split, request[:1], request[1:])
        took = bool(one.server.replays)  # only the shortcut learns replays
        assert took == (shortcut and line == b"POST / HTTP/1.1"), line


@pytest.mark.parametrize("over", [0, 1])
async def test_a_pipelined_head_is_measured_from_its_own_first_byte(over: int) -> None:
    """Two requests with heads at (or a byte over) the limit in two reads that split the
    second one's head: each head is measured alone, not with the bytes before it in its
    read, and the split decides nothing."""
    body = balance(7)
    limit = LimitsConfig().max_header_bytes
    request = b"POST / HTTP/1.1\r\n" + short_lines(limit + over) + b"\r\n\r\n" + body
    pair = request + request.replace(b'"id":7', b'"id":8')
    front = Front()
    front.warm(b'"0x2a"')
    for cut in (len(request) + 10, len(request) + limit // 2, len(pair) - len(body) - 2):
        out, _ = await written(front, pair[:cut], pair[cut:])
        got = answers(out)
        if over:
            assert [a.status for a in got] == [431], cut
        else:
            assert [a.status for a in got] == [200, 200], cut
            assert [a.doc["id"] for a in got] == [7, 8]


ORIGINS = {
    "listed": b"Origin: https://dapp.example",
    "listed, lower case": b"origin:https://dapp.example",
    "not listed": b"Origin: https://evil.example",
    "none": b"X-Origin: https://dapp.example",
    "listed, then another": b"Origin: https://dapp.example\r\nOrigin: https://evil.example",
    "another, then listed": b"Origin: https://evil.example\r\nOrigin: https://dapp.example",
    "listed, trailing blank": b"Origin: https://dapp.example ",
}


@pytest.mark.parametrize("name", list(ORIGINS))
async def test_listed_origins_get_the_same_answers_from_every_path(name: str) -> None:
    body = balance(7)
    request = post(body, headers=ORIGINS[name] + b"\r\nContent-Length: %d\r\n" % len(body))
    one, split = (Front(cors=["https://dapp.example"]) for _ in range(2))
    for front in (one, split):
        front.warm(b'"0x2a"')
    # Twice on one connection: the second is a replay; then httptools for both.
    fast = await written(one, request, request.replace(b'"id":7', b'"id":8'))
    full = await written(split, request[:1], request[1:], request.replace(b'"id":7', b'"id":8'))
    assert fast == full
    assert one.server.replays and one.hits() == 2
    listed = b"Access-Control-Allow-Origin: https://dapp.example\r\n" in fast[0]
    assert listed == (name.startswith("listed") and "trailing" not in name)


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.parametrize("split", [False, True], ids=["one_read", "head_split"])
def test_an_upgrade_after_a_request_in_the_same_read_is_accepted(front: Front, split: bool) -> None:
    front.warm(b'"0x1"')
    conn, transport = front.connect()
    first = post(balance(1)) + (UPGRADE if not split else UPGRADE[:20])
    conn.data_received(first)
    if split:
        conn.data_received(UPGRADE[20:])
    out = bytes(transport.out)
    assert out.count(b"HTTP/1.1 200 OK") == 1
    assert b"HTTP/1.1 101 Switching Protocols" in out
    # RFC 6455's sample key: the accept value proves the handshake read this head.
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in out
    assert conn.ws is not None


def test_what_a_head_says_is_remembered_within_its_bound_and_ids_stay_per_request() -> None:
    front = Front()
    front.server.limits.max_named_heads = 3
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    body = balance(7)
    length = b"Content-Length: %d\r\n" % len(body)
    heads = [
        b"X-Request-Id: mine-1\r\n" + length,  # a valid id: kept, every time
        b"X-Request-Id: \r\n" + length,  # an empty one: a fresh one each time
        b'X-Request-Id: "bad id"\r\n' + length,  # one that may not be echoed: fresh too
        b"Accept-Encoding: identity\r\nUser-Agent: a\r\n" + length,
        b"User-Agent: b\r\n" + length,
    ]
    for _ in range(2):  # the second round looks up what the first one read
        for extra in heads:
            conn.data_received(post(body, headers=extra))
            assert len(front.server.plain_heads) <= 3
    got = answers(transport.out)
    assert [a.body for a in got] == [b'{"jsonrpc":"2.0","id":7,"result":"0x2a"}'] * 10
    ids = [a.request_id for a in got]
    assert ids[0] == ids[5] == b"mine-1"
    fresh = [i for n, i in enumerate(ids) if n % 5 != 0]
    assert len(set(fresh)) == len(fresh), "a remembered head never repeats an id"
    assert 0 < len(front.server.plain_heads) < len(heads), "the table started over"
