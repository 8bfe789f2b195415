"""Upstream routing with in-memory upstreams (no sockets): roles and weights, budgets,
capabilities learnt from answers, and the wordings that tell them.

The upstreams here are scripted nodes: each answers by a rule the test gives it (a block
it pruned, a method it lacks, a rate it allows), as a real node or provider would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from chainrelay import defaults as d
from chainrelay.config import PoolConfig, UpstreamConfig, loads
from chainrelay.errors import ConfigError, UpstreamOverloaded, error_code
from chainrelay.metrics import Metrics
from chainrelay.upstreams.budget import Budget
from chainrelay.upstreams.capabilities import WORDINGS, Capabilities, Verdict, classify
from chainrelay.upstreams.make import make_upstream, request_headers
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.route import FALLBACK, PRIMARY, Route
from chainrelay.upstreams.upstream import HttpUpstream, TransportError, Upstream
from chainrelay.wire.jsonrpc import Answer
from tests.lab.procs import until
from tests.lab.timing import SECOND

BALANCE = "0x2a"
Rule = Callable[[str, list[Any]], dict[str, Any]]


def ok(_method: str, _params: list[Any]) -> dict[str, Any]:
    return {"result": BALANCE}


def error(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def pruned_below(lowest: int) -> Rule:
    """A node that holds state from block ``lowest`` on (geth's wording below it)."""

    def rule(method: str, params: list[Any]) -> dict[str, Any]:
        if method == "eth_getBalance" and int(params[1], 16) < lowest:
            return error(-32000, "missing trie node 3f1a (path ) <nil>")
        return ok(method, params)

    return rule


def lacking(missing: str) -> Rule:
    """A node without the method ``missing`` (geth's wording)."""

    def rule(method: str, params: list[Any]) -> dict[str, Any]:
        if method == missing:
            return error(-32601, f"the method {missing} does not exist/is not available")
        return ok(method, params)

    return rule


class ScriptedUpstream(Upstream):
    """A node in memory answering by ``rule``; counts the calls of each method and the
    calls in flight at once (``peak``). ``gate``: when set, every call waits for it."""

    def __init__(
        self, name: str, rule: Rule = ok, *, tier: int = PRIMARY, weight: int = 1, **route: Any
    ) -> None:
        super().__init__(name, f"memory://{name}", timeout=5.0, connections=1)
        self.rule = rule
        self.route = Route(tier=tier, weight=weight, **route)
        self.latest = 1_000
        self.asked: list[tuple[str, list[Any]]] = []
        self.gate: asyncio.Event | None = None
        self.peak = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.asked if m == method)

    async def request(self, body: bytes) -> bytes:
        doc = orjson.loads(body)
        self.peak = max(self.peak, self.in_flight)
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(doc, list):
            out = []
            for call in doc:
                self.asked.append((call["method"], call["params"]))
                out.append(
                    {"jsonrpc": "2.0", "id": call["id"]} | self.rule(call["method"], call["params"])
                )
            return orjson.dumps(out)
        self.asked.append((doc["method"], doc["params"]))
        return orjson.dumps(
            {"jsonrpc": "2.0", "id": doc["id"]} | self.rule(doc["method"], doc["params"])
        )


def pool_of(*upstreams: Upstream, **settings: Any) -> UpstreamPool:
    cfg = PoolConfig(hedge=False, deadline=2 * SECOND, **settings)
    return UpstreamPool(list(upstreams), cfg, Metrics())


def balance_at(block: int) -> tuple[str, list[Any], int]:
    """An eth_getBalance at ``block``, with the block as the pool's ``min_block`` (as
    ``policy.plan`` gives it)."""
    return "eth_getBalance", ["0x" + "11" * 20, hex(block)], block


# --- the wordings ---------------------------------------------------------------------


@pytest.mark.parametrize(("words", "verdict", "source"), WORDINGS)
def test_every_wording_of_the_table_is_told_apart(
    words: tuple[str, ...], verdict: Verdict, source: str
) -> None:
    message = "Error: " + " ... ".join(w.upper() for w in words) + " (0xabc)"
    raw = orjson.dumps({"code": -32000, "message": message})
    if words == ("blockoutofrangeerror",):
        raw = orjson.dumps(
            {"code": -32602, "message": message + " block height is 9 but requested was 3"}
        )
    assert classify(raw) is verdict, source


