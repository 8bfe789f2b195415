"""Reorgs: once anvil replaces its last blocks, the relay never serves what they held.

anvil mines only when told to (no interval mining), so every block is known in advance.
The relay's cache is warmed with the last blocks (by number, by hash, by tag), their
transactions, receipts, logs and the state at them; then ``anvil_reorg`` replaces those
blocks with blocks that hold other transactions, other logs and other store writes. Once
the relay follows the new head, every answer must equal anvil's own, whether it is about a
replaced block, a dropped transaction, or the new chain, and a second time from the cache.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from chainrelay.devnet import Anvil, transfer_emitter_initcode
from tests.lab.chain import (
    DEV_ACCOUNTS,
    TRANSFER_TOPIC,
    Chain,
    emitter_data,
    metric,
    start_relay_mining,
    store_initcode,
    topic_of,
    wait_same_head,
    word,
)
from tests.lab.procs import Relay

pytestmark = pytest.mark.lab

A0, A1, A2 = DEV_ACCOUNTS
# Blocks under the replaced ones, so ranges and tags reach below the fork point.
BASE_BLOCKS = 3

Query = tuple[str, list[Any]]


def key(q: Query) -> bytes:
    return orjson.dumps(q)


def short(answer: Any) -> str:
    text = str(answer)
    return text if len(text) <= 160 else text[:160] + "..."


@dataclass
class Lab:
    anvil: Anvil
    node: Chain  # anvil, directly
    relay: Relay
    through: Chain  # the relay
    emitter: str
    store: str
    # The relay's answers before the reorg, by ``key(query)``.
    answers: dict[bytes, dict[str, Any]] = field(default_factory=dict)


# The relay's upstream, and how its reads pinned to the upstream's own head are sent: by
# hash, or by number ("one node": ``head_by_number``, whose answers a reorg must not let
# stand for the block they were keyed by either).
@pytest.fixture(params=["ws", "http", "ws-one-node"])
async def lab(
    request: pytest.FixtureRequest,
    anvil_factory: Callable[..., Awaitable[Anvil]],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> AsyncIterator[Lab]:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    async with Chain.open(anvil.url) as node:
        await node.call("evm_setAutomine", [False])
        emitter = await node.deploy(transfer_emitter_initcode())
        store = await node.deploy(store_initcode())
        upstream = anvil.url if request.param == "http" else anvil.ws_url
        one_node = "head_by_number = true\n" if request.param == "ws-one-node" else ""
        relay = await start_relay_mining(node, relay_factory, [upstream], each_upstream=one_node)
        for i in range(BASE_BLOCKS):
            await node.send({"from": A0, "to": A1, "value": hex(1 + i)})
            await node.call("evm_mine")
        async with Chain.open(relay.url) as through:
            yield Lab(anvil, node, relay, through, emitter, store)


async def mine_old_blocks(lab: Lab, depth: int) -> None:
    """``depth`` blocks, each with a transfer, a Transfer log and a store write by A0."""
    for i in range(depth):
        await lab.node.send({"from": A0, "to": A1, "value": hex(1000 + i)})
        data = emitter_data(A1, 1000 + i)
        await lab.node.send({"from": A0, "to": lab.emitter, "data": data, "gas": "0x20000"})
        await lab.node.send(
            {"from": A0, "to": lab.store, "data": word(0xAAAA00 + i), "gas": "0x20000"}
        )
        await lab.node.call("evm_mine")


def new_block_txs(lab: Lab, depth: int) -> list[list[Any]]:
    """anvil_reorg's [transaction, block offset] pairs: other senders, values, logs, words."""
    pairs: list[list[Any]] = []
    for k in range(depth):
        pairs += [
            [{"from": A2, "to": A0, "value": hex(5000 + k)}, k],
            [
                {
                    "from": A2,
                    "to": lab.emitter,
                    "data": emitter_data(A0, 5000 + k),
                    "gas": "0x20000",
                },
                k,
            ],
            [{"from": A2, "to": lab.store, "data": word(0xBBBB00 + k), "gas": "0x20000"}, k],
        ]
    return pairs


async def queries(lab: Lab, first: int, last: int) -> list[Query]:
    """Every read the relay caches about blocks ``first``..``last`` as anvil has them now."""
    out: list[Query] = []
    for n in range(first, last + 1):
        block = await lab.node.block(hex(n))
        h = block["hash"]
        out += [
            ("eth_getBlockByNumber", [hex(n), False]),
            ("eth_getBlockByNumber", [hex(n), True]),
            ("eth_getBlockByHash", [h, False]),
            ("eth_getBlockByHash", [h, True]),
            ("eth_getBlockReceipts", [hex(n)]),
            ("eth_getBlockTransactionCountByNumber", [hex(n)]),
            ("eth_getTransactionByBlockNumberAndIndex", [hex(n), "0x0"]),
            ("eth_getLogs", [{"fromBlock": hex(n), "toBlock": hex(n)}]),
            ("eth_getBalance", [A1, hex(n)]),
            ("eth_getTransactionCount", [A0, hex(n)]),
            ("eth_getStorageAt", [lab.store, "0x0", hex(n)]),
            ("eth_call", [{"to": lab.store}, hex(n)]),
        ]
        for tx in block["transactions"]:
            out += [("eth_getTransactionByHash", [tx]), ("eth_getTransactionReceipt", [tx])]
    return out


