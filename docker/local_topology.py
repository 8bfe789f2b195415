"""Run the relays of docker/compose.yaml as local processes on loopback, with no Docker.

The same TOML files (docker/config/), the same environment each container gets, the same
redis-server flags; only the addresses differ (127.0.0.1 and free ports instead of service
names). Then it checks what the compose example promises:

* every relay gets healthy; dapp calls through either leaf answer exactly like anvil;
* a miss on leaf-eu climbs leaf → a regional → origin → anvil; the same call on leaf-us
  costs no second anvil call; a second leaf-eu call is a memory hit;
* every metric the Grafana dashboard queries is exported by the relays.

``check_static.py`` checks the rest of docker/ without running anything.

Every process is stopped by PID at the end, also on failure or after the time budget.

    python docker/local_topology.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from chainrelay.devnet import DEV_ACCOUNTS, Anvil, free_port, traffic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Everything below finishes in well under this on two cores.
BUDGET_SECONDS = 180
REDIS_FLAGS = ["--save", "", "--appendonly", "no", "--maxmemory", "256mb"]
REDIS_FLAGS += ["--maxmemory-policy", "allkeys-lru"]
OUTCOMES = ("hit", "shared_hit", "miss")


class Lab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.anvil: Anvil | None = None

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.tmp / f"{name}.log").open("ab")
        full_env = {**os.environ, **(env or {})}
        self.procs.append(
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)
        )
        log.close()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait()
        if self.anvil is not None:
            self.anvil.stop()


async def until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def call(s: aiohttp.ClientSession, url: str, method: str, params: list[Any]) -> Any:
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}
    headers = {"Content-Type": "application/json"}
    async with s.post(url, data=orjson.dumps(body), headers=headers) as r:
        return orjson.loads(await r.read())


async def scrape(s: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Samples as {"name{labels}": value}, plus every declared series name as "#name"
    (a labelled counter has no sample until its first increment)."""
    async with s.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            for suffix in ("", *suffixes.get(kind, ())):
                out["#" + name + suffix] = 0.0
        elif line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def outcome(m: dict[str, float], method: str, what: str) -> float:
    return m.get(f'chainrelay_requests_total{{method="{method}",outcome="{what}"}}', 0.0)


