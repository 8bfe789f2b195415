"""The operator's surfaces without sockets: request ids on every way in, gzip, the admin
JSON-RPC, the workers' metrics summed, the access log's lines and its bound, and a
WebSocket session with permessage-deflate."""

from __future__ import annotations

import asyncio
import gzip
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from chainrelay.config import ServerConfig, loads
from chainrelay.errors import ConfigError
from chainrelay.metrics import Metrics
from chainrelay.server.accesslog import AccessLog, LoggedHttpProtocol
from chainrelay.server.admin import NO_KEY_TABLE, AdminRpc
from chainrelay.server.compress import Compression, accepts_gzip
from chainrelay.server.http import HttpServer
from chainrelay.server.metricsum import sum_expositions
from chainrelay.server.routes import Routes
from chainrelay.server.ws import WsSession
from chainrelay.wire.wsframes import text_header
from tests.lab.procs import parse_metrics
from tests.lab.timing import SECOND
from tests.protocol.test_config import UPSTREAM
from tests.protocol.test_http_fast_path import (
    Front,
    RecordingTransport,
    answers,
    balance,
    post,
)

# --- request ids ------------------------------------------------------------------------


def test_every_way_in_gives_each_answer_an_id_of_its_own() -> None:
    front = Front()
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    # The fast path, then a replay of it, then httptools (two reads), then a refusal.
    request = post(balance(1))
    conn.data_received(request)
    conn.data_received(post(balance(2)))
    assert front.server.replays  # the second was a replay
    conn.data_received(request[:30])
    conn.data_received(request[30:])
    conn.data_received(b"PUT / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    got = answers(transport.out)
    assert [a.status for a in got] == [200, 200, 200, 405]
    ids = [a.request_id or b"" for a in got]
    assert all(i.split(b"-")[0] == ids[0].split(b"-")[0] != b"" for i in ids)
    assert len(set(ids)) == 4


@pytest.mark.parametrize("split", [False, True])
def test_a_sane_incoming_id_is_kept_and_an_insane_one_replaced(split: bool) -> None:
    front = Front()
    front.warm(b'"0x2a"')
    for incoming, kept in [
        (b"abc-123_x.y:z/1+2=", True),
        (b"a" * 128, True),
        (b"a" * 129, False),
        (b'has "quotes"', False),
        (b"", False),
    ]:
        body = balance(7)
        request = post(
            body,
            headers=b"X-Request-Id: %s\r\nContent-Length: %d\r\n" % (incoming, len(body)),
        )
        reads = (request[:20], request[20:]) if split else (request,)
        (got,) = front.exchange(*reads)
        assert got.status == 200
        assert (got.request_id == incoming) is kept, (incoming, got.request_id)
    # A request naming its id is never learned as a replay (a replay writes a fresh id).
    assert not front.server.replays


def test_a_large_answer_is_gzipped_only_for_a_client_that_asks() -> None:
    front = Front()
    value = b'"0x' + b"ab" * 1000 + b'"'
    front.warm(value)
    body = balance(7)
    length = b"Content-Length: %d\r\n" % len(body)
    (plain,) = front.exchange(post(body))
    assert b"content-encoding" not in plain.headers
    for way in ("fast", "httptools"):
        request = post(body, headers=b"Accept-Encoding: gzip, br\r\n" + length)
        reads = (request,) if way == "fast" else (request[:20], request[20:])
        (got,) = front.exchange(*reads)
        assert got.headers[b"content-encoding"] == b"gzip", way
        assert got.headers[b"vary"] == b"Accept-Encoding"
        assert gzip.decompress(got.body) == plain.body
    # Below the threshold, as it is, even when asked.
    small = Front()
    small.warm(b'"0x2a"')
    (got,) = small.exchange(post(body, headers=b"Accept-Encoding: gzip\r\n" + length))
    assert b"content-encoding" not in got.headers and got.doc["result"] == "0x2a"


def test_accept_encoding_is_read_as_rfc_9110_says() -> None:
    assert accepts_gzip(b"gzip") and accepts_gzip(b"br;q=1.0, GZIP;q=0.5")
    assert not accepts_gzip(b"gzip;q=0") and not accepts_gzip(b"identity")
    assert not accepts_gzip(b"gzipx") and not accepts_gzip(None)
    assert gzip.decompress(Compression().gzip(b"x" * 5000)) == b"x" * 5000


# --- the admin JSON-RPC -----------------------------------------------------------------


def admin_rpc() -> tuple[AdminRpc, set[str]]:
    cordoned: set[str] = set()
    names = {"a", "b"}

    def cordon(name: str) -> bool:
        if name in names:
            cordoned.add(name)
        return name in names

    def uncordon(name: str) -> bool:
        cordoned.discard(name)
        return name in names

    return AdminRpc(cordon, uncordon, lambda: {"role": "standalone"}), cordoned


def ask(rpc: AdminRpc, body: bytes | dict[str, Any]) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    answer = rpc.handle(raw)
    assert isinstance(answer, bytes)  # no worker to tell: answered at once
    return orjson.loads(answer)


def call(method: str, *params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 3, "method": method, "params": list(params)}


def test_the_admin_rpc_cordons_reports_and_refuses_bad_calls() -> None:
    rpc, cordoned = admin_rpc()
    assert ask(rpc, call("chainrelay_cordonUpstream", "a")) == {
        "jsonrpc": "2.0",
        "id": 3,
        "result": True,
    }
    assert cordoned == {"a"}
    assert ask(rpc, call("chainrelay_uncordonUpstream", "a"))["result"] is True
    assert cordoned == set()
    assert ask(rpc, call("chainrelay_status"))["result"] == {"role": "standalone"}
    codes = {
        b"{": -32700,
        b"[]": -32600,
        orjson.dumps({"jsonrpc": "1.0", "id": 1, "method": "x"}): -32600,
        orjson.dumps(call("chainrelay_cordonUpstream", "zzz")): -32602,
        orjson.dumps(call("chainrelay_cordonUpstream", 5)): -32602,
        orjson.dumps(call("chainrelay_cordonUpstream")): -32602,
        orjson.dumps(call("chainrelay_status", 1)): -32602,
        orjson.dumps(call("eth_blockNumber")): -32601,
        b" " * 70_000: -32600,
    }
    for body, code in codes.items():
        assert ask(rpc, body)["error"]["code"] == code, body[:40]


async def test_a_cordon_that_tells_other_workers_is_answered_once_they_are_told() -> None:
    told: list[str] = []

    async def cordon(name: str) -> bool:
        await asyncio.sleep(0)
        told.append(name)
        return name == "a"

    rpc = AdminRpc(cordon, cordon, dict)
    for name, want in (("a", {"jsonrpc": "2.0", "id": 3, "result": True}), ("z", None)):
        answer = rpc.handle(orjson.dumps(call("chainrelay_cordonUpstream", name)))
        assert not isinstance(answer, bytes)
        got = orjson.loads(await answer)
        if want is not None:
            assert got == want
        else:
            assert got["error"]["code"] == -32602
    assert told == ["a", "z"]


def test_reload_keys_says_so_when_there_is_nothing_to_reload() -> None:
    rpc, _ = admin_rpc()
    assert ask(rpc, call("chainrelay_reloadKeys"))["result"] == {
        "reloaded": False,
        "reason": NO_KEY_TABLE,
    }
    rpc.reload_keys = lambda: {"reloaded": True, "keys": 3}
    assert ask(rpc, call("chainrelay_reloadKeys"))["result"] == {"reloaded": True, "keys": 3}

    def broken() -> dict[str, Any]:
        raise OSError("keys.toml: no such file")

    rpc.reload_keys = broken
    got = ask(rpc, call("chainrelay_reloadKeys"))["result"]
    assert got["reloaded"] is False and "no such file" in got["reason"]


# --- the workers' metrics, summed ---------------------------------------------------------


def worker_text(index: int, requests: int, connections: int, head: int) -> str:
    m = Metrics()
    for _ in range(requests):
        m.count("eth_chainId", "local", 0.0001)
    m.connections.labels("http").set(connections)
    m.head.set(head)
    m.coalesced.inc(index + 1)
    from prometheus_client import Gauge

    g = Gauge("chainrelay_worker", "w", ["worker"], registry=m.registry)
    g.labels(str(index)).set(1000 + index)
    return m.render().decode()


def test_workers_metrics_add_up_but_the_nodes_own_gauges_do_not() -> None:
    texts = [worker_text(0, 3, 2, 100), worker_text(1, 4, 5, 99)]
    summed = parse_metrics(sum_expositions(texts))
    key = 'chainrelay_requests_total{method="eth_chainId",outcome="local"}'
    assert summed[key] == 7
    assert summed["chainrelay_request_latency_seconds_count" + '{outcome="local"}'] == 7
    assert summed['chainrelay_connections{transport="http"}'] == 7
    assert summed["chainrelay_coalesced_total"] == 3
    assert summed["chainrelay_head_block"] == 100  # worker 0's, not a sum
    assert summed['chainrelay_worker{worker="0"}'] == 1000
    assert summed['chainrelay_worker{worker="1"}'] == 1001
    # One HELP and TYPE per family: a valid exposition.
    out = sum_expositions(texts)
    assert out.count("# TYPE chainrelay_requests_total counter") == 1


# --- the access log -----------------------------------------------------------------------


def server_cfg(path: Path, **kw: Any) -> ServerConfig:
    return ServerConfig(access_log=str(path), access_log_flush_interval=0.01, **kw)


async def test_lines_are_written_by_the_thread_and_a_full_buffer_drops_and_counts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "access.log"
    metrics = Metrics()
    answer = b'{"jsonrpc":"2.0","id":1,"result":"0x1"}'
    access = AccessLog(
        server_cfg(path, access_log_max_buffer_bytes=4096, access_log_flush_bytes=1 << 20),
        metrics,
        lambda body, who: answer,
    )
    await access.start()
    try:
        for _ in range(100):  # ~250 bytes each: the buffer holds about 16 before a flush
            access.handle(b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}')
        assert access.dropped > 50
        assert metrics.access_log_dropped._value.get() == access.dropped
    finally:
        await access.stop()
    lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert len(lines) == 100 - access.dropped
    assert lines[0]["method"] == "eth_chainId" and lines[0]["outcome"] == "hit"
    assert lines[0]["out"] == len(answer) and lines[0]["status"] == 200


async def test_sampling_keeps_every_error(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    error = b'{"jsonrpc":"2.0","id":1,"error":{"code":-32005,"message":"limit"}}'
    ok = b'{"jsonrpc":"2.0","id":1,"result":"0x1"}'
    answers_ = iter([error, ok] * 50)
    access = AccessLog(
        server_cfg(path, access_log_sample=0.0), Metrics(), lambda body, who: next(answers_)
    )
    await access.start()
    for _ in range(100):
        access.handle(b'{"jsonrpc":"2.0","id":1,"method":"eth_call"}')
    await access.stop()
    lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert [x["outcome"] for x in lines] == ["error:-32005"] * 50


async def test_an_http_connection_logs_its_answers_with_their_ids_and_its_refusals(
    tmp_path: Path,
) -> None:
    path = tmp_path / "access.log"
    front = Front(replays=False)
    front.warm(b'"0x2a"')
    access = AccessLog(server_cfg(path), front.metrics, front.rpc.handle)
    server = HttpServer(
        Routes(access.handle, None, None),
        front.server.limits,
        front.metrics,
        protocol=LoggedHttpProtocol,
        access=access,
    )
    await access.start()
    conn = LoggedHttpProtocol(server)
    transport = RecordingTransport()
    conn.connection_made(transport)
    body = balance(7)
    conn.data_received(
        post(body, headers=b"X-Request-Id: mine\r\nContent-Length: %d\r\n" % len(body))
    )
    conn.data_received(b"DELETE / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    await access.stop()
    got = answers(transport.out)
    lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert [x["id"] for x in lines] == ["mine", (got[1].request_id or b"").decode()]
    assert lines[0]["outcome"] == "hit" and lines[0]["in"] == len(body)
    assert lines[0]["client"] == "127.0.0.1" and lines[0]["out"] == len(got[0].body)
    assert lines[1]["outcome"] == "405"


# --- WebSocket permessage-deflate ---------------------------------------------------------


class WsTransport(RecordingTransport):
    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def test_a_deflate_session_answers_and_sends_prebuilt_frames_as_compressed_messages() -> None:
    client = ClientProtocol(parse_uri("ws://relay/"), extensions=[ClientPerMessageDeflateFactory()])
    handshake = client.connect()
    client.send_request(handshake)
    (raw,) = client.data_to_send()
    transport = WsTransport()
    answer = b'{"jsonrpc":"2.0","id":1,"result":"' + b"0" * 4000 + b'"}'
    session = WsSession(transport, lambda body, who: answer, deflate=True)
    assert session.accept(raw)
    client.receive_data(bytes(transport.out))
    transport.out.clear()
    assert client.extensions  # negotiated
    client.send_text(b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}')
    for chunk in client.data_to_send():
        session.data_received(chunk)
    # A notification frame built for every subscriber, sent to this one compressed.
    note = b'{"jsonrpc":"2.0","method":"eth_subscription","params":{}}'
    session.send_frames(text_header(len(note)) + note)
    wire = bytes(transport.out)
    assert len(wire) < len(answer)  # compressed on the wire
    client.receive_data(wire)
    got = [e for e in client.events_received() if isinstance(e, Frame)]
    assert [(f.opcode, f.data) for f in got] == [(Opcode.TEXT, answer), (Opcode.TEXT, note)]


def test_without_deflate_the_session_negotiates_none() -> None:
    client = ClientProtocol(parse_uri("ws://relay/"), extensions=[ClientPerMessageDeflateFactory()])
    client.send_request(client.connect())
    (raw,) = client.data_to_send()
    transport = WsTransport()
    session = WsSession(transport, lambda body, who: b"{}")
    assert session.accept(raw)
    client.receive_data(bytes(transport.out))
    assert not client.extensions


def test_nothing_is_left_open(tmp_path: Path) -> None:
    # The stderr log duplicates fd 2 and closes its copy when it stops.
    before = len(os.listdir("/proc/self/fd"))

    async def run() -> None:
        access = AccessLog(ServerConfig(access_log="-"), Metrics(), lambda body, who: b"{}")
        await access.start()
        await asyncio.wait_for(access.stop(), 5 * SECOND)

    asyncio.run(run())
    assert len(os.listdir("/proc/self/fd")) <= before


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ('admin_listen = "127.0.0.1:8545"', "server.admin_listen: must not be the public port"),
        ('admin_listen = "nowhere"', "server.admin_listen: expected HOST:PORT"),
        ("access_log_sample = 1.5", "server.access_log_sample: must be between 0 and 1"),
        ("gzip_level = 0", "server.gzip_level: must be between 1 and 9"),
    ],
)
def test_operator_keys_are_checked(server: str, message: str) -> None:
    text = f'[server]\nlisten = "127.0.0.1:8545"\n{server}\n' + UPSTREAM
    with pytest.raises(ConfigError) as got:
        loads(text)
    assert str(got.value).startswith(message)


def test_the_admin_listener_is_on_loopback_by_default_and_the_other_surfaces_off() -> None:
    s = loads(UPSTREAM).server
    assert (s.admin_listen, s.public_metrics) == ("127.0.0.1:9645", False)
    assert (s.access_log, s.ws_deflate) == ("", False)
    assert loads('[server]\nadmin_listen = ""\n' + UPSTREAM).server.admin_listen == ""
    assert loads('[server]\nadmin_listen = ":9545"\n' + UPSTREAM).server.admin_listen == ":9545"
