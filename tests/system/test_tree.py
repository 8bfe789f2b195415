"""The relay tree on loopback: what an origin, its relays and their leaves serve.

Real processes: anvil (chain id 56, blocks with transfers and Transfer logs), chainrelay
nodes in their tree roles (an origin holding a key and following anvil; relays and leaves
fed only by their parents' frames, with their parents' JSON-RPC as upstreams), and real
clients (web3.py over HTTP and WebSocket, raw websockets, the subscriber library).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets
from eth_account import Account
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3, WebSocketProvider
from websockets.asyncio.client import ClientConnection

from chainrelay.chain.events import HEADER_FIELDS
from chainrelay.clients.subscriber import FeedBlock, Subscription
from chainrelay.devnet import Anvil, deploy_emitter, traffic, transfer_emitter_initcode
from chainrelay.tree import frame as feedframe
from chainrelay.tree.session import Want, encode_hello
from tests.lab.chain import (
    DEV_ACCOUNTS,
    Chain,
    emitter_data,
    heartbeat,
    metric,
    wait_same_head,
)
from tests.lab.counting_proxy import start_proxy
from tests.lab.procs import ROOT, Procs, Relay, until
from tests.lab.subscriptions import NEW_HEADS, TRANSFER_LOGS, Subscriber
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS

ORIGIN_KEY = "0x" + "11" * 32
ORIGIN_ADDRESS = Account.from_key(ORIGIN_KEY).address
OTHER_KEY = "0x" + "22" * 32
OTHER_ADDRESS = Account.from_key(OTHER_KEY).address
STREAM = "bsc/blocks"
# Mining interval: a dozen blocks in a few seconds, each with a few transactions.
BLOCK_TIME = 0.5
NODE_START_TIMEOUT = 20 * SECOND
# Long enough for a frame to cross three processes on a loaded two-core machine.
HOP_TIMEOUT = 10 * SECOND


def node_config(
    *,
    region: str,
    key: str = "",
    trust: Sequence[str] = (),
    parents: Sequence[tuple[str, Relay]] = (),
    rpcs: Sequence[str] = (),
    upstreams: Sequence[str] = (),
    tree_extra: str = "",
) -> str:
    """A tree node's config; ``{listen}`` is filled in by ``Relay``. ``rpcs``: the
    parents' JSON-RPC endpoints, in order, where not the parent's own (a proxy)."""
    lines = ["[server]", 'listen = "{listen}"', 'admin_listen = ""']
    lines += ["", "[tree]", f'region = "{region}"']
    if key:
        lines.append(f'key = "{key}"')
    if trust:
        lines.append("trust = [" + ", ".join(f'"{a}"' for a in trust) + "]")
    if tree_extra:
        lines.append(tree_extra)
    for name, parent in parents:
        # Each parent a region of its own: the k=2 nearest in distinct regions are linked.
        lines += [
            "",
            "[[tree.parents]]",
            f'name = "{name}"',
            f'region = "{name}"',
            f'url = "{parent.ws_url}/feed"',
        ]
    for i, url in enumerate(rpcs):
        at = lines.index(f'url = "{parents[i][1].ws_url}/feed"')
        lines.insert(at + 1, f'rpc = "{url}"')
    for i, url in enumerate(upstreams):
        lines += ["", "[[upstreams]]", f'name = "u{i}"', f'url = "{url}"']
    return "\n".join(lines) + "\n"


class Tree:
    """Starts tree nodes as processes of ``procs``; each is healthy when returned."""

    def __init__(self, procs: Procs, tmp: Path) -> None:
        self.procs = procs
        self.tmp = tmp

    async def node(self, name: str, config: str) -> Relay:
        node = Relay(self.procs, config, self.tmp, name)
        node.start()
        try:
            await node.wait_ready(NODE_START_TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}\n{node.log_path.read_text()[-3000:]}") from None
        return node

    async def origin(
        self, anvil: Anvil, key: str = ORIGIN_KEY, name: str = "origin", tree_extra: str = ""
    ) -> Relay:
        config = node_config(region=name, key=key, upstreams=[anvil.ws_url], tree_extra=tree_extra)
        return await self.node(name, config)

    async def child(
        self,
        name: str,
        parents: Sequence[Relay],
        trust: Sequence[str] = (ORIGIN_ADDRESS,),
        tree_extra: str = "",
        rpcs: Sequence[str] = (),
    ) -> Relay:
        named = [(f"{name}-p{i}", p) for i, p in enumerate(parents)]
        config = node_config(
            region=name, trust=trust, parents=named, rpcs=rpcs, tree_extra=tree_extra
        )
        return await self.node(name, config)


@pytest.fixture
def tree(procs: Procs, tmp_path: Path) -> Tree:
    return Tree(procs, tmp_path)


@asynccontextmanager
async def mining(url: str) -> AsyncIterator[str]:
    """Transfers and Transfer logs in every block while the ``async with`` body runs;
    yields the emitter's address."""
    stop = asyncio.Event()
    async with Chain.open(url) as node:
        emitter = await deploy_emitter(node.session, url)
    task = asyncio.create_task(
        traffic(url, stop, per_block=4, interval=BLOCK_TIME, emitter=emitter)
    )
    try:
        yield emitter
    finally:
        stop.set()
        await task


