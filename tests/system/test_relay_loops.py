"""Relays that are each other's upstreams (regional relays of the tree, each the other's
parent) pass no request round forever: each names itself in the Via header of what it
forwards and refuses with 508 a request that names it, and the sender asks elsewhere."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from chainrelay.defaults import MAX_RELAY_HOPS
from chainrelay.devnet import DEV_ACCOUNTS, DEV_KEYS, Anvil
from chainrelay.server.peer import relays_in
from tests.lab.chain import metric, sign_transfer
from tests.lab.procs import Procs, Relay, relay_config, rpc, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab


async def test_two_relays_that_are_each_others_upstreams_send_a_write_round_once(
    anvil_factory: Callable[..., Awaitable[Anvil]], procs: Procs, tmp_path: Path
) -> None:
    node = await anvil_factory(chain_id=56, block_time=1.0)
    # Hedging off: each read goes to one upstream at a time, so a loop would show.
    extra = "[pool]\nhedge = false\n"
    a = Relay(procs, "", tmp_path, "a")
    b = Relay(procs, "", tmp_path, "b")
    a.config_path.write_text(
        relay_config([b.url, node.url], extra).replace("{listen}", f"127.0.0.1:{a.port}")
    )
    b.config_path.write_text(
        relay_config([a.url, node.url], extra).replace("{listen}", f"127.0.0.1:{b.port}")
    )
    b.start()
    a.start()
    await b.wait_ready()
    await a.wait_ready()

    async def healthy() -> bool:
        got = [await r.metrics() for r in (a, b)]
        return all(metric(m, "chainrelay_upstream_healthy", upstream="u0") == 1 for m in got)

    # Each started before the other answered: wait until both count the other healthy.
    await until(healthy, 20 * SECOND, "both relays to count each other healthy")
    sender, key = DEV_ACCOUNTS[2], DEV_KEYS[2]
    nonce = int((await rpc(node.url, "eth_getTransactionCount", [sender, "pending"]))["result"], 16)
    block = (await rpc(node.url, "eth_getBlockByNumber", ["latest", False]))["result"]
    # More writes than the errors in a row that take an upstream out of rotation.
    writes = 4
    hashes = []
    for i in range(writes):
        raw, tx_hash = sign_transfer(
            key,
            nonce=nonce + i,
            to=DEV_ACCOUNTS[1],
            value=1,
            chain_id=56,
            base_fee=int(block["baseFeePerGas"], 16),
        )
        answer = await rpc(a.url, "eth_sendRawTransaction", [raw])
        assert answer.get("result") == tx_hash, answer
        hashes.append(tx_hash)

    async def mined() -> bool:
        for tx_hash in hashes:
            got = await rpc(node.url, "eth_getTransactionReceipt", [tx_hash])
            if got.get("result") is None:
                return False
        return True

    await until(mined, 20 * SECOND, "the transactions mined")

    # A broadcast each write to b and anvil; b to anvil and back to a, which refused it.
    async def refused() -> bool:
        return metric(await a.metrics(), "chainrelay_rejected_total", reason="relay_loop") >= writes

    await until(refused, 10 * SECOND, "a to refuse every write that came back round")
    for relay in (a, b):
        sent = metric(
            await relay.metrics(), "chainrelay_requests_total", method="eth_sendRawTransaction"
        )
        assert sent == writes, f"{relay.url} served eth_sendRawTransaction {sent} times"

    # A read no cache holds goes round at most once too, and gets anvil's answer: each
    # relay serves its client's read and at most the other's copy of it.
    method = "eth_getTransactionCount"
    before = [metric(await r.metrics(), "chainrelay_requests_total", method=method) for r in (a, b)]
    for relay in (a, b):
        got = await rpc(relay.url, method, [sender, "pending"])
        want = await rpc(node.url, method, [sender, "pending"])
        assert got["result"] == want["result"]
    for relay, was in zip((a, b), before, strict=True):
        served = metric(await relay.metrics(), "chainrelay_requests_total", method=method) - was
        assert 1 <= served <= 2, f"{relay.url} served {method} {served} times for two reads"
    # Refusing a loop is no fault of the refusing relay: b kept a in rotation.
    assert await healthy()
    # The copy of each write that came back round failed after the client had its answer:
    # consumed quietly, never an "exception was never retrieved" in either log.
    for relay in (a, b):
        assert "never retrieved" not in relay.log_path.read_text()


async def test_via_entries_other_than_relays_are_ignored_and_long_relay_chains_refused(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    node = await anvil_factory(chain_id=56, block_time=1.0)
    relay = await relay_factory([node.url])
    params = [DEV_ACCOUNTS[0], "pending"]
    body = {"jsonrpc": "2.0", "id": 1, "method": "eth_getTransactionCount", "params": params}
    want = await rpc(node.url, "eth_getTransactionCount", params)
    chain = ", ".join(f"1.1 chainrelay-{i:08x}" for i in range(MAX_RELAY_HOPS))
    async with aiohttp.ClientSession() as s:
        # A proxy's or a client's own entries are no relays: served (and not carried on).
        via = "1.1 proxy.example, HTTP/2 edge, 1.1 chainrelay-0000000a"
        async with s.post(relay.url, json=body, headers={"Via": via}) as r:
            assert r.status == 200
            assert (await r.json())["result"] == want["result"]
        # A request that passed through as many relays as a tree has levels and more.
        async with s.post(relay.url, json=body, headers={"Via": chain}) as r:
            assert r.status == 508
    assert metric(await relay.metrics(), "chainrelay_rejected_total", reason="relay_loop") == 1


def test_relays_in_keeps_only_chainrelay_entries_from_every_line() -> None:
    got = relays_in(
        b"1.1 chainrelay-0123abcd, 1.0 fred, 1.1 chainrelay-XYZ, 1.1 chainrelay-ffffffff"
    )
    assert got == [b"chainrelay-0123abcd", b"chainrelay-ffffffff"]
    assert relays_in(b"") == [] and relays_in(b"1.1 nginx") == []
