"""The relay tree across regions: anvil and the origin in eu, a relay each in us and asia
(each the other's candidate parent), four leaves (us1, us2, asia1, asia2) with both relays
and the origin as candidates; every parent link is a delay link of its regions' round trip,
and each leaf has a ``chainrelay subscribe`` beside it.

One tree serves the whole module (a dozen processes and two dozen delay links take a while
to start on two cores); each test checks the subscribers' whole record so far, so a test
that breaks the tree for the next one shows up there as a gap or a duplicate. A test that
kills a node starts it again before it ends, so the tests do not depend on their order.
"""

from __future__ import annotations

import asyncio
import functools
import re
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from chainrelay import devnet
from tests.lab.chain import DEV_ACCOUNTS, Chain, metric, sign_transfer
from tests.lab.netns import RegionLab, unavailable
from tests.lab.procs import Procs, until
from tests.lab.timing import SECOND
from tests.lab.tree import Subscriber, Tree, TreeNode

pytestmark = [pytest.mark.lab, pytest.mark.asyncio(loop_scope="module")]

STREAM = "bsc/blocks"
# Round trips between regions (ms); within a region, SAME_REGION_RTT.
REGION_RTT = {
    frozenset(("eu", "us")): 80,
    frozenset(("eu", "asia")): 150,
    frozenset(("us", "asia")): 150,
}
SAME_REGION_RTT = 30
LEAVES = {"us1": "us", "us2": "us", "asia1": "asia", "asia2": "asia"}
# Probes every half second, reconnects quickly: a lost parent is replaced within seconds.
TREE_EXTRA = {"probe_interval": 0.5, "retry_delay": 0.1, "retry_max": 1.0, "ping_interval": 1.0}
# anvil's fourth development account: the traffic uses the first three (and their nonces).
SIGNER = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
SIGNER_KEY = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"
# anvil mines a block a second: waits for blocks are counted in these (scaled by SLOWDOWN).
BLOCK = 1 * SECOND


def rtt(a: str, b: str) -> float:
    return SAME_REGION_RTT if a == b else REGION_RTT[frozenset((a, b))]


@dataclass
class Regions:
    tree: Tree
    anvil: str
    origin: TreeNode
    relays: dict[str, TreeNode]
    leaves: dict[str, TreeNode]
    subs: dict[str, Subscriber]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def regions(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Regions]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    tmp: Path = tmp_path_factory.mktemp("tree")
    procs = Procs()
    try:
        with RegionLab(procs) as lab, Tree(lab, tmp) as tree:
            anvil = await tree.chain("eu")
            stop = asyncio.Event()
            traffic = asyncio.create_task(devnet.traffic(anvil, stop, per_block=2))
            try:
                yield await build(tree, anvil)
            finally:
                stop.set()
                await traffic
    finally:
        procs.close()


async def build(tree: Tree, anvil: str) -> Regions:
    origin = tree.origin("origin", "eu", tree_extra=TREE_EXTRA)
    relays = {r: tree.node(f"relay{r}", r, tree_extra=TREE_EXTRA) for r in ("us", "asia")}
    for r, relay in relays.items():
        tree.parent(relay, origin, rtt(r, "eu"))
        other = relays["asia" if r == "us" else "us"]
        tree.parent(relay, other, rtt(r, other.region))
    leaves = {n: tree.node(n, r, tree_extra=TREE_EXTRA) for n, r in LEAVES.items()}
    for leaf in leaves.values():
        for parent in (*relays.values(), origin):
            tree.parent(leaf, parent, rtt(leaf.region, parent.region))
    await tree.start(origin)
    await tree.start(*relays.values())
    await tree.start(*leaves.values())
    subs = {n: tree.subscribe(leaf, STREAM, label=f"sub-{n}") for n, leaf in leaves.items()}
    return Regions(tree, anvil, origin, relays, leaves, subs)


