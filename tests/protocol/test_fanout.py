"""The fan-out's decisions without I/O: which logs filters a log is matched against (the
index), the order of a reorg's logs (geth's), and the bound on held notifications."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from chainrelay.subscriptions.fanout import Held, HeldNotifications, LogRoutes, geth_order
from chainrelay.subscriptions.logfilter import LogFilter

TRANSFER = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
APPROVAL = "0x8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925"
TOKEN = "0x" + "11" * 20


def topic(i: int) -> str:
    return "0x" + f"{i:064x}"


def log(address: str = TOKEN, *topics: str) -> dict[str, Any]:
    return {"address": address, "topics": list(topics), "data": "0x"}


def test_a_log_is_matched_only_against_filters_that_can_take_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    routes: LogRoutes[str] = LogRoutes()
    # 2,000 distinct topic0 filters: an unindexed pass would match every log against each.
    for i in range(2000):
        routes.add(LogFilter.parse({"topics": [topic(i)]}), f"t{i}".encode(), "conn")
    by_address = LogFilter.parse({"address": TOKEN.upper().replace("0X", "0x")})
    routes.add(by_address, b"a", "conn")
    everything = LogFilter.parse({"topics": [None, topic(7)]})  # no address, wildcard topic0
    routes.add(everything, b"w", "conn")
    calls = 0
    real = LogFilter.matches

    def counting(self: LogFilter, lg: Any) -> bool:
        nonlocal calls
        calls += 1
        return real(self, lg)

    monkeypatch.setattr(LogFilter, "matches", counting)
    logs = [log(TOKEN, topic(i % 2000), topic(7)) for i in range(500)]
    matched = [routes.route(lg) for lg in logs]
    # Per log: its topic0's filter, the address filter, the match-all one; never 2,000.
    assert calls == 3 * 500
    assert all(len(groups) == 3 for groups in matched)
    calls = 0
    assert routes.route(log("0x" + "22" * 20, APPROVAL)) == []
    assert calls == 1  # nothing indexed under that address or topic0: the match-all only
    assert routes.route(log("0x" + "22" * 20, APPROVAL, topic(7))) == [{b"w": "conn"}]


def test_a_filter_naming_several_keys_is_a_candidate_once_per_log() -> None:
    routes: LogRoutes[str] = LogRoutes()
    flt = LogFilter.parse({"topics": [[TRANSFER, APPROVAL]]})
    routes.add(flt, b"x", "c")
    assert routes.candidates(log(TOKEN, TRANSFER)) == [(flt, {b"x": "c"})]
    assert routes.candidates(log(TOKEN, APPROVAL)) == [(flt, {b"x": "c"})]


def test_groups_share_a_filter_and_leave_no_index_entry_behind() -> None:
    routes: LogRoutes[str] = LogRoutes()
    a = LogFilter.parse({"address": [TOKEN, "0x" + "22" * 20], "topics": [TRANSFER]})
    t = LogFilter.parse({"topics": [[TRANSFER, APPROVAL]]})
    w = LogFilter.parse(None)
    assert routes.add(a, b"1", "c1") is True
    assert routes.add(a, b"2", "c2") is False  # same filter: one group, one match per log
    assert routes.add(t, b"3", "c3") and routes.add(w, b"4", "c4")
    assert routes.route(log(TOKEN, TRANSFER)) == [
        {b"1": "c1", b"2": "c2"},
        {b"3": "c3"},
        {b"4": "c4"},
    ]
    assert routes.remove(a, b"1") is False
    assert routes.remove(a, b"9") is False  # not a member
    for flt, sub_id in ((a, b"2"), (t, b"3"), (w, b"4")):
        assert routes.remove(flt, sub_id) is True
    assert not routes
    assert routes._by_address == {} and routes._by_topic0 == {} and routes._match_all == {}


@dataclass
class Ev:
    number: int
    removed: bool


def test_removed_blocks_go_out_oldest_first_then_the_new_chain() -> None:
    # The feed hands a reorg's removed blocks newest first (as documented there).
    events = [Ev(9, True), Ev(8, True), Ev(7, True), Ev(7, False), Ev(8, False)]
    assert [(e.number, e.removed) for e in geth_order(events)] == [
        (7, True),
        (8, True),
        (9, True),
        (7, False),
        (8, False),
    ]
    plain = [Ev(3, False), Ev(4, False)]
    assert geth_order(plain) == plain
    assert [e.number for e in geth_order([Ev(5, False), Ev(6, True), Ev(5, True)])] == [5, 5, 6]


def test_held_frames_wait_for_the_answer_naming_them() -> None:
    held = HeldNotifications(max_count=10, max_bytes=1000)
    assert held.hold(b"0xa", b"f") is Held.SEND  # not waiting: goes out
    held.wait(b"0xab")
    held.wait(b"0xa")
    assert held.hold(b"0xab", b"one") is Held.HELD
    assert held.hold(b"0xa", b"two") is Held.HELD
    # "0xa" is a prefix of "0xab": only the quoted id in an answer announces it.
    assert held.announced(b'{"id":1,"result":"0xab"}') == b"one"
    assert b"0xa" in held and b"0xab" not in held
    assert held.count == 1 and held.bytes == 3
    held.forget(b"0xa")
    assert not held and held.count == 0 and held.bytes == 0


@pytest.mark.parametrize(("max_count", "max_bytes"), [(3, 10_000), (100, 30)])
def test_held_frames_are_bounded_per_connection_in_count_and_bytes(
    max_count: int, max_bytes: int
) -> None:
    held = HeldNotifications(max_count=max_count, max_bytes=max_bytes)
    # Bounded across subscriptions: many unanswered ones cannot each hold a full share.
    for i in range(3):
        held.wait(f"0x{i}".encode())
    verdicts = [held.hold(f"0x{i % 3}".encode(), b"x" * 10) for i in range(4)]
    assert verdicts == [Held.HELD, Held.HELD, Held.HELD, Held.OVERFLOW]
    assert held.count == 3 and held.bytes == 30
