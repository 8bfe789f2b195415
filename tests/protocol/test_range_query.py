"""``GET /feed/range``'s query, parsed: every integer checked for type and range before it
reaches a backlog or the batch log (whose sqlite integers are signed 64-bit)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chainrelay.batches.frame import MAX_RANGE_FIELDS, RangeQuery, parse_range_query
from chainrelay.tree.session import POSITION_END

TOP = POSITION_END - 1


@pytest.mark.parametrize(
    ("query", "parsed"),
    [
        (b"stream=arbitrum/batches&from=0", RangeQuery("arbitrum/batches", 0)),
        (b"stream=arbitrum%2Fbatches&from=7&limit=3", RangeQuery("arbitrum/batches", 7, 3)),
        (b"from=5&stream=a", RangeQuery("a", 5)),
        (b"stream=a&from=%d&limit=%d" % (TOP, TOP), RangeQuery("a", TOP, TOP)),
        (b"stream=a&from=0000000000000000001", RangeQuery("a", 1)),
        (b"stream=a&from=1&cb=123&x", RangeQuery("a", 1)),
        (b"stream=" + b"s" * 32 + b"&from=1", RangeQuery("s" * 32, 1)),
    ],
)
def test_a_range_query_within_bounds_is_read_as_sent(query: bytes, parsed: RangeQuery) -> None:
    assert parse_range_query(query) == parsed


BAD: dict[str, bytes] = {
    "empty": b"",
    "no from": b"stream=a",
    "no stream": b"from=1",
    "from empty": b"stream=a&from=",
    "from 2**63": b"stream=a&from=%d" % POSITION_END,
    "from 2**64": b"stream=a&from=%d" % 2**64,
    "from of 5000 digits": b"stream=a&from=" + b"9" * 5000,
    "from negative": b"stream=a&from=-1",
    "from signed": b"stream=a&from=%2B1",
    "from with underscores": b"stream=a&from=1_000",
    "from with blanks": b"stream=a&from=+1",
    "from hex": b"stream=a&from=0x10",
    "from float": b"stream=a&from=1.0",
    "from exponent": b"stream=a&from=1e3",
    "from not ASCII digits": "stream=a&from=\u0661".encode(),
    "from percent-encoded Arabic digit": b"stream=a&from=%D9%A1",
    "from twice": b"stream=a&from=1&from=2",
    "limit 0": b"stream=a&from=1&limit=0",
    "limit 2**63": b"stream=a&from=1&limit=%d" % POSITION_END,
    "limit negative": b"stream=a&from=1&limit=-5",
    "limit empty": b"stream=a&from=1&limit=",
    "limit twice": b"stream=a&from=1&limit=1&limit=1",
    "stream empty": b"stream=&from=1",
    "stream twice": b"stream=a&stream=b&from=1",
    "stream of 33": b"stream=" + b"s" * 33 + b"&from=1",
    "stream not ASCII": b"stream=%C3%A9&from=1",
    "stream with a NUL": b"stream=a%00&from=1",
    "query not ASCII": b"stream=\xc3\xa9&from=1",
    "too many fields": b"&".join([b"x=1"] * MAX_RANGE_FIELDS) + b"&stream=a&from=1",
}


@pytest.mark.parametrize("query", list(BAD.values()), ids=list(BAD))
def test_a_range_query_out_of_bounds_is_a_value_error_with_a_reason(query: bytes) -> None:
    with pytest.raises(ValueError) as exc:
        parse_range_query(query)
    assert str(exc.value)


@given(st.binary(max_size=200))
def test_any_query_parses_or_is_a_value_error(query: bytes) -> None:
    try:
        q = parse_range_query(query)
    except ValueError:
        return
    assert 0 <= q.start < POSITION_END
    assert q.limit is None or 1 <= q.limit < POSITION_END


@given(st.integers(0, TOP), st.integers(1, TOP))
def test_every_seq_and_limit_in_range_round_trips(start: int, limit: int) -> None:
    query = b"stream=a%%2Fb&from=%d&limit=%d" % (start, limit)
    assert parse_range_query(query) == RangeQuery("a/b", start, limit)
