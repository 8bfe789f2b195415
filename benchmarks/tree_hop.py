"""Per-hop latency of the relay tree: what one relay adds between a frame arriving from its
parent and the frame reaching each of its 1,000 children.

Three real processes on one host clock:

* ``frame_source.py``: the parent, serving ``/feed`` with frames of mainnet block
  18,000,000 (about 265 KB, re-signed per position, number/hash/parent hash rewritten) and
  small frames of the same block cut to one transaction (about 2.6 KB, an anvil block's
  size), in turn; it writes the next frame when asked (``POST /publish``) and says when it
  wrote it, first to the relay, then to one direct child;
* a real ``chainrelay serve`` whose only parent is that source;
* one client process (this script, ``children`` mode) holding ``--children`` WebSocket
  sessions on the relay's ``/feed`` (hello: live only) and one direct session on the source.

Each child socket has a receive buffer larger than a frame (``SO_RCVBUF``) and
``SO_TIMESTAMPNS``: the client reads nothing while a frame is fanned out, then reads every
socket once; the kernel's time stamp of the read that completes a frame is when the whole
frame had arrived. So the client takes no CPU from the relay during the fan-out (its CPU
per block, all of it spent after the fan-out, is printed), and a frame is timed when it
arrived, not when it was read.

The relay's receipt time of frame *p* is estimated side by side in the same run: the
source's write time to the relay plus the one-way time of the same frame to the direct
child (direct arrival - the source's write time to it). A child's hop latency is its arrival
minus that. Per block the first, median and last child; over all (block, child) pairs the
p50 and p99; and the relay's CPU per block.

Side by side, the same relay config under ``serve --workers 2`` (SO_REUSEPORT: the feeder
worker links to the source and passes each frame on to the other worker over its private
listener before its own children; each worker serves the children the kernel handed it; the
children connect as before): a hop is counted from the feeder's receipt, so the other
worker's children carry that extra hop.

With ``--against COMMIT`` a relay of that older commit (the same config, run from that
commit's own tree: ``common.checkout``) takes its turn in every round beside them, so two
commits compare side by side in one run.

The kernel floor is measured last, with the relay stopped: one thread writing the same
frame (WebSocket header + frame) on each of ``--children`` loopback TCP connections whose
readers wait, as the children do: what the fan-out costs if a relay did nothing but write.

    python -m benchmarks.tree_hop [--children 1000] [--blocks 16] [--against COMMIT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import multiprocessing
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import uvloop

from benchmarks import common
from benchmarks.subscribers import (
    SO_TIMESTAMPNS,
    masked_text_frame,
    raise_fd_limit,
    relay_cpu,
    relay_pids,
    ws_upgrade,
)
from chainrelay.tree.session import Want, encode_hello
from chainrelay.wire.wsframes import binary_header

GOAL_P50_MS = 1.0
GOAL_P99_MS = 5.0
# --rounds (3) times three runs with 1,000 children (relay, its workers, the forwarder), two
# with 10, the floors: about 3 minutes here, with room for a shared machine's pauses.
BUDGET_SECONDS = 600
# What ``--against``'s extra variant (one more relay per round) adds to the budget.
AGAINST_SECONDS = 150
STREAM = "bsc/blocks"
# Each child's receive buffer: several whole frames, so the relay's write never waits for
# a reader (the kernel doubles it; net.core.rmem_max caps it). Set before connecting, so
# the window scale is agreed for it.
CHILD_RCVBUF = 2 * 1024 * 1024
# One read takes up to this much: a whole big frame, so one read completes it.
READ_BYTES = 1024 * 1024
# How long after a frame is written the client first reads: the fan-out is over by then
# (checked: arrivals after the first read are counted as disturbed and reported).
SETTLE_BIG = 1.0
SETTLE_SMALL = 0.3
# A frame not at every child this long after it was written counts as missed there.
BLOCK_TIMEOUT = 5.0
# Frames published before the measured ones: first writes grow buffers, warm caches.
WARMUP_BLOCKS = 4
CONNECT_CONCURRENCY = 100
FLOOR_ROUNDS = 5
# A split floor at least this much faster than one thread's: the split writes had cores of
# their own (two free cores give about 2x; one shared core about 1x).
FREE_CORES_GAIN = 1.5
READY_SECONDS = 30.0
# With --profile: blocks published after the measured ones while py-spy samples the relay.
PROFILE_BLOCKS = 10
PROFILE_ROWS = 12
_TIMESPEC = struct.Struct("@qq")
_ANC_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
# Where a frame's position lies in its header (feedframe.HEADER: version, kind, flags,
# stream, then the position, big-endian u64).
_POSITION_AT = 36
_POSITION = struct.Struct(">Q")


# --- the children (client process) ---------------------------------------------------------
CHILDREN_PER_ADDRESS = 16


class Child:
    """One feed session on a plain non-blocking socket, read only by ``drain``. Frames are
    parsed as they stream by without keeping their payloads (only a position's bytes)."""

    __slots__ = ("ctl", "direct", "head", "left", "opcode", "prefix", "sock")

    def __init__(self, sock: socket.socket, direct: bool) -> None:
        self.sock = sock
        self.direct = direct
        self.head = bytearray()  # WebSocket header being read
        self.left = -1  # payload bytes still due for the current frame; -1: in a header
        self.opcode = 0
        self.prefix = bytearray()  # a binary frame's first bytes (its position)
        self.ctl = bytearray()  # a control or text frame's payload

    def take(self, data: memoryview, at: float, out: Arrivals) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.left < 0:
                need = 2
                if len(self.head) >= 2:
                    need += {126: 2, 127: 8}.get(self.head[1] & 0x7F, 0)
                got = min(need - len(self.head), n - i)
                self.head += data[i : i + got]
                i += got
                if len(self.head) < need:
                    continue
                if need == 2 and self.head[1] & 0x7F >= 126:
                    continue  # the extended length is still to come
                size = self.head[1] & 0x7F
                if size == 126:
                    size = int.from_bytes(self.head[2:4], "big")
                elif size == 127:
                    size = int.from_bytes(self.head[2:10], "big")
                self.opcode = self.head[0] & 0x0F
                self.left = size
                self.prefix.clear()
                self.ctl.clear()
                if size:
                    continue
            else:
                got = min(self.left, n - i)
                if self.opcode == 0x2:
                    want = _POSITION_AT + 8 - len(self.prefix)
                    if want > 0:
                        self.prefix += data[i : i + min(got, want)]
                else:
                    self.ctl += data[i : i + got]
                self.left -= got
                i += got
                if self.left:
                    continue
            self._done(at, out)

    def _done(self, at: float, out: Arrivals) -> None:
        self.left = -1
        self.head.clear()
        if self.opcode == 0x2:
            (pos,) = _POSITION.unpack_from(self.prefix, _POSITION_AT)
            if self.direct:
                out.direct.setdefault(pos, at)
            else:
                out.relay.setdefault(pos, []).append(at)
        elif self.opcode == 0x9:  # ping: answer, or be closed
            payload = bytes(self.ctl)
            self.sock.send(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
        elif self.opcode == 0x8:
            out.errors.append(f"closed by the server: {bytes(self.ctl[2:])!r}")
        elif self.opcode == 0x1 and b'"welcome"' not in self.ctl:
            out.errors.append(f"control message: {bytes(self.ctl[:200])!r}")


@dataclass
class Arrivals:
    relay: dict[int, list[float]] = field(default_factory=dict)
    direct: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def drain(children: list[Child], out: Arrivals, buf: bytearray) -> None:
    """Read everything every socket holds; each read carries the kernel's arrival time."""
    view = memoryview(buf)
    for child in children:
        while True:
            try:
                n, anc, _flags, _addr = child.sock.recvmsg_into([buf], _ANC_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                out.errors.append(f"read: {exc}")
                break
            if n == 0:
                out.errors.append("connection closed")
                break
            at = time.time()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack(value)
                    at = sec + nsec / 1e9
            child.take(view[:n], at, out)
            if n < len(buf):
                break


async def open_child(port: int, path: str, direct: bool, source: str = "127.0.0.1") -> Child:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHILD_RCVBUF)
    sock.bind((source, 0))
    sock.setblocking(False)
    rest = await ws_upgrade(sock, port, path)
    await loop.sock_sendall(sock, masked_text_frame(encode_hello([Want(STREAM)])))
    child = Child(sock, direct)
    if rest:
        child.take(memoryview(rest), time.time(), Arrivals())
    return child


def child_source(i: int) -> str:
    """The loopback address child ``i`` connects from: sixteen children to an address, as
    subscribers behind a few hosts would be (a node takes 32 anonymous feed sessions from one
    address at once, ``tree.anon_per_address``; all of 127/8 is loopback)."""
    k = i // CHILDREN_PER_ADDRESS
    return f"127.1.{k // 250}.{k % 250 + 1}"


def children_main(args: argparse.Namespace) -> int:
    """The client process: open the sessions, say ``ready``, then one ``drain`` per line."""

    async def connect() -> list[Child]:
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(port: int, path: str, direct: bool, source: str = "127.0.0.1") -> Child:
            async with gate, asyncio.timeout(20):
                return await open_child(port, path, direct, source)

        direct = await one(args.source_port, "/feed?direct=1", True)
        rest = await asyncio.gather(
            *(one(args.relay_port, "/feed", False, child_source(i)) for i in range(args.count))
        )
        return [direct, *rest]

    children = uvloop.run(connect())
    buf = bytearray(READ_BYTES)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "drain":
            break
        out = Arrivals()
        t0 = os.times()
        drain(children, out, buf)
        t1 = os.times()
        reply = {
            "relay": {str(k): v for k, v in out.relay.items()},
            "direct": {str(k): v for k, v in out.direct.items()},
            "errors": out.errors[:5],
            "cpu": [t1.user - t0.user, t1.system - t0.system],
        }
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    for child in children:
        child.sock.close()
    return 0


# --- the benchmark ---------------------------------------------------------------------------
@dataclass
class Block:
    position: int
    size: int
    big: bool
    wrote_relay: float  # the source's write of it to the relay's session
    wrote_direct: float
    direct: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    relay_cpu: tuple[float, float] = (0.0, 0.0)
    client_cpu: tuple[float, float] = (0.0, 0.0)
    disturbed: int = 0  # arrivals after the client's first read began

    @property
    def one_way(self) -> float:
        """The source → direct child delivery of this frame, seconds."""
        return self.direct - self.wrote_direct

    @property
    def relay_got(self) -> float:
        """When the relay had the whole frame (estimated)."""
        return self.wrote_relay + self.one_way

    def hops_ms(self) -> list[float]:
        return sorted((t - self.relay_got) * 1000 for t in self.arrivals)


def post(port: int, path: str) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, b"")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"POST {path}: {resp.status} {body[:200]!r}")
        return orjson.loads(body)
    finally:
        conn.close()