def tag_queries(lab: Lab, below: int) -> list[Query]:
    """Reads by tag and open ranges: their block moves with the head."""
    return [
        ("eth_getBlockByNumber", ["latest", False]),
        ("eth_getBlockByNumber", ["latest", True]),
        ("eth_getBlockReceipts", ["latest"]),
        ("eth_getBalance", [A1, "latest"]),
        ("eth_getStorageAt", [lab.store, "0x0", "latest"]),
        ("eth_call", [{"to": lab.store}, "latest"]),
        ("eth_getLogs", [{"fromBlock": hex(below), "toBlock": "latest", "address": lab.emitter}]),
        ("eth_getLogs", [{"fromBlock": hex(below), "topics": [TRANSFER_TOPIC, topic_of(A0)]}]),
        ("eth_getLogs", [{"fromBlock": hex(below), "toBlock": "latest"}]),
    ]


def hash_named_queries(hashes: list[str]) -> list[Query]:
    """Reads that name a block by hash inside their parameters."""
    out: list[Query] = []
    for h in hashes:
        out += [
            ("eth_getLogs", [{"blockHash": h}]),
            ("eth_getBlockReceipts", [{"blockHash": h}]),
        ]
    return out


async def compare(lab: Lab, qs: list[Query], when: str) -> list[str]:
    """Ask the relay and anvil each query; the differences, described."""
    diffs = []
    for q in qs:
        method, params = q
        through = await lab.through.request(method, params)
        direct = await lab.node.request(method, params)
        if through != direct:
            stale = (
                " (the answer from before the reorg)" if through == lab.answers.get(key(q)) else ""
            )
            diffs.append(
                f"{when}: {method}{params}: relay {short(through)} != anvil {short(direct)}{stale}"
            )
    return diffs


async def warm(lab: Lab, qs: list[Query]) -> None:
    """Ask every query twice; the second answers must come from the relay's cache, except
    empty ones (an empty answer about an unfinalized block is never stored)."""
    assert not await compare(lab, qs, "before the reorg")
    cold = []
    for q in qs:
        before = metric(await lab.relay.metrics(), "chainrelay_cache_hits_total")
        answer = lab.answers[key(q)] = await lab.through.request(*q)
        hit = metric(await lab.relay.metrics(), "chainrelay_cache_hits_total") > before
        if not hit and answer.get("result") not in (None, [], "0x"):
            cold.append(f"{q[0]}{q[1]}")
    assert not cold, "not cached, so a reorg would not test them:\n" + "\n".join(cold)


async def reorgs(lab: Lab) -> float:
    return metric(await lab.relay.metrics(), "chainrelay_reorgs_total")


async def reorg_and_check(lab: Lab, depth: int, hash_named: bool) -> None:
    await mine_old_blocks(lab, depth)
    tip, _ = await lab.node.head()
    fork = tip - depth  # the last block both chains share
    await wait_same_head(lab.through, lab.node)

    old = await queries(lab, fork, tip)
    old_hashes = [(await lab.node.block(hex(n)))["hash"] for n in range(fork + 1, tip + 1)]
    qs = old + tag_queries(lab, fork - 1)
    if hash_named:
        qs += hash_named_queries(old_hashes)
    await warm(lab, qs)
    reorgs_before = await reorgs(lab)

    await lab.node.call("anvil_reorg", [depth, new_block_txs(lab, depth)])
    assert (await lab.node.head())[0] == tip, "anvil_reorg changed the height"
    new_hashes = [(await lab.node.block(hex(n)))["hash"] for n in range(fork + 1, tip + 1)]
    assert not set(new_hashes) & set(old_hashes), "anvil replaced no block"
    await wait_same_head(lab.through, lab.node)

    new = await queries(lab, fork, tip)
    checked = qs + new + (hash_named_queries(new_hashes) if hash_named else [])
    # The old blocks' answers must have changed on anvil, or the check below proves nothing.
    changed = [q for q in qs if await lab.node.request(*q) != lab.answers[key(q)]]
    assert len(changed) >= len(qs) // 2, f"only {len(changed)} of {len(qs)} answers changed"

    diffs = await compare(lab, checked, "after the reorg")
    diffs += await compare(lab, checked, "after the reorg, asked again")
    assert not diffs, "\n".join(diffs)
    assert await reorgs(lab) == reorgs_before + 1

    # One more block on the new chain: the tags move on, nothing old comes back.
    await lab.node.send({"from": A1, "to": A2, "value": "0x7"})
    await lab.node.call("evm_mine")
    await wait_same_head(lab.through, lab.node)
    diffs = await compare(lab, checked, "one block later")
    assert not diffs, "\n".join(diffs)
    assert await reorgs(lab) == reorgs_before + 1


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
async def test_reorg_never_serves_replaced_blocks(lab: Lab, depth: int) -> None:
    await reorg_and_check(lab, depth, hash_named=False)


async def test_reorg_reads_naming_the_replaced_block_hash(lab: Lab) -> None:
    await reorg_and_check(lab, 2, hash_named=True)
