"""Upstream routing against real nodes: a dapp mix through {pruned primary, rate-limited
primary, archive fallback}.

Two real anvils serve one chain: one started with ``--prune-history`` (it keeps the state
of its head only, and answers a state read of any older block with its own
``BlockOutOfRangeError``), one archive. Both start from the same genesis (the same
``--timestamp``) and mine the same empty blocks at the same timestamps, so their blocks
and hashes are one chain. The rate-limited primary is a fake provider (``fault_upstream``,
mode ``rate``: HTTP 429 with ``Retry-After`` past N calls a second, and -32601 for a
method its plan lacks) in front of the pruned node: no real node can be made to act a
provider's quota. The archive fallback is reached through the same fake in ``healthy``
mode, which only measures what reaches it (calls, and how many at once).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from chainrelay.devnet import DEV_ACCOUNTS, DEV_KEYS, Anvil
from tests.lab.chain import sign_transfer
from tests.lab.counting_proxy import start_proxy
from tests.lab.fault_upstream import start_fault_upstream
from tests.lab.procs import Procs, Relay, relay_config, rpc, until
from tests.lab.timing import SECOND

GENESIS_TIME = 1_700_000_000
BLOCKS = 24
# The fake provider's quota, and the budget the relay is given for it: above the quota, so
# 429s come (auto-tuning then brings the budget under it).
QUOTA_RPS = 10
BUDGET_RPS = 15
ARCHIVE_CONCURRENCY = 2
LACKED = "eth_getProof"
# A dapp's users: each sends a call every USER_INTERVAL, for MIX_SECONDS in all (about 120
# calls a second: past both the quota and the budget of the provider, its share of them).
USERS = 12
USER_INTERVAL = 0.1
MIX_SECONDS = 4.0


async def twin_chains(anvil_factory: Callable[..., Awaitable[Anvil]]) -> tuple[Anvil, Anvil]:
    """(pruned, archive): two anvils holding one chain of ``BLOCKS`` blocks."""
    common = ["--timestamp", str(GENESIS_TIME)]
    pruned, archive = await asyncio.gather(
        anvil_factory(chain_id=56, block_time=None, extra=["--prune-history", *common]),
        anvil_factory(chain_id=56, block_time=None, extra=common),
    )
    for i in range(1, BLOCKS + 1):
        for node in (pruned, archive):
            await rpc(node.url, "evm_mine", [GENESIS_TIME + i])
    heads = [
        (await rpc(n.url, "eth_getBlockByNumber", ["latest", False]))["result"]
        for n in (pruned, archive)
    ]
    assert heads[0]["hash"] == heads[1]["hash"], "the two anvils must hold one chain"
    return pruned, archive


def dapp_call(rng: random.Random, head: int) -> tuple[str, list[Any]]:
    """One call of the mix: mostly reads at the head, some of older state (which only the
    archive holds), blocks by number (every node holds them), a method the provider's
    plan lacks, and the chain's facts."""
    who = "0x" + rng.randbytes(20).hex()
    roll = rng.random()
    if roll < 0.45:
        return "eth_getBalance", [who, "latest"]
    if roll < 0.6:
        return "eth_getTransactionCount", [rng.choice(DEV_ACCOUNTS), hex(head - rng.randint(2, 12))]
    if roll < 0.75:
        return "eth_getBlockByNumber", [hex(rng.randint(1, head)), False]
    if roll < 0.85:
        return LACKED, [who, [], "latest"]
    if roll < 0.93:
        return "eth_getCode", [who, "latest"]
    return rng.choice((("eth_blockNumber", []), ("eth_chainId", [])))


