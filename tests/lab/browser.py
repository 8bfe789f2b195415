"""Headless Chromium for the status page's tests, driven over the DevTools protocol.

Debian's ``chromium`` (``.ci/bootstrap`` installs it) is started with a new empty profile
and ``--remote-debugging-port=0``; the port it chose is read from ``DevToolsActivePort``
in that profile, and one WebSocket (``websockets``, already a dependency) carries every
command in flattened sessions. No driver binary and no browser download: nothing but the
distribution's browser and the project's own packages.

    async with Browser(tmp_path) as browser:
        page = await browser.open("http://127.0.0.1:9545/status")
        await page.evaluate("document.title")
        await page.screenshot(tmp_path / "status.png")
        assert not page.errors     # script exceptions and console errors, as they came

Chromium runs in a process group of its own (it forks a zygote, renderers, a GPU process),
which ``close`` ends: SIGTERM to the group, SIGKILL to whatever is left.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.lab.procs import until
from tests.lab.timing import SECOND

# The flags a closed network needs: without the background ones Chromium keeps trying
# Google's hosts (refused here, many at a time).
FLAGS = [
    "--headless",
    "--no-sandbox",  # as root, in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
    "--remote-debugging-port=0",
    "--remote-debugging-address=127.0.0.1",
]
START_TIMEOUT = 20 * SECOND
COMMAND_TIMEOUT = 20 * SECOND


def chromium() -> str:
    """The browser binary: $CHAINRELAY_CHROMIUM, or Debian's."""
    found = os.environ.get("CHAINRELAY_CHROMIUM") or shutil.which("chromium")
    if not found:
        raise FileNotFoundError("chromium not found: run .ci/bootstrap (apt-get install chromium)")
    return found


class Page:
    """One tab, attached in its own session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session
        # Uncaught exceptions and console.error lines, in the order they came.
        self.errors: list[str] = []

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session)

    async def evaluate(self, expression: str) -> Any:
        """The expression's value (JSON-able), awaited if it is a promise."""
        got = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in got:
            raise AssertionError(f"{expression!r} threw: {got['exceptionDetails']}")
        return got["result"].get("value")

    async def screenshot(self, *paths: Path) -> None:
        """A PNG of the page as it is now, written to every path given."""
        got = await self.send("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(got["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            self.errors.append(d.get("exception", {}).get("description") or d.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value")) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(params["entry"].get("text", ""))


class Browser:
    def __init__(self, tmp: Path) -> None:
        self.profile = tmp / "chromium-profile"
        self.log = tmp / "chromium.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader: asyncio.Task[None] | None = None

    def _spawn(self) -> None:
        self.profile.mkdir(parents=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [chromium(), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def __aenter__(self) -> Browser:
        self._spawn()
        active = self.profile / "DevToolsActivePort"

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited: {self.log.read_text()[-2000:]}")
            return active.exists() and len(active.read_text().splitlines()) >= 2

        await until(up, START_TIMEOUT, "chromium's DevTools port")
        port, path = active.read_text().splitlines()[:2]
        self._ws = await connect(f"ws://127.0.0.1:{port}{path}", max_size=None)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close"), 5 * SECOND)
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        proc = self.proc
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5 * SECOND)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # renderers left behind, if any
            proc.wait()

    async def _read(self) -> None:
        assert self._ws is not None
        async for raw in self._ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._waiting.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    if "error" in msg:
                        fut.set_exception(AssertionError(f"CDP error: {msg['error']}"))
                    else:
                        fut.set_result(msg.get("result", {}))
            elif "sessionId" in msg and msg["sessionId"] in self._pages:
                self._pages[msg["sessionId"]].event(msg["method"], msg.get("params", {}))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> dict[str, Any]:
        assert self._ws is not None
        mid = next(self._ids)
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        fut = self._waiting[mid] = asyncio.get_running_loop().create_future()
        await self._ws.send(json.dumps(msg))
        return await asyncio.wait_for(fut, COMMAND_TIMEOUT)

    async def open(self, url: str) -> Page:
        """A new tab on ``url``, its errors recorded from before the page's first script."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = self._pages[attached["sessionId"]] = Page(self, attached["sessionId"])
        for domain in ("Runtime", "Log", "Page"):
            await page.send(f"{domain}.enable")
        await page.send("Page.navigate", {"url": url})

        async def loaded() -> bool:
            with contextlib.suppress(AssertionError):  # the old document, going away
                got = await page.evaluate(
                    f"document.readyState === 'complete' && location.href === {json.dumps(url)}"
                )
                return got is True
            return False

        await until(loaded, START_TIMEOUT, f"{url} to load")
        return page