@pytest.mark.parametrize(
    "message",
    [
        "execution reverted",
        "execution reverted: ERC20: transfer amount exceeds balance",
        "insufficient funds for gas * price + value",
        "nonce too low",
        "invalid argument 0: hex string has length 3, want 40 for common.Address",
        "pending block is not available",
        # anvil's range error for a block it has not mined yet: a lagging node, not pruned
        "BlockOutOfRangeError: block height is 3 but requested was 9",
    ],
)
def test_every_other_error_is_the_nodes_real_answer(message: str) -> None:
    assert classify(orjson.dumps({"code": -32000, "message": message})) is None


def test_a_method_not_found_code_is_unsupported_whatever_its_words() -> None:
    assert classify(b'{"code":-32601,"message":"no such thing"}') is Verdict.UNSUPPORTED
    assert classify(b"not json") is None and classify(None) is None


def test_anvils_own_pruned_answer_is_in_the_table() -> None:
    # Measured: anvil --prune-history answers a state read of an older block so.
    raw = (
        b'{"code":-32602,"message":"BlockOutOfRangeError: block height is 35 but requested was 33"}'
    )
    assert classify(raw) is Verdict.PRUNED


# --- roles and weights -------------------------------------------------------------------


async def test_primaries_share_reads_by_weight_and_the_fallback_gets_none() -> None:
    a = ScriptedUpstream("a", weight=3)
    b = ScriptedUpstream("b", weight=1)
    paid = ScriptedUpstream("paid", tier=FALLBACK)
    pool = pool_of(a, b, paid)
    for _ in range(400):
        await pool.call("eth_getBalance", ["0x00", "latest"])
    assert (a.count("eth_getBalance"), b.count("eth_getBalance")) == (300, 100)
    assert paid.asked == []


async def test_the_fallback_serves_only_while_no_primary_can() -> None:
    primary = ScriptedUpstream("primary")
    paid = ScriptedUpstream("paid", tier=FALLBACK)
    pool = pool_of(primary, paid)
    primary.healthy = False
    await pool.call("eth_getBalance", ["0x00", "latest"])
    assert len(paid.asked) == 1
    primary.healthy = True
    primary.latest, paid.latest = 990, 1_000  # lagging past max_lag_blocks
    await pool.call("eth_getBalance", ["0x00", "latest"])
    assert len(paid.asked) == 2
    primary.latest = 1_000
    for _ in range(20):
        await pool.call("eth_getBalance", ["0x00", "latest"])
    assert len(paid.asked) == 2 and len(primary.asked) == 20


async def test_an_upstream_whose_head_is_not_trusted_is_asked_only_when_none_else_can() -> None:
    a = ScriptedUpstream("a")
    forked = ScriptedUpstream("forked", weight=100)
    c = ScriptedUpstream("c")
    pool = pool_of(a, forked, c)
    pool.head_flags["forked"] = "fork"
    for _ in range(20):
        await pool.call("eth_getBalance", ["0x00", "latest"])
    assert forked.asked == [] and len(a.asked) + len(c.asked) == 20
    assert pool.direct("eth_getBalance") is not forked
    a.healthy = c.healthy = False
    await pool.call("eth_getBalance", ["0x00", "latest"])
    assert len(forked.asked) == 1, "the last resort still answers"
    a.healthy = c.healthy = True
    del pool.head_flags["forked"]  # it agrees again
    for _ in range(20):
        await pool.call("eth_getBalance", ["0x00", "latest"])
    assert forked.count("eth_getBalance") > 10


async def test_a_hedge_is_never_billed_to_a_fallback() -> None:
    primary = ScriptedUpstream("primary")
    paid = ScriptedUpstream("paid", tier=FALLBACK)
    pool = UpstreamPool([primary, paid], PoolConfig(hedge=True, hedge_min_delay=0.0), Metrics())
    primary.samples.extend([0.0] * 20)  # a hedge is due at once
    primary.gate = asyncio.Event()
    call = asyncio.ensure_future(pool.call("eth_getBalance", ["0x00", "latest"]))
    await until(lambda: primary.peak == 1, 5 * SECOND, "the primary asked")
    primary.gate.set()
    assert (await call).result == b'"0x2a"'
    assert paid.asked == []


# --- capabilities ----------------------------------------------------------------------


