"""Failover: clients see no failure when an upstream dies or misbehaves.

Two upstreams must serve the *same* chain, so one anvil stands behind two counting proxies
(separate processes that can be SIGKILLed). Faults a real node cannot produce (429s, hangs,
malformed answers) come from ``tests.lab.fault_upstream``; tests that use it say "fake".
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from chainrelay.devnet import DEV_ACCOUNTS
from tests.lab.counting_proxy import CountingProxy, start_proxy
from tests.lab.fault_upstream import HEAD_METHODS, start_fault_upstream
from tests.lab.procs import AnvilFactory, Procs, RelayFactory, until
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

DEV_BALANCE = hex(10_000 * 10**18)  # every anvil dev account's balance while nobody spends
BALANCE_READER = "0x" + "be" * 20
BALANCE_READER_CODE = "0x60003531600052602060" + "00f3"  # returns balance(calldata[0:32])
JSON_HEADERS = {"Content-Type": "application/json"}


def reader_call(account: str) -> dict[str, str]:
    return {"to": BALANCE_READER, "data": "0x" + account[2:].lower().rjust(64, "0")}


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with session.post(url, data=orjson.dumps(body), headers=JSON_HEADERS) as r:
        assert r.status == 200, f"HTTP {r.status}"
        return orjson.loads(await r.read())


async def direct(url: str, method: str, params: list[Any]) -> Any:
    """The node's own result, asked without the relay."""
    async with aiohttp.ClientSession() as s:
        doc = await post(s, url, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    assert "error" not in doc, doc
    return doc["result"]


def client_calls() -> list[tuple[str, list[Any], Any]]:
    """(method, params, expected result or None for "any result") for the load mix."""
    mix: list[tuple[str, list[Any], Any]] = [("eth_chainId", [], "0x38")]
    for acct in DEV_ACCOUNTS:
        mix += [
            ("eth_getBalance", [acct, "pending"], DEV_BALANCE),  # never cached
            ("eth_getBalance", [acct, "latest"], DEV_BALANCE),  # cached per head
            ("eth_getTransactionCount", [acct, "pending"], "0x0"),
            ("eth_call", [reader_call(acct), "pending"], "0x" + DEV_BALANCE[2:].rjust(64, "0")),
        ]
    mix += [
        ("eth_blockNumber", [], None),
        ("eth_getBlockByNumber", ["latest", False], None),
        ("eth_gasPrice", [], None),
    ]
    return mix


class Load:
    """Several clients, each sending the mix in a loop over its own keep-alive connection."""

    def __init__(self, url: str, clients: int, seconds: float, max_requests: int) -> None:
        self.url = url
        self.clients = clients
        self.seconds = seconds
        self.max_requests = max_requests
        self.sent = 0
        self.failures: list[str] = []
        self.answered_after: dict[str, int] = {}
        self._marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self._marks[name] = time.monotonic()
        self.answered_after[name] = 0

    async def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        mix = client_calls()

        async def client(k: int) -> None:
            async with aiohttp.ClientSession() as s:
                for i in itertools.count(k):
                    if time.monotonic() > deadline or self.sent >= self.max_requests:
                        return
                    method, params, want = mix[i % len(mix)]
                    self.sent += 1
                    started = time.monotonic()
                    body = {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
                    try:
                        doc = await post(s, self.url, body)
                    except (aiohttp.ClientError, OSError, AssertionError) as exc:
                        self.failures.append(f"{method}: {type(exc).__name__}: {exc}")
                        continue
                    if doc.get("id") != i or "result" not in doc or "error" in doc:
                        self.failures.append(f"{method}{params}: {doc}")
                    elif want is not None and doc["result"] != want:
                        self.failures.append(f"{method}{params}: {doc['result']} != {want}")
                    for name, at in self._marks.items():
                        if started > at:
                            self.answered_after[name] += 1

        await asyncio.gather(*(client(k) for k in range(self.clients)))


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """One sample of ``Relay.metrics()`` by name and labels, in whatever order they print."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and set(rest.rstrip("}").split(",")) == want:
            return value
    return 0.0


def non_head_calls(counts: dict[str, int]) -> int:
    return sum(n for m, n in counts.items() if m not in HEAD_METHODS)


async def test_sigkill_of_an_upstream_mid_load_fails_no_client_request(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=1.0)
    await direct(anvil.url, "anvil_setCode", [BALANCE_READER, BALANCE_READER_CODE])
    proxies = [
        await start_proxy(procs, anvil.url, log_path=tmp_path / f"proxy{i}.log") for i in range(2)
    ]
    relay = await relay_factory([p.url for p in proxies])

    load = Load(relay.url, clients=8, seconds=4.0, max_requests=40_000)
    running = asyncio.ensure_future(load.run())
    await until(lambda: load.sent >= 200 or running.done(), 10 * SECOND, "the load to get going")
    # Kill the proxy that carried most of the clients' calls so far.
    counts = [non_head_calls(await p.counts()) for p in proxies]
    victim: CountingProxy = proxies[counts.index(max(counts))]
    survivor = proxies[1 - proxies.index(victim)]
    assert max(counts) > 0, counts
    survivor_before = non_head_calls(await survivor.counts())
    victim.kill()
    load.mark("kill")
    await running

    assert load.failures == [], load.failures[:10]
    assert load.sent >= 400, f"only {load.sent} requests in 4 s"
    assert load.answered_after["kill"] >= 100, load.answered_after
    assert non_head_calls(await survivor.counts()) > survivor_before
    assert relay.proc is not None and relay.proc.poll() is None


# --- faults a real node cannot produce -------------------------------------------------------
@pytest.mark.parametrize("mode", ["429", "hang", "malformed"])
async def test_fake_upstream_faults_are_retried_on_the_healthy_path(
    mode: str,
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    await direct(anvil.url, "anvil_setCode", [BALANCE_READER, BALANCE_READER_CODE])
    await direct(anvil.url, "evm_mine", [])
    fake = await start_fault_upstream(procs, mode, anvil.url, tmp_path / "fake.log")
    # The fake (whose head calls reach anvil) is the primary, the healthy path (answering
    # 200 ms later) its fallback: the relay sends each call to the fake first.
    healthy = await start_proxy(procs, anvil.url, delay_ms=200, log_path=tmp_path / "proxy.log")
    relay = await relay_factory(
        [],
        "[pool]\ntimeout = 1.0\nmax_consecutive_errors = 1000\n\n"
        f'[[upstreams]]\nname = "u0"\nurl = "{fake.url}"\n\n'
        f'[[upstreams]]\nname = "u1"\nurl = "{healthy.url}"\nrole = "fallback"\n',
    )
    # Everything in the mix whose answer cannot move (no mining here), asked of the node.
    calls = [
        (method, params, await direct(anvil.url, method, params))
        for method, params, _ in client_calls()
        if method not in ("eth_blockNumber", "eth_gasPrice", "eth_getBlockByNumber")
    ]

    async with aiohttp.ClientSession() as s:

        async def ask(i: int, method: str, params: list[Any], want: Any) -> None:
            body = {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
            assert await post(s, relay.url, body) == {"jsonrpc": "2.0", "id": i, "result": want}

        await asyncio.gather(*(ask(i, *c) for i, c in enumerate(calls)))

    # The fault was met, not dodged: most calls went to the fake first. But a 429 asks
    # for a pause (its Retry-After, 1 s): the calls that come after the first 429s are sent
    # to the healthy path first, so those met the fault at least once.
    met = 1 if mode == "429" else len(calls) // 2
    assert await fake.fault_calls() >= met
    m = await relay.metrics()
    errors = metric(m, "chainrelay_upstream_calls_total", upstream="u0", outcome="transport_error")
    assert errors >= met
    assert relay.proc is not None and relay.proc.poll() is None


# --- a node's error is an answer, not a fault ------------------------------------------------
def revert_code(reason: str) -> str:
    """Runtime code that reverts with Error(reason), as Solidity's require does."""
    data = bytes.fromhex("08c379a0") + (32).to_bytes(32, "big") + len(reason).to_bytes(32, "big")
    data += reason.encode().ljust(32, b"\0")
    data = data.ljust(128, b"\0")
    code = ""
    for i in range(0, 128, 32):
        code += "7f" + data[i : i + 32].hex() + "60" + f"{i:02x}" + "52"  # mstore(i, word)
    return "0x" + code + "60" + f"{len(data) - 28:02x}" + "6000fd"  # revert(0, 100)


async def test_node_errors_pass_through_unchanged_and_are_not_retried(
    procs: Procs,
    anvil_factory: AnvilFactory,
    relay_factory: RelayFactory,
    tmp_path: Path,
) -> None:
    anvil = await anvil_factory(chain_id=56, block_time=None)
    reverter, invalid = "0x" + "de" * 20, "0x" + "fe" * 20
    await direct(anvil.url, "anvil_setCode", [reverter, revert_code("relay test: nope")])
    await direct(anvil.url, "anvil_setCode", [invalid, "0xfe"])
    await direct(anvil.url, "evm_mine", [])
    proxies = [
        await start_proxy(procs, anvil.url, log_path=tmp_path / f"proxy{i}.log") for i in range(2)
    ]
    relay = await relay_factory([p.url for p in proxies])

    async def eth_calls() -> int:
        return sum([(await p.counts()).get("eth_call", 0) for p in proxies])

    errors = []
    async with aiohttp.ClientSession() as s:
        for target in (reverter, invalid):
            for block in ("latest", "pending"):
                params = [{"to": target, "data": "0x"}, block]
                body = {"jsonrpc": "2.0", "id": "q", "method": "eth_call", "params": params}
                node = await post(s, anvil.url, body)
                assert "error" in node and "result" not in node, node
                errors.append(node["error"])
                before = await eth_calls()
                assert await post(s, relay.url, body) == node  # code, message, data unchanged
                assert await eth_calls() == before + 1  # asked once: not retried elsewhere
                # Errors are never cached: asking again asks the node again.
                assert await post(s, relay.url, body) == node
                assert await eth_calls() == before + 2

    # The node's real errors: a revert with its reason and data, and an invalid opcode.
    assert errors[0]["code"] == 3 and "relay test: nope" in errors[0]["message"]
    assert errors[0]["data"].startswith("0x08c379a0")
    assert "InvalidFEOpcode" in errors[2]["message"]
    m = await relay.metrics()
    for u in ("u0", "u1"):
        assert (
            metric(m, "chainrelay_upstream_calls_total", upstream=u, outcome="transport_error") == 0
        )
