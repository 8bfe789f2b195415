"""Composing a node from capabilities: each an async context manager, entered in order
through one ``AsyncExitStack`` and left in reverse order.

Leaving differs from a bare ``AsyncExitStack`` in one way, after aiohttp's cleanup contexts:
a failing exit never hides another. Every exit runs, each failure is kept, and ``aclose``
raises them together as one ``StopFailed`` (an ``ExceptionGroup``), in the order the exits ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Generic, Protocol, TypeVar

from chainrelay.errors import StopFailed

T = TypeVar("T")


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Service)


@contextlib.asynccontextmanager
async def running(service: S) -> AsyncIterator[S]:
    """``service`` started, and stopped on leaving; also when its start failed part-way
    (a pool with some connections open), as a node that fails to start leaves nothing."""
    try:
        await service.start()
        yield service
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def on_leaving(stop: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """A capability with nothing to start here (or started with arguments): its stop only."""
    try:
        yield
    finally:
        await stop()


class _Kept(Generic[T]):
    """One entered context whose exit failure is kept instead of raised."""

    def __init__(self, cm: AbstractAsyncContextManager[T], errors: list[Exception]) -> None:
        self._cm = cm
        self._errors = errors

    async def __aenter__(self) -> T:
        return await self._cm.__aenter__()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return bool(await self._cm.__aexit__(kind, exc, tb))
        except Exception as failure:  # the next exits run all the same
            self._errors.append(failure)
            return False


class Composition:
    """Capabilities entered one after another (``enter``) and left in reverse (``aclose``)."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._errors: list[Exception] = []

    async def enter(self, cm: AbstractAsyncContextManager[T]) -> T:
        """Enter ``cm`` now; it is left by ``aclose``, before everything entered earlier.
        A failure to enter is raised at once (what it had started it has undone)."""
        return await self._stack.enter_async_context(_Kept(cm, self._errors))

    async def aclose(self) -> None:
        """Leave everything entered, newest first. Raises ``StopFailed`` holding every
        exit's failure once all have run; ``aclose`` again leaves nothing twice."""
        try:
            await self._stack.aclose()
        finally:
            errors, self._errors = self._errors, []
        if errors:
            raise StopFailed("errors while stopping", errors)