async def test_a_pruned_block_is_read_from_the_archive_and_learnt() -> None:
    pruned = ScriptedUpstream("pruned", pruned_below(900))
    archive = ScriptedUpstream("archive", tier=FALLBACK, caps=Capabilities(archive=True))
    pool = pool_of(pruned, archive)
    method, params, block = balance_at(500)
    answer = await pool.call(method, params, block)
    assert answer.error is None and answer.result == b'"0x2a"'
    assert pruned.route.caps.lowest >= 501 and archive.route.caps.lowest == 0
    # Probed in the background: the lowest block it holds, found by bisection.
    await until(lambda: pruned.route.caps.lowest == 900, 5 * SECOND, "the bound probed")
    asked = pruned.count("eth_getBalance")
    for block in (100, 700, 899):
        method, params, block = balance_at(block)
        assert (await pool.call(method, params, block)).error is None
    assert pruned.count("eth_getBalance") == asked  # skipped: it does not hold them
    method, params, block = balance_at(950)
    archive_before = len(archive.asked)
    assert (await pool.call(method, params, block)).error is None
    assert len(archive.asked) == archive_before  # held by the primary: the fallback rests
    await pool.stop()


async def test_a_missing_method_is_asked_elsewhere_marked_and_asked_again_later() -> None:
    bare = ScriptedUpstream("bare", lacking("trace_block"), caps=Capabilities(ttl=0.2 * SECOND))
    full = ScriptedUpstream("full")
    full.latency = 1.0  # slower: the bare node is asked first while it may have the method
    pool = pool_of(bare, full)
    for _ in range(4):
        answer = await pool.call("trace_block", ["0x1"])
        assert answer.error is None
    assert bare.count("trace_block") == 1 and full.count("trace_block") == 4
    assert bare.route.caps.unsupported(0.0) == ["trace_block"]
    await until(
        lambda: not bare.route.caps.serves("trace_block", -1, time.perf_counter()),
        1,
        "marked",
    )
    await until(
        lambda: bare.route.caps.serves("trace_block", -1, time.perf_counter()),
        5 * SECOND,
        "expired",
    )
    for _ in range(2):  # the weighted turn comes back to it within two calls
        await pool.call("trace_block", ["0x1"])
    assert bare.count("trace_block") == 2  # the mark ended: it may have gained the method


async def test_a_real_error_is_the_nodes_answer_and_no_one_else_is_asked() -> None:
    reverted = ScriptedUpstream("reverted", lambda m, p: error(3, "execution reverted"))
    other = ScriptedUpstream("other")
    other.latency = 1.0
    pool = pool_of(reverted, other)
    answer = await pool.call("eth_call", [{"to": "0x00"}, "latest"])
    assert answer.error_message() == "execution reverted"
    assert other.asked == []


async def test_when_every_upstream_declines_the_first_nodes_own_error_goes_back() -> None:
    a = ScriptedUpstream("a", lacking("debug_x"))
    b = ScriptedUpstream("b", lacking("debug_x"))
    b.latency = 1.0
    pool = pool_of(a, b)
    answer = await pool.call("debug_x", [])
    assert answer.error is not None and orjson.loads(answer.error)["code"] == -32601
    assert a.count("debug_x") == 1 and b.count("debug_x") == 1


async def test_a_single_upstream_that_lacks_a_method_answers_once() -> None:
    only = ScriptedUpstream("only", lacking("debug_x"))
    pool = pool_of(only)
    answer = await pool.call("debug_x", [])
    assert orjson.loads(answer.error or b"{}")["code"] == -32601
    assert only.count("debug_x") == 1  # not asked again by the call's other attempts


async def test_a_batch_member_declined_is_asked_again_elsewhere() -> None:
    pruned = ScriptedUpstream("pruned", pruned_below(900))
    archive = ScriptedUpstream("archive", tier=FALLBACK)
    pool = pool_of(pruned, archive)
    calls = [("eth_getBalance", ["0x00", hex(n)]) for n in (950, 10, 960)]
    got = await pool.call_batch(calls)
    assert all(isinstance(a, Answer) and a.error is None for a in got), got
    assert archive.asked == [("eth_getBalance", ["0x00", "0xa"])]


