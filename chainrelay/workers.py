"""``chainrelay serve --workers N``: N relay processes on one port, supervised by this one.

Each worker is a node of its own (its own uvloop loop, upstream pool and memory cache)
listening on the same address with SO_REUSEPORT, so the kernel spreads connections over
them. Workers share answers through the Redis tier when the config names one
(``[cache] backend = "tiered"`` or ``"redis"``); without it each keeps its own cache.

The chain is followed once per node, not once per worker (``tree.siblings``): worker 0, the
feeder, tracks the head and fetches every block from the upstreams, and publishes each on a
private listener; the other workers are its relay-tree children. They take heads and blocks
from its frames (each block warms every worker's cache and reaches every worker's
subscriptions and filters), read its head's freshness and finality from memory the
workers share, and keep the upstreams for their own misses and forwarded calls. The
supervisor makes that listener (a Unix socket in a private directory), the shared memory and
an ephemeral signing key before it forks any worker, holds them for the service's life (a
restarted feeder serves the same listener) and removes the directory when it stops.

While the feeder is away (it died; the supervisor restarts it as any worker), the other
workers keep serving: their links wait for the new feeder, and once the shared head goes a
freshness window without confirmation each polls its upstreams for heads and finality as a
tree leaf does whose parent is gone, its block follower fetching the blocks itself; the
blocks their subscribers would have missed are fetched the same way. When the new feeder
serves, frames flow again and the polling stops.

The parent runs no event loop and serves nothing. It forks the workers, restarts one that
dies after it served (with backoff), and on SIGTERM or SIGINT forwards SIGTERM to every
worker and waits: each worker stops accepting, answers what it has in flight, and closes
its upstream and Redis connections (``Node.stop``). A worker that dies before it ever
served on its first start (port taken, upstreams unreachable) stops the whole service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from chainrelay.config import Config, parse_listen
from chainrelay.errors import ChainRelayError
from chainrelay.server.peer import new_via_name
from chainrelay.tree.siblings import FEEDER, SiblingFeed, WorkerRole

log = logging.getLogger(__name__)

# A worker that died after serving is restarted after this, doubling while it keeps dying
# young, up to RESTART_MAX: a crash loop costs little, a one-off crash is healed at once.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
# A worker that served this long before dying was healthy: its backoff starts over.
STABLE_AFTER = 30.0
# After forwarding SIGTERM, how long workers get before SIGKILL: HttpServer.stop drains
# in-flight answers for up to 5 s, then upstream and Redis connections close.
STOP_GRACE = 15.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What the supervisor handles: those, and SIGHUP (read the API keys again), which it
# forwards to every worker.
_HANDLED = (*_SIGNALS, signal.SIGHUP)


@dataclass
class _Slot:
    index: int
    proc: BaseProcess | None = None
    ready: Connection | None = None  # read end; a byte arrives once the worker serves
    started: float = 0.0
    served: bool = False  # served at least once, in this or an earlier life
    backoff: float = RESTART_FIRST
    restart_at: float | None = None


def supervise(cfg: Config, workers: int, log_level: str) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; the process exit code."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    previous = {sig: signal.signal(sig, _wake) for sig in _HANDLED}
    old_fd = signal.set_wakeup_fd(w)
    feed = SiblingFeed.create()
    try:
        return _Supervisor(cfg, workers, log_level, (r, w), feed).run()
    finally:
        feed.close()
        signal.set_wakeup_fd(old_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(r)
        os.close(w)


def _wake(signum: int, frame: Any) -> None:
    """Does nothing: the signal's number reaches the supervisor through the wakeup fd."""


