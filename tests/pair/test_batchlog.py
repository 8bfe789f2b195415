"""The durable batch log on a real sqlite3 file (tmp_path): group commit, futures in append
order, the reads, restart, the contiguity rule, range paging and a draining stop.

A commit that fails is made by a real sqlite trigger that aborts the insert of one seq
(what a full disk or an I/O error does to a transaction), not by a stand-in connection.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chainrelay.batches import log as batchlog
from chainrelay.batches.log import SCHEMA_VERSION, BatchLog
from chainrelay.config import BatchesConfig, BatchStreamConfig
from chainrelay.errors import BatchLogError

STREAM = "arbitrum/batches"


def record(seq: int, size: int = 64, stream: str = STREAM) -> tuple[bytes, bytes]:
    """(hash, frame) of a batch, its bytes drawn from its stream and seq."""
    frame = random.Random(f"{stream}/{seq}").randbytes(size)
    return hashlib.blake2b(frame, digest_size=32).digest(), frame


@pytest.fixture
async def blog(tmp_path: Path) -> AsyncIterator[BatchLog]:
    log = BatchLog(BatchesConfig(log=str(tmp_path / "batches.sqlite")))
    await log.start()
    try:
        yield log
    finally:
        await log.stop()


def push(log: BatchLog, seq: int, size: int = 64, stream: str = STREAM) -> asyncio.Future[None]:
    return log.append(stream, seq, *record(seq, size, stream))


async def test_a_burst_is_committed_in_few_transactions(blog: BatchLog) -> None:
    futures = [push(blog, seq, 2048) for seq in range(1, 2001)]
    await asyncio.gather(*futures)
    assert blog.committed == 2000
    # 2,000 appends queued faster than one fsync: the writer takes them in groups.
    assert blog.commits < 2000 // 4, blog.commits
    assert blog.largest_group > 4
    assert await blog.last_seq(STREAM) == 2000


async def test_futures_resolve_in_append_order_across_streams(blog: BatchLog) -> None:
    order: list[tuple[str, int]] = []

    def resolved(key: tuple[str, int], _fut: asyncio.Future[None]) -> None:
        order.append(key)

    futures = []
    for seq in range(1, 301):
        for stream in ("a/batches", "b/batches"):
            fut = push(blog, seq, 256, stream)
            fut.add_done_callback(functools.partial(resolved, (stream, seq)))
            futures.append(fut)
    await asyncio.gather(*futures)
    assert order == [(s, n) for n in range(1, 301) for s in ("a/batches", "b/batches")]


async def test_reads_see_what_was_committed(blog: BatchLog) -> None:
    assert await blog.last_seq(STREAM) is None
    assert await blog.tail(STREAM, 5) == []
    assert await blog.hash_of(STREAM, 7) is None
    assert await blog.frames(STREAM, 7, 10, 1 << 20) == []

    await asyncio.gather(*(push(blog, seq) for seq in range(7, 27)))
    assert await blog.last_seq(STREAM) == 26
    assert await blog.tail(STREAM, 3) == [(seq, record(seq)[0]) for seq in (24, 25, 26)]
    assert await blog.tail(STREAM, 100) == [(seq, record(seq)[0]) for seq in range(7, 27)]
    assert await blog.hash_of(STREAM, 7) == record(7)[0]
    assert await blog.hash_of(STREAM, 27) is None
    assert await blog.frames(STREAM, 10, 3, 1 << 20) == [record(s)[1] for s in (10, 11, 12)]
    assert await blog.last_seq("other/batches") is None


async def test_restart_keeps_every_record_and_the_next_seq(tmp_path: Path) -> None:
    path = str(tmp_path / "batches.sqlite")
    first = BatchLog(BatchesConfig(log=path))
    await first.start()
    await asyncio.gather(*(push(first, seq, 1000) for seq in range(1, 501)))
    await asyncio.gather(*(push(first, seq, 10, "b/batches") for seq in range(40, 45)))
    await first.stop()

    again = BatchLog(BatchesConfig(log=path))
    await again.start()
    try:
        assert await again.last_seq(STREAM) == 500
        assert await again.last_seq("b/batches") == 44
        frames = await again.frames(STREAM, 1, 1000, 1 << 30)
        assert frames == [record(seq, 1000)[1] for seq in range(1, 501)]
        with pytest.raises(BatchLogError, match="next is 501"):
            await push(again, 502)
        await push(again, 501)
        await push(again, 45, 10, "b/batches")
        assert await again.last_seq(STREAM) == 501
    finally:
        await again.stop()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_a_seq_that_does_not_follow_on_is_refused_and_not_written(blog: BatchLog) -> None:
    await asyncio.gather(*(push(blog, seq) for seq in (10, 11)))
    gap, duplicate = push(blog, 13), push(blog, 11)
    follows = push(blog, 12)
    with pytest.raises(BatchLogError, match="seq 13 does not follow on"):
        await gap
    with pytest.raises(BatchLogError, match="seq 11 does not follow on"):
        await duplicate
    await follows
    assert await blog.last_seq(STREAM) == 12
    assert await blog.frames(STREAM, 10, 10, 1 << 20) == [record(s)[1] for s in (10, 11, 12)]
    assert blog.failed == 2


async def test_a_failed_commit_fails_its_group_and_what_was_queued_behind(
    blog: BatchLog, tmp_path: Path
) -> None:
    await push(blog, 1)
    poison = sqlite3.connect(tmp_path / "batches.sqlite", isolation_level=None)
    poison.execute(
        "CREATE TRIGGER refuse_5 BEFORE INSERT ON batches WHEN NEW.seq = 5"
        " BEGIN SELECT RAISE(ABORT, 'refused by the test trigger'); END"
    )
    try:
        # Held queue: the writer takes 2..5 as one group, so 2..4 fail with 5.
        with blog._cond:
            group = [push(blog, seq) for seq in (2, 3, 4, 5)]
        results = await asyncio.gather(*group, return_exceptions=True)
        assert all(isinstance(r, BatchLogError) for r in results), results
        assert "refused by the test trigger" in str(results[0])
        # The log still ends at 1; a record queued for 6 does not follow on.
        with pytest.raises(BatchLogError, match="next is 2"):
            await push(blog, 6)
        poison.execute("DROP TRIGGER refuse_5")
    finally:
        poison.close()
    await asyncio.gather(*(push(blog, seq) for seq in range(2, 7)))
    assert await blog.frames(STREAM, 1, 100, 1 << 20) == [record(s)[1] for s in range(1, 7)]


async def test_frames_pages_by_count_and_bytes(blog: BatchLog) -> None:
    sizes = {seq: 100 * (seq % 7 + 1) for seq in range(1, 201)}
    sizes[50] = 50_000
    await asyncio.gather(*(push(blog, seq, sizes[seq]) for seq in range(1, 201)))

    def frame(seq: int) -> bytes:
        return record(seq, sizes[seq])[1]

    assert await blog.frames(STREAM, 1, 5, 1 << 20) == [frame(s) for s in range(1, 6)]
    assert await blog.frames(STREAM, 1, 0, 1 << 20) == []
    # Byte bound: whole frames only, never past it ...
    got = await blog.frames(STREAM, 1, 1000, 1000)
    assert sum(map(len, got)) <= 1000
    assert got == [frame(s) for s in range(1, 1 + len(got))]
    assert sum(map(len, got)) + len(frame(len(got) + 1)) > 1000
    # ... except that a first frame larger than it still comes alone.
    assert await blog.frames(STREAM, 50, 1000, 1000) == [frame(50)]
    assert await blog.frames(STREAM, 0, 10, 1 << 20) == []  # nothing at seq 0
    assert await blog.frames(STREAM, 200, 10, 1 << 20) == [frame(200)]
    assert await blog.frames(STREAM, 201, 10, 1 << 20) == []

    paged: list[bytes] = []
    while True:
        page = await blog.frames(STREAM, 1 + len(paged), 17, 3000)
        if not page:
            break
        paged += page
    assert paged == [frame(s) for s in range(1, 201)]


async def test_stop_commits_everything_appended(tmp_path: Path) -> None:
    path = str(tmp_path / "batches.sqlite")
    log = BatchLog(BatchesConfig(log=path))
    await log.start()
    futures = [push(log, seq, 4096) for seq in range(1, 1001)]
    await log.stop()
    assert all(f.done() and f.exception() is None for f in futures)
    late = push(log, 1001)
    with pytest.raises(BatchLogError, match="closed"):
        await late
    await log.stop()  # idempotent

    again = BatchLog(BatchesConfig(log=path))
    await again.start()
    try:
        assert await again.last_seq(STREAM) == 1000
        assert await again.hash_of(STREAM, 1000) == record(1000, 4096)[0]
    finally:
        await again.stop()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "batches.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    log = BatchLog(BatchesConfig(log=str(path)))
    with pytest.raises(BatchLogError, match="newer"):
        await log.start()
    await log.stop()


async def test_a_log_whose_commits_would_not_fsync_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An acknowledgement rests on synchronous=FULL: a connection that does not take it
    (here one that ignores the pragma) must not open, rather than ack from the page cache."""

    class IgnoresSynchronous(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql.replace(" ", "").upper() == "PRAGMASYNCHRONOUS=FULL":
                sql = "PRAGMA synchronous = OFF"
            return super().execute(sql, *args)

    def connect(path: str) -> sqlite3.Connection:
        return sqlite3.connect(path, isolation_level=None, factory=IgnoresSynchronous)

    monkeypatch.setattr(batchlog, "_connect", connect)
    log = BatchLog(BatchesConfig(log=str(tmp_path / "batches.sqlite")))
    with pytest.raises(BatchLogError, match="synchronous=0, not FULL"):
        await log.start()
    await log.stop()


async def test_an_empty_stream_starts_at_its_first_seq_and_nowhere_else(tmp_path: Path) -> None:
    """Were the first record to set the start, a first group that failed would let the
    numbers queued behind it in, and the log would begin past the stream's start."""
    log = BatchLog(
        BatchesConfig(log=str(tmp_path / "batches.sqlite"), streams=[BatchStreamConfig(STREAM)])
    )
    await log.start()
    try:
        with pytest.raises(BatchLogError, match="next is 0"):
            await push(log, 10)
        assert await log.last_seq(STREAM) is None
        await push(log, 0)
        await push(log, 40, stream="b/batches")  # a stream with no first given: as it comes
        assert await log.last_seq(STREAM) == 0 and await log.last_seq("b/batches") == 40
    finally:
        await log.stop()
