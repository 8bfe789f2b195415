"""Installed filters (eth_newFilter & co) served by the relay itself, against a real anvil.

anvil mines only when told to, so both sides see exactly the same blocks; web3.py's filter
API polls the relay and anvil alike and the two must collect the same logs and blocks. The
relay's filters live on the relay, fed by its block follower: they survive the loss of the
upstream connection, report removed logs after a reorg, and expire when nobody polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import websockets
from eth_typing import HexStr
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.types import FilterParams

from chainrelay.devnet import Anvil, transfer_emitter_initcode
from tests.lab.chain import (
    DEV_ACCOUNTS,
    TRANSFER_TOPIC,
    Chain,
    emitter_data,
    metric,
    start_relay_mining,
    wait_same_head,
)
from tests.lab.counting_proxy import CountingProxy, start_proxy
from tests.lab.procs import Procs, Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
BLOCKS = 10
SETTLE_TIMEOUT = 15 * SECOND
FILTER_NOT_FOUND = {"code": -32000, "message": "filter not found"}


@dataclass
class Lab:
    anvil: Anvil
    node: Chain  # anvil, directly
    relay: Relay
    through: Chain  # the relay
    emitter: str


@contextlib.asynccontextmanager
async def lab_of(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
    upstream: Callable[[Anvil], Awaitable[str]] | None = None,
    extra: str = "",
) -> AsyncIterator[Lab]:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        emitter = await node.deploy(transfer_emitter_initcode())
        url = anvil.ws_url if upstream is None else await upstream(anvil)
        relay = await start_relay_mining(node, relay_factory, [url], extra)
        async with Chain.open(relay.url) as through:
            await wait_same_head(through, node, SETTLE_TIMEOUT)
            yield Lab(anvil, node, relay, through, emitter)


@pytest.fixture
async def lab(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> AsyncIterator[Lab]:
    async with lab_of(anvil_factory, relay_factory) as got:
        yield got


async def mine_block(lab: Lab, i: int, logs: int = 1) -> None:
    """One block with a plain transfer and ``logs`` Transfer logs from the emitter."""
    await lab.node.send({"from": A0, "to": A1, "value": hex(100 + i)})
    for k in range(logs):
        data = emitter_data(A2, 1000 * i + k)
        await lab.node.send({"from": A1, "to": lab.emitter, "data": data, "gas": "0x20000"})
    await lab.node.call("evm_mine")


def plain(entries: Any) -> Any:
    """web3.py's AttributeDicts and HexBytes as JSON-comparable values."""
    return orjson.loads(AsyncWeb3.to_json(entries))


async def raw(chain: Chain, method: str, params: list[Any]) -> dict[str, Any]:
    return await chain.request(method, params)


async def poll_until(
    chain: Chain, fid: str, have: list[Any], want: Callable[[list[Any]], bool], what: str
) -> None:
    """Poll ``fid`` into ``have`` until ``want(have)``."""

    async def done() -> bool:
        got = await chain.request("eth_getFilterChanges", [fid])
        assert "result" in got, f"{what}: {got}"
        have.extend(got["result"])
        return want(have)

    await until(done, SETTLE_TIMEOUT, what)


# --- the relay's filters poll like anvil's own ------------------------------------------------
async def test_web3_filter_changes_through_relay_match_anvil(lab: Lab) -> None:
    direct = AsyncWeb3(AsyncHTTPProvider(lab.anvil.url))
    through = AsyncWeb3(AsyncHTTPProvider(lab.relay.url))
    try:
        await compare_filters(lab, direct, through)
    finally:
        for w3 in (direct, through):
            await w3.provider.disconnect()


