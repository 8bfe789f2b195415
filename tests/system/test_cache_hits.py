"""Cache hits over real HTTP: a call repeated under other ids, spelled compactly (ethers,
viem) or spaced as Python's json spaces it (web3.py), is answered as anvil answers it, with
the caller's own id, and every answer is counted once.

After the first answer at a head, such repeats are replayed from their request's bytes
(``HttpServer.learn_replay``); the latency histogram times only some of them, which is how
the test sees that replays served the calls.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
import pytest

from chainrelay.devnet import DEV_ACCOUNTS
from tests.lab.chain import metric
from tests.lab.procs import AnvilFactory, RelayFactory, rpc
from tests.system.test_bad_input import read_response

pytestmark = pytest.mark.lab

# anvil mines only when asked: the head, and so every hit, stays put while measuring; the
# relay is told its head stays fresh meanwhile (a local answer's repeats are replayed by
# their bytes only then).
FROZEN_HEAD = "[head]\nfresh_blocks = 1000000.0\n"
ROUNDS = 12


def spellings(method: str, params: list[Any], id_: object) -> list[bytes]:
    doc = {"jsonrpc": "2.0", "id": id_, "method": method, "params": params}
    spaced = {"jsonrpc": "2.0", "method": method, "params": params, "id": id_}
    return [orjson.dumps(doc), json.dumps(spaced).encode()]


async def test_repeats_under_other_ids_are_answered_as_anvil_does_and_counted(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    for _ in range(3):
        await rpc(anvil.url, "evm_mine")
    block = (await rpc(anvil.url, "eth_getBlockByNumber", ["0x1", False]))["result"]
    relay = await relay_factory([anvil.ws_url], FROZEN_HEAD)
    calls: list[tuple[str, list[Any]]] = [
        ("eth_getBlockByHash", [block["hash"], False]),
        ("eth_getBalance", [DEV_ACCOUNTS[0], "0x1"]),
        ("eth_getTransactionCount", [DEV_ACCOUNTS[1], "latest"]),
        ("eth_chainId", []),
    ]
    want = [(await rpc(anvil.url, m, p, 0))["result"] for m, p in calls]

    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)

    async def post(body: bytes) -> Any:
        writer.write(
            b"POST / HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        status, _, answer = await read_response(reader)
        assert status == 200
        return orjson.loads(answer)

    try:
        for m, p in calls:  # misses: the cache fills
            for body in spellings(m, p, 0):
                await post(body)
        before = await relay.metrics()
        sent = 0
        for k in range(1, ROUNDS * 8 + 1):
            id_: object = f"r{k}" if k % 3 == 0 else k  # ids of several lengths and kinds
            for (m, p), result in zip(calls, want, strict=True):
                for body in spellings(m, p, id_):
                    assert await post(body) == {"jsonrpc": "2.0", "id": id_, "result": result}
                    sent += 1
        after = await relay.metrics()
    finally:
        writer.close()
        await writer.wait_closed()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("chainrelay_requests_total") == sent
    outcomes = {
        o: delta("chainrelay_requests_total", outcome=o)
        for o in ("hit", "local", "miss", "pass", "coalesced", "derived", "shared_hit", "error")
    }
    assert delta("chainrelay_requests_total", outcome="hit") == sent * 3 / 4, outcomes
    assert delta("chainrelay_requests_total", outcome="local") == sent / 4
    assert delta("chainrelay_cache_hits_total") == sent * 3 / 4
    assert delta("chainrelay_upstream_calls_total") == 0
    timed = delta("chainrelay_request_latency_seconds_count")
    assert timed < sent / 4, f"{timed} of {sent} answers timed: repeats were not replayed"
