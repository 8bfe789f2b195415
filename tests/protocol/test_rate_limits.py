"""Rate limits per identity, without sockets: the bucket math with a fake clock, the budget
no sequence of calls can pass, and the way every path of the pipeline and the HTTP front
door pays it (replays included), over a real ``RpcService`` whose upstream fails the test
if asked."""

from __future__ import annotations

import math

import orjson
import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from chainrelay.access.buckets import NEVER, OVERFLOW, Buckets, Costs, Limiter, TierRate
from chainrelay.access.door import Door
from chainrelay.access.forwarded import Trusted, parse_networks
from chainrelay.access.identity import NODE, Identity, for_address
from chainrelay.access.keys import KeyRing
from chainrelay.access.senders import SenderLimit, sender_of
from chainrelay.config import Config, loads
from chainrelay.errors import ConfigError, InvalidParams, RateLimited
from chainrelay.server.http import HttpProtocol, HttpServer, Routes
from chainrelay.server.replays import Replay
from tests.protocol.test_access_http import CAROL, PeerTransport
from tests.protocol.test_access_http import KEY as API_KEY
from tests.protocol.test_config import UPSTREAM
from tests.protocol.test_http_fast_path import Front, answers, balance, post


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


COSTS = Costs({"eth_getLogs": 10.0, "eth_call": 4.0, "eth_chainId": 0.5})


def limiter(rate: float = 10.0, burst: float = 20.0, hit: float = 1.0) -> tuple[Limiter, Clock]:
    clock = Clock()
    return Limiter({"default": TierRate(rate, burst, hit)}, COSTS, clock), clock


# --- the bucket math --------------------------------------------------------------------------
def test_a_bucket_starts_full_pays_up_front_and_refills_at_its_rate() -> None:
    b = Buckets()
    assert b.take("a", 15, rate=10, burst=20, now=0.0) == 0.0
    # 5 left: 10 more are 0.5 s away, and a refusal takes nothing.
    assert b.take("a", 10, rate=10, burst=20, now=0.0) == pytest.approx(0.5)
    assert b.take("a", 10, rate=10, burst=20, now=0.5) == 0.0
    assert b.tokens("a", 0.5) == pytest.approx(0.0)
    # Idle for long: never more than the burst.
    assert b.tokens("a", 100.0) == 20
    assert b.take("a", 21, rate=10, burst=20, now=100.0) == NEVER
    assert b.take("fresh", 21, rate=10, burst=20, now=100.0) == NEVER


def test_a_refund_never_fills_a_bucket_past_its_burst() -> None:
    b = Buckets()
    b.take("a", 4, rate=1, burst=10, now=0.0)
    b.give("a", 100, now=0.0)
    assert b.tokens("a", 0.0) == 10


def test_an_address_scan_cannot_grow_the_table() -> None:
    b = Buckets(max_buckets=100)
    for i in range(5000):
        b.take(f"10.0.{i // 256}.{i % 256}", 1, rate=1, burst=5, now=i * 0.0001)
    # The active hundred, and the one bucket the others share.
    assert len(b) <= 101
    assert b.take("one more", 5, rate=1, burst=5, now=0.5) > 0, "the overflow is drained"
    # Once refilled, buckets are swept and newcomers get their own again.
    assert b.take("late", 5, rate=1, burst=5, now=100.0) == 0.0
    assert b.take("later", 5, rate=1, burst=5, now=100.0) == 0.0
    assert len(b) <= 101
    assert all(not k.startswith(OVERFLOW) for k in b._table)


def test_tiers_without_a_rate_and_the_node_itself_pass_untouched() -> None:
    lim, _ = limiter()
    assert lim.take(NODE, 1e9) == 0.0
    assert lim.take(Identity("1.2.3.4", tier="free"), 1e9) == 0.0
    assert len(lim.buckets) == 0


