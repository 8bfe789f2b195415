"""Regions for system tests: Linux network namespaces joined by a bridge, slowed by delay links.

A ``RegionLab`` makes one hub namespace holding a bridge, and one namespace per region with
``lo`` up and a veth into the hub; every region has an address on the lab's private /24, and
regions reach each other through the bridge with next to no delay. Nothing is added to the
root namespace: no interface, address or route.

Link delay: the kernel the lab runs on has no ``netem`` qdisc (nor fq, etf or cake), so the lab
delays in user space. ``lab.link(src, dst, port, rtt_ms)`` starts a ``tests.lab.delay_link``
process inside ``src`` that listens on its loopback and carries each connection to
``dst.address:port``, holding the data ``rtt_ms / 2`` each way. TCP handshakes are not
delayed; data is. A process in ``src`` that should sit ``rtt_ms`` away from ``dst`` is given
the link's address instead of ``dst``'s (a parent URL becomes ``ws://127.0.0.1:<port>/feed``).

The test process stays in the root namespace. It reaches a node in a region through
``region.expose(port)``: a delay link with no delay, listening on the root namespace's
loopback, whose outgoing connections are opened inside the region (``setns`` before the first
outgoing socket; a socket keeps the namespace it was created in). Any client works through it
(aiohttp, web3.py, websockets), and it costs one local hop, not a process per call.

Clean-up: ``close()`` (or leaving the ``with`` block, failed test or not) ends the lab's
processes by PID (SIGTERM, then SIGKILL), then any process still inside one of its
namespaces (by PID, as ``ip netns pids`` lists them), then deletes the namespaces. Names carry
the creating process's PID (``cr<pid>-<n>-<region>``), so parallel labs never collide, and a
new lab deletes namespaces of that pattern whose creator is dead (a crashed earlier run).

Usage::

    with RegionLab(procs) as lab:
        a, b = lab.add_region("a"), lab.add_region("b")
        b.spawn([sys.executable, "-m", "http.server", "--bind", b.address, "8000"])
        host, port = lab.link(a, b, 8000, rtt_ms=80)     # for processes inside a
        url = b.url(8000)                                 # for the test process
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tests.lab.delay_link import DEFAULT_MAX_SECONDS
from tests.lab.procs import ROOT, Procs, stop_all
from tests.lab.timing import SECOND

# Every lab's namespaces start with "cr<pid>-<n>-"; the PID says whether the creator lives.
NAME_PATTERN = re.compile(r"^cr(\d+)-(\d+)-")
# Region names become namespace names; short and plain keeps them legible in `ip netns list`.
REGION_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
# Hosts .1 to .250 of the lab's /24: far more regions than a 2-core machine can run.
MAX_REGIONS = 250
# 10.213.0.0/16 is private and unused on this machine; each lab takes one /24 of it. Labs never
# share a bridge, so two labs with the same /24 would still not see each other.
SUBNET_BASE = ipaddress.IPv4Address("10.213.0.0")
# A delay link that has not said "ready" by then is broken, not slow (it starts in ~0.2 s).
LINK_READY_TIMEOUT = 10 * SECOND
# Processes get this long to stop after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5 * SECOND
# A lab's delay links stop by themselves after this long: the link's own default, scaled like
# every deadline so a slowed run's links do not vanish under a test still running.
LINK_MAX_SECONDS = DEFAULT_MAX_SECONDS * SECOND

_labs = itertools.count()


def unavailable() -> str | None:
    """Why a lab cannot be built here (for ``pytest.skip``), or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


def ip(*args: str) -> str:
    """Run one ``ip`` command; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    """Names of every named network namespace on the machine."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def remove_stale() -> list[str]:
    """Delete lab namespaces whose creating process is dead; returns their names."""
    gone = []
    for name in namespaces():
        m = NAME_PATTERN.match(name)
        if m and not pid_alive(int(m.group(1))):
            with contextlib.suppress(RuntimeError):
                ip("netns", "del", name)
                gone.append(name)
    return gone


