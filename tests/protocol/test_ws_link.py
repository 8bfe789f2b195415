"""The WebSocket upstream link against websockets' own server protocol object, bytes in and
bytes out through a recording transport: whole messages however the frames are cut into
reads, fragmented messages, pings, a server's close. No sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from chainrelay.upstreams.upstream import TransportError
from chainrelay.upstreams.wslink import WsLink, WsUpstream
from tests.lab.procs import until
from tests.lab.timing import SECOND
from tests.protocol.test_http_fast_path import RecordingTransport


class Pair:
    """A link and the node's side of it, joined by hand."""

    def __init__(
        self,
        up: WsUpstream | None = None,
        on_message: Callable[[bytes], None] | None = None,
        on_lost: Callable[[WsLink], None] | None = None,
    ) -> None:
        self.messages: list[bytes] = []
        self.lost: list[WsLink] = []
        if on_message is None:
            on_message = up._message if up is not None else self.messages.append
        if on_lost is None:
            on_lost = up._lost if up is not None else self.lost.append
        self.link = WsLink(parse_uri("ws://node.example/"), on_message, on_lost)
        self.transport = RecordingTransport()
        self.server = ServerProtocol(max_size=None)
        self.link.connection_made(self.transport)
        request = self.server_reads()
        assert request, "the link sent its handshake"
        self.server.send_response(self.server.accept(request[0]))  # type: ignore[arg-type]
        self.to_link(self.server_bytes())
        assert self.link.opened.done() and self.link.opened.exception() is None

    def server_reads(self) -> list[object]:
        self.server.receive_data(bytes(self.transport.out))
        self.transport.out.clear()
        return list(self.server.events_received())

    def server_bytes(self) -> bytes:
        return b"".join(self.server.data_to_send())

    def to_link(self, data: bytes) -> None:
        self.link.data_received(data)


async def test_messages_arrive_whole_however_the_reads_cut_them() -> None:
    pair = Pair()
    payloads = [b'{"jsonrpc":"2.0","id":1,"result":"0x1"}', b"x" * 70000, b"", b"y" * 300]
    for p in payloads:
        pair.server.send_text(p)
    wire = pair.server_bytes()
    for cut in (1, 2, 7, 130, 1000, 65536):
        pair.messages.clear()
        for i in range(0, len(wire), cut):
            pair.to_link(wire[i : i + cut])
        assert pair.messages == payloads, f"reads of {cut} bytes"


async def test_fragmented_message_is_joined_and_pings_are_answered() -> None:
    pair = Pair()
    pair.server.send_text(b"ab", fin=False)
    pair.server.send_ping(b"are you there")
    pair.server.send_continuation(b"cd", fin=False)
    pair.server.send_continuation(b"ef", fin=True)
    pair.server.send_binary(b"gh")
    pair.to_link(pair.server_bytes())
    assert pair.messages == [b"abcdef", b"gh"]
    frames = [e for e in pair.server_reads() if isinstance(e, Frame)]
    assert [(f.opcode, f.data) for f in frames] == [(Opcode.PONG, b"are you there")]


async def test_sent_messages_are_masked_text_frames_the_node_reads() -> None:
    pair = Pair()
    bodies = [b'{"id":%d}' % i for i in range(3)] + [b"z" * 70000]
    for b in bodies:
        pair.link.send(b)
    frames = [e for e in pair.server_reads() if isinstance(e, Frame)]
    assert [(f.opcode, f.fin, f.data) for f in frames] == [(Opcode.TEXT, True, b) for b in bodies]
    assert pair.server.state is State.OPEN


async def test_a_frame_over_the_limit_drops_the_link() -> None:
    pair = Pair()
    pair.link.max_message = 1000
    pair.server.send_text(b"x" * 1001)
    aborted: list[bool] = []
    pair.transport.abort = lambda: aborted.append(True)  # type: ignore[method-assign]
    pair.to_link(pair.server_bytes())
    assert aborted and pair.messages == []