def contiguous(sub: Subscriber) -> list[int]:
    """Its numbers, asserted one after another with no gap, duplicate or reorg."""
    numbers = sub.numbers
    assert numbers, f"{sub.name}: no block"
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), (
        f"{sub.name}: not contiguous: {numbers}"
    )
    assert not sub.bad_lines, sub.bad_lines
    assert not [b for b in sub.blocks if b["reorg"]], f"{sub.name}: a reorg anvil never made"
    return numbers


async def assert_canonical(node: Chain, sub: Subscriber) -> None:
    """Every block it printed is anvil's block of that number."""
    for b in list(sub.blocks):
        canon = await node.block(hex(b["number"]))
        assert b["hash"] == canon["hash"], f"{sub.name}: block {b['number']} {b}"


# ParentSet logs each change of parents as "parents: a, b".
PARENTS_LINE = re.compile(r" chainrelay\.tree\.parents: parents: (.*)$", re.MULTILINE)


def last_parents(leaf: TreeNode) -> list[str]:
    lines = PARENTS_LINE.findall(leaf.log_path.read_text(errors="replace"))
    return lines[-1].split(", ") if lines else []


def path_delay_ms(r: Regions, leaf: TreeNode) -> float:
    """One-way link delay from the origin to ``leaf`` along its fastest parent: directly, or
    through a relay that takes the origin's frames directly."""
    delays = []
    for name in last_parents(leaf):
        parent = r.tree.nodes[name]
        via = 0.0 if parent is r.origin else rtt(parent.region, "eu") / 2
        delays.append(via + rtt(leaf.region, parent.region) / 2)
    return min(delays)


def latency_report(r: Regions, since: int = 0) -> str:
    """Each leaf's subscriber latency (origin publication to the subscriber beside the leaf)
    from block ``since`` on, and its median less the link delays of the fastest path through
    the leaf's parents now: what the nodes on the way added."""
    lines = []
    for name, sub in r.subs.items():
        lat = [
            b["latency_ms"]
            for b in sub.blocks
            if b["latency_ms"] is not None and b["number"] >= since
        ]
        if len(lat) < 2:
            continue
        leaf = r.leaves[name]
        links = path_delay_ms(r, leaf)
        median = statistics.median(lat)
        lines.append(
            f"{name} (parents {', '.join(last_parents(leaf))}): n={len(lat)} median "
            f"{median:.1f} ms, p90 {statistics.quantiles(lat, n=10)[8]:.1f} ms; links "
            f"{links:.0f} ms, nodes added {median - links:.1f} ms"
        )
    return "\n".join(lines)


async def recent_logged_block(node: Chain, newest: int) -> tuple[dict[str, Any], str]:
    """The newest block at or below ``newest - 2`` with a logged call (every leaf holds it:
    ``newest`` is the slowest leaf's), and that call's transaction hash."""
    for number in range(newest - 2, newest - 10, -1):
        receipts = await node.call("eth_getBlockReceipts", [hex(number)])
        logged = [rc["transactionHash"] for rc in receipts if rc["logs"]]
        if logged:
            return await node.block(hex(number), full=True), logged[0]
    raise AssertionError(f"no logged call in blocks {newest - 9}..{newest - 2}")


def block_reads(block: dict[str, Any], tx: str) -> list[tuple[str, list[Any]]]:
    """What a dapp reads of a new block: each is in a leaf's cache once its frame came."""
    number, h = block["number"], block["hash"]
    return [
        ("eth_getBlockByNumber", [number, True]),
        ("eth_getBlockByNumber", [number, False]),
        ("eth_getBlockByHash", [h, True]),
        ("eth_getBlockByHash", [h, False]),
        ("eth_getTransactionByHash", [tx]),
        ("eth_getTransactionReceipt", [tx]),
        ("eth_getBlockReceipts", [number]),
        ("eth_getLogs", [{"blockHash": h}]),
        ("eth_getLogs", [{"fromBlock": number, "toBlock": number}]),
    ]


# Reads are measured again when the node's own background calls (safe/finalized, asked of a
# parent every few blocks) fell inside the measurement: three tries cannot all meet one.
READ_TRIES = 3


