"""The hub's streams, one type per kind: a ``BlockStream`` (frames signed by a trusted
origin, first copy of each identity wins) or a ``BatchStream`` (frames signed by the
stream's sequencers, passed on strictly in sequence, trimmed by the sequencer's
``confirmed``). Both keep a backlog and the children that read it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chainrelay import defaults
from chainrelay.batches.order import BatchOrder, Missing
from chainrelay.tree.frame import Frame
from chainrelay.tree.session import Backlog, Dedup, Gap

if TYPE_CHECKING:
    from chainrelay.tree.hub import FeedChild


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """A batch stream: whose signatures count, for which chain, and its limits here."""

    name: str
    chain_id: int
    sequencers: frozenset[bytes]
    max_payload_bytes: int = defaults.BATCH_MAX_PAYLOAD_BYTES
    backlog_frames: int = defaults.BATCH_BACKLOG_FRAMES
    backlog_bytes: int = defaults.BATCH_BACKLOG_BYTES
    order_max_held: int = defaults.BATCH_ORDER_MAX_HELD
    order_max_held_bytes: int = defaults.BATCH_ORDER_MAX_HELD_BYTES
    order_wait: float = defaults.BATCH_ORDER_WAIT
    child_queue_frames: int = defaults.BATCH_CHILD_QUEUE_FRAMES
    fetch_frames: int = defaults.BATCH_RANGE_MAX_FRAMES
    fetch_rounds: int = defaults.BATCH_FETCH_ROUNDS


@dataclass(slots=True, kw_only=True)
class _StreamBase:
    name: str
    backlog: Backlog
    child_queue_frames: int  # live frames a child may fall behind before it is closed
    children: set[FeedChild] = field(default_factory=set)
    newest: int | None = None  # highest position accepted
    last_identity: bytes | None = None  # identity of the last frame accepted


@dataclass(slots=True, kw_only=True)
class BlockStream(_StreamBase):
    dedup: Dedup  # identities seen lately: a duplicate costs a lookup


@dataclass(slots=True, kw_only=True)
class BatchStream(_StreamBase):
    spec: BatchSpec
    order: BatchOrder[Frame]  # order by seq is the dedup of a batch stream
    confirmed: tuple[int, bytes] | None = None  # (seq, the sequencer's signature)
    held: dict[FeedChild, int] = field(default_factory=dict)  # what each child relay holds
    held_waiters: list[tuple[int, int, asyncio.Future[int]]] = field(default_factory=list)
    gap_timer: asyncio.TimerHandle | None = None
    fetching: bool = False
    refused: int | None = None  # highest seq refused while too much was held
    fetch_failures: int = 0  # fetches in a row that brought nothing

    @classmethod
    def of(cls, spec: BatchSpec) -> BatchStream:
        return cls(
            name=spec.name,
            backlog=Backlog(spec.backlog_frames, spec.backlog_bytes),
            child_queue_frames=spec.child_queue_frames,
            spec=spec,
            order=BatchOrder(spec.order_max_held, spec.order_max_held_bytes),
        )

    def wanted(self) -> Missing | None:
        """Numbers to fetch: those the held batches wait for, and up to the highest one
        refused while the gate was full."""
        order = self.order
        missing = order.missing()
        if self.refused is not None and order.next is not None:
            if self.refused < order.next:
                self.refused = None
            elif missing is None or self.refused >= missing.end:
                # Past the held ones too: their range is fetched with it (copies are dropped).
                return Missing(order.next, self.refused + 1)
        return missing

    def gap_before(self, from_position: int | None) -> Gap | None:
        """Batches a child asks for that this node holds no more (trimmed after a
        confirmation, or from before it started), even with an empty backlog: the child's
        cue to read them from the range endpoint now, not at the next batch, which a quiet
        stream may not send."""
        if from_position is None or self.order.next is None:
            return None
        entries = self.backlog.entries
        oldest = entries[0].position if entries else self.order.next
        return Gap(from_position, oldest) if from_position < oldest else None


Stream = BlockStream | BatchStream