async def compare_filters(lab: Lab, direct: AsyncWeb3[Any], through: AsyncWeb3[Any]) -> None:
    crit: FilterParams = {"topics": [HexStr(TRANSFER_TOPIC)]}
    filters = {
        name: (await w3.eth.filter(crit), await w3.eth.filter("latest"))
        for name, w3 in (("direct", direct), ("through", through))
    }
    seen: dict[str, tuple[list[Any], list[Any]]] = {"direct": ([], []), "through": ([], [])}

    async def poll(name: str) -> None:
        log_f, block_f = filters[name]
        seen[name][0].extend(plain(await log_f.get_new_entries()))
        seen[name][1].extend(plain(await block_f.get_new_entries()))

    for i in range(BLOCKS):
        await mine_block(lab, i, logs=1 + i % 3)
        if i % 3 == 0:  # polls between blocks, not only at the end
            await poll("direct")
            await poll("through")

    await poll("direct")
    direct_logs, direct_blocks = seen["direct"]
    assert len(direct_blocks) == BLOCKS
    assert len(direct_logs) == sum(1 + i % 3 for i in range(BLOCKS))

    async def caught_up() -> bool:
        await poll("through")
        return len(seen["through"][1]) >= BLOCKS

    await until(caught_up, SETTLE_TIMEOUT, "the relay's block filter to see every block")
    await poll("through")
    assert seen["through"] == seen["direct"]

    # eth_getFilterLogs: the filter's whole range, as anvil answers it
    ranged = {"fromBlock": "0x1", "topics": [TRANSFER_TOPIC]}
    fid_relay = (await raw(lab.through, "eth_newFilter", [ranged]))["result"]
    fid_node = (await raw(lab.node, "eth_newFilter", [ranged]))["result"]
    got = await raw(lab.through, "eth_getFilterLogs", [fid_relay])
    want = await raw(lab.node, "eth_getFilterLogs", [fid_node])
    assert got.get("result") == want["result"], got
    assert len(got["result"]) >= len(direct_logs)

    # uninstall: true once, then false; polls of it are "filter not found"
    for name, w3 in (("direct", direct), ("through", through)):
        log_f = filters[name][0]
        assert log_f.filter_id is not None
        assert await w3.eth.uninstall_filter(log_f.filter_id) is True
        assert await w3.eth.uninstall_filter(log_f.filter_id) is False
    gone = await raw(lab.through, "eth_getFilterChanges", [filters["through"][0].filter_id])
    assert gone["error"] == FILTER_NOT_FOUND


async def test_filter_ids_are_geths_and_never_reach_the_upstream(
    lab: Lab, procs: Procs, relay_factory: Callable[..., Awaitable[Relay]]
) -> None:
    proxy = await start_proxy(procs, lab.anvil.url)
    relay = await start_relay_mining(lab.node, relay_factory, [proxy.url])
    async with Chain.open(relay.url) as through:
        await wait_same_head(through, lab.node, SETTLE_TIMEOUT)
        await proxy.reset()
        ids = [
            (await raw(through, m, p))["result"]
            for m, p in (
                ("eth_newFilter", [{"address": lab.emitter}]),
                ("eth_newBlockFilter", []),
            )
        ]
        # the proxy speaks HTTP only: no pending transactions to stream, said at once
        pending = await raw(through, "eth_newPendingTransactionFilter", [])
        assert pending["error"]["code"] == -32000, pending
        for fid in ids:
            assert fid.startswith("0x") and 3 <= len(fid) <= 34, fid
            int(fid, 16)
            assert (await raw(through, "eth_getFilterChanges", [fid]))["result"] == []
        assert len(set(ids)) == 2
        counts = await proxy.counts()
        assert not {m for m in counts if "Filter" in m}, counts


async def test_pending_transaction_filter(lab: Lab) -> None:
    fid = (await raw(lab.through, "eth_newPendingTransactionFilter", []))["result"]
    sent: list[str] = []
    have: list[Any] = []

    async def seen_all() -> bool:
        # anvil announces a pending transaction once; a stream opened just after a send
        # misses it, so send until the relay's stream carries them
        sent.append(await lab.node.send({"from": A0, "to": A1, "value": hex(len(sent) + 1)}))
        got = await raw(lab.through, "eth_getFilterChanges", [fid])
        have.extend(got["result"])
        return sent[-1] in have

    await until(seen_all, SETTLE_TIMEOUT, "pending transaction hashes through the relay")
    assert set(have) <= set(sent)
    await lab.node.call("evm_mine")


