"""Method policy: how each call is keyed, forwarded and classed, against a hand-built head."""

from __future__ import annotations

from typing import Any

import pytest

from chainrelay.rpc.policy import (
    PASS,
    RULES,
    Finality,
    HeadView,
    Kind,
    Plan,
    Storing,
    anchor_of,
    items_canonical,
    plan,
    ref_number,
    store_decision,
)

ADDR = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
HEAD, SAFE, FINAL = 100, 95, 90
WINDOW_LOW = 80  # the head view remembers hashes of blocks 80..100


def block_hash(n: int, fork: str = "a") -> str:
    return "0x" + fork * 2 + f"{n:062x}"


def make_head(
    number: int = HEAD, safe: int = SAFE, finalized: int = FINAL, fork: str = "a"
) -> HeadView:
    view = HeadView()
    view.number, view.safe, view.finalized = number, safe, finalized
    for n in range(WINDOW_LOW, number + 1):
        h = block_hash(n, fork)
        view.canonical[n] = h
        view.numbers[h] = n
    view.hash = view.canonical[number]
    return view


@pytest.fixture
def head() -> HeadView:
    return make_head()


def passes(p: Any) -> bool:
    return p.finality is Finality.NEVER and p.key is None


def stored_as(p: Plan, lifetime: float, number: int, block: str | None) -> Storing:
    """How an answer to ``p`` (a plan with a key) is stored, as ``store_decision`` says it."""
    assert p.key is not None
    return Storing(p.key, lifetime, number, block)


# --- one reading of a block reference, for keys and for log ranges -------------------------
@pytest.mark.parametrize(
    ("ref", "as_key", "as_bound"),
    [
        ("latest", HEAD, HEAD),
        ("pending", None, HEAD),  # never cached; a range bound reads it as the head
        ("safe", SAFE, SAFE),
        ("finalized", FINAL, FINAL),
        ("earliest", 0, 0),
        ("0x5", 5, 5),
        ("0X5", 5, 5),
        ({"blockNumber": "0x5"}, 5, 5),
        ({"blockHash": block_hash(90)}, None, None),  # keyed as given, one block for a guard
        ("0x" + "f" * 17, None, None),  # past 64 bits: the upstream's own error answers it
        ("0x", None, None),
        ("12", None, None),
        (12, None, None),
    ],
)
def test_a_block_reference_reads_the_same_for_keys_and_for_log_ranges_but_pending(
    head: HeadView, ref: Any, as_key: int | None, as_bound: int | None
) -> None:
    assert ref_number(ref, head) == as_key
    assert ref_number(ref, head, pending=True) == as_bound


def test_a_tag_the_head_does_not_know_yet_names_no_block() -> None:
    blank = HeadView()
    assert ref_number("latest", blank) is None and ref_number("safe", blank) is None


# --- finality classes and tag resolution -----------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "number"),
    [
        ("finalized", FINAL),
        ("earliest", 0),
        ("0x5", 5),
        ("0X5", 5),
        ("0x05", 5),
        (hex(FINAL), FINAL),
    ],
)
def test_final_blocks_are_keyed_and_forwarded_by_number(
    head: HeadView, ref: str, number: int
) -> None:
    p = plan("eth_getBalance", [ADDR, ref], head)
    assert p.finality is Finality.FINALIZED
    assert p.params == [ADDR, hex(number)]
    assert p.key == f'eth_getBalance:["{ADDR}","{hex(number)}"]'.encode()
    assert p.block_number == number and p.min_block == number
    assert p.block_hash is None


def test_every_spelling_of_a_final_block_shares_one_key(head: HeadView) -> None:
    keys = {plan("eth_getBalance", [ADDR, ref], head).key for ref in ("finalized", "0x5a", "0x05a")}
    keys.add(plan("eth_getBalance", [ADDR, {"blockNumber": "0x5a"}], head).key)
    assert len(keys) == 1 and None not in keys


