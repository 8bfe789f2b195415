"""``chainrelay demo`` as a newcomer runs it, and the status page in a real browser.

One demo process serves the whole module (it takes ~13 s to be ready on two cores): a
``chainrelay subscribe`` on a leaf prints blocks and batches in order, web3.py through a
leaf reads what it reads from anvil, every node's ``/status.json`` keeps its schema and is
served on the admin listener only, the page of a leaf shows live data in headless Chromium
(``tests/lab/browser.py``: Debian's chromium over the DevTools protocol), the page of a
node with no parents and no upstream in rotation renders without a script error, and
Ctrl-C (SIGINT) leaves no process of the demo behind. The tests run in file order; the
last one stops the demo.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hexbytes import HexBytes
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.types import FilterParams

from tests.lab.browser import Browser
from tests.lab.procs import ROOT, rpc, until
from tests.lab.statusschema import check_status
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

# What a newcomer is promised: blocks and batches at a leaf within 30 s of typing the command.
FIRST_OUTPUT_WITHIN = 30 * SECOND
READY_TIMEOUT = 60 * SECOND
STOP_TIMEOUT = 40 * SECOND
# Where the screenshots stay after the run (ignored by git), besides the test's tmp dir.
ARTIFACTS = ROOT / "tests" / "artifacts"


@dataclass
class RunningDemo:
    proc: subprocess.Popen[bytes]
    dir: Path
    started: float
    lines: list[str] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)

    def node(self, name: str) -> dict[str, Any]:
        node: dict[str, Any] = self.plan["nodes"][name]
        return node

    def output(self) -> str:
        return "".join(self.lines)[-4000:]


def _descendants(root: int) -> set[int]:
    """Every live process under ``root`` (by parent PID, read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped by anyone, is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDemo]:
    tmp = tmp_path_factory.mktemp("demo")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chainrelay", "demo", "--dir", str(tmp / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    running = RunningDemo(proc, tmp / "demo", started)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            running.lines.append(line)
            if "Ctrl-C stops everything" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    pids: set[int] = set()
    try:
        if not ready.wait(READY_TIMEOUT):
            raise AssertionError(f"the demo was not ready:\n{running.output()}")
        running.plan = json.loads((running.dir / "demo.json").read_text())
        pids = set(running.plan["pids"].values()) | _descendants(proc.pid)
        yield running
    finally:
        # Whatever the tests did: every process of the demo ends, by PID.
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        reader.join(5 * SECOND)
        if proc.stdout is not None:
            proc.stdout.close()


