"""Bad input over HTTP and WebSocket: every one gets its proper answer and the node lives on.

A relay process in front of a real anvil. After each bad input the same relay still
answers a normal request and its process is still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from chainrelay.devnet import DEV_ACCOUNTS, Anvil
from tests.lab.procs import Relay, RelayFactory, rpc
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

MAX_BODY = 100_000
MAX_BATCH = 100
LIMITS = (
    f"[limits]\nmax_body_bytes = {MAX_BODY}\nmax_batch_len = {MAX_BATCH}\n"
    f"max_ws_message_bytes = {MAX_BODY}\n"
)
JSON_HEADERS = {"Content-Type": "application/json"}
NESTED = b"[" * 5000 + b"]" * 5000
CALL = b'{"jsonrpc":"2.0","id":%d,"method":"eth_chainId"}'


@pytest.fixture
async def relay(anvil: Anvil, relay_factory: RelayFactory) -> AsyncIterator[Relay]:
    # An HTTP upstream: the node's errors are compared with what it answers over HTTP
    # (anvil words some errors differently over WebSocket).
    yield await relay_factory([anvil.url], LIMITS)


async def assert_alive(relay: Relay, after: str) -> None:
    assert relay.proc is not None and relay.proc.poll() is None, f"relay died after {after}"
    got = await rpc(relay.url, "eth_chainId", [], "alive")
    assert got == {"jsonrpc": "2.0", "id": "alive", "result": "0x38"}, f"after {after}: {got}"


async def post_raw(url: str, body: bytes) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, data=body, headers=JSON_HEADERS) as r:
        return r.status, orjson.loads(await r.read())


def code_of(answer: Any) -> int:
    assert isinstance(answer, dict) and "result" not in answer, answer
    return int(answer["error"]["code"])


def bad_inputs(anvil_errors: dict[str, Any]) -> list[tuple[str, bytes, Callable[[Any], None]]]:
    """(name, body, check) for every malformed request that both transports answer alike."""

    def single(code: int, id_: Any = None) -> Callable[[Any], None]:
        def check(a: Any) -> None:
            assert code_of(a) == code, a
            assert a["id"] == id_ and a["jsonrpc"] == "2.0"

        return check

    def per_item(codes: list[int]) -> Callable[[Any], None]:
        def check(a: Any) -> None:
            assert isinstance(a, list), a
            assert [code_of(x) for x in a] == codes
            assert all(x["id"] is None for x in a)

        return check

    def node_answer(name: str, id_: int) -> Callable[[Any], None]:
        def check(a: Any) -> None:
            assert a == {"jsonrpc": "2.0", "id": id_, "error": anvil_errors[name]}

        return check

    def refused_unknown(method: str, id_: int) -> Callable[[Any], None]:
        # An unknown method never reaches the node (access/methods.py): the relay refuses
        # it with the node's code, in geth's words.
        def check(a: Any) -> None:
            message = f"the method {method} does not exist/is not available"
            assert anvil_errors["unknown method"]["code"] == -32601
            assert a == {"jsonrpc": "2.0", "id": id_, "error": {"code": -32601, "message": message}}

        return check

    def batch_with_one_bad(a: Any) -> None:
        assert isinstance(a, list) and len(a) == 2, a
        assert a[0] == {"jsonrpc": "2.0", "id": 1, "result": "0x38"}
        assert code_of(a[1]) == -32600 and a[1]["id"] == 2

    too_long = b"[" + b",".join(CALL % i for i in range(MAX_BATCH + 1)) + b"]"
    bad_address = [DEV_ACCOUNTS[0][:20], "pending"]
    return [
        ("cut-off JSON", b'{"jsonrpc":"2.0","id":1,', single(-32700)),
        ("not JSON at all", b"eth_chainId please", single(-32700)),
        ("empty body", b"", single(-32700)),
        ("invalid UTF-8", b'{"jsonrpc":"2.0","id":1,"method":"\xff"}', single(-32700)),
        ("nested 5000 deep", NESTED, single(-32700)),
        (
            "params nested 5000 deep",
            b'{"jsonrpc":"2.0","id":1,"method":"eth_call","params":' + NESTED + b"}",
            single(-32700),
        ),
        ("jsonrpc 1.0", b'{"jsonrpc":"1.0","id":5,"method":"eth_chainId"}', single(-32600, 5)),
        ("no jsonrpc member", b'{"id":6,"method":"eth_chainId"}', single(-32600, 6)),
        ("method not a string", b'{"jsonrpc":"2.0","id":7,"method":42}', single(-32600, 7)),
        (
            "params a string",
            b'{"jsonrpc":"2.0","id":8,"method":"eth_chainId","params":"x"}',
            single(-32600, 8),
        ),
        ("a number", b"1", single(-32600)),
        ("a string", b'"eth_chainId"', single(-32600)),
        ("null", b"null", single(-32600)),
        ("empty batch", b"[]", single(-32600)),
        ("batch of non-objects", b'[1,"x",null,[]]', per_item([-32600] * 4)),
        ("batch with one bad item", b"[" + CALL % 1 + b',{"id":2}]', batch_with_one_bad),
        (f"batch of {MAX_BATCH + 1}", too_long, single(-32600)),
        (
            "unknown method",
            b'{"jsonrpc":"2.0","id":11,"method":"relay_doesNotExist","params":[]}',
            refused_unknown("relay_doesNotExist", 11),
        ),
        (
            "bad address",
            orjson.dumps(
                {"jsonrpc": "2.0", "id": 12, "method": "eth_getBalance", "params": bad_address}
            ),
            node_answer("bad address", 12),
        ),
        (
            "bad address at latest",
            orjson.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 13,
                    "method": "eth_getBalance",
                    "params": [bad_address[0], "latest"],
                }
            ),
            node_answer("bad address", 13),
        ),
    ]


async def anvil_errors(anvil_url: str) -> dict[str, Any]:
    """The node's own errors for the inputs it judges (the relay passes them through)."""
    unknown = await rpc(anvil_url, "relay_doesNotExist", [])
    bad = await rpc(anvil_url, "eth_getBalance", [DEV_ACCOUNTS[0][:20], "pending"])
    assert unknown["error"]["code"] == -32601, unknown
    assert bad["error"]["code"] == -32602, bad
    return {"unknown method": unknown["error"], "bad address": bad["error"]}


