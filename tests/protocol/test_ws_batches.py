"""Upstream batches over a WebSocket upstream: one message out, one array back, paired by
any of its ids; a refusal (an error object with a null id) answered promptly. No sockets:
the node's side is websockets' own server protocol object (see test_ws_link)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.frames import Frame

from chainrelay.upstreams.upstream import BatchUnsupported
from chainrelay.upstreams.wslink import WsUpstream
from tests.lab.procs import until
from tests.lab.timing import SECOND
from tests.protocol.test_ws_link import Pair

CALLS: list[tuple[str, Any]] = [
    ("eth_getBalance", ["0x" + "aa" * 20, "latest"]),
    ("eth_blockNumber", None),
    ("eth_call", [{"to": "0x" + "bb" * 20}, "latest"]),
]


def linked() -> tuple[WsUpstream, Pair]:
    up = WsUpstream("node", "ws://node.example/", timeout=5, connections=1, lanes=1)
    pair = Pair(up)
    up._link = pair.link
    return up, pair


async def sent(up: WsUpstream, pair: Pair, n: int) -> list[Any]:
    await until(lambda: len(up._pending) >= n, SECOND, "the batch to be sent")
    frames = [e for e in pair.server_reads() if isinstance(e, Frame)]
    return [orjson.loads(f.data) for f in frames]


async def test_a_batch_is_one_message_and_its_answers_come_back_in_call_order() -> None:
    up, pair = linked()
    batch = asyncio.ensure_future(up.call_batch(CALLS))
    (request,) = await sent(up, pair, 3)
    assert [d["method"] for d in request] == [m for m, _ in CALLS]
    assert "params" not in request[1]
    ids = [d["id"] for d in request]
    answers = [
        b'{"jsonrpc":"2.0","id":%d,"error":{"code":3,"message":"execution reverted"}}' % ids[2],
        b'{"jsonrpc":"2.0","id":%d,"result":"0x10"}' % ids[1],
        b'{"jsonrpc":"2.0","id":%d,"result":"0x2a"}' % ids[0],
    ]
    pair.server.send_text(b"[" + b",".join(answers) + b"]")
    pair.to_link(pair.server_bytes())
    got = await batch
    assert [a.result for a in got] == [b'"0x2a"', b'"0x10"', None]
    assert got[2].error == b'{"code":3,"message":"execution reverted"}'
    assert not up._pending and not up._batches and up.calls == 1


async def test_a_single_call_sent_beside_a_batch_gets_its_own_answer() -> None:
    up, pair = linked()
    batch = asyncio.ensure_future(up.call_batch(CALLS[:2]))
    single = asyncio.ensure_future(up.call("eth_chainId", []))
    docs = await sent(up, pair, 3)
    (request,) = [d for d in docs if isinstance(d, list)]
    (alone,) = [d for d in docs if isinstance(d, dict)]
    pair.server.send_text(b'{"jsonrpc":"2.0","id":%d,"result":"0x38"}' % alone["id"])
    pair.server.send_text(
        orjson.dumps([{"jsonrpc": "2.0", "id": d["id"], "result": "0x1"} for d in request])
    )
    pair.to_link(pair.server_bytes())
    assert (await single).result == b'"0x38"'
    assert [a.result for a in await batch] == [b'"0x1"', b'"0x1"']


async def test_a_refused_batch_is_said_at_once_not_at_the_timeout() -> None:
    up, pair = linked()
    batch = asyncio.ensure_future(up.call_batch(CALLS))
    await sent(up, pair, 3)
    pair.server.send_text(
        b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"batch not supported"}}'
    )
    pair.to_link(pair.server_bytes())
    with pytest.raises(BatchUnsupported):
        await asyncio.wait_for(batch, SECOND)
    assert up.consecutive_errors == 0 and not up._pending and not up._batches


async def test_a_batch_given_up_leaves_nothing_waiting() -> None:
    up, pair = linked()
    batch = asyncio.ensure_future(up.call_batch(CALLS))
    await sent(up, pair, 3)
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    assert not up._pending and not up._batches
    up.prune()
    assert not up._deadlines