async def head_number(url: str) -> int:
    async with Chain.open(url) as c:
        return (await c.head())[0]


async def wait_head(node: Relay, number: int, timeout: float = HOP_TIMEOUT) -> None:
    async def reached() -> bool:
        return await head_number(node.url) >= number

    await until(reached, timeout, f"{node.log_path.name} to reach block {number}")


def frames(samples: dict[str, float], outcome: str) -> float:
    return metric(samples, "chainrelay_feed_frames_total", stream=STREAM, outcome=outcome)


def addr(address: str) -> bytes:
    return bytes.fromhex(address[2:])


async def rpc_get(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return orjson.loads(await r.read())


@asynccontextmanager
async def web3_http(url: str) -> AsyncIterator[AsyncWeb3[Any]]:
    """web3.py over HTTP to ``url``, its provider's session closed on the way out."""
    w3 = AsyncWeb3(AsyncHTTPProvider(url))
    try:
        yield w3
    finally:
        await w3.provider.disconnect()


@asynccontextmanager
async def feed_client(
    node: Relay, want: Want
) -> AsyncIterator[tuple[dict[str, Any], ClientConnection]]:
    """A raw feed session on ``node``: the hello sent, the welcome read."""
    async with websockets.connect(node.ws_url + "/feed", max_size=None, compression=None) as conn:
        await conn.send(encode_hello([want]).decode())
        async with asyncio.timeout(HOP_TIMEOUT):
            welcome = orjson.loads(await conn.recv())
        assert welcome.get("type") == "welcome", welcome
        yield welcome, conn


async def newest(node: Relay) -> int | None:
    """The newest position in ``node``'s backlog of STREAM, as its welcome tells."""
    async with feed_client(node, Want(STREAM)) as (welcome, _conn):
        got = welcome["streams"][0]["newest"]
    return None if got is None else int(got)


async def newest_is(node: Relay, position: int) -> bool:
    return await newest(node) == position


async def next_frame(conn: ClientConnection) -> feedframe.Frame:
    async with asyncio.timeout(HOP_TIMEOUT):
        raw = await conn.recv()
    assert isinstance(raw, bytes), f"a control message where a frame was due: {raw!r}"
    return feedframe.decode(raw, len(raw))


# The reads a dapp makes about a recent block; the leaf's frames warm each of them.
BLOCK_READS = (
    "eth_getBlockByNumber",
    "eth_getBlockByHash",
    "eth_getTransactionByHash",
    "eth_getTransactionReceipt",
    "eth_getBlockReceipts",
)


def outcomes(samples: dict[str, float], method: str) -> dict[str, float]:
    """``chainrelay_requests_total`` of ``method`` by outcome."""
    out: dict[str, float] = {}
    prefix = f'chainrelay_requests_total{{method="{method}",outcome="'
    for key, value in samples.items():
        if key.startswith(prefix):
            out[key[len(prefix) : -2]] = value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


# --- 1: what a leaf serves is what anvil serves, from frames alone --------------------
async def test_leaf_serves_what_anvil_serves_from_frames(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree, procs: Procs
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=BLOCK_TIME)
    async with mining(anvil.url) as emitter:
        origin = await tree.origin(anvil)
        relay = await tree.child("relay", [origin])
        # The leaf's JSON-RPC calls to its parent pass a proxy that counts them by method.
        proxy = await start_proxy(procs, relay.url)
        leaf = await tree.child("leaf", [relay], rpcs=[proxy.url])
        first = await head_number(anvil.url) + 1
        last = first + 5
        # Two blocks past: a read racing the newest block's warming may go upstream (the
        # block follower's documented price), and this test is about what frames warmed.
        await wait_head(leaf, last + 2)
    # Each provider holds an aiohttp session: left open, it surfaces as an unraisable
    # warning in whichever test the garbage collector happens to run.
    async with web3_http(leaf.url) as w3_leaf, web3_http(anvil.url) as w3_anvil:
        await proxy.reset()
        before = await leaf.metrics()
        asked = dict.fromkeys(BLOCK_READS, 0)
        logs = 0
        for n in range(first, last + 1):
            for full in (False, True):
                got = await w3_leaf.eth.get_block(n, full)
                assert got == await w3_anvil.eth.get_block(n, full), f"block {n} full={full}"
                asked["eth_getBlockByNumber"] += 1
            block = await w3_anvil.eth.get_block(n, True)
            assert await w3_leaf.eth.get_block(block["hash"], True) == block
            asked["eth_getBlockByHash"] += 1
            for tx in block["transactions"]:
                assert not isinstance(tx, HexBytes), "full transactions, not their hashes"
                h = tx["hash"]
                assert await w3_leaf.eth.get_transaction(h) == await w3_anvil.eth.get_transaction(h)
                got_receipt = await w3_leaf.eth.get_transaction_receipt(h)
                assert got_receipt == await w3_anvil.eth.get_transaction_receipt(h)
                asked["eth_getTransactionByHash"] += 1
                asked["eth_getTransactionReceipt"] += 1
            receipts = await w3_anvil.eth.get_block_receipts(n)
            assert await w3_leaf.eth.get_block_receipts(n) == receipts
            asked["eth_getBlockReceipts"] += 1
            logs += sum(len(r["logs"]) for r in receipts)
        after = await leaf.metrics()
        assert asked["eth_getTransactionByHash"] >= 6 and logs >= 3, f"{asked}, {logs} logs"
        for method, n in asked.items():
            # A hit is answered from the cache, with no upstream I/O (the cache-hit path).
            # chainrelay_upstream_calls_total is no measure of this: it also counts the head
            # tracker's finality refreshes (two calls every FINALITY_REFRESH_BLOCKS blocks).
            counted = delta(outcomes(after, method), outcomes(before, method))
            assert counted == {"hit": n}, f"{method}: {counted} for {n} reads"

        # Logs: answered from the blocks the leaf's frames delivered.
        flts: list[Any] = [
            {"fromBlock": first, "toBlock": last},
            {"fromBlock": first, "toBlock": last, "address": to_checksum_address(emitter)},
            {"blockHash": (await w3_anvil.eth.get_block(last))["hash"]},
        ]
        for flt in flts:
            assert await w3_leaf.eth.get_logs(flt) == await w3_anvil.eth.get_logs(flt), flt
        # None of those reads reached the parent (the head tracker's own calls aside: it asks
        # for blocks by number and hash, never for these).
        counts = await proxy.counts()
        for method in (*BLOCK_READS[2:], "eth_getLogs"):
            assert counts.get(method, 0) == 0, f"the leaf asked its parent: {counts}"


# --- 2: a reorg at the origin's node reaches the leaf -----------------------------------
async def test_reorg_at_the_origin_reaches_the_leaf(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        emitter = await node.deploy(transfer_emitter_initcode())
        async with heartbeat(node):
            origin = await tree.origin(anvil)
            relay = await tree.child("relay", [origin])
            leaf = await tree.child("leaf", [relay])
        async with Chain.open(leaf.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
        reorgs_before = metric(await leaf.metrics(), "chainrelay_reorgs_total")
        first = await head_number(anvil.url) + 1
        async with (
            Subscriber.connect(leaf.ws_url) as sub,
            Subscription(
                leaf.ws_url + "/feed", STREAM, from_block=first, trust=[ORIGIN_ADDRESS]
            ) as feed,
        ):
            # A feed subscriber on the leaf too: the new blocks come as reorgs.
            feed_blocks: list[FeedBlock] = []

            async def follow_feed() -> None:
                async for b in feed:
                    feed_blocks.append(b)

            follower = asyncio.create_task(follow_feed())
            heads = await sub.subscribe(NEW_HEADS)
            logs = await sub.subscribe(TRANSFER_LOGS)
            for i in range(3):
                for sender in (A0, A1):
                    data = emitter_data(A2, 100 + i)
                    await node.send({"from": sender, "to": emitter, "data": data, "gas": "0x20000"})
                await node.call("evm_mine")
            await until(lambda: len(sub.notes[logs]) == 6, HOP_TIMEOUT, "6 logs before the reorg")
            await until(lambda: len(sub.notes[heads]) == 3, HOP_TIMEOUT, "3 heads before the reorg")
            before = sub.results(logs)
            tip = int(before[-1]["blockNumber"], 16)
            old_blocks = {n: await node.block(hex(n), True) for n in (tip - 1, tip)}

            depth = 2
            pairs = []
            for k in range(depth):
                for sender in (A2, A0):
                    data = emitter_data(A1, 9000 + k)
                    tx = {"from": sender, "to": emitter, "data": data, "gas": "0x20000"}
                    pairs.append([tx, k])
            await node.call("anvil_reorg", [depth, pairs])
            new_blocks = {n: await node.block(hex(n), True) for n in old_blocks}
            new_logs: list[Any] = []
            for n in old_blocks:
                new_logs += await node.call(
                    "eth_getLogs", [{"fromBlock": hex(n), "toBlock": hex(n)}]
                )
            old_hashes = {b["hash"] for b in old_blocks.values()}
            assert len(new_logs) == 4 and not {x["blockHash"] for x in new_logs} & old_hashes

            async with Chain.open(leaf.url) as through:
                await wait_same_head(through, node, HOP_TIMEOUT)
                for n, want in new_blocks.items():
                    for full in (True, False):
                        got = await through.block(hex(n), full)
                        assert got["hash"] == want["hash"], f"block {n}: the stale one"
                    assert await through.block(hex(n), True) == want
                    by_hash = await through.call("eth_getBlockByHash", [want["hash"], True])
                    assert by_hash == want
                    receipts = await through.call("eth_getBlockReceipts", [hex(n)])
                    assert receipts == await node.call("eth_getBlockReceipts", [hex(n)])
                # The replaced blocks' transactions: as anvil has them now, not as they were.
                for x in before[2:]:
                    h = x["transactionHash"]
                    for method in ("eth_getTransactionReceipt", "eth_getTransactionByHash"):
                        assert await through.call(method, [h]) == await node.call(method, [h])
                flt = {"fromBlock": hex(tip - 2), "toBlock": hex(tip)}
                got_logs = await through.call("eth_getLogs", [flt])
                assert got_logs == await node.call("eth_getLogs", [flt])
            await until(
                lambda: len(sub.notes[logs]) >= 6 + 4 + 4,
                HOP_TIMEOUT,
                "the orphaned logs retracted and the new chain's logs",
            )
            await until(
                lambda: sub.results(heads)[-1]["hash"] == new_blocks[tip]["hash"],
                HOP_TIMEOUT,
                "the new head",
            )
            await until(
                lambda: bool(feed_blocks) and feed_blocks[-1].hash == new_blocks[tip]["hash"],
                HOP_TIMEOUT,
                "the new head's block from the leaf's feed",
            )
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        reorgs_after = metric(await leaf.metrics(), "chainrelay_reorgs_total")

    after = sub.results(logs)[6:]
    orphaned = [x for x in before if int(x["blockNumber"], 16) in old_blocks]
    assert after[:4] == [{**x, "removed": True} for x in orphaned]
    assert after[4:] == new_logs
    assert len(after) == 8
    # After the old chain's heads, the new chain's, in order, each once.
    got_heads = sub.results(heads)[3:]
    assert [h["hash"] for h in got_heads] == [new_blocks[n]["hash"] for n in sorted(new_blocks)]
    assert reorgs_after == reorgs_before + 1
    # The feed: blocks from the first mined after it connected, then the new chain's.
    feed_seen = [(b.number, b.hash, b.reorg, b.verified) for b in feed_blocks]
    old_chain = [(n, b["hash"], False, True) for n, b in sorted(old_blocks.items())]
    assert feed_seen[-4:] == [
        *old_chain,
        *((n, b["hash"], True, True) for n, b in sorted(new_blocks.items())),
    ]
    assert [b.number for b in feed_blocks[:-2]] == list(range(first, tip + 1))


# --- 3: two origins, one relay: each block once ----------------------------------------
async def test_two_origins_each_block_accepted_once_and_forwarded_once(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    both = (ORIGIN_ADDRESS, OTHER_ADDRESS)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        async with heartbeat(node):
            first_origin = await tree.origin(anvil, ORIGIN_KEY, "origin-a")
            second_origin = await tree.origin(anvil, OTHER_KEY, "origin-b")
        # One block both origins follow (an origin publishes the blocks that come after its
        # start); then the chain is quiet up to the blocks under test: the relay's links
        # replay what the origins hold, once, and nothing else comes until those blocks.
        await node.call("evm_mine")
        tip = await head_number(anvil.url)
        for o in (first_origin, second_origin):
            await until(
                functools.partial(newest_is, o, tip), HOP_TIMEOUT, f"{o.log_path.name} at {tip}"
            )
        relay = await tree.child("relay", [first_origin, second_origin], trust=both)
        leaf = await tree.child("leaf", [relay], trust=both)

        async def linked() -> bool:
            # Each origin has said welcome to the relay, and the leaf holds the tip.
            for o in (first_origin, second_origin):
                children = metric(await o.metrics(), "chainrelay_feed_children", stream=STREAM)
                if children != 1:
                    return False
            return await head_number(leaf.url) == tip

        await until(linked, HOP_TIMEOUT, "the relay linked to both origins, the leaf at the tip")
        r0, f0 = await relay.metrics(), await leaf.metrics()
        start = await head_number(anvil.url) + 1
        async with feed_client(relay, Want(STREAM, from_position=start)) as (_welcome, conn):
            blocks = 5
            for i in range(blocks):
                await node.send({"from": A0, "to": A1, "value": hex(1 + i)})
                await node.call("evm_mine")

            async def through(n: int) -> bool:
                r, f = await relay.metrics(), await leaf.metrics()
                return (
                    frames(r, "accepted") - frames(r0, "accepted") == n
                    and frames(r, "duplicate") - frames(r0, "duplicate") == n
                    and frames(f, "accepted") - frames(f0, "accepted") == n
                )

            await until(
                lambda: through(blocks), HOP_TIMEOUT, f"{blocks} blocks, twice, at the relay"
            )
            got = [await next_frame(conn) for _ in range(blocks)]
            # One more block: the frame after the five is its own, no second copy of any,
            # and the counts move by one block each.
            await node.call("evm_mine")
            got.append(await next_frame(conn))
            await until(lambda: through(blocks + 1), HOP_TIMEOUT, "one more block")
        r1, f1 = await relay.metrics(), await leaf.metrics()
    assert frames(r1, "accepted") - frames(r0, "accepted") == blocks + 1
    assert frames(r1, "duplicate") - frames(r0, "duplicate") == blocks + 1
    assert frames(f1, "accepted") - frames(f0, "accepted") == blocks + 1
    assert frames(f1, "duplicate") == frames(f0, "duplicate")
    assert [f.position for f in got] == list(range(start, start + blocks + 1))
    async with Chain.open(anvil.url) as node:
        for f in got:
            assert "0x" + f.identity.hex() == (await node.block(hex(f.position)))["hash"]
    assert {feedframe.signer(f) for f in got} <= {addr(a) for a in both}


# --- 4: an untrusted origin ---------------------------------------------------------------
async def test_untrusted_origin_frames_are_counted_never_forwarded_nor_served(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    # The untrusted origin follows a chain of its own (the same chain id, other blocks):
    # were its frames taken in, the relay would serve blocks anvil never made.
    anvil = await anvil_factory(chain_id=56, block_time=None)
    rogue_anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node, Chain.open(rogue_anvil.url) as rogue_node:
        for chain in (node, rogue_node):
            await chain.call("evm_setAutomine", [False])
        await rogue_node.send({"from": A2, "to": A1, "value": hex(77)})
        async with heartbeat(node), heartbeat(rogue_node):
            origin = await tree.origin(anvil)
            rogue = await tree.origin(rogue_anvil, OTHER_KEY, "rogue")
            config = node_config(
                region="relay",
                trust=[ORIGIN_ADDRESS],
                parents=[("origin", origin), ("rogue", rogue)],
                upstreams=[origin.url],
            )
            relay = await tree.node("relay", config)
        # Both chains at the same height: from here on, each block of one has a rival of
        # the same number on the other.
        behind = await head_number(anvil.url) - await head_number(rogue_anvil.url)
        if behind:
            await (rogue_node if behind > 0 else node).call("anvil_mine", [hex(abs(behind))])

        async def rogue_linked() -> bool:
            return frames(await relay.metrics(), "untrusted") > 0

        await until(rogue_linked, HOP_TIMEOUT, "the rogue origin's frames at the relay")
        async with Chain.open(relay.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
        r0 = await relay.metrics()
        start = await head_number(anvil.url) + 1
        async with feed_client(relay, Want(STREAM, from_position=start)) as (_welcome, conn):
            blocks = 4
            for i in range(blocks):
                await node.send({"from": A0, "to": A1, "value": hex(1 + i)})
                await node.call("evm_mine")
                await rogue_node.send({"from": A2, "to": A0, "value": hex(100 + i)})
                await rogue_node.call("evm_mine")
            got = [await next_frame(conn) for _ in range(blocks)]

            async def rogue_counted() -> bool:
                r = await relay.metrics()
                return frames(r, "untrusted") - frames(r0, "untrusted") >= blocks

            await until(rogue_counted, HOP_TIMEOUT, f"{blocks} untrusted frames counted")
            # The frame after them is the next trusted block: no rogue frame went out.
            await rogue_node.call("evm_mine")
            await node.call("evm_mine")
            got.append(await next_frame(conn))
        assert [f.position for f in got] == list(range(start, start + blocks + 1))
        assert {feedframe.signer(f) for f in got} == {addr(ORIGIN_ADDRESS)}
        async with Chain.open(relay.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
            r1 = await relay.metrics()
            for n in range(start, start + blocks + 1):
                want = await node.block(hex(n), True)
                assert (await rogue_node.block(hex(n)))["hash"] != want["hash"]
                assert await through.block(hex(n), True) == want
        assert frames(r1, "accepted") - frames(r0, "accepted") == blocks + 1
        assert metric(r1, "chainrelay_reorgs_total") == metric(r0, "chainrelay_reorgs_total")
        health = await rpc_get(relay.url + "/health")
        assert health["status"] == "ok", health
        tree_state = health["tree"]
        assert tree_state["origin"] is False and tree_state["children"] >= 0
        assert tree_state["streams"][STREAM] >= start + blocks
        assert len(tree_state["parents"]) == 2  # the trusted origin and the rogue one


# --- 5: a child far behind the backlog backfills over JSON-RPC --------------------------
async def test_child_far_behind_the_backlog_backfills_over_json_rpc(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree, procs: Procs
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    backlog = 5
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        async with heartbeat(node):
            origin = await tree.origin(anvil)
            relay = await tree.child("relay", [origin], tree_extra=f"backlog_frames = {backlog}")
        start = await head_number(anvil.url) + 1
        blocks = 2 * backlog
        for i in range(blocks):
            await node.send({"from": A0, "to": A1, "value": hex(1 + i)})
            await node.call("evm_mine")
        tip = start + blocks - 1
        async with Chain.open(relay.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
        want = {n: (await node.block(hex(n)))["hash"] for n in range(start, tip + 1)}

        async with feed_client(relay, Want(STREAM, from_position=start)) as (welcome, conn):
            oldest = tip - backlog + 1
            assert welcome["streams"] == [
                {"stream": STREAM, "oldest": oldest, "newest": tip, "gap": [start, oldest]}
            ]
            # Then the backlog, from its oldest frame on.
            assert [(await next_frame(conn)).position for _ in range(backlog)] == list(
                range(oldest, tip + 1)
            )

        got: list[FeedBlock] = []
        async with Subscription(
            relay.ws_url + "/feed", STREAM, from_block=start, trust=[ORIGIN_ADDRESS]
        ) as sub:
            delivered = aiter(sub)
            async with asyncio.timeout(HOP_TIMEOUT):
                while not got or got[-1].number < tip:
                    got.append(await anext(delivered))
            # Live past the backlog: the next block comes as a verified frame.
            await node.send({"from": A0, "to": A1, "value": hex(99)})
            await node.call("evm_mine")
            async with asyncio.timeout(HOP_TIMEOUT):
                got.append(await anext(delivered))
        live = (await node.block(hex(tip + 1)))["hash"]
        assert [b.number for b in got] == list(range(start, tip + 2))
        assert [b.hash for b in got] == [*want.values(), live]
        assert [b.verified for b in got] == [n >= oldest for n in range(start, tip + 2)]
        assert all(b.tx_count == 1 for b in got)
        assert sub.backfilled == oldest - start and not sub.dropped

        # The command line does the same, a JSON line per block.
        cli = procs.spawn(
            [
                sys.executable,
                "-m",
                "chainrelay",
                "subscribe",
                relay.ws_url + "/feed",
                "--stream",
                STREAM,
                "--from",
                str(start),
                "--trust",
                ORIGIN_ADDRESS,
                "--count",
                str(tip + 2 - start),
                "--max-seconds",
                str(HOP_TIMEOUT),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        out, err = await asyncio.to_thread(cli.communicate, timeout=2 * HOP_TIMEOUT)
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert cli.returncode == 0, err
    # The relay's backlog has moved on by the live block: one more backfilled.
    assert [(x["number"], x["hash"], x["verified"]) for x in lines] == [
        (b.number, b.hash, b.number > tip + 1 - backlog) for b in got
    ], err


# --- 6: newHeads on a leaf, as a plain Ethereum client ----------------------------------
async def test_leaf_new_heads_every_head_once_in_order_with_anvils_values(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        async with heartbeat(node):
            origin = await tree.origin(anvil)
            relay = await tree.child("relay", [origin])
            leaf = await tree.child("leaf", [relay])
        async with Chain.open(leaf.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
        heads: dict[str, list[Any]] = {"leaf": [], "anvil": []}
        async with (
            AsyncWeb3(WebSocketProvider(leaf.ws_url, max_connection_retries=1)) as via,
            AsyncWeb3(WebSocketProvider(anvil.ws_url, max_connection_retries=1)) as direct,
        ):

            async def pump(w3: AsyncWeb3[Any], name: str) -> None:
                async for msg in w3.socket.process_subscriptions():
                    heads[name].append(msg["result"])

            await via.eth.subscribe("newHeads")
            await direct.eth.subscribe("newHeads")
            pumps = [asyncio.create_task(pump(w, n)) for w, n in ((via, "leaf"), (direct, "anvil"))]
            try:
                start = await head_number(anvil.url) + 1
                blocks = 8
                for i in range(blocks):
                    await node.send({"from": A0, "to": A1, "value": hex(1 + i)})
                    await node.call("evm_mine")
                await until(
                    lambda: len(heads["leaf"]) >= blocks and len(heads["anvil"]) >= blocks,
                    HOP_TIMEOUT,
                    f"{blocks} heads at the leaf and at anvil",
                )
                # One more: had any head come twice, it would be in the leaf's list by now.
                await node.call("evm_mine")
                await until(
                    lambda: len(heads["leaf"]) > blocks and len(heads["anvil"]) > blocks,
                    HOP_TIMEOUT,
                    "the last head",
                )
            finally:
                for t in pumps:
                    t.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
    numbers = [h["number"] for h in heads["leaf"]]
    assert numbers == list(range(start, start + blocks + 1))
    # anvil's newHeads is its whole block; a frame's head goes out in geth's header form
    # (what BSC nodes send), with anvil's values.
    for mine, theirs in zip(heads["leaf"], heads["anvil"], strict=True):
        assert dict(mine) == {k: v for k, v in theirs.items() if k in HEADER_FIELDS}


# --- 7: a parent restarts while blocks pass its backlog ----------------------------------
async def test_leaf_fills_blocks_missed_while_its_parent_restarted(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    backlog = 3
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        async with heartbeat(node):
            origin = await tree.origin(anvil, tree_extra=f"backlog_frames = {backlog}")
            relay = await tree.child("relay", [origin], tree_extra=f"backlog_frames = {backlog}")
            leaf = await tree.child("leaf", [relay])
        async with Chain.open(leaf.url) as through:
            await wait_same_head(through, node, HOP_TIMEOUT)
        async with Subscriber.connect(leaf.ws_url) as sub:
            heads = await sub.subscribe(NEW_HEADS)
            start = await head_number(anvil.url) + 1
            await node.call("evm_mine")
            await until(lambda: len(sub.notes[heads]) == 1, HOP_TIMEOUT, "a first head")
            assert relay.proc is not None
            relay.proc.kill()
            relay.proc.wait()
            missed = 2 * backlog
            for i in range(missed):
                await node.send({"from": A0, "to": A1, "value": hex(1 + i)})
                await node.call("evm_mine")
            relay.start()  # the same port: the leaf's link comes back to it
            await relay.wait_ready(NODE_START_TIMEOUT)
            await node.call("evm_mine")
            tip = start + missed + 1
            await until(
                lambda: len(sub.notes[heads]) >= tip - start + 1,
                HOP_TIMEOUT,
                "every head, the missed ones included",
            )
            async with Chain.open(leaf.url) as through:
                await wait_same_head(through, node, HOP_TIMEOUT)
                for n in range(start, tip + 1):
                    assert await through.block(hex(n), True) == await node.block(hex(n), True)
    got = sub.results(heads)
    assert [int(h["number"], 16) for h in got] == list(range(start, tip + 1))
    async with Chain.open(anvil.url) as node:
        for h in got:
            assert h["hash"] == (await node.block(h["number"]))["hash"]


async def test_leaf_feed_comes_back_soon_after_its_sole_parent_restarted(
    anvil_factory: Callable[..., Awaitable[Anvil]], tree: Tree
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        async with heartbeat(node):
            origin = await tree.origin(anvil)
            relay = await tree.child("relay", [origin])
            leaf = await tree.child("leaf", [relay])

            async def leaf_linked() -> bool:
                # A leaf ready to serve may not have linked yet; one that never had its
                # parent would never be left without it.
                children = metric(await relay.metrics(), "chainrelay_feed_children", stream=STREAM)
                return children == 1

            await until(leaf_linked, HOP_TIMEOUT, "the leaf linked to the relay")
        assert relay.proc is not None
        relay.proc.kill()
        relay.proc.wait()

        async def held_down() -> bool:
            # Its link's failed connects or its failed /health probes, whichever counts
            # out first, leave the leaf with no parent at all.
            return "parents: none" in leaf.log_path.read_text()

        await until(held_down, 3 * HOP_TIMEOUT, "the leaf to be left with no parent")
        relay.start()  # the same port
        await relay.wait_ready(NODE_START_TIMEOUT)
        accepted = frames(await leaf.metrics(), "accepted")
        await node.call("evm_mine")

        async def by_frame() -> bool:
            return frames(await leaf.metrics(), "accepted") > accepted

        await until(by_frame, HOP_TIMEOUT, "a frame at the leaf after its parent's restart")
