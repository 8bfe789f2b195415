"""What the hostile-client tests measure: a node's RSS, read from ``/proc``, and the latency
a well-behaved client sees while an attack runs.

``Rss`` reads the resident set of a relay process (``VmRSS``, and ``VmHWM``, its peak).
``Bystander`` is the well-behaved client: one keep-alive HTTP connection asking a cheap
call (``eth_chainId``, answered from what the node knows) one at a time, for as long as
the attack runs; its p99 must stay under ``BYSTANDER_P99``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from types import TracebackType

import aiohttp

MiB = 1024 * 1024
# The bounds the hostile-client tests hold a node to: what one attack may make it grow by,
# what all of them together may, and what a well-behaved client may wait meanwhile.
ATTACK_RSS_GROWTH = 64 * MiB
NODE_RSS_GROWTH = 256 * MiB
BYSTANDER_P99 = 0.100
_BODY = b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}'


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class Rss:
    """The resident set of one process, in bytes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.now()

    def now(self) -> int:
        return _status_kib(self.pid, "VmRSS") * 1024

    def peak(self) -> int:
        """The highest RSS the process has had (``VmHWM``)."""
        return _status_kib(self.pid, "VmHWM") * 1024

    def growth(self) -> int:
        """RSS now over RSS when this was made."""
        return self.now() - self.start

    def peak_growth(self) -> int:
        """Peak RSS over RSS when this was made."""
        return self.peak() - self.start


class Latencies:
    """What a bystander measured: each call's latency, and the calls that failed."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.failures = 0

    def p99(self) -> float:
        """The 99th percentile of the calls made so far (at least one must have been)."""
        got = sorted(self.latencies)
        assert got, "the bystander made no call"
        return got[min(len(got) - 1, int(len(got) * 0.99))]

    def summary(self) -> str:
        got = sorted(self.latencies)
        if not got:
            return "no calls"
        return (
            f"{len(got)} calls, {self.failures} failed, p50 {got[len(got) // 2] * 1e3:.1f} ms, "
            f"p99 {self.p99() * 1e3:.1f} ms, max {got[-1] * 1e3:.1f} ms"
        )


class Bystander(Latencies):
    """A well-behaved client asking one cheap call at a time, for as long as it runs::

        async with Bystander(relay.url) as b:
            ... attack ...
        assert b.p99() < BYSTANDER_P99

    A call that fails or takes longer than ``timeout`` counts as ``timeout`` seconds (and
    as a failure): a bystander that cannot get through is the worst latency there is.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, pause: float = 0.005) -> None:
        self.url = url
        self.timeout = timeout
        self.pause = pause  # between calls: a client, not a flood
        super().__init__()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Bystander:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, force_close=False)
        )
        # One call first, not measured: the client's own first connection (and aiohttp's
        # first use in this process) costs a few hundred milliseconds that are not the node's.
        await self._call()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None and self._session is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._session.close()

    async def _call(self) -> bool:
        assert self._session is not None
        headers = {"Content-Type": "application/json"}
        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.post(self.url, data=_BODY, headers=headers) as r:
                    await r.read()
                    return r.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            ok = await self._call()
            elapsed = time.perf_counter() - t0
            if ok:
                self.latencies.append(elapsed)
            else:
                self.failures += 1
                self.latencies.append(self.timeout)
            await asyncio.sleep(self.pause)


class BystanderProcess(Latencies):
    """A ``Bystander`` in a process of its own, for attacks heavy enough that their own
    client work would delay a bystander sharing the test's event loop (the latency it
    measures must be the node's)::

        async with BystanderProcess(relay.url) as b:
            ... attack ...
        assert b.p99() < BYSTANDER_P99

    It calls until its stdin closes, then prints its latencies as JSON.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__()
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> BystanderProcess:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.lab.hostile",
            self.url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self._proc.stdout is not None
        # It says "ready" once its first, unmeasured call is answered.
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        assert line.strip() == b"ready", line
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc = self._proc
        assert proc is not None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(b""), 30)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        got = json.loads(out)
        self.latencies, self.failures = got["latencies"], got["failures"]


async def _bystand(url: str) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with Bystander(url) as b:
        print("ready", flush=True)
        await reader.read()  # until the test closes our stdin
    print(json.dumps({"latencies": b.latencies, "failures": b.failures}), flush=True)


if __name__ == "__main__":
    asyncio.run(_bystand(sys.argv[1]))
