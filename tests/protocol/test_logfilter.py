"""Log filters: parsing (geth's accepted shapes and its refusals) and matching, no sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainrelay.errors import InvalidParams
from chainrelay.subscriptions.logfilter import (
    MAX_FILTER_ADDRESSES,
    MAX_TOPIC_POSITIONS,
    LogFilter,
    logs_of_receipts,
)

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OTHER = "0xe7f1725e7734ce288f8367e1bb143e90bb3f0512"
TRANSFER = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
APPROVAL = "0x8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925"
ALICE = "0x000000000000000000000000f39fd6e51aad88f6f4ce6ab8827279cfffb92266"
BOB = "0x00000000000000000000000070997970c51812dc3a010c7d01b50e0d17dc79c8"
BLOCK_HASH = "0x" + "ab" * 32


def log(
    address: str = TOKEN, topics: list[str] | None = None, number: int = 7, index: int = 0
) -> dict[str, Any]:
    return {
        "address": address.lower(),
        "topics": [TRANSFER, ALICE, BOB] if topics is None else topics,
        "data": "0x" + "00" * 31 + "01",
        "blockNumber": hex(number),
        "blockHash": BLOCK_HASH,
        "logIndex": hex(index),
        "transactionIndex": "0x0",
        "removed": False,
    }


# --- parsing ---------------------------------------------------------------------------------
def test_parse_empty_object_and_null_match_everything() -> None:
    obj: dict[str, Any] | None
    for obj in ({}, None):
        flt = LogFilter.parse(obj)
        assert flt.addresses is None and flt.topics == ()
        assert flt.matches(log()) and flt.matches(log(OTHER, []))


def test_parse_keeps_lower_case_and_range() -> None:
    flt = LogFilter.parse(
        {
            "address": TOKEN,
            "topics": [TRANSFER.upper().replace("0X", "0x")],
            "fromBlock": "0x1",
            "toBlock": "latest",
        }
    )
    assert flt.addresses == frozenset({TOKEN.lower()})
    assert flt.topics == (frozenset({TRANSFER}),)
    assert (flt.from_block, flt.to_block, flt.block_hash) == (1, "latest", None)


def test_parse_address_list_and_empty_list() -> None:
    assert LogFilter.parse({"address": [TOKEN, OTHER]}).addresses == frozenset(
        {TOKEN.lower(), OTHER}
    )
    assert LogFilter.parse({"address": []}).addresses is None


def test_parse_topic_shapes() -> None:
    flt = LogFilter.parse({"topics": [None, [ALICE, BOB], [], [TRANSFER, None]]})
    assert flt.topics == (None, frozenset({ALICE, BOB}), None, None)


def test_parse_block_hash() -> None:
    flt = LogFilter.parse({"blockHash": BLOCK_HASH.upper().replace("0X", "0x")})
    assert flt.block_hash == BLOCK_HASH
    assert flt.to_params() == {"blockHash": BLOCK_HASH}


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ([], "expected an object"),
        ("0x1", "expected an object"),
        ({"address": "0x1234"}, "address"),
        ({"address": TOKEN[2:]}, "0x prefix"),
        ({"address": "0x" + "zz" * 20}, "address"),
        ({"address": 5}, "address"),
        ({"address": [TOKEN, 5]}, "address"),
        ({"address": {"a": TOKEN}}, "address"),
        ({"address": [TOKEN] * (MAX_FILTER_ADDRESSES + 1)}, "too many addresses"),
        ({"topics": TRANSFER}, "topics"),
        ({"topics": [TRANSFER[:-2]]}, "topic"),
        ({"topics": [[TRANSFER, "0x12"]]}, "topic"),
        ({"topics": [[TRANSFER, None, 7]]}, "topic"),
        ({"topics": [{"x": 1}]}, "topic"),
        ({"topics": [None] * (MAX_TOPIC_POSITIONS + 1)}, "max topics"),
        ({"blockHash": BLOCK_HASH, "fromBlock": "0x1"}, "both BlockHash"),
        ({"blockHash": BLOCK_HASH, "toBlock": "latest"}, "both BlockHash"),
        ({"blockHash": "0x12"}, "blockHash"),
        ({"fromBlock": 5}, "fromBlock"),
        ({"fromBlock": "five"}, "fromBlock"),
        ({"toBlock": "0x"}, "toBlock"),
        ({"toBlock": "0x" + "f" * 17}, "toBlock"),
        ({"fromBlock": "0x10", "toBlock": "0x2"}, "invalid block range"),
    ],
)
def test_parse_refuses_bad_shapes_with_a_clear_message(obj: Any, words: str) -> None:
    with pytest.raises(InvalidParams) as info:
        LogFilter.parse(obj)
    assert info.value.code == -32602
    assert words in info.value.message


def test_error_message_of_a_huge_value_is_bounded() -> None:
    with pytest.raises(InvalidParams) as info:
        LogFilter.parse({"address": "0x" + "ab" * 100_000})
    assert len(info.value.message) < 200


# --- matching --------------------------------------------------------------------------------
def test_address_match_is_case_insensitive() -> None:
    assert LogFilter.parse({"address": TOKEN.lower()}).matches(log(TOKEN.upper()))
    assert LogFilter.parse({"address": TOKEN}).matches(log(TOKEN))
    assert not LogFilter.parse({"address": OTHER}).matches(log(TOKEN))
    assert LogFilter.parse({"address": [OTHER, TOKEN]}).matches(log(TOKEN))


def test_topic_positions() -> None:
    lg = log()
    assert LogFilter.parse({"topics": [TRANSFER]}).matches(lg)
    assert LogFilter.parse({"topics": [TRANSFER, ALICE]}).matches(lg)
    assert LogFilter.parse({"topics": [None, ALICE, BOB]}).matches(lg)
    assert LogFilter.parse({"topics": [[APPROVAL, TRANSFER], None, [ALICE, BOB]]}).matches(lg)
    assert not LogFilter.parse({"topics": [APPROVAL]}).matches(lg)
    assert not LogFilter.parse({"topics": [TRANSFER, BOB]}).matches(lg)
    assert not LogFilter.parse({"topics": [None, None, ALICE]}).matches(lg)


def test_more_positions_than_log_topics_never_match_even_as_wildcards() -> None:
    lg = log(topics=[TRANSFER])
    assert LogFilter.parse({"topics": [TRANSFER]}).matches(lg)
    assert not LogFilter.parse({"topics": [TRANSFER, None]}).matches(lg)
    assert not LogFilter.parse({"topics": [None, None]}).matches(lg)
    assert not LogFilter.parse({"topics": [[]]}).matches(log(topics=[]))
    assert LogFilter.parse({"topics": []}).matches(log(topics=[]))


def test_topic_match_is_case_insensitive() -> None:
    upper = "0x" + TRANSFER[2:].upper()
    assert LogFilter.parse({"topics": [upper]}).matches(log())
    assert LogFilter.parse({"topics": [TRANSFER]}).matches(log(topics=[upper]))


def test_numeric_range_bounds_block_number_tags_do_not() -> None:
    flt = LogFilter.parse({"fromBlock": "0x5", "toBlock": "0x9"})
    assert [n for n in range(12) if flt.matches(log(number=n))] == [5, 6, 7, 8, 9]
    tagged = LogFilter.parse({"fromBlock": "earliest", "toBlock": "latest"})
    assert all(tagged.matches(log(number=n)) for n in range(12))


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"address": 5, "topics": [TRANSFER]},
        {"address": TOKEN, "topics": "x"},
        {"address": TOKEN, "topics": [5, None]},
        {"address": TOKEN, "topics": [TRANSFER], "blockNumber": "zz"},
    ],
)
def test_malformed_logs_never_match_and_never_raise(bad: dict[str, Any]) -> None:
    flt = LogFilter.parse(
        {"address": TOKEN, "topics": [TRANSFER], "fromBlock": "0x0", "toBlock": "0x10"}
    )
    assert not flt.matches(bad)


def test_to_params_round_trips() -> None:
    obj = {
        "address": [TOKEN, OTHER],
        "topics": [TRANSFER, None, [BOB, ALICE]],
        "fromBlock": "0x3",
        "toBlock": "latest",
    }
    flt = LogFilter.parse(obj)
    assert LogFilter.parse(flt.to_params()) == flt
    assert flt.to_params()["fromBlock"] == "0x3"


# --- receipts --------------------------------------------------------------------------------
def test_logs_of_receipts_in_log_index_order() -> None:
    receipts: list[dict[str, Any]] = [
        {"logs": [log(index=2), log(index=3)]},
        {"logs": []},
        {"logs": [log(index=0), log(index=1)]},  # an upstream that shuffled its receipts
        {"status": "0x0"},
    ]
    got = logs_of_receipts(receipts)
    assert [int(lg["logIndex"], 16) for lg in got] == [0, 1, 2, 3]
    assert logs_of_receipts([]) == []


# --- properties ------------------------------------------------------------------------------
hex20 = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
hex32 = st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())
mixed_case = st.sampled_from([str.lower, str.upper])


def _case(value: str, how: Any) -> str:
    return "0x" + how(value[2:])


@st.composite
def logs(draw: st.DrawFn) -> dict[str, Any]:
    return log(draw(hex20), draw(st.lists(hex32, max_size=4)), draw(st.integers(0, 10**6)))


@given(logs(), st.data())
def test_filter_from_a_logs_own_fields_matches_it(lg: dict[str, Any], data: st.DataObject) -> None:
    how = data.draw(mixed_case)
    n = data.draw(st.integers(0, len(lg["topics"])))
    obj = {
        "address": _case(lg["address"], how),
        "topics": [_case(t, how) for t in lg["topics"][:n]],
    }
    assert LogFilter.parse(obj).matches(lg)


@given(logs(), st.data())
def test_wildcards_at_any_position_still_match(lg: dict[str, Any], data: st.DataObject) -> None:
    n = len(lg["topics"])
    positions: list[Any] = []
    for topic in lg["topics"]:
        positions.append(data.draw(st.sampled_from([None, [], topic, [topic, None], [None]])))
    flt = LogFilter.parse({"topics": positions})
    assert flt.matches(lg)
    # one more position than the log has topics: never a match, whatever it holds
    longer = LogFilter.parse({"topics": [*positions, None]}) if n < MAX_TOPIC_POSITIONS else None
    assert longer is None or not longer.matches(lg)


@given(logs(), hex32)
def test_a_topic_the_log_lacks_at_a_position_does_not_match(lg: dict[str, Any], other: str) -> None:
    if not lg["topics"] or lg["topics"][0] == other:
        return
    assert not LogFilter.parse({"topics": [other]}).matches(lg)
    assert LogFilter.parse({"topics": [[other, lg["topics"][0]]]}).matches(lg)


@given(logs(), hex20)
def test_another_address_does_not_match(lg: dict[str, Any], other: str) -> None:
    if other == lg["address"]:
        return
    assert not LogFilter.parse({"address": other}).matches(lg)
    assert LogFilter.parse({"address": [other, lg["address"]]}).matches(lg)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=70),
        lambda inner: (
            st.lists(inner, max_size=6)
            | st.dictionaries(
                st.sampled_from(["address", "topics", "fromBlock", "toBlock", "blockHash", "x"]),
                inner,
                max_size=5,
            )
        ),
        max_leaves=20,
    )
)
def test_parse_of_any_json_raises_only_invalid_params(obj: Any) -> None:
    try:
        flt = LogFilter.parse(obj)
    except InvalidParams:
        return
    flt.matches(log())