async def assert_answered_from_cache(
    name: str, leaf: TreeNode, reads: list[tuple[str, list[Any]]], expected: list[Any]
) -> None:
    """Each read answered as ``expected`` with no upstream call; the warmed ones (all but
    eth_getLogs, answered from the feed's delivered blocks on the miss path) as cache hits."""
    calls = -1.0
    for _ in range(READ_TRIES):
        before = await leaf.metrics()
        async with Chain.open(leaf.url) as at_leaf:
            got = [await at_leaf.raw(m, p) for m, p in reads]
        after = await leaf.metrics()
        for (method, params), want, have in zip(reads, expected, got, strict=True):
            assert have == want, f"{name} {method}{params}"
        for method in {m for m, _ in reads} - {"eth_getLogs"}:
            hits = metric(after, "chainrelay_requests_total", method=method, outcome="hit")
            hits -= metric(before, "chainrelay_requests_total", method=method, outcome="hit")
            asked = sum(1 for m, _ in reads if m == method)
            assert hits == asked, f"{name}: {asked - hits:.0f} {method} not answered from cache"
        calls = metric(after, "chainrelay_upstream_calls_total")
        calls -= metric(before, "chainrelay_upstream_calls_total")
        if calls == 0:
            return
    raise AssertionError(f"{name} made {calls:.0f} upstream calls while answering cached reads")


async def signed_transfer(node: Chain) -> tuple[str, str]:
    """A transfer signed here, from the account the traffic leaves alone: (raw, hash)."""
    base_fee = int((await node.block())["baseFeePerGas"], 16)
    nonce = int(await node.call("eth_getTransactionCount", [SIGNER, "pending"]), 16)
    return sign_transfer(
        SIGNER_KEY, nonce=nonce, to=DEV_ACCOUNTS[0], value=1, chain_id=56, base_fee=base_fee
    )


async def test_every_leaf_gets_every_block_and_answers_from_its_cache(regions: Regions) -> None:
    r = regions
    for sub in r.subs.values():
        await sub.wait_count(1, 30 * BLOCK)  # following: the next block is theirs to print
    async with Chain.open(r.anvil) as node:
        raw_tx, tx_hash = await signed_transfer(node)
        assert await node.call("eth_sendRawTransaction", [raw_tx]) == tx_hash
        mined = int((await node.receipt(tx_hash, 10 * BLOCK))["blockNumber"], 16)
        for sub in r.subs.values():
            await sub.wait_count(15, 30 * BLOCK)
            await sub.wait_number(mined, 10 * BLOCK)
        for sub in r.subs.values():
            contiguous(sub)
            await assert_canonical(node, sub)
            assert any(b["number"] == mined and b["txs"] > 0 for b in sub.blocks), sub.name
        block, tx = await recent_logged_block(node, min(s.numbers[-1] for s in r.subs.values()))
        reads = block_reads(block, tx)
        expected = [await node.raw(m, p) for m, p in reads]
    for name, leaf in r.leaves.items():
        await assert_answered_from_cache(name, leaf, reads, expected)
    print(latency_report(r))


async def test_restarted_leaf_resumes_its_subscriber_and_serves_from_twenty_back(
    regions: Regions,
) -> None:
    r = regions
    leaf, sub = r.leaves["us1"], r.subs["us1"]
    await sub.wait_count(20, 40 * BLOCK)
    leaf.kill()
    killed = time.monotonic()
    killed_at = sub.numbers[-1]
    await r.tree.start(leaf)
    # The subscriber was left running: it reconnects to the new process by itself.
    await sub.wait_number(killed_at + 1, 20 * BLOCK)
    print(f"us1 killed: its subscriber's next block {time.monotonic() - killed:.1f} s later")
    await sub.wait_number(killed_at + 5, 20 * BLOCK)
    contiguous(sub)
    start = sub.numbers[-1] - 20
    fresh = r.tree.subscribe(leaf, STREAM, from_block=start, label="sub-us1-from")
    await fresh.wait_count(25, 20 * BLOCK)
    numbers = contiguous(fresh)
    assert numbers[0] == start
    # The restarted leaf took its parents' recent frames back: a replay of signed frames,
    # nothing fetched over JSON-RPC.
    assert all(b["verified"] for b in fresh.blocks), [b for b in fresh.blocks if not b["verified"]]
    fresh.stop()
    async with Chain.open(r.anvil) as node:
        await assert_canonical(node, sub)
        await assert_canonical(node, fresh)
    for other in r.subs.values():
        contiguous(other)