@pytest.mark.parametrize(("ref", "number"), [("latest", HEAD), ("safe", SAFE), (hex(97), 97)])
def test_unfinalized_state_reads_are_keyed_and_forwarded_by_hash(
    head: HeadView, ref: str, number: int
) -> None:
    p = plan("eth_call", [{"to": ADDR, "data": "0x"}, ref], head)
    h = block_hash(number)
    assert p.finality is Finality.UNFINALIZED
    assert p.block_hash == h and p.block_number == number and p.min_block == number
    assert p.params == [{"to": ADDR, "data": "0x"}, {"blockHash": h}]
    assert p.key is not None and h.encode() in p.key
    assert b'"latest"' not in p.key and b'"safe"' not in p.key


@pytest.mark.parametrize(("ref", "number"), [("latest", HEAD), ("safe", SAFE), (hex(97), 97)])
def test_unfinalized_block_receipts_are_forwarded_by_the_bare_hash(
    head: HeadView, ref: str, number: int
) -> None:
    # execution-apis: eth_getBlockReceipts takes BlockNumberOrTagOrHash; some upstreams
    # refuse the EIP-1898 object for it.
    p = plan("eth_getBlockReceipts", [ref], head)
    h = block_hash(number)
    assert p.finality is Finality.UNFINALIZED
    assert p.block_hash == h and p.block_number == number and p.min_block == number
    assert p.params == [h]
    # Keyed as before: with a client's EIP-1898 request for the same block.
    assert p.key == plan("eth_getBlockReceipts", [{"blockHash": h}], head).key
    assert p.key == b'eth_getBlockReceipts:["#' + h.encode() + b'"]'
    final = plan("eth_getBlockReceipts", [hex(FINAL)], head)
    assert final.finality is Finality.FINALIZED and final.params == [hex(FINAL)]


def test_omitted_block_means_latest(head: HeadView) -> None:
    assert (
        plan("eth_getBalance", [ADDR], head).key
        == plan("eth_getBalance", [ADDR, "latest"], head).key
    )
    assert plan("eth_getBalance", [ADDR], head).params == [ADDR, {"blockHash": block_hash(HEAD)}]


def test_unfinalized_block_by_number_is_forwarded_by_number_but_keyed_by_hash(
    head: HeadView,
) -> None:
    p = plan("eth_getBlockByNumber", ["latest", False], head)
    assert p.finality is Finality.UNFINALIZED
    assert p.params == [hex(HEAD), False]
    assert p.block_hash == block_hash(HEAD)
    assert p.key is not None and block_hash(HEAD).encode() in p.key
    assert p.anchor == "block"
    final = plan("eth_getBlockByNumber", ["0x50", True], head)
    assert final.finality is Finality.FINALIZED and final.params == ["0x50", True]


