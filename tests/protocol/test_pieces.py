"""The piecewise JSON decoder (``wire.pieces``) and its drivers (``chainrelay.slices``): the
same objects as orjson's decoding, each element's exact bytes, text it does not take left to
the usual decoding, and the event loop let run while a large answer is decoded, and while
what it was decoded into is freed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from chainrelay import defaults, slices
from chainrelay.chain.logstore import held_logs_steps, run
from chainrelay.subscriptions.logfilter import logs_of_receipts, logs_of_receipts_steps
from chainrelay.wire import pieces
from chainrelay.wire.jsonrpc import Answer, parse_answer
from tests.lab.corpora import CORPORA

MAINNET = CORPORA / "erigon-mainnet-block-18000000"


def corpus_result(name: str) -> Any:
    """The ``result`` of the first recorded exchange in a mainnet corpus file."""
    doc = json.loads((MAINNET / name).read_text())
    return doc[0]["response"]["result"]


RECEIPTS = corpus_result("eth_getBlockReceipts.json")
BLOCK = corpus_result("eth_getBlockByNumber-full.json")


def answer_of(result: Any, indent: int | None = None) -> bytes:
    """An upstream's answer holding ``result``: compact as geth writes it, or indented."""
    if indent is None:
        return b'{"jsonrpc":"2.0","id":7,"result":' + orjson.dumps(result) + b"}"
    doc = {"jsonrpc": "2.0", "id": 7, "result": result}
    return json.dumps(doc, indent=indent).encode()


def decode(body: bytes, step: int = 4096) -> tuple[pieces.DecodedAnswer, int]:
    """``answer_steps`` run to its end: the answer and how often it yielded."""
    steps = pieces.answer_steps(body, step)
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value, yields
        yields += 1


def items_of(value: Any) -> list[Any]:
    return value if isinstance(value, list) else value["transactions"]


@pytest.mark.parametrize("result", [RECEIPTS, BLOCK], ids=["receipts", "block"])
@pytest.mark.parametrize("indent", [None, 2])
def test_a_corpus_answer_decodes_to_orjsons_objects_with_each_elements_exact_bytes(
    result: Any, indent: int | None
) -> None:
    body = answer_of(result, indent)
    got, yields = decode(body)
    usual = parse_answer(body)
    assert got.value == usual.value == orjson.loads(body)["result"]
    assert got.result == usual.result  # the bytes clients get, as the upstream sent them
    assert yields >= 10  # in pieces, not in one go
    items = items_of(got.value)
    assert got.parts is not None and len(got.parts) == len(items) > 50
    for part, item in zip(got.parts, items, strict=True):
        assert orjson.loads(part) == item
        assert part in body  # a slice of what the upstream sent, whitespace and all
    if indent is None:  # compact: each part is exactly what encoding the element gives
        assert all(p == orjson.dumps(x) for p, x in zip(got.parts, items, strict=True))
        if isinstance(result, list):
            assert b"[" + b",".join(got.parts) + b"]" == got.result


def test_how_often_it_yields_does_not_change_what_it_decodes() -> None:
    body = answer_of(RECEIPTS)
    once, no_yield = decode(body, step=len(body) + 1)
    often, many = decode(body, step=1)
    assert no_yield == 0 and many >= len(RECEIPTS) - 1
    assert once == often


def split_and_walked(body: bytes) -> tuple[pieces.DecodedAnswer, pieces.DecodedAnswer]:
    """The answer split at its elements, and the same answer walked."""
    split = pieces._split_answer_steps(body, 4096)
    walked = pieces._walk_answer_steps(body, 4096)
    return run(split), run(walked)


@pytest.mark.parametrize("result", [RECEIPTS, BLOCK], ids=["receipts", "block"])
def test_the_split_of_a_compact_answer_is_what_walking_it_gives(result: Any) -> None:
    split, walked = split_and_walked(answer_of(result))
    assert split == walked
    assert split.value == result


def test_objects_inside_an_element_do_not_end_it() -> None:
    # Each log begins as its receipt does: "},{"blockHash"" also closes a log.
    receipts = [
        {"blockHash": "0x1", "logs": [{"blockHash": "0x1", "i": i}, {"blockHash": "0x1"}]}
        for i in range(3)
    ]
    split, walked = split_and_walked(answer_of(receipts))
    assert split == walked and split.value == receipts
    assert split.parts == [orjson.dumps(r) for r in receipts]


@pytest.mark.parametrize(("text", "split"), [("a{b", False), ("a},{", False), ('a},{"b', True)])
def test_braces_in_strings_split_right_or_leave_it_to_the_walk(text: str, split: bool) -> None:
    receipts = [{"blockHash": "0x1", "note": text, "i": i} for i in range(3)]
    body = answer_of(receipts)
    if split:  # they balance: each piece is a whole element, and decodes
        assert run(pieces._split_answer_steps(body, 4096)).value == receipts
    else:  # a piece that does not decode is noticed
        with pytest.raises(ValueError):
            run(pieces._split_answer_steps(body, 4096))
    got, _ = decode(body)
    assert got.value == receipts
    assert got.parts == [orjson.dumps(r) for r in receipts]