def stop_pids(pids: list[int]) -> None:
    """SIGKILL processes that are not our children (no Popen to wait on), by PID."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass(eq=False)
class Region:
    """One network namespace of a lab, with an address every other region can reach."""

    lab: RegionLab
    name: str
    netns: str
    address: str
    # (host, port) inside the region -> its address in the root namespace, one link each.
    exposed: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    def spawn(self, argv: list[str], **popen_kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside this region; the lab and the test's ``Procs`` stop it by PID.

        ``ip netns exec`` execs the command, so ``proc.pid`` is the command's own PID. The
        working directory defaults to the repository root, for ``python -m tests.lab...``.
        """
        popen_kw.setdefault("cwd", ROOT)
        return self.lab._spawn(["ip", "netns", "exec", self.netns, *argv], popen_kw)

    def expose(self, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
        """An address in the root namespace whose connections reach ``host:port`` as opened
        from inside this region; call it so the test process can talk to a node here.

        ``host`` defaults to the region's loopback; give another region's address to go
        from here to there over the bridge. Asking twice for the same place gives the same
        address (one link process each). The root-side connection is accepted at once, so a
        port nobody listens on yet shows as a connection closed (reset) right after it opened,
        not as a refusal.
        """
        if (host, port) not in self.exposed:
            self.exposed[host, port] = self.lab._start_link(
                ["--to", f"{host}:{port}", "--delay-ms", "0", "--netns", self.netns],
                None,
                LINK_MAX_SECONDS,
            )
        return self.exposed[host, port]

    def url(self, port: int, path: str = "", scheme: str = "http", host: str = "127.0.0.1") -> str:
        """``expose(port, host)`` as a URL: ``url(8545)``, ``url(p, "/feed", "ws")``."""
        local_host, local_port = self.expose(port, host)
        return f"{scheme}://{local_host}:{local_port}{path}"


class RegionLab:
    """Namespaces, bridge and processes of one test; ``with RegionLab(procs) as lab: ...``."""

    def __init__(self, procs: Procs) -> None:
        self.test_procs = procs
        self.number = next(_labs)
        self.prefix = f"cr{os.getpid()}-{self.number}-"
        self.hub = self.prefix + "hub"
        self.subnet = ipaddress.IPv4Network((int(SUBNET_BASE) + (self.number % 256) * 256, 24))
        self.regions: dict[str, Region] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.made: list[str] = []

    def __enter__(self) -> RegionLab:
        try:
            self.open()
        except BaseException:
            # __exit__ does not run when __enter__ fails; a half-made hub must still go.
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Clear dead labs' leftovers and make the hub namespace with its bridge."""
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        remove_stale()
        self._add_netns(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")

    def add_region(self, name: str) -> Region:
        """A new namespace on the bridge; ``Region.address`` is where others reach it."""
        if not REGION_NAME.match(name) or name == "hub" or name in self.regions:
            raise ValueError(f"region name {name!r} is taken or not [a-z][a-z0-9]{{0,11}}")
        index = len(self.regions) + 1
        if index > MAX_REGIONS:
            raise ValueError(f"a lab holds at most {MAX_REGIONS} regions")
        netns = self.prefix + name
        address = str(self.subnet.network_address + index)
        self._add_netns(netns)
        ip("-n", netns, "link", "set", "lo", "up")
        # Made inside the hub with its peer sent straight to the region: the root namespace
        # never holds either end, even for a moment.
        port = f"p{index}"
        ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", netns)  # fmt: skip
        ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
        ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        region = Region(self, name, netns, address)
        self.regions[name] = region
        return region

    def link(
        self,
        src: Region,
        dst: Region,
        dst_port: int,
        rtt_ms: float,
        *,
        max_seconds: float = LINK_MAX_SECONDS,
    ) -> tuple[str, int]:
        """Start a delay link inside ``src`` to ``dst.address:dst_port``, ``rtt_ms`` round
        trip; returns the address (on ``src``'s loopback) that ``src``'s processes should use.
        """
        return self._start_link(
            ["--to", f"{dst.address}:{dst_port}", "--delay-ms", str(rtt_ms / 2)],
            src,
            max_seconds,
        )

    def close(self) -> None:
        """Stop every process (lab's first, then any left in its namespaces), then delete the
        namespaces; errors are collected and raised after everything was tried."""
        errors: list[str] = []
        stop_all(self.procs, STOP_TIMEOUT)
        for netns in reversed(self.made):
            try:
                stop_pids([int(p) for p in ip("netns", "pids", netns).split()])
                ip("netns", "del", netns)
            except RuntimeError as exc:
                errors.append(str(exc))
        self.made.clear()
        if errors:
            raise RuntimeError("region lab clean-up: " + "; ".join(errors))

    # Internals

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self.made.append(name)

    def _spawn(self, argv: list[str], popen_kw: dict[str, Any]) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **popen_kw)
        self.procs.append(proc)
        self.test_procs.procs.append(proc)
        return proc

    def _start_link(
        self, args: list[str], inside: Region | None, max_seconds: float
    ) -> tuple[str, int]:
        argv = [sys.executable, "-m", "tests.lab.delay_link", "--listen", "127.0.0.1:0",
                "--max-seconds", str(max_seconds), *args]  # fmt: skip
        kw: dict[str, Any] = {"stdout": subprocess.PIPE, "cwd": ROOT}
        proc = inside.spawn(argv, **kw) if inside else self._spawn(argv, kw)
        return "127.0.0.1", read_ready(proc, LINK_READY_TIMEOUT)


def read_ready(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for a delay link's ``ready <port>`` line; its port."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    got = b""
    while b"\n" not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"delay link (pid {proc.pid}) not ready after {timeout:.1f}s")
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            chunk = os.read(fd, 256)
            if not chunk:
                raise AssertionError(f"delay link (pid {proc.pid}) exited: {proc.wait()}")
            got += chunk
    word, _, port = got.partition(b"\n")[0].partition(b" ")
    if word != b"ready":
        raise AssertionError(f"delay link said {got!r}")
    return int(port)