# --- an upstream connection lost and back: the filter never notices ----------------------------
async def test_filter_survives_upstream_connection_loss(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
    procs: Procs,
) -> None:
    proxies: list[CountingProxy] = []

    async def via_proxy(anvil: Anvil) -> str:
        proxies.append(await start_proxy(procs, anvil.url))
        return proxies[0].url

    async with lab_of(anvil_factory, relay_factory, via_proxy) as lab:
        start, _ = await lab.node.head()
        blocks_f = (await raw(lab.through, "eth_newBlockFilter", []))["result"]
        logs_f = (await raw(lab.through, "eth_newFilter", [{"address": lab.emitter}]))["result"]
        got_blocks: list[str] = []
        got_logs: list[dict[str, Any]] = []

        async def poll() -> None:
            for fid, into in ((blocks_f, got_blocks), (logs_f, got_logs)):
                answer = await raw(lab.through, "eth_getFilterChanges", [fid])
                assert "result" in answer, answer
                into.extend(answer["result"])

        for i in range(3):
            await mine_block(lab, i)
        await wait_same_head(lab.through, lab.node, SETTLE_TIMEOUT)
        await poll()

        proxies[0].kill()  # the relay's only upstream connection is gone
        for i in range(3, 6):
            await mine_block(lab, i)
        await poll()  # answered by the relay alone while its upstream is away
        await poll()

        back = CountingProxy(procs, lab.anvil.url)
        back.port, back.url = proxies[0].port, proxies[0].url
        back.start()
        await back.wait_ready()
        for i in range(6, 8):
            await mine_block(lab, i)
        end, _ = await lab.node.head()

        async def complete() -> bool:
            await poll()
            return len(got_blocks) >= end - start

        await until(complete, SETTLE_TIMEOUT, "every block through the lost connection")
        want_blocks = [(await lab.node.block(hex(n)))["hash"] for n in range(start + 1, end + 1)]
        assert got_blocks == want_blocks, "a gap or a duplicate in the block filter"
        want_logs = await lab.node.call(
            "eth_getLogs", [{"fromBlock": hex(start + 1), "toBlock": hex(end)}]
        )
        assert got_logs == want_logs
        assert len(got_logs) == 8


# --- reorgs ------------------------------------------------------------------------------------
async def test_reorg_reports_removed_logs(lab: Lab) -> None:
    fid = (await raw(lab.through, "eth_newFilter", [{"address": lab.emitter}]))["result"]
    blocks_f = (await raw(lab.through, "eth_newBlockFilter", []))["result"]
    for i in range(3):
        await mine_block(lab, i, logs=2)  # two logs a block: their order shows
    have: list[dict[str, Any]] = []
    await poll_until(lab.through, fid, have, lambda h: len(h) == 6, "six logs")
    tip, _ = await lab.node.head()
    old = [(await lab.node.block(hex(n)))["hash"] for n in (tip - 1, tip)]
    # the orphaned blocks' logs as anvil served them, oldest block first, in log order
    orphaned = await lab.node.call(
        "eth_getLogs", [{"fromBlock": hex(tip - 1), "toBlock": hex(tip), "address": lab.emitter}]
    )
    assert (
        len(orphaned) == 4 and [lg["blockHash"] for lg in orphaned] == [old[0]] * 2 + [old[1]] * 2
    )
    replaced = [lg for lg in have if lg["blockHash"] in old]
    assert replaced == orphaned

    txs = [
        [{"from": A2, "to": lab.emitter, "data": emitter_data(A0, 7000 + k), "gas": "0x20000"}, k]
        for k in range(2)
    ]
    await lab.node.call("anvil_reorg", [2, txs])
    new = [(await lab.node.block(hex(n)))["hash"] for n in (tip - 1, tip)]
    assert not set(new) & set(old)
    await wait_same_head(lab.through, lab.node, SETTLE_TIMEOUT)

    added = await lab.node.call(
        "eth_getLogs", [{"fromBlock": hex(tip - 1), "toBlock": hex(tip), "address": lab.emitter}]
    )
    assert len(added) == 2
    # geth's order (core/blockchain.go reorg: "Deleted log emission on the API uses forward
    # order"): the orphaned logs, oldest block first and in log order, marked removed; then
    # the new chain's logs
    want = [{**lg, "removed": True} for lg in orphaned] + added
    after: list[dict[str, Any]] = []
    await poll_until(lab.through, fid, after, lambda h: len(h) >= len(want), "removed and new logs")
    assert after == want
    hashes = (await raw(lab.through, "eth_getFilterChanges", [blocks_f]))["result"]
    assert hashes[-2:] == new


