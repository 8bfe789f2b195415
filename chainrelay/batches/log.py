"""The durable batch log: every batch an ingress node acknowledges, in one sqlite3 file.

An acknowledgement means the batch is on disk: the log runs in WAL mode with
``synchronous=FULL``, so each COMMIT fsyncs the WAL. One fsync per batch would cap a node
at the disk's fsync rate, so ONE writer thread does group commit: it takes everything
queued since its last commit (up to ``max_batches`` / ``max_bytes``) as one transaction.
There is no artificial delay: while one commit fsyncs, the next group accumulates, so the
group grows with the load and a lone batch is committed at once.

``append`` is called on the event loop and returns a future that resolves once the
transaction holding the record has committed; a group's futures are resolved by one
callback on the loop, in append order. Reads (``tail``, ``hash_of``, ``frames``,
``last_seq``) use a second connection in their own thread: WAL lets them run beside the
writer, and they see only committed records.

The log is contiguous per stream by construction: the writer knows each stream's next seq
and fails (``BatchLogError``, nothing written) a record that does not follow on, such as
one queued behind an earlier seq whose commit failed. A failed commit fails its whole
group. A process killed at any moment loses only records whose futures had not resolved.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from chainrelay.config import BatchesConfig
from chainrelay.errors import BatchLogError
from chainrelay.tree.session import POSITION_END

log = logging.getLogger(__name__)

# ``PRAGMA synchronous`` reads back 2 for FULL: what every acknowledgement rests on.
SYNCHRONOUS_FULL = 2
# Bumped by each change of the schema; ``_migrate`` takes a file from any older version.
SCHEMA_VERSION = 1

# A rowid table, not WITHOUT ROWID: frames run up to ~1 MiB, and a WITHOUT ROWID b-tree
# keeps whole rows in its pages. ``hash`` comes before ``frame`` so reading a hash never
# walks a frame's overflow pages.
_SCHEMA_V1 = (
    "CREATE TABLE batches ("
    " stream TEXT NOT NULL, seq INTEGER NOT NULL, hash BLOB NOT NULL, frame BLOB NOT NULL)",
    "CREATE UNIQUE INDEX batches_stream_seq ON batches (stream, seq)",
)

_T = TypeVar("_T")

_INSERT = "INSERT INTO batches (stream, seq, hash, frame) VALUES "
_ROW = "(?,?,?,?)"
_ROW_PARAMS = 4


@functools.lru_cache(maxsize=256)
def _insert(rows: int) -> str:
    """One INSERT of ``rows`` rows. sqlite3 gives up the GIL around every statement it
    runs, and the writer taking it back waits up to the interpreter's switch interval
    (5 ms) while the event loop runs Python: a busy ingress would spend that per row of
    an ``executemany``, so the writer runs as few statements per group as it can."""
    return _INSERT + ",".join([_ROW] * rows)


@dataclass(slots=True)
class _Record:
    stream: str
    seq: int
    payload_hash: bytes
    frame: bytes
    future: asyncio.Future[None]


# What one group's callback resolves: each record's future, with None (committed) or the
# error it fails with, in append order.
_Outcome = list[tuple[asyncio.Future[None], BatchLogError | None]]


@dataclass(slots=True)
class _Trim:
    stream: str
    keep: int
    before_us: int
    future: asyncio.Future[int]


# Where a frame's origin time (u64, big-endian) sits in it (tree.frame.HEADER: version,
# kind, flags, stream, position, identity, then the time): sqlite's substr counts from 1,
# and compares BLOBs bytewise, which orders big-endian integers of one width.
_ORIGIN_AT = 1 + 1 + 1 + 2 + 32 + 8 + 32
# Records one trim looks at, oldest first: a log years behind its retention is cut back a
# slice per call, never in one transaction that holds the writer for seconds.
TRIM_ROWS = 10_000


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; the writer says BEGIN and COMMIT.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """The one place the schema is made: brings a new or older file to SCHEMA_VERSION."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise BatchLogError(
            f"batch log schema version {version} is newer than this node's {SCHEMA_VERSION}"
        )
    if version == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version < 1:
            for statement in _SCHEMA_V1:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class BatchLog:
    """Start it before the ingress takes pushes, stop it after the ingress stops: ``stop``
    commits whatever is still queued before it returns."""

    def __init__(self, cfg: BatchesConfig) -> None:
        """``cfg``: the ``[batches]`` section; its ``log`` is the file, its ``commit_*``
        bound one group commit, and each of its streams starts at its ``first_seq``: an
        empty stream's log starts there and nowhere else (a first group that failed must
        not let later numbers in)."""
        self.path = cfg.log
        self.first_seqs = cfg.first_seqs()
        self.max_batches = max(1, cfg.commit_max_batches)
        self.max_bytes = cfg.commit_max_bytes
        # Counters, read by metrics and benchmarks.
        self.commits = 0  # transactions committed
        self.committed = 0  # records in them
        self.failed = 0  # records failed (commit failed, or seq did not follow on)
        self.last_group = 0  # records in the last transaction
        self.largest_group = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond = threading.Condition()
        self._queue: deque[_Record] = deque()  # guarded by _cond
        self._trims: deque[_Trim] = deque()  # guarded by _cond: retention, between groups
        self._draining = False  # guarded by _cond: the writer exits once the queue is empty
        self._closed = False  # loop thread only: append fails from here on
        self._writer: threading.Thread | None = None
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._stopping: asyncio.Future[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the file (creating it and its schema), then start the writer and reader."""
        if self._loop is not None:
            return
        loop = asyncio.get_running_loop()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        writer = threading.Thread(
            target=self._write_loop, args=(opened,), name="batchlog-writer", daemon=True
        )
        self._loop = loop
        writer.start()
        try:
            await asyncio.wrap_future(opened)
        except BaseException:
            await asyncio.to_thread(writer.join)
            self._loop = None
            raise
        self._writer = writer
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="batchlog-reader"
        )
        try:
            await loop.run_in_executor(self._reader, self._open_reader)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Commit every record appended so far, then close. Idempotent."""
        if self._loop is None:
            return
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self._closed = True
        with self._cond:
            self._draining = True
            self._cond.notify()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        if self._reader is not None:
            reader = self._reader
            await asyncio.get_running_loop().run_in_executor(reader, self._close_reader)
            reader.shutdown(wait=True)

    # -- writes ------------------------------------------------------------------------

    def append(
        self, stream: str, seq: int, payload_hash: bytes, frame: bytes
    ) -> asyncio.Future[None]:
        """Queue a record for the next group commit (on the loop thread). The future
        resolves once it is durable, or fails with BatchLogError; futures resolve in
        append order."""
        if self._loop is None:
            raise BatchLogError("batch log is not started")
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._closed:
            fut.set_exception(BatchLogError("batch log is closed"))
            return fut
        with self._cond:
            self._queue.append(_Record(stream, seq, payload_hash, frame, fut))
            self._cond.notify()
        return fut

    def trim(self, stream: str, keep: int, before_us: int) -> asyncio.Future[int]:
        """Retention: delete ``stream``'s oldest records past the newest ``keep`` and those
        whose frame was made before ``before_us`` (unix µs; 0: none by age), at most
        ``TRIM_ROWS`` a call; the newest record always stays (it is where the stream goes
        on after a restart). Done by the writer between groups; resolves with the count."""
        if self._loop is None or self._closed:
            raise BatchLogError("batch log is not open")
        fut: asyncio.Future[int] = self._loop.create_future()
        with self._cond:
            self._trims.append(_Trim(stream, max(1, keep), before_us, fut))
            self._cond.notify()
        return fut

    def _trim(self, conn: sqlite3.Connection, t: _Trim) -> int:
        cur = conn.execute(
            "DELETE FROM batches WHERE stream = ? AND seq IN ("
            " SELECT seq FROM batches WHERE stream = ? ORDER BY seq LIMIT ?)"
            " AND seq < (SELECT MAX(seq) FROM batches WHERE stream = ?)"
            " AND (seq <= (SELECT MAX(seq) FROM batches WHERE stream = ?) - ?"
            f"      OR substr(frame, {_ORIGIN_AT}, 8) < ?)",
            (t.stream, t.stream, TRIM_ROWS, t.stream, t.stream, t.keep,
             t.before_us.to_bytes(8, "big")),
        )  # fmt: skip
        return cur.rowcount

    def _run_trims(self, conn: sqlite3.Connection, trims: list[_Trim]) -> None:
        assert self._loop is not None
        for t in trims:
            try:
                n: int | BaseException = self._trim(conn, t)
            except Exception as exc:
                log.error("batch log %s: trim of %s failed: %s", self.path, t.stream, exc)
                n = BatchLogError(f"trim failed: {exc}")
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_settle_trim, t.future, n)

    def _write_loop(self, opened: concurrent.futures.Future[None]) -> None:
        """The writer thread: open, then commit groups until drained at stop."""
        try:
            conn = _connect(self.path)
        except Exception as exc:
            opened.set_exception(BatchLogError(f"batch log {self.path}: {exc}"))
            return
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise BatchLogError(f"batch log {self.path}: journal mode {mode}, not wal")
            # FULL in WAL mode: every COMMIT fsyncs the WAL, so an ack survives power loss.
            conn.execute("PRAGMA synchronous = FULL")
            sync = conn.execute("PRAGMA synchronous").fetchone()[0]
            if sync != SYNCHRONOUS_FULL:  # a build or setting that ignored it: no acks
                raise BatchLogError(f"batch log {self.path}: synchronous={sync}, not FULL")
            _migrate(conn)
            next_seq: dict[str, int] = {
                stream: last + 1
                for stream, last in conn.execute(
                    "SELECT stream, MAX(seq) FROM batches GROUP BY stream"
                )
            }
        except Exception as exc:
            conn.close()
            if not isinstance(exc, BatchLogError):
                exc = BatchLogError(f"batch log {self.path}: {exc}")
            opened.set_exception(exc)
            return
        opened.set_result(None)
        try:
            while True:
                group, trims = self._take()
                if trims:
                    self._run_trims(conn, trims)
                if not group:
                    if trims:
                        continue
                    return
                try:
                    outcome = self._commit(conn, group, next_seq)
                except Exception as exc:  # a bug here must not leave futures hanging
                    log.exception("batch log %s: group of %d failed", self.path, len(group))
                    err = BatchLogError(f"batch log failed: {exc}")
                    outcome = [(r.future, err) for r in group]
                self._resolve(outcome)
        finally:
            conn.close()

    def _take(self) -> tuple[list[_Record], list[_Trim]]:
        """Everything queued, up to the group bounds, and the trims asked for; waits for
        either. Both empty once stop has been asked and the queue is drained."""
        with self._cond:
            while not self._queue and not self._trims:
                if self._draining:
                    return [], []
                self._cond.wait()
            trims = list(self._trims)
            self._trims.clear()
            if not self._queue:
                return [], trims
            group = [self._queue.popleft()]
            size = len(group[0].frame)
            while self._queue and len(group) < self.max_batches:
                size += len(self._queue[0].frame)
                if size > self.max_bytes:
                    break
                group.append(self._queue.popleft())
            return group, trims

    def _commit(
        self, conn: sqlite3.Connection, group: list[_Record], next_seq: dict[str, int]
    ) -> _Outcome:
        """Write one group as one transaction. ``next_seq`` moves only once it commits."""
        outcome: _Outcome = []
        rows: list[tuple[str, int, bytes, bytes]] = []
        advanced: dict[str, int] = {}
        for r in group:
            expected = advanced.get(
                r.stream, next_seq.get(r.stream, self.first_seqs.get(r.stream, r.seq))
            )
            if r.seq != expected:
                err = BatchLogError(
                    f"{r.stream}: seq {r.seq} does not follow on in the log (next is {expected})"
                )
                outcome.append((r.future, err))
                continue
            advanced[r.stream] = r.seq + 1
            rows.append((r.stream, r.seq, r.payload_hash, r.frame))
            outcome.append((r.future, None))
        if rows:
            per_statement = max(
                1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _ROW_PARAMS
            )
            try:
                if len(rows) <= per_statement:
                    # One statement is its own transaction (autocommit): committed, and
                    # fsynced, whole or not at all, for one round trip through the GIL.
                    conn.execute(_insert(len(rows)), [v for row in rows for v in row])
                else:
                    conn.execute("BEGIN")
                    for at in range(0, len(rows), per_statement):
                        chunk = rows[at : at + per_statement]
                        conn.execute(_insert(len(chunk)), [v for row in chunk for v in row])
                    conn.execute("COMMIT")
            except Exception as exc:
                log.error("batch log %s: commit of %d failed: %s", self.path, len(rows), exc)
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
                failure = BatchLogError(f"batch log commit failed: {exc}")
                self.failed += len(outcome)
                return [(fut, failure) for fut, _ in outcome]
            next_seq.update(advanced)
            self.commits += 1
            self.committed += len(rows)
            self.last_group = len(rows)
            self.largest_group = max(self.largest_group, len(rows))
        self.failed += len(outcome) - len(rows)
        return outcome

    def _resolve(self, outcome: _Outcome) -> None:
        """Hand one group's outcome to the loop in a single callback."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(_settle, outcome)

    # -- reads -------------------------------------------------------------------------

    def _open_reader(self) -> None:
        conn = _connect(self.path)
        conn.execute("PRAGMA query_only = 1")
        self._read_conn = conn

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            self._read_conn.close()
            self._read_conn = None

    async def _read(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._reader is None or self._closed:
            raise BatchLogError("batch log is not open")
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._read_conn is None:
            raise BatchLogError("batch log is not open")
        return self._read_conn

    async def tail(self, stream: str, n: int) -> list[tuple[int, bytes]]:
        """The last ``n`` (seq, hash) of a stream, ascending: what an ingress restores its
        duplicate checks from at start."""
        return await self._read(self._tail, stream, n)

    def _tail(self, stream: str, n: int) -> list[tuple[int, bytes]]:
        rows = (
            self._conn()
            .execute(
                "SELECT seq, hash FROM batches WHERE stream = ? ORDER BY seq DESC LIMIT ?",
                (stream, max(0, n)),
            )
            .fetchall()
        )
        rows.reverse()
        return rows

    async def hash_of(self, stream: str, seq: int) -> bytes | None:
        """The payload hash logged for ``seq``, or None: a duplicate check further back than
        the ingress keeps in memory."""
        return await self._read(self._hash_of, stream, seq)

    def _hash_of(self, stream: str, seq: int) -> bytes | None:
        row = (
            self._conn()
            .execute("SELECT hash FROM batches WHERE stream = ? AND seq = ?", (stream, seq))
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    async def frames(
        self, stream: str, from_seq: int, max_frames: int, max_bytes: int
    ) -> list[bytes]:
        """Consecutive frames from ``from_seq``: at most ``max_frames``, and no more than
        ``max_bytes`` unless the first alone is larger (a frame is never split). Empty when
        the log has nothing at ``from_seq``. For the range endpoint."""
        return await self._read(self._frames, stream, from_seq, max_frames, max_bytes)

    def _frames(self, stream: str, from_seq: int, max_frames: int, max_bytes: int) -> list[bytes]:
        if max_frames <= 0:
            return []
        cursor = self._conn().execute(
            "SELECT seq, frame FROM batches"
            " WHERE stream = ? AND seq >= ? AND seq <= ? ORDER BY seq",
            # The last seq asked for, within sqlite's signed 64-bit integers.
            (stream, from_seq, min(from_seq + max_frames, POSITION_END) - 1),
        )
        out: list[bytes] = []
        size = 0
        try:
            # Row by row: a page past max_bytes is never read into memory.
            for seq, frame in cursor:
                if seq != from_seq + len(out):
                    break
                size += len(frame)
                if out and size > max_bytes:
                    break
                out.append(bytes(frame))
        finally:
            cursor.close()
        return out

    async def last_seq(self, stream: str) -> int | None:
        """The highest seq logged for a stream, or None for a stream with nothing logged."""
        return await self._read(self._last_seq, stream)

    def _last_seq(self, stream: str) -> int | None:
        row = (
            self._conn()
            .execute("SELECT MAX(seq) FROM batches WHERE stream = ?", (stream,))
            .fetchone()
        )
        return row[0]


def _settle_trim(fut: asyncio.Future[int], n: int | BaseException) -> None:
    if fut.done():
        return
    if isinstance(n, BaseException):
        fut.set_exception(n)
    else:
        fut.set_result(n)


def _settle(outcome: _Outcome) -> None:
    """On the loop: resolve one group's futures in append order (a cancelled one is left)."""
    for fut, err in outcome:
        if fut.done():
            continue
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)