async def run(lab: Lab) -> list[str]:
    report: list[str] = []
    anvil = lab.anvil = Anvil(chain_id=56, block_time=1.0)
    anvil.start()
    await anvil.wait_ready(20)
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    redis = {}
    for region in ("core", "eu", "us"):
        port = free_port()
        redis[region] = f"redis://127.0.0.1:{port}/0"
        cmd = [redis_bin, "--port", str(port), "--bind", "127.0.0.1", *REDIS_FLAGS]
        lab.spawn(f"redis-{region}", [*cmd, "--dir", str(lab.tmp)])
    ports = {n: free_port() for n in ("origin", "regional-eu", "regional-us", "leaf-eu", "leaf-us")}
    url = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    # Each relay's admin listener (its /metrics) on a port of its own: one host runs five.
    admin_ports = {n: free_port() for n in ports}
    admin = {n: f"http://127.0.0.1:{p}" for n, p in admin_ports.items()}
    # The environment of each service in compose.yaml, with loopback addresses.
    env = {
        "origin": {"ANVIL_URL": anvil.ws_url, "REDIS_URL": redis["core"]},
        "regional-eu": {
            "ORIGIN_URL": url["origin"],
            "REDIS_URL": redis["eu"],
            "REDIS_KEY_PREFIX": "eu:",
        },
        "regional-us": {
            "ORIGIN_URL": url["origin"],
            "REDIS_URL": redis["us"],
            "REDIS_KEY_PREFIX": "us:",
        },
        "leaf-eu": {
            "REGIONAL_URL": url["regional-eu"],
            "BACKUP_URL": url["regional-us"],
            "REDIS_URL": redis["eu"],
            "REDIS_KEY_PREFIX": "eu:",
        },
        "leaf-us": {
            "REGIONAL_URL": url["regional-us"],
            "BACKUP_URL": url["regional-eu"],
            "REDIS_URL": redis["us"],
            "REDIS_KEY_PREFIX": "us:",
            "CACHE_BACKEND": "redis",
        },
    }
    config = {n: HERE / "config" / f"{n.split('-')[0]}.toml" for n in ports}
    stop = asyncio.Event()
    gen = asyncio.create_task(traffic(anvil.url, stop))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:

        async def healthy(name: str) -> bool:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with s.get(url[name] + "/health") as r:
                    return r.status == 200
            return False

        for tier in (["origin"], ["regional-eu", "regional-us"], ["leaf-eu", "leaf-us"]):
            for name in tier:
                cmd = [sys.executable, "-m", "chainrelay", "serve", "--config", str(config[name])]
                listen = {
                    "CHAINRELAY_LISTEN": f"127.0.0.1:{ports[name]}",
                    "CHAINRELAY_ADMIN_LISTEN": f"127.0.0.1:{admin_ports[name]}",
                }
                lab.spawn(name, cmd, {**env[name], **listen})
            for name in tier:
                await until(lambda name=name: healthy(name), 30, f"{name} to be healthy")
        report.append("all five relays healthy: " + ", ".join(f"{n} {url[n]}" for n in url))

        # A real transaction's receipt and block, through both leaves, equal anvil's.
        # A block a few behind the head, so every relay already follows it (a hash-named
        # answer past a relay's own head is served but not cached).
        tx = None
        while tx is None:
            head = int((await call(s, anvil.url, "eth_blockNumber", []))["result"], 16)
            got = await call(s, anvil.url, "eth_getBlockByNumber", [hex(max(head - 3, 0)), False])
            block = got["result"]
            if head >= 3 and block["transactions"]:
                tx = block["transactions"][0]
            else:
                await asyncio.sleep(0.5)
        calls: list[tuple[str, list[Any]]] = [
            ("eth_chainId", []),
            ("eth_getTransactionReceipt", [tx]),
            ("eth_getBlockByHash", [block["hash"], True]),
            ("eth_getBalance", [DEV_ACCOUNTS[0], "0x1"]),
        ]
        for method, params in calls:
            want = (await call(s, anvil.url, method, params))["result"]
            for leaf in ("leaf-eu", "leaf-us"):
                got = await call(s, url[leaf], method, params)
                if got.get("result") != want:
                    raise RuntimeError(f"{leaf} {method}: {got} != {want}")
        report.append(f"{len(calls)} calls answered through both leaves exactly as anvil")

        # One miss climbing the tree, then answered from caches.
        probe = ("eth_getTransactionByBlockHashAndIndex", [block["hash"], "0x0"])
        before = {n: await scrape(s, admin[n]) for n in url}
        await call(s, url["leaf-eu"], *probe)
        await call(s, url["leaf-us"], *probe)
        await call(s, url["leaf-eu"], *probe)
        after = {n: await scrape(s, admin[n]) for n in url}
        rows = []
        for n in url:
            d = {
                o: outcome(after[n], probe[0], o) - outcome(before[n], probe[0], o)
                for o in OUTCOMES
            }
            rows.append(f"  {n:12s} " + " ".join(f"{o}={v:.0f}" for o, v in d.items()))
        report.append(f"{probe[0]} on leaf-eu, leaf-us, leaf-eu:\n" + "\n".join(rows))

        def delta(n: str, o: str) -> float:
            return outcome(after[n], probe[0], o) - outcome(before[n], probe[0], o)

        climbs = sum(delta(n, o) for n in ("regional-eu", "regional-us") for o in OUTCOMES)
        leaf_misses = delta("leaf-eu", "miss") + delta("leaf-us", "miss")
        # On loopback both regionals are equally near, so a leaf may use either one; and a
        # leaf shares its region's Redis with that region's regional relay.
        checks = {
            "leaf-eu misses": (delta("leaf-eu", "miss"), 1.0),
            "leaf-eu memory hits": (delta("leaf-eu", "hit"), 1.0),
            "leaf-us answers from upstream or its region's Redis": (
                delta("leaf-us", "miss") + delta("leaf-us", "shared_hit"),
                1.0,
            ),
            "calls reaching a regional relay (one per leaf miss)": (climbs, leaf_misses),
            "calls reaching anvil through the origin": (delta("origin", "miss"), 1.0),
        }
        for what, (got_v, want_v) in checks.items():
            if got_v != want_v:
                raise RuntimeError(f"{what}: {got_v}, expected {want_v}\n" + report[-1])

        # Every metric the dashboard queries exists on the relays.
        exported: set[str] = set()
        for m in after.values():
            exported |= {k.split("{", 1)[0].lstrip("#") for k in m}
        dash = json.loads((HERE / "grafana" / "dashboards" / "chainrelay.json").read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        wanted = {w for e in exprs for w in re.findall(r"chainrelay_[a-z_]+", e)}
        missing = sorted(w for w in wanted if w not in exported and w != "chainrelay_worker")
        if missing:
            raise RuntimeError(f"dashboard queries metrics no relay exports: {missing}")
        report.append(
            f"dashboard: {len(exprs)} queries over {len(wanted)} metrics, all exported "
            "(chainrelay_worker only exists under --workers N)"
        )
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await gen
    return report


def main() -> int:
    signal.alarm(BUDGET_SECONDS)  # SIGALRM's default action ends the script; see finally
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(SystemExit("time budget")))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit("SIGTERM")))
    with tempfile.TemporaryDirectory(prefix="chainrelay-topology-") as tmp:
        lab = Lab(Path(tmp))
        try:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                lines = runner.run(run(lab))
        except BaseException:
            for log in sorted(Path(tmp).glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-1500:]}", file=sys.stderr)
            raise
        finally:
            lab.close()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