def test_a_reorg_changes_the_key_of_latest_so_the_old_answer_cannot_be_served() -> None:
    before = plan("eth_getBalance", [ADDR, "latest"], make_head(fork="a"))
    after = plan("eth_getBalance", [ADDR, "latest"], make_head(fork="b"))
    assert before.key is not None and after.key is not None
    assert before.key != after.key
    # A final block's key names its number only: a reorg above it does not matter.
    f1 = plan("eth_getBalance", [ADDR, "finalized"], make_head(fork="a"))
    f2 = plan("eth_getBalance", [ADDR, "finalized"], make_head(fork="b"))
    assert f1.key == f2.key


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("eth_getBalance", [ADDR, "pending"]),
        ("eth_call", [{"to": ADDR}, "pending"]),
        ("eth_getTransactionCount", [ADDR, "pending"]),
        ("eth_getBlockByNumber", ["pending", False]),
        ("eth_getLogs", [{"fromBlock": "0x1", "toBlock": "pending"}]),
        ("eth_getLogs", [{"fromBlock": "pending"}]),
    ],
)
def test_pending_is_never_cached(head: HeadView, method: str, params: list[Any]) -> None:
    assert passes(plan(method, params, head))


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("eth_getBalance", [ADDR, hex(HEAD + 1)]),  # past the head: the node may not have it
        ("eth_getBalance", [ADDR, 5]),  # a bare integer is not a block reference
        ("eth_getBalance", [ADDR, "Latest"]),
        ("eth_getBalance", [ADDR, "0x"]),
        ("eth_getBalance", [ADDR, "0xzz"]),
        ("eth_getBalance", [ADDR, "0x" + "f" * 17]),
        ("eth_getBalance", [ADDR, {"blockHash": "0x1234"}]),  # not a hash
        ("eth_getBalance", {"address": ADDR}),  # named params: not ours to interpret
        ("eth_getBalance", [ADDR, "latest", "extra", "more"]),
        ("eth_getBlockByNumber", []),
        ("eth_estimateGas", [{"to": ADDR}]),  # geth estimates on pending when omitted
        ("eth_createAccessList", [{"to": ADDR}]),
        ("eth_getBlockByHash", ["0x1234", False]),
        ("eth_getTransactionReceipt", []),
        ("eth_getLogs", [{"fromBlock": "0x20", "toBlock": "0x10"}]),  # empty range
        ("eth_getLogs", [{"blockHash": block_hash(99), "fromBlock": "0x1"}]),
        ("eth_getLogs", [{}, {}]),
        ("eth_getLogs", ["latest"]),
        ("eth_blockNumber", []),  # answered from the head by the rpc service
        ("eth_sendRawTransaction", ["0x02f8"]),
        ("eth_newFilter", [{}]),
        ("eth_subscribe", ["newHeads"]),
        ("foo_bar", [ADDR, "latest"]),
        ("anvil_setCode", [ADDR, "0xfe"]),
    ],
)
def test_uncacheable_calls_pass_through(head: HeadView, method: str, params: Any) -> None:
    p = plan(method, params, head)
    assert p is PASS
    assert passes(p) and p.params is None  # forwarded exactly as the caller sent them


def test_unfinal_block_outside_the_remembered_window_passes_through() -> None:
    view = make_head(finalized=WINDOW_LOW - 10)
    assert passes(plan("eth_getBalance", [ADDR, hex(WINDOW_LOW - 1)], view))
    assert plan("eth_getBalance", [ADDR, hex(WINDOW_LOW)], view).block_hash == block_hash(
        WINDOW_LOW
    )
    assert plan("eth_getBalance", [ADDR, hex(WINDOW_LOW - 10)], view).finality is Finality.FINALIZED


def test_estimate_gas_with_a_block_is_cacheable(head: HeadView) -> None:
    p = plan("eth_estimateGas", [{"to": ADDR}, "finalized"], head)
    assert p.finality is Finality.FINALIZED and p.params == [{"to": ADDR}, hex(FINAL)]


def test_nothing_block_based_is_cached_before_a_head_is_known() -> None:
    blank = HeadView()
    assert not blank.known
    for method, params in (
        ("eth_getBalance", [ADDR, "0x0"]),
        ("eth_getBlockByNumber", ["earliest", False]),
        ("eth_getLogs", [{"fromBlock": "0x0", "toBlock": "0x0"}]),
        ("eth_gasPrice", []),
    ):
        assert passes(plan(method, params, blank)), method
    # The chain id does not depend on any head.
    assert plan("eth_chainId", [], blank).finality is Finality.FINALIZED


# --- explicit block hashes (EIP-1898) --------------------------------------------------------
def test_explicit_block_hash_is_keyed_as_given(head: HeadView) -> None:
    h = block_hash(99)
    p = plan("eth_getBalance", [ADDR, {"blockHash": h}], head)
    assert p.finality is Finality.UNFINALIZED
    assert p.params is None  # forwarded as given
    assert p.key is not None and h.encode() in p.key
    # A hash the node has never seen names one block for ever too.
    other = block_hash(5, "c")
    q = plan("eth_getBalance", [ADDR, {"blockHash": other}], head)
    assert q.finality is Finality.UNFINALIZED and q.key is not None and other.encode() in q.key


