"""Fan-out to many ``eth_subscribe("newHeads")`` subscribers of one relay node.

One relay follows anvil over WebSocket; ``--subscribers`` WebSocket clients (5,000) each
hold one newHeads subscription on it, and one more subscriber listens to anvil directly.
anvil mines a block with one transfer every ``--interval`` seconds, ``--blocks`` times.
For every block the script records when anvil's own subscriber got it and when the first
and the last relay subscriber did (the kernel's receive time of each read, one clock for
every connection), and gives:

* **first - anvil**: the head reaching the node and the node adopting it (newHeads go out
  as the head is adopted; the block and its receipts are fetched after);
* **last - first**: the fan-out itself: the node's pass over every subscriber and the
  kernel carrying each write into the subscriber's socket;
* **last - anvil**: what the slowest subscriber sees.

Memory per idle subscriber: the relay's RSS after a warm-up batch of subscribers and a few
blocks (one-time costs paid), and again once every other subscriber is subscribed and
idle; the difference divided by their number.

The client is one process of plain non-blocking sockets: the event loop only opens them
(a WebSocket handshake and the subscribe call), and after each block one pass reads every
socket with ``recvmsg``, which hands back the time the kernel received the data
(SO_TIMESTAMPNS). That pass starts ``READ_AFTER`` after the block, once the relay's fan-out
is over, so the client's own reading (its CPU per block is printed) neither competes with
the relay for the CPUs nor counts in the times. The file descriptor limit is raised here
for both processes.

    python -m benchmarks.subscribers [--subscribers 5000] [--blocks 35] [--interval 1.0]
                                      [--workers 1 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import resource
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from benchmarks import common
from chainrelay.devnet import DEV_ACCOUNTS

GOAL_LAST_P99_MS = 50.0
GOAL_KB_PER_SUBSCRIBER = 30.0
# Subscribers connected before the memory baseline, so one-time costs (the feed starting,
# first buffers, imports) are not charged to the idle ones.
WARMUP_SUBSCRIBERS = 200
WARMUP_BLOCKS = 3
# Connections opened at once: stays well inside the listen backlog.
CONNECT_CONCURRENCY = 100
# A block not received by every subscriber within this long counts as missed by the rest.
BLOCK_TIMEOUT = 5.0
BUDGET_SECONDS = 300
# Rounds of the kernel-floor measurement (plain sends, no relay), of which the median.
FLOOR_ROUNDS = 7
# How long after mining a block the client first reads: the fan-out is (nearly always) over
# by then, so this client's reads do not compete with the relay for the CPUs; arrival
# times come from the kernel (SO_TIMESTAMPNS), not from when the client got round to reading.
READ_AFTER = 0.3
# Bytes asked for by one read: a few notifications' worth.
RECV_BYTES = 16 * 1024
# SO_TIMESTAMPNS (Linux, asm-generic): each read comes with the time the kernel received
# its data, as a struct timespec on the wall clock. The socket module lacks the name.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
_ANC_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)
_KEY = base64.b64encode(os.urandom(16)).decode()
_NUMBER = b'"number":"0x'
_SUBSCRIBE = b'{"jsonrpc":"2.0","id":1,"method":"eth_subscribe","params":["newHeads"]}'


def masked_text_frame(payload: bytes) -> bytes:
    """A client text frame; the zero mask leaves the payload as it is (any key is valid)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    else:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + payload


async def ws_upgrade(sock: socket.socket, port: int, path: str = "/") -> bytes:
    """Connect the non-blocking ``sock`` to 127.0.0.1:``port`` and upgrade it to a WebSocket
    on ``path``, then time-stamp its reads (SO_TIMESTAMPNS); the bytes read past the
    handshake's answer."""
    loop = asyncio.get_running_loop()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise RuntimeError("closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade refused: {head[:120]!r}")
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    return head[head.index(b"\r\n\r\n") + 4 :]


