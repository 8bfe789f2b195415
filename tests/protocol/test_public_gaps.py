"""What a node on a public URL holds every client to, decided without sockets: eth_getLogs
answers from the shared cache tier meet the size guard, filters meet the eth_getLogs guards,
subscriptions and filters are counted per identity, and the devnet's relay lets its
controls through."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from chainrelay import config as configmod
from chainrelay.access.identity import Identity
from chainrelay.app import methods_of
from chainrelay.cli import devnet_config
from chainrelay.config import FiltersConfig, LimitsConfig
from chainrelay.errors import FilterOverflowed
from chainrelay.metrics import Metrics
from chainrelay.rpc.cache import Entry, new_entry
from chainrelay.rpc.logguards import LogGuards
from chainrelay.rpc.policy import Finality
from chainrelay.subscriptions.filters import FilterService
from chainrelay.subscriptions.filtertable import FilterKind, FilterTable
from chainrelay.wire.jsonrpc import Answer
from tests.protocol.test_access_http import Front, door, post
from tests.protocol.test_filters import Block
from tests.protocol.test_http_fast_path import answers
from tests.protocol.test_rpc_hits import head_at
from tests.protocol.test_served_calls import (
    ADDR,
    TOPIC,
    RecordingNode,
    ask,
    error_of,
    log_at,
    make_service,
    request,
    view_at,
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
        return new_entry(self.value)

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


# --- filters under the eth_getLogs guards ----------------------------------------------------
class NoFollower:
    """A block source the filter service is never started on: blocks are fed to its table."""

    def add_listener(self, fn: Callable[[list[Any]], None]) -> None: ...

    def remove_listener(self, fn: Callable[[list[Any]], None]) -> None: ...

    def add_pending_listener(self, fn: Callable[[str], None]) -> None: ...

    def remove_pending_listener(self, fn: Callable[[str], None]) -> None: ...


def filter_service(guards: LogGuards, asked: list[Any]) -> FilterService:
    async def ask(method: str, params: list[Any]) -> Answer:
        asked.append((method, params))
        return Answer(b"[]", None)

    return FilterService(
        FiltersConfig(), NoFollower(), ask, Metrics(), guards=guards, view=view_at(1000, 990, 980)
    )


def decoded(answer: Answer) -> Any:
    if answer.error is not None:
        return {"error": orjson.loads(answer.error)}
    assert answer.result is not None
    return {"result": orjson.loads(answer.result)}


async def test_a_filter_past_a_logs_guard_is_refused_at_creation_in_the_same_words() -> None:
    asked: list[Any] = []
    service = filter_service(LogGuards(50, 3, 2, 10_000), asked)
    many = [ADDR[:-1] + str(i) for i in range(4)]
    cases = [
        ({"fromBlock": "0x0"}, "logs.max_block_range", "is limited to a 50 block range"),
        ({"fromBlock": hex(900), "toBlock": "latest"}, "logs.max_block_range", "spans 101"),
        ({"toBlock": hex(1100)}, "logs.max_block_range", "spans 101 blocks"),
        ({"address": many}, "logs.max_addresses", "limited to 3 addresses per query"),
        ({"topics": [[TOPIC] * 3]}, "logs.max_topics_per_position", "position 0"),
    ]
    for obj, guard, words in cases:
        got = decoded(await service.call("eth_newFilter", [obj]))
        error = got["error"]
        assert error["code"] == -32005 and error["data"]["limit"] == guard, (obj, error)
        assert error["message"].startswith("eth_newFilter ") and words in error["message"]
    assert len(service.table) == 0 and asked == []
    # Within every guard: installed, as before.
    for obj in ({}, {"fromBlock": hex(951)}, {"address": many[:3], "topics": [[TOPIC] * 2]}):
        assert decoded(await service.call("eth_newFilter", [obj]))["result"].startswith("0x")
    assert len(service.table) == 3


async def test_a_filters_logs_obey_the_range_guard_as_its_range_grows() -> None:
    asked: list[Any] = []
    service = filter_service(LogGuards(50, 3, 2, 10_000), asked)
    fid = decoded(await service.call("eth_newFilter", [{"fromBlock": hex(960)}]))["result"]
    assert decoded(await service.call("eth_getFilterLogs", [fid])) == {"result": []}
    assert asked == [("eth_getLogs", [{"fromBlock": hex(960)}])]
    head_at(service.view, 1010)  # the chain went on: the range is 51 blocks now
    error = decoded(await service.call("eth_getFilterLogs", [fid]))["error"]
    assert error["code"] == -32005 and error["data"]["limit"] == "logs.max_block_range"
    assert error["message"].startswith("eth_getFilterLogs is limited to a 50 block range")
    assert len(asked) == 1


async def test_filter_changes_are_paged_at_the_answer_bound_and_none_is_lost() -> None:
    service = filter_service(LogGuards(50, 3, 2, 2_000), [])
    fid = decoded(await service.call("eth_newFilter", [{"address": ADDR}]))["result"]
    logs = [log_at(1000, i) for i in range(10)]  # ~500 bytes each: ~5 KB in all
    service.table.on_blocks([Block(1000, logs[0]["blockHash"], logs)])
    pages: list[list[Any]] = []
    while True:
        answer = await service.call("eth_getFilterChanges", [fid])
        assert answer.result is not None and len(answer.result) <= 2_000
        page = orjson.loads(answer.result)
        if not page:
            break
        pages.append(page)
    assert len(pages) >= 3 and [lg for p in pages for lg in p] == logs
    # A buffer that filled up between two polls: said with -32005, never answered short.
    small = FilterService(
        FiltersConfig(max_changes=4),
        NoFollower(),
        _no_ask,
        Metrics(),
        guards=LogGuards(50, 3, 2, 2_000),
    )
    fid = decoded(await small.call("eth_newFilter", [{"address": ADDR}]))["result"]
    small.table.on_blocks([Block(1000, logs[0]["blockHash"], logs)])
    error = decoded(await small.call("eth_getFilterChanges", [fid]))["error"]
    assert error["code"] == -32005 and error["data"] == {"limit": "filters.max_changes", "value": 4}
    error = decoded(await small.call("eth_getFilterChanges", [fid]))["error"]
    assert error == {"code": -32000, "message": "filter not found"}


async def _no_ask(method: str, params: list[Any]) -> Answer:
    raise AssertionError("no read expected")


# --- connections per client address ---------------------------------------------------------
def upgrade(client: str) -> bytes:
    return (
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"X-Forwarded-For: {client}\r\n\r\n"
    ).encode()


async def test_a_websocket_through_a_trusted_proxy_counts_as_its_clients_connection() -> None:
    front = Front(door())
    front.server.limits = LimitsConfig(max_connections_per_ip=2)
    held = []
    for _ in range(2):
        proto, transport = front.connect("10.0.0.1")
        proto.data_received(upgrade("198.51.100.1"))
        assert transport.out.startswith(b"HTTP/1.1 101"), transport.out[:80]
        held.append(proto)
    assert front.server.per_ip == {"198.51.100.1": 2}  # the client's, not the proxy's
    proto, transport = front.connect("10.0.0.1")
    proto.data_received(upgrade("198.51.100.1"))
    assert [a.status for a in answers(transport.out)] == [429] and transport.closed
    proto.connection_lost(None)
    # Another client behind the same proxy, and plain requests through it, are not held up.
    other, transport = front.connect("10.0.0.1")
    other.data_received(upgrade("198.51.100.2"))
    assert transport.out.startswith(b"HTTP/1.1 101")
    plain, transport = front.connect("10.0.0.1")
    plain.data_received(post("X-Forwarded-For: 198.51.100.1\r\n"))
    assert [a.status for a in answers(transport.out)] == [200]
    held[0].connection_lost(None)
    assert front.server.per_ip == {"198.51.100.1": 1, "198.51.100.2": 1}


def test_every_filters_buffers_together_are_bounded_and_the_least_polled_stop_first() -> None:
    t = FilterTable(idle_timeout=300.0, max_filters=100, max_changes=1000, max_changes_total=10)
    rare = t.install(FilterKind.BLOCKS, None, now=0.0)
    often = t.install(FilterKind.BLOCKS, None, now=0.0)
    for n in range(4):
        t.on_blocks([Block(n, f"0x{n:064x}", [])])
    assert t.poll(often, 1.0) == [f"0x{n:064x}" for n in range(4)]
    assert t.buffered == 4
    got: list[str] = []
    for n in range(4, 12):  # rare reaches 10 changes (the node's bound) on its way
        got += t.on_blocks([Block(n, f"0x{n:064x}", [])])
        assert t.buffered <= 10
        t.poll(often, 1.0)
    assert got == [rare]  # the one nobody polled stopped, not the other
    with pytest.raises(FilterOverflowed) as over:
        t.poll(rare, 2.0)
    assert over.value.data == {"limit": "filters.max_changes_total", "value": 10}
    assert "this node's filters hold 10 changes in all" in over.value.message
    t.on_blocks([Block(12, f"0x{12:064x}", [])])
    assert t.poll(often, 2.0) == [f"0x{12:064x}"] and t.buffered == 0
    assert FiltersConfig().max_changes_total == 1_000_000