def test_require_canonical_on_an_unknown_hash_passes_through(head: HeadView) -> None:
    unknown = block_hash(99, "c")
    p = plan("eth_getBalance", [ADDR, {"blockHash": unknown, "requireCanonical": True}], head)
    assert passes(p)
    # requireCanonical false is a plain by-hash read.
    q = plan("eth_getBalance", [ADDR, {"blockHash": unknown, "requireCanonical": False}], head)
    assert q.finality is Finality.UNFINALIZED


def test_require_canonical_on_a_canonical_hash_is_keyed_apart_from_the_plain_read(
    head: HeadView,
) -> None:
    h = block_hash(99)
    strict = plan("eth_getBalance", [ADDR, {"blockHash": h, "requireCanonical": True}], head)
    plain = plan("eth_getBalance", [ADDR, {"blockHash": h}], head)
    assert strict.key is not None and plain.key is not None
    # The two can have different answers once the block is reorged away.
    assert strict.key != plain.key


def test_require_canonical_answer_is_tied_to_its_block(head: HeadView) -> None:
    h = block_hash(99)
    p = plan("eth_getBalance", [ADDR, {"blockHash": h, "requireCanonical": True}], head)
    # Either never cached, or the plan names the block so the stored entry is checked on hits.
    assert passes(p) or (p.block_hash == h and p.block_number == 99)


# --- by-hash and by-transaction reads --------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "params", "anchor"),
    [
        ("eth_getBlockByHash", [block_hash(99), False], "block"),
        ("eth_getTransactionByHash", ["0x" + "cd" * 32], "item"),
        ("eth_getTransactionReceipt", ["0x" + "cd" * 32], "item"),
        ("eth_getTransactionByBlockHashAndIndex", [block_hash(99), "0x0"], "item"),
    ],
)
def test_hash_reads_are_checked_for_canonicality_on_every_hit(
    head: HeadView, method: str, params: list[Any], anchor: str
) -> None:
    p = plan(method, params, head)
    assert p.finality is Finality.UNFINALIZED
    assert p.validate_canonical is True
    assert p.anchor == anchor
    assert p.params is None


# --- eth_getLogs ranges ----------------------------------------------------------------------
def test_final_log_range_is_cached_for_ever_with_numbers(head: HeadView) -> None:
    flt = {"address": ADDR, "fromBlock": "earliest", "toBlock": "finalized", "topics": [None]}
    p = plan("eth_getLogs", [flt], head)
    assert p.finality is Finality.FINALIZED
    assert p.params == [{**flt, "fromBlock": "0x0", "toBlock": hex(FINAL)}]
    assert p.min_block == FINAL
    assert p.anchor == "items"


def test_log_range_reaching_unfinal_blocks_is_keyed_by_the_last_hash(head: HeadView) -> None:
    p = plan("eth_getLogs", [{"fromBlock": hex(FINAL - 5), "toBlock": "latest"}], head)
    assert p.finality is Finality.UNFINALIZED
    assert p.params == [{"fromBlock": hex(FINAL - 5), "toBlock": hex(HEAD)}]
    assert p.block_hash == block_hash(HEAD)
    assert p.key is not None and block_hash(HEAD).encode() in p.key
    moved = plan(
        "eth_getLogs", [{"fromBlock": hex(FINAL - 5), "toBlock": "latest"}], make_head(fork="b")
    )
    assert moved.key != p.key


def test_log_filter_defaults_to_the_head_block(head: HeadView) -> None:
    p = plan("eth_getLogs", [{"address": ADDR}], head)
    assert p.params == [{"address": ADDR, "fromBlock": hex(HEAD), "toBlock": hex(HEAD)}]
    assert p.finality is Finality.UNFINALIZED


def test_log_filter_by_block_hash_is_keyed_as_given(head: HeadView) -> None:
    p = plan("eth_getLogs", [{"blockHash": block_hash(99)}], head)
    assert p.finality is Finality.UNFINALIZED and p.params is None and p.anchor == "items"