@dataclass
class BlockTimes:
    first: float = float("inf")
    last: float = 0.0
    count: int = 0


@dataclass
class Receipts:
    """Receive times by block number: direct (anvil) and relay subscribers."""

    relay: dict[int, BlockTimes] = field(default_factory=dict)
    direct: dict[int, float] = field(default_factory=dict)
    subscribed: int = 0
    errors: list[str] = field(default_factory=list)
    frame_bytes: int = 0  # size of a relay notification's frame, for the kernel floor

    def got(self, number: int, direct: bool, now: float) -> None:
        if direct:
            self.direct.setdefault(number, now)
            return
        t = self.relay.get(number)
        if t is None:
            t = self.relay[number] = BlockTimes()
        t.count += 1
        if now < t.first:
            t.first = now
        if now > t.last:
            t.last = now


class Subscriber:
    """One WebSocket connection holding one newHeads subscription, on a plain non-blocking
    socket: opened through the event loop, then read only by ``drain``."""

    __slots__ = ("buf", "closed", "direct", "sock")

    def __init__(self, sock: socket.socket, direct: bool) -> None:
        self.sock = sock
        self.direct = direct
        self.buf = b""
        self.closed = False

    def take(self, data: bytes, at: float, receipts: Receipts) -> None:
        """The bytes of one read, which the kernel received at ``at`` (wall clock)."""
        buf = self.buf + data if self.buf else data
        pos = 0
        while len(buf) - pos >= 2:
            opcode, n, start = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, pos + 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            end = start + n
            if end > len(buf):
                break
            first, pos = pos, end
            if opcode == 0x1:
                got = buf.find(_NUMBER, start, end)
                if got >= 0:
                    got += len(_NUMBER)
                    receipts.got(int(buf[got : buf.index(b'"', got)], 16), self.direct, at)
                    if not self.direct:
                        receipts.frame_bytes = end - first
                elif b'"result":"0x' not in buf[start:end]:
                    receipts.errors.append(f"subscribe refused: {buf[start:end][:200]!r}")
            elif opcode == 0x9:  # ping: answer, or be closed
                self.sock.send(bytes([0x8A, 0x80 | n]) + b"\0\0\0\0" + buf[start:end])
            elif opcode == 0x8:
                receipts.errors.append(f"closed by the server: {buf[start + 2 : end]!r}")
                self.closed = True
        self.buf = buf[pos:]


def drain(subs: list[Subscriber], receipts: Receipts) -> None:
    """Read what every connection has; each read carries the kernel's arrival time."""
    for sub in subs:
        if sub.closed:
            continue
        while True:
            try:
                data, anc, _flags, _addr = sub.sock.recvmsg(RECV_BYTES, _ANC_SPACE)
            except BlockingIOError:
                break
            if not data:
                receipts.errors.append("connection closed")
                sub.closed = True
                break
            at = time.time()
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack(value)
                    at = sec + nsec / 1e9
            sub.take(data, at, receipts)
            if len(data) < RECV_BYTES:
                break  # nothing more queued when this read was made