# --- HTTP: JSON-RPC level --------------------------------------------------------------------
async def test_http_bad_requests_get_json_rpc_errors(anvil: Anvil, relay: Relay) -> None:
    cases = bad_inputs(await anvil_errors(anvil.url))
    for name, body, check in cases:
        status, answer = await post_raw(relay.url, body)
        assert status == 200, f"{name}: HTTP {status}"
        try:
            check(answer)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        await assert_alive(relay, name)
    m = await relay.metrics()
    invalid = sum(
        v
        for k, v in m.items()
        if k.startswith("chainrelay_requests_total") and 'outcome="invalid"' in k
    )
    assert invalid >= 8  # bodies refused before any call was made are counted


# --- HTTP: transport level -------------------------------------------------------------------
async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10 * SECOND)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await asyncio.wait_for(
        reader.readexactly(int(headers.get("content-length", "0"))), 10 * SECOND
    )
    return status, headers, body


async def raw_exchange(
    relay: Relay, parts: list[bytes], answers: int = 1
) -> list[tuple[int, dict[str, str], bytes]]:
    """Write ``parts`` one write each on one connection, then read ``answers`` responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
        return [await read_response(reader) for _ in range(answers)]
    finally:
        writer.close()
        await writer.wait_closed()


def post_head(length: int | None = None, extra: bytes = b"") -> bytes:
    head = b"POST / HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n" + extra
    if length is not None:
        head += b"Content-Length: %d\r\n" % length
    return head + b"\r\n"


async def test_body_over_the_limit_is_refused_with_413(relay: Relay) -> None:
    big = b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":["' + b"a" * MAX_BODY + b'"]}'
    async with aiohttp.ClientSession() as s, s.post(relay.url, data=big, headers=JSON_HEADERS) as r:
        assert r.status == 413
        assert r.headers.get("Connection", "").lower() == "close"
    await assert_alive(relay, "an oversized body")

    # Refused on the announced length alone, before the body is sent.
    ((status, headers, _),) = await raw_exchange(relay, [post_head(10 * MAX_BODY)])
    assert status == 413 and headers["connection"] == "close"
    await assert_alive(relay, "an oversized Content-Length")

    # Chunked: no length announced, refused once the chunks pass the limit. The last,
    # small chunk crosses it, so nothing is left unread to turn the close into a reset.
    def chunk(n: int) -> bytes:
        return b"%x\r\n" % n + b" " * n + b"\r\n"

    ((status, _, _),) = await raw_exchange(
        relay,
        [
            post_head(extra=b"Transfer-Encoding: chunked\r\n"),
            chunk(60_000),
            chunk(40_000),
            chunk(1),
        ],
    )
    assert status == 413
    await assert_alive(relay, "an oversized chunked body")

    # Just under the limit is served.
    call = CALL % 3
    padded = call[:-1] + b" " * (MAX_BODY - len(call)) + b"}"
    assert len(padded) == MAX_BODY
    status, answer = await post_raw(relay.url, padded)
    assert status == 200 and answer == {"jsonrpc": "2.0", "id": 3, "result": "0x38"}

    m = await relay.metrics()
    assert m['chainrelay_rejected_total{reason="body_too_large"}'] == 3


async def settled(relay: Relay) -> None:
    """Return once the relay has read every byte already sent to it on any connection.

    Bytes written on loopback are queued at the relay's socket when the write returns; two
    round trips on another connection take the relay's event loop through at least one
    full turn after the turn that saw those bytes, so it has read them.
    """
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(relay.url + "/health") as r:
                await r.read()


async def test_request_head_over_the_limit_is_refused_with_431(relay: Relay) -> None:
    huge = b"X-Padding: " + b"p" * 40 * 1024 + b"\r\n"
    ((status, headers, _),) = await raw_exchange(relay, [post_head(len(CALL % 1), huge) + CALL % 1])
    assert status == 431 and headers["connection"] == "close"
    await assert_alive(relay, "an oversized request head")
    # The same head arriving in pieces is refused once the pieces pass the limit (the last
    # piece crosses it: nothing is left unread to turn the close into a reset).
    first = b"POST / HTTP/1.1\r\nHost: relay\r\n"
    pieces = [b"X-Pad-%02d: " % i + b"p" * 1024 + b"\r\n" for i in range(32)]
    assert len(first) + sum(map(len, pieces[:-1])) <= 32 * 1024 < len(first) + sum(map(len, pieces))
    ((status, _, _),) = await raw_exchange(relay, [first, *pieces])
    assert status == 431
    await assert_alive(relay, "an oversized request head in pieces")
    m = await relay.metrics()
    assert m['chainrelay_rejected_total{reason="header_too_large"}'] == 2


async def test_split_head_followed_by_a_large_body_is_served(relay: Relay) -> None:
    body = CALL[:-1] % 7 + b" " * 60_000 + b"}"
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        writer.write(b"POST / HTTP/1.1\r\nHost: relay\r\n")
        await writer.drain()
        await settled(relay)  # the first piece of the head is read on its own
        writer.write(b"Content-Type: application/json\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        status, _, raw = await read_response(reader)
    finally:
        writer.close()
    assert status == 200
    assert orjson.loads(raw) == {"jsonrpc": "2.0", "id": 7, "result": "0x38"}


async def test_chunked_bodies_are_read_whole(relay: Relay) -> None:
    body = orjson.dumps(
        [
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "eth_getBalance",
                "params": [DEV_ACCOUNTS[0], "latest"],
            },
            {"jsonrpc": "2.0", "id": 2, "method": "eth_chainId"},
        ]
    )
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
    parts = [post_head(extra=b"Transfer-Encoding: chunked\r\n")]
    parts += [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks]
    parts.append(b"0\r\n\r\n")
    ((status, _, raw),) = await raw_exchange(relay, parts)
    assert status == 200
    answer = orjson.loads(raw)
    assert [a["id"] for a in answer] == [1, 2]
    assert answer[0]["result"] == hex(10_000 * 10**18)
    assert answer[1]["result"] == "0x38"
    await assert_alive(relay, "a chunked body")


async def test_pipelined_requests_are_answered_in_order(relay: Relay) -> None:
    def post(body: bytes) -> bytes:
        return post_head(len(body)) + body

    slow = orjson.dumps(  # not cacheable: goes to the node while the next ones wait
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "eth_getBalance",
            "params": [DEV_ACCOUNTS[1], "pending"],
        }
    )
    pipeline = b"".join(
        [
            post(slow),
            post(CALL % 2),  # answered locally
            b"GET /health HTTP/1.1\r\nHost: relay\r\n\r\n",
            post(b'{"jsonrpc":"2.0","id":3,"method":"relay_doesNotExist"}'),  # refused
            post(b"{oops"),  # answered at once, with a parse error
            post(b'{"jsonrpc":"2.0","id":4,"method":"eth_blockNumber"}'),
            b"GET /nowhere HTTP/1.1\r\nHost: relay\r\n\r\n",
            post(slow.replace(b'"id":1', b'"id":5')),
        ]
    )
    got = await raw_exchange(relay, [pipeline], answers=8)
    statuses = [s for s, _, _ in got]
    assert statuses == [200, 200, 200, 200, 200, 200, 404, 200]
    bodies = [orjson.loads(b) for _, _, b in got]
    assert [bodies[i]["id"] for i in (0, 1, 3, 4, 5, 7)] == [1, 2, 3, None, 4, 5]
    assert bodies[0]["result"] == hex(10_000 * 10**18)
    assert bodies[1]["result"] == "0x38"
    assert bodies[2]["status"] == "ok"
    assert bodies[3]["error"]["code"] == -32601
    assert bodies[4]["error"]["code"] == -32700
    assert int(bodies[5]["result"], 16) >= 0
    await assert_alive(relay, "a pipeline")


async def test_http_routes(relay: Relay) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(relay.url + "/no/such/page") as r:
            assert r.status == 404
        async with s.get(relay.url + "/health") as r:
            health = orjson.loads(await r.read())
            assert r.status == 200 and health["status"] == "ok" and health["chainId"] == 56
        async with s.get(relay.url + "/metrics") as r:
            text = await r.text()
            assert r.status == 200 and r.content_type == "text/plain"
            assert "chainrelay_requests_total" in text and "chainrelay_cache_hits_total" in text
        async with s.put(relay.url, data=CALL % 1) as r:
            assert r.status == 405
        async with s.options(
            relay.url,
            headers={
                "Origin": "https://dapp.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-api-key",
            },
        ) as r:
            assert r.status == 204
            assert await r.read() == b""
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert "x-api-key" in r.headers["Access-Control-Allow-Headers"]
        # Any path takes JSON-RPC, and answers carry the CORS header too.
        async with s.post(relay.url + "/rpc/v1", data=CALL % 9, headers=JSON_HEADERS) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert orjson.loads(await r.read())["result"] == "0x38"
    ((status, _, _),) = await raw_exchange(relay, [b"BREW / HTCPCP/1.0\r\n\r\n"])
    assert status == 400
    await assert_alive(relay, "the routes")


async def test_preflight_204_has_no_content_length(relay: Relay) -> None:
    req = b"OPTIONS / HTTP/1.1\r\nHost: relay\r\nOrigin: https://dapp.example\r\n\r\n"
    ((status, headers, _),) = await raw_exchange(relay, [req])
    assert status == 204
    assert "content-length" not in headers


# --- WebSocket -------------------------------------------------------------------------------
def ws(relay: Relay, **kw: Any) -> Any:
    return connect(relay.ws_url, proxy=None, open_timeout=10 * SECOND, **kw)


async def ask(conn: ClientConnection, message: str | bytes) -> Any:
    await conn.send(message)
    return orjson.loads(await asyncio.wait_for(conn.recv(), 10 * SECOND))


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


async def test_ws_bad_requests_get_json_rpc_errors(anvil: Anvil, relay: Relay) -> None:
    cases = bad_inputs(await anvil_errors(anvil.url))
    async with ws(relay) as conn:
        for i, (name, body, check) in enumerate(cases):
            if not body:
                continue  # an empty message: see below
            try:
                # Text frames, and binary frames (every other one, and any non-UTF-8 body).
                as_text = i % 2 == 0 and _is_utf8(body)
                check(await ask(conn, body.decode() if as_text else body))
            except AssertionError as exc:
                raise AssertionError(f"ws {name}: {exc}") from None
            good = await ask(conn, CALL % 1000)
            assert good == {"jsonrpc": "2.0", "id": 1000, "result": "0x38"}, f"after ws {name}"
        assert code_of(await ask(conn, "")) == -32700
    await assert_alive(relay, "websocket bad input")


async def test_ws_oversized_message_is_closed_with_1009(relay: Relay) -> None:
    async with ws(relay) as conn:
        assert (await ask(conn, CALL % 1))["result"] == "0x38"
        await conn.send("[" + " " * MAX_BODY + "]")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(conn.recv(), 10 * SECOND)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    # The others are not affected, and a new connection works.
    async with ws(relay) as conn:
        assert (await ask(conn, CALL % 2))["result"] == "0x38"
    await assert_alive(relay, "an oversized websocket message")


async def test_ws_message_just_under_the_limit_is_served(relay: Relay) -> None:
    call = CALL % 4
    padded = call[:-1] + b" " * (MAX_BODY - len(call)) + b"}"
    async with ws(relay) as conn:
        assert (await ask(conn, padded))["result"] == "0x38"
        # Fragmented messages are joined before parsing.
        await conn.send([CALL[:10], (CALL % 5)[10:]])
        answer = orjson.loads(await asyncio.wait_for(conn.recv(), 10 * SECOND))
        assert answer == {"jsonrpc": "2.0", "id": 5, "result": "0x38"}