def test_log_keys_ignore_member_order(head: HeadView) -> None:
    a = plan("eth_getLogs", [{"fromBlock": "0x1", "toBlock": "0x2", "address": ADDR}], head)
    b = plan("eth_getLogs", [{"address": ADDR, "toBlock": "0x2", "fromBlock": "0x1"}], head)
    assert a.key == b.key and a.key is not None


# --- chain facts and realtime ----------------------------------------------------------------
def test_chain_id_is_final_and_realtime_answers_are_keyed_by_the_head(head: HeadView) -> None:
    assert plan("eth_chainId", [], head).finality is Finality.FINALIZED
    assert plan("net_version", [], head).finality is Finality.FINALIZED
    gas = plan("eth_gasPrice", [], head)
    assert gas.finality is Finality.REALTIME
    assert gas.key is not None and gas.key.endswith(block_hash(HEAD).encode())
    assert plan("eth_gasPrice", [], make_head(number=HEAD - 1)).key != gas.key


def test_every_rule_points_at_a_parameter_it_can_read() -> None:
    for method, rule in RULES.items():
        if rule.kind in (Kind.BLOCK, Kind.BLOCK_HASH, Kind.TX_HASH):
            assert 0 <= rule.index <= 2, method
        if rule.default is not None:
            assert rule.default in ("latest", "pending", "safe", "finalized", "earliest"), method


# --- checks on answers -----------------------------------------------------------------------
def test_anchor_of_reads_the_block_an_answer_belongs_to() -> None:
    h = block_hash(99)
    assert anchor_of({"number": "0x63", "hash": h}, "block") == (99, h)
    assert anchor_of({"blockNumber": "0x63", "blockHash": h}, "item") == (99, h)
    assert anchor_of([{"blockNumber": "0x63", "blockHash": h}], "items") == (99, h)
    assert anchor_of({"blockHash": None, "blockNumber": None}, "item") is False  # pending tx
    assert anchor_of({"number": "zz", "hash": h}, "block") is False
    assert anchor_of(None, "block") is None
    assert anchor_of([], "items") is None
    assert anchor_of({"x": 1}, None) is None


def test_items_canonical_refuses_items_from_a_replaced_fork(head: HeadView) -> None:
    good = [{"blockNumber": hex(n), "blockHash": block_hash(n)} for n in (85, 99)]
    assert items_canonical(good, head)
    stale = [*good, {"blockNumber": "0x60", "blockHash": block_hash(96, "b")}]
    assert not items_canonical(stale, head)
    # Final blocks and blocks outside the window are not second-guessed.
    old = [{"blockNumber": hex(FINAL), "blockHash": block_hash(FINAL, "b")}]
    assert items_canonical(old, head)
    assert not items_canonical([{"blockNumber": "0x1"}], head)
    assert items_canonical("0x", head)


# --- what is stored, and how -------------------------------------------------------------
def balance_at(ref: Any, head: HeadView) -> Plan:
    return plan("eth_getBalance", [ADDR, ref], head)


def test_errors_are_never_stored(head: HeadView) -> None:
    p = balance_at(hex(FINAL), head)
    assert store_decision(p, None, b'{"code":-32000,"message":"x"}', None, head, 3.0) is None


def test_uncacheable_calls_are_never_stored(head: HeadView) -> None:
    assert store_decision(PASS, b'"0x1"', None, "0x1", head, 3.0) is None
    assert store_decision(balance_at("pending", head), b'"0x1"', None, "0x1", head, 3.0) is None


@pytest.mark.parametrize("empty", [b"null", b"[]", b'"0x"'])
def test_empty_answers_are_stored_once_final(head: HeadView, empty: bytes) -> None:
    code = plan("eth_getCode", [ADDR, hex(FINAL)], head)
    stored = store_decision(code, empty, None, None, head, 3.0)
    assert stored is not None and stored.key == code.key