def test_costs_by_method_and_hit_share() -> None:
    lim, _ = limiter(hit=0.25)
    who = Identity("1.2.3.4")
    assert lim.cost(who, "eth_getLogs", hit=False) == 10
    assert lim.cost(who, "eth_getLogs", hit=True) == 2.5
    assert lim.cost(who, "eth_getBalance", hit=False) == 1
    assert lim.cost(who, "eth_chainId", hit=False) < lim.cost(who, "eth_call", hit=False)
    assert lim.batch_cost(who, ["eth_call", "eth_getLogs", "x"]) == 15


# --- the budget holds whatever an identity does -----------------------------------------------
METHODS = ["eth_getLogs", "eth_call", "eth_chainId", "eth_getBalance"]
step = st.one_of(
    st.tuples(st.just("wait"), st.floats(0, 3)),
    st.tuples(st.just("call"), st.sampled_from(METHODS), st.booleans()),
    st.tuples(st.just("batch"), st.lists(st.sampled_from(METHODS), min_size=1, max_size=40)),
    st.tuples(st.just("reconnect")),
    st.tuples(st.just("stranger"), st.integers(0, 50)),
)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(0.5, 100),
    burst=st.floats(1, 200),
    hit=st.floats(0, 1),
    steps=st.lists(step, max_size=120),
)
def test_no_sequence_of_calls_passes_the_budget(
    rate: float, burst: float, hit: float, steps: list[tuple[object, ...]]
) -> None:
    """Calls, hits, batches (refunded when all hits), reconnects (a new Identity of the same
    name) and other identities in the table: what one identity was charged, net of
    refunds, never passes burst + rate x elapsed."""
    clock = Clock()
    lim = Limiter({"default": TierRate(rate, burst, hit)}, COSTS, clock)
    start = clock.now
    who = Identity("203.0.113.7")
    charged = 0.0
    for s in steps:
        kind = s[0]
        if kind == "wait":
            clock.now += float(s[1])  # type: ignore[arg-type]
        elif kind == "reconnect":
            who = Identity("203.0.113.7")
        elif kind == "stranger":
            lim.take(Identity(f"198.51.100.{s[1]}"), 1.0)
        elif kind == "call":
            method, is_hit = str(s[1]), bool(s[2])
            cost = lim.cost(who, method, is_hit)
            if lim.take_call(who, method, is_hit) == 0.0:  # the replays' inline math
                charged += cost
        else:
            methods = [str(m) for m in s[1]]  # type: ignore[attr-defined]
            cost = lim.batch_cost(who, methods)
            wait = lim.take(who, cost)
            if cost > burst:
                assert wait == NEVER
            if wait == 0.0:
                charged += cost
                before = lim.buckets.tokens(who.name, clock.now) or 0.0
                lim.refund_hits(who, methods)  # as if every call was a hit
                after = lim.buckets.tokens(who.name, clock.now) or 0.0
                charged -= after - before
        budget = burst + rate * (clock.now - start)
        assert charged <= budget + 1e-6 * max(1.0, budget)


# --- every path of the pipeline pays ------------------------------------------------------------
def limited_front(rate: float, burst: float, hit: float = 1.0) -> tuple[Front, Clock]:
    front = Front()
    clock = Clock()
    lim = Limiter({"default": TierRate(rate, burst, hit)}, COSTS, clock)
    front.rpc.limiter = lim
    routes = Routes(front.rpc.handle, lambda: (200, b"{}"), lambda: b"", replayer=front.rpc)
    front.server = HttpServer(routes, front.server.limits, front.metrics, limiter=lim)
    return front, clock


