"""eth_subscribe through a relay: the same notifications as the node's own, from one head
stream however many clients subscribe, in order across reorgs and dropped upstream streams.

Real anvil, real relays, real clients (web3.py's WebSocket provider and raw websockets).
Notifications are compared byte for byte with anvil's own (the subscription id aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import websockets
from web3 import AsyncWeb3, WebSocketProvider
from websockets.asyncio.client import ClientConnection

from chainrelay.chain.events import HEADER_FIELDS
from chainrelay.devnet import Anvil, deploy_emitter, traffic, transfer_emitter_initcode
from tests.lab.chain import (
    DEV_ACCOUNTS,
    TRANSFER_TOPIC,
    Chain,
    emitter_data,
    metric,
    start_relay_mining,
)
from tests.lab.counting_proxy import start_proxy
from tests.lab.fault_upstream import start_fault_upstream
from tests.lab.procs import Relay, rpc, until
from tests.lab.subscriptions import NEW_HEADS, TRANSFER_LOGS, Subscriber
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
# Mining interval of the streaming tests: 20+ blocks in about ten seconds.
BLOCK_TIME = 0.5


def numbers(heads: list[dict[str, Any]]) -> list[int]:
    return [int(h["number"], 16) for h in heads]


def by_block(notes: list[bytes], key: Callable[[dict[str, Any]], int]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    for n in notes:
        out.setdefault(key(orjson.loads(n)["params"]["result"]), []).append(n)
    return out


def head_number(result: dict[str, Any]) -> int:
    return int(result["number"], 16)


def log_block(result: dict[str, Any]) -> int:
    return int(result["blockNumber"], 16)


def assert_consecutive(heads: list[dict[str, Any]], what: str) -> None:
    got = numbers(heads)
    assert got == list(range(got[0], got[0] + len(got))), f"{what}: gap or duplicate in {got}"


@asynccontextmanager
async def mining(url: str) -> AsyncIterator[None]:
    """Real transfers and Transfer logs in every block while the block runs."""
    stop = asyncio.Event()
    async with Chain.open(url) as node:
        emitter = await deploy_emitter(node.session, url)
    task = asyncio.create_task(
        traffic(url, stop, per_block=4, interval=BLOCK_TIME, emitter=emitter)
    )
    try:
        yield
    finally:
        stop.set()
        await task


# --- the same notifications as the node ------------------------------------------------
async def test_web3_and_raw_subscriptions_match_anvil(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=BLOCK_TIME)
    relay = await relay_factory([anvil.ws_url])
    async with (
        mining(anvil.url),
        AsyncWeb3(WebSocketProvider(relay.ws_url, max_connection_retries=1)) as via,
        AsyncWeb3(WebSocketProvider(anvil.ws_url, max_connection_retries=1)) as direct,
        Subscriber.connect(relay.ws_url) as raw_via,
        Subscriber.connect(anvil.ws_url) as raw_direct,
    ):
        got: dict[str, list[Any]] = {}
        w3_subs: dict[str, tuple[str, str]] = {}  # subscription id -> (client, kind)
        for name, w3 in (("via", via), ("direct", direct)):
            heads_id = await w3.eth.subscribe("newHeads")
            logs_id = await w3.eth.subscribe("logs", {"topics": [TRANSFER_TOPIC]})
            w3_subs[str(heads_id)] = (name, "heads")
            w3_subs[str(logs_id)] = (name, "logs")
        raw_ids = {}
        for name, sub in (("via", raw_via), ("direct", raw_direct)):
            raw_ids[name] = (await sub.subscribe(NEW_HEADS), await sub.subscribe(TRANSFER_LOGS))

        async def pump(w3: AsyncWeb3[Any]) -> None:
            async for msg in w3.socket.process_subscriptions():
                name, kind = w3_subs[str(msg["subscription"])]
                got.setdefault(f"{name}/{kind}", []).append(msg["result"])

        tops: dict[str, int] = {}  # the raw clients' last head both had, once caught up

        def logs_caught_up() -> bool:
            # A head goes out before its block is fetched and its logs after: wait for the
            # relay's logs of every block both sides have the head of.
            top = min(got["via/heads"][-1]["number"], got["direct/heads"][-1]["number"])
            via_n = sum(1 for x in got.get("via/logs", []) if x["blockNumber"] <= top)
            direct_n = sum(1 for x in got.get("direct/logs", []) if x["blockNumber"] <= top)
            raw_heads = [
                raw_via.results(raw_ids["via"][0]),
                raw_direct.results(raw_ids["direct"][0]),
            ]
            if not all(raw_heads):
                return False
            raw_top = tops["raw"] = min(head_number(h[-1]) for h in raw_heads)

            def raw_logs(sub: Subscriber, name: str) -> int:
                return sum(1 for x in sub.results(raw_ids[name][1]) if log_block(x) <= raw_top)

            return via_n >= direct_n and raw_logs(raw_via, "via") >= raw_logs(raw_direct, "direct")

        pumps = [asyncio.create_task(pump(w)) for w in (via, direct)]
        try:
            await until(
                lambda: all(len(got.get(f"{n}/heads", [])) >= 22 for n in ("via", "direct")),
                30 * SECOND,
                "22 heads through the relay and directly",
            )
            await until(logs_caught_up, 10 * SECOND, "the relay's logs of those heads")
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    # web3.py: every head, in order; the same heads and logs as anvil's for the same blocks.
    via_heads, direct_heads = got["via/heads"], got["direct/heads"]
    assert_consecutive([{"number": hex(h["number"])} for h in via_heads], "web3 via the relay")
    common = sorted({h["number"] for h in via_heads} & {h["number"] for h in direct_heads})
    assert len(common) >= 20, f"only {len(common)} heads seen by both"
    pick = [h for h in via_heads if h["number"] in common]
    assert pick == [h for h in direct_heads if h["number"] in common]
    via_logs = [x for x in got["via/logs"] if common[0] <= x["blockNumber"] <= common[-1]]
    direct_logs = [x for x in got["direct/logs"] if common[0] <= x["blockNumber"] <= common[-1]]
    assert len(via_logs) >= 20, f"only {len(via_logs)} Transfer logs in {len(common)} blocks"
    assert via_logs == direct_logs

    # Raw: byte for byte, the subscription id aside.
    (vh, vl), (dh, dl) = raw_ids["via"], raw_ids["direct"]
    assert_consecutive(raw_via.results(vh), "raw via the relay")
    via_b = by_block(raw_via.stripped(vh), head_number)
    direct_b = by_block(raw_direct.stripped(dh), head_number)
    both = sorted(n for n in set(via_b) & set(direct_b) if n <= tops["raw"])
    assert len(both) >= 20
    assert [via_b[n] for n in both] == [direct_b[n] for n in both]
    via_lb = by_block(raw_via.stripped(vl), log_block)
    direct_lb = by_block(raw_direct.stripped(dl), log_block)
    assert [via_lb.get(n) for n in both] == [direct_lb.get(n) for n in both]


# --- one upstream stream for a thousand subscribers -------------------------------------
SUBSCRIBERS = 1000


async def test_a_thousand_subscribers_cost_one_upstream_head_stream(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=BLOCK_TIME)
    proxy = await start_proxy(procs, anvil.url)
    relay = await relay_factory([proxy.ws_url])
    conns: list[ClientConnection] = []
    tasks: list[asyncio.Task[None]] = []
    seen: list[list[bytes]] = [[] for _ in range(SUBSCRIBERS)]

    async def follow(i: int, conn: ClientConnection) -> None:
        await conn.send(
            orjson.dumps(
                {"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe", "params": NEW_HEADS}
            ).decode()
        )
        answer = orjson.loads(await conn.recv(decode=False))
        sub_id = answer["result"].encode()
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in conn:
                raw = message if isinstance(message, bytes) else message.encode()
                seen[i].append(raw.replace(sub_id, b""))

    try:
        async with asyncio.timeout(60 * SECOND):
            for _ in range(SUBSCRIBERS):
                conns.append(await websockets.connect(relay.ws_url, compression=None))
            tasks += [asyncio.create_task(follow(i, c)) for i, c in enumerate(conns)]
            await until(
                lambda: all(len(s) >= 6 for s in seen), 30 * SECOND, "6 heads at every subscriber"
            )
        samples = await relay.metrics()
        assert metric(samples, "chainrelay_subscriptions", kind="newHeads") == SUBSCRIBERS
    finally:
        for c in conns:
            await c.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    counts = await proxy.counts()
    assert counts.get("eth_subscribe") == 1, counts  # the relay's one head stream
    heads = [[orjson.loads(m)["params"]["result"] for m in s] for s in seen]
    for i, h in enumerate(heads):
        assert_consecutive(h, f"subscriber {i}")
    # Everyone got the same bytes for the blocks they all saw.
    first = max(numbers(h)[0] for h in heads)
    last = min(numbers(h)[-1] for h in heads)
    assert last - first >= 3
    want = [m for m, n in zip(seen[0], numbers(heads[0]), strict=True) if first <= n <= last]
    for s, h in zip(seen, heads, strict=True):
        assert [m for m, n in zip(s, numbers(h), strict=True) if first <= n <= last] == want
    # Those blocks are anvil's canonical ones.
    async with Chain.open(anvil.url) as node:
        for m in want:
            result = orjson.loads(m)["params"]["result"]
            assert (await node.block(result["number"]))["hash"] == result["hash"]


# --- reorgs ----------------------------------------------------------------------------
async def test_reorg_retracts_orphaned_logs_then_delivers_the_new_chain(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        emitter = await node.deploy(transfer_emitter_initcode())
        relay = await start_relay_mining(node, relay_factory, [anvil.ws_url])
        async with Subscriber.connect(relay.ws_url) as sub:
            heads = await sub.subscribe(NEW_HEADS)
            logs = await sub.subscribe(TRANSFER_LOGS)
            for i in range(3):
                for sender in (A0, A1):
                    data = emitter_data(A2, 100 + i)
                    await node.send({"from": sender, "to": emitter, "data": data, "gas": "0x20000"})
                await node.call("evm_mine")
            await until(lambda: len(sub.notes[logs]) == 6, 10 * SECOND, "6 logs before the reorg")
            before = sub.results(logs)
            tip = int(before[-1]["blockNumber"], 16)
            old_hashes = {x["blockHash"] for x in before}
            heads_before = len(sub.notes[heads])

            depth = 2
            pairs = []
            for k in range(depth):
                for sender in (A2, A0):
                    data = emitter_data(A1, 9000 + k)
                    tx = {"from": sender, "to": emitter, "data": data, "gas": "0x20000"}
                    pairs.append([tx, k])
            await node.call("anvil_reorg", [depth, pairs])
            replaced = [tip - 1, tip]
            new_logs: list[Any] = []
            for n in replaced:
                new_logs += await node.call(
                    "eth_getLogs", [{"fromBlock": hex(n), "toBlock": hex(n)}]
                )
            assert len(new_logs) == 4 and not {x["blockHash"] for x in new_logs} & old_hashes
            await until(
                lambda: len(sub.notes[logs]) >= 6 + 4 + 4,
                10 * SECOND,
                "the orphaned logs retracted and the new chain's logs",
            )
            await until(
                lambda: len(sub.notes[heads]) >= heads_before + depth, 10 * SECOND, "new heads"
            )
            new_heads = [await node.block(hex(n)) for n in replaced]

    after = sub.results(logs)[6:]
    orphaned = [x for x in before if int(x["blockNumber"], 16) in replaced]
    # geth's order (core/blockchain.go reorg(): "Deleted log emission on the API uses forward
    # order"): oldest orphaned block first, each block's logs in log-index order.
    want_removed = [{**x, "removed": True} for x in orphaned]
    assert [(int(x["blockNumber"], 16), int(x["logIndex"], 16)) for x in want_removed] == sorted(
        (int(x["blockNumber"], 16), int(x["logIndex"], 16)) for x in orphaned
    )
    assert after[:4] == want_removed
    assert after[4:] == new_logs
    assert len(after) == 8
    got_heads = sub.results(heads)[heads_before:]
    assert got_heads[-depth:] == new_heads
    assert {h["hash"] for h in got_heads} & old_hashes == set()


# --- heads ahead of the block's fetch ---------------------------------------------------
async def test_new_heads_go_out_before_the_relay_has_the_blocks_receipts(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    # Every receipts call of the relay waits at the proxy until released (and the relay's
    # later calls on that link behind it), while anvil's head pushes keep flowing.
    proxy = await start_proxy(procs, anvil.url, hold=("eth_getBlockReceipts",))
    async with Chain.open(anvil.url) as node:
        emitter = await node.deploy(transfer_emitter_initcode())
        relay = await start_relay_mining(node, relay_factory, [proxy.ws_url])
        async with Subscriber.connect(relay.ws_url) as sub:
            heads = await sub.subscribe(NEW_HEADS)
            logs = await sub.subscribe(TRANSFER_LOGS)
            for i in range(2):
                data = emitter_data(A2, 100 + i)
                await node.send({"from": A0, "to": emitter, "data": data, "gas": "0x20000"})
            await until(lambda: len(sub.notes[heads]) >= 2, 10 * SECOND, "2 heads, unfetched")

            async def holding() -> bool:
                return await proxy.held() > 0

            await until(holding, 10 * SECOND, "the relay's receipts call held")
            assert sub.notes[logs] == []  # logs need the receipts: none yet
            got = sub.results(heads)
            assert_consecutive(got, "heads ahead of their blocks")
            for h in got:
                assert (await node.block(h["number"]))["hash"] == h["hash"]

            await proxy.release()
            await until(lambda: len(sub.notes[logs]) >= 2, 10 * SECOND, "the logs, once fetched")
            await node.send(
                {"from": A0, "to": emitter, "data": emitter_data(A2, 102), "gas": "0x20000"}
            )
            await until(lambda: len(sub.notes[logs]) >= 3, 10 * SECOND, "the next block's log")
            await until(lambda: len(sub.notes[heads]) >= 3, 10 * SECOND, "the next head")
    got = sub.results(heads)
    assert_consecutive(got, "heads across the held fetch")  # each once: not again when fetched
    log_blocks = [int(x["blockNumber"], 16) for x in sub.results(logs)]
    assert len(log_blocks) == 3 and log_blocks == sorted(set(log_blocks))  # once each, in order
    assert set(log_blocks) <= set(numbers(got))


# --- a dropped upstream stream -----------------------------------------------------------
async def test_upstream_stream_dropped_mid_stream_no_gap_no_duplicate(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=BLOCK_TIME)
    proxy = await start_proxy(procs, anvil.url)
    relay = await relay_factory([proxy.ws_url])
    async with mining(anvil.url), Subscriber.connect(relay.ws_url) as sub:
        heads = await sub.subscribe(NEW_HEADS)
        logs = await sub.subscribe(TRANSFER_LOGS)

        def heads_reach(n: int) -> bool:
            return len(sub.notes[heads]) >= n

        for _ in range(2):
            target = len(sub.notes[heads]) + 3
            await until(functools.partial(heads_reach, target), 10 * SECOND, "3 more heads")
            await proxy.drop_websockets()
        target = len(sub.notes[heads]) + 6
        await until(lambda: len(sub.notes[heads]) >= target, 20 * SECOND, "heads after the drops")
        got = sub.results(heads)[:target]
        async with Chain.open(anvil.url) as node:
            lo, hi = got[0]["number"], got[-1]["number"]
            want = await node.call(
                "eth_getLogs", [{"fromBlock": lo, "toBlock": hi, "topics": [TRANSFER_TOPIC]}]
            )
        # A head goes out before its block is fetched; its logs follow the fetch.
        await until(
            lambda: (
                any(int(x["blockNumber"], 16) > int(hi, 16) for x in sub.results(logs))
                or len(sub.results(logs)) >= len(want)
            ),
            10 * SECOND,
            "the logs of the last head counted",
        )
    counts = await proxy.counts()
    assert counts.get("eth_subscribe", 0) >= 3, "the upstream stream was never dropped"
    assert_consecutive(got, "heads across two dropped upstream streams")
    async with Chain.open(anvil.url) as node:
        for h in got:
            assert (await node.block(h["number"]))["hash"] == h["hash"]
    in_range = [x for x in sub.results(logs) if int(x["blockNumber"], 16) <= int(hi, 16)]
    assert in_range == want  # every log once, in order, none lost in the drops


# --- a slow subscriber -------------------------------------------------------------------
SLOW_SUBSCRIPTIONS = 300
SLOW_CONFIG = "[limits]\nmax_ws_send_buffer = 65536\n\n[subscriptions]\nslow_close_grace = 60.0\n"


async def test_slow_subscriber_is_closed_while_a_fast_one_keeps_up(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=BLOCK_TIME)
    relay = await relay_factory([anvil.ws_url], SLOW_CONFIG)
    # A reader that takes nothing: a tiny receive buffer and a one-message client queue.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.port))
    async with (
        Subscriber.connect(relay.ws_url) as fast,
        websockets.connect(
            relay.ws_url, sock=sock, max_queue=1, compression=None, max_size=None
        ) as slow,
    ):
        fast_heads = await fast.subscribe(NEW_HEADS)
        for i in range(SLOW_SUBSCRIPTIONS):
            body = {"jsonrpc": "2.0", "id": i, "method": "eth_subscribe", "params": NEW_HEADS}
            await slow.send(orjson.dumps(body).decode())
        answered = 0
        async with asyncio.timeout(30 * SECOND):
            while answered < SLOW_SUBSCRIPTIONS:
                message = orjson.loads(await slow.recv())
                if message.get("method") == "eth_subscription":
                    continue  # a head for one answered already: it may come between answers
                assert "result" in message, message
                answered += 1

        async def slow_closed() -> bool:
            m = await relay.metrics()
            return metric(m, "chainrelay_slow_subscriber_disconnects_total") == 1

        await until(slow_closed, 30 * SECOND, "the slow subscriber to be closed")
        m = await relay.metrics()
        assert metric(m, "chainrelay_subscriptions", kind="newHeads") == 1  # the fast one
        target = len(fast.notes[fast_heads]) + 3
        await until(lambda: len(fast.notes[fast_heads]) >= target, 10 * SECOND, "fast heads")
        assert_consecutive(fast.results(fast_heads), "the fast subscriber")
        # The slow reader, once it reads, finds its notifications and then the reason.
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(30 * SECOND):
                while True:
                    await slow.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1013
    assert closed.value.rcvd.reason == "client too slow: send buffer full"


# --- limits and cleanup ------------------------------------------------------------------
NOT_FOUND = {"code": -32000, "message": "subscription not found"}


async def test_anvil_answers_false_where_geth_and_the_relay_say_not_found(
    anvil_factory: Callable[..., Awaitable[Anvil]],
) -> None:
    # The one answer where the relay follows geth (what BSC runs), not anvil.
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Subscriber.connect(anvil.ws_url) as direct:
        assert (await direct.call("eth_unsubscribe", ["0x1"]))["result"] is False


async def test_subscribe_sent_without_an_id_makes_no_subscription(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=BLOCK_TIME)
    relay = await relay_factory([anvil.ws_url], "")
    async with Subscriber.connect(relay.ws_url) as sub:
        note = orjson.dumps({"jsonrpc": "2.0", "method": "eth_subscribe", "params": NEW_HEADS})
        for _ in range(1000):
            await sub.conn.send(note.decode())
        # Messages of one connection are handled in order: by this answer, the 1,000 were.
        mine = await sub.subscribe(NEW_HEADS)
        assert metric(await relay.metrics(), "chainrelay_subscriptions") == 1
        await until(lambda: len(sub.notes[mine]) >= 2, 10 * SECOND, "heads of the real one")
        assert set(sub.notes) == {mine}  # nothing for a subscription nobody was told of
        assert sub.answers == {}  # and no answer to a notification


async def test_pending_subscription_without_a_websocket_upstream_is_refused(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=BLOCK_TIME)
    relay = await relay_factory([anvil.url], "")
    async with Subscriber.connect(relay.ws_url) as sub:
        got = await sub.call("eth_subscribe", ["newPendingTransactions"])
        assert got["error"]["code"] == -32000, got
        assert "not available from this node's upstreams" in got["error"]["message"]
        assert metric(await relay.metrics(), "chainrelay_subscriptions") == 0


async def test_limits_answer_an_error_and_closing_unsubscribes(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=BLOCK_TIME)
    relay = await relay_factory([anvil.ws_url], "[subscriptions]\nmax_per_connection = 3\n")

    async def active() -> float:
        return metric(await relay.metrics(), "chainrelay_subscriptions")

    async with Subscriber.connect(relay.ws_url) as sub, Subscriber.connect(relay.ws_url) as other:
        ids = [await sub.subscribe(p) for p in (NEW_HEADS, TRANSFER_LOGS, NEW_HEADS)]
        assert len(set(ids)) == 3
        # geth's encodeID: 0x and up to 32 hex digits, leading zeros trimmed.
        assert all(re.fullmatch(r"0x(0|[1-9a-f][0-9a-f]{0,31})", i) for i in ids), ids
        over = await sub.call("eth_subscribe", NEW_HEADS)
        assert over["error"]["code"] == -32005, over
        assert "limit exceeded" in over["error"]["message"]
        assert (await sub.call("eth_unsubscribe", [ids[0]]))["result"] is True
        # An unknown id gets geth's error (BSC runs geth); anvil answers false instead.
        assert (await sub.call("eth_unsubscribe", [ids[0]]))["error"] == NOT_FOUND
        assert (await sub.call("eth_unsubscribe", ["0x0"]))["error"] == NOT_FOUND
        # Another connection's subscription is not this one's to cancel.
        theirs = await other.subscribe(NEW_HEADS)
        assert (await sub.call("eth_unsubscribe", [theirs]))["error"] == NOT_FOUND
        ids[0] = await sub.subscribe(NEW_HEADS)
        bad = await sub.call("eth_subscribe", ["logs", {"address": "0x1"}])
        assert bad["error"]["code"] == -32602, bad
        unknown = await sub.call("eth_subscribe", ["newBlocks"])
        assert unknown["error"]["code"] == -32601, unknown
        # The node keeps serving, over this connection and others.
        got = await sub.call("eth_chainId", [])
        assert got["result"] == "0x38"
        assert await active() == 4
        await until(lambda: len(other.notes[theirs]) >= 2, 10 * SECOND, "heads on the other")
    await until(lambda: active_is(relay, 0), 10 * SECOND, "every subscription gone on close")
    # Over HTTP there are no notifications, as on geth.
    http = await rpc(relay.url, "eth_subscribe", NEW_HEADS)
    assert http["error"] == {"code": -32601, "message": "notifications not supported"}


async def active_is(relay: Relay, n: float) -> bool:
    return metric(await relay.metrics(), "chainrelay_subscriptions") == n


async def test_full_pending_transactions_are_the_nodes_own(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    # geth's fullTx flag (web3.py sends it for full transactions): each pending hash read
    # once by the relay, its transaction sent to every such subscriber as the node has it.
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        relay = await start_relay_mining(node, relay_factory, [anvil.ws_url])
        async with Subscriber.connect(relay.ws_url) as a, Subscriber.connect(relay.ws_url) as b:
            full_a = await a.subscribe(["newPendingTransactions", True])
            full_b = await b.subscribe(["newPendingTransactions", True])
            # The upstream pending stream starts with the first subscription: probe until
            # one transaction is announced.
            sent: list[str] = []
            for attempt in range(10):
                sent.append(await node.send({"from": A2, "to": A0, "value": hex(1 + attempt)}))
                with contextlib.suppress(AssertionError):
                    await until(lambda: bool(a.notes[full_a]), SECOND, "a probe announced")
                    break
            else:
                raise AssertionError("the pending stream never announced a transaction")
            sent.append(await node.send({"from": A1, "to": A2, "value": "0x2"}))
            first = a.results(full_a)[0]["hash"]
            want = sent[sent.index(first) :]

            def got(sub: Subscriber, sub_id: str) -> list[str]:
                return [tx["hash"] for tx in sub.results(sub_id)]

            await until(
                lambda: got(a, full_a) == want and got(b, full_b)[-1:] == want[-1:],
                10 * SECOND,
                "every later transaction in full, to both subscribers",
            )
            for tx in a.results(full_a):
                assert tx == await node.call("eth_getTransactionByHash", [tx["hash"]])
                assert tx["blockHash"] is None  # still pending: the node's pending form


# --- the cache warmed by the feed; pending transactions ----------------------------------
async def test_new_blocks_warm_the_cache_and_pending_hashes_stream(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    proxy = await start_proxy(procs, anvil.url)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        emitter = await node.deploy(transfer_emitter_initcode())
        relay = await start_relay_mining(node, relay_factory, [proxy.ws_url])
        async with (
            Subscriber.connect(relay.ws_url) as sub,
            Subscriber.connect(anvil.ws_url) as direct,
            Chain.open(relay.url) as through,
        ):
            heads = await sub.subscribe(NEW_HEADS)
            logs = await sub.subscribe(TRANSFER_LOGS)
            pending = await sub.subscribe(["newPendingTransactions"])
            direct_pending = await direct.subscribe(["newPendingTransactions"])
            await until(lambda: active_is(relay, 3), 5 * SECOND, "three subscriptions")
            # The upstream pending stream starts as the first subscription arrives: a probe
            # sent before it is up is never announced, so probe until one is.

            def announced(probe: str) -> bool:
                return orjson.dumps(probe) in b"".join(sub.notes[pending])

            probe = ""
            for attempt in range(10):
                probe = await node.send({"from": A2, "to": A0, "value": hex(1 + attempt)})
                with contextlib.suppress(AssertionError):
                    await until(
                        functools.partial(announced, probe),
                        SECOND,
                        "a probe announced as pending",
                    )
                    break
            else:
                raise AssertionError("the pending stream never announced a transaction")
            sent = [probe]
            for sender in (A0, A1):
                data = emitter_data(A2, 7)
                sent.append(
                    await node.send({"from": sender, "to": emitter, "data": data, "gas": "0x20000"})
                )
                sent.append(await node.send({"from": sender, "to": A2, "value": "0x2"}))
            await until(
                lambda: all(orjson.dumps(h) in b"".join(sub.notes[pending]) for h in sent),
                10 * SECOND,
                "every sent transaction as pending",
            )
            await node.call("evm_mine")
            n, block_hash = await node.head()
            await until(
                lambda: any(h["hash"] == block_hash for h in sub.results(heads)),
                10 * SECOND,
                "the mined block's head",
            )
            # The head goes out as it is adopted; its logs once the block is fetched, and
            # the cache warmed with it.
            await until(
                lambda: any(x["blockHash"] == block_hash for x in sub.results(logs)),
                10 * SECOND,
                "the mined block's logs",
            )
            await proxy.reset()
            calls: list[tuple[str, list[Any]]] = [
                ("eth_getBlockByNumber", [hex(n), True]),
                ("eth_getBlockByNumber", [hex(n), False]),
                ("eth_getBlockByNumber", ["latest", True]),
                ("eth_getBlockByNumber", ["latest", False]),
                ("eth_getBlockByHash", [block_hash, True]),
                ("eth_getBlockByHash", [block_hash, False]),
                ("eth_getBlockReceipts", [hex(n)]),
                ("eth_getBlockReceipts", ["latest"]),
            ]
            for tx in sent:
                calls += [("eth_getTransactionByHash", [tx]), ("eth_getTransactionReceipt", [tx])]
            m0 = await relay.metrics()
            for method, params in calls:
                # The same body (the same id) to both: the answers' bytes must be the same.
                assert await through.raw(method, params) == await node.raw(method, params), (
                    method,
                    params,
                )
            m1 = await relay.metrics()
            counts = await proxy.counts()
    hits = metric(m1, "chainrelay_requests_total", outcome="hit") - metric(
        m0, "chainrelay_requests_total", outcome="hit"
    )
    assert hits == len(calls)
    assert not set(counts) & {m for m, _ in calls}, counts  # nothing asked upstream
    # The pending hashes are anvil's own stream, in its order.
    direct_seen = [h for h in direct.results(direct_pending) if h in sent]
    assert [h for h in sub.results(pending) if h in sent] == direct_seen == sent


# --- skipped numbers -----------------------------------------------------------------------
async def test_heads_the_upstream_skipped_are_delivered_in_order(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        # Over HTTP the relay polls: a burst of blocks between two polls is a jump of heads.
        relay = await start_relay_mining(node, relay_factory, [anvil.url])
        async with (
            Subscriber.connect(relay.ws_url) as sub,
            Subscriber.connect(anvil.ws_url) as direct,
        ):
            heads = await sub.subscribe(NEW_HEADS)
            direct_heads = await direct.subscribe(NEW_HEADS)
            start, _ = await node.head()
            for burst in (7, 1, 12):
                await node.call("anvil_mine", [hex(burst)])
            tip, _ = await node.head()
            await until(
                lambda: bool(sub.notes[heads]) and numbers(sub.results(heads))[-1] == tip,
                10 * SECOND,
                "the last head of the bursts",
            )
            await until(lambda: bool(direct.notes[direct_heads]), 10 * SECOND, "anvil's heads")
            got = sub.results(heads)
            # A heartbeat block mined as the relay started may come first.
            want = [await node.block(hex(n)) for n in numbers(got)]
    assert_consecutive(got, "heads across bursts")
    assert numbers(got)[0] <= start + 1  # the bursts' blocks, not only their last heads
    # Polled heads carry geth's newHeads form (what BSC nodes send: the header, keys
    # sorted), never the block. Anvil's own newHeads is its whole light block
    # (transactions, uncles, size, totalDifficulty, withdrawals too): a pushed payload is
    # passed on as pushed, but none was pushed here.
    assert got == [{k: b[k] for k in HEADER_FIELDS if k in b} for b in want]
    assert all(list(h) == sorted(h) for h in got)
    anvils = set(direct.results(direct_heads)[0])
    assert set(got[0]) < anvils
    assert {"transactions", "uncles", "size", "totalDifficulty"} <= anvils - set(got[0])


# --- one block never stops the feed ----------------------------------------------------------
async def test_receipts_errors_from_a_fake_upstream_fall_back_to_logs_by_block_hash(
    procs: Any,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    # A node that answers -32000 to every eth_getBlockReceipts (anvil cannot be made to).
    fake = await start_fault_upstream(procs, "receipts_error", anvil.url)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        emitter = await node.deploy(transfer_emitter_initcode())
        relay = await start_relay_mining(node, relay_factory, [fake.url])
        async with Subscriber.connect(relay.ws_url) as sub:
            logs = await sub.subscribe(TRANSFER_LOGS)
            mined: list[str] = []
            for amount in (3, 4):
                for sender in (A0, A1):
                    data = emitter_data(A2, amount)
                    tx = {"from": sender, "to": emitter, "data": data, "gas": "0x20000"}
                    await node.send(tx)
                await node.call("evm_mine")
                mined.append((await node.head())[1])
            await until(
                lambda: {x["blockHash"] for x in sub.results(logs)} >= set(mined),
                10 * SECOND,
                "the logs of both blocks",
            )
            want = []
            for block_hash in mined:
                want += await node.call(
                    "eth_getLogs", [{"blockHash": block_hash, "topics": [TRANSFER_TOPIC]}]
                )
        m = await relay.metrics()
    got = [x for x in sub.results(logs) if x["blockHash"] in mined]
    assert got == want and len(got) == 4
    assert await fake.fault_calls() >= 2  # each block's receipts were asked, and failed
    assert metric(m, "chainrelay_block_feed_problems_total", problem="receipts_fallback") >= 2