async def subscribe(
    port: int, receipts: Receipts, count: int, direct: bool = False
) -> list[Subscriber]:
    """``count`` connections to 127.0.0.1:``port``, each upgraded and subscribed."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    subs: list[Subscriber] = []

    async def one() -> None:
        async with gate, asyncio.timeout(20):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sub = Subscriber(sock, direct)
            subs.append(sub)
            rest = await ws_upgrade(sock, port)
            await loop.sock_sendall(sock, masked_text_frame(_SUBSCRIBE))
            while b'"result":"0x' not in rest and b'"error"' not in rest:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise RuntimeError("closed before the subscription was answered")
                rest += chunk
            sub.take(rest, time.time(), receipts)  # the answer, and any head right behind it
            receipts.subscribed += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return subs


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def kernel_floor(count: int, size: int) -> float:
    """Wall milliseconds for one thread to ``send`` ``size`` bytes on each of ``count``
    loopback TCP connections whose reader is not waiting (as the subscribers are): what
    the kernel alone costs a fan-out here, now. Median of a few rounds."""
    server = socket.create_server(("127.0.0.1", 0), backlog=count)
    readers, writers = [], []
    try:
        for _ in range(count):
            readers.append(socket.create_connection(server.getsockname()))
            writer, _addr = server.accept()
            writer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writers.append(writer)
        for r in readers:
            r.setblocking(False)
        data = b"x" * size
        rounds = []
        for _ in range(FLOOR_ROUNDS):
            started = time.perf_counter()
            for w in writers:
                w.send(data)
            rounds.append((time.perf_counter() - started) * 1000)
            for r in readers:
                with contextlib.suppress(BlockingIOError):
                    r.recv(RECV_BYTES)
        return common.median(rounds)
    finally:
        for sock in (*readers, *writers, server):
            sock.close()


def relay_pids(pid: int) -> list[int]:
    """The relay process and its children (the workers of ``serve --workers N``)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [pid, *children]


def relay_rss_kib(pids: list[int]) -> int:
    return sum(rss_kib(p) for p in pids)