async def test_a_dapp_mix_gets_no_error_and_the_fallback_only_what_primaries_could_not_serve(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    procs: Procs,
    tmp_path: Path,
) -> None:
    pruned, archive = await twin_chains(anvil_factory)
    limited, archive_door = await asyncio.gather(
        start_fault_upstream(procs, "rate", pruned.url, rps=QUOTA_RPS, lacks=LACKED),
        start_fault_upstream(procs, "healthy", archive.url),
    )
    config = f"""[pool]
auto_tune = true

[[upstreams]]
name = "pruned"
url = "{pruned.url}"

[[upstreams]]
name = "limited"
url = "{limited.url}"
max_rps = {BUDGET_RPS}

[[upstreams]]
name = "archive"
url = "{archive_door.url}"
role = "fallback"
archive = true
max_concurrency = {ARCHIVE_CONCURRENCY}
"""
    relay = Relay(procs, relay_config([], config), tmp_path)
    relay.start()
    await relay.wait_ready()
    head = BLOCKS
    errors: list[Any] = []
    sent = [0]

    async def user(session: aiohttp.ClientSession, seed: int) -> None:
        rng = random.Random(seed)
        loop = asyncio.get_running_loop()
        end = loop.time() + MIX_SECONDS
        while (now := loop.time()) < end:
            method, params = dapp_call(rng, head)
            body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
            async with session.post(
                relay.url, data=body, headers={"Content-Type": "application/json"}
            ) as r:
                doc = orjson.loads(await r.read())
            sent[0] += 1
            if r.status != 200 or "error" in doc:
                errors.append((method, params, r.status, doc))
            await asyncio.sleep(max(0.0, now + USER_INTERVAL - loop.time()))  # the user's pace

    async with aiohttp.ClientSession() as session, asyncio.timeout(60 * SECOND):
        await asyncio.gather(*(user(session, seed) for seed in range(USERS)))
    assert sent[0] > 10 * USERS and errors == [], (sent, errors[:5], relay.log_path.read_text())

    # The fallback was asked only what the primaries could not serve: state of blocks
    # before the pruned node's head, never a head read, a block or the lacked method.
    calls = await archive_door.calls()
    dapp_reads = [(m, p) for _port, m, p in calls if m in ("eth_getTransactionCount", LACKED)]
    old_state = [p[1] for m, p in dapp_reads if m == "eth_getTransactionCount"]
    tip = (await rpc(archive.url, "eth_getBlockByNumber", ["latest", False]))["result"]
    at_head = (tip["number"], {"blockHash": tip["hash"]})
    assert old_state and not any(ref in at_head for ref in old_state), old_state[:5]
    assert LACKED not in {m for m, _ in dapp_reads}
    head_reads = [p for _port, m, p in calls if m in ("eth_getBalance", "eth_getCode")]
    assert head_reads == [], head_reads[:5]
    # Each upstream within its budget: the provider never saw more than its budget's rate
    # (its burst of 0.2 s included) in any second, the archive never more than its
    # concurrency at once.
    seen = await limited.load()
    assert seen["window_peak"] <= BUDGET_RPS * 1.2 + 1, seen
    assert (await archive_door.load())["in_flight_peak"] <= ARCHIVE_CONCURRENCY
    # Its 429s paused it and never took it out: in rotation, and serving after them.
    assert seen["refused"] > 0 and seen["served_after_refusal"] > 0, seen
    metrics = await relay.metrics()
    assert metrics['chainrelay_upstream_healthy{upstream="limited"}'] == 1.0
    # The method its plan lacks, once asked, was learnt: asked of it once (or once per
    # call under way when the first answer came), then only of the pruned node.
    asked = (await limited.counts()).get(LACKED, 0)
    assert asked <= USERS, asked


async def test_a_read_forwarded_straight_to_a_pruned_node_is_answered_by_the_archive(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    procs: Procs,
    tmp_path: Path,
) -> None:
    # eth_getAccount is a read the node never caches: it goes straight to the WebSocket
    # upstream (the forwarding path), whose pruned answer must not reach the client.
    pruned, archive = await twin_chains(anvil_factory)
    archive_door = await start_fault_upstream(procs, "healthy", archive.url)
    config = f"""[methods]
enable = ["eth_getAccount"]

[[upstreams]]
name = "pruned"
url = "{pruned.ws_url}"

[[upstreams]]
name = "archive"
url = "{archive_door.url}"
role = "fallback"
archive = true
"""
    relay = Relay(procs, relay_config([], config), tmp_path)
    relay.start()
    await relay.wait_ready()
    old: list[Any] = [DEV_ACCOUNTS[0], hex(BLOCKS - 5)]
    want = await rpc(archive.url, "eth_getAccount", old)
    assert "result" in want, want
    refused = await rpc(pruned.url, "eth_getAccount", old)
    assert refused["error"]["message"].startswith("BlockOutOfRangeError"), refused
    got = await rpc(relay.url, "eth_getAccount", old)
    assert got.get("result") == want["result"], got
    assert (await archive_door.counts()).get("eth_getAccount") == 1
    # A read the pruned node holds is its own, the fallback not asked.
    got = await rpc(relay.url, "eth_getAccount", [DEV_ACCOUNTS[0], "latest"])
    assert got.get("result") == want["result"], got
    assert (await archive_door.counts()).get("eth_getAccount") == 1