async def test_a_slow_down_in_words_pauses_the_upstream_never_counts_against_it() -> None:
    busy = ScriptedUpstream("busy", lambda m, p: error(-32005, "Too Many Requests"))
    calm = ScriptedUpstream("calm")
    calm.latency = 1.0
    pool = pool_of(busy, calm, max_consecutive_errors=1)
    for _ in range(5):
        assert (await pool.call("eth_getBalance", ["0x00", "latest"])).error is None
    assert len(busy.asked) == 1 and len(calm.asked) == 5
    assert busy.healthy and busy.consecutive_errors == 0
    assert busy.slow_until > time.perf_counter()


# --- budgets ---------------------------------------------------------------------------


def test_a_rate_budget_allows_its_burst_then_its_rate() -> None:
    b = Budget(10.0)
    now = 100.0
    b.spend(now - 10)  # the bucket filled meanwhile
    sent = 0
    while b.open(now, 0):
        b.spend(now)
        sent += 1
    assert sent == 2  # 0.2 s of 10/s
    assert b.wait(now, 0) == pytest.approx(0.1)
    assert not b.open(now + 0.05, 0) and b.open(now + 0.11, 0)


def test_auto_tuning_cuts_once_a_period_and_climbs_back_slowly() -> None:
    b = Budget(100.0, auto_tune=True)
    t = 1_000.0
    for _ in range(5):  # one burst of 429s in one period: one cut
        b.slowed(t)
    assert b.rate == pytest.approx(100.0 * d.AUTO_TUNE_DECREASE)
    b.slowed(t + 1.5)
    assert b.rate == pytest.approx(100.0 * d.AUTO_TUNE_DECREASE**2)
    for i in range(200):  # quiet periods: back up to max_rps, never past it
        b.spend(t + 3 + i)
    assert b.rate == 100.0


def test_auto_tuning_without_a_bound_starts_from_the_rate_sent() -> None:
    b = Budget(0.0, auto_tune=True)
    t = 50.0
    for i in range(40):
        b.spend(t + i * 0.025)  # 40 calls a second
    b.slowed(t + 1.0)
    assert 30.0 <= b.rate <= 40.0 * d.AUTO_TUNE_DECREASE + 1


async def test_reads_past_an_upstreams_rate_go_to_another_within_its_own() -> None:
    paid = ScriptedUpstream("paid", budget=Budget(20.0))
    free = ScriptedUpstream("free")
    pool = pool_of(paid, free)
    for _ in range(100):
        await pool.call("eth_getBalance", ["0x00", "latest"])
    # 100 calls take well under a second here: the paid one took its share while its
    # budget lasted (its burst and the rate of the time they took), the free one the rest.
    assert len(paid.asked) <= 20 * 1.0 + 5, len(paid.asked)
    assert len(free.asked) >= 70


async def test_with_every_budget_spent_a_read_waits_its_bound_then_is_refused() -> None:
    only = ScriptedUpstream("only", budget=Budget(1.0))
    pool = pool_of(only, budget_wait=0.05 * SECOND)
    assert (await pool.call("eth_getBalance", ["0x00", "latest"])).error is None
    with pytest.raises(UpstreamOverloaded) as got:
        await pool.call("eth_getBalance", ["0x00", "latest"])
    assert error_code(got.value) == -32005 and "budget" in str(got.value)
    assert len(only.asked) == 1


async def test_concurrency_stays_at_its_bound_the_others_wait_their_turn() -> None:
    only = ScriptedUpstream("only", budget=Budget(0.0, 2))
    only.gate = asyncio.Event()
    pool = pool_of(only, budget_wait=5 * SECOND)
    calls = [
        asyncio.ensure_future(pool.call("eth_getBalance", ["0x00", "latest"])) for _ in range(8)
    ]
    await until(lambda: only.in_flight == 2, 5 * SECOND, "two in flight")
    only.gate.set()
    assert all(a.error is None for a in [await c for c in calls])
    assert only.peak == 2 and len(only.asked) == 8


async def test_a_429_pauses_the_upstream_and_never_takes_it_out() -> None:
    class Limited(ScriptedUpstream):
        async def request(self, body: bytes) -> bytes:
            self.asked.append(("429", []))
            raise TransportError("HTTP 429, retry after 30s", retry_after=30.0)

    limited = Limited("limited", budget=Budget(50.0, auto_tune=True))
    other = ScriptedUpstream("other")
    other.latency = 1.0
    pool = pool_of(limited, other, max_consecutive_errors=1)
    for _ in range(10):
        assert (await pool.call("eth_getBalance", ["0x00", "latest"])).error is None
    assert len(limited.asked) == 1  # paused for its Retry-After: not asked again
    assert limited.healthy and pool.in_rotation
    assert limited.route.budget.rate == pytest.approx(50.0 * d.AUTO_TUNE_DECREASE)


