"""eth_subscribe through a relay: the same notifications as the node's own, from one head
stream however many clients subscribe, in order across reorgs and dropped upstream streams.

Real anvil, real relays, real clients (web3.py's WebSocket provider and raw websockets).
Notifications are compared byte for byte with anvil's own (the subscription id aside).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import websockets
from web3 import AsyncWeb3, WebSocketProvider
from websockets.asyncio.client import ClientConnection

from chainrelay.devnet import Anvil, deploy_emitter, traffic
from tests.lab.chain import (
    DEV_ACCOUNTS,
    TRANSFER_TOPIC,
    Chain,
    metric,
)
from tests.lab.counting_proxy import start_proxy
from tests.lab.procs import Relay, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
NEW_HEADS = ["newHeads"]
TRANSFER_LOGS = ["logs", {"topics": [TRANSFER_TOPIC]}]
# Mining interval of the streaming tests: 20+ blocks in about ten seconds.
BLOCK_TIME = 0.5
# Heartbeat that keeps heads coming while a relay starts in front of a node that mines
# only when told to (the reorg and cache tests).
HEARTBEAT = 0.2


class Subscriber:
    """One raw WebSocket client; notifications are kept as the bytes that arrived."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.ids = 0
        self.answers: dict[int, dict[str, Any]] = {}
        self.notes: dict[str, list[bytes]] = {}  # subscription id -> notifications
        self._answered = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, **kw: Any) -> AsyncIterator[Subscriber]:
        async with websockets.connect(url, max_size=None, compression=None, **kw) as conn:
            sub = cls(conn)
            try:
                yield sub
            finally:
                sub._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sub._reader

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in self.conn:
                raw = message if isinstance(message, bytes) else message.encode()
                doc = orjson.loads(raw)
                if doc.get("method") == "eth_subscription":
                    self.notes.setdefault(doc["params"]["subscription"], []).append(raw)
                    continue
                async with self._answered:
                    self.answers[doc["id"]] = doc
                    self._answered.notify_all()

    async def call(self, method: str, params: list[Any]) -> dict[str, Any]:
        self.ids += 1
        rid = self.ids
        body = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        await self.conn.send(orjson.dumps(body).decode())
        async with asyncio.timeout(10 * SECOND), self._answered:
            await self._answered.wait_for(lambda: rid in self.answers)
        return self.answers.pop(rid)

    async def subscribe(self, params: list[Any]) -> str:
        answer = await self.call("eth_subscribe", params)
        assert "result" in answer, answer
        self.notes.setdefault(answer["result"], [])
        return str(answer["result"])

    def results(self, sub_id: str) -> list[Any]:
        return [orjson.loads(n)["params"]["result"] for n in self.notes[sub_id]]

    def stripped(self, sub_id: str) -> list[bytes]:
        """The notifications with the subscription id cut out, for byte comparisons."""
        return [n.replace(sub_id.encode(), b"") for n in self.notes[sub_id]]


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


async def start_relay_on_manual_node(
    node: Chain, relay_factory: Callable[..., Awaitable[Relay]], upstreams: list[str], extra: str
) -> Relay:
    """A relay in front of a node that mines on demand: blocks come every HEARTBEAT until
    the relay serves, so its head tracker sees a first head (bounded by the relay's wait)."""
    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            await node.call("evm_mine")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEARTBEAT)

    task = asyncio.create_task(heartbeat())
    try:
        return await relay_factory(upstreams, extra)
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

        pumps = [asyncio.create_task(pump(w)) for w in (via, direct)]
        try:
            await until(
                lambda: all(len(got.get(f"{n}/heads", [])) >= 22 for n in ("via", "direct")),
                30 * SECOND,
                "22 heads through the relay and directly",
            )
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
    both = sorted(set(via_b) & set(direct_b))
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
