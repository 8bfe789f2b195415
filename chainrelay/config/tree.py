"""``[tree]``: this node's place in the relay tree (origin, relay or leaf), its parents,
and the bounds of its feed (chainrelay/tree/)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from chainrelay import defaults as d
from chainrelay.config.checks import check_fields, positive, require

ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
STREAM = re.compile(r"[a-z0-9_-]{1,20}/[a-z0-9_-]{1,11}")


@dataclass
class TreeParentConfig:
    url: str = ""  # the parent's feed: ws://HOST:PORT/feed
    rpc: str = ""  # its JSON-RPC endpoint; empty: the same host and port over http
    region: str = ""
    name: str = ""  # empty: "parent<index>"

    def check(self, path: str, index: int) -> None:
        require(self.url.startswith(("ws://", "wss://")), f"{path}.url: expected a ws(s):// URL")
        if not self.rpc:
            self.rpc = "http" + self.url[2:].split("/feed", 1)[0]
        require(
            self.rpc.startswith(("http://", "https://")), f"{path}.rpc: expected an http(s):// URL"
        )
        if not self.name:
            self.name = f"parent{index}"


@dataclass
class TreeConfig:
    """The relay tree (see chainrelay/tree/hub.py). A node with ``key`` is an origin of its
    chain's block stream; a node with ``parents`` takes frames from them (and, without
    ``[[upstreams]]``, their JSON-RPC endpoints are its upstreams)."""

    region: str = ""
    key: str = ""  # the origin's secp256k1 key, hex (better: "${ENV_VAR}")
    key_file: str = ""  # or an eth-account keystore JSON (or a file holding the hex key)
    key_password: str = ""  # the keystore's password (better: "${ENV_VAR}")
    trust: list[str] = field(default_factory=list)  # origin addresses whose frames count
    streams: list[str] = field(default_factory=list)  # empty: "<profile>/blocks"
    parents: list[TreeParentConfig] = field(default_factory=list)
    parents_k: int = positive(d.TREE_PARENTS)
    resume_last: int = d.TREE_RESUME_LAST
    backlog_frames: int = positive(d.TREE_BACKLOG_FRAMES)
    backlog_bytes: int = positive(d.TREE_BACKLOG_BYTES)
    child_queue_frames: int = positive(d.TREE_CHILD_QUEUE_FRAMES)
    child_queue_bytes: int = positive(d.TREE_CHILD_QUEUE_BYTES)
    child_buffer_bytes: int = positive(d.TREE_CHILD_BUFFER_BYTES)
    dedup_entries: int = positive(d.TREE_DEDUP_ENTRIES)
    max_frame_bytes: int = positive(d.TREE_MAX_FRAME_BYTES)
    max_payload_bytes: int = positive(d.TREE_MAX_PAYLOAD_BYTES)
    max_children: int = positive(d.TREE_MAX_CHILDREN)
    stale_positions: int = positive(d.TREE_STALE_POSITIONS)
    probe_interval: float = positive(d.TREE_PROBE_INTERVAL)
    degrade_factor: float = positive(d.TREE_DEGRADE_FACTOR)
    min_gain: float = d.TREE_MIN_GAIN
    connect_timeout: float = positive(d.TREE_CONNECT_TIMEOUT)
    retry_delay: float = positive(d.TREE_RETRY_DELAY)
    retry_max: float = positive(d.TREE_RETRY_MAX)
    ping_interval: float = positive(d.TREE_PING_INTERVAL)
    probe_timeout: float = positive(d.TREE_PROBE_TIMEOUT)
    probe_failures_down: int = positive(d.TREE_PROBE_FAILURES_DOWN)
    link_failures_down: int = positive(d.TREE_LINK_FAILURES_DOWN)
    down_hold: float = d.TREE_DOWN_HOLD
    link_check_interval: float = positive(d.TREE_LINK_CHECK_INTERVAL)
    hello_timeout: float = positive(d.TREE_HELLO_TIMEOUT)
    stall_rounds: int = positive(d.TREE_STALL_ROUNDS)
    offered_max_bytes: int = positive(d.OFFERED_MAX_BYTES)

    @property
    def enabled(self) -> bool:
        return bool(self.key or self.key_file or self.parents)

    def check(self, *, batch_streams: bool) -> None:
        """``batch_streams``: the node carries batch streams, whose sequencers it trusts
        (``[batches]``); a node with parents needs some origin to trust."""
        for i, a in enumerate(self.trust):
            require(
                ADDRESS.fullmatch(a) is not None,
                f"tree.trust[{i}]: expected a 0x-prefixed 20-byte address",
            )
        for i, name in enumerate(self.streams):
            require(
                STREAM.fullmatch(name) is not None,
                f"tree.streams[{i}]: expected <chain>/<kind>, e.g. bsc/blocks",
            )
        require(not (self.key and self.key_file), "tree: give key or key_file, not both")
        for i, p in enumerate(self.parents):
            p.check(f"tree.parents[{i}]", i)
        require(
            len({p.name for p in self.parents}) == len(self.parents),
            "tree.parents: names must be unique",
        )
        require(
            not (self.parents and not self.trust and not batch_streams),
            "tree.trust: a node with parents needs its origins' addresses",
        )
        check_fields(self, "tree")
        # A child owed one frame bigger than its queue would be closed at every resume.
        require(
            not self.child_queue_bytes < self.max_frame_bytes,
            "tree.child_queue_bytes: must be at least tree.max_frame_bytes",
        )
        require(
            not (self.resume_last < 0 or self.min_gain < 0 or self.down_hold < 0),
            "tree: resume_last, min_gain and down_hold must not be negative",
        )
