"""Test clients of a node's two push interfaces: ``Subscriber``, a raw WebSocket client of
eth_subscribe that keeps each notification's bytes, and ``FeedReader``, which drains a
block-feed ``Subscription`` (the subscriber library) in a task so a test can wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from chainrelay.clients.subscriber import FeedBlock, Subscription
from tests.lab.chain import TRANSFER_TOPIC
from tests.lab.procs import until
from tests.lab.timing import SECOND

NEW_HEADS = ["newHeads"]
TRANSFER_LOGS = ["logs", {"topics": [TRANSFER_TOPIC]}]
# A node answers a call on an open WebSocket in milliseconds; this much means it never will.
CALL_TIMEOUT = 10 * SECOND
# Blocks through an in-process parent arrive in milliseconds; a system test passes its own.
FEED_WAIT_TIMEOUT = 5 * SECOND


class Subscriber:
    """One raw WebSocket client; notifications are kept as the bytes that arrived."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.ids = 0
        self.answers: dict[int, dict[str, Any]] = {}
        self.notes: dict[str, list[bytes]] = {}  # subscription id -> notifications
        self._answered = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, **kw: Any) -> AsyncIterator[Subscriber]:
        async with websockets.connect(url, max_size=None, compression=None, **kw) as conn:
            sub = cls(conn)
            try:
                yield sub
            finally:
                sub._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sub._reader

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in self.conn:
                raw = message if isinstance(message, bytes) else message.encode()
                doc = orjson.loads(raw)
                if doc.get("method") == "eth_subscription":
                    self.notes.setdefault(doc["params"]["subscription"], []).append(raw)
                    continue
                async with self._answered:
                    self.answers[doc["id"]] = doc
                    self._answered.notify_all()

    async def call(self, method: str, params: list[Any]) -> dict[str, Any]:
        self.ids += 1
        rid = self.ids
        body = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        await self.conn.send(orjson.dumps(body).decode())
        async with asyncio.timeout(CALL_TIMEOUT), self._answered:
            await self._answered.wait_for(lambda: rid in self.answers)
        return self.answers.pop(rid)

    async def subscribe(self, params: list[Any]) -> str:
        answer = await self.call("eth_subscribe", params)
        assert "result" in answer, answer
        self.notes.setdefault(answer["result"], [])
        return str(answer["result"])

    def results(self, sub_id: str) -> list[Any]:
        return [orjson.loads(n)["params"]["result"] for n in self.notes[sub_id]]

    def stripped(self, sub_id: str) -> list[bytes]:
        """The notifications with the subscription id cut out, for byte comparisons."""
        return [n.replace(sub_id.encode(), b"") for n in self.notes[sub_id]]


class FeedReader:
    """Reads a subscription in a task, keeping every block; ``close()`` before the test ends
    (it closes the subscription and reaps the task)."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.got: list[FeedBlock] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for block in self.sub:
            self.got.append(block)

    async def wait(
        self, n: int, what: str = "", timeout: float = FEED_WAIT_TIMEOUT
    ) -> list[FeedBlock]:
        """Until ``n`` blocks came; raises at once what ended the subscription early."""
        await until(lambda: len(self.got) >= n or self.task.done(), timeout, what or f"{n}")
        if self.task.done():
            self.task.result()  # raises what ended it
        return self.got

    @property
    def numbers(self) -> list[int]:
        return [b.number for b in self.got]

    async def close(self) -> None:
        await self.sub.aclose()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