def relay_cpu(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the relay's processes together."""
    times = [common.cpu_times(p) for p in pids]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, need))
    if want < need:
        raise SystemExit(f"need {need} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the relay inherits it


@dataclass
class Result:
    first_ms: list[float]
    spread_ms: list[float]
    last_ms: list[float]
    missed: int
    missed_blocks: list[int]
    blocks: int
    client_user_ms: float
    client_sys_ms: float
    relay_user_ms: float
    relay_sys_ms: float
    kib_per_subscriber: float
    rss_before_mib: float
    rss_after_mib: float
    frame_bytes: int


async def run(args: argparse.Namespace, anvil_ws_port: int, relay: common.Relay) -> Result:
    assert relay.proc is not None
    pids = relay_pids(relay.proc.pid)
    receipts = Receipts()
    miner = common.RpcClient(f"http://127.0.0.1:{anvil_ws_port}")
    conns: list[Subscriber] = []
    n = 0

    async def mine() -> int:
        nonlocal n
        n += 1
        tx = {"from": DEV_ACCOUNTS[0], "to": DEV_ACCOUNTS[1], "value": hex(n)}
        await asyncio.to_thread(miner.call, "eth_sendTransaction", [tx])  # automine: a block
        return int(await asyncio.to_thread(miner.call, "eth_blockNumber", []), 16)

    async def all_got(number: int, want: int, timeout: float) -> bool:
        """Read every connection a while after the block, then again until all have it."""
        deadline = time.monotonic() + timeout
        await asyncio.sleep(READ_AFTER)
        while True:
            drain(conns, receipts)
            t = receipts.relay.get(number)
            if t is not None and t.count >= want and number in receipts.direct:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(READ_AFTER / 10)

    try:
        conns += await subscribe(anvil_ws_port, receipts, 1, direct=True)
        conns += await subscribe(relay.port, receipts, WARMUP_SUBSCRIBERS)
        for _ in range(WARMUP_BLOCKS):
            await all_got(await mine(), WARMUP_SUBSCRIBERS, BLOCK_TIMEOUT)
        await asyncio.sleep(0.5)  # let the relay's buffers drain before the baseline
        drain(conns, receipts)
        before = relay_rss_kib(pids)
        rest = args.subscribers - WARMUP_SUBSCRIBERS
        conns += await subscribe(relay.port, receipts, rest)
        await asyncio.sleep(1.0)  # idle: nothing is sent to subscribers between blocks
        after = relay_rss_kib(pids)
        drain(conns, receipts)
        if receipts.errors:
            raise RuntimeError(f"{len(receipts.errors)} subscriber errors: {receipts.errors[:3]}")

        numbers: list[int] = []
        cpu0, rcpu0 = os.times(), relay_cpu(pids)
        for _ in range(args.blocks):
            started = time.monotonic()
            number = await mine()
            numbers.append(number)
            await all_got(number, args.subscribers, BLOCK_TIMEOUT)
            await asyncio.sleep(max(0.0, args.interval - (time.monotonic() - started)))
        cpu1 = os.times()
        client_user, client_sys = cpu1.user - cpu0.user, cpu1.system - cpu0.system
        rcpu1 = relay_cpu(pids)
        relay_user, relay_sys = rcpu1[0] - rcpu0[0], rcpu1[1] - rcpu0[1]
    finally:
        for sub in conns:
            sub.sock.close()
        miner.close()

    first, spread, last = [], [], []
    missed = 0
    missed_blocks: list[int] = []
    for number in numbers:
        t = receipts.relay.get(number)
        d = receipts.direct.get(number)
        if t is None or d is None:
            missed += args.subscribers
            missed_blocks.append(number)
            continue
        if t.count < args.subscribers:
            missed += args.subscribers - t.count
            missed_blocks.append(number)
        first.append((t.first - d) * 1000)
        spread.append((t.last - t.first) * 1000)
        last.append((t.last - d) * 1000)
    return Result(
        first,
        spread,
        last,
        missed,
        missed_blocks,
        len(numbers),
        client_user / len(numbers) * 1000,
        client_sys / len(numbers) * 1000,
        relay_user / len(numbers) * 1000,
        relay_sys / len(numbers) * 1000,
        (after - before) / rest,
        before / 1024,
        after / 1024,
        receipts.frame_bytes,
    )


def ms(values: list[float], q: float) -> str:
    return f"{common.quantile(values, q):.1f}"


def measure(args: argparse.Namespace, workers: int) -> Result:
    """One relay (``workers`` processes on the port) in front of a fresh anvil."""
    toml = (
        f"workers = {workers}\n\n"  # lands in the [server] table the relay's config opens
        f"[limits]\nmax_connections_per_ip = {args.subscribers + 100}\n\n"
        f"[subscriptions]\nmax_per_ip = {args.subscribers + 100}\n"
    )
    with contextlib.ExitStack() as stack:
        anvil = common.start_anvil(block_time=None)
        stack.callback(anvil.stop)
        poker = common.RpcClient(anvil.url)
        stack.callback(poker.close)
        relay = common.Relay(anvil.ws_url, toml)
        stack.callback(relay.stop)
        relay.start(poke=lambda: poker.call("evm_mine", []))
        port = int(anvil.url.rsplit(":", 1)[1])
        return uvloop.run(run(args, port, relay))


def report(args: argparse.Namespace, workers: int, res: Result) -> tuple[list[list[str]], str]:
    """Latency rows and a paragraph for one relay configuration."""
    who = "1 relay process" if workers == 1 else f"{workers} relay processes"
    rows = [
        [who, "first relay subscriber - anvil's", ms(res.first_ms, 0.5), ms(res.first_ms, 0.99)],
        [who, "last - first (fan-out)", ms(res.spread_ms, 0.5), ms(res.spread_ms, 0.99)],
        [who, "last relay subscriber - anvil's", ms(res.last_ms, 0.5), ms(res.last_ms, 0.99)],
    ]
    cpu = res.relay_user_ms + res.relay_sys_ms
    per_sub_us = cpu / args.subscribers * 1000
    missed_in = f" (in blocks {res.missed_blocks})" if res.missed_blocks else ""
    p99_last = common.quantile(res.last_ms, 0.99)
    met = "met" if p99_last <= GOAL_LAST_P99_MS else "NOT met"
    kib_met = "met" if res.kib_per_subscriber * 1.024 <= GOAL_KB_PER_SUBSCRIBER else "NOT met"
    text = (
        f"**{who}**: {res.blocks} blocks, one every {args.interval:.1f} s; notifications "
        f"missed: {res.missed}{missed_in}. Relay CPU per block: {res.relay_user_ms:.1f} ms "
        f"user + {res.relay_sys_ms:.1f} ms system, {per_sub_us:.1f} µs per subscriber (one "
        "socket write each; on loopback the sender's write also runs the receiver's TCP "
        f"input), {'on one thread' if workers == 1 else f'spread over {workers} processes'}. RSS "
        f"{res.rss_before_mib:.1f} MiB with the warm-up subscribers, {res.rss_after_mib:.1f} "
        f"MiB with all: {res.kib_per_subscriber:.1f} KiB per idle subscriber. This client: "
        f"{res.client_user_ms:.1f} ms user + {res.client_sys_ms:.1f} ms system per block, "
        f"reading {READ_AFTER * 1000:.0f} ms after each block, outside the times. Goals: "
        f"last subscriber within {GOAL_LAST_P99_MS:.0f} ms of the head at p99 "
        f"({p99_last:.1f} ms, {met}); ≤ {GOAL_KB_PER_SUBSCRIBER:.0f} KB per idle subscriber "
        f"({kib_met})."
    )
    return rows, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", type=int, default=5000)
    ap.add_argument("--blocks", type=int, default=35)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between blocks")
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="relay configurations to measure, by worker processes (serve --workers N)",
    )
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args(argv)
    if args.subscribers <= WARMUP_SUBSCRIBERS:
        ap.error(f"--subscribers must be above the {WARMUP_SUBSCRIBERS} warm-up subscribers")
    common.budget(BUDGET_SECONDS)
    raise_fd_limit(2 * args.subscribers + 1000)  # the kernel floor's pairs, at the end
    m = common.machine()
    rows: list[list[str]] = []
    texts: list[str] = []
    size = 0
    results: list[tuple[int, Result]] = []
    for workers in args.workers:
        res = measure(args, workers)
        results.append((workers, res))
        size = res.frame_bytes or size
        more, text = report(args, workers, res)
        rows += more
        texts.append(text)
    floor = kernel_floor(args.subscribers, size)
    texts.append(
        f"Kernel floor, measured right after on the same machine: one thread sending a "
        f"{size}-byte frame on each of {args.subscribers} loopback TCP connections takes "
        f"{floor:.1f} ms (median of {FLOOR_ROUNDS} rounds), the fan-out's length if a relay "
        "did nothing but write."
    )
    workers, res = results[0]
    q = common.median
    texts.append(
        f"Where the last subscriber's time goes ({workers} relay process"
        f"{'' if workers == 1 else 'es'}, medians): {q(res.first_ms):.1f} ms from anvil's "
        f"subscriber to the relay's first, then {q(res.spread_ms):.1f} ms of fan-out; the "
        f"relay's whole CPU per block is {res.relay_user_ms:.1f} ms user + "
        f"{res.relay_sys_ms:.1f} ms system, against {floor:.1f} ms for the writes alone "
        f"(kernel floor); the rest is waiting for a CPU (load average {m['load']} at the "
        f"start, {m['nproc']} CPUs shared with the client, anvil and other work)."
    )
    body = "\n\n".join(
        [
            "## `subscribers.py`",
            f"{args.subscribers} WebSocket `newHeads` subscribers on one relay (one process, "
            "then worker processes sharing the port) in front of anvil (followed over "
            "WebSocket; under workers by the feeder worker alone, which passes each head to "
            "the others as it adopts it). Times per block are the kernel's receive times of "
            "each subscriber's read (SO_TIMESTAMPNS), read after the fan-out by one client "
            "process; anvil's own subscriber marks the head's arrival.",
            common.machine_line(m),
            common.table(["relay", "per block, ms", "p50", "p99"], rows),
            *texts,
        ]
    )
    print(body)
    if not args.no_write:
        common.write_section("subscribers", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
