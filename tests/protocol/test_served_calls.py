"""Which calls are served: the allow lists of the node, its tiers and keys, the eth_getLogs
guards and a tier's batch length, decided without sockets. The upstream is in memory and
records what reaches it, so a refusal is seen to cost no upstream call."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from chainrelay.access.identity import Identity, enter_identity, leave_identity
from chainrelay.access.methods import (
    DEFAULT_METHODS,
    MethodRules,
    TierLists,
    check_entries,
)
from chainrelay.app import log_guards_of, methods_of
from chainrelay.chain.head import HeadTracker
from chainrelay.chain.profiles import PROFILES
from chainrelay.config import (
    Config,
    HeadConfig,
    LimitsConfig,
    PoolConfig,
    TierConfig,
    loads,
)
from chainrelay.errors import ConfigError
from chainrelay.metrics import Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import MemoryCache, new_entry
from chainrelay.rpc.logguards import LogGuards
from chainrelay.rpc.policy import HeadView
from chainrelay.rpc.service import RpcService
from chainrelay.server.pending import Owed
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import Upstream
from chainrelay.wire.jsonrpc import Answer, parse_body
from tests.protocol.test_rpc_hits import head_at

ADDR = "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266"
TOPIC = "0x" + "ab" * 32
UPSTREAM = '[[upstreams]]\nurl = "http://127.0.0.1:1"\n'


class RecordingNode(Upstream):
    """Answers every call, and records it: eth_getLogs with ``logs`` logs of its range's
    first block, anything else with its own method's name."""

    def __init__(self, logs: int = 1) -> None:
        super().__init__("mem", "mem://", timeout=30, connections=1)
        self.logs = logs
        self.methods: list[str] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def request(self, body: bytes) -> bytes:
        doc = orjson.loads(body)
        docs = doc if isinstance(doc, list) else [doc]
        out = [self._answer(d) for d in docs]
        return b"[" + b",".join(out) + b"]" if isinstance(doc, list) else out[0]

    def _answer(self, d: dict[str, Any]) -> bytes:
        self.methods.append(d["method"])
        result: Any = d["method"]
        if d["method"] == "eth_getLogs":
            result = [log_at(int(d["params"][0]["fromBlock"], 16), i) for i in range(self.logs)]
        return orjson.dumps({"jsonrpc": "2.0", "id": d["id"], "result": result})


def log_at(number: int, index: int) -> dict[str, Any]:
    return {
        "address": ADDR,
        "topics": [TOPIC],
        "data": "0x" + "00" * 64,
        "blockNumber": hex(number),
        "blockHash": "0x" + f"{number:x}".rjust(64, "a"),
        "transactionHash": "0x" + f"{index:x}".rjust(64, "c"),
        "transactionIndex": "0x0",
        "logIndex": hex(index),
        "removed": False,
    }


def make_service(
    node: RecordingNode,
    methods: MethodRules | None = None,
    guards: LogGuards | None = None,
    tiers: dict[str, TierConfig] | None = None,
) -> RpcService:
    metrics = Metrics()
    pool = UpstreamPool([node], PoolConfig(hedge=False), metrics)
    head = HeadTracker(pool, PROFILES["bsc"], metrics, HeadConfig())
    head_at(head.view, 100)
    head.view.safe = 95
    return RpcService(
        MemoryCache(1 << 24, 1 << 20),
        pool,
        head,
        metrics,
        56,
        LimitsConfig(),
        methods=methods,
        log_guards=guards,
        tiers=tiers,
    )


