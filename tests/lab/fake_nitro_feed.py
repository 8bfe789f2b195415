"""A fake Nitro sequencer feed: Nitro's feed server protocol (wsbroadcastserver), for the
entry node to follow in tests. A fake because a real sequencer cannot be run here and
cannot be made to misbehave; it speaks the protocol as Nitro does:

- the upgrade takes ``Arbitrum-Feed-Client-Version`` (below 2: 400) and
  ``Arbitrum-Requested-Sequence-Number``, and answers ``Arbitrum-Feed-Server-Version: 2``
  and ``Arbitrum-Chain-Id``; compression when the client offers it, Nitro's own
  ``Arbitrum-permessage-deflate`` answered as Nitro's relay answers it (``agreed``: what
  each connection agreed);
- on connect, the backlog from the requested number (or all of it), in broadcasts of up to
  ``backlog_group`` messages, then every live broadcast, with no gap and no duplicate;
- ``confirm(n)`` sends ``confirmedSequenceNumberMessage`` and trims the backlog below it.

And, for the faults: ``send_raw`` sends any text to every client (malformed JSON, a
message signed by someone else, numbers going backwards, a huge message); ``drop`` closes
every client connection; ``stop`` closes the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from chainrelay.nitro.codec import encode_broadcast
from chainrelay.nitro.deflate import NITRO_ANSWER, NITRO_EXTENSION, SharedDeflate, server_extensions
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
        self.agreed: list[list[str]] = []  # each client's compression extensions
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
            compression=None,
            extensions=server_extensions(SharedDeflate(16 << 20)),
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
        if response.headers.get("Sec-WebSocket-Extensions", "").startswith(NITRO_EXTENSION):
            del response.headers["Sec-WebSocket-Extensions"]
            response.headers["Sec-WebSocket-Extensions"] = NITRO_ANSWER
        return response

    async def _handle(self, conn: ServerConnection) -> None:
        requested = self._requested.pop(conn, None)
        self.connects.append(requested)
        self.agreed.append([e.name for e in conn.protocol.extensions])
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


# --- as a process of its own (in a lab region) -------------------------------------------------
def script_messages(count: int, first: int, seed: int, key: bytes) -> list[Made]:
    """The messages a ``python -m tests.lab.fake_nitro_feed`` process publishes: the test
    that started it makes the same ones to compare what its clients get."""
    from chainrelay.tree.frame import Signer
    from tests.lab.nitro_messages import realistic

    return realistic(count, first_seq=first, seed=seed, signer=Signer(key))


async def _serve_script(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    made = script_messages(args.count, args.first, args.seed, bytes.fromhex(args.key))
    feed = FakeNitroFeed(args.chain_id, host=host, port=int(port))
    await feed.start()
    feed.publish(made[: args.backlog])
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, go.set)
    print(f"ready {feed.port}", flush=True)
    if args.wait_signal:
        await go.wait()  # the test's cue: its clients are connected, the stream goes live
    start = loop.time()
    for i in range(args.backlog, args.count):
        # Pacing, as a sequencer sends: the next message is due at start + i / rate.
        await asyncio.sleep(max(0.0, start + (i - args.backlog) / args.rate - loop.time()))
        feed.publish([made[i]])
    await asyncio.Event().wait()  # serve the backlog until stopped


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.lab.fake_nitro_feed --listen 0.0.0.0:9700 --count 200 ...``:
    publishes ``--backlog`` messages at once, the rest at ``--rate`` a second (from its
    SIGUSR1 with ``--wait-signal``), then keeps serving; prints ``ready <port>``; stops on
    SIGTERM."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--chain-id", type=int, default=42161)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--first", type=int, default=150_000_000)
    ap.add_argument("--backlog", type=int, default=10)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--key", required=True, help="the sequencer's key, hex")
    ap.add_argument("--wait-signal", action="store_true", help="go live on SIGUSR1")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_script(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