# --- expiry ------------------------------------------------------------------------------------
async def test_filter_whose_buffer_fills_up_is_refused_then_gone_and_a_new_one_catches_up(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    extra = "[filters]\nmax_changes = 3\n"
    async with lab_of(anvil_factory, relay_factory, extra=extra) as lab:
        start, _ = await lab.node.head()
        rare = (await raw(lab.through, "eth_newFilter", [{"address": lab.emitter}]))["result"]
        blocks_f = (await raw(lab.through, "eth_newBlockFilter", []))["result"]
        polled = (await raw(lab.through, "eth_newFilter", [{"address": lab.emitter}]))["result"]
        got: list[dict[str, Any]] = []

        def count_is(n: int, have: list[Any]) -> bool:
            return len(have) == n

        for i in range(4):  # four logs and four blocks: one more than either buffer holds
            await mine_block(lab, i)
            await poll_until(lab.through, polled, got, functools.partial(count_is, i + 1), "a log")

        async def overflowed() -> bool:
            return metric(await lab.relay.metrics(), "chainrelay_filters_overflowed_total") == 2

        await until(overflowed, SETTLE_TIMEOUT, "both rarely polled filters to overflow")
        for fid in (rare, blocks_f):
            # Told why (-32005) once, then gone, as a poll of an expired filter is.
            error = (await raw(lab.through, "eth_getFilterChanges", [fid]))["error"]
            assert error["code"] == -32005 and error["data"]["limit"] == "filters.max_changes"
            assert (await raw(lab.through, "eth_getFilterChanges", [fid]))["error"] == (
                FILTER_NOT_FOUND
            )
        # what a client does on "filter not found": reinstall, read what it missed, go on
        again = (await raw(lab.through, "eth_newFilter", [{"address": lab.emitter}]))["result"]
        end, _ = await lab.node.head()
        missed = await lab.node.call(
            "eth_getLogs", [{"fromBlock": hex(start + 1), "toBlock": hex(end)}]
        )
        assert missed == got and len(missed) == 4
        await mine_block(lab, 4)
        fresh: list[dict[str, Any]] = []
        await poll_until(lab.through, again, fresh, lambda h: len(h) == 1, "the next log")
        assert fresh[0]["blockNumber"] == hex(end + 1)
        assert metric(await lab.relay.metrics(), "chainrelay_filters") == 2


async def test_idle_filter_expires(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    idle = 1.0 * SECOND
    extra = f"[filters]\nidle_timeout = {idle}\n"
    async with lab_of(anvil_factory, relay_factory, extra=extra) as lab:
        forgotten = (await raw(lab.through, "eth_newBlockFilter", []))["result"]
        polled = (await raw(lab.through, "eth_newBlockFilter", []))["result"]

        async def only_one_left() -> bool:
            got = await raw(lab.through, "eth_getFilterChanges", [polled])
            assert "result" in got, f"a filter polled every tick expired: {got}"
            return metric(await lab.relay.metrics(), "chainrelay_filters") == 1

        await until(only_one_left, 10 * idle, "the unpolled filter to expire")
        assert metric(await lab.relay.metrics(), "chainrelay_filters_expired_total") >= 1
        got = await raw(lab.through, "eth_getFilterChanges", [forgotten])
        assert got["error"] == FILTER_NOT_FOUND
        assert "result" in await raw(lab.through, "eth_getFilterChanges", [polled])


# --- bad input ---------------------------------------------------------------------------------
BAD = [
    ("eth_newFilter", [{"address": "0x1234"}], "address"),
    ("eth_newFilter", [{"topics": [None, None, None, None, None]}], "topics"),
    ("eth_newFilter", [{"topics": ["0xdead"]}], "topic"),
    ("eth_newFilter", [{"blockHash": "0x" + "ab" * 32, "fromBlock": "0x1"}], "BlockHash"),
    ("eth_newFilter", [{"fromBlock": "pending"}], "pending"),
    ("eth_newFilter", ["latest"], "object"),
    ("eth_newFilter", [], "missing value"),
    ("eth_newFilter", {"address": "0x00"}, "array"),
    ("eth_newBlockFilter", [1], "too many"),
    ("eth_getFilterChanges", [5], "filter id"),
    ("eth_getFilterChanges", [], "missing value"),
    ("eth_getFilterLogs", [["0x1"]], "filter id"),
    ("eth_uninstallFilter", ["0x1", "0x2"], "too many"),
]


@pytest.mark.parametrize("transport", ["http", "ws"])
async def test_bad_params_are_refused_and_the_node_keeps_serving(lab: Lab, transport: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if transport == "http":

            async def ask(method: str, params: Any) -> dict[str, Any]:
                return await lab.through.request(method, params)

        else:
            ws = await stack.enter_async_context(websockets.connect(lab.relay.ws_url))

            async def ask(method: str, params: Any) -> dict[str, Any]:
                body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
                await ws.send(orjson.dumps(body).decode())
                async with asyncio.timeout(5 * SECOND):
                    return dict(orjson.loads(await ws.recv()))

        for method, params, words in BAD:
            got = await ask(method, params)
            assert got["error"]["code"] == -32602, (method, params, got)
            assert words in got["error"]["message"], (method, params, got)
        for method in ("eth_getFilterChanges", "eth_getFilterLogs", "eth_uninstallFilter"):
            got = await ask(method, ["0x" + "ab" * 16])
            want = {"result": False} if method == "eth_uninstallFilter" else {}
            assert got.get("result") is False if want else got["error"] == FILTER_NOT_FOUND
        block_f = (await ask("eth_newBlockFilter", []))["result"]
        assert (await ask("eth_getFilterLogs", [block_f]))["error"] == FILTER_NOT_FOUND
        # still serving: a good filter works end to end over this transport
        fid = (await ask("eth_newFilter", [{"address": lab.emitter}]))["result"]
        await mine_block(lab, 0)

        async def logged() -> bool:
            got = await ask("eth_getFilterChanges", [fid])
            return len(got["result"]) == 1

        await until(logged, SETTLE_TIMEOUT, "a log through a filter installed after bad calls")
        assert (await ask("eth_uninstallFilter", [fid]))["result"] is True


async def test_filters_per_node_are_bounded(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    extra = "[filters]\nmax_filters = 2\n"
    async with lab_of(anvil_factory, relay_factory, extra=extra) as lab:
        first = (await raw(lab.through, "eth_newBlockFilter", []))["result"]
        (await raw(lab.through, "eth_newFilter", [{"address": lab.emitter}]))["result"]
        refused = await raw(lab.through, "eth_newPendingTransactionFilter", [])
        assert refused["error"]["code"] == -32005
        assert "too many filters" in refused["error"]["message"]
        assert (await raw(lab.through, "eth_uninstallFilter", [first]))["result"] is True
        assert "result" in await raw(lab.through, "eth_newPendingTransactionFilter", [])


async def test_filters_per_client_address_are_bounded_over_http_and_websocket(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    # One address may not take every filter of the node: 127.0.0.1 is refused at its own
    # limit while 127.0.0.2 (another loopback address) still installs.
    extra = "[filters]\nmax_filters = 10\nmax_per_ip = 2\n"
    async with (
        lab_of(anvil_factory, relay_factory, extra=extra) as lab,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        ) as session,
        websockets.connect(lab.relay.ws_url) as ws,
    ):
        other = Chain(lab.relay.url, session)

        async def over_ws(method: str, params: list[Any]) -> dict[str, Any]:
            await ws.send(
                orjson.dumps(
                    {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
                ).decode()
            )
            async with asyncio.timeout(5 * SECOND):
                return dict(orjson.loads(await ws.recv()))

        first = (await raw(lab.through, "eth_newBlockFilter", []))["result"]
        assert "result" in await over_ws("eth_newFilter", [{"address": lab.emitter}])
        for refused in (
            await raw(lab.through, "eth_newBlockFilter", []),
            await over_ws("eth_newPendingTransactionFilter", []),
        ):
            assert refused["error"]["code"] == -32005, refused
            assert "per client (its API key, or its address)" in refused["error"]["message"]
        theirs = [(await raw(other, "eth_newBlockFilter", []))["result"] for _ in range(2)]
        assert (await raw(other, "eth_newBlockFilter", []))["error"]["code"] == -32005
        assert metric(await lab.relay.metrics(), "chainrelay_filters") == 4
        # a filter of the other address is not this one's to count
        assert (await raw(lab.through, "eth_uninstallFilter", [theirs[0]]))["result"] is True
        assert (await raw(lab.through, "eth_newBlockFilter", []))["error"]["code"] == -32005
        assert (await raw(lab.through, "eth_uninstallFilter", [first]))["result"] is True
        assert "result" in await over_ws("eth_newBlockFilter", [])


async def test_pending_filter_without_websocket_upstream_says_so(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    async def http_only(anvil: Anvil) -> str:
        return anvil.url

    async with lab_of(anvil_factory, relay_factory, http_only) as lab:
        got = await raw(lab.through, "eth_newPendingTransactionFilter", [])
        assert got["error"]["code"] == -32000, got
        assert "pending transactions are not available" in got["error"]["message"]
        assert metric(await lab.relay.metrics(), "chainrelay_filters") == 0
        # block and log filters need no stream of pending transactions
        fid = (await raw(lab.through, "eth_newBlockFilter", []))["result"]
        await mine_block(lab, 0)
        hashes: list[str] = []
        await poll_until(lab.through, fid, hashes, lambda h: len(h) >= 1, "a block hash")