def wait_for(cond: Any, what: str, timeout: float = READY_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.05)


def read_line(stream: IO[bytes], proc: subprocess.Popen[bytes], what: str) -> bytes:
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what} exited with {proc.wait()}")
    return line


def start_source(port: int, blocks: int) -> tuple[subprocess.Popen[bytes], str]:
    proc = common.spawn(
        "benchmarks.frame_source",
        *(
            "--port",
            str(port),
            "--blocks",
            str(blocks),
            "--corpora",
            str(common.ROOT / "tests" / "corpora"),
            # One run's source ends with the benchmark's whole budget at the latest.
            "--max-seconds",
            str(BUDGET_SECONDS),
        ),
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = read_line(proc.stdout, proc, "the frame source").decode()
    if not line.startswith("ready "):
        raise RuntimeError(f"frame source: {line!r}")
    return proc, line.split()[1]


def relay_toml(source_port: int, trust: str, children: int, workers: int = 1) -> str:
    return (
        # Lands in the [server] table common.Relay opens.
        (f"workers = {workers}\n\n" if workers > 1 else "")
        + f"[limits]\nmax_connections_per_ip = {children + 100}\n\n"
        '[chain]\nprofile = "bsc"\nchain_id = 56\n\n'
        f'[tree]\nregion = "here"\ntrust = ["{trust}"]\n\n'
        f'[[tree.parents]]\nname = "source"\nregion = "here"\n'
        f'url = "ws://127.0.0.1:{source_port}/feed"\n'
    )


def run(
    args: argparse.Namespace,
    stacks: Path,
    forwarder: bool = False,
    workers: int = 1,
    root: Path = common.ROOT,
) -> tuple[list[Block], float, list[int]]:
    """Source, relay (``workers`` processes of ``root``'s chainrelay, or the bare forwarder)
    and children up; publish warm-up then measured blocks; tear down. Also the children
    each relay process held."""
    source_port = common.free_port()
    stack = contextlib.ExitStack()
    with stack:
        extra = PROFILE_BLOCKS if args.profile else 0
        source, trust = start_source(source_port, WARMUP_BLOCKS + args.blocks + extra)
        stack.callback(common.stop_process, source)
        linked: Callable[[], float]
        if forwarder:
            port = common.free_port()
            hop = common.spawn(
                "benchmarks.hop_floor",
                *("--port", str(port), "--parent", f"ws://127.0.0.1:{source_port}/feed"),
                *("--stream", STREAM),
                stdout=subprocess.PIPE,
            )
            stack.callback(common.stop_process, hop)
            assert hop.stdout is not None
            if read_line(hop.stdout, hop, "the bare forwarder").strip() != b"ready":
                raise RuntimeError("bare forwarder not ready")
            pid = hop.pid
            children_url = f"http://127.0.0.1:{port}/children"

            def linked() -> float:
                return float(common.http_get(children_url))
        else:
            relay = common.Relay(
                f"http://127.0.0.1:{source_port}",
                relay_toml(source_port, trust, args.children, workers),
                root=root,
            )
            stack.callback(relay.stop)
            relay.start()
            assert relay.proc is not None
            port, pid = relay.port, relay.proc.pid

            def linked() -> float:
                # A scrape is answered by whichever worker accepted it: keep each one's.
                m = relay.metrics()
                who = next((k for k in m if k.startswith("chainrelay_worker{")), "")
                held[who] = common.metric(m, "chainrelay_feed_children", stream=STREAM)
                return sum(held.values()) if len(held) >= workers else 0.0

        held: dict[str, float] = {}
        stats = f"http://127.0.0.1:{source_port}/stats"
        # One session per node: under workers, the feeder's.
        wait_for(
            lambda: orjson.loads(common.http_get(stats))["relays"] >= 1,
            "the relay's session on the source",
        )
        pids = relay_pids(pid)  # with workers: the supervisor and each worker
        client = common.spawn(
            "benchmarks.tree_hop",
            *("children", "--relay-port", str(port), "--source-port", str(source_port)),
            *("--count", str(args.children)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        stack.callback(common.stop_process, client)
        assert client.stdin is not None and client.stdout is not None
        if read_line(client.stdout, client, "the client").strip() != b"ready":
            raise RuntimeError("client not ready")

        wait_for(lambda: linked() >= args.children, f"{args.children} children linked")

        def drain() -> dict[str, Any]:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"drain\n")
            client.stdin.flush()
            reply: dict[str, Any] = json.loads(read_line(client.stdout, client, "the client"))
            if reply["errors"]:
                raise RuntimeError(f"children: {reply['errors']}")
            return reply

        measured: list[Block] = []
        spy: subprocess.Popen[bytes] | None = None
        extra = PROFILE_BLOCKS if args.profile else 0
        for i in range(WARMUP_BLOCKS + args.blocks + extra):
            if extra and i == WARMUP_BLOCKS + args.blocks:
                spy = start_py_spy(pid, stacks)
                stack.callback(common.stop_process, spy)
            cpu0 = relay_cpu(pids)
            pub = post(source_port, "/publish")
            if len(pub["relay"]) != 1 or len(pub["direct"]) != 1:
                raise RuntimeError(f"source sessions: {pub}")
            b = Block(pub["position"], pub["bytes"], pub["big"], pub["relay"][0], pub["direct"][0])
            time.sleep(SETTLE_BIG if b.big else SETTLE_SMALL)
            first_read = time.time()
            deadline = time.monotonic() + BLOCK_TIMEOUT
            client_cpu = [0.0, 0.0]
            while True:
                reply = drain()
                client_cpu = [a + c for a, c in zip(client_cpu, reply["cpu"], strict=True)]
                b.arrivals += reply["relay"].get(str(b.position), [])
                b.direct = reply["direct"].get(str(b.position), b.direct)
                if (len(b.arrivals) >= args.children and b.direct) or (time.monotonic() > deadline):
                    break
                time.sleep(0.1)
            cpu1 = relay_cpu(pids)
            b.relay_cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
            b.client_cpu = (client_cpu[0], client_cpu[1])
            b.disturbed = sum(1 for t in b.arrivals if t > first_read)
            if WARMUP_BLOCKS <= i < WARMUP_BLOCKS + args.blocks:
                measured.append(b)
        big_frame = next(b.size for b in measured if b.big)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
            spy.wait(30)
    return measured, float(big_frame), [int(held[who]) for who in sorted(held)]  # by worker


def start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    py_spy = common.py_spy()
    return subprocess.Popen(
        [
            *(py_spy, "record", "--pid", str(pid), "--rate", "500", "--nonblocking"),
            *("--format", "raw", "--output", str(output)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def profile_table(stacks: Path) -> str:
    """The relay's busiest Python functions while it fanned out (self / total samples);
    time in C (uvloop, system calls) is charged to the Python frame that called it."""
    raw = stacks.read_text() if stacks.exists() else ""
    total, rows = common.profile_rows(raw, PROFILE_ROWS)
    if not total:
        return "py-spy recorded no samples (not installed, or ptrace not permitted)."
    return (
        f"py-spy, {total} samples of the relay's busy time over {PROFILE_BLOCKS} more blocks "
        "(after the measured ones, so sampling does not touch the numbers above); self / "
        "total share; time in C (uvloop, system calls) is charged to the Python frame that "
        "called it (`pump`: `transport.writelines`, the send system calls).\n\n"
        + common.table(["function", "self", "total"], rows)
    )


def kernel_floor(count: int, size: int, parts: int = 1) -> float:
    """Wall ms for one thread to write ``size`` bytes (a header + frame) on each of
    ``count`` loopback TCP connections whose readers wait; median of a few rounds. With
    ``parts`` > 1, that many processes write a share each at once (first start to last
    end): what worker processes could do at best."""
    server = socket.create_server(("127.0.0.1", 0), backlog=count)
    readers: list[socket.socket] = []
    writers: list[socket.socket] = []
    try:
        for _ in range(count):
            r = socket.socket()
            r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CHILD_RCVBUF)
            r.connect(server.getsockname())
            readers.append(r)
            w, _addr = server.accept()
            w.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writers.append(w)
        for r in readers:
            r.setblocking(False)
        head, data = binary_header(size), b"x" * size
        buf = bytearray(READ_BYTES)
        rounds = []
        for _ in range(FLOOR_ROUNDS):
            if parts > 1:
                rounds.append(_write_in_parts(writers, (head, data), parts))
            else:
                started = time.perf_counter()
                for w in writers:
                    w.sendmsg((head, data))
                rounds.append((time.perf_counter() - started) * 1000)
            for r in readers:
                with contextlib.suppress(BlockingIOError):
                    while r.recv_into(buf) == len(buf):
                        pass
        return common.median(rounds)
    finally:
        for sock in (*readers, *writers, server):
            sock.close()


def _write_in_parts(writers: list[socket.socket], chunks: tuple[bytes, bytes], parts: int) -> float:
    """One write of ``chunks`` on every writer, by ``parts`` forked processes started together."""
    ctx = multiprocessing.get_context("fork")  # the sockets are inherited
    gate = ctx.Barrier(parts + 1)
    times: multiprocessing.SimpleQueue[tuple[float, float]] = ctx.SimpleQueue()
    share = -(-len(writers) // parts)

    def write(mine: list[socket.socket]) -> None:
        gate.wait()
        started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        for w in mine:
            w.sendmsg(chunks)
        times.put((started, time.monotonic()))

    procs = [
        ctx.Process(target=write, args=(writers[i * share : (i + 1) * share],))
        for i in range(parts)
    ]
    for proc in procs:
        proc.start()
    gate.wait()
    spans = [times.get() for _ in procs]
    for proc in procs:
        proc.join()
    return (max(end for _, end in spans) - min(start for start, _ in spans)) * 1000


def side_by_side(bare: dict[str, Any] | None, relay: dict[str, Any]) -> str:
    if not bare:
        return ""
    return (
        f" The bare forwarder with as many children: p50 {bare['p50']:.2f} ms, p99 "
        f"{bare['p99']:.2f} ms, CPU {bare['cpu']:.1f} ms per block (relay / forwarder at "
        f"p50: {relay['p50'] / bare['p50']:.2f}x)."
    )


def workers_text(
    args: argparse.Namespace,
    multi: dict[bool, Any],
    one: dict[bool, Any],
    splits: list[list[int]],
    rounds: list[tuple[dict[bool, Any], dict[bool, Any]]],
    floors: tuple[dict[bool, float], dict[bool, float]],
) -> str:
    """The relay as worker processes beside the one-process relay, per frame kind, pooled
    and round by round (each round ran both, one after the other)."""
    parts = []
    for big, f in multi.items():
        met = f["p50"] <= GOAL_P50_MS and f["p99"] <= GOAL_P99_MS
        base = one.get(big)
        versus = (
            f" ({f['p50'] / base['p50']:.2f}x / {f['p99'] / base['p99']:.2f}x one process's; "
            f"last child {f['last']:.2f} ms against {base['last']:.2f})"
            if base
            else ""
        )
        per = [
            f"{o[big]['p50']:.1f} → {w[big]['p50']:.1f}" for o, w in rounds if big in o and big in w
        ]
        one_floor, split_floor = floors[0].get(big, 0.0), floors[1].get(big, 0.0)
        parts.append(
            f"{'corpus' if big else 'small'} frames p50 {f['p50']:.2f} ms / p99 "
            f"{f['p99']:.2f} ms{versus}, p50 by round (one process → workers) "
            f"{', '.join(per)}; kernel floor with {args.workers} processes writing a share "
            f"each at once {split_floor:.2f} ms (one thread {one_floor:.2f}); "
            f"CPU of all its processes {f['cpu']:.1f} ms per block, "
            f"missed {f['missed']}, arrivals after the client began reading "
            f"{f['disturbed']}: {'met' if met else 'NOT met'}"
        )
    return (
        f"**`chainrelay serve --workers {args.workers}`**, the same config: the feeder worker "
        "links to the source (one relay session on it, as for one process) and passes each "
        "frame on to the other worker over its private listener before its own children; "
        "each worker serves the children the kernel's SO_REUSEPORT hash gave it ("
        + ", ".join(" / ".join(str(n) for n in split) for split in splits)
        + f" of {args.children:,} by round, the feeder's first); "
        + "; ".join(parts)
        + ". A hop is counted from the feeder's receipt of the frame: the other worker's "
        "children carry the extra hop through the feeder. " + _cores_text(args.workers, floors)
    )


def _cores_text(workers: int, floors: tuple[dict[bool, float], dict[bool, float]]) -> str:
    """Whether the writes could run on several cores at all while this ran."""
    one, split = floors
    gains = [one[big] / split[big] for big in one if split.get(big)]
    if not gains:
        return ""
    gain = max(gains)
    if gain >= FREE_CORES_GAIN:
        return (
            f"The writes alone ran {gain:.1f}x faster split over {workers} processes: the "
            "cores were there for the workers to use."
        )
    return (
        f"The writes alone ran only {gain:.1f}x faster split over {workers} processes: while "
        "this ran, they did not get a core each (other work on this shared machine), so "
        "neither could the workers' shares of the fan-out run at once."
    )


def ms(v: float) -> str:
    return f"{v:.2f}"


def summarise(
    blocks: list[Block], children: int, who: str
) -> tuple[list[list[str]], dict[bool, Any]]:
    rows: list[list[str]] = []
    facts: dict[bool, Any] = {}
    for big in (True, False):
        sel = [b for b in blocks if b.big == big and b.arrivals and b.direct]
        if not sel:
            continue
        pairs = [h for b in sel for h in b.hops_ms()]
        firsts = [b.hops_ms()[0] for b in sel]
        mids = [common.median(b.hops_ms()) for b in sel]
        lasts = [b.hops_ms()[-1] for b in sel]
        one_way = [b.one_way * 1000 for b in sel]
        missed = sum(children - len(b.arrivals) for b in sel)
        # Means: CPU times come in clock ticks (10 ms), too coarse for one block's median.
        cpu_user = sum(b.relay_cpu[0] for b in sel) * 1000 / len(sel)
        cpu_sys = sum(b.relay_cpu[1] for b in sel) * 1000 / len(sel)
        client = sum(b.client_cpu[0] + b.client_cpu[1] for b in sel) * 1000 / len(sel)
        p50, p99 = common.quantile(pairs, 0.5), common.quantile(pairs, 0.99)
        kind = "corpus" if big else "small"
        label = f"{who}, {children:,} children, {kind} frames ({sel[0].size / 1000:,.1f} kB)"
        rows.append(
            [
                label,
                str(len(sel)),
                f"**{ms(p50)}**",
                f"**{ms(p99)}**",
                ms(common.median(firsts)),
                ms(common.median(mids)),
                ms(common.median(lasts)),
                ms(common.median(one_way)),
                f"{cpu_user:.1f} + {cpu_sys:.1f}",
                f"{client:.0f}",
            ]
        )
        facts[big] = {
            "p50": p50,
            "p99": p99,
            "first": common.median(firsts),
            "last": common.median(lasts),
            "size": sel[0].size,
            "missed": missed,
            "disturbed": sum(b.disturbed for b in sel),
            "cpu": cpu_user + cpu_sys,
            "blocks": len(sel),
        }
    return rows, facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode")
    kids = sub.add_parser("children", help="(internal) the client process")
    kids.add_argument("--relay-port", type=int, required=True)
    kids.add_argument("--source-port", type=int, required=True)
    kids.add_argument("--count", type=int, required=True)
    ap.add_argument("--children", type=int, default=1000)
    ap.add_argument("--blocks", type=int, default=16, help="measured blocks, big and small")
    ap.add_argument(
        "--few", type=int, default=10, help="then the same with this many children (0: not)"
    )
    ap.add_argument(
        "--no-forwarder", dest="forwarder", action="store_false", help="skip the bare forwarder"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="then the same relay under serve --workers N with as many children (0: not)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs of each 1,000-children config, in turn; their blocks are pooled",
    )
    ap.add_argument("--profile", action="store_true", help="then sample the relay with py-spy")
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--against", metavar="COMMIT", help="also a relay of this older commit")
    args = ap.parse_args(argv)
    if args.mode == "children":
        raise_fd_limit(args.count + 200)
        return children_main(args)
    with contextlib.ExitStack() as trees:
        base = trees.enter_context(common.checkout(args.against)) if args.against else None
        return measure(args, base)


def measure(args: argparse.Namespace, base: Path | None) -> int:
    """Every variant side by side, then the section; ``base``: an older commit's tree."""
    common.budget(BUDGET_SECONDS + (AGAINST_SECONDS if base is not None else 0))
    raise_fd_limit(2 * args.children + 500)  # the floor's pairs
    m = common.machine()
    # Side by side: the same relay as worker processes with as many children (the fan-out
    # split between processes) and the bare forwarder with as many children (what the hop
    # costs if the relay's own work were free), in turn for --rounds rounds so that a
    # shared machine's load falls on each alike; then the relay and the forwarder with a
    # handful of children (the work per frame with next to no fan-out behind it).
    multi = f"relay, --workers {args.workers}"
    many = [("relay", 1)]
    if args.workers > 1:
        many.append((multi, args.workers))
    if args.forwarder:
        many.append(("bare forwarder", 1))
    older = f"relay at {common.commit_name(args.against)}" if base is not None else ""
    if older:
        many.append((older, 1))
    got: dict[str, list[Block]] = {who: [] for who, _ in many}
    per_round: dict[str, list[dict[bool, Any]]] = {who: [] for who, _ in many}
    splits: list[list[int]] = []
    profiled = ""
    big_size = 0.0
    quiet = argparse.Namespace(**{**vars(args), "profile": False})
    for r in range(args.rounds):
        for who, workers in many:
            profiling = who == "relay" and r == 0 and args.profile
            with tempfile.TemporaryDirectory(prefix="chainrelay-hop-") as tmp:
                stacks = Path(tmp) / "stacks.txt"
                measured, big_size, held = run(
                    args if profiling else quiet,
                    stacks,
                    forwarder=who == "bare forwarder",
                    workers=workers,
                    root=base if who == older and base is not None else common.ROOT,
                )
                if profiling:
                    profiled = profile_table(stacks)
            got[who] += measured
            per_round[who].append(summarise(measured, args.children, who)[1])
            if who == multi:
                splits.append(held)
    blocks = got["relay"]
    small_size = next((b.size for b in blocks if not b.big), 0)
    sizes = {True: int(big_size), False: small_size}
    floors = {
        True: kernel_floor(args.children, int(big_size)),
        False: kernel_floor(args.children, small_size),
    }
    split_floors = (
        {big: kernel_floor(args.children, size, args.workers) for big, size in sizes.items()}
        if args.workers > 1
        else {}
    )
    rows, facts = summarise(blocks, args.children, "relay")
    other: dict[tuple[str, int], dict[bool, Any]] = {}
    for who, _ in many[1:]:
        more, other[who, args.children] = summarise(got[who], args.children, who)
        rows += more
    configs = []
    if args.few:
        configs.append(("relay", args.few))
        if args.forwarder:
            configs.append(("bare forwarder", args.few))
    for who, count in configs:
        cfg = argparse.Namespace(**{**vars(quiet), "children": count})
        with tempfile.TemporaryDirectory(prefix="chainrelay-hop-") as tmp:
            few, _, _ = run(cfg, Path(tmp) / "stacks.txt", forwarder=who == "bare forwarder")
        more, other[who, count] = summarise(few, count, who)
        rows += more
    texts = []
    for big, f in facts.items():
        floor = floors[big]
        met = f["p50"] <= GOAL_P50_MS and f["p99"] <= GOAL_P99_MS
        texts.append(
            f"**{'Corpus' if big else 'Small'} frames ({f['size']:,} bytes)**: p50 "
            f"{f['p50']:.2f} ms ({f['p50'] / GOAL_P50_MS:.1f}x the {GOAL_P50_MS:.0f} ms goal), "
            f"p99 {f['p99']:.2f} ms ({f['p99'] / GOAL_P99_MS:.1f}x the {GOAL_P99_MS:.0f} ms "
            f"goal): {'met' if met else 'NOT met'}. Kernel floor: one thread writing this "
            f"frame on {args.children} waiting loopback connections takes {floor:.2f} ms "
            f"(median of {FLOOR_ROUNDS}); the last child's median hop is "
            f"{f['last'] / floor:.1f}x that. Relay CPU {f['cpu']:.1f} ms per block. "
            f"Missed: {f['missed']}; arrivals after the client began reading: "
            f"{f['disturbed']}."
            + side_by_side(other.get(("bare forwarder", args.children), {}).get(big), f)
        )
    if (multi, args.children) in other:
        rounds = list(zip(per_round["relay"], per_round[multi], strict=True))
        texts.append(
            workers_text(
                args,
                other[multi, args.children],
                facts,
                splits,
                rounds,
                (floors, split_floors),
            )
        )
    if (older, args.children) in other:
        texts.append(
            f"Against {older}, {args.children:,} children, in the same rounds: "
            + " and ".join(
                f"{'corpus' if big else 'small'} frames p50 {f['p50']:.2f} ms against "
                f"{o['p50']:.2f} (this commit / {older.removeprefix('relay at ')}: "
                f"{f['p50'] / o['p50']:.2f}x), p99 {f['p99']:.2f} against {o['p99']:.2f}"
                for big, f in facts.items()
                if (o := other[older, args.children].get(big))
            )
            + "."
        )
    if ("relay", args.few) in other:
        relay_few = other["relay", args.few]
        bare_few = other.get(("bare forwarder", args.few), {})
        texts.append(
            f"With {args.few} children, the relay's hop is "
            + " and ".join(
                f"{f['p50']:.2f} ms p50 / {f['p99']:.2f} ms p99 for "
                f"{'corpus' if big else 'small'} frames"
                + (
                    f" (bare forwarder {bare_few[big]['p50']:.2f} / {bare_few[big]['p99']:.2f})"
                    if big in bare_few
                    else ""
                )
                for big, f in relay_few.items()
            )
            + ": the work per frame (the read of the frame from the parent, decode and "
            "signature check, the fan-out loop) with next to no fan-out behind it; the bare "
            "forwarder reads with the same WebSocket library and writes the same way, so "
            "what it costs is the process and its libraries, not the relay's own work."
        )
    if facts:
        # A fan-out writes children one after another: the median child waits for half of
        # them, so a p50 goal is a budget per child write.
        budget_us = GOAL_P50_MS * 1000 / (args.children / 2)
        per_write = {big: floors[big] * 1000 / args.children for big in facts}
        texts.append(
            "What bounds it: one relay writes its children one after another, so the median "
            f"child waits for {args.children // 2} writes; a {GOAL_P50_MS:.0f} ms p50 leaves "
            f"{budget_us:.1f} µs per child write, and the kernel alone takes "
            + " and ".join(
                f"{per_write[big]:.1f} µs per write of a {'corpus' if big else 'small'} frame"
                for big in facts
            )
            + " here (the floor above: on loopback each send also runs the receiver's TCP "
            f"input, and a corpus frame is a {big_size / 1000:.0f} kB copy per child, "
            f"{big_size * args.children / 1e6:.0f} MB per block for {args.children:,}). "
            "The relay's own work per frame (receive, verify, then the fan-out loop) "
            "shows in the first child's hop. What would change it: fewer children per node "
            "(a wider, deeper tree: the hop grows with children per node, the path with "
            "depth), children spread over worker processes (`--workers` above: each writes "
            "its share of the children, on its own core), and on real hosts a NIC instead "
            "of loopback (the receiver's TCP work leaves the sender's CPU); a per-child copy "
            "of large frames remains unless the kernel sends them without copying "
            "(MSG_ZEROCOPY, sendfile from one shared buffer; over a NIC, not loopback)."
        )
    body = "\n\n".join(
        [
            "## Per-hop latency, 1,000 children (`tree_hop.py`)",
            common.machine_line(m),
            f"One `chainrelay serve` relay, its only parent a frame source process "
            f"(`frame_source.py`), {args.children} `/feed` children in one client process "
            "(plain sockets, read only after each fan-out; arrival = the kernel's time stamp "
            "of the read completing the frame). Hop = arrival - (source's write to the relay "
            "+ the same frame's source → direct child time, measured per block in the same "
            "run). Corpus frames (mainnet block 18,000,000, re-signed per position) and small "
            "frames (the same block cut to one transaction) in turn. ms; *first / median / "
            "last child*: medians over blocks of each block's first, median and last child; "
            "*relay CPU*: user + system ms per block (mean); *client CPU*: ms per block, all "
            "of it after the fan-out. The rows with "
            f"{args.children:,} children pool {args.rounds} rounds; each round ran the relay"
            + (f", the relay under `--workers {args.workers}`" if args.workers > 1 else "")
            + (" and the bare forwarder" if args.forwarder else "")
            + (f" and the {older}" if older else "")
            + " one after another, so a shared machine's load falls on each alike.",
            common.table(
                [
                    "children, frames",
                    "blocks",
                    "p50",
                    "p99",
                    "first child",
                    "median child",
                    "last child",
                    "source → direct child",
                    "relay CPU ms",
                    "client CPU ms",
                ],
                rows,
            ),
            *texts,
            *([profiled] if profiled else []),
        ]
    )
    print(body)
    if not args.no_write:
        common.write_section("tree_hop", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
