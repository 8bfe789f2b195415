"""A real redis-server for system tests, started through ``Procs`` and stopped by PID.

Started the way docs/deployment.md tells to run it for chainrelay: no persistence
(``--save "" --appendonly no``: the cache is rebuilt from upstreams), bounded by
``--maxmemory`` with ``allkeys-lru`` eviction.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from chainrelay.devnet import free_port
from tests.lab.procs import Procs, until
from tests.lab.timing import SECOND

# Enough for every test's working set, small enough that a flood would hit the bound.
DEFAULT_MAXMEMORY = "32mb"


def redis_binary() -> str:
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(found).exists():
        raise FileNotFoundError("redis-server not found: apt-get install redis-server")
    return found


class RedisServer:
    """One redis-server process on a fixed loopback port; ``restart`` reuses the port."""

    def __init__(self, procs: Procs, workdir: Path, *, maxmemory: str = DEFAULT_MAXMEMORY) -> None:
        self.procs = procs
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.maxmemory = maxmemory
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            self.maxmemory,
            "--maxmemory-policy",
            "allkeys-lru",
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.log_path),
        ]
        self.proc = self.procs.spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait_ready(self, timeout: float = 10 * SECOND) -> None:
        async def pong() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
                raise AssertionError(f"redis-server exited with {self.proc.returncode}: {log}")
            with contextlib.suppress(RedisError, OSError):
                return bool(await self.command("PING"))
            return False

        await until(pong, timeout, f"redis-server on port {self.port} to answer PING")

    def kill(self) -> None:
        """SIGKILL: Redis vanishes mid-command, as a crashed or partitioned one does."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    async def restart(self) -> None:
        self.start()
        await self.wait_ready()

    async def command(self, *args: Any) -> Any:
        """One command on a fresh connection (short timeouts: a dead server fails fast)."""
        client = aioredis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        try:
            return await client.execute_command(*args)
        finally:
            await client.aclose()

    async def config_get(self, name: str) -> str:
        got = await self.command("CONFIG", "GET", name)
        if isinstance(got, dict):  # RESP3 and redis-py's parser answer a map
            value = got.get(name.encode(), got.get(name))
        else:
            value = dict(zip(got[::2], got[1::2], strict=True)).get(name.encode())
        return value.decode() if isinstance(value, bytes) else str(value)

    async def keys(self, pattern: str = "*") -> list[bytes]:
        return list(await self.command("KEYS", pattern))


async def start_redis(
    procs: Procs, workdir: Path, *, maxmemory: str = DEFAULT_MAXMEMORY
) -> RedisServer:
    server = RedisServer(procs, workdir, maxmemory=maxmemory)
    server.start()
    await server.wait_ready()
    return server