conn_step = st.one_of(
    st.tuples(st.just("wait"), st.floats(0, 2)),
    st.tuples(st.just("call"), st.integers(0, 3)),
    st.tuples(st.just("batch"), st.integers(1, 8)),  # a body under Front's 1,000 bytes
    st.tuples(st.just("reconnect")),
)


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(0.5, 20), burst=st.floats(1, 15), steps=st.lists(conn_step, max_size=60))
def test_no_mix_of_requests_over_connections_passes_the_budget(
    rate: float, burst: float, steps: list[tuple[object, ...]]
) -> None:
    """The same budget through the HTTP front door itself: single calls (the full path,
    then Seen replays, then the server's replay table), batches, new connections of the
    same client; every call answered 200 counted at its cost (eth_getBalance: 1)."""
    front, clock = limited_front(rate, burst)
    front.warm(b'"0x2a"')
    start = clock.now
    conn, transport = front.connect()
    served = 0
    seen = 0
    for s in steps:
        kind = s[0]
        if kind == "wait":
            clock.now += float(s[1])  # type: ignore[arg-type]
        elif kind == "reconnect":
            conn, transport = front.connect()
            seen = 0
        elif kind == "call":
            conn.data_received(post(balance(int(s[1]))))  # type: ignore[call-overload]
        else:
            n = int(s[1])  # type: ignore[call-overload]
            conn.data_received(post(orjson.dumps([orjson.loads(balance(i)) for i in range(n)])))
        got = answers(transport.out)[seen:]
        seen += len(got)
        for a in got:
            assert a.status in (200, 429)
            if a.status == 200:
                served += len(a.doc) if isinstance(a.doc, list) else 1
            else:
                assert "error" in a.doc
        assert served <= burst + rate * (clock.now - start) + 1e-6


def keyed_front(rate: float, burst: float) -> tuple[Front, Clock]:
    """``limited_front`` behind a door: API keys on (not required), 10.0.0.0/8 trusted."""
    front, clock = limited_front(rate, burst)
    lim = front.server.limiter
    door = Door(Trusted(parse_networks(["10.0.0.0/8"])), keys=KeyRing([(API_KEY, CAROL)]))
    front.server = HttpServer(
        front.server.routes, front.server.limits, front.metrics, limiter=lim, door=door
    )
    return front, clock


def test_repeats_naming_a_key_or_a_forwarded_client_are_replayed_and_paid_by_it() -> None:
    """Repeats of a keyed or proxied hit take the replay table like any other, each paid
    by the client its bytes name; the same bytes from a peer that is no trusted proxy name
    no one but that peer."""
    front, _ = keyed_front(rate=0.001, burst=5.0)
    front.warm(b'"0x2a"')

    def statuses(peer: str, header: bytes, n: int) -> list[int]:
        conn = HttpProtocol(front.server)
        transport = PeerTransport(peer)
        conn.connection_made(transport)
        for i in range(n):
            body = balance(100 + i)
            conn.data_received(post(body, headers=header + b"Content-Length: %d\r\n" % len(body)))
        return [a.status for a in answers(transport.out)]

    def learned() -> list[Replay]:
        table = front.server.replays
        return [r for r in map(table.get, table) if r is not None]

    keyed = b"X-Api-Key: " + API_KEY.encode() + b"\r\n"
    assert statuses("203.0.113.8", keyed, 6) == [200] * 5 + [429]
    assert [r.who for r in learned()] == [CAROL.identity], "keyed repeats are replays"
    # Another address with the same key shares the key's (spent) budget; without it, its own.
    assert statuses("203.0.113.9", keyed, 1) == [429]
    assert statuses("203.0.113.9", b"", 5) == [200] * 5
    forwarded = b"X-Forwarded-For: 198.51.100.1\r\n"
    assert statuses("10.0.0.1", forwarded, 3) == [200] * 3
    assert [(r.who, r.proxied) for r in learned()][-1] == (for_address("198.51.100.1"), True)
    # The same bytes straight from a client: its own address pays, not 198.51.100.1's.
    assert statuses("203.0.113.10", forwarded, 6) == [200] * 5 + [429]
    assert statuses("10.0.0.1", forwarded, 3) == [200, 200, 429]
    # Heads are remembered by who they named, within their bound.
    assert (CAROL.identity, False) in front.server.named_heads.values()
    front.server.limits.max_named_heads = 3
    for i in range(10):
        assert statuses("203.0.113.11", b"X-Trace: %d\r\n" % i + keyed, 1) == [429]
    assert len(front.server.named_heads) <= 3
    # And a key the node no longer holds is refused at once, replays or not.
    front.server.set_door(Door(Trusted(parse_networks(["10.0.0.0/8"])), keys=KeyRing()))
    assert not front.server.replays and not front.server.named_heads
    assert statuses("203.0.113.8", keyed, 2) == [401, 401]


