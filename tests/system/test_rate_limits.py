"""Rate limits per identity and per sender through real relays over a real anvil, and one
budget shared through a real redis-server by two workers and another node.

Every client here is 127.0.0.1: one identity, in tier "default".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets
from eth_account import Account

from chainrelay.devnet import DEV_ACCOUNTS, DEV_KEYS
from tests.lab.procs import AnvilFactory, Procs, RelayFactory, until
from tests.lab.redis_server import start_redis
from tests.lab.timing import SECOND
from tests.system.test_workers import start_workers, still_anvil

pytestmark = pytest.mark.lab


STILL_HEAD = "[head]\nfresh_blocks = 1000000.0\n"


def balance(id_: Any, who: int = 0) -> bytes:
    params = [DEV_ACCOUNTS[who % len(DEV_ACCOUNTS)], "latest"]
    return orjson.dumps({"jsonrpc": "2.0", "id": id_, "method": "eth_getBalance", "params": params})


class Conn:
    """One keep-alive HTTP/1.1 connection, written and read by hand: the test sees that
    every answer, a 429 included, comes back on the same connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, body: bytes) -> tuple[int, dict[str, str], Any]:
        head = b"POST / HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        self.writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status_line = await self.reader.readline()
        headers = {}
        while (line := await self.reader.readline()) != b"\r\n":
            k, v = line.decode().split(":", 1)
            headers[k.strip().lower()] = v.strip()
        data = await self.reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), headers, orjson.loads(data)

    def close(self) -> None:
        self.writer.close()


async def test_past_its_rate_a_client_gets_429_or_minus_32005_and_keeps_its_connection(
    anvil_factory: AnvilFactory, relay_factory: RelayFactory
) -> None:
    node = await still_anvil(anvil_factory)
    extra = (
        STILL_HEAD
        + "[limits]\nsender_rate = 0.01\nsender_burst = 2\n"
        + "[tiers.default]\nrate = 10\nburst = 20\n"
    )
    relay = await relay_factory([node.ws_url], extra)
    conn = await Conn.open(relay.port)
    try:
        # HTTP: 20 calls at once, then 429 with Retry-After; repeats take the replay paths.
        statuses = []
        started = time.monotonic()
        for i in range(60):
            status, headers, doc = await conn.post(balance(i))
            statuses.append(status)
            if status == 429:
                break
        assert status == 429, statuses
        ok = statuses.count(200)
        assert 20 <= ok <= 20 + 10 * (time.monotonic() - started) + 1
        assert int(headers["retry-after"]) >= 1
        assert doc["id"] == len(statuses) - 1
        assert doc["error"]["code"] == -32005 and doc["error"]["data"]["retry_after"] > 0

        async def passes() -> bool:
            return (await conn.post(balance("again")))[0] == 200

        await until(passes, 5 * SECOND, "the bucket to let a call through on the same connection")

        # WebSocket: a burst past the bucket gets -32005 with the wait, on an open socket.
        async with websockets.connect(relay.ws_url) as ws:
            for i in range(40):
                await ws.send(balance(f"ws{i}"))
            docs = [orjson.loads(await ws.recv()) for _ in range(40)]
            limited = [d for d in docs if "error" in d]
            assert limited and len(docs) - len(limited) <= 21
            assert all(d["error"]["code"] == -32005 for d in limited)
            assert all(d["error"]["data"]["retry_after"] > 0 for d in limited)
            assert {d["id"] for d in docs} == {f"ws{i}" for i in range(40)}

            async def ws_passes() -> bool:
                await ws.send(balance("later"))
                return "result" in orjson.loads(await ws.recv())

            await until(ws_passes, 5 * SECOND, "a WebSocket call to pass again")

        # The sender limit: two transactions of one sender, then -32005 naming it; a raw
        # transaction that does not decode is -32602. Only two reach anvil.
        sender = Account.from_key(DEV_KEYS[1])
        assert sender.address.lower() == DEV_ACCOUNTS[1].lower()
        answers = []
        for nonce in range(3):
            tx = {
                "to": DEV_ACCOUNTS[2],
                "value": 1,
                "gas": 21_000,
                "gasPrice": 3 * 10**9,
                "nonce": nonce,
                "chainId": 56,
            }
            raw = "0x" + Account.sign_transaction(tx, DEV_KEYS[1]).raw_transaction.hex()
            body = orjson.dumps(
                {"jsonrpc": "2.0", "id": nonce, "method": "eth_sendRawTransaction", "params": [raw]}
            )

            async def sent(body: bytes = body) -> bool:
                status, _, doc = await conn.post(body)
                if status == 429:
                    return False  # the identity's bucket: wait for it, not the sender's
                answers.append(doc)
                return True

            await until(sent, 5 * SECOND, "the identity's bucket to take a transaction")
        assert all("result" in d for d in answers[:2]), answers
        assert answers[2]["error"]["code"] == -32005
        assert "sender limit" in answers[2]["error"]["message"]
        assert answers[2]["error"]["data"]["sender"] == sender.address
        bad = orjson.dumps(
            {"jsonrpc": "2.0", "id": 9, "method": "eth_sendRawTransaction", "params": ["0x12ab"]}
        )

        async def malformed() -> bool:
            status, _, doc = await conn.post(bad)
            return status == 200 and doc["error"]["code"] == -32602

        await until(malformed, 5 * SECOND, "a malformed transaction to be refused with -32602")
        async with aiohttp.ClientSession() as s:
            count = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "eth_getTransactionCount",
                "params": [sender.address, "latest"],
            }
            async with s.post(node.url, json=count) as r:
                assert int((await r.json())["result"], 16) == 2
    finally:
        conn.close()


