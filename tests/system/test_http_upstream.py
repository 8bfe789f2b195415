"""The HTTP upstream client (``upstreams/httplink.py``) against real anvil, and over TLS
against a fake upstream in the test process (a self-signed certificate made here, with
``openssl``): keep-alive, pipelining, chunked answers, an upstream closing mid-answer, a
slow upstream, and a relay whose ``[[upstreams]] ca_file`` names the certificate."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chainrelay.devnet import DEV_ACCOUNTS, Anvil
from chainrelay.upstreams.failures import TransportError
from chainrelay.upstreams.upstream import HttpUpstream
from tests.lab.procs import Relay, rpc, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

READS: list[tuple[str, list[Any]]] = [
    ("eth_getBalance", [DEV_ACCOUNTS[1], "pending"]),
    ("eth_getTransactionCount", [DEV_ACCOUNTS[0], "pending"]),
    ("eth_getCode", [DEV_ACCOUNTS[0], "pending"]),
    ("eth_getBlockByNumber", ["0x0", True]),
]
# How long the fake's "slow" mode holds each answer: long enough for calls to queue up
# behind one another on a connection, short against every wait of the tests.
SLOW = 0.3 * SECOND
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


async def direct(anvil: Anvil, method: str, params: list[Any]) -> object:
    return (await rpc(anvil.url, method, params))["result"]


def up_of(
    url: str, *, connections: int = 1, timeout: float = 10 * SECOND, ca_file: str = ""
) -> HttpUpstream:
    return HttpUpstream("up", url, timeout=timeout, connections=connections, ca_file=ca_file)


async def test_keep_alive_and_pipelining_against_anvil(anvil: Anvil) -> None:
    up = up_of(anvil.url)
    await up.start()
    try:
        links = up._links
        assert links is not None
        for method, params in READS:
            assert (await up.call(method, params)).value == await direct(anvil, method, params)
        [link] = links.links  # one connection, kept alive
        assert link.proven
        # Twelve reads at once on one connection: four in its line at a time (the depth).
        calls = [asyncio.ensure_future(up.call(m, p)) for m, p in READS * 3]
        deepest = 0
        while not all(c.done() for c in calls):
            deepest = max(deepest, len(link.sent))
            await asyncio.sleep(0)
        assert [c.result().value for c in calls] == [
            await direct(anvil, m, p) for m, p in READS * 3
        ]
        assert links.links == {link} and links.pipelining and deepest > 1
    finally:
        await up.stop()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 and its key, made with ``openssl``."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


class FakeTlsUpstream:
    """An HTTP/1.1 server over TLS in the test process, for the faults a real node cannot
    be made to produce: each request is passed to anvil, and its answer sent back as
    ``mode`` says: "chunked" (in small chunks), "slow" (the same after ``SLOW``) or
    "close_mid_answer" (the head and half the body, then the connection closes). Requests
    on a connection are answered in order, so a pipelining client is served as such."""

    def __init__(self, anvil: Anvil, cert: Path, key: Path) -> None:
        self.anvil = anvil
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.mode = "chunked"
        self.connections = 0
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        self.session = aiohttp.ClientSession()
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.context)
        return f"https://localhost:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.session is not None:
            await self.session.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        assert self.session is not None
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                found = _LENGTH.search(head)
                body = await reader.readexactly(int(found.group(1)) if found else 0)
                self.requests += 1
                async with self.session.post(
                    self.anvil.url, data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    answer = await r.read()
                if self.mode == "slow":
                    await asyncio.sleep(SLOW)  # the fault itself: an upstream slow to answer
                if self.mode == "close_mid_answer":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer))
                    writer.write(answer[: len(answer) // 2])
                    await writer.drain()
                    return
                chunks = b"".join(
                    b"%x\r\n%b\r\n" % (len(answer[i : i + 16]), answer[i : i + 16])
                    for i in range(0, len(answer), 16)
                )
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return
        finally:
            writer.close()


@pytest.fixture
async def fake_tls(
    anvil: Anvil, tmp_path: Path
) -> AsyncIterator[tuple[FakeTlsUpstream, str, Path]]:
    cert, key = self_signed(tmp_path)
    fake = FakeTlsUpstream(anvil, cert, key)
    url = await fake.start()
    try:
        yield fake, url, cert
    finally:
        await fake.stop()


async def test_https_fake_tls_upstream_chunked_slow_and_closing_mid_answer(
    anvil: Anvil, fake_tls: tuple[FakeTlsUpstream, str, Path]
) -> None:
    fake, url, cert = fake_tls
    # Verification is on: a certificate no CA of the system's signed is refused.
    unknown = up_of(url)
    await unknown.start()
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        await unknown.call("eth_chainId", [])
    await unknown.stop()

    up = up_of(url, ca_file=str(cert), timeout=SLOW / 2)
    await up.start()
    try:
        links = up._links
        assert links is not None
        # Chunked answers, one connection kept alive.
        up.timeout = 10 * SECOND
        for method, params in READS:
            assert (await up.call(method, params)).value == await direct(anvil, method, params)
        assert fake.connections == 1
        # Slow: a try past its timeout fails as a timeout and its connection goes.
        up.timeout = SLOW / 2
        fake.mode = "slow"
        with pytest.raises(TransportError, match="timed out") as late:
            await up.call(*READS[0])
        assert late.value.timeout and not links.links
        # ... and within its timeout the slow answers come, pipelined on one connection.
        up.timeout = 10 * SECOND
        await up.call(*READS[0])  # a new connection, proven keep-alive by its first answer
        calls = [asyncio.ensure_future(up.call(m, p)) for m, p in READS]
        await until(
            lambda: any(len(li.sent) == len(READS) for li in links.links), 5 * SECOND, "a full line"
        )
        assert [(await c).value for c in calls] == [await direct(anvil, m, p) for m, p in READS]
        # Closing mid-answer: every call on the connection fails (retryable), the
        # connection leaves the pool, and the next call opens a new one.
        fake.mode = "close_mid_answer"
        calls = [asyncio.ensure_future(up.call(m, p)) for m, p in READS[:2]]
        counted = []
        for c in calls:
            with pytest.raises(TransportError) as broke:
                await c
            counted.append(broke.value.counts)
        assert counted == [True, False]  # one fault, counted once
        assert not links.links
        fake.mode = "chunked"
        assert (await up.call(*READS[0])).value == await direct(anvil, *READS[0])
    finally:
        await up.stop()


async def test_a_relay_forwards_over_https_verified_by_its_ca_file(
    anvil: Anvil,
    fake_tls: tuple[FakeTlsUpstream, str, Path],
    relay_factory: Callable[..., Awaitable[Relay]],
) -> None:
    fake, url, cert = fake_tls
    relay = await relay_factory(
        [], f'[[upstreams]]\nname = "tls"\nurl = "{url}"\nca_file = "{cert}"\n'
    )
    for method, params in READS:
        got = await rpc(relay.url, method, params)
        assert got["result"] == await direct(anvil, method, params)
    assert fake.requests > len(READS) and fake.connections <= 2
