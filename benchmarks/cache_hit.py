"""Cache-hit throughput: one relay process under wrk, side by side with anvil itself.

wrk (keep-alive, 32 connections, 2 threads) replays a rotating mix of cacheable calls
(blocks by number and hash, balances and nonces at "latest", receipts and transactions of
real transactions, eth_call, eth_getCode, eth_getLogs, eth_chainId, eth_blockNumber), each
body under several ids, against the relay (cache warmed, every call checked to be a hit),
anvil directly and ``floor_server.py`` (the relay's transport stack with no relay work),
in turn, several runs each. With ``--against COMMIT`` a relay of that older commit (the
same config, run from that commit's own tree: ``common.checkout``) takes its turn beside
them, so two commits compare side by side in one run.

Rate limits take their turn too: the same relay with every call paying its client's token
bucket in the process (``limited``) and with the buckets shared through a redis-server
(``redis``, leased in slices), each against the relay with limits off: the goals are
≥ 0.9x and ≥ 0.5x of its req/s. The buckets are deep enough never to refuse (a refusal
is cheaper than a hit): what is measured is the check every call pays.

anvil mines only when a transaction arrives and none is sent while measuring, so "latest"
does not move. The relay is told its head stays fresh that long (``head.fresh_blocks``):
on a live chain new heads keep it fresh, and eth_blockNumber/eth_chainId are answered
locally only while it is.

    python -m benchmarks.cache_hit [--duration 10] [--runs 3] [--profile] [--against COMMIT]
                                   [--no-limits]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks import common, wrk
from chainrelay.devnet import DEV_ACCOUNTS, transfer_emitter_initcode

GOAL_RPS = 45_000
TARGETS = {
    "relay": "relay (cache hits)",
    "limited": "relay, rate limits on (buckets in process)",
    "tiered": "relay, limits off, Redis cache tier on",
    "redis": "relay, rate limits on (buckets shared through Redis)",
    "keyed": "relay, API key and rate limits on (each request named by its key)",
    "anvil": "anvil direct",
    "floor": "floor: uvloop + httptools, same answers, no relay work",
}
# Accounts that never sent anything: balances "0x0" are still non-empty answers.
IDLE_ACCOUNTS = ["0x" + f"{0xB0B + i:040x}" for i in range(3)]
# Functions in the py-spy table.
PROFILE_ROWS = 18
# The relay must believe its head is fresh for the whole run (see the module docstring).
RELAY_TOML = "[head]\nfresh_blocks = 1000000.0\n"
# Rate limits on for every client (wrk's connections are one identity, 127.0.0.1), never
# refusing at wrk's rate: a million calls a second. The burst sets the shared buckets'
# slice (a 20th of it: 500 calls a Redis round trip, ~80 round trips a second at 40,000
# req/s).
LIMITS_TOML = "[tiers.default]\nrate = 1000000.0\nburst = 10000.0\n"
# Goals: the check a call pays costs little next to a hit (≤ 2 µs of ~20).
GOAL_LIMITED = 0.9
GOAL_SHARED = 0.5
# The API key the "keyed" target's requests carry (X-Api-Key): each request is named by
# its key, found in its head, and pays that key's bucket.
BENCH_KEY = "bench-" + "k" * 26
KEYS_TOML = f'[[auth.keys]]\nname = "bench"\nkey = "{BENCH_KEY}"\n'
# The relay targets with limits, by name, and what their config adds to RELAY_TOML (given
# the Redis URL).
# "tiered" (the Redis cache tier, limits off) is what "redis" is measured against too:
# shared buckets come with a Redis tier.
LIMITED: dict[str, Callable[[str], str]] = {
    "limited": lambda _redis: LIMITS_TOML,
    "tiered": lambda redis: f'[cache]\nbackend = "tiered"\nredis_url = "{redis}"\n',
    "redis": lambda redis: LIMITS_TOML + f'[cache]\nbackend = "tiered"\nredis_url = "{redis}"\n',
    "keyed": lambda _redis: LIMITS_TOML + KEYS_TOML,
}


@dataclass
class Run:
    target: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    seconds: float
    cpu: dict[str, float]  # process -> % of one core during the run


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server of its own (no persistence), for the shared buckets; its URL."""
    port = common.free_port()
    proc = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        common.stop_process(proc)


