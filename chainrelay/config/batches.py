"""``[batches]``: the L2 batch streams a node carries and, on an ingress node, the durable
log sequencers push to (chainrelay/batches/)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from chainrelay import defaults as d
from chainrelay.config.checks import check_fields, positive, require
from chainrelay.config.tree import ADDRESS, STREAM

# A pusher's API key: long enough that guessing one is out of reach.
MIN_API_KEY_CHARS = 16


@dataclass
class BatchStreamConfig:
    """One sequencer's batch stream: who may sign it, for which chain, from which number."""

    name: str = ""  # e.g. "arbitrum/batches"
    chain_id: int = 0  # 0: the node's chain (its upstreams')
    sequencers: list[str] = field(default_factory=list)  # addresses whose batches count
    first_seq: int = 0  # the stream's first sequence number

    def check(self, path: str, taken: Collection[str]) -> None:
        """``taken``: the names of the streams before it (block streams included)."""
        require(
            STREAM.fullmatch(self.name) is not None,
            f"{path}.name: expected <chain>/<kind>, e.g. arbitrum/batches",
        )
        require(self.name not in taken, f"{path}.name: {self.name} is named twice")
        require(
            bool(self.sequencers), f"{path}.sequencers: name the addresses that sign its batches"
        )
        for j, a in enumerate(self.sequencers):
            require(
                ADDRESS.fullmatch(a) is not None,
                f"{path}.sequencers[{j}]: expected a 0x-prefixed address",
            )
        require(
            not (self.chain_id < 0 or self.first_seq < 0 or self.first_seq >= 2**63),
            f"{path}: chain_id and first_seq must not be negative",
        )


@dataclass
class BatchesConfig:
    """L2 batch streams (see chainrelay/batches/ingress.py). Every node that carries a batch
    stream names it here with its sequencers, so it can check each batch it relays; a node
    with ``log`` is also an ingress: sequencers push to it, and it keeps every batch durably."""

    streams: list[BatchStreamConfig] = field(default_factory=list)
    log: str = ""  # the durable log (sqlite3 file); set: this node takes pushes
    api_keys: list[str] = field(default_factory=list)  # a pusher's Bearer token (better: ${ENV})
    max_payload_bytes: int = positive(d.BATCH_MAX_PAYLOAD_BYTES)
    commit_max_batches: int = positive(d.BATCH_COMMIT_MAX_BATCHES)
    commit_max_bytes: int = positive(d.BATCH_COMMIT_MAX_BYTES)
    max_in_flight: int = positive(d.BATCH_MAX_IN_FLIGHT)
    recent_hashes: int = positive(d.BATCH_RECENT_HASHES)
    relay_ack_timeout: float = positive(d.BATCH_RELAY_ACK_TIMEOUT)
    backlog_frames: int = positive(d.BATCH_BACKLOG_FRAMES)
    backlog_bytes: int = positive(d.BATCH_BACKLOG_BYTES)
    order_max_held: int = positive(d.BATCH_ORDER_MAX_HELD)
    order_max_held_bytes: int = positive(d.BATCH_ORDER_MAX_HELD_BYTES)
    order_wait: float = positive(d.BATCH_ORDER_WAIT)
    child_queue_frames: int = positive(d.BATCH_CHILD_QUEUE_FRAMES)
    fetch_rounds: int = positive(d.BATCH_FETCH_ROUNDS)
    range_max_frames: int = positive(d.BATCH_RANGE_MAX_FRAMES)
    range_max_bytes: int = positive(d.BATCH_RANGE_MAX_BYTES)
    range_timeout: float = positive(d.BATCH_RANGE_TIMEOUT)

    def first_seqs(self) -> dict[str, int]:
        """Each stream's first sequence number, by name."""
        return {s.name: s.first_seq for s in self.streams}

    def check(self, taken: list[str]) -> None:
        """``taken``: stream names already carried (the tree's block streams)."""
        names = set(taken)
        for i, st in enumerate(self.streams):
            st.check(f"batches.streams[{i}]", names)
            names.add(st.name)
        require(
            not (self.log and not self.streams),
            "batches.log: an ingress needs batches.streams to take pushes for",
        )
        require(
            not (self.log and not self.api_keys),
            "batches.api_keys: an ingress takes pushes only with a key; name one",
        )
        for i, key in enumerate(self.api_keys):
            require(
                len(key) >= MIN_API_KEY_CHARS,
                f"batches.api_keys[{i}]: at least {MIN_API_KEY_CHARS} characters",
            )
        check_fields(self, "batches")
        # A duplicate of a batch still in flight must be found among the recent hashes:
        # the log holds only what is durable.
        require(
            not self.recent_hashes < self.max_in_flight,
            "batches.recent_hashes: must be at least batches.max_in_flight",
        )
