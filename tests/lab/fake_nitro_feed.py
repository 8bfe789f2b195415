"""A fake Nitro sequencer feed: Nitro's feed server protocol (wsbroadcastserver), for the
entry node to follow in tests. A fake because a real sequencer cannot be run here and
cannot be made to misbehave; it speaks the protocol as Nitro does:

- the upgrade takes ``Arbitrum-Feed-Client-Version`` (below 2: 400) and
  ``Arbitrum-Requested-Sequence-Number``, and answers ``Arbitrum-Feed-Server-Version: 2``
  and ``Arbitrum-Chain-Id``; permessage-deflate when the client offers it;
- on connect, the backlog from the requested number (or all of it), in broadcasts of up to
  ``backlog_group`` messages, then every live broadcast, with no gap and no duplicate;
- ``confirm(n)`` sends ``confirmedSequenceNumberMessage`` and trims the backlog below it.

And, for the faults: ``send_raw`` sends any text to every client (malformed JSON, a
message signed by someone else, numbers going backwards, a huge message); ``drop`` closes
every client connection; ``stop`` closes the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from chainrelay.nitro.codec import encode_broadcast
from tests.lab.nitro_messages import Made


class FakeNitroFeed:
    def __init__(
        self,
        chain_id: int = 42161,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        backlog_group: int = 20,
    ) -> None:
        self.chain_id = chain_id
        self.host = host
        self.port = port
        self.backlog_group = backlog_group
        self.backlog: list[Made] = []
        self.sent: dict[int, bytes] = {}  # every feed message ever published, by number
        self.clients: set[ServerConnection] = set()
        self.connects: list[int | None] = []  # each client's requested number
        self._server: Server | None = None
        self._queues: dict[ServerConnection, asyncio.Queue[bytes | None]] = {}
        self._requested: dict[ServerConnection, int | None] = {}

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._admit,
            process_response=self._headers,
            compression="deflate",
            server_header=None,
            max_size=4096,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            for q in self._queues.values():
                q.put_nowait(None)  # each handler returns: wait_closed waits for them
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeNitroFeed:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- the sequencer ------------------------------------------------------------------------
    def publish(self, messages: list[Made]) -> None:
        """Live messages, in one broadcast (as a sequencer sends one block's message)."""
        self.backlog.extend(messages)
        for m in messages:
            self.sent[m.seq] = m.raw
        self._to_all(encode_broadcast([m.raw for m in messages]))

    def confirm(self, seq: int) -> None:
        self.backlog = [m for m in self.backlog if m.seq > seq]
        self._to_all(encode_broadcast([], seq))

    def send_raw(self, text: bytes) -> None:
        self._to_all(text)

    def drop(self) -> None:
        for c in list(self.clients):
            c.transport.abort()

    def _to_all(self, text: bytes) -> None:
        for q in self._queues.values():
            q.put_nowait(text)

    # --- the protocol -------------------------------------------------------------------------
    def _admit(self, conn: ServerConnection, request: Request) -> Response | None:
        version = request.headers.get("Arbitrum-Feed-Client-Version")
        if version is not None and int(version) < 2:
            return conn.respond(HTTPStatus.BAD_REQUEST, "Feed Client version too old\n")
        req = request.headers.get("Arbitrum-Requested-Sequence-Number")
        self._requested[conn] = int(req) if req is not None else None
        return None

    def _headers(self, conn: ServerConnection, request: Request, response: Response) -> Response:
        response.headers["Arbitrum-Feed-Server-Version"] = "2"
        response.headers["Arbitrum-Chain-Id"] = str(self.chain_id)
        return response

    async def _handle(self, conn: ServerConnection) -> None:
        requested = self._requested.pop(conn, None)
        self.connects.append(requested)
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        # The backlog and the queue are taken in one step: nothing published between them.
        backlog = [m for m in self.backlog if requested is None or m.seq >= requested]
        self._queues[conn] = q
        self.clients.add(conn)
        try:
            for i in range(0, len(backlog), self.backlog_group):
                group = backlog[i : i + self.backlog_group]
                await conn.send(encode_broadcast([m.raw for m in group]), text=True)
            while True:
                text = await q.get()
                if text is None:
                    return
                await conn.send(text, text=True)
        except ConnectionClosed:
            pass
        finally:
            self.clients.discard(conn)
            self._queues.pop(conn, None)
            with contextlib.suppress(Exception):
                conn.transport.abort()