def start_floor(answers: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``floor_server.py`` in its own process, answering; (process, URL)."""
    port = common.free_port()
    url = f"http://127.0.0.1:{port}/"

    def probe() -> None:
        client = common.RpcClient(url.rstrip("/"))
        try:
            client.raw(b"{}")
        finally:
            client.close()

    args = ("--port", str(port), "--answers", str(answers))
    return common.start_server("benchmarks.floor_server", args, probe), url


def build_chain(client: common.RpcClient) -> dict[str, Any]:
    """Contracts and real transactions in their own blocks; returns what the mix names."""
    emitter = common.deploy(client, transfer_emitter_initcode())
    echo = common.deploy(client, common.echo_initcode())
    txs: list[str] = []
    for i in range(8):
        sender = DEV_ACCOUNTS[i % 3]
        to = DEV_ACCOUNTS[(i + 1) % 3]
        if i % 2:
            tx = {"from": sender, "to": to, "value": hex(1000 + i)}
        else:
            data = "0x" + to[2:].lower().rjust(64, "0") + f"{i:064x}"
            tx = {"from": sender, "to": emitter, "data": data, "gas": "0x20000"}
        txs.append(client.call("eth_sendTransaction", [tx]))
    receipts = [common.wait_receipt(client, h) for h in txs]
    client.call("anvil_mine", ["0x3"])
    head = int(client.call("eth_blockNumber", []), 16)
    return {
        "emitter": emitter,
        "echo": echo,
        "txs": txs,
        "blocks": [r["blockHash"] for r in receipts],
        "head": head,
        "first_tx_block": int(receipts[0]["blockNumber"], 16),
    }


def mix(chain: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    head = chain["head"]
    calls: list[tuple[str, list[Any]]] = [("eth_chainId", []), ("eth_blockNumber", [])]
    calls += [("eth_getBlockByNumber", [hex(n), False]) for n in range(head - 5, head + 1)]
    calls += [("eth_getBlockByNumber", [hex(head - 2), True])]
    calls += [("eth_getBlockByHash", [h, False]) for h in chain["blocks"][:2]]
    for acct in DEV_ACCOUNTS + IDLE_ACCOUNTS:
        calls.append(("eth_getBalance", [acct, "latest"]))
    calls += [("eth_getTransactionCount", [a, "latest"]) for a in DEV_ACCOUNTS]
    calls += [("eth_getTransactionReceipt", [h]) for h in chain["txs"][:6]]
    calls += [("eth_getTransactionByHash", [h]) for h in chain["txs"][6:]]
    calls += [
        ("eth_call", [{"to": chain["echo"], "data": common.word(n)}, "latest"]) for n in (1, 2, 3)
    ]
    calls += [("eth_getCode", [chain[c], "latest"]) for c in ("echo", "emitter")]
    lo, hi = chain["first_tx_block"], chain["head"]
    calls.append(
        ("eth_getLogs", [{"fromBlock": hex(lo), "toBlock": hex(hi), "address": chain["emitter"]}])
    )
    return calls


def run_wrk(
    url: str, script: Path, seconds: float, watch: dict[str, int]
) -> tuple[str, dict[str, float], float, float]:
    """Run wrk to completion; its output, CPU seconds per process, and wall seconds.

    ``watch`` names other processes whose CPU time is measured over the same interval.
    """
    cmd = wrk.command(url, script, seconds)
    before = {name: common.cpu_seconds(pid) for name, pid in watch.items()}
    sys_before = {name: common.cpu_times(pid)[1] for name, pid in watch.items()}
    machine_before = common.busy_cpu_seconds()
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killer = threading.Timer(seconds + 30, lambda: os.kill(proc.pid, signal.SIGKILL))
    killer.start()
    try:
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        # wait4 gives wrk's own CPU time, which /proc no longer has once it has exited.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        killer.cancel()
        if proc.returncode is None:
            common.stop_process(proc)
        elif proc.stdout is not None:
            proc.stdout.close()
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
    cpu = {name: common.cpu_seconds(pid) - before[name] for name, pid in watch.items()}
    for name, pid in watch.items():
        cpu[name + " sys"] = common.cpu_times(pid)[1] - sys_before[name]
    cpu["wrk"] = usage.ru_utime + usage.ru_stime
    # Whatever else ran on the machine meanwhile (other users of a shared machine, this script).
    ours = sum(v for k, v in cpu.items() if not k.endswith(" sys"))
    cpu["other"] = max(0.0, common.busy_cpu_seconds() - machine_before - ours)
    return out, cpu, wall, seconds


def parse_wrk(target: str, out: str, cpu: dict[str, float], wall: float) -> Run:
    got = wrk.parse(out)
    return Run(
        target,
        got.rps,
        got.p50_ms,
        got.p99_ms,
        got.requests,
        got.errors,
        wall,
        {k: 100.0 * v / wall for k, v in cpu.items()},
    )


def wait_upstream_quiet(relay: common.Relay, timeout: float = 30.0) -> None:
    """Return once the relay made no upstream call over half a second (by ``timeout``)."""
    deadline = time.monotonic() + timeout
    last = common.metric(relay.metrics(), "chainrelay_upstream_calls_total")
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = common.metric(relay.metrics(), "chainrelay_upstream_calls_total")
        if now == last:
            return
        last = now
    raise RuntimeError(f"the relay kept calling its upstream for {timeout:g}s")


def check_hits(relay: common.Relay, bodies: list[bytes], calls: list[Any]) -> None:
    """Every body of the mix is answered from the relay's cache (or locally): no upstream call."""
    client = common.RpcClient(relay.url)
    try:
        for body in bodies:  # warm: misses fill the cache
            client.raw(body)
        # Their misses may have the node fill blocks behind them (the recent window's
        # receipts): the check starts once its upstream calls have stopped.
        wait_upstream_quiet(relay)
        before = relay.metrics()
        missing = []
        for body, call in zip(bodies, calls, strict=True):
            up0 = common.metric(relay.metrics(), "chainrelay_upstream_calls_total")
            client.raw(body)
            up1 = common.metric(relay.metrics(), "chainrelay_upstream_calls_total")
            if up1 != up0:
                missing.append(call)
        after = relay.metrics()
    finally:
        client.close()
    served = sum(
        common.metric(after, "chainrelay_requests_total", outcome=o)
        - common.metric(before, "chainrelay_requests_total", outcome=o)
        for o in ("hit", "local")
    )
    if missing or served < len(bodies):
        raise RuntimeError(
            f"the mix is not all cache hits: {served:.0f}/{len(bodies)} hit or local; "
            f"went upstream: {missing}"
        )


def check_same_answers(relay_url: str, anvil_url: str, bodies: list[bytes]) -> list[bytes]:
    """The relay answers every call of the mix exactly like anvil (the id aside); returns
    the relay's answers."""
    r, a = common.RpcClient(relay_url), common.RpcClient(anvil_url)
    answers = []
    try:
        for body in bodies:
            got, want = r.raw(body), a.raw(body)
            doc = orjson.loads(got)
            if doc != orjson.loads(want) or "error" in doc:
                raise RuntimeError(f"{body!r}: relay {got[:300]!r} != anvil {want[:300]!r}")
            answers.append(got)
    finally:
        r.close()
        a.close()
    return answers


def in_process(upstream: str, bodies: list[bytes], tmp: Path) -> str:
    """``hot_path.py`` in its own process (it runs a node in-process): the relay's own work
    per cache hit, without sockets."""
    path = tmp / "bodies.jsonl"
    path.write_bytes(b"\n".join(bodies) + b"\n")
    args = ("--upstream", upstream, "--bodies", str(path))
    proc = common.spawn(
        "benchmarks.hot_path", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        common.stop_process(proc)
        return "- in-process measurement unavailable: hot_path.py timed out"
    if proc.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        return f"- in-process measurement unavailable: {last[0]}"
    r = orjson.loads(out)
    return (
        f"- in process, no sockets (`hot_path.py`: a node's HTTP protocol object fed wrk's "
        f"requests): **{r['total_us']:.1f} µs** of CPU per cache hit, replays included (a "
        "request seen before at this head, its id aside, answered from the record of its "
        f"first hit); **{r['full_us']:.1f} µs** with replays off (the head checked by "
        f"`_plain_post`, then `RpcService.handle`, of which {r['rpc_us']:.1f} µs); "
        f"{r['used']} of the {len(bodies)} bodies (the others name blocks older than that "
        "node's first head, which it does not cache by number)"
    )


def profile(relay: common.Relay, url: str, script: Path, seconds: float) -> str:
    """Where the relay's CPU goes under the same load: py-spy's top functions by self time."""
    py_spy = common.py_spy()
    if not Path(py_spy).exists():
        return "py-spy not installed (pip install py-spy)"
    assert relay.proc is not None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        spy = subprocess.Popen(
            [
                *(py_spy, "record", "--pid", str(relay.proc.pid), "--rate", "250"),
                *("--nonblocking", "--duration", f"{int(seconds)}"),
                *("--format", "raw", "--output", str(raw)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            run_wrk(url, script, seconds, {})
            spy.wait(seconds + 30)
        finally:
            common.stop_process(spy)
        if not raw.exists():
            return "py-spy recorded nothing (ptrace not permitted?)"
        total, rows = common.profile_rows(raw.read_text(), PROFILE_ROWS)
    if not total:
        return "py-spy recorded no samples"
    lines = [
        f"py-spy, {total} samples of the relay under wrk (self time / total time). Time in C "
        "(uvloop, system calls) is charged to the Python frame that called it: "
        "`data_received` (where replays are written) and `_write_ok` are mostly "
        "`transport.write`, the send system call; "
        "`Runner.run` is the event loop itself (epoll, reads).",
        "",
    ]
    lines.append(common.table(["function", "self", "total"], rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    ap.add_argument("--runs", type=int, default=3, help="runs per target (>= 3 for the table)")
    ap.add_argument("--profile", action="store_true", help="also sample the relay with py-spy")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--against", metavar="COMMIT", help="also a relay of this older commit")
    ap.add_argument("--no-limits", action="store_true", help="without the rate-limit targets")
    args = ap.parse_args(argv)
    labels = dict(TARGETS)
    if args.no_limits:
        for name in LIMITED:
            del labels[name]
    if args.against:
        labels["base"] = f"relay at {common.commit_name(args.against)} (cache hits)"
    rounds = len(labels) * (args.runs + 1)
    common.budget(
        int(40 + 30 * (not args.no_limits) + rounds * (args.duration + 3) + 30 * args.profile)
    )
    m = common.machine()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        anvil = common.start_anvil(block_time=None)
        stack.callback(anvil.stop)
        setup = common.RpcClient(anvil.url)
        stack.callback(setup.close)
        relay = common.Relay(anvil.ws_url, RELAY_TOML)
        stack.callback(relay.stop)
        relay.start(poke=lambda: setup.call("anvil_mine", ["0x1"]))
        limited: dict[str, common.Relay] = {}
        if not args.no_limits:
            redis_url = stack.enter_context(redis_server())
            for name, toml in LIMITED.items():
                limited[name] = common.Relay(anvil.ws_url, RELAY_TOML + toml(redis_url))
                stack.callback(limited[name].stop)
                limited[name].start(poke=lambda: setup.call("anvil_mine", ["0x1"]))
        base = None
        if args.against:  # started before the chain is built: its start may mine a block
            root = stack.enter_context(common.checkout(args.against))
            base = common.Relay(anvil.ws_url, RELAY_TOML, root=root)
            stack.callback(base.stop)
            base.start(poke=lambda: setup.call("anvil_mine", ["0x1"]))
        chain = build_chain(setup)
        relay.wait_head(chain["head"])
        calls = mix(chain)
        bodies = [common.request_body(meth, params, 0) for meth, params in calls]
        answers = check_same_answers(relay.url, anvil.url, bodies)
        answers_path = Path(tmp) / "answers.jsonl"
        answers_path.write_bytes(b"\n".join(answers) + b"\n")
        check_hits(relay, bodies, calls)
        script = Path(tmp) / "mix.lua"
        wrk.lua_script(bodies, script, string_ids=True)
        keyed_script = Path(tmp) / "keyed.lua"
        wrk.lua_script(bodies, keyed_script, string_ids=True, headers={"X-Api-Key": BENCH_KEY})
        scripts = {"keyed": keyed_script}
        assert relay.proc is not None and anvil.proc is not None
        floor = start_floor(answers_path)
        stack.callback(common.stop_process, floor[0])
        watch = {"relay": relay.proc.pid}
        targets = {"relay": relay.url + "/"}
        for name, node in limited.items():
            node.wait_head(chain["head"])
            check_same_answers(node.url, anvil.url, bodies)
            check_hits(node, bodies, calls)
            assert node.proc is not None
            watch[name] = node.proc.pid
            targets[name] = node.url + "/"
        watch |= {"anvil": anvil.proc.pid, "floor": floor[0].pid}
        targets |= {"anvil": anvil.url + "/", "floor": floor[1]}
        if base is not None:
            base.wait_head(chain["head"])
            check_same_answers(base.url, anvil.url, bodies)
            check_hits(base, bodies, calls)
            assert base.proc is not None
            watch["base"] = base.proc.pid
            targets["base"] = base.url + "/"
        for url in targets.values():  # connections, allocator, caches: warm, not measured
            run_wrk(url, script, 2, watch)  # (the keyed one: anonymous calls, served too)
        runs: list[Run] = []
        up0 = common.metric(relay.metrics(), "chainrelay_upstream_calls_total")
        m0 = relay.metrics()
        for i in range(args.runs):
            for name, url in targets.items():
                out, cpu, wall, _ = run_wrk(url, scripts.get(name, script), args.duration, watch)
                run = parse_wrk(name, out, cpu, wall)
                runs.append(run)
                print(
                    f"run {i + 1} {name:5s}: {run.rps:9.0f} req/s  p50 {run.p50_ms:.2f} ms  "
                    f"p99 {run.p99_ms:.2f} ms  errors {run.errors}  cpu "
                    + " ".join(
                        f"{k} {run.cpu[k]:.0f}%" for k in (name, name + " sys", "wrk", "other")
                    ),
                    flush=True,
                )
        m1 = relay.metrics()
        up1 = common.metric(m1, "chainrelay_upstream_calls_total")
        served = {
            o: common.metric(m1, "chainrelay_requests_total", outcome=o)
            - common.metric(m0, "chainrelay_requests_total", outcome=o)
            for o in ("hit", "local", "miss", "pass", "error")
        }
        prof = (
            profile(relay, targets["relay"], script, min(8.0, args.duration))
            if args.profile
            else ""
        )
        inproc = in_process(anvil.ws_url, bodies, Path(tmp))
    text = report(m, labels, runs, calls, served, up1 - up0, args) + "\n" + inproc
    if prof:
        text += "\n\n" + prof
    print(text)
    if not args.no_write:
        common.write_section("cache_hit", text)
    return 0


def _us_per_request(r: Run) -> float:
    """CPU time the process under test spent per answered request: steadier than req/s on
    a shared machine, since it does not count time spent waiting for a CPU."""
    return r.cpu[r.target] / 100.0 * r.seconds / r.requests * 1e6


def _cpu_cell(rs: list[Run], key: str, target: str) -> str:
    text = f"{key} {common.median([r.cpu[key] for r in rs]):.0f}%"
    if key == target:
        text += f" (system {common.median([r.cpu[key + ' sys'] for r in rs]):.0f}%)"
    return text


def report(
    m: dict[str, str],
    labels: dict[str, str],
    runs: list[Run],
    calls: list[Any],
    served: dict[str, float],
    upstream_calls: float,
    args: argparse.Namespace,
) -> str:
    by = {t: [r for r in runs if r.target == t] for t in labels}
    med = {t: common.median([r.rps for r in rs]) for t, rs in by.items()}
    rows = []
    for t, rs in by.items():
        cpu_keys = [t, "wrk", "other"]
        rows.append(
            [
                labels[t],
                f"**{med[t]:,.0f}**",
                " / ".join(f"{r.rps:,.0f}" for r in rs),
                f"{common.median([r.p50_ms for r in rs]):.2f}",
                f"{common.median([r.p99_ms for r in rs]):.2f}",
                str(sum(r.errors for r in rs)),
                " · ".join(_cpu_cell(rs, k, t) for k in cpu_keys),
                f"{common.median([_us_per_request(r) for r in rs]):.1f}",
            ]
        )
    total = sum(served.values())
    hit_share = (served["hit"] + served["local"]) / total if total else 0.0
    ratio = med["relay"] / med["anvil"] if med["anvil"] else float("nan")
    us_relay = common.median([_us_per_request(r) for r in by["relay"]])
    us_floor = common.median([_us_per_request(r) for r in by["floor"]])
    budget_us = 1e6 / GOAL_RPS
    relay_cpu = common.median([r.cpu["relay"] for r in by["relay"]])
    other_cpu = common.median([r.cpu["other"] for r in by["relay"]])
    verdict = "met" if med["relay"] >= GOAL_RPS else "not met"
    methods = collections.Counter(meth for meth, _ in calls)
    mix_text = ", ".join(f"{meth} x{n}" for meth, n in methods.items())
    against = []
    if "base" in by:
        us_base = common.median([_us_per_request(r) for r in by["base"]])
        against.append(
            f"- relay / {labels['base'].removesuffix(' (cache hits)')}: "
            f"**{med['relay'] / med['base']:.2f}x** req/s; CPU µs per request "
            f"{us_relay:.1f} against {us_base:.1f}"
        )
    return "\n".join(
        [
            "## Cache-hit throughput (`cache_hit.py`)",
            "",
            common.machine_line(m),
            "",
            f"wrk {wrk.THREADS} threads, {wrk.CONNECTIONS} keep-alive connections, "
            f"{args.duration:g} s per run, {args.runs} runs per target, the targets in "
            "turn. "
            f"Mix: {len(calls)} bodies ({mix_text}), each under {wrk.IDS_PER_BODY} ids.",
            "",
            common.table(
                [
                    "target",
                    "req/s (median)",
                    "req/s (runs)",
                    "p50 ms",
                    "p99 ms",
                    "errors",
                    "CPU, % of one core (median)",
                    "CPU µs per request",
                ],
                rows,
            ),
            "",
            f"- relay / anvil: **{ratio:.2f}x**; relay / floor: "
            f"**{med['relay'] / med['floor']:.2f}x** (the floor is the same transport stack "
            "sending the same answers: what the relay would reach if its own work were free)",
            f"- goal ≥ {GOAL_RPS:,} req/s on the relay: **{verdict}** "
            f"({med['relay'] / GOAL_RPS:.0%} of goal); one core at 100% reaches it only at "
            f"≤ {1e6 / GOAL_RPS:.1f} CPU µs per request, the relay used "
            f"{us_relay:.1f}; the transport alone (floor) costs {us_floor:.1f}, so the relay's "
            f"own work is {us_relay - us_floor:.1f} µs per request against a budget of "
            f"{budget_us - us_floor:.1f}",
            f"- CPU bound: the relay got a median {relay_cpu:.0f}% of one core while other "
            f"processes used {other_cpu:.0f}%; at {us_relay:.1f} µs per request a whole core "
            f"answers {1e6 / us_relay:,.0f} req/s (the floor's {us_floor:.1f} µs: "
            f"{1e6 / us_floor:,.0f})",
            f"- relay answers during the measured runs: {hit_share:.2%} hits or local "
            f"({served['hit']:,.0f} hit, {served['local']:,.0f} local, "
            f"{served['miss'] + served['pass']:,.0f} miss/pass, {served['error']:,.0f} error); "
            f"upstream calls: {upstream_calls:,.0f}",
            f"- wrk and the process under test share {m['nproc']} CPUs; CPU is each "
            "process's user+system time over the run's wall time (100% = one core); "
            "*other* is everything else the machine ran meanwhile.",
            *against,
            *_limits_lines(med, by),
        ]
    )


def _limits_lines(med: dict[str, float], by: dict[str, list[Run]]) -> list[str]:
    """The rate-limit targets against the relay with limits off."""
    lines = []
    us_relay = common.median([_us_per_request(r) for r in by["relay"]])
    for name, goal in (("limited", GOAL_LIMITED), ("keyed", GOAL_LIMITED), ("redis", GOAL_SHARED)):
        if name not in by:
            continue
        ratio = med[name] / med["relay"] if med["relay"] else float("nan")
        us = common.median([_us_per_request(r) for r in by[name]])
        verdict = "met" if ratio >= goal else "not met"
        lines.append(
            f"- {TARGETS[name]} / limits off: **{ratio:.2f}x** req/s (goal ≥ {goal}x: "
            f"**{verdict}**); CPU µs per request {us:.1f} against {us_relay:.1f} "
            f"({us - us_relay:+.1f})"
        )
    if "tiered" in by and "redis" in by:
        us_tiered = common.median([_us_per_request(r) for r in by["tiered"]])
        us_shared = common.median([_us_per_request(r) for r in by["redis"]])
        lines.append(
            f"- shared buckets / the Redis cache tier alone (limits off): "
            f"**{med['redis'] / med['tiered']:.2f}x** req/s; CPU µs per request "
            f"{us_shared:.1f} against {us_tiered:.1f} ({us_shared - us_tiered:+.1f})"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