def test_a_blocks_last_transaction_may_close_arrays_of_its_own() -> None:
    txs = [
        {"hash": f"0x{i}", "accessList": [{"address": "0xa", "storageKeys": ["0x1"]}]}
        for i in range(3)
    ]
    block = {"hash": "0xb", "transactions": txs, "withdrawals": [{"index": "0x0"}]}
    split, walked = split_and_walked(answer_of(block))
    assert split == walked and split.value == block
    assert split.parts == [orjson.dumps(t) for t in txs]
    nested = {"hash": "0xb", "transactions": [], "extra": {"transactions": [{"a": 1}]}}
    with pytest.raises(ValueError):  # one "transactions" array only, and the block's own
        run(pieces._split_answer_steps(answer_of(nested), 4096))
    assert decode(answer_of(nested))[0].value == nested


def test_odd_whitespace_escapes_and_non_ascii_are_kept_exactly() -> None:
    body = (
        ' \n{ "jsonrpc" :"2.0",\t"id" : 7 ,\r\n "result" :\n [ {"a\\"b":"\\u00e9\\n\\\\",'
        ' "x" : [ 1 , 2.5e3 , -0 ] } ,\n\t{"note":"naïve ☃ 😀","n":null}, [] ,'
        " 123456789012345678901234567890 ] \n} \n"
    ).encode()
    got, _ = decode(body, step=1)
    assert got.value[:3] == orjson.loads(body)["result"][:3]
    assert got.value[3] == 123456789012345678901234567890  # exact (orjson: a float)
    assert got.parts is not None
    assert got.parts[0] == b'{"a\\"b":"\\u00e9\\n\\\\", "x" : [ 1 , 2.5e3 , -0 ] }'
    assert got.parts[1] == '{"note":"naïve ☃ 😀","n":null}'.encode()
    assert got.parts[2] == b"[]"
    assert got.result == body[body.index(b"[ {") : body.rindex(b"]") + 1]


@pytest.mark.parametrize(
    ("result", "parts"),
    [
        ([], []),
        ({"hash": "0x1", "transactions": []}, []),
        ({"hash": "0x1", "transactions": ["0xaa", "0xbb"]}, [b'"0xaa"', b'"0xbb"']),
        ({"hash": "0x1"}, None),
        ("0x1234", None),
        (None, None),
    ],
)
def test_parts_are_of_a_result_array_or_a_blocks_transactions(
    result: Any, parts: list[bytes] | None
) -> None:
    got, _ = decode(answer_of(result))
    assert got.value == result
    assert got.parts == parts


def test_of_a_name_given_twice_the_last_is_taken_as_orjson_takes_it() -> None:
    body = b'{"jsonrpc":"2.0","id":1,"result":[1,2],"result":{"transactions":7}}'
    got, _ = decode(body)
    assert got.value == orjson.loads(body)["result"] == {"transactions": 7}
    assert got.result == b'{"transactions":7}'
    assert got.parts is None  # the first copy's elements are not this value's


@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"result":[1,2',  # cut short
        b'{"jsonrpc":"2.0","id":1,"result":[1,2]}}',  # extra data
        b'{"jsonrpc":"2.0","id":1,"result":[1 2]}',  # no comma
        b'{"jsonrpc":"2.0","id":1,"result":[1,]}',  # trailing comma
        b'{"jsonrpc":"2.0","id":1,"result":{"a" 1}}',  # no colon
        b'{"jsonrpc":"2.0","id":1,"result":{a:1}}',  # a bare name
        b'{"jsonrpc":"2.0","id":1,"result":[NaN]}',  # not JSON, though Python writes it
        b'{"jsonrpc":"2.0","id":1,"result":[-Infinity]}',
        b'{"jsonrpc":"2.0","id":1,"result":["\\ud800"]}',  # a lone surrogate
        b'{"jsonrpc":"2.0","id":1,"result":["\\ud83d\\ude00"]}',  # any surrogate escape
        b'{"jsonrpc":"2.0","id":1,"result":["\xff"]}',  # not UTF-8
        b'{"jsonrpc":"2.0","id":1,"result":["a\nb"]}',  # a raw control character
        b'{"jsonrpc":"2.0","id":1,"result":[' + b"[" * 5_000 + b"]" * 5_000 + b"]}",
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"no"}}',  # not a result
        b'{"jsonrpc":"2.0","id":1}',
        b"[1,2,3]",
        b"",
    ],
    ids=lambda body: body[34:60].decode(errors="replace") or "empty",
)
def test_text_it_does_not_take_is_refused_cleanly(body: bytes) -> None:
    # Nesting is bounded by the interpreter's recursion limit, as for json.loads (the
    # relay's is the default; a test library here may have raised it).
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(ValueError):
            decode(body)
    finally:
        sys.setrecursionlimit(limit)


