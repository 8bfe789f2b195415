"""The front door of one real relay, fuzzed: HTTP requests and WebSocket frames as a client
could send them, structured (methods, paths, headers with Content-Length and
Transfer-Encoding mixed, JSON-RPC bodies and batches, frames fragmented, interleaved with
control frames, masked or not) and then cut anywhere, pipelined, written in pieces.

Properties, for every input, on a raw socket:

- a connection whose requests are all complete is answered (or closed) within ``BOUND``;
- once the client half-closes, the node ends the connection within ``BOUND``;
- no answer is a 500;
- the process stays up, its log holds no traceback, and its RSS grows by less than
  ``ATTACK_RSS_GROWTH`` over the whole module.

Bounded for CI (``CI_EXAMPLES`` per test, derandomized: the same inputs every run). Set
``CHAINRELAY_FUZZ_SECONDS=N`` for a long run: each test then draws fresh random inputs for
N seconds (see tests/hostile/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chainrelay.batches.frame import PUSH, Push, encode_push
from tests.hostile import wsraw
from tests.hostile.nodes import HostileNode, hostile_node
from tests.lab.batches import API_KEY, STREAM
from tests.lab.hostile import ATTACK_RSS_GROWTH, MiB, Rss
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

# How long the node may take to answer complete requests, or to end a half-closed
# connection: far above anything it needs on a loaded two-core machine.
BOUND = 5 * SECOND
CI_EXAMPLES = 400
FUZZ_SECONDS = float(os.environ.get("CHAINRELAY_FUZZ_SECONDS", "0"))
STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3})")


@dataclass
class Fuzzed:
    node: HostileNode
    rss: Rss


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    # No batch pushed: with an empty backlog every range request reaches the durable log.
    with hostile_node(tmp_path_factory.mktemp("fuzz")) as node:
        yield Fuzzed(node, Rss(node.pid))


def check_node(f: Fuzzed) -> None:
    assert f.node.alive(), f.node.relay.log_path.read_text()[-3000:]
    growth = f.rss.growth()
    print(f"RSS +{growth / MiB:.1f} MiB over the module so far")
    assert growth < ATTACK_RSS_GROWTH, f"grew {growth / MiB:.0f} MiB"
    assert not f.node.log_problems(), f.node.log_problems()[:5]


# --- HTTP -------------------------------------------------------------------------------
CALLS = [
    b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}',
    b'{"jsonrpc":"2.0","id":"x","method":"eth_blockNumber"}',
    b'{"jsonrpc":"2.0","id":2,"method":"eth_getBlockByNumber","params":["latest",false]}',
    b'{"jsonrpc":"2.0","id":3,"method":"eth_getBalance","params":["0x%s","latest"]}' % (b"0" * 40),
    b'{"jsonrpc":"2.0","id":4,"method":"eth_getLogs","params":[{"fromBlock":"0x0"}]}',
    b'{"jsonrpc":"2.0","id":5,"method":"eth_getBlockByNumber","params":["0x%s",1]}' % (b"f" * 40),
    b'{"jsonrpc":"2.0","id":99999999999999999999999,"method":"eth_chainId"}',
    b'{"jsonrpc":"2.0","id":6,"method":"eth_subscribe","params":["newHeads"]}',
    b'{"jsonrpc":"2.0","id":7,"method":"no_such_method","params":{}}',
    b'{"jsonrpc":"1.0","id":8,"method":"eth_chainId"}',
    b'{"id":9,"method":"eth_getBlockByNumber","params":[' + b"[" * 300 + b"]" * 300 + b"]}",
    b'{"jsonrpc":"2.0","id":10,"method":"eth_call","params":[{"to":"0x' + b"1" * 40 + b'"},"0x1"]}',
    b'{"jsonrpc":"2.0","id":null,"method":"eth_chainId"}',
    b'{"jsonrpc":"2.0","method":"eth_chainId"}',
    b"[]",
    b"{}",
    b"null",
    b'"\xff\xfe"',
    b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]',
    b"\x00" * 8,
]
bodies = st.one_of(
    st.sampled_from(CALLS),
    st.lists(st.sampled_from(CALLS), min_size=1, max_size=12).map(
        lambda calls: b"[" + b",".join(calls) + b"]"
    ),
    st.binary(max_size=300),
)
# Weighted towards requests the node serves (POST and GET, HTTP/1.1), so most inputs get
# past the request line to the route behind it; the rest break one rule each.
METHODS = [b"POST"] * 4 + [b"GET"] * 4 + [b"HEAD", b"OPTIONS", b"PUT", b"BREW", b"post", b""]
PATHS = [
    b"/",
    b"/health",
    b"/metrics",
    b"/feed",
    b"/batches",
    b"/feed/range?stream=" + STREAM.encode() + b"&from=0&limit=2",
    b"/feed/range?stream=" + STREAM.encode() + b"&from=9223372036854775808",
    b"/feed/range?stream=%ff&from=-1&from=1",
    b"/feed/range",
    b"/nowhere",
    b"*",
    b"/" + b"a" * 5000,
    b"/%00",
    b"http://127.0.0.1/",
]
VERSIONS = [b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1", b""]
HEADERS = [
    b"Content-Type: application/json",
    b"Content-Type: text/plain",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: Upgrade",
    b"Upgrade: websocket",
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    b"Sec-WebSocket-Version: 13",
    b"Sec-WebSocket-Version: 99",
    b"Authorization: Bearer " + API_KEY.encode(),
    b"Authorization: Bearer wrong",
    b"Authorization: " + b"x" * 2000,
    b"Via: 1.1 chainrelay-00000000, 1.1 chainrelay-11111111",
    b"Via: " + b"1.1 chainrelay-22222222, " * 40,
    b"Origin: https://example.com",
    b"Origin: \xff\xfe",
    b"Expect: 100-continue",
    b"Accept-Encoding: gzip",
    b"Content-Encoding: gzip",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, identity",
    b"Transfer-Encoding: \x0bchunked",
    b"Content-Length: 0",
    b"Content-Length: -1",
    b"Content-Length: 99999999999999999999",
    b"Content-Length: 1, 2",
    b"Content-Length: +5",
    b"X-Pad: " + b"p" * 4000,
    b"no colon here",
    b": empty name",
    b"Bad Name: x",
    b"X-Folded: a\r\n b",
    b"X-Nul: a\x00b",
]


@dataclass(frozen=True)
class Request:
    raw: bytes
    complete: bool  # framed as it says: the node has all of it once it has these bytes


@st.composite
def requests(draw: st.DrawFn) -> Request:
    method = draw(st.sampled_from(METHODS))
    path = draw(st.sampled_from(PATHS))
    version = draw(st.sampled_from(VERSIONS))
    headers = draw(st.lists(st.sampled_from(HEADERS), max_size=4))
    body = draw(bodies) if method not in (b"GET", b"HEAD") or draw(st.booleans()) else b""
    framing = draw(st.sampled_from(["length", "chunked", "lying", "none"]))
    complete = version in (b"HTTP/1.1", b"HTTP/1.0") and method != b""
    lines = [method + b" " + path + b" " + version, b"Host: 127.0.0.1", *headers]
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        size = draw(st.integers(1, 64))
        pieces = [body[i : i + size] for i in range(0, len(body), size)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    elif framing == "lying":
        lines.append(b"Content-Length: %d" % (len(body) + draw(st.integers(1, 10_000))))
        complete = False
    # A request whose headers frame it another way than ours (a second length, a
    # transfer coding) may wait for more: no answer owed before the client's EOF.
    if any(h.startswith((b"Content-Length", b"Transfer-Encoding", b"Expect")) for h in headers):
        complete = False
    if framing == "none" and body:
        complete = False  # a body nobody framed is the start of the next request
    return Request(b"\r\n".join(lines) + b"\r\n\r\n" + body, complete)


@dataclass(frozen=True)
class Sent:
    data: bytes
    pieces: tuple[int, ...]  # where the writes are split
    complete: bool  # all of it sent, every request framed as it says


@st.composite
def sends(draw: st.DrawFn, messages: st.SearchStrategy[Request]) -> Sent:
    reqs = draw(st.lists(messages, min_size=1, max_size=3))
    data = b"".join(r.raw for r in reqs)
    complete = all(r.complete for r in reqs)
    if draw(st.booleans()):  # cut at a random byte
        data = data[: draw(st.integers(0, len(data) - 1))]
        complete = False
    pieces = tuple(sorted(draw(st.lists(st.integers(0, len(data)), max_size=3))))
    return Sent(data, pieces, complete)


async def exchange(port: int, sent: Sent, upgrade: bytes = b"") -> bytes:
    """Send ``sent`` on a fresh connection (after ``upgrade``, a WebSocket upgrade request,
    whose 101 is read first): what the node answered until it ended the connection.
    Checks the bounds as it goes."""
    reader, writer = await wsraw.connect(port)
    got = bytearray()
    try:
        if upgrade:
            writer.write(upgrade)
            async with asyncio.timeout(BOUND):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head[:300]
        at = 0
        for cut in (*sent.pieces, len(sent.data)):
            writer.write(sent.data[at:cut])
            at = cut
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(0.001)  # a gap between writes: separate reads on the node
        if sent.complete and not upgrade:
            # Answered, or closed, within the bound.
            async with asyncio.timeout(BOUND):
                got += await reader.read(65536)
        with contextlib.suppress(OSError):
            writer.write_eof()
        async with asyncio.timeout(BOUND):
            while chunk := await reader.read(65536):
                got += chunk
    except ConnectionError:
        pass  # the node ended it: a reset, or a write after its close
    except TimeoutError:
        raise AssertionError(f"no answer or end within {BOUND} s to {sent!r}") from None
    finally:
        writer.transport.abort()
    return bytes(got)


def run_fuzz(test: object) -> None:
    """Run a hypothesis test: once in CI (derandomized), or again and again with fresh
    inputs for ``CHAINRELAY_FUZZ_SECONDS``."""
    assert callable(test)
    if not FUZZ_SECONDS:
        test()
        return
    end = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < end:
        test()


def fuzz_settings() -> settings:
    return settings(
        max_examples=CI_EXAMPLES if not FUZZ_SECONDS else 1000,
        derandomize=not FUZZ_SECONDS,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.mark.timeout(120 + FUZZ_SECONDS)
def test_http_front_door_fuzzed(fuzzed: Fuzzed) -> None:
    @fuzz_settings()
    @given(sends(requests()))
    def one(sent: Sent) -> None:
        answer = asyncio.run(exchange(fuzzed.node.port, sent))
        assert b"500" not in STATUS.findall(answer), (sent, answer[:500])
        assert fuzzed.node.alive(), sent

    run_fuzz(one)
    check_node(fuzzed)


# --- WebSocket --------------------------------------------------------------------------
HELLO = orjson.dumps({"type": "hello", "version": 1, "streams": [{"stream": STREAM, "from": 0}]})
PUSH_MSG = encode_push(Push(PUSH, STREAM, 0, bytes(65), b"payload"))
PAYLOADS = [
    *CALLS,
    HELLO,
    b'{"type":"held","stream":"' + STREAM.encode() + b'","position":9223372036854775808}',
    b'{"type":"hello","version":1,"streams":[{"stream":"' + "é".encode() * 60 + b'"}]}',
    PUSH_MSG,
    PUSH_MSG[:50],
    b"\x03\xe8",  # a close payload: 1000
    b"\x03\xe8\xff",  # ... with a reason that is not UTF-8
    b"\x00\x01",  # ... with a code no one may send
]
# Weighted towards frames the node reads on (data, masked, final), so most inputs get past
# the framing to the session behind it; the rest break one rule each.
OPCODES = [0x1, 0x1, 0x1, 0x2, 0x2, 0x0, 0x8, 0x9, 0xA, 0x3, 0xB]
MASKS = [b"", b"", b"", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", None]


@st.composite
def ws_frames(draw: st.DrawFn) -> Request:
    opcode = draw(st.sampled_from(OPCODES))
    payload = draw(st.one_of(st.sampled_from(PAYLOADS), st.binary(max_size=200)))
    if opcode >= 0x8 and draw(st.booleans()):
        payload = payload[:125]  # a control frame as it must be, mostly
    mask = draw(st.sampled_from(MASKS))
    fin = draw(st.integers(0, 4)) > 0 or opcode >= 0x8
    rsv = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 4]))
    if draw(st.integers(0, 9)) == 0:  # a message in more frames: fragments
        half = len(payload) // 2
        first = wsraw.frame(wsraw.OP_TEXT, payload[:half], fin=False, mask=mask)
        return Request(first + wsraw.frame(wsraw.OP_CONT, payload[half:], mask=mask), True)
    return Request(wsraw.frame(opcode, payload, fin=fin, rsv=rsv, mask=mask), True)


UPGRADES = {
    "/": [],
    "/feed": [],
    "/batches": [b"Authorization: Bearer " + API_KEY.encode()],
}


@pytest.mark.timeout(120 + FUZZ_SECONDS)
def test_websocket_front_door_fuzzed(fuzzed: Fuzzed) -> None:
    @fuzz_settings()
    @given(st.sampled_from(sorted(UPGRADES)), sends(ws_frames()))
    def one(path: str, sent: Sent) -> None:
        upgrade = wsraw.upgrade_request(path, UPGRADES[path])
        asyncio.run(exchange(fuzzed.node.port, sent, upgrade))
        assert fuzzed.node.alive(), (path, sent)

    run_fuzz(one)
    check_node(fuzzed)
