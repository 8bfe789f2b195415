"""Upstream batches: the request of a chunk, and each call's answer cut out of the
upstream's array exactly as a single call's answer would read."""

from __future__ import annotations

import tracemalloc

import orjson
import pytest

from chainrelay.upstreams.batching import NotABatchAnswer, encode_batch, parse_batch
from chainrelay.wire.jsonrpc import Call, kept, parse_answer, parse_body


def test_a_batch_request_numbers_its_calls_in_order_and_keeps_omitted_params_omitted() -> None:
    body = encode_batch(7, [("eth_getBalance", ["0xab", "latest"]), ("eth_blockNumber", None)])
    assert orjson.loads(body) == [
        {"jsonrpc": "2.0", "id": 7, "method": "eth_getBalance", "params": ["0xab", "latest"]},
        {"jsonrpc": "2.0", "id": 8, "method": "eth_blockNumber"},
    ]


def single(id_: int, member: str, raw: str) -> str:
    return f'{{"jsonrpc":"2.0","id":{id_},"{member}":{raw}}}'


@pytest.mark.parametrize(
    "raw_result",
    [
        '"0x2a"',
        '{"b":1,"a":[1,2,{"c":null}]}',
        # what orjson would write otherwise: an escape, a float, an integer past 64 bits
        '"\\u003cscript\\u003e"',
        "1.50",
        "123456789012345678901234567890",
    ],
)
def test_each_answer_is_the_bytes_the_upstream_wrote_for_it(raw_result: str) -> None:
    alone = parse_answer(single(1, "result", raw_result).encode())
    for sep in (",", ", \n "):
        raw = ("[" + sep.join(single(i, "result", raw_result) for i in (11, 10)) + "]").encode()
        got = parse_batch(raw, 10, 2)
        assert [a.result for a in got] == [alone.result, alone.result]
        assert got[0].result == raw_result.encode()


def test_answers_come_back_in_the_order_of_the_calls_whatever_the_array_order() -> None:
    raw = ("[" + ",".join(single(i, "result", f'"0x{i:x}"') for i in (3, 1, 2)) + "]").encode()
    got = parse_batch(raw, 1, 3)
    assert [a.result for a in got] == [b'"0x1"', b'"0x2"', b'"0x3"']


def test_a_call_answered_with_an_error_keeps_that_error_as_its_answer() -> None:
    err = '{"code":-32000,"message":"execution reverted","data":"0x08c379a0"}'
    raw = f"[{single(1, 'result', '1')},{single(2, 'error', err)}]".encode()
    got = parse_batch(raw, 1, 2)
    assert got[0].result == b"1" and got[0].error is None
    assert got[1].error == err.encode() and got[1].result is None


@pytest.mark.parametrize(
    "raw",
    [
        # providers that refuse batches answer one error object
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"batch not supported"}}',
        # an array missing an id (a provider capping batches below their length)
        b'[{"jsonrpc":"2.0","id":1,"result":"0x1"}]',
        b'[{"jsonrpc":"2.0","id":1,"result":"0x1"},{"jsonrpc":"2.0","id":9,"result":"0x2"}]',
        b"[]",
        b"not json",
        b'[{"jsonrpc":"2.0","id":1},{"jsonrpc":"2.0","id":2,"result":"0x2"}]',
    ],
)
def test_what_answers_not_every_call_is_no_batch_answer(raw: bytes) -> None:
    with pytest.raises(NotABatchAnswer):
        parse_batch(raw, 1, 2)


def test_ids_of_a_parsed_batch_hold_their_own_size_not_an_encoder_buffer() -> None:
    body = orjson.dumps(
        [{"jsonrpc": "2.0", "id": i if i % 2 else f"c{i}", "method": "m"} for i in range(1000)]
    )
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        items, _ = parse_body(body, 1000)
        ids = [c.id for c in items if isinstance(c, Call)]
        del items
        held = tracemalloc.get_traced_memory()[0] - base  # the ids and their list
    finally:
        tracemalloc.stop()
    assert ids[:2] == [b'"c0"', b"1"]
    assert held < 1000 * 100, held  # orjson's own buffers: 4 KiB an id
    assert kept(orjson.dumps("x" * 700)) == orjson.dumps("x" * 700)
