"""The operator's surfaces of a real relay process: the admin listener (metrics, the full
health, the admin JSON-RPC, and under ``--workers`` every worker's metrics summed), the
access log, request ids and compression, as clients and operators reach them.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from chainrelay.devnet import Anvil, free_port
from tests.lab.chain import metric
from tests.lab.counting_proxy import start_proxy
from tests.lab.procs import (
    AnvilFactory,
    Procs,
    Relay,
    RelayFactory,
    parse_metrics,
    relay_config,
    until,
)
from tests.lab.timing import SECOND
from tests.system.test_workers import fresh_connections, spawn_serve, still_anvil

pytestmark = pytest.mark.lab


# A fresh request id: this process's prefix, a dash, a counter in hex.
FRESH_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]+")


def call(method: str, params: list[Any], id_: Any = 1) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": id_, "method": method, "params": params})


def address(i: int) -> str:
    return "0x" + f"{0xADD0000 + i:040x}"


async def admin_call(url: str, method: str, *params: Any) -> Any:
    async with aiohttp.ClientSession() as s, s.post(url, data=call(method, list(params))) as r:
        assert r.status == 200
        return orjson.loads(await r.read())


def log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def test_the_admin_listener_serves_what_the_public_port_no_longer_does_and_cordons(
    anvil: Anvil, procs: Procs, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    proxies = [await start_proxy(procs, anvil.url) for _ in range(2)]
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    access_log = tmp_path / "access.log"
    relay = await relay_factory(
        [p.url for p in proxies],
        f'admin_listen = "127.0.0.1:{admin_port}"\n'
        f'access_log = "{access_log}"\naccess_log_flush_interval = 0.05\n',
    )
    async with aiohttp.ClientSession() as s:
        # The public port: liveness alone, no metrics.
        async with s.get(relay.url + "/health") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok"}
            assert FRESH_ID.fullmatch(r.headers["X-Request-Id"])
        async with s.get(relay.url + "/metrics") as r:
            assert r.status == 404
        # The admin port: the full health and the metrics.
        async with s.get(admin + "/health") as r:
            full = await r.json()
            assert [u["name"] for u in full["upstreams"]] == ["u0", "u1"]
        async with s.get(admin + "/metrics") as r:
            assert r.status == 200
            assert "chainrelay_upstream_healthy" in await r.text()
        # A browser page cannot make admin calls.
        body = call("chainrelay_cordonUpstream", ["u0"])
        async with s.post(admin, data=body, headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 403

    status = (await admin_call(admin, "chainrelay_status"))["result"]
    assert status["role"] == "standalone" and status["chainId"] == 56
    assert status["head"] >= 0 and status["cache"]["maxBytes"] > 0
    assert [u["state"] for u in status["upstreams"]] == ["in", "in"]
    assert (await admin_call(admin, "chainrelay_cordonUpstream", "u0"))["result"] is True
    status = (await admin_call(admin, "chainrelay_status"))["result"]
    assert [u["state"] for u in status["upstreams"]] == ["cordoned", "in"]
    # The keys read again: none configured here.
    reload = (await admin_call(admin, "chainrelay_reloadKeys"))["result"]
    assert reload == {"reloaded": True, "keys": 0}
    unknown = await admin_call(admin, "chainrelay_cordonUpstream", "nope")
    assert unknown["error"]["code"] == -32602
    assert (await admin_call(admin, "chainrelay_nothing"))["error"]["code"] == -32601

    # Traffic moves off the cordoned upstream: every miss goes to u1.
    for p in proxies:
        await p.reset()
    async with aiohttp.ClientSession() as s:
        for i in range(20):
            async with s.post(relay.url, data=call("eth_getBalance", [address(i), "latest"])) as r:
                assert "result" in orjson.loads(await r.read())
        assert (await proxies[0].counts()).get("eth_getBalance", 0) == 0
        assert (await proxies[1].counts()).get("eth_getBalance", 0) >= 20
        assert (await admin_call(admin, "chainrelay_uncordonUpstream", "u0"))["result"] is True
        status = (await admin_call(admin, "chainrelay_status"))["result"]
        assert [u["state"] for u in status["upstreams"]] == ["in", "in"]

        # Request ids: an incoming one kept, an insane one replaced; each logged.
        miss = call("eth_getBalance", [address(100), "0x0"], 7)
        async with s.post(relay.url, data=miss, headers={"X-Request-Id": "job-42.a"}) as r:
            assert r.headers["X-Request-Id"] == "job-42.a"
            miss_answer = await r.read()
        hit = call("eth_getBalance", [address(100), "0x0"], 8)
        async with s.post(relay.url, data=hit, headers={"X-Request-Id": 'bad "id"'}) as r:
            hit_id = r.headers["X-Request-Id"]
            assert FRESH_ID.fullmatch(hit_id)
        async with s.post(relay.url, data=b"{not json") as r:
            bad_id = r.headers["X-Request-Id"]
        async with s.put(relay.url, data=b"{}") as r:
            assert r.status == 405
            refused_id = r.headers["X-Request-Id"]
    async with websockets.connect(relay.ws_url, additional_headers={"X-Request-Id": "ws-1"}) as ws:
        assert ws.response is not None and ws.response.headers["X-Request-Id"] == "ws-1"
        await ws.send(call("eth_chainId", [], 9).decode())
        assert orjson.loads(await ws.recv())["result"] == "0x38"

    def by_id() -> dict[str, dict[str, Any]]:
        return {line["id"]: line for line in log_lines(access_log)}

    await until(
        lambda: (
            {"job-42.a", hit_id, bad_id, refused_id} <= set(by_id())
            and any(line["transport"] == "ws" for line in by_id().values())
        ),
        10 * SECOND,
        "the access log's lines",
    )
    lines = by_id()
    first = lines["job-42.a"]
    assert first["client"] == "127.0.0.1" and first["transport"] == "http"
    assert first["method"] == "eth_getBalance" and first["outcome"] == "miss"
    assert first["upstream"] and set(first["upstream"]) <= {"u0", "u1"}
    assert first["in"] == len(miss) and first["out"] == len(miss_answer)
    assert first["status"] == 200 and first["ms"] >= 0 and first["time"].endswith("Z")
    assert lines[hit_id]["outcome"] == "hit" and lines[hit_id]["upstream"] is None
    assert lines[bad_id]["outcome"] == "error:-32700"
    assert lines[refused_id]["outcome"] == "405" and lines[refused_id]["status"] == 405
    ws_line = next(line for line in lines.values() if line["transport"] == "ws")
    assert ws_line["method"] == "eth_chainId" and FRESH_ID.fullmatch(ws_line["id"])


async def test_under_two_workers_admin_metrics_sum_both_and_a_cordon_reaches_both(
    anvil_factory: AnvilFactory, procs: Procs, tmp_path: Path
) -> None:
    node = await still_anvil(anvil_factory)
    proxies = [await start_proxy(procs, node.url) for _ in range(2)]
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    relay = Relay(
        procs,
        relay_config(
            [p.url for p in proxies],
            f'admin_listen = "127.0.0.1:{admin_port}"\n[head]\nfresh_blocks = 1e6\n',
        ),
        tmp_path,
        "workers",
    )
    relay.proc = spawn_serve(procs, relay, 2)
    await relay.wait_ready()

    async def scrape() -> dict[str, float]:
        async with aiohttp.ClientSession() as s, s.get(admin + "/metrics") as r:
            assert r.status == 200
            return parse_metrics(await r.text())

    # Both workers' registries in one scrape, once both serve (the admin listener may start
    # after the public port answers: refused until then).
    async def both() -> bool:
        try:
            m = await scrape()
        except aiohttp.ClientConnectorError:
            return False
        return (
            metric(m, "chainrelay_worker", worker="0")
            > 0
            < metric(m, "chainrelay_worker", worker="1")
        )

    await until(both, 20 * SECOND, "both workers' metrics in one admin scrape")
    before = metric(await scrape(), "chainrelay_requests_total", method="eth_chainId")
    # Each call on a new connection: the kernel spreads 40 over both workers (all on one
    # has odds of 2^-39), and the node's total is their sum.
    n = 40
    async with fresh_connections() as s:
        for i in range(n):
            async with s.post(relay.url, data=call("eth_chainId", [], i)) as r:
                assert orjson.loads(await r.read())["result"] == "0x38"
    m = await scrape()
    assert metric(m, "chainrelay_requests_total", method="eth_chainId") - before == n
    assert metric(m, "chainrelay_head_block") == 5  # the node's head, not a sum

    # A cordon through worker 0's admin listener holds in both workers.
    assert (await admin_call(admin, "chainrelay_cordonUpstream", "u0"))["result"] is True
    for p in proxies:
        await p.reset()
    async with fresh_connections() as s:
        for i in range(n):
            body = call("eth_getBalance", [address(i), "latest"], i)
            async with s.post(relay.url, data=body) as r:
                assert "result" in orjson.loads(await r.read())
    assert (await proxies[0].counts()).get("eth_getBalance", 0) == 0
    assert (await proxies[1].counts()).get("eth_getBalance", 0) == n


async def test_gzip_and_permessage_deflate_answers_are_the_same_bytes(
    anvil: Anvil, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory([anvil.url], "ws_deflate = true\n")
    block = call("eth_getBlockByNumber", ["0x0", True])
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.post(relay.url, data=block, headers={"Accept-Encoding": "identity"}) as r:
            plain = await r.read()
            assert "Content-Encoding" not in r.headers
        assert len(plain) > 1024  # over the threshold
        async with s.post(relay.url, data=block, headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert "Accept-Encoding" in r.headers["Vary"]
            assert gzip.decompress(await r.read()) == plain
    async with websockets.connect(
        relay.ws_url, extensions=[ClientPerMessageDeflateFactory()]
    ) as ws:
        assert ws.protocol.extensions  # negotiated
        await ws.send(block.decode())
        got = await ws.recv()
        assert (got if isinstance(got, bytes) else got.encode()) == plain