# A fallback's head is checked this often while the primary serves (the default is 30 s).
FALLBACK_EVERY = 5.0
# The window over which the idle fallback is watched: a dapp's reads and writes, paced.
WINDOW_STEPS = 14
WINDOW_PACE = 0.5
WRITES_AT = (0, 5, 10)


async def signed_write(node: str, nonce: int | None = None) -> tuple[str, str]:
    """A transfer from the last dev account, signed for ``node``'s chain: (raw, hash)."""
    block = (await rpc(node, "eth_getBlockByNumber", ["latest", False]))["result"]
    if nonce is None:
        got = await rpc(node, "eth_getTransactionCount", [DEV_ACCOUNTS[-1], "pending"])
        nonce = int(got["result"], 16)
    return sign_transfer(
        DEV_KEYS[-1],
        nonce=nonce,
        to=DEV_ACCOUNTS[0],
        value=1,
        chain_id=56,
        base_fee=int(block["baseFeePerGas"], 16),
    )


async def test_an_idle_fallback_gets_only_slow_head_checks_and_writes_once_the_primary_is_down(
    anvil_factory: Callable[..., Awaitable[Anvil]],
    procs: Procs,
    tmp_path: Path,
) -> None:
    primary, paid = await asyncio.gather(
        anvil_factory(chain_id=56, block_time=1.0), anvil_factory(chain_id=56, block_time=1.0)
    )
    door, paid_door = await asyncio.gather(
        start_proxy(procs, primary.url), start_proxy(procs, paid.url)
    )
    config = f"""[head]
fallback_interval = {FALLBACK_EVERY}

[[upstreams]]
name = "primary"
url = "{door.url}"

[[upstreams]]
name = "paid"
url = "{paid_door.url}"
role = "fallback"
"""
    relay = Relay(procs, relay_config([], config), tmp_path)
    relay.start()
    await relay.wait_ready()
    await paid_door.reset()
    loop = asyncio.get_running_loop()
    started = loop.time()
    for step in range(WINDOW_STEPS):
        at = loop.time()
        if step in WRITES_AT:
            raw, tx_hash = await signed_write(primary.url)
            assert (await rpc(relay.url, "eth_sendRawTransaction", [raw])).get("result") == tx_hash
        got = await rpc(relay.url, "eth_getBalance", [DEV_ACCOUNTS[0], "latest"])
        assert "result" in got, got
        await asyncio.sleep(max(0.0, at + WINDOW_PACE - loop.time()))  # the dapp's pace
    window = loop.time() - started
    # The paid fallback was asked for its head once an interval, and for nothing else.
    counts = await paid_door.counts()
    assert set(counts) <= {"eth_getBlockByNumber"}, counts
    assert counts.get("eth_getBlockByNumber", 0) <= window / FALLBACK_EVERY + 1, (counts, window)
    assert (await door.counts()).get("eth_sendRawTransaction") == len(WRITES_AT)

    # The primary vanishes: a write goes to the fallback, and its head is followed at full
    # cadence (blocks come every second; a check every 5 s could not make 5 in 15 s).
    door.kill()
    raw, tx_hash = await signed_write(paid.url)
    got = await rpc(relay.url, "eth_sendRawTransaction", [raw])
    assert got.get("result") == tx_hash, got
    assert (await paid_door.counts()).get("eth_sendRawTransaction") == 1
    before = (await paid_door.counts()).get("eth_getBlockByNumber", 0)

    async def followed() -> bool:
        return (await paid_door.counts()).get("eth_getBlockByNumber", 0) >= before + 5

    await until(followed, 15 * SECOND, "the fallback followed at full cadence")
