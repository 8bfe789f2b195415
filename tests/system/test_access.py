"""Who a client is, through real relay processes in front of anvil: behind a trusted proxy
(X-Forwarded-For), behind a PROXY protocol balancer (the bytes HAProxy and AWS NLB send),
and by its API key (web3.py, ethers.js, a URL-only client), keys read again on SIGHUP by
every worker, required keys, and forged keys, huge X-Forwarded-For chains and header floods.

A client's own limit is observed through filters per client (``[filters] max_per_ip``):
the filter table counts under the request's identity, so two filters from one client and a
third refused shows whom the node took it for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from web3 import AsyncHTTPProvider, AsyncWeb3

from chainrelay.devnet import Anvil
from tests.lab.hostile import Rss
from tests.lab.procs import ROOT, Procs, Relay, RelayFactory, relay_config, until
from tests.lab.timing import SECOND
from tests.protocol.test_access import (
    V1_TCP4,
    V1_TCP6,
    V2_LOCAL,
    V2_NLB,
    V2_SIGNATURE,
    V2_TCP4,
    V2_TCP6,
)

NEW_FILTER = b'{"jsonrpc":"2.0","id":7,"method":"eth_newBlockFilter","params":[]}'
CHAIN_ID = b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}'
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
CAROL = "carol-key-0123456789abcdefg"
UNTRUSTED = "127.0.0.2"  # another loopback address: not in trusted_proxies


async def exchange(
    port: int,
    data: bytes,
    *,
    source: str = "127.0.0.1",
    timeout: float = 10 * SECOND,
    eof: bool = False,
) -> bytes:
    """Write ``data`` on a new connection from ``source`` (then half-close it, with
    ``eof``), and read everything the node writes until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        with contextlib.suppress(ConnectionResetError):
            writer.write(data)
            await writer.drain()
        if eof:
            writer.write_eof()
        try:
            return await asyncio.wait_for(reader.read(), timeout)
        except ConnectionResetError:
            return b""  # closed with our bytes unread: the kernel resets, nothing answered
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def request(body: bytes, headers: str = "", target: str = "/", method: str = "POST") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: relay\r\n{headers}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def status_and_body(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), raw[:200]
    return int(head.split(b" ")[1]), orjson.loads(body) if body else None


async def new_filter(port: int, headers: str = "", source: str = "127.0.0.1") -> bool:
    """Whether the node made a filter for this request's client (else: refused, over its
    client's limit)."""
    status, doc = status_and_body(await exchange(port, request(NEW_FILTER, headers), source=source))
    assert status == 200, doc
    if "error" in doc:
        assert doc["error"]["code"] == -32005, doc
        return False
    return True


