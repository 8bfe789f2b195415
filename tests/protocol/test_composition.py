"""Composing capabilities: entered in order, left in reverse, every stop run, every stop
failure raised together as one ExceptionGroup. Fake capabilities; no sockets."""

from __future__ import annotations

import pytest

from chainrelay.composition import Composition, on_leaving, running
from chainrelay.errors import ChainRelayError, StopFailed


class Fake:
    """A capability that records its start and stop in a shared journal."""

    def __init__(
        self,
        name: str,
        journal: list[str],
        *,
        start_fails: bool = False,
        stop_fails: bool = False,
    ) -> None:
        self.name = name
        self.journal = journal
        self.start_fails = start_fails
        self.stop_fails = stop_fails

    async def start(self) -> None:
        self.journal.append(f"start {self.name}")
        if self.start_fails:
            raise RuntimeError(f"{self.name} did not start")

    async def stop(self) -> None:
        self.journal.append(f"stop {self.name}")
        if self.stop_fails:
            raise ValueError(f"{self.name} did not stop")


async def test_capabilities_stop_in_reverse_order_of_start() -> None:
    journal: list[str] = []
    comp = Composition()
    for name in ("pool", "head", "server"):
        got = await comp.enter(running(Fake(name, journal)))
        assert got.name == name
    await comp.aclose()
    assert journal == [
        "start pool",
        "start head",
        "start server",
        "stop server",
        "stop head",
        "stop pool",
    ]


async def test_every_stop_runs_and_failures_come_out_as_one_group() -> None:
    journal: list[str] = []
    comp = Composition()
    await comp.enter(running(Fake("pool", journal, stop_fails=True)))
    await comp.enter(running(Fake("head", journal)))
    await comp.enter(on_leaving(Fake("server", journal, stop_fails=True).stop))
    with pytest.raises(StopFailed) as exc:
        await comp.aclose()
    assert journal == ["start pool", "start head", "stop server", "stop head", "stop pool"]
    group = exc.value
    assert isinstance(group, ExceptionGroup) and isinstance(group, ChainRelayError)
    # In the order the stops ran: the newest first.
    assert [str(e) for e in group.exceptions] == ["server did not stop", "pool did not stop"]
    assert all(isinstance(e, ValueError) for e in group.exceptions)
    # The command line prints every failure, as it always has.
    assert str(group) == (
        "errors while stopping: "
        "[ValueError('server did not stop'), ValueError('pool did not stop')]"
    )


async def test_a_failed_start_is_undone_and_what_started_before_still_stops() -> None:
    journal: list[str] = []
    comp = Composition()
    await comp.enter(running(Fake("pool", journal)))
    with pytest.raises(RuntimeError, match="head did not start"):
        await comp.enter(running(Fake("head", journal, start_fails=True)))
    # The half-started capability stopped itself (its connections closed) ...
    assert journal == ["start pool", "start head", "stop head"]
    await comp.aclose()
    # ... and is not stopped again with the rest.
    assert journal[3:] == ["stop pool"]


async def test_closing_twice_stops_nothing_twice() -> None:
    journal: list[str] = []
    comp = Composition()
    await comp.enter(running(Fake("pool", journal, stop_fails=True)))
    with pytest.raises(StopFailed):
        await comp.aclose()
    await comp.aclose()  # nothing left to stop, no failure left to raise
    assert journal == ["start pool", "stop pool"]