async def test_a_write_climbs_the_tree_without_going_round_between_the_relays(
    regions: Regions,
) -> None:
    r = regions
    relays = list(r.relays.values())

    async def writes(relay: TreeNode) -> float:
        samples = await relay.metrics()
        return metric(samples, "chainrelay_requests_total", method="eth_sendRawTransaction")

    async def loops_cut() -> float:
        """Requests the relays refused for naming them in Via already (HTTP 508)."""
        total = 0.0
        for relay in relays:
            samples = await relay.metrics()
            total += metric(samples, "chainrelay_rejected_total", reason="relay_loop")
        return total

    before = {relay.name: await writes(relay) for relay in relays}
    cut_before = await loops_cut()
    async with Chain.open(r.anvil) as node:
        raw_tx, tx_hash = await signed_transfer(node)
        async with Chain.open(r.leaves["us1"].url) as leaf:
            start = time.perf_counter()
            assert await leaf.call("eth_sendRawTransaction", [raw_tx]) == tx_hash
            took = time.perf_counter() - start
        print(f"eth_sendRawTransaction through us1: {took * 1000:.0f} ms")
        mined = int((await node.receipt(tx_hash, 10 * BLOCK))["blockNumber"], 16)
    await r.subs["us1"].wait_number(mined + 2, 10 * BLOCK)
    leaf_parents = last_parents(r.leaves["us1"])
    for relay in relays:
        # Once from the leaf, once more through the other relay.
        took_it = await writes(relay) - before[relay.name]
        assert took_it <= 2, f"{relay.name} took the one transaction {took_it:.0f} times"
        if relay.name in leaf_parents:
            assert took_it >= 1, f"{relay.name}, a parent of us1, never took the write"
        healthy = metric(await relay.metrics(), "chainrelay_upstream_healthy")
        assert healthy == len(relay.parents), f"{relay.name} took an upstream out of rotation"
    # Each relay sends a write to every upstream, the other relay included: the copy that
    # would go back to a relay it passed was refused there, which is what ended the round.
    assert await loops_cut() > cut_before, "no copy of the write was refused as a loop"


async def test_leaves_miss_no_block_when_a_relay_dies_and_choose_new_parents(
    regions: Regions,
) -> None:
    r = regions
    for sub in r.subs.values():
        await sub.wait_count(5, 20 * BLOCK)
    dead = r.relays["us"]
    had_it = [n for n, leaf in r.leaves.items() if dead.name in last_parents(leaf)]
    assert had_it, "no leaf had the US relay as a parent"

    async def rechosen(leaf: TreeNode) -> bool:
        parents = last_parents(leaf)
        samples = await leaf.metrics()
        return (
            len(parents) == 2
            and dead.name not in parents
            and metric(samples, "chainrelay_feed_parents") == 2
        )

    async with Chain.open(r.anvil) as node:
        dead.kill()
        killed = time.monotonic()
        killed_at, _ = await node.head()
        for name in had_it:
            leaf = r.leaves[name]
            await until(functools.partial(rechosen, leaf), 10 * SECOND, f"{name} to re-choose")
        print(f"{', '.join(had_it)} re-chose within {time.monotonic() - killed:.1f} s of the kill")
        for sub in r.subs.values():
            await sub.wait_number(killed_at + 10, 25 * BLOCK)
            contiguous(sub)
            await assert_canonical(node, sub)
            # The other parent's copies filled in at once: nothing was fetched over JSON-RPC.
            late = [b for b in sub.blocks if b["number"] >= killed_at]
            assert all(b["verified"] for b in late), (sub.name, late)
    print(latency_report(r, since=killed_at + 3))
    # Back for whichever test runs next: the tree as the module built it.
    await r.tree.start(dead)
