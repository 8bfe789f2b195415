"""The admin listener (``[server] admin_listen``): what an operator asks a node, on a port
of its own (loopback unless told otherwise), apart from the clients' port.

It serves ``GET /metrics`` (under ``--workers``, every worker's, summed), the full
``GET /health`` (upstreams, latencies, tree and worker detail) and an admin JSON-RPC on
``POST /`` (``AdminRpc``):

- ``chainrelay_cordonUpstream(name)``: the upstream leaves rotation until uncordoned;
- ``chainrelay_uncordonUpstream(name)``: it is back;
- ``chainrelay_reloadKeys()``: calls the reload hook the key table registers
  (``AdminRpc.reload_keys``); with none registered it answers ``{"reloaded": false,
  "reason": ...}``, never a success it did not have;
- ``chainrelay_status()``: role, chain id, head, finalized, upstreams with their state,
  cache stats.

While it is on, the public port answers ``/health`` with liveness alone and no longer
serves ``/metrics``. Under ``--workers`` the feeder (worker 0) serves it; every other worker
takes the feeder's commands on a Unix socket in the supervisor's private directory
(``WorkerAdmin``): its registry's text, which the feeder reads from each, within
``admin_scrape_timeout``, at every scrape (a worker stuck or restarting is left out of
that scrape and counted, never waited on), and cordons, which the feeder passes on to every
worker and keeps in that directory (``cordon_file``) for a worker that starts later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from chainrelay.access.identity import NODE, Identity
from chainrelay.server.http import HttpProtocol
from chainrelay.server.metricsum import sum_expositions
from chainrelay.server.phases import Event, Phase, on
from chainrelay.wire.jsonrpc import NULL_ID, encode_error, encode_result

log = logging.getLogger(__name__)

# The hook the key table registers: reloads its keys, says what it did (a JSON object).
KeyReload = Callable[[], dict[str, Any]]
# What reloadKeys answers while no key table registered a hook.
NO_KEY_TABLE = "this node has no key table to reload"
# Largest admin request: the methods take one upstream name at most.
MAX_ADMIN_BODY = 64 * 1024
# A cordon or uncordon: done now, or once every worker is told (under workers).
Act = Callable[[str], bool | Awaitable[bool]]
# How long a worker's admin socket waits for its command line: the feeder writes it at
# once; a connection that sends nothing is dropped, not held.
COMMAND_TIMEOUT = 5.0
# Longest command line (a verb and an upstream name).
MAX_COMMAND = 4096


class AdminRpc:
    """The admin JSON-RPC. ``cordon``/``uncordon`` take an upstream name and return whether
    one has it; ``status`` gives the node's state as a JSON object."""

    def __init__(
        self,
        cordon: Act,
        uncordon: Act,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self._cordon = cordon
        self._uncordon = uncordon
        self._status = status
        # Registered by the key table when there is one (``Node.register_key_reload``).
        self.reload_keys: KeyReload | None = None

    def handle(self, body: bytes, _who: Identity = NODE) -> bytes | Awaitable[bytes]:
        """One JSON-RPC request's answer (no batches: an operator's call at a time). Who
        asks is not looked at: whoever reaches this listener is the operator."""
        if len(body) > MAX_ADMIN_BODY:
            return encode_error(NULL_ID, -32600, "invalid request: body too large")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return encode_error(NULL_ID, -32700, f"parse error: {exc}")
        if not isinstance(doc, dict):
            return encode_error(NULL_ID, -32600, "invalid request: one call object expected")
        rid = doc.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
            return encode_error(NULL_ID, -32600, "invalid request: id must be a string or number")
        id_bytes = orjson.dumps(rid)
        method = doc.get("method")
        params = doc.get("params", [])
        if doc.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return encode_error(id_bytes, -32600, 'invalid request: jsonrpc "2.0" and a method')
        if not isinstance(params, list):
            return encode_error(id_bytes, -32602, "invalid params: an array expected")
        if method in ("chainrelay_cordonUpstream", "chainrelay_uncordonUpstream"):
            if len(params) != 1 or not isinstance(params[0], str):
                return encode_error(id_bytes, -32602, "invalid params: [upstream name]")
            act = self._cordon if method == "chainrelay_cordonUpstream" else self._uncordon
            done = act(params[0])
            if isinstance(done, bool):
                return _acted(id_bytes, params[0], done)
            return _acted_later(id_bytes, params[0], done)
        if params:
            return encode_error(id_bytes, -32602, "invalid params: none expected")
        if method == "chainrelay_reloadKeys":
            return encode_result(id_bytes, orjson.dumps(self._reload()))
        if method == "chainrelay_status":
            return encode_result(id_bytes, orjson.dumps(self._status()))
        return encode_error(id_bytes, -32601, f"method not found: {method}")

    def _reload(self) -> dict[str, Any]:
        hook = self.reload_keys
        if hook is None:
            return {"reloaded": False, "reason": NO_KEY_TABLE}
        try:
            return hook()
        except Exception as exc:  # the table's error is the answer, not a crash
            log.exception("key reload failed")
            return {"reloaded": False, "reason": f"reload failed: {exc}"}


def _acted(id_bytes: bytes, name: str, done: bool) -> bytes:
    if not done:
        return encode_error(id_bytes, -32602, f"no upstream named {name!r}")
    return encode_result(id_bytes, b"true")


async def _acted_later(id_bytes: bytes, name: str, done: Awaitable[bool]) -> bytes:
    return _acted(id_bytes, name, await done)


def cordon_file(directory: Path) -> Path:
    """Where, under workers, the cordoned upstreams' names are kept (one a line): a worker
    that starts (restarted, or late) cordons them too."""
    return directory / "cordoned"


def save_cordoned(path: Path, names: set[str]) -> None:
    """Write ``names`` whole (a rename: a worker starting meanwhile reads old or new)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{n}\n" for n in sorted(names)))
    os.replace(tmp, path)


def load_cordoned(path: Path) -> list[str]:
    try:
        return [n for n in path.read_text().splitlines() if n]
    except FileNotFoundError:
        return []


def worker_socket(directory: Path, index: int) -> Path:
    """Where worker ``index`` serves its registry's text (under the supervisor's directory)."""
    return directory / f"metrics-{index}.sock"


class WorkerAdmin:
    """What the feeder asks another worker, on a Unix socket: one command line, then the
    answer and EOF. ``metrics``: its registry's text; ``cordon NAME`` / ``uncordon NAME``:
    ``true`` or ``false`` (no such upstream)."""

    def __init__(
        self,
        path: Path,
        render: Callable[[], bytes],
        cordon: Callable[[str], bool],
        uncordon: Callable[[str], bool],
    ) -> None:
        self.path = path
        self._render = render
        self._acts = {b"cordon": cordon, b"uncordon": uncordon}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a socket left by this worker's previous life
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), COMMAND_TIMEOUT)
            verb, _, arg = line[:MAX_COMMAND].strip().partition(b" ")
            act = self._acts.get(verb)
            if verb == b"metrics":
                writer.write(self._render())
            elif act is not None:
                writer.write(b"true" if act(arg.decode(errors="replace")) else b"false")
            await writer.drain()
        except (OSError, TimeoutError, ValueError):
            pass  # the asker went away or said nothing: it counts the worker as silent
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def ask_worker(path: Path, command: bytes, timeout: float) -> bytes | None:
    """Another worker's answer to ``command``, or None when it did not answer (in full)
    within ``timeout``."""

    async def ask() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(command + b"\n")
            return await reader.read()
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(ask(), timeout)
    except (OSError, TimeoutError):
        return None


async def gather_metrics(
    own: bytes, others: list[Path], timeout: float, missed: Callable[[int], None]
) -> bytes:
    """This worker's text (``own``) and every other's, read at once, summed. ``missed``
    is told how many did not answer in time."""
    got = await asyncio.gather(*(ask_worker(p, b"metrics", timeout) for p in others))
    texts = [t.decode(errors="replace") for t in got if t]
    if len(texts) < len(others):
        missed(len(others) - len(texts))
    return sum_expositions([own.decode(), *texts]).encode()


class AdminProtocol(HttpProtocol):
    """A connection to the admin listener: every request through httptools (an operator's
    few calls need no fast path), and a POST from a browser page refused (403): a page on
    any site may send a simple POST to a loopback port, and while it could not read the
    answer, a cordon would be done all the same. Browsers always name the Origin of such
    a request; operators' tools (curl, scripts) send none."""

    __slots__ = ()

    def _plain_post(self, data: bytes, split: tuple[bytes, bytes] | None = None) -> bool:
        return False

    def _hold_head(self, data: bytes) -> bool:
        return False

    def on_message_complete(self) -> None:
        if (
            self.parser.get_method() == b"POST"
            and self.header(b"origin") is not None
            and self._phase is Phase.BODY
        ):
            self._phase = on(Event.COMPLETE)[self._phase]
            self._body = []
            self.server.metrics.rejected.labels("admin_origin").inc()
            self._plain(403, b"admin calls are not taken from browser pages", False)
            return
        super().on_message_complete()
