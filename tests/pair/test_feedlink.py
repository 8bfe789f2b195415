"""FeedLink, the child side of one feed session, against small parents in the test process.

Pair tier: each parent here is a websockets server on 127.0.0.1 scripted to answer a hello
one way (a welcome with a gap, an error, garbage), since a real node does not misbehave on
demand. The full session with real frames is exercised through the subscriber in
test_subscriber.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve, unix_serve

from chainrelay.devnet import free_port
from chainrelay.tree.link import CLOSE_CHILD_RESET, FeedLink
from chainrelay.tree.session import (
    CLOSE_UNKNOWN_STREAM,
    Gap,
    Hello,
    Want,
    encode_error,
    encode_head,
    encode_welcome,
    parse_hello,
)
from tests.lab.procs import until
from tests.lab.timing import SECOND

STREAM = "devnet/blocks"
Script = Callable[[ServerConnection, Hello], Awaitable[None]]


class Recorder:
    """What a link handed its caller."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.gaps: list[tuple[str, Gap]] = []
        self.position = 7

    def wants(self) -> list[Want]:
        return [Want(STREAM, from_position=self.position)]

    def on_frame(self, _link: FeedLink, raw: bytes) -> None:
        self.frames.append(raw)

    def on_gap(self, _link: FeedLink, stream: str, gap: Gap) -> None:
        self.gaps.append((stream, gap))


def make_link(url: str, rec: Recorder, **kw: Any) -> FeedLink:
    args: dict[str, Any] = {
        "max_frame_bytes": 1 << 20,
        "connect_timeout": 2 * SECOND,
        "retry_delay": 0.01,
        "retry_max": 0.05,
        "ping_interval": 1 * SECOND,
    }
    args.update(kw)
    return FeedLink(
        url, name="p", wants=rec.wants, on_frame=rec.on_frame, on_gap=rec.on_gap, **args
    )