@pytest.mark.parametrize("ref", ["latest", hex(FINAL + 1), {"blockHash": block_hash(HEAD)}])
def test_a_not_found_answer_to_an_unfinal_block_is_never_stored(head: HeadView, ref: Any) -> None:
    # A node that has not seen the block yet (a lagging upstream) answers null for it.
    unfinal = plan("eth_getCode", [ADDR, ref], head)
    assert unfinal.pinned
    assert store_decision(unfinal, b"null", None, None, head, 3.0) is None


@pytest.mark.parametrize("empty", [b"[]", b'"0x"'])
@pytest.mark.parametrize("ref", ["latest", hex(FINAL + 1), {"blockHash": block_hash(HEAD)}])
def test_an_empty_answer_pinned_to_a_block_hash_is_stored_tied_to_that_block(
    head: HeadView, ref: Any, empty: bytes
) -> None:
    # Forwarded by hash, the answer is about that very block: "0x" there is "0x" for good.
    p = plan("eth_call", [{"to": ADDR, "data": "0x"}, ref], head)
    assert p.pinned and p.block_hash is not None
    stored = store_decision(p, empty, None, None, head, 3.0)
    assert stored == stored_as(p, 0.0, p.block_number, p.block_hash)


def test_empty_answers_not_pinned_to_a_block_wait_for_finality(head: HeadView) -> None:
    # Not forwarded by hash: the answer could be another fork's, or not there yet.
    receipt = plan("eth_getTransactionReceipt", ["0x" + "ab" * 32], head)
    assert not receipt.pinned
    assert store_decision(receipt, b"null", None, None, head, 3.0) is None
    by_number = plan("eth_getBlockTransactionCountByNumber", [hex(FINAL + 1)], head)
    assert not by_number.pinned
    assert store_decision(by_number, b'"0x"', None, None, head, 3.0) is None
    logs = plan("eth_getLogs", [{"fromBlock": hex(FINAL + 1), "toBlock": "latest"}], head)
    assert not logs.pinned
    assert store_decision(logs, b"[]", None, [], head, 3.0) is None
    by_hash = plan("eth_getLogs", [{"blockHash": block_hash(HEAD)}], head)
    assert not by_hash.pinned
    assert store_decision(by_hash, b"[]", None, [], head, 3.0) is None


def test_a_final_answer_is_stored_for_ever_without_a_check(head: HeadView) -> None:
    p = balance_at(hex(FINAL), head)
    assert store_decision(p, b'"0x1"', None, "0x1", head, 3.0) == stored_as(p, 0.0, -1, None)


def test_reads_pinned_to_a_block_hash_are_stored_whatever_they_hold_tied_to_that_block(
    head: HeadView,
) -> None:
    h = block_hash(HEAD - 1)
    for ref in ("latest", hex(HEAD - 1), {"blockHash": h}):
        p = balance_at(ref, head)
        for value in (b'"0x0"', b'"0x1"', b'"0xffffffffffffffffffff"'):
            stored = store_decision(p, value, None, None, head, 3.0)
            expected = (HEAD, head.canonical[HEAD]) if ref == "latest" else (HEAD - 1, h)
            assert stored == stored_as(p, 0.0, *expected)


def test_a_pinned_block_reorged_away_or_past_the_head_is_not_stored(head: HeadView) -> None:
    p = balance_at({"blockHash": block_hash(HEAD - 1)}, head)
    reorged = make_head(fork="b")
    assert store_decision(p, b'"0x1"', None, None, reorged, 3.0) is None
    tx = plan("eth_getTransactionByHash", ["0x" + "12" * 32], head)
    ahead = {"blockNumber": hex(HEAD + 1), "blockHash": block_hash(HEAD + 1)}
    assert store_decision(tx, b"{}", None, ahead, head, 3.0) is None