class _Supervisor:
    def __init__(
        self,
        cfg: Config,
        workers: int,
        log_level: str,
        wakeup: tuple[int, int],
        feed: SiblingFeed,
    ) -> None:
        self.cfg = cfg
        self.feed = feed
        self.log_level = log_level
        self.wakeup = wakeup
        self.slots = [_Slot(i) for i in range(workers)]
        self.ctx = multiprocessing.get_context("fork")  # no loop, no thread runs here yet
        # One name in Via headers for every worker: a request that comes back round to
        # another worker of this node is a loop all the same.
        self.via = new_via_name()
        self.stop_deadline: float | None = None
        self.exit_code = 0

    def run(self) -> int:
        host, port = parse_listen(self.cfg.server.listen)
        log.info("supervisor %d: %d workers on %s:%d", os.getpid(), len(self.slots), host, port)
        for slot in self.slots:
            self._spawn(slot)
        while self._alive() or (self.stop_deadline is None and self._pending()):
            ready = multiprocessing.connection.wait(self._waitables(), self._timeout())
            if self.wakeup[0] in ready:
                self._on_signal()
            for slot in self.slots:
                if slot.ready is not None and slot.ready in ready:
                    self._on_ready(slot)
                if slot.proc is not None and slot.proc.sentinel in ready:
                    self._on_exit(slot)
            now = time.monotonic()
            if self.stop_deadline is None:
                for slot in self.slots:
                    if slot.proc is None and slot.restart_at is not None and slot.restart_at <= now:
                        self._spawn(slot)
            elif now >= self.stop_deadline:
                self._kill_all()
        log.info("supervisor %d: all workers stopped", os.getpid())
        return self.exit_code

    # --- bookkeeping -----------------------------------------------------------------------
    def _alive(self) -> bool:
        return any(s.proc is not None for s in self.slots)

    def _pending(self) -> bool:
        return any(s.restart_at is not None for s in self.slots)

    def _waitables(self) -> list[Any]:
        out: list[Any] = [self.wakeup[0]]
        for s in self.slots:
            if s.proc is not None:
                out.append(s.proc.sentinel)
            if s.ready is not None:
                out.append(s.ready)
        return out

    def _timeout(self) -> float | None:
        now = time.monotonic()
        if self.stop_deadline == float("inf"):
            return None  # killed: wait for them to be reaped
        if self.stop_deadline is not None:
            return max(0.0, self.stop_deadline - now)
        times = [s.restart_at for s in self.slots if s.restart_at is not None]
        return max(0.0, min(times) - now) if times else None

    # --- events ----------------------------------------------------------------------------
    def _spawn(self, slot: _Slot) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_worker_main,
            args=(self.cfg, slot.index, writer, self.log_level, self.wakeup, self.via, self.feed),
            name=f"chainrelay-worker-{slot.index}",
        )
        # Blocked across fork so the child cannot run the parent's handlers before it has
        # installed its own; pending signals are delivered when each side unblocks.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        writer.close()  # EOF on ``reader`` now means the worker is gone
        slot.proc, slot.ready = proc, reader
        slot.started = time.monotonic()
        slot.restart_at = None

    def _on_signal(self) -> None:
        got = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.wakeup[0], 64):
                got += chunk  # the wakeup fd carries each signal's number as a byte
        if signal.SIGHUP in got and self.stop_deadline is None:
            self._forward(signal.SIGHUP)
        if any(sig in got for sig in _SIGNALS) and self.stop_deadline is None:
            log.info("supervisor %d: stopping workers", os.getpid())
            self._stop_all()

    def _forward(self, sig: signal.Signals) -> None:
        log.info("supervisor %d: forwarding %s to the workers", os.getpid(), sig.name)
        for s in self.slots:
            if s.proc is not None and s.proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.proc.pid, sig)

    def _stop_all(self) -> None:
        self.stop_deadline = time.monotonic() + STOP_GRACE
        for s in self.slots:
            s.restart_at = None
            if s.proc is not None and s.proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.proc.pid, signal.SIGTERM)

    def _kill_all(self) -> None:
        for s in self.slots:
            if s.proc is not None and s.proc.pid is not None:
                log.error(
                    "worker %d (pid %d) still running %.0fs after SIGTERM: killing it",
                    s.index,
                    s.proc.pid,
                    STOP_GRACE,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.proc.pid, signal.SIGKILL)
        self.exit_code = self.exit_code or 1
        self.stop_deadline = float("inf")  # killed: now just reap them

    def _on_ready(self, slot: _Slot) -> None:
        assert slot.ready is not None
        try:
            slot.ready.recv_bytes()
            slot.served = True
            if slot.proc is not None:
                log.info("worker %d (pid %s) serving", slot.index, slot.proc.pid)
        except (EOFError, OSError):
            pass  # died before serving: its sentinel says so
        slot.ready.close()
        slot.ready = None

    def _on_exit(self, slot: _Slot) -> None:
        proc = slot.proc
        assert proc is not None
        proc.join()
        code = proc.exitcode if proc.exitcode is not None else 1
        if slot.ready is not None:
            slot.ready.close()
            slot.ready = None
        slot.proc = None
        if self.stop_deadline is not None:
            if code != 0:
                log.warning("worker %d (pid %s) exited with %d", slot.index, proc.pid, code)
                self.exit_code = self.exit_code or 1
            return
        if not slot.served:
            log.error(
                "worker %d (pid %s) exited with %d before serving; stopping",
                slot.index,
                proc.pid,
                code,
            )
            self.exit_code = code or 1
            self._stop_all()
            return
        lived = time.monotonic() - slot.started
        young = lived < STABLE_AFTER
        slot.backoff = min(slot.backoff * 2, RESTART_MAX) if young else RESTART_FIRST
        slot.restart_at = time.monotonic() + slot.backoff
        log.error(
            "worker %d (pid %s) died with %d after %.1fs; restarting in %.1fs",
            slot.index,
            proc.pid,
            code,
            lived,
            slot.backoff,
        )


def _worker_main(
    cfg: Config,
    index: int,
    ready: Connection,
    log_level: str,
    wakeup: tuple[int, int],
    via: str,
    feed: SiblingFeed,
) -> None:
    """A worker's whole life, in the forked child."""
    # Signals are still blocked here (see _Supervisor._spawn): drop the parent's handling
    # first. SIGINT is ignored until the loop installs its handlers: the parent forwards
    # SIGTERM, and Ctrl-C in a terminal reaches every process of the group at once.
    signal.set_wakeup_fd(-1)
    for fd in wakeup:
        os.close(fd)
    if index != FEEDER:
        feed.drop_listener()  # only the feeder serves it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP's default would end the worker: ignored until its loop reads the keys again.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s",
        force=True,
    )
    from chainrelay.app import Node
    from chainrelay.cli import _run, _until_signal
    from chainrelay.collector import settle_startup_heap

    async def serve(stop: asyncio.Event) -> None:
        node = Node(cfg, via=via, worker=WorkerRole(index, feed))
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, node.reload_keys_logged)
        _register_worker(node, index)
        await node.start(reuse_port=True)
        settle_startup_heap()
        try:
            ready.send_bytes(b"1")
            ready.close()
            await stop.wait()
        finally:
            await node.stop()
            log.info("worker stopped")

    try:
        _run(_until_signal(serve))
    except ChainRelayError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


def _register_worker(node: Any, index: int) -> None:
    """A per-worker series, so a scrape (answered by whichever worker accepted it) says which."""
    from prometheus_client import Gauge

    g = Gauge(
        "chainrelay_worker",
        "Under serve --workers: the index of the worker that answered this scrape (value: pid)",
        ["worker"],
        registry=node.metrics.registry,
    )
    g.labels(str(index)).set(os.getpid())