async def _subscribe(url: str, stream: str, trust: str, count: int, *extra: str) -> list[Any]:
    """``chainrelay subscribe`` as the demo prints it, until ``count`` lines."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chainrelay", "--log-level", "WARNING", "subscribe", url,
        "--stream", stream, "--trust", trust, "--count", str(count),
        "--max-seconds", str(25 * SECOND), *extra,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


async def test_a_leaf_streams_blocks_and_batches_and_answers_as_anvil(demo: RunningDemo) -> None:
    leaf = demo.node("leaf-us")
    plan = demo.plan
    # Both commands as the banner prints them.
    assert f"chainrelay subscribe {leaf['feed']} --stream bsc/blocks" in demo.output()
    assert f"--stream arbitrum/batches --from 0 --trust {plan['sequencer']}" in demo.output()
    blocks, batches = await asyncio.gather(
        _subscribe(leaf["feed"], "bsc/blocks", plan["origin"], 3),
        _subscribe(leaf["feed"], "arbitrum/batches", plan["sequencer"], 5, "--from", "0"),
    )
    elapsed = time.monotonic() - demo.started
    assert elapsed < FIRST_OUTPUT_WITHIN, f"first blocks and batches after {elapsed:.1f} s"
    numbers = [b["number"] for b in blocks]
    assert numbers == list(range(numbers[0], numbers[0] + 3)), numbers
    assert all(b["verified"] for b in blocks)
    assert [b["seq"] for b in batches] == [0, 1, 2, 3, 4]
    assert {b["signer"] for b in batches} == {plan["sequencer"].lower()}

    direct = AsyncWeb3(AsyncHTTPProvider(plan["anvil"]))
    through = AsyncWeb3(AsyncHTTPProvider(leaf["url"]))
    try:
        assert await through.eth.chain_id == await direct.eth.chain_id == 56
        head = await through.eth.block_number
        assert head >= numbers[-1]
        # Blocks the traffic filled (transfers, ERC-20 logs), a few back from the head.
        for n in range(max(1, head - 3), head + 1):
            block = await through.eth.get_block(n, full_transactions=True)
            assert block == await direct.eth.get_block(n, full_transactions=True)
            for tx in block["transactions"][:2]:
                assert not isinstance(tx, HexBytes), "full transactions, not their hashes"
                receipt = await through.eth.get_transaction_receipt(tx["hash"])
                assert receipt == await direct.eth.get_transaction_receipt(tx["hash"])
                sender = tx["from"]
                assert await through.eth.get_balance(sender, n) == await direct.eth.get_balance(
                    sender, n
                )
        window: FilterParams = {"fromBlock": max(1, head - 3), "toBlock": head}
        logs = await through.eth.get_logs(window)
        assert logs == await direct.eth.get_logs(window)
        assert logs, "the demo's traffic sends ERC-20 Transfer logs every block"
    finally:
        for w3 in (direct, through):
            await w3.provider.disconnect()


async def test_status_json_keeps_its_schema_and_is_only_on_the_admin_listener(
    demo: RunningDemo,
) -> None:
    roles = {}
    async with aiohttp.ClientSession() as s:
        for name, node in demo.plan["nodes"].items():
            async with s.get(node["admin"] + "/status.json") as r:
                assert r.status == 200, name
                assert r.content_type == "application/json"
                doc = await r.json()
            check_status(doc)
            roles[name] = doc["node"]["role"]
            assert doc["node"]["region"] is not None
            for path in ("/status.json", "/status"):
                async with s.get(node["url"] + path) as r:
                    assert r.status == 404, (name, path)
        async with s.get(demo.node("origin")["admin"] + "/status.json") as r:
            origin = await r.json()
    assert roles == {
        "origin": "origin",
        "ingress": "root",
        "relay-us": "relay",
        "relay-asia": "relay",
        "leaf-us": "leaf",
        "leaf-asia": "leaf",
    }
    assert origin["parents"] == []
    # The origin's children are the two regional relays, named by their hellos.
    assert origin["children"]["relays"] == 2


async def test_status_page_of_a_leaf_in_a_browser(demo: RunningDemo, tmp_path: Path) -> None:
    leaf = demo.node("leaf-us")
    # A few client calls, so the last minute has a hit ratio to show.
    for _ in range(3):
        assert "result" in await rpc(leaf["url"], "eth_getBlockByNumber", ["latest", False])
    async with Browser(tmp_path) as browser:
        page = await browser.open(leaf["admin"] + "/status")

        async def number(selector: str) -> int | None:
            text = await page.evaluate(f"document.querySelector('{selector}').textContent")
            return int(text) if isinstance(text, str) and text.isdigit() else None

        async def shown() -> bool:
            return await number("#head") is not None

        await until(shown, 15 * SECOND, "a head on the page")
        first = await number("#head")
        assert first is not None

        async def advanced() -> bool:
            now = await number("#head")
            return now is not None and now > first

        await until(advanced, 15 * SECOND, "the head on the page to advance")
        parents = await page.evaluate(
            "[...document.querySelectorAll('#parents tr')].map(r => r.cells[0].textContent)"
        )
        assert sorted(parents) == ["relay-asia", "relay-us"]

        async def ratio() -> bool:
            value = await page.evaluate("document.getElementById('hit-ratio').dataset.value")
            return bool(value)

        await until(ratio, 10 * SECOND, "a hit ratio on the page")
        value = float(await page.evaluate("document.getElementById('hit-ratio').dataset.value"))
        assert 0.0 <= value <= 1.0
        streams = await page.evaluate(
            "[...document.querySelectorAll('#streams tr')].map(r => r.cells[0].textContent)"
        )
        assert sorted(streams) == ["arbitrum/batches", "bsc/blocks"]
        shots = (tmp_path / "status-leaf.png", ARTIFACTS / "status-leaf.png")
        await page.screenshot(*shots)
        print(f"status page screenshot: {shots[1]} (and {shots[0]})")
        assert page.errors == []


async def test_status_page_of_a_node_without_parents_or_upstream(
    demo: RunningDemo, tmp_path: Path
) -> None:
    """The ingress has no parents; with its one upstream cordoned it has none in rotation
    either: the page shows that, with no script error."""
    admin = demo.node("ingress")["admin"]
    cordon = {"jsonrpc": "2.0", "id": 1, "method": "chainrelay_cordonUpstream", "params": ["anvil"]}
    async with aiohttp.ClientSession() as s:
        async with s.post(admin, json=cordon) as r:
            assert (await r.json())["result"] is True
        try:
            async with Browser(tmp_path) as browser:
                page = await browser.open(admin + "/status")

                async def degraded() -> bool:
                    text = await page.evaluate("document.getElementById('ok').textContent")
                    return bool(text == "degraded")

                await until(degraded, 15 * SECOND, "the page to say degraded")
                texts = await page.evaluate(
                    "[...document.querySelectorAll('#parents td, #upstreams td')]"
                    ".map(c => c.textContent)"
                )
                assert "cordoned" in texts
                assert any(t.startswith("no parents") for t in texts)
                await page.screenshot(
                    tmp_path / "status-ingress.png", ARTIFACTS / "status-ingress.png"
                )
                assert page.errors == []
        finally:
            uncordon = {**cordon, "method": "chainrelay_uncordonUpstream"}
            async with s.post(admin, json=uncordon) as r:
                assert (await r.json())["result"] is True


def test_ctrl_c_stops_every_process(demo: RunningDemo) -> None:
    pids = set(demo.plan["pids"].values()) | _descendants(demo.proc.pid)
    assert len(pids) >= 8  # anvil, six nodes, the sequencer
    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(STOP_TIMEOUT) == 0, demo.output()
    left = sorted(p for p in pids if _alive(p))
    assert left == [], f"left running: {left}"
    assert "chainrelay demo: stopped" in demo.output()