async def test_two_workers_and_a_node_hold_one_budget_through_redis_and_survive_its_loss(
    procs: Procs, tmp_path: Path, anvil_factory: AnvilFactory, relay_factory: RelayFactory
) -> None:
    node = await still_anvil(anvil_factory)
    redis = await start_redis(procs, tmp_path)
    rate, burst = 40.0, 40.0
    extra = (
        STILL_HEAD
        + f'[cache]\nbackend = "tiered"\nredis_url = "{redis.url}"\nredis_timeout = 1.0\n'
        + f"[tiers.default]\nrate = {rate}\nburst = {burst}\n"
    )
    workers = await start_workers(procs, tmp_path, [node.ws_url], 2, extra)
    other = await relay_factory([node.ws_url], extra, "other")
    urls = [workers.url, other.url]
    seconds = 4.0
    admitted = refused = 0

    async def client(n: int, session: aiohttp.ClientSession, stop: float) -> None:
        nonlocal admitted, refused
        i = 0
        while time.monotonic() < stop:
            i += 1
            url = urls[(n + i) % 2]
            async with session.post(url, data=balance(i, n)) as r:
                await r.read()
                if r.status == 200:
                    admitted += 1
                else:
                    assert r.status == 429, r.status
                    refused += 1

    # Every request on a new connection, so the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        started = time.monotonic()
        stop = started + seconds
        await asyncio.gather(*(client(n, session, stop) for n in range(8)))
        ended = time.monotonic()
        low = burst + rate * (stop - started)
        high = burst + rate * (ended - started)
        assert refused > admitted, "the clients asked for more than the budget"
        assert 0.95 * low <= admitted <= 1.05 * high, (admitted, low, high)
        keys = await redis.keys("*:rl:*")
        assert keys, "the buckets live in Redis"

        # Redis gone: every process counts in its own buckets, and answers.
        redis.kill()

        async def answered_everywhere() -> bool:
            for url in urls:
                async with session.post(url, data=balance("down")) as r:
                    await r.read()
                    if r.status != 200:
                        return False
            return True

        await until(answered_everywhere, 10 * SECOND, "calls answered with Redis down")

        # Back: the shared buckets are used again.
        await redis.restart()

        async def shared_again() -> bool:
            for url in urls:
                async with session.post(url, data=balance("up")) as r:
                    await r.read()
            return bool(await redis.keys("*:rl:*"))

        await until(shared_again, 15 * SECOND, "the buckets to be kept in Redis again")
