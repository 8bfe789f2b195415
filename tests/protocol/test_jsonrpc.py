"""The JSON-RPC codec: bytes in, calls and answers out. No sockets, no event loop."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from chainrelay.errors import BatchTooLarge, InvalidRequest, ParseError
from chainrelay.wire.jsonrpc import (
    Call,
    encode_error,
    encode_error_raw,
    encode_request,
    encode_result,
    id_probe,
    join_batch,
    parse_answer,
    parse_body,
    single_id,
    split_id,
    split_token,
)

BIG = 123456789012345678901234567890  # past 64 bits: orjson alone would turn it into a float


def error_of(item: object) -> dict[str, Any]:
    assert isinstance(item, bytes), f"expected a ready error answer, got {item!r}"
    doc = orjson.loads(item)
    assert doc["jsonrpc"] == "2.0"
    assert "result" not in doc
    return dict(doc)


# --- parse_body: single calls ----------------------------------------------------------------
def test_single_call_keeps_method_params_and_id_spelling() -> None:
    items, is_batch = parse_body(
        b'{"jsonrpc":"2.0","id":"a-1","method":"eth_getBalance","params":["0xab","latest"]}', 10
    )
    assert is_batch is False
    assert items == [Call(b'"a-1"', "eth_getBalance", ["0xab", "latest"], True)]


def test_params_may_be_an_object_or_omitted() -> None:
    (named,), _ = parse_body(b'{"jsonrpc":"2.0","id":1,"method":"m","params":{"a":1}}', 10)
    assert isinstance(named, Call) and named.params == {"a": 1} and named.has_params
    (bare,), _ = parse_body(b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}', 10)
    assert isinstance(bare, Call) and bare.params == [] and bare.has_params is False
    (null,), _ = parse_body(b'{"jsonrpc":"2.0","id":1,"method":"m","params":null}', 10)
    assert isinstance(null, Call) and null.has_params is False


def test_notification_has_no_id_and_null_id_is_an_id() -> None:
    (note,), _ = parse_body(b'{"jsonrpc":"2.0","method":"eth_chainId"}', 10)
    assert isinstance(note, Call) and note.id is None
    (null,), _ = parse_body(b'{"jsonrpc":"2.0","id":null,"method":"eth_chainId"}', 10)
    assert isinstance(null, Call) and null.id == b"null"


@pytest.mark.parametrize(
    "raw_id",
    [
        b"0",
        b"-1",
        b"18446744073709551615",  # u64 max: orjson's largest exact integer
        b"-9223372036854775809",  # below i64: orjson makes it a float
        str(BIG).encode(),
        b"1.5",
        b"1.0",
        b"2.5e-3",
        b'"0x1"',
        b'"\\u00e9t\\u00e9"',
    ],
)
def test_ids_come_back_as_the_caller_wrote_them_or_as_an_equal_number(raw_id: bytes) -> None:
    (call,), _ = parse_body(b'{"jsonrpc":"2.0","id":' + raw_id + b',"method":"m"}', 10)
    assert isinstance(call, Call)
    assert call.id is not None
    # Exact value, and for numbers the exact type too: 1.0 must not come back as 1.
    got, want = json.loads(call.id), json.loads(raw_id)
    assert got == want and type(got) is type(want)


def test_big_int_and_float_ids_splice_exactly_into_answers() -> None:
    body = b'[{"jsonrpc":"2.0","id":%d,"method":"a"},{"jsonrpc":"2.0","id":0.5,"method":"b"}]' % BIG
    items, _ = parse_body(body, 10)
    ids = [c.id for c in items if isinstance(c, Call) and c.id is not None]
    answers = [orjson.loads(encode_result(i, b'"0x1"')) for i in ids]
    exact = [json.loads(encode_result(i, b"1")) for i in ids]
    assert [a["result"] for a in answers] == ["0x1", "0x1"]
    assert [e["id"] for e in exact] == [BIG, 0.5]


def test_big_integers_in_params_stay_exact() -> None:
    (call,), _ = parse_body(b'{"jsonrpc":"2.0","id":1,"method":"m","params":[%d]}' % BIG, 10)
    assert isinstance(call, Call)
    assert call.params == [BIG]


@pytest.mark.parametrize(
    ("body", "reply_id", "words"),
    [
        (b'{"jsonrpc":"1.0","id":7,"method":"m"}', 7, "jsonrpc"),
        (b'{"id":7,"method":"m"}', 7, "jsonrpc"),
        (b'{"jsonrpc":2.0,"id":7,"method":"m"}', 7, "jsonrpc"),
        (b'{"jsonrpc":"2.0","id":7}', 7, "method"),
        (b'{"jsonrpc":"2.0","id":7,"method":""}', 7, "method"),
        (b'{"jsonrpc":"2.0","id":7,"method":5}', 7, "method"),
        (b'{"jsonrpc":"2.0","id":7,"method":"m","params":"x"}', 7, "params"),
        (b'{"jsonrpc":"2.0","id":7,"method":"m","params":3}', 7, "params"),
        (b'{"jsonrpc":"2.0","id":true,"method":"m"}', None, "id"),
        (b'{"jsonrpc":"2.0","id":[1],"method":"m"}', None, "id"),
        (b'{"jsonrpc":"2.0","id":{"a":1},"method":"m"}', None, "id"),
        (b"1", None, "object"),
        (b'"eth_chainId"', None, "object"),
        (b"null", None, "object"),
        (b"true", None, "object"),
    ],
)
def test_invalid_requests_become_ready_32600_answers(
    body: bytes, reply_id: object, words: str
) -> None:
    (item,), is_batch = parse_body(body, 10)
    assert is_batch is False
    err = error_of(item)
    assert err["id"] == reply_id
    error = err["error"]
    assert isinstance(error, dict)
    assert error["code"] == -32600
    assert words in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"{",
        b'{"jsonrpc":"2.0","id":1,"method":"m",}',
        b"{'jsonrpc':'2.0'}",
        b"\xff\xfe",
        b"NaN",
        b"[" * 5000 + b"]" * 5000,
        b'{"jsonrpc":"2.0","id":1,"method":"m","params":' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_bytes_that_are_not_json_raise_parse_error(body: bytes) -> None:
    with pytest.raises(ParseError) as exc:
        parse_body(body, 10)
    assert exc.value.code == -32700


def test_empty_batch_is_invalid_and_a_long_batch_is_refused() -> None:
    with pytest.raises(InvalidRequest) as empty:
        parse_body(b"[]", 10)
    assert empty.value.code == -32600
    call = b'{"jsonrpc":"2.0","id":1,"method":"m"}'
    items, _ = parse_body(b"[" + b",".join([call] * 10) + b"]", 10)
    assert len(items) == 10
    with pytest.raises(BatchTooLarge) as long:
        parse_body(b"[" + b",".join([call] * 11) + b"]", 10)
    assert long.value.code == -32600
    assert "11" in long.value.message and "10" in long.value.message


# --- parse_body: batches ---------------------------------------------------------------------
def test_batch_keeps_order_and_mixes_calls_notifications_and_invalid_items() -> None:
    body = (
        b'[{"jsonrpc":"2.0","id":1,"method":"a"},'
        b"1,"
        b'{"jsonrpc":"2.0","method":"note"},'
        b'{"jsonrpc":"1.0","id":"x","method":"b"},'
        b"[],"
        b'{"jsonrpc":"2.0","id":2.5,"method":"c","params":[1]}]'
    )
    items, is_batch = parse_body(body, 10)
    assert is_batch is True
    assert len(items) == 6
    assert items[0] == Call(b"1", "a", [], False)
    assert error_of(items[1])["id"] is None
    assert items[2] == Call(None, "note", [], False)
    assert error_of(items[3])["id"] == "x"
    assert error_of(items[4])["error"]["code"] == -32600
    assert items[5] == Call(b"2.5", "c", [1], True)


def test_batch_of_non_objects_is_one_error_per_item() -> None:
    items, is_batch = parse_body(b'[1,"a",null,true,[]]', 10)
    assert is_batch is True
    errs = [error_of(i) for i in items]
    assert [e["error"]["code"] for e in errs] == [-32600] * 5
    assert all(e["id"] is None for e in errs)


# --- encoders --------------------------------------------------------------------------------
def test_encode_result_splices_raw_bytes_without_reencoding() -> None:
    raw = b'{"b": 1,  "a": [1, 2]}'  # spacing and key order survive
    out = encode_result(b'"id-9"', raw)
    assert out == b'{"jsonrpc":"2.0","id":"id-9","result":{"b": 1,  "a": [1, 2]}}'
    assert orjson.loads(out) == {"jsonrpc": "2.0", "id": "id-9", "result": {"b": 1, "a": [1, 2]}}


def test_encode_error_and_raw_error_pass_through() -> None:
    out = orjson.loads(encode_error(b"3", -32602, "bad", {"x": 1}))
    assert out == {
        "jsonrpc": "2.0",
        "id": 3,
        "error": {"code": -32602, "message": "bad", "data": {"x": 1}},
    }
    assert "data" not in orjson.loads(encode_error(b"3", -32601, "nope"))["error"]
    raw = b'{"code":3,"message":"execution reverted","data":"0x08c379a0"}'
    assert encode_error_raw(b"null", raw) == b'{"jsonrpc":"2.0","id":null,"error":' + raw + b"}"


def test_join_batch_and_encode_request() -> None:
    assert join_batch([b"1", b"2"]) == b"[1,2]"
    assert orjson.loads(encode_request(4, "eth_chainId", None)) == {
        "jsonrpc": "2.0",
        "id": 4,
        "method": "eth_chainId",
    }
    assert orjson.loads(encode_request(5, "m", {"k": "v"}))["params"] == {"k": "v"}


# --- parse_answer ----------------------------------------------------------------------------
def test_result_is_sliced_raw_from_a_compact_answer() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"result":{"number":"0x10","hash":"0xab"}}'
    a = parse_answer(body)
    assert a.result == b'{"number":"0x10","hash":"0xab"}'
    assert a.error is None
    assert a.value == {"number": "0x10", "hash": "0xab"}


def test_result_is_sliced_raw_from_a_pretty_printed_answer() -> None:
    body = b'{\n  "jsonrpc": "2.0",\n  "id": 1,\n  "result" :  {"a": [1, 2]}\n}\n\n'
    a = parse_answer(body)
    assert a.result == b'{"a": [1, 2]}'
    assert a.value == {"a": [1, 2]}


def test_result_key_inside_an_earlier_member_does_not_confuse_slicing() -> None:
    body = b'{"jsonrpc":"2.0","id":"result","result":{"result":"x"}}'
    a = parse_answer(body)
    assert orjson.loads(a.result or b"") == {"result": "x"}
    body2 = b'{"jsonrpc":"2.0","id":1,"result":{"result":"x","y":"\\"result\\""}}'
    assert orjson.loads(parse_answer(body2).result or b"") == {"result": "x", "y": '"result"'}


def test_result_first_or_in_the_middle_is_still_read_exactly() -> None:
    for body in (
        b'{"result":"0x1","id":1,"jsonrpc":"2.0"}',
        b'{"id":1,"result":"0x1","jsonrpc":"2.0"}',
    ):
        a = parse_answer(body)
        assert a.result == b'"0x1"'
        assert a.value == "0x1"


def test_big_int_result_sliced_raw_stays_exact() -> None:
    a = parse_answer(b'{"jsonrpc":"2.0","id":1,"result":%d}' % BIG)
    assert a.result == str(BIG).encode()


def test_big_int_result_not_last_stays_exact() -> None:
    a = parse_answer(b'{"jsonrpc":"2.0","result":{"x":%d},"id":1}' % BIG)
    assert a.result is not None
    assert json.loads(a.result) == {"x": BIG}


def test_big_int_in_an_error_not_last_stays_exact() -> None:
    a = parse_answer(b'{"jsonrpc":"2.0","error":{"code":3,"data":%d},"id":1}' % BIG)
    assert a.result is None and a.error is not None
    assert json.loads(a.error) == {"code": 3, "data": BIG}


def test_integer_beyond_a_float_is_still_read() -> None:
    huge = b"9" * 400  # orjson refuses a number it cannot hold as a float
    a = parse_answer(b'{"jsonrpc":"2.0","result":{"x":%s},"id":1}' % huge)
    assert a.result == b'{"x":%s}' % huge


def test_large_answer_is_sliced_with_its_value_decoded_once() -> None:
    block = {"number": "0x10", "transactions": [{"input": "0x" + "cd" * 500}] * 300}
    body = b'{"jsonrpc":"2.0","id":7,"result":' + orjson.dumps(block) + b"}\n"
    a = parse_answer(body)
    assert a.result == orjson.dumps(block)
    assert a.value == block


@pytest.mark.parametrize("empty", [b"null", b"[]", b'"0x"'])
def test_empty_results_are_recognised(empty: bytes) -> None:
    a = parse_answer(b'{"jsonrpc":"2.0","id":1,"result":' + empty + b"}")
    assert a.result == empty and a.is_empty
    assert not parse_answer(b'{"jsonrpc":"2.0","id":1,"result":"0x0"}').is_empty


def test_error_member_is_kept_raw() -> None:
    err = b'{"code":3,"message":"execution reverted: nope","data":"0x08c379a0"}'
    a = parse_answer(b'{"jsonrpc":"2.0","id":1,"error":' + err + b"}")
    assert a.result is None
    assert a.error == err
    assert a.error_message() == "execution reverted: nope"
    first = parse_answer(b'{"error":{"code":-32000,"message":"x"},"jsonrpc":"2.0","id":1}')
    assert orjson.loads(first.error or b"") == {"code": -32000, "message": "x"}


def test_null_error_beside_a_result_is_a_result() -> None:
    a = parse_answer(b'{"jsonrpc":"2.0","id":1,"error":null,"result":"0x5"}')
    assert a.error is None and a.result == b'"0x5"'


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"result":"0x',
        b"[]",
        b'[{"jsonrpc":"2.0","id":1,"result":"0x1"}]',
        b'{"jsonrpc":"2.0","id":1}',
        b"<html>502 Bad Gateway</html>",
        b"",
        b'"0x1"',
    ],
)
def test_malformed_answers_raise_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_answer(body)


# --- the fast path's id split ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "token", "rest"),
    [
        (b'{"jsonrpc":"2.0","id":12,"method":"m"}', b"12", b'{"jsonrpc":"2.0","id":,"method":"m"}'),
        (b'{"method":"m","id":7}', b"7", b'{"method":"m","id":}'),
        (b'{"id":"abc","method":"m"}', b'"abc"', b'{"id":,"method":"m"}'),
        (b'{"id":null,"method":"m"}', b"null", b'{"id":,"method":"m"}'),
        (b'{"method": "m", "id": 5}', b"5", b'{"method": "m", "id": }'),  # json.dumps' spacing
        (b'{"id" :\n1 ,"method":"m"}', b"1", b'{"id" :\n ,"method":"m"}'),
    ],
)
def test_split_id_finds_plain_ids(body: bytes, token: bytes, rest: bytes) -> None:
    assert split_id(body) == (token, rest)


@pytest.mark.parametrize(
    "body",
    [
        b'[{"id":1,"method":"m"}]',  # a batch
        b'{"method":"m"}',  # a notification
        b'{"id":1.5,"method":"m"}',  # a float keeps the slow path
        b'{"id":-1,"method":"m"}',
        b'{"id":"a\\"b","method":"m"}',  # an escape in the id
        b'{"id":1,"params":[{"id":2}]}',  # a second "id" member
        b'{"method":"m","params":["id"],"id":1}',  # "id" twice, if only as a string
        b'{"id":abc,"method":"m"}',  # not JSON
        b'{"id":01,"method":"m"}',  # a leading zero: not JSON
        b'{"id":-0,"method":"m"}',  # JSON, but answered as 0 by the full path
        b'{"id":"a\x01","method":"m"}',  # a control character: not JSON
        b'{"id":"\xc3\xa9","method":"m"}',  # not plain ASCII
        b'{"id":12.0,"method":"m"}',
        b'{"id":nulls,"method":"m"}',
    ],
)
def test_split_id_declines_what_it_cannot_split_safely(body: bytes) -> None:
    assert split_id(body) is None


def test_split_token_finds_the_id_of_a_whole_http_request() -> None:
    request = b'POST / HTTP/1.1\r\nContent-Length: 22\r\n\r\n{"id":"x","method":"m"}'
    assert split_token(request) == (b'"x"', request.replace(b'"x"', b"", 1))
    head_too = split_token(b'POST / HTTP/1.1\r\nX: "id":1,\r\n\r\n{"id":2}')
    assert head_too is not None and not single_id(head_too[1])


@pytest.mark.parametrize(
    ("body", "own"),
    [
        (b'{"jsonrpc":"2.0","id":5,"method":"m","params":[]}', True),
        (b'{"jsonrpc":"2.0","method":"m","params":[{"id":5}],"\\u0069d" : 5}', False),
        (b'{"jsonrpc":"2.0","\\u0069d":5,"method":"m","params":[{"id":5}]}', False),
        (b'{"jsonrpc":"2.0","method":"m","params":[{"id":5}]}', False),
    ],
)
def test_id_probe_tells_the_calls_own_id_from_a_nested_one(body: bytes, own: bool) -> None:
    split = split_id(body)
    assert split is not None
    assert id_probe(split[1]) is own
