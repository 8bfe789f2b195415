"""Replay tables: one head generation at a time, never past their bounds."""

from __future__ import annotations

import pytest

from chainrelay.rpc.replay import ReplayTable


def table(max_bytes: int = 1000, max_entries: int = 100) -> ReplayTable[bytes, bytes]:
    return ReplayTable(max_bytes, max_entries, lambda key, value: len(key) + len(value))


def test_an_entry_is_found_by_its_key_at_its_generation_only() -> None:
    t = table()
    t.add(b"k", b"v", 7)
    assert t.get(b"k") == b"v"
    assert t.get_at(b"k", 7) == b"v"
    assert t.get_at(b"k", 8) is None
    assert t.get_at(b"k", 8, b"-") == b"-"
    assert t.bytes == 2 and len(t) == 1 and b"k" in t


def test_an_addition_at_a_new_generation_starts_the_table_over() -> None:
    t = table()
    for i in range(5):
        t.add(b"k%d" % i, b"v", 1)
    t.add(b"new", b"v", 2)
    assert list(t) == [b"new"]
    assert t.generation == 2 and t.bytes == 4


def test_the_entry_bound_starts_the_table_over_instead_of_growing_past_it() -> None:
    t = table(max_entries=3)
    for i in range(3):
        t.add(b"k%d" % i, b"v", 1)
    assert len(t) == 3
    t.add(b"k0", b"w", 1)  # a replacement: no new entry
    assert len(t) == 3 and t.get(b"k0") == b"w"
    t.add(b"k3", b"v", 1)
    assert list(t) == [b"k3"]


@pytest.mark.parametrize("size", [1, 7, 33, 250])
def test_the_byte_bound_is_never_passed(size: int) -> None:
    bound = 1000
    t = table(max_bytes=bound, max_entries=10**6)
    restarts = 0
    for i in range(500):
        before = len(t)
        t.add(b"%06d" % i, b"x" * size, 1)
        restarts += len(t) <= before
        assert t.bytes <= bound
        assert t.bytes == sum(len(k) + len(t.get(k) or b"") for k in t)
    assert restarts > 0, "the table started over rather than grow"


def test_a_replaced_entry_is_counted_once() -> None:
    t = table()
    t.add(b"k", b"short", 1)
    t.add(b"k", b"a longer value", 1)
    assert t.bytes == len(b"k") + len(b"a longer value")
    t.clear()
    assert not t and t.bytes == 0