def test_replays_single_calls_and_batches_all_pay_and_get_429_with_retry_after() -> None:
    front, clock = limited_front(rate=2.0, burst=5.0)
    front.warm(b'"0x2a"')
    conn, transport = front.connect()
    # The first is the full path, the next a Seen replay, then the HTTP replay table.
    for i in range(5):
        conn.data_received(post(balance(i)))
    assert front.server.replays, "the replay table answers repeats"
    conn.data_received(post(balance(99)))
    got = answers(transport.out)
    assert [a.status for a in got] == [200] * 5 + [429]
    refused = got[-1]
    assert refused.headers[b"retry-after"] == b"1"  # 0.5 s, rounded up
    assert refused.doc["id"] == 99
    assert refused.doc["error"]["code"] == -32005
    assert refused.doc["error"]["data"]["retry_after"] == pytest.approx(0.5)
    assert not transport.closed, "the connection stays open"
    assert front.metrics.rejected.labels("rate_limit")._value.get() == 1
    clock.now += 0.5
    conn.data_received(post(balance(100)))
    assert answers(transport.out)[-1].status == 200
    # A batch pays for all of its calls up front: 3 calls with 0 tokens left waits 1.5 s.
    batch = orjson.dumps([orjson.loads(balance(i)) for i in range(3)])
    conn.data_received(post(batch))
    last = answers(transport.out)[-1]
    assert last.status == 429 and last.headers[b"retry-after"] == b"2"
    assert last.doc["id"] is None
    clock.now += 1.5
    conn.data_received(post(batch))
    assert answers(transport.out)[-1].status == 200


def test_a_batch_costing_more_than_the_burst_is_never_served() -> None:
    front, _ = limited_front(rate=100.0, burst=5.0)
    front.warm(b'"0x2a"')
    batch = orjson.dumps([orjson.loads(balance(i)) for i in range(6)])
    (got,) = front.exchange(post(batch))
    assert got.status == 429 and b"retry-after" not in got.headers
    assert "burst" in got.doc["error"]["message"]
    assert got.doc["error"]["data"]["retry_after"] is None
    # Refused whole, it took nothing: the burst is all there for what fits in it.
    assert [a.status for a in front.exchange(*(post(balance(i)) for i in range(6)))] == [
        200
    ] * 5 + [429]


def test_cache_hits_cost_their_share_and_all_hit_batches_are_refunded() -> None:
    front, _ = limited_front(rate=0.001, burst=10.0, hit=0.25)
    front.warm(b'"0x2a"')
    lim = front.rpc.limiter
    assert isinstance(lim, Limiter)
    served = 0
    for i in range(100):
        out = front.exchange(post(balance(i)))
        if out[0].status != 200:
            break
        served += 1
    assert served == 40  # 10 tokens / 0.25 a hit
    front2, _ = limited_front(rate=0.001, burst=10.0, hit=0.5)
    front2.warm(b'"0x2a"')
    batch = orjson.dumps([orjson.loads(balance(i)) for i in range(8)])
    assert front2.exchange(post(batch))[0].status == 200  # 8 paid, 4 refunded
    lim2 = front2.rpc.limiter
    assert isinstance(lim2, Limiter)
    assert lim2.buckets.tokens("127.0.0.1", 1000.0) == pytest.approx(6.0, abs=0.01)


def test_the_pipeline_raises_rate_limited_for_a_websocket_to_send() -> None:
    front, _ = limited_front(rate=1.0, burst=1.0)
    front.warm(b'"0x2a"')
    who = Identity("10.1.1.1")
    assert front.rpc.handle(balance(1), who) == b'{"jsonrpc":"2.0","id":1,"result":"0x2a"}'
    with pytest.raises(RateLimited) as exc:
        front.rpc.handle(balance("ws-2"), who)
    doc = orjson.loads(exc.value.answer)
    assert doc["id"] == "ws-2" and doc["error"]["code"] == -32005
    assert doc["error"]["data"]["retry_after"] == pytest.approx(1.0)
    # Another identity has its own bucket; the node's own calls none.
    assert front.rpc.handle(balance(3), Identity("10.1.1.2"))
    assert front.rpc.handle(balance(4), NODE)