def test_an_answer_from_another_fork_than_the_key_names_is_not_stored(head: HeadView) -> None:
    p = plan("eth_getBlockByNumber", [hex(HEAD - 1), False], head)
    other = {"number": hex(HEAD - 1), "hash": block_hash(HEAD - 1, "b")}
    assert store_decision(p, b"{}", None, other, head, 3.0) is None
    own = {"number": hex(HEAD - 1), "hash": block_hash(HEAD - 1)}
    assert store_decision(p, b"{}", None, own, head, 3.0) is not None


def test_a_final_block_asked_by_number_answered_with_another_is_not_stored(
    head: HeadView,
) -> None:
    p = plan("eth_getBlockByNumber", [hex(FINAL), False], head)
    other = {"number": hex(FINAL - 1), "hash": block_hash(FINAL - 1)}
    assert store_decision(p, b"{}", None, other, head, 3.0) is None


def test_a_transaction_not_yet_in_a_block_is_not_stored(head: HeadView) -> None:
    p = plan("eth_getTransactionByHash", ["0x" + "12" * 32], head)
    pending = {"hash": "0x" + "12" * 32, "blockHash": None, "blockNumber": None}
    assert store_decision(p, b"{}", None, pending, head, 3.0) is None
    mined = {"hash": "0x" + "12" * 32, "blockHash": block_hash(HEAD), "blockNumber": hex(HEAD)}
    stored = store_decision(p, b"{}", None, mined, head, 3.0)
    assert stored == stored_as(p, 0.0, HEAD, block_hash(HEAD))


def test_list_answers_with_an_item_off_the_chain_are_not_stored(head: HeadView) -> None:
    p = plan("eth_getLogs", [{"fromBlock": hex(HEAD - 2), "toBlock": "latest"}], head)
    logs = [
        {"blockNumber": hex(HEAD - 2), "blockHash": block_hash(HEAD - 2)},
        {"blockNumber": hex(HEAD - 1), "blockHash": block_hash(HEAD - 1, "b")},
    ]
    assert store_decision(p, b"[{}]", None, logs, head, 3.0) is None
    assert store_decision(p, b"[{}]", None, logs[:1], head, 3.0) is not None


def test_realtime_answers_live_one_block_time(head: HeadView) -> None:
    p = plan("eth_gasPrice", [], head)
    assert store_decision(p, b'"0x1"', None, "0x1", head, 3.0) == stored_as(p, 3.0, -1, None)


def test_a_block_known_to_the_caller_is_its_answer_s_block(head: HeadView) -> None:
    n, h = HEAD - 1, block_hash(HEAD - 1)
    by_hash = plan("eth_getBlockByHash", [h, False], head)
    assert store_decision(by_hash, b"{}", None, None, head, 3.0, block=(n, h)) == stored_as(
        by_hash, 0.0, n, h
    )
    final = plan("eth_getBlockByNumber", [hex(FINAL), False], head)
    stored = store_decision(final, b"{}", None, None, head, 3.0, block=(FINAL, "0x00"))
    assert stored == stored_as(final, 0.0, -1, None)


def test_an_unfinalized_state_read_has_its_by_number_form_for_an_upstream_at_that_head(
    head: HeadView,
) -> None:
    call = [{"to": ADDR, "data": "0x"}, "latest"]
    p = plan("eth_call", call, head)
    assert p.params == [call[0], {"blockHash": block_hash(HEAD)}]
    assert p.at_head == [call[0], hex(HEAD)] and p.block_hash == block_hash(HEAD)
    # Receipts by a bare hash have the same choice.
    assert plan("eth_getBlockReceipts", ["latest"], head).at_head == [hex(HEAD)]
    # Final blocks go by number already; a client's own by-hash request keeps its form.
    assert plan("eth_call", [call[0], hex(FINAL)], head).at_head is None
    assert plan("eth_call", [call[0], {"blockHash": block_hash(HEAD)}], head).at_head is None
    # Reads that never went by hash have none.
    assert plan("eth_getBlockByNumber", ["latest", False], head).at_head is None