def big_receipts(count: int) -> list[dict[str, Any]]:
    """Receipts of ``count`` ERC-20 transfers, shaped as the corpus block's."""
    one = next(r for r in RECEIPTS if len(r["logs"]) == 1)
    out = []
    for i in range(count):
        r = json.loads(json.dumps(one))
        r["transactionIndex"] = r["logs"][0]["transactionIndex"] = hex(i)
        r["logs"][0]["logIndex"] = hex(i)
        out.append(r)
    return out


@contextlib.asynccontextmanager
async def loop_turns() -> AsyncIterator[list[int]]:
    """How many turns another task got on the loop while the body ran (``[n]``)."""
    turns = [0]

    async def other() -> None:
        while True:
            turns[0] += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    try:
        yield turns
    finally:
        task.cancel()


async def test_a_large_answer_is_decoded_with_the_loop_let_run_between_slices() -> None:
    body = answer_of(big_receipts(1500))
    assert len(body) > defaults.LARGE_ANSWER_BYTES
    async with loop_turns() as counted:
        got = await slices.parse_large_answer(body, slices.Slicer(budget=0.0))
    (turns,) = counted
    usual = parse_answer(body)
    assert (got.result, got.error, got.value) == (usual.result, usual.error, usual.value)
    assert got.parts is not None and len(got.parts) == 1500
    assert turns > len(body) // defaults.DECODE_STEP_CHARS // 2
    assert got.result is not None
    decoded = await slices.decode_result(got.result, slices.Slicer(budget=0.0))
    assert decoded.value == got.value and decoded.parts == got.parts


async def test_answers_the_piecewise_decoder_leaves_are_read_as_before() -> None:
    pad = b" " * defaults.LARGE_ANSWER_BYTES
    error = b'{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"gone"}}' + pad
    assert await slices.parse_large_answer(error) == parse_answer(error)
    with pytest.raises(ValueError):
        await slices.parse_large_answer(b'{"jsonrpc":"2.0","id":1,"result":[1,' + pad)
    nan = b'{"jsonrpc":"2.0","id":1,"result":[NaN]}' + pad  # the stdlib's fallback reads it
    assert (await slices.parse_large_answer(nan)).parts is None
    small = answer_of([1, 2])
    assert await slices.parse_large_answer(small) == Answer(b"[1,2]", None, [1, 2])
    with pytest.raises(orjson.JSONDecodeError):
        await slices.decode_result(b"[1," + pad)


def test_logs_gathered_in_steps_are_logs_of_receipts_also_when_shuffled() -> None:
    receipts = big_receipts(300) + RECEIPTS
    shuffled = list(receipts)
    random.Random(5).shuffle(shuffled)
    for rs in (receipts, shuffled, []):
        steps = logs_of_receipts_steps(rs, 7)
        assert (
            run(steps)
            == logs_of_receipts(rs)
            == sorted((x for r in rs for x in r["logs"]), key=lambda x: int(x["logIndex"], 16))
        )


def test_logs_made_ready_in_steps_are_held_as_logs_held_at_once() -> None:
    logs = logs_of_receipts(RECEIPTS)
    block_hash = RECEIPTS[0]["blockHash"]
    ready = run(held_logs_steps(logs, block_hash, 3))
    assert ready == run(held_logs_steps(logs, block_hash, 0))
    assert ready is not None and [raw for _, _, raw in ready[0]] == [orjson.dumps(x) for x in logs]
    assert run(held_logs_steps(logs, "0x" + "0" * 64, 3)) is None  # another block's


def test_corpus_files_are_there() -> None:
    assert isinstance(MAINNET, Path) and len(RECEIPTS) > 50 and len(BLOCK["transactions"]) > 50


async def test_a_decoded_block_held_nowhere_else_is_freed_with_the_loop_let_run() -> None:
    receipts = orjson.loads(orjson.dumps(big_receipts(1500)))
    logs = [log for r in receipts for log in r["logs"]]
    lists = [receipts, logs]
    del receipts, logs  # the lists' only holder is now ``lists``
    kept = lists[0][:3]  # three receipts someone still holds: freed by whoever drops them
    async with loop_turns() as counted:
        await slices.let_go(lists, slices.Slicer(budget=0.0))
    (turns,) = counted
    assert lists == []
    assert turns >= 2 * 1500 // defaults.LET_GO_STEP - 2  # a turn of the loop every step
    # Held by ``kept`` alone now (and getrefcount's argument), whole.
    refs = sys.getrefcount(kept[0])
    assert refs == 2 and kept[0]["logs"][0]["topics"]


async def test_a_decoded_list_held_elsewhere_is_left_as_it_is() -> None:
    receipts = orjson.loads(orjson.dumps(big_receipts(200)))
    held = {"receipts": receipts}  # a listener that kept them
    lists = [receipts]
    del receipts
    await slices.let_go(lists, slices.Slicer(budget=0.0))
    assert lists == [] and len(held["receipts"]) == 200