class ScriptedParent:
    """Records each hello and each close code the child sent; runs ``script`` per session."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.hellos: list[Hello] = []
        self.child_closes: list[int | None] = []

    async def handler(self, conn: ServerConnection) -> None:
        hello = parse_hello(await conn.recv())
        self.hellos.append(hello)
        try:
            await self.script(conn, hello)
            await conn.wait_closed()
        finally:
            self.child_closes.append(
                conn.protocol.close_rcvd.code if conn.protocol.close_rcvd else None
            )


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], Awaitable[tuple[ScriptedParent, str]]]]:
    servers: list[Any] = []

    async def start(script: Script, unix_path: Path | None = None) -> tuple[ScriptedParent, str]:
        """A parent on 127.0.0.1, or on the Unix socket ``unix_path``; its feed URL."""
        parent = ScriptedParent(script)
        if unix_path is not None:
            server = await unix_serve(parent.handler, str(unix_path), compression=None)
            servers.append(server)
            return parent, "ws://localhost/feed"
        server = await serve(parent.handler, "127.0.0.1", 0, compression=None)
        servers.append(server)
        port = next(iter(server.sockets)).getsockname()[1]
        return parent, f"ws://127.0.0.1:{port}/feed"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_welcome_gap_and_frames_reach_the_caller_untouched(scripted: Any) -> None:
    async def script(conn: ServerConnection, hello: Hello) -> None:
        entry = {"stream": STREAM, "oldest": 12, "newest": 13, "gap": [7, 12]}
        await conn.send(encode_welcome([entry]).decode())
        await conn.send(b"frame twelve")
        await conn.send(b"frame thirteen")

    parent, url = await scripted(script)
    rec = Recorder()
    link = make_link(url, rec)
    await link.start()
    try:
        assert await link.wait_connected(5 * SECOND)
        await until(lambda: len(rec.frames) == 2, 5 * SECOND, "both frames")
        await until(lambda: link.rtt is not None, 5 * SECOND, "a round-trip time")
        assert rec.frames == [b"frame twelve", b"frame thirteen"]
        assert rec.gaps == [(STREAM, Gap(7, 12))]
        assert parent.hellos[0].wants == [Want(STREAM, from_position=7)]
        assert link.connected and link.failures == 0 and link.sessions == 1
        assert link.rtt is not None and 0 < link.rtt < 1 * SECOND
    finally:
        await link.stop()
    assert not link.connected
    await until(lambda: parent.child_closes != [], 5 * SECOND, "the session to end")


async def test_each_reconnect_sends_a_fresh_hello(scripted: Any) -> None:
    async def script(conn: ServerConnection, hello: Hello) -> None:
        await conn.send(encode_welcome([{"stream": STREAM}]).decode())
        await conn.close(1011)  # the parent drops every session at once

    parent, url = await scripted(script)
    rec = Recorder()
    link = make_link(url, rec)
    await link.start()
    try:
        await until(lambda: len(parent.hellos) >= 1, 5 * SECOND, "the first hello")
        rec.position = 42
        await until(lambda: len(parent.hellos) >= 3, 5 * SECOND, "two reconnects")
        assert parent.hellos[-1].wants == [Want(STREAM, from_position=42)]
        assert link.failures == 0  # each session got its welcome: no back-off growth
    finally:
        await link.stop()


async def test_refused_hello_is_a_failed_connect_and_backs_off(scripted: Any) -> None:
    async def script(conn: ServerConnection, hello: Hello) -> None:
        await conn.send(encode_error("unknown stream devnet/blocks").decode())
        await conn.close(CLOSE_UNKNOWN_STREAM)

    _parent, url = await scripted(script)
    rec = Recorder()
    link = make_link(url, rec)
    await link.start()
    try:
        await until(lambda: link.failures >= 3, 5 * SECOND, "three failed connects")
        assert not link.connected and not await link.wait_connected(0.05)
        assert link.last_error is not None and "refused the hello" in link.last_error
        assert link._backoff() == 0.05  # doubled from 0.01 up to retry_max
        assert not rec.frames and not rec.gaps
    finally:
        await link.stop()


async def test_bad_text_message_closes_the_session_and_reconnects(scripted: Any) -> None:
    async def script(conn: ServerConnection, hello: Hello) -> None:
        await conn.send(encode_welcome([{"stream": STREAM}]).decode())
        await conn.send(b"before")
        await conn.send("{not json")
        await conn.send(b"after the garbage: never read")

    parent, url = await scripted(script)
    rec = Recorder()
    link = make_link(url, rec)
    await link.start()
    try:
        await until(lambda: len(parent.child_closes) >= 2, 5 * SECOND, "two sessions closed")
        assert parent.child_closes[:2] == [CLOSE_CHILD_RESET, CLOSE_CHILD_RESET]
        assert b"after the garbage: never read" not in rec.frames
        assert rec.frames[0] == b"before"
    finally:
        await link.stop()


async def test_frame_before_the_welcome_is_a_protocol_error(scripted: Any) -> None:
    async def script(conn: ServerConnection, hello: Hello) -> None:
        await conn.send(b"a frame too early")

    parent, url = await scripted(script)
    rec = Recorder()
    link = make_link(url, rec)
    await link.start()
    try:
        await until(lambda: link.failures >= 2, 5 * SECOND, "two failed connects")
        assert not rec.frames
        assert parent.child_closes[0] == CLOSE_CHILD_RESET
    finally:
        await link.stop()


async def test_no_parent_listening_counts_failures(scripted: Any) -> None:
    rec = Recorder()
    link = make_link(f"ws://127.0.0.1:{free_port()}/feed", rec)
    await link.start()
    try:
        await until(lambda: link.failures >= 3, 5 * SECOND, "three failed connects")
        assert not link.connected and link.sessions == 0
        assert link.last_error is not None
    finally:
        await link.stop()


async def test_a_callback_that_raises_does_not_end_the_link(scripted: Any) -> None:
    sessions = 0

    async def script(conn: ServerConnection, hello: Hello) -> None:
        nonlocal sessions
        sessions += 1
        await conn.send(encode_welcome([{"stream": STREAM}]).decode())
        if sessions == 1:  # the next session stays quiet and open
            await conn.send(b"boom")

    _parent, url = await scripted(script)
    calls: list[bytes] = []

    def on_frame(_link: FeedLink, raw: bytes) -> None:
        calls.append(raw)
        raise RuntimeError("a bug in the caller")

    link = FeedLink(
        url,
        name="p",
        wants=lambda: [Want(STREAM)],
        on_frame=on_frame,
        max_frame_bytes=1 << 20,
        connect_timeout=2 * SECOND,
        retry_delay=0.01,
        retry_max=0.05,
        ping_interval=1 * SECOND,
    )
    await link.start()
    try:
        await until(
            lambda: link.connected and link.sessions == 2,
            5 * SECOND,
            "a second session after the bug",
        )
        assert calls == [b"boom"]
        # The session that met the bug had reached its welcome: no failed connect counted.
        assert link.failures == 0
        assert link.last_error is not None and "a bug in the caller" in link.last_error
    finally:
        await link.stop()


async def test_oversized_message_ends_the_session(scripted: Any) -> None:
    async def script(conn: ServerConnection, hello: Hello) -> None:
        await conn.send(encode_welcome([{"stream": STREAM}]).decode())
        await conn.send(b"x" * 2048)

    parent, url = await scripted(script)
    rec = Recorder()
    link = make_link(url, rec, max_frame_bytes=1024)
    await link.start()
    try:
        await until(lambda: len(parent.hellos) >= 2, 5 * SECOND, "a reconnect")
        assert not rec.frames
        assert parent.child_closes[0] == 1009  # message too big
    finally:
        await link.stop()


async def test_stop_is_prompt_while_backing_off(scripted: Any) -> None:
    rec = Recorder()
    link = make_link(f"ws://127.0.0.1:{free_port()}/feed", rec, retry_delay=30.0, retry_max=30.0)
    await link.start()
    await until(lambda: link.failures >= 1, 5 * SECOND, "a failed connect")
    async with asyncio.timeout(1 * SECOND):
        await link.stop()


async def test_a_parent_on_a_unix_socket(scripted: Any, tmp_path: Path) -> None:
    """As a node's feeder worker serves the others, on a socket in a private directory."""

    async def script(conn: ServerConnection, hello: Hello) -> None:
        await conn.send(encode_welcome([{"stream": STREAM}]).decode())
        await conn.send(b"a frame")

    path = tmp_path / "feed.sock"
    parent, url = await scripted(script, path)
    rec = Recorder()
    link = make_link(url, rec, unix_path=str(path))
    await link.start()
    try:
        await until(lambda: rec.frames == [b"a frame"], 5 * SECOND, "the frame")
        assert parent.hellos[0].wants == [Want(STREAM, from_position=7)]
        assert link.connected and link.sessions == 1
    finally:
        await link.stop()


