"""Crash safety of the durable batch log: a process appending 10,000 batches is SIGKILLed
at a random moment; every batch it had acknowledged is in the log, byte for byte, and the
log is contiguous and takes the next seq.

The writer (``tests.lab.batchlog_writer``) prints each seq once its future resolves; the
kill comes after the test has read k of those lines, with k drawn from a seeded
``random.Random``, so a failing kill point can be replayed.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chainrelay.batches.log import BatchLog
from chainrelay.config import BatchesConfig
from tests.lab.batchlog_writer import STREAM, batch
from tests.lab.procs import ROOT, Procs
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

COUNT = 10_000
SEED = 20261126


def acks_until_killed(proc: subprocess.Popen[bytes], k: int, timeout: float) -> list[str]:
    """Read ``proc``'s stdout; SIGKILL it once ``k`` lines are in, then read the rest (what it
    printed before it died) to EOF. Complete lines only; fails after ``timeout`` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    killed = False
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            if not killed and buf.count(b"\n") >= k:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout:.1f}s reading the writer's acks")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            buf += chunk
    proc.wait(10 * SECOND)
    # A line cut by the kill is no ack.
    return buf[: buf.rfind(b"\n") + 1].decode().splitlines()


async def check_log(path: str, acked: list[int]) -> None:
    log = BatchLog(BatchesConfig(log=path))
    await log.start()
    try:
        last = await log.last_seq(STREAM) or 0
        assert last >= len(acked)
        seq = 1
        while seq <= last:
            page = await log.frames(STREAM, seq, 500, 8 << 20)
            assert page, f"the log has no frame at {seq} below its last seq {last}"
            for frame in page:
                assert frame == batch(seq)[1], f"batch {seq} is not intact"
                seq += 1
        assert await log.tail(STREAM, last) == [(s, batch(s)[0]) for s in range(1, last + 1)]
        # The log a crash left takes the next batch, and only it.
        await log.append(STREAM, last + 1, *batch(last + 1))
        assert await log.last_seq(STREAM) == last + 1
    finally:
        await log.stop()


async def test_acked_batches_survive_sigkill(procs: Procs, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    for round_ in range(3):
        k = rng.randrange(1, COUNT - 1000)
        path = str(tmp_path / f"log{round_}.sqlite")
        proc = procs.spawn(
            [sys.executable, "-m", "tests.lab.batchlog_writer", path, "--count", str(COUNT)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        lines = acks_until_killed(proc, k, 60 * SECOND)
        acked = [int(line) for line in lines if line != "done"]
        assert len(acked) >= k, (round_, k)
        # Futures resolve in append order: the acks are 1..m.
        assert acked == list(range(1, len(acked) + 1)), (round_, k)
        await check_log(path, acked)
