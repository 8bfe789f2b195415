"""Scale-out: cache-hit req/s with ``--workers 2`` against one worker, and with hits served
by the Redis tier (memory-tier miss, Redis hit) against memory-only hits.

Four relays run side by side in front of one anvil (a block an hour: "latest" does not move
while measuring), all warmed with the same mix of cacheable calls:

* "memory": the memory backend, one worker, then ``--workers 2``;
* "redis": the tiered backend with a memory tier of a few KB, smaller than the mix, so the
  round-robin mix evicts every entry before its next use and every hit comes from Redis (a
  real redis-server, started here with maxmemory and allkeys-lru); one worker, then two.

wrk (2 threads, 32 keep-alive connections) replays the mix, each body under several ids,
against each relay in turn, ``--runs`` times; the table gives medians and the ratios.
Before measuring, every call is checked to answer like anvil; while measuring, the outcome
counters of every worker say where the answers came from.

    python -m benchmarks.scale_out [--duration 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import common, wrk
from chainrelay.devnet import DEV_ACCOUNTS, transfer_emitter_initcode

OUT = common.HERE / "SCALE_OUT.md"
# One block an hour: no block arrives while measuring, so "latest" keys stay the same.
BLOCK_TIME = 3600.0
# Memory tier of the Redis-hit relays: a few entries, far smaller than the mix.
TINY_MEMORY_BYTES = 4096
REDIS_MAXMEMORY = "64mb"
IDLE_ACCOUNTS = ["0x" + f"{0x5CA1E + i:040x}" for i in range(4)]


@dataclass(frozen=True)
class Setup:
    name: str
    backend: str
    workers: int
    memory_bytes: int | None = None


SETUPS = (
    Setup("memory, 1 worker", "memory", 1),
    Setup("memory, 2 workers", "memory", 2),
    Setup("redis, 1 worker", "tiered", 1, TINY_MEMORY_BYTES),
    Setup("redis, 2 workers", "tiered", 2, TINY_MEMORY_BYTES),
)


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


# --- processes ---------------------------------------------------------------------------
class RedisProc:
    def __init__(self, tmp: Path) -> None:
        self.port = common.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(tmp)),
                *("--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", "allkeys-lru"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def _pong(self) -> bool:
        import socket

        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
        ):
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def stop(self) -> None:
        common.stop_process(self.proc)


class RelayProc:
    """``python -m chainrelay serve --config F`` with ``server.workers`` set."""

    def __init__(self, setup: Setup, upstream: str, redis_url: str, tmp: Path) -> None:
        self.setup = setup
        self.port = common.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cache = f'backend = "{setup.backend}"\nredis_url = "{redis_url}"\n'
        if setup.memory_bytes is not None:
            cache += f"memory_bytes = {setup.memory_bytes}\n"
        path = tmp / f"relay-{self.port}.toml"
        path.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\nworkers = {setup.workers}\n'
            'admin_listen = ""\n\n'
            "[head]\nfresh_blocks = 1000000.0\n\n"  # no new block for an hour: still fresh
            f"[cache]\n{cache}\n"
            f'[[upstreams]]\nname = "anvil"\nurl = "{upstream}"\n'
        )
        self.log = (tmp / f"relay-{self.port}.log").open("wb")
        cmd = [sys.executable, "-m", "chainrelay", "--log-level", "WARNING", "serve"]
        self.proc = subprocess.Popen(
            [*cmd, "--config", str(path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=common.ROOT,
        )

    def wait_ready(self) -> None:
        common.wait_healthy(self.proc, self.port, self.setup.name, self.output)

    def wait_head(self, number: int) -> None:
        deadline = time.monotonic() + 20
        while any(
            m.get("chainrelay_head_block", -1) < number for m in self.worker_metrics().values()
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.setup.name}: head not at block {number}")
            time.sleep(0.05)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def worker_metrics(self) -> dict[str, dict[str, float]]:
        """Each worker's metrics: scrapes (a new connection each) until all have answered."""
        seen: dict[str, dict[str, float]] = {}
        deadline = time.monotonic() + 20
        while len(seen) < self.setup.workers:
            m = common.parse_metrics(common.http_get(self.url + "/metrics").decode())
            workers = [k.split('"')[1] for k in m if k.startswith("chainrelay_worker{")]
            seen[workers[0] if workers else "0"] = m
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.setup.name}: not every worker answered a scrape")
        return seen

    def outcomes(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for m in self.worker_metrics().values():
            for o in ("hit", "shared_hit", "local", "miss", "pass", "error"):
                v = common.metric(m, "chainrelay_requests_total", outcome=o)
                total[o] = total.get(o, 0.0) + v
        return total

    def stop(self) -> None:
        common.stop_process(self.proc, grace=15.0)
        self.log.close()


# --- the chain and the mix ---------------------------------------------------------------
def build_chain(client: common.RpcClient) -> dict[str, Any]:
    """Contracts and transactions, mined on demand (the interval is an hour)."""
    sent: list[str] = []
    for code in (transfer_emitter_initcode(), common.echo_initcode()):
        tx = {"from": DEV_ACCOUNTS[0], "data": code, "gas": "0x30000"}
        sent.append(client.call("eth_sendTransaction", [tx]))
    client.call("anvil_mine", ["0x1"])
    emitter, echo = (client.call("eth_getTransactionReceipt", [h])["contractAddress"] for h in sent)
    txs = []
    for i in range(6):
        sender, to = DEV_ACCOUNTS[i % 3], DEV_ACCOUNTS[(i + 1) % 3]
        if i % 2:
            tx = {"from": sender, "to": to, "value": hex(1000 + i)}
        else:
            data = "0x" + to[2:].lower().rjust(64, "0") + f"{i:064x}"
            tx = {"from": sender, "to": emitter, "data": data, "gas": "0x20000"}
        txs.append(client.call("eth_sendTransaction", [tx]))
        client.call("anvil_mine", ["0x1"])
    client.call("anvil_mine", ["0x3"])
    receipts = [client.call("eth_getTransactionReceipt", [h]) for h in txs]
    head = int(client.call("eth_blockNumber", []), 16)
    return {"echo": echo, "emitter": emitter, "txs": txs, "receipts": receipts, "head": head}


def mix(chain: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """Cacheable calls only, and none answered from the head (no eth_blockNumber or
    eth_chainId): every answer is a cache hit, from memory or from Redis."""
    head = chain["head"]
    calls: list[tuple[str, list[Any]]] = []
    calls += [("eth_getBlockByNumber", [hex(n), False]) for n in range(head - 6, head + 1)]
    calls += [("eth_getBlockByHash", [r["blockHash"], False]) for r in chain["receipts"][:3]]
    calls += [("eth_getBalance", [a, "latest"]) for a in DEV_ACCOUNTS + IDLE_ACCOUNTS]
    calls += [("eth_getTransactionCount", [a, "latest"]) for a in DEV_ACCOUNTS]
    calls += [("eth_getTransactionReceipt", [h]) for h in chain["txs"]]
    calls += [("eth_getTransactionByHash", [h]) for h in chain["txs"][:3]]
    calls += [
        ("eth_call", [{"to": chain["echo"], "data": common.word(n)}, "latest"]) for n in range(4)
    ]
    calls += [("eth_getCode", [chain[c], "latest"]) for c in ("echo", "emitter")]
    return calls


def run_wrk(url: str, script: Path, seconds: float) -> Run:
    proc = subprocess.Popen(
        wrk.command(url + "/", script, seconds),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    killer = threading.Timer(seconds + 30, lambda: os.kill(proc.pid, signal.SIGKILL))
    killer.start()
    try:
        out, _ = proc.communicate()
    finally:
        killer.cancel()
    text = out.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    got = wrk.parse(text)
    return Run(got.rps, got.p50_ms, got.p99_ms, got.errors)


def check_answers(relay: RelayProc, anvil_url: str, calls: list[Any]) -> None:
    r, a = common.RpcClient(relay.url), common.RpcClient(anvil_url)
    try:
        for method, params in calls:
            got, want = r.call(method, params), a.call(method, params)
            if got != want:
                raise RuntimeError(f"{relay.setup.name} {method}{params}: {got!r} != {want!r}")
    finally:
        r.close()
        a.close()


# --- main --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--runs", type=int, default=3, help="runs per setup (>= 3 for the table)")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {OUT.name}")
    args = ap.parse_args(argv)
    common.budget(int(90 + len(SETUPS) * (args.runs + 1) * (args.duration + 4)))
    m = common.machine()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        anvil = common.start_anvil(block_time=BLOCK_TIME)
        stack.callback(anvil.stop)
        setup_client = common.RpcClient(anvil.url)
        stack.callback(setup_client.close)
        redis = RedisProc(tmp)
        stack.callback(redis.stop)
        relays = [RelayProc(s, anvil.ws_url, redis.url, tmp) for s in SETUPS]
        for r in relays:
            stack.callback(r.stop)
        for r in relays:
            r.wait_ready()
        # Built while the relays watch, so every block of the mix is in their window of
        # canonical hashes (an unfinalized block they never saw is not cacheable).
        chain = build_chain(setup_client)
        for r in relays:
            r.wait_head(chain["head"])
        calls = mix(chain)
        bodies = [common.request_body(meth, params, 0) for meth, params in calls]
        script = tmp / "mix.lua"
        wrk.lua_script(bodies, script, string_ids=False)
        for r in relays:
            check_answers(r, anvil.url, calls)
            run_wrk(r.url, script, 2)  # warm every worker; not measured
        before = {r.setup.name: r.outcomes() for r in relays}
        runs: dict[str, list[Run]] = {s.name: [] for s in SETUPS}
        for i in range(args.runs):
            for r in relays:
                run = run_wrk(r.url, script, args.duration)
                runs[r.setup.name].append(run)
                print(
                    f"run {i + 1} {r.setup.name:10s} {run.rps:9.0f} req/s  "
                    f"p50 {run.p50_ms:.2f} ms  p99 {run.p99_ms:.2f} ms  errors {run.errors}",
                    flush=True,
                )
        after = {r.setup.name: r.outcomes() for r in relays}
    report = render(m, args, runs, before, after, len(bodies))
    print("\n" + report)
    if not args.no_write:
        OUT.write_text(report)
        print(f"wrote {OUT}")
    return 0


def render(
    m: dict[str, str],
    args: argparse.Namespace,
    runs: dict[str, list[Run]],
    before: dict[str, dict[str, float]],
    after: dict[str, dict[str, float]],
    n_bodies: int,
) -> str:
    med = {name: common.median([r.rps for r in rs]) for name, rs in runs.items()}
    rows = []
    for s in SETUPS:
        rs = runs[s.name]
        d = {o: after[s.name][o] - before[s.name][o] for o in after[s.name]}
        total = sum(d.values()) or 1.0
        where = ", ".join(f"{o} {100 * v / total:.1f}%" for o, v in d.items() if v)
        memory = "default" if s.memory_bytes is None else f"{s.memory_bytes:,} B"
        rows.append(
            [
                s.name,
                s.backend,
                str(s.workers),
                memory,
                f"**{med[s.name]:,.0f}**",
                " / ".join(f"{r.rps:,.0f}" for r in rs),
                f"{common.median([r.p50_ms for r in rs]):.2f}",
                f"{common.median([r.p99_ms for r in rs]):.2f}",
                str(sum(r.errors for r in rs)),
                where,
            ]
        )

    def ratio(a: str, b: str) -> str:
        return f"**{med[a] / med[b]:.2f}x**"

    lines = [
        "# Scale-out (`scale_out.py`)",
        "",
        common.machine_line(m),
        "",
        f"wrk {wrk.THREADS} threads, {wrk.CONNECTIONS} keep-alive connections, "
        f"{args.duration:g} s per run, {args.runs} runs per setup, the setups in turn. "
        f"Mix: {n_bodies} cacheable bodies (blocks by number and hash, balances, nonces, "
        f"receipts, transactions, eth_call, eth_getCode), each under {wrk.IDS_PER_BODY} ids; "
        f"anvil mines one block an hour, so nothing moves while measuring. Redis: one local "
        f"redis-server, maxmemory {REDIS_MAXMEMORY}, allkeys-lru.",
        "",
        common.table(
            [
                "setup",
                "backend",
                "workers",
                "memory tier",
                "req/s (median)",
                "req/s (runs)",
                "p50 ms",
                "p99 ms",
                "errors",
                "answered from (measured runs)",
            ],
            rows,
        ),
        "",
        f"- `--workers 2` / 1, memory hits: {ratio('memory, 2 workers', 'memory, 1 worker')}",
        f"- `--workers 2` / 1, Redis hits: {ratio('redis, 2 workers', 'redis, 1 worker')}",
        f"- Redis hit / memory hit, one worker: {ratio('redis, 1 worker', 'memory, 1 worker')}",
        f"- Redis hit / memory hit, two workers: {ratio('redis, 2 workers', 'memory, 2 workers')}",
        f"- The machine has {m['nproc']} CPUs, shared by wrk (two threads), the workers, "
        "redis-server and whatever else runs on it; a second worker can only use what wrk "
        "and the first worker leave.",
        "- A memory hit is answered synchronously in the HTTP callback; a Redis hit goes "
        "through the asynchronous miss path (a task, a Redis lookup sent in one MGET with "
        "the other lookups of the same event-loop turn, the answer copied into the memory "
        "tier and evicted again by the next calls of the mix).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