async def test_a_stop_that_lands_as_the_session_ends_ends_the_link(
    scripted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's end waits for its pinger to finish; a stop arriving then is the link's
    to obey, not the pinger's cancellation to swallow (the link would reconnect, and the
    stop wait for ever)."""
    winding_down = asyncio.Event()

    async def pinger_slow_to_end(self: FeedLink, conn: ClientConnection) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            winding_down.set()
            # A teardown that takes a while: the session's end is waiting for it.
            await asyncio.shield(asyncio.sleep(0.2 * SECOND))
            raise

    monkeypatch.setattr(FeedLink, "_ping", pinger_slow_to_end)

    async def script(conn: ServerConnection, hello: Hello) -> None:
        await conn.send(encode_welcome([{"stream": STREAM}]).decode())
        await conn.close(1001)  # the parent goes away

    parent, url = await scripted(script)
    link = make_link(url, Recorder())
    await link.start()
    task = link._task
    await until(winding_down.is_set, 5 * SECOND, "the session to end")
    stopping = asyncio.create_task(link.stop())
    try:
        await until(stopping.done, 2 * SECOND, "the stop to end the link")
    finally:
        if task is not None and not task.done():
            task.cancel()  # it went on reconnecting: cancelled again while it backs off
            await until(stopping.done, 2 * SECOND, "the link to end")
    assert len(parent.hellos) == 1  # never reconnected


def test_a_parent_away_for_thousands_of_connects_is_still_retried() -> None:
    rec = Recorder()
    link = make_link(f"ws://127.0.0.1:{free_port()}/feed", rec, retry_delay=0.25, retry_max=5.0)
    link.failures = 5000  # hours of a parent's absence, at retry_max apart
    assert link._backoff() == 5.0


async def test_a_feeders_early_head_reaches_the_caller(scripted: Any) -> None:
    header = {"number": "0x8", "hash": "0x" + "08" * 32, "parentHash": "0x" + "07" * 32}

    async def script(conn: ServerConnection, hello: Hello) -> None:
        await conn.send(encode_welcome([{"stream": STREAM}]).decode())
        await conn.send(encode_head(header).decode())
        await conn.send(b"frame eight")

    _parent, url = await scripted(script)
    rec = Recorder()
    heads: list[dict[str, Any]] = []
    link = make_link(url, rec, on_head=lambda _link, h: heads.append(h))
    await link.start()
    try:
        await until(lambda: rec.frames == [b"frame eight"], 5 * SECOND, "the frame")
        assert heads == [header]
        assert link.sessions == 1
    finally:
        await link.stop()
