"""What every benchmark script shares: processes, a small JSON-RPC client, statistics and
the RESULTS.md writer.

Every script in this folder runs from the repository root as a module of the
``benchmarks`` package, ``python -m benchmarks.NAME``, so it imports this clone's
``chainrelay`` and ``tests.lab`` whatever is installed; the processes a script starts
(``spawn``, ``Relay``) run the same way, from the same root.

Each script starts every process it uses (anvil, relays, wrk) and stops each one by PID,
also when it is interrupted or runs past its time budget (``budget``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import http.client
import io
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from chainrelay.devnet import DEV_ACCOUNTS, Anvil, free_port
from tests.lab.chain import metric as metric  # for the scripts: one harness module
from tests.lab.procs import parse_metrics, stop_all

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
# Scripts run in this order in run_all.py and their sections appear in this order.
SECTIONS = (
    "cache_hit",
    "miss_overhead",
    "upstream_ratio",
    "dapp_burst",
    "logs_windows",
    "intake_lag",
    "subscribers",
    "tree_bytes",
    "tree_hop",
    "tree_e2e",
    "batch_ack",
    "batch_e2e",
    "abuse",
    "nitro_feed",
)
# Sections of a script run with options, each right after the script's own section (and
# run by run_all.py after the script itself): section -> (script, options).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "upstream_ratio_scans": ("upstream_ratio", ("--mix", "scans")),
    "upstream_ratio_routing": ("upstream_ratio", ("--routing",)),
    "intake_lag_pinned": ("intake_lag", ("--pin",)),
}
# How long a relay may take to answer /health after it is started.
RELAY_READY_SECONDS = 20.0


# --- time budget and signals -------------------------------------------------------------
def _exit_on(signum: int, _frame: FrameType | None) -> None:
    # SystemExit, not an Exception: asyncio re-raises it instead of logging it, so every
    # ``finally`` that stops a process runs.
    raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")


def _out_of_time(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit("time budget exceeded")


def budget(seconds: int) -> None:
    """Bound the whole script: SIGALRM after ``seconds``; SIGTERM also unwinds cleanly."""
    signal.signal(signal.SIGTERM, _exit_on)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(seconds)


# --- the machine -------------------------------------------------------------------------
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def loopback_round_trip_us(n: int = 20_000) -> float:
    """Kernel cost of one request/response pair over loopback TCP (two sends, two
    receives, one thread, no waiting): how dear networking syscalls are on this machine."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    msg = b"x" * 300
    try:
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        for _ in range(n):
            a.send(msg)
            b.recv(4096)
            b.send(msg)
            a.recv(4096)
        return (time.perf_counter() - started) / n * 1e6
    finally:
        for s in (a, b, srv):
            s.close()


def machine() -> dict[str, str]:
    """What the numbers were measured on; printed with every result."""
    dirty = _git("status", "--porcelain", "--", "chainrelay")
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "commit": commit + (" + uncommitted changes in chainrelay/" if dirty else ""),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "rtt": f"{loopback_round_trip_us():.1f}",
    }


def machine_line(m: dict[str, str]) -> str:
    return (
        f"{m['date']} · {m['nproc']} CPUs ({m['cpu']}) · Python {m['python']} · "
        f"commit {m['commit']} · load average at start {m['load']} · loopback TCP "
        f"request/response pair {m['rtt']} µs of syscalls"
    )


# --- statistics --------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


# --- processes ---------------------------------------------------------------------------
def pin(pid: int, cpus: set[int]) -> None:
    """Run every thread of process ``pid`` on ``cpus`` only (threads it starts later
    inherit it). For a lag measured apart from the load generator: on a machine of few
    CPUs, anvil mining full blocks takes all of them, and a process that shares them is
    woken late whatever it runs."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(task.name), cpus)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process, all its threads."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (all its threads), in seconds."""
    return sum(cpu_times(pid))


