"""Forwarding without decoding: upstream answers readdressed to the caller's id
(``readdress``), and where a request's id goes when it is sent again (``id_at``)."""

from __future__ import annotations

import orjson
import pytest

from chainrelay.wire.jsonrpc import (
    encode_error_raw,
    encode_result,
    id_at,
    parse_answer,
    readdress,
    split_id,
)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"jsonrpc":"2.0","id":7,"result":"0x1bc16d674ec80000"}',
        b'{"jsonrpc":"2.0","id":123456789,"result":{"a":[1,2,{"id":3}],"b":null}}',
        b'{"jsonrpc":"2.0","id":1,"result":null}',
        b'{"jsonrpc":"2.0","id":1,"result":123456789012345678901234567890}',
        # The usual kinds, checked by one scan, and their neighbours that are decoded.
        b'{"jsonrpc":"2.0","id":0,"result":true}',
        b'{"jsonrpc":"2.0","id":1,"result":""}',
        b'{"jsonrpc":"2.0","id":1,"result":"say \\"hi\\" \\u00e9"}',
        b'{"jsonrpc":"2.0","id":1,"result":"caf\xc3\xa9"}',
    ],
)
@pytest.mark.parametrize("caller", [b"1", b"null", b'"abc"', b"18446744073709551616"])
def test_a_result_is_the_full_paths_answer(raw: bytes, caller: bytes) -> None:
    got = readdress(raw, caller)
    assert got is not None
    answer = parse_answer(raw)
    assert answer.result is not None
    assert got == (encode_result(caller, answer.result), False)


def test_an_error_passes_through_unchanged_but_for_the_id() -> None:
    error = b'{"code":3,"message":"execution reverted: no","data":"0x08c379a0"}'
    raw = b'{"jsonrpc":"2.0","id":42,"error":' + error + b"}"
    got = readdress(raw, b'"mine"')
    assert got == (encode_error_raw(b'"mine"', error), True)
    assert orjson.loads(got[0])["error"] == orjson.loads(error)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"jsonrpc":"2.0","result":"0x1","id":7}',  # id last (Nethermind's order)
        b'{"id":7,"jsonrpc":"2.0","result":"0x1"}',
        b'{"jsonrpc":"2.0","id":"7","result":"0x1"}',  # a string id: not one we sent
        b'{"jsonrpc":"2.0","id":-7,"result":"0x1"}',
        b'{"jsonrpc":"2.0","id":7, "result":"0x1"}',  # spaced
        b'{"jsonrpc":"2.0","id":7,"result":"0x1"}\n',  # trailing bytes
        b'{"jsonrpc":"2.0","id":7,"results":"0x1"}',
        b'{"jsonrpc":"2.0","id":7}',
        b'{"jsonrpc":"2.0","id":' + b"1" * 40 + b',"result":"0x1"}',  # not an id we sent
        b'{"jsonrpc":"2.0","id":',
        b"",
        b"[]",
        # Not JSON, though shaped like an answer: the full path refuses it as malformed.
        b'{"jsonrpc":"2.0","id":7,"result":0x1} trailing}',
        b'{"jsonrpc":"2.0","id":7,"result":"0x1"}}',
        b'{"jsonrpc":"2.0","id":7,"result":"0x1",}',
        # "error":null is no error: the full path reads the result beside it.
        b'{"jsonrpc":"2.0","id":7,"error":null,"result":"0x1"}',
        b'{"jsonrpc":"2.0","id":7,"error":null}',
        b'{"jsonrpc":"2.0","id":7,"result":"0x1","error":{"code":1,"message":"m"}}',
        b'{"jsonrpc":"2.0","id":7,"result":"0x1","result":"0x2"}',  # read as its last copy
        b'{"jsonrpc":"2.0","id":07,"result":"0x1"}',  # a leading zero: not JSON
        b'{"jsonrpc":"2.0","id":7,"result":"\x01"}',  # a raw control character: not JSON
        b'{"jsonrpc":"2.0","id":7,"result":"\xff"}',  # not UTF-8: not JSON
    ],
)
def test_other_layouts_are_left_to_decoding(raw: bytes) -> None:
    assert readdress(raw, b"1") is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"eth_getBalance","params":["0xab","pending"]}',
        b'{"method":"eth_call","params":[{"to":"0x1"},"pending"],"id":"x-1","jsonrpc":"2.0"}',
        b'{ "jsonrpc" : "2.0" , "id" :\t null , "method":"eth_chainId"}',
        b'{"params":["0x1d"],"id":42,"method":"eth_getBlockByNumber","jsonrpc":"2.0"}',
    ],
)
def test_the_id_goes_back_where_split_id_took_it(body: bytes) -> None:
    split = split_id(body)
    assert split is not None
    token, rest = split
    at = id_at(body)
    assert rest[:at] + token + rest[at:] == body
    again = orjson.loads(rest[:at] + b"777" + rest[at:])
    assert again == {**orjson.loads(body), "id": 777}


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b'{"jsonrpc":"2.0","method":"eth_chainId"}', b'{"id":1.5}', b'{"id":[1]}'],
)
def test_no_place_for_an_id_without_a_plain_one(body: bytes) -> None:
    assert id_at(body) == -1
