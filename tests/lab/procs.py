"""Start real processes for system tests and stop every one of them, by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from chainrelay.devnet import Anvil, free_port
from tests.lab.timing import SECOND

ROOT = Path(__file__).resolve().parents[2]


class Procs:
    """Every process a test started; ``close()`` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.anvils: list[Anvil] = []

    def spawn(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for anvil in self.anvils:
            anvil.stop()
        stop_all(self.procs, 5 * SECOND)


def stop_all(procs: Sequence[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM every live one of ``procs`` at once, SIGKILL those still running ``grace``
    seconds later, and close their pipes; by PID, and only these processes."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def tcp_owner(local_port: int, remote_port: int, pids: Iterable[int]) -> int | None:
    """Which of ``pids`` holds the TCP connection whose own end has ``local_port`` and whose
    peer's has ``remote_port`` (any local address), read from /proc: the socket's inode in
    /proc/net/tcp{,6}, then the process with a descriptor on it. None if none of them does.

    Tells which worker of ``serve --workers N`` a client's connection landed on (the
    worker's end is the relay port, the peer's the client's own port), or which made a
    call an upstream saw (the worker's end is the port the upstream saw, the peer's the
    upstream's)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if (
                    int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port
                ):
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in (Path("/proc") / str(pid) / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return pid
    return None


async def until(cond: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until true, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def rpc(url: str, method: str, params: list[Any] | None = None, id_: Any = 1) -> Any:
    """One JSON-RPC call; returns the whole response object."""
    body = {"jsonrpc": "2.0", "id": id_, "method": method, "params": params or []}
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        return orjson.loads(await r.read())


class Relay:
    """A chainrelay node in its own process."""

    def __init__(self, procs: Procs, config_text: str, tmp: Path, name: str = "relay") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.config_path = tmp / f"{name}-{self.port}.toml"
        self.config_path.write_text(config_text.replace("{listen}", f"127.0.0.1:{self.port}"))
        self.log_path = tmp / f"{name}-{self.port}.log"
        self.procs = procs
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = self.procs.spawn(
            [
                sys.executable,
                "-m",
                "chainrelay",
                "--log-level",
                "INFO",
                "serve",
                "--config",
                str(self.config_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()

    async def wait_ready(self, timeout: float = 20 * SECOND) -> None:
        async def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with aiohttp.ClientSession() as s, s.get(self.url + "/health") as r:
                    return r.status == 200
            return False

        await until(healthy, timeout, f"relay on port {self.port} to be healthy")

    async def metrics(self) -> dict[str, float]:
        """The node's Prometheus samples as {"name{labels}": value}."""
        return await fetch_metrics(self.url)

    async def health(self) -> dict[str, Any]:
        """The node's ``/health`` answer (any status)."""
        async with aiohttp.ClientSession() as s, s.get(self.url + "/health") as r:
            body: dict[str, Any] = await r.json()
            return body


# The anvil_factory and relay_factory fixtures (tests/conftest.py), as a test's parameters:
# ``await anvil_factory(chain_id=56, block_time=None)``, ``await relay_factory([url], toml)``.
AnvilFactory = Callable[..., Awaitable[Anvil]]
RelayFactory = Callable[..., Awaitable[Relay]]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition as {"name{labels}": value}, for ``chain.metric``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def fetch_metrics(url: str) -> dict[str, float]:
    """The samples a node at ``url`` serves at ``/metrics`` (see ``parse_metrics``)."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return parse_metrics(await r.text())


def relay_config(upstreams: list[str], extra: str = "", each_upstream: str = "") -> str:
    """A config for a lab relay; ``{listen}`` is filled in by ``Relay``. ``each_upstream``:
    more lines of every ``[[upstreams]]`` entry."""
    ups = "\n".join(
        f'[[upstreams]]\nname = "u{i}"\nurl = "{u}"\n{each_upstream}'
        for i, u in enumerate(upstreams)
    )
    # Lab relays read /metrics and the full /health on the public port, and many run on one
    # host: no admin listener unless the test gives one its own port (``extra``).
    admin = "" if "admin_listen" in extra else 'admin_listen = ""\n'
    return f'[server]\nlisten = "{{listen}}"\n{admin}\n{extra}\n{ups}'