def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine (every CPU, not idle or iowait), in seconds."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]
    # guest time is already counted in user time
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; by PID, and only this one process."""
    stop_all([proc], grace)


def spawn(module: str, *args: str, **popen_kw: Any) -> subprocess.Popen[bytes]:
    """Start a helper (a floor, a proxy, a load generator: ``benchmarks.floor_server``,
    ``tests.lab.counting_proxy``) in its own process, run as every script is, from the
    repository root; the caller stops it (``stop_process``)."""
    popen_kw.setdefault("cwd", ROOT)
    return subprocess.Popen([sys.executable, "-m", module, *args], **popen_kw)


def start_server(
    module: str, args: Sequence[str], probe: Callable[[], object]
) -> subprocess.Popen[bytes]:
    """``spawn`` a helper that serves, and return once ``probe()`` stops raising OSError
    (it answers); a helper that exits or is not answering after 15 s is stopped."""
    proc = spawn(module, *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            probe()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"{module} did not start") from None
            time.sleep(0.05)


def start_counter(node: Anvil) -> tuple[subprocess.Popen[bytes], str]:
    """``tests.lab.counting_proxy`` in front of ``node``: every call a relay sends through
    it, over HTTP or WebSocket, is counted per method at ``URL/counts``; (process, URL)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ("--upstream", node.url, "--port", str(port))
    return start_server("tests.lab.counting_proxy", args, lambda: http_get(url + "/counts")), url


