"""The filter table: install, poll, reorgs, expiry and bounds, with time passed in."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from chainrelay.errors import FilterNotFound, FilterOverflowed, InvalidParams, TooManyFilters
from chainrelay.subscriptions.filtertable import FilterKind, FilterTable, live_filter, new_id
from chainrelay.subscriptions.logfilter import LogFilter

TOKEN = "0x5fbdb2315678afecb367f032d93f642f64180aa3"
OTHER = "0xe7f1725e7734ce288f8367e1bb143e90bb3f0512"
TRANSFER = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
APPROVAL = "0x8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925"
IDLE = 300.0


@dataclass(frozen=True)
class Block:
    number: int
    hash: str
    logs: list[dict[str, Any]] = field(default_factory=list)
    removed: bool = False


def bhash(n: int, fork: str = "a") -> str:
    return "0x" + fork * 2 + f"{n:062x}"


def mklog(n: int, i: int, address: str = TOKEN, topic: str = TRANSFER, fork: str = "a") -> dict:
    return {
        "address": address,
        "topics": [topic],
        "data": "0x",
        "blockNumber": hex(n),
        "blockHash": bhash(n, fork),
        "logIndex": hex(i),
        "removed": False,
    }


def block(n: int, logs: list[dict[str, Any]] | None = None, fork: str = "a") -> Block:
    return Block(n, bhash(n, fork), logs if logs is not None else [mklog(n, 0, fork=fork)])


def removed(b: Block) -> Block:
    return Block(b.number, b.hash, [{**lg, "removed": True} for lg in b.logs], removed=True)


def table(**kw: Any) -> FilterTable:
    counter = itertools.count(1)
    args: dict[str, Any] = {"idle_timeout": IDLE, "max_filters": 100, "max_changes": 1000}
    args.update(kw)
    return FilterTable(token=lambda n: next(counter).to_bytes(n, "big"), **args)


def test_ids_look_like_geths() -> None:
    assert re.fullmatch(r"0x[0-9a-f]{32}", new_id(lambda n: b"\xab" * n))
    assert new_id(lambda n: b"\x00" * (n - 1) + b"\x05") == "0x5"
    assert new_id(lambda n: b"\x00" * n) == "0x0"
    assert len({new_id() for _ in range(100)}) == 100


def test_log_filter_collects_matching_logs_since_last_poll() -> None:
    t = table()
    fid = t.install(FilterKind.LOGS, LogFilter.parse({"address": TOKEN}), now=0.0)
    b1 = block(1, [mklog(1, 0), mklog(1, 1, OTHER), mklog(1, 2)])
    t.on_blocks([b1])
    assert t.poll(fid, now=1.0) == [b1.logs[0], b1.logs[2]]
    assert t.poll(fid, now=2.0) == []
    b2, b3 = block(2), block(3, [mklog(3, 0, OTHER)])
    t.on_blocks([b2, b3])
    assert t.poll(fid, now=3.0) == b2.logs


def test_filters_by_address_and_catch_all_keep_log_order() -> None:
    t = table()
    anyf = t.install(FilterKind.LOGS, LogFilter.parse({"topics": [TRANSFER]}), now=0.0)
    both = t.install(FilterKind.LOGS, LogFilter.parse({"address": [TOKEN, OTHER]}), now=0.0)
    logs = [mklog(1, 0), mklog(1, 1, OTHER, APPROVAL), mklog(1, 2, OTHER), mklog(1, 3)]
    t.on_blocks([block(1, logs)])
    assert t.poll(anyf, 1.0) == [logs[0], logs[2], logs[3]]
    assert t.poll(both, 1.0) == logs


def test_block_and_pending_filters() -> None:
    t = table()
    bf = t.install(FilterKind.BLOCKS, None, now=0.0)
    pf = t.install(FilterKind.PENDING, None, now=0.0)
    t.on_blocks([block(1), block(2)])
    t.on_pending("0x" + "11" * 32)
    assert t.poll(bf, 1.0) == [bhash(1), bhash(2)]
    assert t.poll(pf, 1.0) == ["0x" + "11" * 32]
    assert t.poll(bf, 2.0) == [] and t.poll(pf, 2.0) == []


def test_reorg_reports_removed_logs_then_the_new_fork() -> None:
    t = table()
    lf = t.install(FilterKind.LOGS, LogFilter.parse({"address": TOKEN}), now=0.0)
    bf = t.install(FilterKind.BLOCKS, None, now=0.0)
    a2, a3 = block(2), block(3)
    t.on_blocks([a2, a3])
    assert t.poll(lf, 1.0) == a2.logs + a3.logs
    b3 = block(3, fork="b")
    t.on_blocks([removed(a3), b3])
    got = t.poll(lf, 2.0)
    assert [lg["removed"] for lg in got] == [True, False]
    assert got[0]["blockHash"] == a3.hash and got[1]["blockHash"] == b3.hash
    # a block filter reports only blocks that became canonical
    assert t.poll(bf, 2.0) == [a2.hash, a3.hash, b3.hash]


def test_numeric_range_bounds_an_installed_filter() -> None:
    t = table()
    fid = t.install(FilterKind.LOGS, live_filter({"fromBlock": "0x2", "toBlock": "0x3"}), 0.0)
    t.on_blocks([block(n) for n in range(1, 6)])
    assert [int(lg["blockNumber"], 16) for lg in t.poll(fid, 1.0)] == [2, 3]


def test_unknown_and_uninstalled_ids_are_not_found() -> None:
    t = table()
    fid = t.install(FilterKind.BLOCKS, None, now=0.0)
    for bad in ("0x1234", 5, None, ["x"], fid.upper()):
        with pytest.raises(FilterNotFound) as info:
            t.poll(bad, 1.0)
        assert (info.value.code, info.value.message) == (-32000, "filter not found")
    assert t.uninstall(fid) is True
    assert t.uninstall(fid) is False
    assert t.uninstall({"x": 1}) is False
    with pytest.raises(FilterNotFound):
        t.poll(fid, 1.0)


def test_idle_filters_expire_and_a_poll_keeps_one_alive() -> None:
    t = table(idle_timeout=10.0)
    polled = t.install(FilterKind.BLOCKS, None, now=0.0)
    idle = t.install(FilterKind.LOGS, LogFilter.parse({"address": TOKEN}), now=0.0)
    for now in (5.0, 12.0, 19.0):
        t.poll(polled, now)
    with pytest.raises(FilterNotFound):
        t.poll(idle, 19.0)
    assert len(t) == 1 and t.expired_total == 1
    assert t.expire(29.5) == [polled]
    assert len(t) == 0 and not t._by_address and not t._block_filters


def test_expire_sweeps_indexes_so_blocks_cost_nothing_after() -> None:
    t = table(idle_timeout=1.0)
    for _ in range(10):
        t.install(FilterKind.LOGS, LogFilter.parse({"address": TOKEN}), now=0.0)
        t.install(FilterKind.LOGS, LogFilter.parse({"topics": [[TRANSFER, APPROVAL]]}), now=0.0)
        t.install(FilterKind.LOGS, LogFilter.parse({}), now=0.0)
    assert len(t.expire(2.0)) == 30
    assert not t._by_address and not t._by_topic0 and not t._match_all
    assert not t.wants_blocks
    t.on_blocks([block(1)])  # nothing left to match: no error, no state


def test_full_buffer_stops_the_filter_its_next_poll_says_so_and_the_one_after_not_found() -> None:
    # Dropping the oldest changes would hand the client a poll that looks complete: the
    # poll is refused (-32005, saying what to do), then the filter is gone, and a client
    # reinstalls and catches up (web3.py and ethers do on "not found").
    t = table(max_changes=3)
    full = t.install(FilterKind.BLOCKS, None, now=0.0, owner="10.0.0.1")
    logs = t.install(FilterKind.LOGS, LogFilter.parse({"address": TOKEN}), now=0.0)
    polled = t.install(FilterKind.BLOCKS, None, now=0.0)
    t.on_blocks([block(n) for n in range(1, 4)])
    assert t.poll(polled, 1.0) == [bhash(1), bhash(2), bhash(3)]
    assert t.on_blocks([block(4)]) == [full, logs]  # stopped: the caller may stop listening
    assert not t._by_address and len(t) == 3 and t.owned_by("10.0.0.1") == 1
    for fid in (full, logs):
        with pytest.raises(FilterOverflowed) as over:
            t.poll(fid, 2.0)
        assert over.value.code == -32005
        assert over.value.message.startswith("filter changes overflowed (more than 3 changes")
        assert over.value.data == {"limit": "filters.max_changes", "value": 3}
        with pytest.raises(FilterNotFound) as info:
            t.poll(fid, 2.0)
        assert info.value.message == "filter not found"
    assert t.overflowed_total == 2 and t.expired_total == 0 and t.owned_by("10.0.0.1") == 0
    assert t.poll(polled, 2.0) == [bhash(4)]  # the one polled in time is untouched
    assert t.on_blocks([block(5)]) == []


def test_full_pending_buffer_expires_the_filter() -> None:
    t = table(max_changes=2)
    fid = t.install(FilterKind.PENDING, None, now=0.0)
    assert t.on_pending("0x01") == [] and t.on_pending("0x02") == []
    assert t.on_pending("0x03") == [fid]
    assert not t.wants_pending and t.overflowed_total == 1
    with pytest.raises(FilterOverflowed):
        t.poll(fid, 1.0)
    with pytest.raises(FilterNotFound):
        t.poll(fid, 1.0)


def test_overflow_within_one_feed_call_expires_once_and_keeps_indexes_whole() -> None:
    t = table(max_changes=1)
    fid = t.install(FilterKind.LOGS, LogFilter.parse({"topics": [TRANSFER]}), now=0.0)
    keep = t.install(FilterKind.LOGS, LogFilter.parse({"topics": [TRANSFER]}), now=0.0)
    t.poll(keep, 0.0)
    assert sorted(t.on_blocks([block(1, [mklog(1, i) for i in range(5)])])) == sorted([fid, keep])
    assert t.overflowed_total == 2 and len(t) == 2 and not t._by_topic0
    assert t.expire(IDLE + 1.0) == [fid, keep]  # stopped filters still idle out
    assert len(t) == 0


def test_reorg_removed_logs_oldest_block_first_in_log_order_then_new_chain() -> None:
    # geth core/blockchain.go reorg(): "Deleted log emission on the API uses forward order".
    # The feed reports a reorg's removed blocks newest first; the table puts them in order.
    t = table()
    lf = t.install(FilterKind.LOGS, LogFilter.parse({"topics": [TRANSFER]}), now=0.0)
    a2 = block(2, [mklog(2, 0), mklog(2, 1, OTHER), mklog(2, 2)])
    a3 = block(3, [mklog(3, 0, OTHER), mklog(3, 1)])
    a4 = block(4, [mklog(4, 0)])
    t.on_blocks([block(1), a2, a3, a4])
    t.poll(lf, 1.0)
    b2 = block(2, [mklog(2, 0, fork="b")], fork="b")
    b3 = block(3, [mklog(3, 0, fork="b"), mklog(3, 1, OTHER, fork="b")], fork="b")
    t.on_blocks([removed(a4), removed(a3), removed(a2), b2, b3])
    want = [*removed(a2).logs, *removed(a3).logs, *removed(a4).logs, *b2.logs, *b3.logs]
    got = t.poll(lf, 2.0)
    assert got == want
    assert [(lg["blockNumber"], lg["logIndex"], lg["removed"]) for lg in got] == [
        ("0x2", "0x0", True),
        ("0x2", "0x1", True),
        ("0x2", "0x2", True),
        ("0x3", "0x0", True),
        ("0x3", "0x1", True),
        ("0x4", "0x0", True),
        ("0x2", "0x0", False),
        ("0x3", "0x0", False),
        ("0x3", "0x1", False),
    ]
    # the same whatever order the removed blocks arrive in, and across feed calls
    t.on_blocks([removed(b2), removed(b3)])
    t.on_blocks([a2])
    assert t.poll(lf, 3.0) == [*removed(b2).logs, *removed(b3).logs, *a2.logs]


def test_matching_work_is_in_proportion_to_the_filters_that_could_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2,000 filters on distinct topics with any address, 100 on addresses, 2 match-all:
    # a log is tried only against the filters indexed under its address and its topic0,
    # and the match-all ones, never against all 2,102.
    calls = 0
    real = LogFilter.matches

    def counting(self: LogFilter, lg: Any) -> bool:
        nonlocal calls
        calls += 1
        return real(self, lg)

    monkeypatch.setattr(LogFilter, "matches", counting)
    t = table(max_filters=3000)
    topics = ["0x" + f"{i:064x}" for i in range(1, 2001)]
    addresses = ["0x" + f"{i:040x}" for i in range(1, 101)]
    by_topic = [t.install(FilterKind.LOGS, LogFilter.parse({"topics": [tp]}), 0.0) for tp in topics]
    by_address = [
        t.install(FilterKind.LOGS, LogFilter.parse({"address": a}), 0.0) for a in addresses
    ]
    match_all = [
        t.install(FilterKind.LOGS, LogFilter.parse({}), 0.0),
        t.install(FilterKind.LOGS, LogFilter.parse({"topics": [None, topics[0]]}), 0.0),
    ]
    logs = [mklog(1, i, addresses[i % 100], topics[(7 * i) % 2000]) for i in range(500)]
    t.on_blocks([block(1, logs)])
    assert calls == 500 * (1 + 1 + 2)  # its topic's filter, its address's, the match-all two
    assert t.poll(match_all[0], 1.0) == logs
    assert t.poll(match_all[1], 1.0) == []
    assert t.poll(by_topic[7], 1.0) == [logs[1]]
    assert t.poll(by_address[3], 1.0) == logs[3::100]
    # a log with an address and a topic0 nobody indexes costs only the match-all filters
    calls = 0
    t.on_blocks([block(2, [mklog(2, i, OTHER, TRANSFER) for i in range(50)])])
    assert calls == 50 * 2


def test_a_filter_naming_addresses_and_topics_is_matched_once_per_log() -> None:
    t = table()
    both = t.install(
        FilterKind.LOGS, LogFilter.parse({"address": [TOKEN, OTHER], "topics": [TRANSFER]}), 0.0
    )
    logs = [mklog(1, 0), mklog(1, 1, OTHER), mklog(1, 2, OTHER, APPROVAL), mklog(1, 3)]
    t.on_blocks([block(1, logs)])
    assert t.poll(both, 1.0) == [logs[0], logs[1], logs[3]]
    assert t.uninstall(both) and not t._by_address and not t._by_topic0


def test_filters_per_client_address_are_bounded() -> None:
    t = table(max_filters=10, max_per_owner=2)
    first = t.install(FilterKind.BLOCKS, None, 0.0, owner="10.0.0.1")
    t.install(FilterKind.LOGS, LogFilter.parse({"address": TOKEN}), 0.0, owner="10.0.0.1")
    with pytest.raises(TooManyFilters) as info:
        t.install(FilterKind.PENDING, None, 0.0, owner="10.0.0.1")
    assert info.value.code == -32005
    assert "per client (its API key, or its address)" in info.value.message
    # another address is not locked out, nor the node's own calls (no address)
    t.install(FilterKind.BLOCKS, None, 0.0, owner="10.0.0.2")
    for _ in range(3):
        t.install(FilterKind.BLOCKS, None, 0.0)
    assert t.owned_by("10.0.0.1") == 2 and t.owned_by("10.0.0.2") == 1 and t.owned_by("") == 0
    assert t.uninstall(first)
    t.install(FilterKind.PENDING, None, 0.0, owner="10.0.0.1")
    with pytest.raises(TooManyFilters):
        t.install(FilterKind.BLOCKS, None, 0.0, owner="10.0.0.1")


def test_idle_filters_of_an_address_make_room_for_it() -> None:
    t = table(max_per_owner=1, idle_timeout=10.0)
    t.install(FilterKind.BLOCKS, None, 0.0, owner="10.0.0.1")
    with pytest.raises(TooManyFilters):
        t.install(FilterKind.BLOCKS, None, 5.0, owner="10.0.0.1")
    t.install(FilterKind.BLOCKS, None, 11.0, owner="10.0.0.1")
    assert t.owned_by("10.0.0.1") == 1 and len(t) == 1
    t.expire(30.0)
    assert t.owned_by("10.0.0.1") == 0 and not t._per_owner


def test_filter_count_is_bounded_and_idle_ones_make_room() -> None:
    t = table(max_filters=2, idle_timeout=10.0)
    t.install(FilterKind.BLOCKS, None, now=0.0)
    t.install(FilterKind.PENDING, None, now=5.0)
    with pytest.raises(TooManyFilters) as info:
        t.install(FilterKind.BLOCKS, None, now=6.0)
    assert info.value.code == -32005
    t.install(FilterKind.BLOCKS, None, now=11.0)  # the first one expired meanwhile
    assert len(t) == 2


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ({"fromBlock": "pending"}, "pending logs are not supported"),
        ({"toBlock": "pending"}, "pending logs are not supported"),
        ({"fromBlock": "earliest"}, "invalid from and to block combination"),
        ({"toBlock": "finalized"}, "invalid from and to block combination"),
        ({"fromBlock": "latest", "toBlock": "0x5"}, "invalid from and to block combination"),
        ({"blockHash": "0x" + "ab" * 32}, "blockHash"),
        ({"address": "0x12"}, "address"),
        ("x", "expected an object"),
    ],
)
def test_installed_filter_ranges_geth_refuses(obj: Any, words: str) -> None:
    with pytest.raises(InvalidParams) as info:
        live_filter(obj)
    assert words in info.value.message


def test_installed_filter_bounds_are_the_configured_ones() -> None:
    topics = ["0x" + f"{i:064x}" for i in range(3)]
    live_filter({"address": [TOKEN, OTHER]}, max_addresses=2)
    with pytest.raises(InvalidParams) as info:
        live_filter({"address": [TOKEN, OTHER, TOKEN]}, max_addresses=2)
    assert "too many addresses: at most 2" in info.value.message
    live_filter({"topics": [topics[:2]]}, max_topics_per_position=2)
    with pytest.raises(InvalidParams) as info:
        live_filter({"topics": [None, topics]}, max_topics_per_position=2)
    assert "too many topics in one position: at most 2" in info.value.message


def test_installed_filter_ranges_geth_accepts() -> None:
    for obj in ({}, {"fromBlock": "latest"}, {"fromBlock": "0x1"}, {"toBlock": "latest"}):
        live_filter(obj)
    assert live_filter({"fromBlock": "0x1", "toBlock": "0x9"}).to_block == 9


def test_filters_config_section_defaults_and_overrides() -> None:
    from chainrelay import defaults
    from chainrelay.config import loads
    from chainrelay.errors import ConfigError

    upstream = '[[upstreams]]\nurl = "http://127.0.0.1:1"\n'
    cfg = loads(upstream, {})
    assert cfg.filters.idle_timeout == defaults.FILTER_IDLE_TIMEOUT
    assert cfg.filters.max_filters == defaults.MAX_FILTERS
    assert cfg.filters.max_changes == defaults.MAX_FILTER_CHANGES
    assert cfg.filters.max_per_ip == defaults.MAX_FILTERS_PER_IP
    assert cfg.filters.max_addresses == defaults.MAX_FILTER_ADDRESSES
    assert cfg.filters.max_topics_per_position == defaults.MAX_TOPICS_PER_POSITION
    cfg = loads(
        "[filters]\nidle_timeout = 2\nmax_filters = 3\nmax_changes = 4\nmax_per_ip = 5\n"
        "max_addresses = 6\nmax_topics_per_position = 7\n" + upstream,
        {},
    )
    f = cfg.filters
    assert (f.idle_timeout, f.max_filters, f.max_changes) == (2.0, 3, 4)
    assert (f.max_per_ip, f.max_addresses, f.max_topics_per_position) == (5, 6, 7)
    for bad in (
        "idle_timeout = 0",
        "max_filters = -1",
        "max_changes = 0",
        "max_filter = 1",
        "max_per_ip = 0",
        "max_addresses = 0",
        "max_topics_per_position = -3",
    ):
        with pytest.raises(ConfigError) as info:
            loads(f"[filters]\n{bad}\n" + upstream, {})
        assert "filters." + bad.split(" ")[0] in str(info.value)


def test_policy_never_caches_filter_methods() -> None:
    from chainrelay.rpc.policy import RULES, Finality, HeadView, Kind, plan
    from chainrelay.subscriptions.filtertable import FILTER_METHODS

    head = HeadView()
    head.number, head.hash, head.finalized = 10, "0x" + "aa" * 32, 5
    head.canonical = {10: head.hash}
    for method in FILTER_METHODS:
        assert RULES[method].kind is Kind.FILTER
        p = plan(method, [{"fromBlock": "0x1", "toBlock": "0x2"}], head)
        assert p.finality is Finality.NEVER and p.key is None


def test_the_table_says_when_it_needs_the_feed() -> None:
    t = table(idle_timeout=10.0)
    assert not t.wants_blocks and not t.wants_pending
    pf = t.install(FilterKind.PENDING, None, now=0.0)
    assert t.wants_pending and not t.wants_blocks
    lf = t.install(FilterKind.LOGS, LogFilter.parse({"address": TOKEN}), now=0.0)
    assert t.wants_blocks
    bf = t.install(FilterKind.BLOCKS, None, now=5.0)
    t.uninstall(lf)
    assert t.wants_blocks
    t.uninstall(pf)
    assert not t.wants_pending
    t.expire(16.0)
    assert bf not in t.filters and not t.wants_blocks