# --- trusted proxies ----------------------------------------------------------------------
async def test_a_client_behind_a_trusted_proxy_is_limited_by_its_own_address(
    anvil: Anvil, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(
        [anvil.url], 'trusted_proxies = ["127.0.0.1/32"]\n[filters]\nmax_per_ip = 2\n'
    )
    port = relay.port
    rss = Rss(relay.proc.pid if relay.proc else 0)
    # Two clients behind the proxy (127.0.0.1), each with its own two filters.
    for client in ("198.51.100.1", "198.51.100.2"):
        xff = f"X-Forwarded-For: 203.0.113.99, {client}\r\n"  # the left one is the client's own
        assert await new_filter(port, xff)
        assert await new_filter(port, xff)
        assert not await new_filter(port, xff), client
    # The proxy's own calls (no header) are its own client's, not theirs.
    assert await new_filter(port)
    # From an address that is no trusted proxy, the header is the client's word: ignored.
    for i in range(2):
        assert await new_filter(port, f"X-Forwarded-For: 192.0.2.{i}\r\n", UNTRUSTED)
    assert not await new_filter(port, "X-Forwarded-For: 192.0.2.77\r\n", UNTRUSTED)

    # A chain of ~1,800 hops, within the head's bound: the walk stops after 16 hops, the
    # client named is the last walked (a trusted one here: the proxy's own address).
    chain = "X-Forwarded-For: " + ", ".join(["198.51.100.1"] + ["127.0.0.1"] * 1800) + "\r\n"
    assert len(chain) < 31 * 1024
    status, doc = status_and_body(await exchange(port, request(CHAIN_ID, chain)))
    assert status == 200 and doc["result"] == hex(56)
    # A head past max_header_bytes (32 KiB) of forwarding hops: 431, the node stays up.
    flood = "X-Forwarded-For: " + ", ".join(["10.0.0.1"] * 5000) + "\r\n"
    status, _ = status_and_body(await exchange(port, request(CHAIN_ID, flood)))
    assert status == 431

    # Many long chains, each from another forged client: memory stays bounded.
    async def burst(n: int) -> None:
        for i in range(n):
            hops = ", ".join(f"198.{i % 250}.{j}.{i // 250}" for j in range(200))
            raw = await exchange(port, request(CHAIN_ID, f"X-Forwarded-For: {hops}\r\n"))
            assert status_and_body(raw)[0] == 200

    await asyncio.gather(*(burst(100) for _ in range(4)))
    assert rss.growth() < 64 * 1024 * 1024, rss.growth()
    assert (await relay.health())["status"] in ("ok", "degraded")


# --- PROXY protocol -----------------------------------------------------------------------
async def test_proxy_protocol_names_the_client_and_malformed_headers_close(
    anvil: Anvil, procs: Procs, tmp_path: Path
) -> None:
    extra = 'trusted_proxies = ["127.0.0.1"]\nproxy_protocol = true\n[filters]\nmax_per_ip = 1\n'
    relay = Relay(procs, relay_config([anvil.url], extra), tmp_path)
    relay.start()

    async def healthy() -> bool:  # the balancer's health check: LOCAL, then GET /health
        assert relay.proc is not None and relay.proc.poll() is None, relay.log_path.read_text()
        with contextlib.suppress(OSError):
            raw = await exchange(relay.port, V2_LOCAL + b"GET /health HTTP/1.1\r\n\r\n", eof=True)
            return raw.startswith(b"HTTP/1.1 200")
        return False

    await until(healthy, 20 * SECOND, "the relay to serve behind PROXY headers")
    port = relay.port

    async def filter_via(header: bytes) -> bool:
        status, doc = status_and_body(await exchange(port, header + request(NEW_FILTER)))
        assert status == 200, doc
        return "error" not in doc

    # HAProxy v1 and v2 for 192.168.0.1 / 198.51.100.22: one filter each, then refused.
    assert await filter_via(V1_TCP4)
    assert not await filter_via(V1_TCP4)
    assert await filter_via(V2_TCP4)
    assert not await filter_via(V2_TCP4)
    assert await filter_via(V2_NLB)  # 203.0.113.50, with NLB's TLV
    # IPv6: 2001:db8::1 (v1) and 2001:db8:7::9 (v2) are other /64 networks: one each.
    assert await filter_via(V1_TCP6)
    assert await filter_via(V2_TCP6)
    assert not await filter_via(V2_TCP6)

    # Malformed: closed without a byte written; the node stays up.
    for bad in (
        V2_SIGNATURE[:11] + b"\x00" + b"\x21\x11\x00\x0c" + bytes(12),  # bad signature
        V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(64),  # 64 KiB announced: oversized
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP: the wrong family
        b"PROXY TCP4 2001:db8::1 192.168.0.11 56324 443\r\n",
        request(CHAIN_ID),  # no header at all
    ):
        assert await exchange(port, bad + request(CHAIN_ID)) == b"", bad
    # Truncated: the client's end closes before the rest; nothing is answered.
    assert await exchange(port, V2_TCP4[:20], eof=True) == b""
    # A well-formed header from a peer that is no trusted proxy: closed too.
    assert await exchange(port, V1_TCP4 + request(CHAIN_ID), source=UNTRUSTED) == b""
    raw = await exchange(port, V1_TCP4 + request(CHAIN_ID))
    assert status_and_body(raw) == (200, {"jsonrpc": "2.0", "id": 1, "result": hex(56)})
    metrics = await fetch_via_proxy(port)
    assert metrics.count("proxy_header") >= 1


async def fetch_via_proxy(port: int) -> str:
    raw = await exchange(port, V2_LOCAL + b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    body = raw.partition(b"\r\n\r\n")[2].decode()
    return "\n".join(line for line in body.splitlines() if line.startswith("chainrelay_rejected"))


# --- API keys -----------------------------------------------------------------------------
ETHERS_SCRIPT = r"""
const { ethers } = require("ethers");
(async () => {
  const [url, key] = process.argv.slice(1);  // node -e: no script path in argv
  const out = {};
  const req = new ethers.FetchRequest(url);
  req.setHeader("Authorization", "Bearer " + key);
  const byHeader = new ethers.JsonRpcProvider(req, 56, { staticNetwork: true });
  out.header = Number(await byHeader.getBlockNumber()) >= 0;
  const byPath = new ethers.JsonRpcProvider(url + "/k/" + key, 56, { staticNetwork: true });
  out.path = (await byPath.send("eth_chainId", [])) === "0x38";
  try {
    const wrong = new ethers.JsonRpcProvider(url + "/k/" + key + "x", 56,
                                             { staticNetwork: true });
    await wrong.send("eth_chainId", []);
    out.wrong = "answered";
  } catch (e) {
    out.wrong = String(e.message || e).includes("401") ? 401 : String(e.message || e);
  }
  console.log(JSON.stringify(out));
  process.exit(0);  // providers keep timers
})().catch((e) => { console.error(e); process.exit(1); });
"""


def node_modules() -> Path:
    """Where ethers is installed: ``.tools`` (tests/run installs it there), or
    ``$CHAINRELAY_NODE_MODULES``."""
    return Path(os.environ.get("CHAINRELAY_NODE_MODULES", ROOT / ".tools" / "node_modules"))


def url_only_call(url: str) -> tuple[int, Any]:
    """A client that takes only a URL (``cast --rpc-url``, op-node, erigon): a plain POST
    to it, with no header of its own."""
    req = urllib.request.Request(url, CHAIN_ID, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def keys_file(path: Path, keys: dict[str, str]) -> None:
    path.write_text(
        "".join(f'[[keys]]\nname = "{n}"\nkey = "{k}"\ntier = "pro"\n' for n, k in keys.items())
    )


async def test_keys_from_web3_ethers_and_url_only_clients_read_again_on_sighup(
    anvil: Anvil, relay_factory: RelayFactory, tmp_path: Path
) -> None:
    file = tmp_path / "keys.toml"
    keys_file(file, {"bob": BOB})
    relay = await relay_factory(
        [anvil.url],
        "workers = 2\n[tiers.pro]\n[auth]\n"
        f'keys_file = "{file}"\n'
        f'[[auth.keys]]\nname = "alice"\nkey = "{ALICE}"\n'
        'origins = ["https://app.example"]\n',
    )
    url = relay.url
    # web3.py: the key in a header, and in the URL's path.
    for provider in (
        AsyncHTTPProvider(url, request_kwargs={"headers": {"Authorization": f"Bearer {ALICE}"}}),
        AsyncHTTPProvider(f"{url}/k/{BOB}"),
        AsyncHTTPProvider(f"{url}/{ALICE}"),
        AsyncHTTPProvider(url, request_kwargs={"headers": {"X-Api-Key": BOB}}),
    ):
        w3 = AsyncWeb3(provider)
        assert await w3.eth.chain_id == 56
        await provider.disconnect()
    # ethers.js: a header through FetchRequest, and the URL's path; a wrong key is a 401.
    assert (node_modules() / "ethers").is_dir(), f"no ethers in {node_modules()}"
    proc = await asyncio.create_subprocess_exec(
        "node",
        "-e",
        ETHERS_SCRIPT,
        url,
        ALICE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(node_modules())},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60 * SECOND)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert json.loads(out) == {"header": True, "path": True, "wrong": 401}
    # A URL-only client: the key in the path, or no key (anonymous: not required here).
    assert url_only_call(f"{url}/{BOB}") == (200, {"jsonrpc": "2.0", "id": 1, "result": "0x38"})
    assert url_only_call(url)[0] == 200
    wrong = url_only_call(f"{url}/{CAROL}")
    assert wrong[0] == 401 and wrong[1]["error"]["code"] == -32001
    # A key with origins, from a browser at another origin: 403.
    raw = await exchange(
        relay.port, request(CHAIN_ID, f"X-Api-Key: {ALICE}\r\nOrigin: https://evil.example\r\n")
    )
    assert status_and_body(raw)[0] == 403

    async def answered_by_every_worker(key: str, status: int) -> bool:
        # Fresh connections land on either worker: twelve in a row agree, or not yet.
        got = await asyncio.gather(
            *(asyncio.to_thread(url_only_call, f"{url}/k/{key}") for _ in range(12))
        )
        return all(s == status for s, _ in got)

    # A key added to the file works after SIGHUP (the supervisor forwards it to both
    # workers); a key taken out of it stops working.
    assert relay.proc is not None
    keys_file(file, {"bob": BOB, "carol": CAROL})
    assert await answered_by_every_worker(CAROL, 401)  # not before it is read again
    os.kill(relay.proc.pid, signal.SIGHUP)
    await until(lambda: answered_by_every_worker(CAROL, 200), 20 * SECOND, "carol's key")
    keys_file(file, {"carol": CAROL})
    os.kill(relay.proc.pid, signal.SIGHUP)
    await until(lambda: answered_by_every_worker(BOB, 401), 20 * SECOND, "bob's key gone")
    assert await answered_by_every_worker(CAROL, 200)
    assert await answered_by_every_worker(ALICE, 200)  # the config's own keys stay
    # A file the node would refuse leaves the keys as they were, and the node up.
    file.write_text("[[keys]]\nname = 'x'\nkey = 'short'\n")
    os.kill(relay.proc.pid, signal.SIGHUP)
    await until(
        lambda: relay.log_path.read_text().count("API keys not read again") >= 2,
        20 * SECOND,
        "both workers to refuse the file",
    )
    assert await answered_by_every_worker(CAROL, 200)
    assert relay.proc.poll() is None


def without_request_id(answer: bytes) -> bytes:
    return re.sub(rb"X-Request-Id: [^\r]*\r\n", b"", answer)


async def test_required_keys_answer_401_alike_for_missing_and_wrong_under_a_flood(
    anvil: Anvil, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(
        [anvil.url],
        f'[auth]\nrequired = true\n[[auth.keys]]\nname = "alice"\nkey = "{ALICE}"\n',
    )
    port = relay.port
    missing = await exchange(port, request(CHAIN_ID))
    wrong = await exchange(port, request(CHAIN_ID, f"Authorization: Bearer {ALICE[:-1]}x\r\n"))
    in_path = await exchange(port, request(CHAIN_ID, target=f"/k/{BOB}"))
    # Byte for byte alike, but for each answer's own X-Request-Id.
    assert without_request_id(missing) == without_request_id(wrong) == without_request_id(in_path)
    status, doc = status_and_body(missing)
    assert status == 401 and doc["error"]["code"] == -32001
    assert b"WWW-Authenticate: Bearer" in missing
    # A WebSocket upgrade without a valid key: 401 before the upgrade.
    upgrade = (
        "GET / HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert (await exchange(port, upgrade.encode())).startswith(b"HTTP/1.1 401")
    ok = await exchange(port, request(CHAIN_ID, f"X-Api-Key: {ALICE}\r\n"))
    assert status_and_body(ok) == (200, {"jsonrpc": "2.0", "id": 1, "result": "0x38"})

    # A flood of forged keys, pipelined on keep-alive connections: each answered 401,
    # memory bounded, and the real key still served.
    rss = Rss(relay.proc.pid if relay.proc else 0)

    async def forge(n: int, tag: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = "POST /k/{} HTTP/1.1\r\nHost: relay\r\nContent-Length: {}\r\n\r\n"
        for i in range(n):
            writer.write(head.format(f"forged-{tag}-{i:016d}", len(CHAIN_ID)).encode() + CHAIN_ID)
        await writer.drain()
        got = b""
        while got.count(b"HTTP/1.1 401") < n:
            chunk = await asyncio.wait_for(reader.read(1 << 16), 10 * SECOND)
            assert chunk, got[-300:]
            got += chunk
        assert b"HTTP/1.1 200" not in got
        writer.close()

    await asyncio.gather(*(forge(500, t) for t in range(4)))
    assert rss.growth() < 64 * 1024 * 1024, rss.growth()
    ok = await exchange(port, request(CHAIN_ID, f"Authorization: Bearer {ALICE}\r\n"))
    assert status_and_body(ok)[0] == 200
