"""The status page's samples and document, without a socket: rates from running totals
(``status.samples``), and the ``/status.json`` of a node that has nothing yet (no
upstream pool, head, hub or parents) against its schema (``tests/lab/statusschema.py``).
The document of real nodes, and the page itself, are checked in
``tests/system/test_demo.py``."""

from __future__ import annotations

import orjson
import pytest

from chainrelay.chain.head import HeadTracker
from chainrelay.config import Config
from chainrelay.metrics import Metrics
from chainrelay.status.board import StatusBoard
from chainrelay.status.samples import SampleRing, Totals
from chainrelay.subscriptions.filters import FilterService
from chainrelay.tree.hub import FeedHub
from chainrelay.tree.parents import ParentSet
from chainrelay.upstreams.pool import UpstreamPool
from tests.lab.statusschema import check_status


def test_rates_between_samples() -> None:
    ring = SampleRing(10)
    ring.add(Totals(t=100.0, calls=10, hits=4, misses=1, upstream_calls=3, frames={"s": 5}))
    ring.add(Totals(t=102.0, calls=30, hits=19, misses=1, upstream_calls=5, frames={"s": 9},
                    latency_ms={"s": 12.5}))  # fmt: skip
    series = ring.series()
    assert series.t == [102.0]
    assert series.calls_per_s == [10.0]
    assert series.hit_ratio == [1.0]  # 15 hits, no miss in the interval
    assert series.upstream_per_call == [0.1]  # 2 upstream calls for 20 client calls
    assert series.frames_per_s == {"s": [2.0]}
    assert series.latency_ms == {"s": [12.5]}


def test_nothing_to_divide_by_is_a_gap_not_a_number() -> None:
    ring = SampleRing(10)
    ring.add(Totals(t=1.0, upstream_calls=3))
    ring.add(Totals(t=2.0, upstream_calls=7))  # the node's own calls, no client's
    series = ring.series()
    assert series.hit_ratio == [None]
    assert series.upstream_per_call == [None]
    assert series.calls_per_s == [0.0]


def test_the_ring_is_bounded_and_a_clock_stepped_back_restarts_it() -> None:
    ring = SampleRing(5)
    for t in range(20):
        ring.add(Totals(t=float(t), calls=t))
    assert len(ring) == 5
    assert ring.series().t == [16.0, 17.0, 18.0, 19.0]
    ring.add(Totals(t=3.0, calls=50))  # wall clock stepped back
    assert len(ring) == 1
    assert ring.series().t == []
    with pytest.raises(ValueError):
        SampleRing(1)


def test_totals_over_the_last_seconds() -> None:
    ring = SampleRing(100)
    for t in range(90):
        ring.add(Totals(t=float(t), calls=2 * t))
    span = ring.totals(60.0)
    assert span is not None
    first, last = span
    assert (first.t, last.t) == (29.0, 89.0)
    assert SampleRing(3).totals(60.0) is None


class _Bare:
    """A node with nothing started yet: what the board reads, all empty."""

    def __init__(self) -> None:
        self.cfg = Config()
        self.metrics = Metrics()
        self.via = "chainrelay-test"
        self.chain_id = 56
        self.pool: UpstreamPool | None = None
        self.head: HeadTracker | None = None
        self.hub: FeedHub | None = None
        self.parents: ParentSet | None = None
        self.filters: FilterService | None = None

    def status(self) -> dict[str, object]:
        return {"role": "standalone", "ingress": False, "worker": None, "ok": False, "cache": None}


def test_the_document_of_a_node_with_nothing_keeps_the_schema() -> None:
    board = StatusBoard(_Bare(), history=10, max_children=5)
    doc = board.document()
    check_status(doc)
    assert doc["parents"] == [] and doc["upstreams"] == [] and doc["streams"] == []
    chain, summary = doc["chain"], doc["summary"]
    assert isinstance(chain, dict) and isinstance(summary, dict)
    assert chain["head"] is None and chain["lagBlocks"] is None
    assert summary["hitRatio"] is None
    status, body, content_type = board.json()
    assert (status, content_type) == (200, b"application/json")
    check_status(orjson.loads(body))
    status, page, content_type = board.page()
    assert status == 200 and content_type.startswith(b"text/html")
    # One static file: no script, style or image from anywhere but the node itself.
    assert b"<script src" not in page and b"http://" not in page.replace(b"http://www.w3.org", b"")
    assert b"https://" not in page