# --- the sender limit ---------------------------------------------------------------------------
KEY = "0x" + "11" * 32


def signed(nonce: int) -> str:
    tx = {
        "to": "0x" + "22" * 20,
        "value": 1,
        "gas": 21000,
        "gasPrice": 10**9,
        "nonce": nonce,
        "chainId": 31337,
    }
    return "0x" + Account.sign_transaction(tx, KEY).raw_transaction.hex().removeprefix("0x")


def test_the_sender_is_recovered_from_the_signed_transaction() -> None:
    assert sender_of([signed(0)]) == Account.from_key(KEY).address
    for bad in ([], ["0x"], ["0x1234"], ["nothex"], [5], "0xabc", [signed(0)[:-6]]):
        with pytest.raises(InvalidParams):
            sender_of(bad)


async def test_past_its_burst_a_sender_is_refused_naming_the_sender_limit() -> None:
    lim, clock = limiter()
    senders = SenderLimit(rate=1.0, burst=2.0, buckets=lim)
    assert await senders.check([signed(0)]) is None
    assert await senders.check([signed(1)]) is None
    refused = await senders.check([signed(2)])
    assert refused is not None
    err = orjson.loads(refused)
    assert err["code"] == -32005 and "sender limit" in err["message"]
    assert err["data"]["sender"] == Account.from_key(KEY).address
    assert err["data"]["retry_after"] == pytest.approx(1.0)
    clock.now += 1.0
    assert await senders.check([signed(2)]) is None
    bad = await senders.check(["0xdeadbeef"])
    assert bad is not None and orjson.loads(bad)["code"] == -32602


def test_never_is_infinite() -> None:
    assert NEVER == math.inf


def test_tier_rates_and_costs_are_config_keys() -> None:
    cfg = loads(
        "[limits]\nmethod_costs = { eth_getLogs = 25 }\nsender_rate = 2\n"
        "[tiers.default]\nrate = 50\nburst = 200\nhit_cost_factor = 0.5\n" + UPSTREAM,
        {},
    )
    t = cfg.tiers["default"]
    assert (t.rate, t.burst, t.hit_cost_factor) == (50.0, 200.0, 0.5)
    assert cfg.limits.method_costs == {"eth_getLogs": 25.0}
    assert cfg.limits.sender_rate == 2.0
    for bad in ("rate = -1", "hit_cost_factor = 2", "burst = 0"):
        with pytest.raises(ConfigError, match=r"tiers\.default"):
            loads(f"[tiers.default]\n{bad}\n" + UPSTREAM, {})
    assert Config().tiers == {} and loads(UPSTREAM, {}).tiers["default"].rate == 0  # off


def test_a_miss_pays_its_full_cost_up_front_and_a_refused_one_takes_nothing() -> None:
    front, _ = limited_front(rate=0.01, burst=1.0, hit=0.5)
    front.warm(b'"0x2a"')
    lim = front.rpc.limiter
    assert isinstance(lim, Limiter)
    who = Identity("10.2.2.2")
    assert front.rpc.handle(balance(1), who) == b'{"jsonrpc":"2.0","id":1,"result":"0x2a"}'
    # 0.5 left: a miss (another block, never cached here) needs 1; refused before any I/O.
    with pytest.raises(RateLimited) as exc:
        front.rpc.handle(balance(2, "0x1"), who)
    assert orjson.loads(exc.value.answer)["error"]["data"]["retry_after"] == pytest.approx(50)
    assert lim.buckets.tokens(who.name, 1000.0) == pytest.approx(0.5)
    assert front.rpc.handle(balance(3), who) == b'{"jsonrpc":"2.0","id":3,"result":"0x2a"}'
    # Empty now: refused on the hit's cost, before the call is even looked up.
    memo = len(front.rpc._memo)
    with pytest.raises(RateLimited):
        front.rpc.handle(balance(4, "0x2"), who)
    assert len(front.rpc._memo) == memo