def request(method: str, params: Any = (), id_: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": list(params)}


ANYONE = Identity("10.0.0.1")


async def ask(service: RpcService, doc: Any, who: Identity = ANYONE) -> Any:
    """The decoded answer to ``doc`` (a call or a batch) from ``who``."""
    now = service.handle(orjson.dumps(doc), who)
    if isinstance(now, bytes):
        got: bytes | None = now
    else:
        token = enter_identity(who)
        task = asyncio.ensure_future(now)
        leave_identity(token)
        got = await task
    assert got is not None
    return orjson.loads(got) if got else None


def error_of(answer: Any) -> tuple[int, str]:
    assert "error" in answer, answer
    return answer["error"]["code"], answer["error"]["message"]


# --- the allow lists ---------------------------------------------------------------------
def test_the_default_list_serves_what_a_dapp_needs_and_no_node_internals() -> None:
    rules = MethodRules()
    who = Identity("10.0.0.1")
    for method in (
        *policy.RULES.keys() - {"debug_traceBlockByNumber", "debug_traceBlockByHash"},
        "net_listening",
        "web3_sha3",
        "eth_simulateV1",
    ):
        assert method in rules.names(who), method
        assert rules.refusal(method, who) is None, method
    for method in (
        "debug_traceTransaction",
        "debug_traceBlockByNumber",  # in the policy table, but a debug_ method
        "trace_block",
        "txpool_content",
        "admin_peers",
        "personal_unlockAccount",
        "miner_start",
        "engine_forkchoiceUpdatedV3",
        "anvil_setBalance",
        "evm_mine",
        "hardhat_reset",
        "eth_sendTransaction",  # signs with the node's own keys
        "eth_sign",
    ):
        assert method not in rules.names(who), method
        assert rules.refusal(method, who) == f"the method {method} is disabled on this node"
    # Not a method of any client: unknown, in geth's words, not "disabled".
    assert rules.refusal("relay_doesNotExist", who) == (
        "the method relay_doesNotExist does not exist/is not available"
    )


def test_families_and_names_enabled_per_node_and_per_tier_in_order() -> None:
    rules = MethodRules(
        enable=["debug_*", "anvil_nodeInfo"],
        disable=["eth_sendRawTransaction", "debug_traceCall"],
        tiers={
            "pro": TierLists(enable=["trace_*", "eth_sendRawTransaction"]),
            "locked": TierLists(disable=["debug_*", "eth_getLogs"]),
        },
    )
    free, pro, locked = Identity("a"), Identity("b", "pro"), Identity("c", "locked")
    # The node's families: whole, members the node never heard of included.
    assert rules.refusal("debug_traceTransaction", free) is None
    assert rules.refusal("debug_someFutureTrace", free) is None
    assert "debug_traceBlockByNumber" in rules.names(free)  # cached ones replay too
    assert rules.refusal("anvil_nodeInfo", free) is None
    assert rules.refusal("anvil_setBalance", free) is not None  # a name, not the family
    # The node's refusals come after its enables: disabled, by name.
    assert rules.refusal("debug_traceCall", free) == (
        "the method debug_traceCall is disabled on this node"
    )
    assert "eth_sendRawTransaction" not in rules.names(free)
    # A tier's lists come last: it enables what the node refused, for its clients only.
    assert "eth_sendRawTransaction" in rules.names(pro)
    assert rules.refusal("trace_block", pro) is None
    assert rules.refusal("trace_block", free) is not None
    assert rules.refusal("debug_traceTransaction", locked) is not None
    assert "eth_getLogs" not in rules.names(locked)
    # An identity naming a tier the node does not have is held to the default tier.
    assert rules.names(Identity("d", "gone")) == rules.names(free)


def test_a_keys_own_list_narrows_its_tier_and_never_widens_it() -> None:
    rules = MethodRules(tiers={"pro": TierLists(enable=["debug_*"])})
    key = Identity(
        "key:k1",
        "pro",
        key="k1",
        methods=frozenset({"eth_chainId", "debug_*", "trace_block", "eth_getLogs"}),
    )
    assert rules.names(key) == {"eth_chainId", "eth_getLogs", *_debug(rules.names(key))}
    assert rules.refusal("debug_traceTransaction", key) is None
    assert rules.refusal("eth_getBalance", key) == (
        "the method eth_getBalance is not enabled for this API key"
    )
    # On its list, but not its tier's: the tier's refusal.
    assert rules.refusal("trace_block", key) == "the method trace_block is disabled on this node"
    assert rules.names(key) is rules.names(key)  # made once


def _debug(names: frozenset[str]) -> set[str]:
    return {n for n in names if n.startswith("debug_")}


def test_list_entries_are_names_or_families_and_a_bad_one_is_named() -> None:
    assert check_entries(["eth_call", "debug_*", "anvil_nodeInfo"], "methods.enable") is None
    for bad in ("debug*", "*", "eth_", "", "debug_*_x", "eth call"):
        assert check_entries(["eth_call", bad], "x") is not None, bad
    with pytest.raises(ConfigError, match=r"methods.enable\[1\]"):
        loads('[methods]\nenable = ["eth_call", "debug*"]\n' + UPSTREAM)
    with pytest.raises(ConfigError, match=r"tiers.pro.disable_methods\[0\]"):
        loads('[tiers.pro]\ndisable_methods = ["*"]\n' + UPSTREAM)
    cfg = loads(
        '[methods]\nenable = ["debug_*"]\n[tiers.pro]\nenable_methods = ["trace_*"]\n' + UPSTREAM
    )
    rules = methods_of(cfg)
    assert rules.refusal("trace_block", Identity("a", "pro")) is None
    assert rules.refusal("trace_block", Identity("a")) is not None
    assert rules.refusal("debug_traceTransaction", Identity("a")) is None


def test_the_defaults_are_the_whole_list_when_nothing_is_written() -> None:
    assert methods_of(Config()).names(Identity("a")) == DEFAULT_METHODS


# --- the pipeline: every path ------------------------------------------------------------
async def test_refused_calls_answer_minus_32601_and_never_reach_an_upstream() -> None:
    node = RecordingNode()
    service = make_service(node)
    for method, word in (
        ("debug_traceTransaction", "is disabled on this node"),
        ("anvil_setBalance", "is disabled on this node"),
        ("eth_sendTransaction", "is disabled on this node"),
        ("relay_doesNotExist", "does not exist/is not available"),
    ):
        got = await ask(service, request(method, [ADDR]))
        assert got["id"] == 1
        assert error_of(got) == (-32601, f"the method {method} {word}")
    # A refused notification is owed nothing.
    assert service.handle(orjson.dumps({"jsonrpc": "2.0", "method": "anvil_mine"})) == b""
    assert node.methods == []
    # What the list serves goes on: an uncached read reaches the upstream.
    assert (await ask(service, request("eth_gasPrice")))["result"] == "eth_gasPrice"
    assert node.methods == ["eth_gasPrice"]


async def test_a_batch_mixing_allowed_and_refused_calls_is_answered_in_order() -> None:
    node = RecordingNode()
    service = make_service(node, MethodRules(tiers={"pro": TierLists(enable=["debug_*"])}))
    batch = [
        request("eth_chainId", id_=1),
        request("debug_traceTransaction", ["0x" + "11" * 32], id_=2),
        request("eth_gasPrice", id_=3),  # a miss: the rest is served on the slow path
        request("anvil_setBalance", [ADDR, "0x1"], id_=4),
        {"jsonrpc": "2.0", "method": "evm_mine"},  # a refused notification: no answer
        request("nope_nothing", id_=5),
        request("eth_chainId", id_=6),
    ]
    got = await ask(service, batch)
    assert [a["id"] for a in got] == [1, 2, 3, 4, 5, 6]
    assert got[0]["result"] == "0x38" and got[2]["result"] == "eth_gasPrice"
    assert error_of(got[1])[0] == error_of(got[3])[0] == error_of(got[4])[0] == -32601
    assert "disabled" in error_of(got[3])[1] and "does not exist" in error_of(got[4])[1]
    assert node.methods == ["eth_gasPrice"]
    # The same batch from a tier with debug_ enabled: that call goes upstream.
    got = await ask(service, batch, Identity("10.0.0.2", "pro"))
    assert got[1]["result"] == "debug_traceTransaction"
    assert error_of(got[3])[0] == -32601


def _warm_balance(service: RpcService) -> bytes:
    """A cached eth_getBalance at "latest"; its body with id 1."""
    body = orjson.dumps(request("eth_getBalance", [ADDR, "latest"]))
    (call,), _ = parse_body(body, 10)
    assert not isinstance(call, bytes)
    key = policy.plan(call.method, call.params, service.view).key
    assert key is not None
    service.cache.put(key, new_entry(b'"0x2a"'))
    return body


async def test_a_replay_is_checked_against_the_callers_own_list() -> None:
    node = RecordingNode()
    service = make_service(node)
    body = _warm_balance(service)
    anyone = Identity("10.0.0.1")
    answer, record = service.serve(body, anyone)
    assert answer == b'{"jsonrpc":"2.0","id":1,"result":"0x2a"}' and record is not None
    # The pipeline's table and the front door's (through ``replay``) key on bytes: a key
    # whose list lacks the method gets no replay of another client's answer...
    narrow = Identity("key:k", key="k", methods=frozenset({"eth_chainId"}))
    assert service.replay(record, narrow) is None
    got = await ask(service, orjson.loads(body), narrow)
    assert error_of(got) == (-32601, "the method eth_getBalance is not enabled for this API key")
    # ... while anyone else's repeats are replays still.
    assert service.replay(record, anyone) == b'"0x2a"'
    assert service.serve(body, anyone)[0] == answer
    assert node.methods == []


def test_a_forwarded_call_is_sent_again_only_for_a_caller_allowed_it() -> None:
    service = make_service(RecordingNode())
    forwarder = service._forwarder
    rest = b'{"jsonrpc":"2.0","id":,"method":"eth_gasPrice","params":[]}'
    forwarder.passes.add(rest, ("eth_gasPrice", b"tail"), service.view.generation)
    narrow = Identity("key:k", key="k", methods=frozenset({"eth_chainId"}))
    # Refused before any upstream is looked at (there is no WebSocket upstream here).
    out = Owed(lambda _: None)
    assert not forwarder.again(rest, b"1", rest, service.allowed(narrow), out)
    assert not out.done()
    assert "eth_gasPrice" not in service.allowed(narrow)
    assert "eth_gasPrice" in service.allowed(Identity("10.0.0.1"))


async def test_a_tiers_batch_length_applies_to_its_clients() -> None:
    tiers = {"default": TierConfig(max_batch_len=10), "pro": TierConfig(max_batch_len=50)}
    service = make_service(RecordingNode(), tiers=tiers)
    eleven = [request("eth_chainId", id_=i) for i in range(11)]
    got = await ask(service, eleven)
    assert got["id"] is None
    assert error_of(got) == (-32600, "batch of 11 exceeds the limit of 10")
    got = await ask(service, eleven, Identity("key:p", "pro", key="p"))
    assert [a["result"] for a in got] == ["0x38"] * 11
    # The node's [limits] max_batch_len stays the ceiling of every tier.
    assert make_service(RecordingNode(), tiers={"big": TierConfig(max_batch_len=5000)})
    big = make_service(RecordingNode(), tiers={"big": TierConfig(max_batch_len=5000)})
    assert big.batch_len_by_tier["big"] == LimitsConfig().max_batch_len


# --- eth_getLogs guards --------------------------------------------------------------------
def view_at(number: int, safe: int, finalized: int) -> HeadView:
    view = HeadView()
    head_at(view, number)
    view.safe, view.finalized = safe, finalized
    return view


def guard_of(error: bytes | None) -> tuple[str, int] | None:
    if error is None:
        return None
    doc = orjson.loads(error)
    assert doc["code"] == -32005
    return doc["data"]["limit"], doc["data"]["value"]


def test_the_range_guard_resolves_tags_against_the_head_first() -> None:
    guards = LogGuards(50, 3, 2, 1000)
    view = view_at(1000, safe=990, finalized=980)

    def check(flt: dict[str, Any]) -> tuple[str, int] | None:
        return guard_of(guards.refusal([flt], view))

    assert check({}) is None  # latest to latest: one block
    assert check({"fromBlock": "earliest"}) == ("logs.max_block_range", 50)
    assert check({"fromBlock": "0x0", "toBlock": "latest"}) == ("logs.max_block_range", 50)
    assert check({"fromBlock": hex(951)}) is None  # 951..1000: 50 blocks
    assert check({"fromBlock": hex(950)}) == ("logs.max_block_range", 50)
    assert check({"fromBlock": "finalized", "toBlock": "safe"}) is None  # 11 blocks
    assert check({"fromBlock": "earliest", "toBlock": "finalized"}) is not None
    assert check({"fromBlock": {"blockNumber": "0x0"}, "toBlock": "pending"}) is not None
    assert check({"fromBlock": "latest", "toBlock": "0x0"}) is None  # empty: upstream's
    # One block by hash, whatever the range would be.
    assert check({"blockHash": "0x" + "11" * 32}) is None
    # A head not known yet: tags cannot be judged; explicit numbers still are.
    assert guard_of(guards.refusal([{"fromBlock": "earliest"}], HeadView())) is None
    assert guard_of(guards.refusal([{"fromBlock": "0x0", "toBlock": "0x64"}], HeadView()))
    # Malformed params are the upstream's to refuse.
    for params in ([], "x", [1], [{"fromBlock": 5}], [{"fromBlock": "0xzz"}]):
        assert guards.refusal(params, view) is None


def test_the_address_topic_and_size_guards_name_themselves() -> None:
    guards = LogGuards(50, 3, 2, 1000)
    view = view_at(1000, 990, 980)
    many = [ADDR[:-1] + str(i) for i in range(4)]
    error = guards.refusal([{"address": many}], view)
    assert guard_of(error) == ("logs.max_addresses", 3)
    assert b"limited to 3 addresses per query; this query names 4" in (error or b"")
    assert guards.refusal([{"address": many[:3]}], view) is None
    assert guards.refusal([{"address": ADDR}], view) is None
    error = guards.refusal([{"topics": [TOPIC, None, [TOPIC, TOPIC, TOPIC]]}], view)
    assert guard_of(error) == ("logs.max_topics_per_position", 2)
    assert b"position 2 of this query has 3" in (error or b"")
    # By block hash too: the addresses and topics still count.
    flt = {"blockHash": "0x" + "11" * 32, "address": many}
    assert guard_of(guards.refusal([flt], view)) == ("logs.max_addresses", 3)
    assert guards.oversize(1000) is None
    error = guards.oversize(1001)
    assert guard_of(error) == ("logs.max_answer_bytes", 1000)
    assert b"response size exceeded" in (error or b"")


def test_the_default_range_is_the_chain_profiles() -> None:
    assert log_guards_of(Config(), PROFILES["bsc"]).max_block_range == 10_000
    assert log_guards_of(Config(), PROFILES["arbitrum"]).max_block_range == 100_000
    assert log_guards_of(Config(), PROFILES["devnet"]).max_block_range == 100_000
    cfg = loads("[logs]\nmax_block_range = 500\n" + UPSTREAM)
    assert log_guards_of(cfg, PROFILES["arbitrum"]).max_block_range == 500
    with pytest.raises(ConfigError, match=r"logs\.max_block_range"):
        loads("[logs]\nmax_block_range = -1\n" + UPSTREAM)
    # The pipeline's own default, built without a config, is the profile's too.
    assert make_service(RecordingNode()).log_guards.max_block_range == 10_000


async def test_a_log_query_past_a_guard_is_refused_before_any_upstream_call() -> None:
    node = RecordingNode()
    service = make_service(node, guards=LogGuards(50, 3, 2, 10_000))
    got = await ask(service, request("eth_getLogs", [{"fromBlock": "0x0"}]))
    code, message = error_of(got)
    assert code == -32005 and "limited to a 50 block range; this query spans 101" in message
    assert got["error"]["data"] == {"limit": "logs.max_block_range", "value": 50}
    batch = [
        request("eth_getLogs", [{"fromBlock": "0x40"}], id_=1),
        request("eth_getLogs", [{"fromBlock": "earliest", "toBlock": "safe"}], id_=2),
    ]
    got = await ask(service, batch)
    assert got[0]["result"] and error_of(got[1])[0] == -32005
    assert node.methods == ["eth_getLogs"]
    # The node's own range reads (a filter's eth_getFilterLogs) are held to the same.
    answer = await service.call("eth_getLogs", [{"fromBlock": "0x0"}])
    assert guard_of(answer.error) == ("logs.max_block_range", 50)
    assert node.methods == ["eth_getLogs"]


async def test_an_answer_past_the_size_guard_is_refused_and_never_cached() -> None:
    node = RecordingNode(logs=40)  # ~500 bytes a log: ~20 KB
    service = make_service(node, guards=LogGuards(50, 3, 2, 10_000))
    call = request("eth_getLogs", [{"fromBlock": "0x60", "toBlock": "0x60"}])
    for _ in range(2):
        got = await ask(service, call)
        assert error_of(got)[0] == -32005
        assert got["error"]["data"] == {"limit": "logs.max_answer_bytes", "value": 10_000}
    assert node.methods == ["eth_getLogs"] * 2  # not cached: asked again
    # In a batch too, beside an answer under the bound.
    node.logs = 1
    small = request("eth_getLogs", [{"fromBlock": "0x50", "toBlock": "0x50"}], id_=2)
    got = await ask(service, [small, request("eth_chainId", id_=3)])
    assert len(got[0]["result"]) == 1
    node.logs = 40
    got = await ask(service, [request("eth_chainId", id_=3), {**small, "params": [{}]}])
    assert error_of(got[1])[0] == -32005
    # An answer from the block logs the node holds is measured the same way.
    node.methods.clear()
    big = orjson.dumps([log_at(0x61, i) for i in range(40)])

    async def held(_params: Any) -> Answer:
        return Answer(big, None)

    service.local_logs = held
    got = await ask(service, request("eth_getLogs", [{"fromBlock": "0x61", "toBlock": "0x61"}]))
    assert got["error"]["data"]["limit"] == "logs.max_answer_bytes"
    assert node.methods == []