# --- config ----------------------------------------------------------------------------

UPSTREAMS = """
[[upstreams]]
name = "public"
url = "http://127.0.0.1:1"
weight = 2

[[upstreams]]
name = "paid"
url = "https://paid.example/v1"
role = "fallback"
max_rps = 25
max_concurrency = 8
archive = true
auth = "${PAID_USER}:${PAID_PASS}"
headers = { "X-Api-Key" = "k-123" }
"""


def test_routing_fields_build_the_route_and_the_headers() -> None:
    cfg = loads("[pool]\nauto_tune = true\n" + UPSTREAMS, {"PAID_USER": "u", "PAID_PASS": "p"})
    public, paid = (make_upstream(u, cfg.pool) for u in cfg.upstreams)
    assert (public.route.tier, public.route.weight) == (PRIMARY, 2)
    assert (public.route.budget.rate, public.route.budget.concurrency) == (0.0, 0)
    assert public.route.budget.auto_tune and public.headers == {}
    r = paid.route
    assert (r.tier, r.budget.rate, r.budget.concurrency) == (FALLBACK, 25.0, 8)
    assert r.budget.auto_tune and r.caps.archive
    assert isinstance(paid, HttpUpstream)
    assert paid.headers == {"X-Api-Key": "k-123", "Authorization": "Basic dTpw"}


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ('role = "backup"', "role"),
        ("weight = 0", "weight: must be positive"),
        ("max_rps = -1", "max_rps"),
        ('auth = "nocolon"', "auth"),
        ('headers = { "Bad Name" = "x" }', "headers"),
        ('headers = { "X-Ok" = "a\\r\\nInjected: 1" }', "line breaks"),
    ],
)
def test_bad_routing_fields_are_refused_by_name(entry: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        loads(f'[[upstreams]]\nurl = "http://127.0.0.1:1"\n{entry}\n')


def test_an_authorization_header_of_the_table_wins_over_auth() -> None:
    u = UpstreamConfig(url="http://x", auth="a:b", headers={"authorization": "Bearer t"})
    assert request_headers(u) == {"authorization": "Bearer t"}


def test_a_learnt_lowest_block_is_believed_for_the_ttl_then_asked_again() -> None:
    caps = Capabilities(ttl=10.0)
    assert caps.learn(Verdict.PRUNED, "eth_getBalance", 50, now=100.0)
    assert caps.lowest == 51 and not caps.serves("eth_call", 40, 105.0)
    assert caps.serves("eth_call", 60, 105.0)  # held: past the mark
    assert caps.serves("eth_call", 40, 111.0) and caps.lowest == 0  # the mark ended
    archive = Capabilities(archive=True)
    assert not archive.learn(Verdict.PRUNED, "eth_getBalance", 50, now=100.0)
    assert archive.serves("eth_call", 0, 100.0)


def test_an_http_upstreams_headers_and_auth_go_in_every_requests_head() -> None:
    cfg = loads(
        '[[upstreams]]\nurl = "https://user:pw@paid.example/v1"\nauth = "a:b"\n'
        'headers = { "X-Api-Key" = "k-1" }\n'
    )
    u = make_upstream(cfg.upstreams[0], cfg.pool)
    assert isinstance(u, HttpUpstream)
    head = u.target.head.decode()
    assert "\r\nX-Api-Key: k-1\r\n" in head
    assert head.count("Authorization:") == 1 and "Authorization: Basic YTpi\r\n" in head


# --- what a fallback costs while the primaries serve ---------------------------------------


class DownUpstream(ScriptedUpstream):
    """A node that cannot be reached: every call fails as a refused connection does."""

    async def request(self, body: bytes) -> bytes:
        self.asked.append((orjson.loads(body)["method"], []))
        raise TransportError("connection refused")


async def test_a_write_goes_to_every_primary_and_to_the_fallback_only_when_none_takes_it() -> None:
    a, b = ScriptedUpstream("a"), ScriptedUpstream("b")
    paid = ScriptedUpstream("paid", tier=FALLBACK)
    pool = pool_of(a, b, paid)
    for _ in range(3):
        await pool.broadcast("eth_sendRawTransaction", ["0x01"])
    await until(lambda: a.count("eth_sendRawTransaction") == 3, 5 * SECOND, "a's copies")
    await until(lambda: b.count("eth_sendRawTransaction") == 3, 5 * SECOND, "b's copies")
    assert paid.asked == []
    # Both primaries down but still in rotation (one failure each): the write fails on
    # them, then goes to the fallback, within the same call.
    down_a, down_b = DownUpstream("a"), DownUpstream("b")
    pool = pool_of(down_a, down_b, paid)
    assert (await pool.broadcast("eth_sendRawTransaction", ["0x01"])).result == b'"0x2a"'
    assert paid.count("eth_sendRawTransaction") == 1
    assert down_a.count("eth_sendRawTransaction") == down_b.count("eth_sendRawTransaction") == 1
    # No primary in rotation: straight to the fallback.
    pool = pool_of(a, paid)
    a.healthy = False
    await pool.broadcast("eth_sendRawTransaction", ["0x01"])
    assert paid.count("eth_sendRawTransaction") == 2 and a.count("eth_sendRawTransaction") == 3


async def test_a_primarys_real_error_to_a_write_is_the_answer_the_fallback_not_asked() -> None:
    nonce = error(-32000, "nonce too low")
    a = ScriptedUpstream("a", lambda _m, _p: nonce)
    paid = ScriptedUpstream("paid", tier=FALLBACK)
    answer = await pool_of(a, paid).broadcast("eth_sendRawTransaction", ["0x01"])
    assert answer.error_message() == "nonce too low" and paid.asked == []


def test_the_fallbacks_serve_while_no_primary_can_or_a_call_found_none_that_could() -> None:
    a = ScriptedUpstream("a")
    paid = ScriptedUpstream("paid", tier=FALLBACK)
    pool = pool_of(a, paid)
    assert not pool.fallbacks_serve(30.0)
    a.consecutive_errors = d.MAX_CONSECUTIVE_ERRORS  # its head polls fail: it is down
    assert pool.fallbacks_serve(30.0)
    a.consecutive_errors = 0
    a.latest = 1_000 - d.MAX_LAG_BLOCKS - 1  # lagging
    assert pool.fallbacks_serve(30.0)
    a.latest = 1_000
    pool.head_flags["a"] = "fork"
    assert pool.fallbacks_serve(30.0)
    pool.head_flags.clear()
    a.slow_until = time.perf_counter() + 10  # paused by a 429
    assert pool.fallbacks_serve(30.0)
    a.slow_until = 0.0
    assert not pool.fallbacks_serve(30.0)
    # A call the primary cannot take (it lacks the method) wants the fallback: it serves
    # for the next ``hold`` seconds.
    a.route.caps.learn(Verdict.UNSUPPORTED, "eth_getProof", -1, time.perf_counter())
    assert pool.candidates(-1, "eth_getProof")[0] is paid
    assert pool.fallbacks_serve(30.0) and not pool.fallbacks_serve(0.0)
    # No primary configured: the fallbacks always serve.
    assert pool_of(ScriptedUpstream("x", tier=FALLBACK)).fallbacks_serve(30.0)


def test_a_fallback_checked_slowly_is_judged_by_its_lag_at_the_check() -> None:
    a = ScriptedUpstream("a")
    paid = ScriptedUpstream("paid", tier=FALLBACK)
    pool = pool_of(a, paid)
    a.route.caps.learn(Verdict.UNSUPPORTED, "eth_getProof", -1, time.perf_counter())
    paid.latest = 1_000 - 30  # checked 30 blocks ago, level with the primaries then
    paid.slow_lag = 0
    assert pool.candidates(-1, "eth_getProof")[0] is paid, "it serves what a primary lacks"
    # Still not asked for a block past the head it was last seen at.
    assert pool.candidates(1_000, "eth_getProof")[0] is a
    paid.slow_lag = d.MAX_LAG_BLOCKS + 1  # it lagged at its check
    assert pool.candidates(-1, "eth_getProof")[0] is a


# --- a read forwarded by hash, sent by number where that block is the upstream's head ------
HEAD_HASH = "0x" + "ab" * 32
BY_HASH = ["0x" + "11" * 20, {"blockHash": HEAD_HASH}]
BY_NUMBER = ["0x" + "11" * 20, hex(1_000)]


async def test_a_read_pinned_to_the_upstreams_own_head_is_sent_by_number() -> None:
    u = ScriptedUpstream("u")
    u.head_hash, u.head_by_number = HEAD_HASH, True
    pool = pool_of(u)
    answer = await pool.call("eth_getBalance", BY_HASH, 1_000, at_head=(HEAD_HASH, BY_NUMBER))
    assert answer.result == orjson.dumps(BALANCE)
    assert u.asked == [("eth_getBalance", BY_NUMBER)]


@pytest.mark.parametrize("head_hash", [None, "0x" + "cd" * 32])
async def test_a_read_pinned_to_another_block_than_the_upstreams_head_stays_by_hash(
    head_hash: str | None,
) -> None:
    # Its head not known yet, or another block (a new head it moved to, a fork): only the
    # hash names the block the read is keyed by.
    u = ScriptedUpstream("u")
    u.head_hash, u.head_by_number = head_hash, True
    await pool_of(u).call("eth_getBalance", BY_HASH, 1_000, at_head=(HEAD_HASH, BY_NUMBER))
    assert u.asked == [("eth_getBalance", BY_HASH)]


async def test_each_upstream_tried_gets_the_form_its_own_head_allows() -> None:
    # The first at another head fails the try; the second, at the read's block, is asked
    # by number: the choice is made per try, not once per call.
    first = ScriptedUpstream("first", weight=1_000)
    first.head_hash, first.head_by_number = "0x" + "cd" * 32, True
    second = ScriptedUpstream("second", weight=1)
    second.head_hash, second.head_by_number = HEAD_HASH, True
    gone = TransportError("connection reset")
    tried: list[Any] = []

    async def refuse(body: bytes) -> bytes:
        tried.append(orjson.loads(body)["params"])
        raise gone

    first.request = refuse  # type: ignore[method-assign]
    answer = await pool_of(first, second, max_attempts=2).call(
        "eth_getBalance", BY_HASH, 1_000, at_head=(HEAD_HASH, BY_NUMBER)
    )
    assert answer.result == orjson.dumps(BALANCE)
    assert tried == [BY_HASH] and second.asked == [("eth_getBalance", BY_NUMBER)]


async def test_a_batch_sends_each_read_pinned_to_the_upstreams_head_by_number() -> None:
    u = ScriptedUpstream("u")
    u.head_hash, u.head_by_number = HEAD_HASH, True
    older = ["0x" + "11" * 20, {"blockHash": "0x" + "cd" * 32}]
    calls = [("eth_getBalance", BY_HASH), ("eth_getBalance", older), ("eth_chainId", [])]
    at_head = [(HEAD_HASH, BY_NUMBER), ("0x" + "cd" * 32, ["0x" + "11" * 20, "0x3e7"]), None]
    got = await pool_of(u).call_batch(calls, 1_000, at_head=at_head)
    assert [a.result for a in got if isinstance(a, Answer)] == [orjson.dumps(BALANCE)] * 3
    assert u.asked == [
        ("eth_getBalance", BY_NUMBER),
        ("eth_getBalance", older),
        ("eth_chainId", []),
    ]


async def test_an_upstream_not_declared_one_node_is_asked_by_hash_even_at_its_head() -> None:
    # Behind a provider's URL, nodes at the tip may sit on different forks: a number would
    # be answered from whichever took the request.
    u = ScriptedUpstream("u")
    u.head_hash = HEAD_HASH
    assert not u.head_by_number  # the default
    pool = pool_of(u)
    await pool.call("eth_getBalance", BY_HASH, 1_000, at_head=(HEAD_HASH, BY_NUMBER))
    await pool.call_batch([("eth_getBalance", BY_HASH)], 1_000, at_head=[(HEAD_HASH, BY_NUMBER)])
    assert u.asked == [("eth_getBalance", BY_HASH)] * 2


def test_head_by_number_is_set_from_the_upstreams_config() -> None:
    cfg = loads(
        '[[upstreams]]\nurl = "http://127.0.0.1:8545"\nhead_by_number = true\n'
        '[[upstreams]]\nurl = "ws://127.0.0.1:8546"\n'
    )
    one, two = (make_upstream(u, cfg.pool) for u in cfg.upstreams)
    assert one.head_by_number and not two.head_by_number