async def test_a_close_from_the_node_fails_calls_under_way() -> None:
    up = WsUpstream("node", "ws://node.example/", timeout=5, connections=1, lanes=1)
    pair = Pair(up)
    up._link = pair.link
    call = asyncio.ensure_future(up.call("eth_chainId", []))
    await until(lambda: bool(up._pending), SECOND, "the call to be sent")
    assert [e for e in pair.server_reads() if isinstance(e, Frame)]
    pair.server.send_close(1001, "going away")
    pair.to_link(pair.server_bytes())
    assert pair.transport.closed, "the link closes once the close handshake is done"
    pair.link.connection_lost(None)
    with pytest.raises(TransportError):
        await call
    assert up._link is None and not up._pending


async def test_a_head_read_with_the_subscribe_answer_is_not_lost() -> None:
    up = WsUpstream("node", "ws://node.example/", timeout=5, connections=1, lanes=1)
    pair = Pair(up)
    up._link = pair.link
    heads: list[dict[str, object]] = []
    stream = asyncio.ensure_future(up.subscribe_heads(heads.append))
    await until(lambda: bool(up._pending), SECOND, "eth_subscribe to be sent")
    (request,) = [e for e in pair.server_reads() if isinstance(e, Frame)]
    rid = orjson.loads(request.data)["id"]
    # The node answers and, at once, sends the first header: one read holds both.
    pair.server.send_text(b'{"jsonrpc":"2.0","id":%d,"result":"0xab"}' % rid)
    header = {"number": "0x5", "hash": "0x" + "55" * 32, "parentHash": "0x" + "44" * 32}
    params = {"subscription": "0xab", "result": header}
    pair.server.send_text(
        orjson.dumps({"jsonrpc": "2.0", "method": "eth_subscription", "params": params})
    )
    pair.to_link(pair.server_bytes())
    assert heads == [header]
    assert up.calls == 1
    pair.link.connection_lost(None)
    with pytest.raises(TransportError):
        await stream
    assert not up._subs and not up._sub_calls


async def test_a_head_stream_given_up_is_unsubscribed_one_lost_is_not() -> None:
    up = WsUpstream("node", "ws://node.example/", timeout=5, connections=1, lanes=1)
    pair = Pair(up)
    up._link = pair.link

    async def subscribed(sub: str) -> asyncio.Future[None]:
        stream = asyncio.ensure_future(up.subscribe_heads(lambda _h: None))
        await until(lambda: bool(up._sub_calls), SECOND, "eth_subscribe to be sent")
        (request,) = [e for e in pair.server_reads() if isinstance(e, Frame)]
        rid = orjson.loads(request.data)["id"]
        pair.server.send_text(b'{"jsonrpc":"2.0","id":%d,"result":"%s"}' % (rid, sub.encode()))
        pair.to_link(pair.server_bytes())
        await until(lambda: sub in up._subs, SECOND, "the subscription registered")
        return stream

    async def unsubscribed(sub: str) -> None:
        await until(lambda: bool(up._pending), SECOND, "eth_unsubscribe to be sent")
        (request,) = [e for e in pair.server_reads() if isinstance(e, Frame)]
        call = orjson.loads(request.data)
        assert (call["method"], call["params"]) == ("eth_unsubscribe", [sub])
        pair.server.send_text(b'{"jsonrpc":"2.0","id":%d,"result":true}' % call["id"])
        pair.to_link(pair.server_bytes())
        await until(lambda: not up._unsubscribing, SECOND, "the unsubscribe answered")
        assert sub not in up._subs

    # Given up (a fallback's full cadence ends) as its answer is read, and once it streams:
    # either way the node is told to stop pushing heads.
    for sub, streaming in (("0xab", False), ("0xac", True)):
        stream = await subscribed(sub)
        if streaming:
            await until(lambda: len(up.samples) == 2, SECOND, "the stream to be under way")
        stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream
        await unsubscribed(sub)
    # Lost with its link: nothing to tell the node.
    stream = await subscribed("0xcd")
    pair.link.connection_lost(None)
    with pytest.raises(TransportError):
        await stream
    assert not up._unsubscribing and not up._subs