@contextlib.contextmanager
def checkout(commit: str) -> Iterator[Path]:
    """The ``chainrelay`` package of ``commit`` in a temporary folder, for ``Relay(root=...)``.

    A relay of another commit runs from its own tree, so it imports that commit's modules
    whatever their layout, and nothing of this one; the harness (clients, floors, sources)
    stays this clone's. ``git archive``, not a worktree: nothing is left in the repository.
    """
    tar = subprocess.run(
        ["git", "archive", "--format=tar", commit, "chainrelay"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if tar.returncode != 0:
        raise RuntimeError(f"git archive {commit}: {tar.stderr.decode(errors='replace')}")
    with tempfile.TemporaryDirectory(prefix="chainrelay-bench-commit-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
            archive.extractall(tmp, filter="data")
        yield Path(tmp)


def commit_name(commit: str) -> str:
    """``commit`` as a short hash, for tables and target names."""
    return _git("rev-parse", "--short", commit) or commit


def start_anvil(
    *, block_time: float | None, chain_id: int = 56, extra: Sequence[str] = ()
) -> Anvil:
    """A ready anvil node (``extra``: more anvil arguments); the caller stops it
    (``anvil.stop()``)."""
    node = Anvil(chain_id=chain_id, block_time=block_time, extra=list(extra))
    node.start()
    try:
        asyncio.run(node.wait_ready(20.0))
    except BaseException:
        node.stop()
        raise
    return node


@dataclass
class Relay:
    """A relay node in its own process: ``python -m chainrelay serve``.

    Started from the command line (``--upstream URL --listen H:P``) unless ``toml`` is
    given, in which case those lines are added to a generated config file. ``root`` is the
    tree whose ``chainrelay`` it runs: this clone, or an older commit's (``checkout``),
    for a side-by-side comparison with the commit under test.
    """

    upstream: str
    toml: str = ""
    root: Path = ROOT
    # More lines of the ``[[upstreams]]`` entry (with ``toml`` only).
    upstream_toml: str = ""
    port: int = field(default_factory=free_port)
    # The module run with ``python -m``: the relay's own, or a launcher that runs it
    # (``benchmarks.lag_probe``); ``env``: more environment variables for the process.
    module: str = "chainrelay"
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def _no_admin_line(self) -> str:
        """The config line that turns the admin listener off where ``root``'s node has one
        on by default (its /metrics is read on the public port, and relays run side by
        side); nothing for an older commit's (off by default, or no such key or flag)."""
        defaults = (self.root / "chainrelay" / "defaults.py").read_text()
        return 'admin_listen = ""\n' if "PUBLIC_METRICS" in defaults else ""

    def start(self, poke: Callable[[], object] | None = None) -> None:
        """Start the process and wait until /health says ok.

        ``poke`` is called about twice a second meanwhile: a relay following a WebSocket
        upstream learns its first head from the next block, so a chain that mines only on
        demand needs one mined (see RESULTS.md).
        """
        listen = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", self.module, "--log-level", "WARNING", "serve"]
        if self.toml:
            self._tmp = tempfile.TemporaryDirectory(prefix="chainrelay-bench-")
            path = Path(self._tmp.name) / "relay.toml"
            path.write_text(
                f'[server]\nlisten = "{listen}"\n{self._no_admin_line}\n{self.toml}\n\n'
                f'[[upstreams]]\nname = "anvil"\nurl = "{self.upstream}"\n{self.upstream_toml}'
            )
            cmd += ["--config", str(path)]
        else:
            cmd += ["--upstream", self.upstream, "--listen", listen]
            if self._no_admin_line:
                cmd += ["--admin-listen", ""]
        self.log = tempfile.TemporaryFile(prefix="chainrelay-bench-log-")
        # ``-m`` puts the working directory first on sys.path: the process imports
        # ``root``'s chainrelay, never the installed one.
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root, env=env
        )
        self._wait_ready(poke)

    def _wait_ready(self, poke: Callable[[], object] | None) -> None:
        assert self.proc is not None
        wait_healthy(self.proc, self.port, "relay", self.output, poke)

    def wait_head(self, number: int, timeout: float = 10.0) -> None:
        """Wait until the relay's head (its eth_blockNumber) has reached ``number``."""
        client = RpcClient(self.url)
        deadline = time.monotonic() + timeout
        try:
            while int(client.call("eth_blockNumber", []), 16) < number:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay head not at block {number} after {timeout}s")
                time.sleep(0.02)
        finally:
            client.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def metrics(self) -> dict[str, float]:
        """The node's Prometheus samples as {"name{labels}": value}."""
        return parse_metrics(http_get(self.url + "/metrics", 10.0).decode())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._tmp is not None:
            self._tmp.cleanup()
        if hasattr(self, "log"):
            self.log.close()


def wait_healthy(
    proc: subprocess.Popen[bytes],
    port: int,
    what: str,
    output: Callable[[], str],
    poke: Callable[[], object] | None = None,
) -> None:
    """Wait until the node ``proc`` started answers ``GET /health`` on ``port`` with 200;
    fail with its ``output()`` if it exits or is not healthy within ``RELAY_READY_SECONDS``.
    ``poke`` is called about twice a second meanwhile (see ``Relay.start``)."""
    deadline = time.monotonic() + RELAY_READY_SECONDS
    next_poke = time.monotonic() + 0.5
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{output()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        now = time.monotonic()
        if now > deadline:
            raise RuntimeError(f"{what} not healthy after {RELAY_READY_SECONDS}s:\n{output()}")
        if poke is not None and now >= next_poke:
            poke()
            next_poke = now + 0.5
        time.sleep(0.05)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    """GET ``url`` (http://HOST:PORT/path); raises OSError when nothing answers."""
    m = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)?", url)
    if m is None:
        raise ValueError(f"expected http://HOST:PORT/..., got {url}")
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout)
    try:
        conn.request("GET", m.group(3) or "/")
        return conn.getresponse().read()
    except http.client.HTTPException as exc:
        raise OSError(str(exc)) from None
    finally:
        conn.close()


# --- py-spy ------------------------------------------------------------------------------
def py_spy() -> str:
    """The py-spy binary: on PATH, or beside this Python (installed into its venv)."""
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def profile_rows(raw: str, top: int) -> tuple[int, list[list[str]]]:
    """py-spy's raw stacks (``--format raw``: ``frame;frame;... count`` per line) as the
    sample count and table rows: the ``top`` functions by self samples, each with its self
    and total share. Time in C (uvloop, system calls) is charged to the Python frame that
    called it."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        frames_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        n = int(count_text)
        total += n
        frames = [_function(f) for f in frames_text.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    rows = [
        [f"`{name}`", f"{100 * n / total:.1f}%", f"{100 * incl[name] / total:.1f}%"]
        for name, n in own.most_common(top)
    ]
    return total, rows


def _function(frame: str) -> str:
    # "handle (chainrelay/rpc/service.py:100)" -> "service.py:handle"
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if m is None:
        return frame or "(no Python frame)"
    return f"{Path(m.group(2)).name}:{m.group(1)}"


# --- a plain JSON-RPC client -------------------------------------------------------------
class RpcClient:
    """One keep-alive HTTP/1.1 connection; adds little noise to what it measures."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        m = re.fullmatch(r"http://([^:/]+):(\d+)/?", url)
        if m is None:
            raise ValueError(f"expected http://HOST:PORT, got {url}")
        self.conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout)
        self.headers = {"Content-Type": "application/json"}
        self._id = 0

    def raw(self, body: bytes) -> bytes:
        self.conn.request("POST", "/", body, self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return data

    def call(self, method: str, params: list[Any]) -> Any:
        self._id += 1
        doc = orjson.loads(self.raw(request_body(method, params, self._id)))
        if "error" in doc:
            raise RuntimeError(f"{method}{params}: {doc['error']}")
        return doc["result"]

    def close(self) -> None:
        self.conn.close()


def request_body(method: str, params: list[Any], id_: int | str) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": id_, "method": method, "params": params})


def wait_receipt(client: RpcClient, tx_hash: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        receipt = client.call("eth_getTransactionReceipt", [tx_hash])
        if receipt is not None:
            return dict(receipt)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no receipt for {tx_hash} after {timeout}s")
        time.sleep(0.05)


# A contract that returns its first 32 bytes of calldata: eth_call answers are non-empty
# (an empty "0x" answer is cached only for finalized blocks).
# Runtime: mstore(0, calldataload(0)); return(0, 32).
ECHO_RUNTIME = "60003560005260206000f3"


def echo_initcode() -> str:
    size = len(ECHO_RUNTIME) // 2
    return "0x" + f"60{size:02x}80600b6000396000f3" + ECHO_RUNTIME


def deploy(client: RpcClient, initcode: str) -> str:
    tx = client.call(
        "eth_sendTransaction", [{"from": DEV_ACCOUNTS[0], "data": initcode, "gas": "0x30000"}]
    )
    return str(wait_receipt(client, tx)["contractAddress"])


def word(n: int) -> str:
    return "0x" + f"{n:064x}"


# --- RESULTS.md --------------------------------------------------------------------------
HEADER = """# Benchmarks

Measured by the scripts in this folder, each run from the repository root as
`python -m benchmarks.NAME`; `python -m benchmarks.run_all` runs them all (under an hour)
and rewrites this file, and each script refreshes its own section when run alone. The
machines are shared and noisy: each number is a median of several runs made side by side
in one invocation, and comparisons are ratios within that invocation. Each section names
the machine, the commit and the load average when it started; *other* CPU
in `cache_hit` is what the rest of the machine used during the run.

| script | measures | goal |
|---|---|---|
| `cache_hit.py` | cache-hit req/s of one relay process under wrk, vs anvil | ≥ 45,000 req/s |
| `miss_overhead.py` | latency a relay adds to a forwarded call | ≤ 0.15 ms at p50 |
| `upstream_ratio.py` | upstream calls per 1,000 client calls under a dapp-like mix | ≤ 50 |
| `dapp_burst.py` | dapp bursts on a busy chain: relays vs direct | ≤ 0.35/0.45 up/call, p99 ≤ ½ |
| `logs_windows.py` | upstream eth_getLogs, sliding 20-block windows, vs a commit | none set |
| `intake_lag.py` | relay loop lag following 1 MB blocks a second, no client load | p99 ≤ 2 ms |
| `subscribers.py` | 5,000 `newHeads` subscribers: head to the last one; RSS each | ≤ 50 ms, 30 KB |
| `tree_bytes.py` | feed frame bytes per block vs the JSON-RPC answers it replaces | ≤ 0.4x |
| `tree_hop.py` | latency a relay adds, frame in to out, 1,000 children | ≤ 1 ms p50, 5 ms p99 |
| `tree_e2e.py` | delivery through a namespace tree, minus its link delays | per hop |
| `batch_ack.py` | durable-ack latency, acked batches/s of one ingress | ≤ 5 ms p99, ≥ 5,000/s |
| `batch_e2e.py` | sequencer to the last leaf subscriber, minus link delays | none set |
"""


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def write_section(name: str, body: str, *, path: Path = RESULTS) -> None:
    """Replace (or add, in ``SECTIONS`` order) the section ``name`` of RESULTS.md."""
    text = path.read_text() if path.exists() else HEADER
    sections: dict[str, str] = {}
    order = [x for s in SECTIONS for x in (s, *(v for v, (of, _) in VARIANTS.items() if of == s))]
    for s in order:
        begin, end = _markers(s)
        m = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), text, re.S)
        if m is not None:
            sections[s] = m.group(1)
    sections[name] = body.rstrip("\n") + "\n"
    head = text.split("<!-- BEGIN ", 1)[0].rstrip("\n") + "\n"
    parts = [head]
    for s in order:
        if s in sections:
            begin, end = _markers(s)
            parts.append(f"\n{begin}\n{sections[s]}{end}\n")
    path.write_text("".join(parts))


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
