"""What a node on a public URL holds every client to, decided without sockets: eth_getLogs
answers from the shared cache tier meet the size guard, filters meet the eth_getLogs guards,
subscriptions and filters are counted per identity, and the devnet's relay lets its
controls through."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson

from chainrelay import config as configmod
from chainrelay.access.identity import Identity
from chainrelay.app import methods_of
from chainrelay.cli import devnet_config
from chainrelay.rpc.cache import Entry
from chainrelay.rpc.logguards import LogGuards
from chainrelay.rpc.policy import Finality
from chainrelay.wire.jsonrpc import Answer
from tests.protocol.test_served_calls import (
    RecordingNode,
    ask,
    error_of,
    log_at,
    make_service,
    request,
)


class SharedTier:
    """A shared cache tier in memory that another node (one with a larger size guard) has
    filled: every lookup of a key it holds finds it."""

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.gets = 0
        self.puts: list[bytes] = []

    async def get(self, key: bytes) -> Entry | None:
        self.gets += 1
        return Entry(self.value)

    async def put(self, key: bytes, entry: Entry, finality: Finality) -> None:
        self.puts.append(key)

    async def exclusive(self, key: bytes, produce: Callable[[], Awaitable[Answer]]) -> Answer:
        return Answer(self.value, None)  # another process stored it while this one waited


# --- the shared cache tier ------------------------------------------------------------------
async def test_a_log_answer_from_the_shared_tier_is_held_to_the_size_guard() -> None:
    node = RecordingNode()
    big = orjson.dumps([log_at(0x50, i) for i in range(40)])  # ~20 KB
    tier = SharedTier(big)
    service = make_service(node, guards=LogGuards(50, 3, 2, 10_000))
    service.shared = tier
    call = request("eth_getLogs", [{"fromBlock": "0x50", "toBlock": "0x50"}])
    for _ in range(2):  # refused, and not kept in the memory cache to be served later
        got = await ask(service, call)
        assert error_of(got)[0] == -32005
        assert got["error"]["data"] == {"limit": "logs.max_answer_bytes", "value": 10_000}
    assert tier.gets == 2 and node.methods == []
    # Found by the lock round trip (another process stored it meanwhile): the same.
    tier.get = _nothing  # type: ignore[method-assign]
    got = await ask(service, {**call, "id": 7})
    assert got["error"]["data"]["limit"] == "logs.max_answer_bytes"
    # Under the guard it is served from the tier as before.
    tier.value = orjson.dumps([log_at(0x50, 0)])
    del tier.get
    got = await ask(service, call)
    assert got["result"] == [log_at(0x50, 0)] and node.methods == []


async def _nothing(key: bytes) -> Entry | None:
    return None


# --- chainrelay devnet ------------------------------------------------------------------------
def test_the_devnet_relay_lets_its_anvils_controls_through_and_serve_does_not() -> None:
    devnet = methods_of(devnet_config("ws://127.0.0.1:8546", "127.0.0.1:8545", ""))
    served = methods_of(configmod.quick(["ws://127.0.0.1:8546"]))
    anyone = Identity("10.0.0.1")
    for method in ("evm_mine", "evm_snapshot", "anvil_setBalance", "hardhat_mine"):
        assert devnet.refusal(method, anyone) is None
        assert devnet.tier(anyone).allows(method)
        assert not served.tier(anyone).allows(method)
        assert served.refusal(method, anyone) == f"the method {method} is disabled on this node"
    # Node internals stay refused on the devnet's relay too.
    assert not devnet.tier(anyone).allows("debug_traceTransaction")
    assert devnet_config("ws://x:1", "127.0.0.1:8545", "").server.admin_listen == ""
