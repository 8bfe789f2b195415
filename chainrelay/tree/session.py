"""The feed session, sans-I/O: backlog, a child's cursor, dedup, and the control messages.

Rules (everything that decides what a child is sent lives here):

- Each node keeps, per stream, a **backlog**: the first copy of every frame it accepted, in
  the order it accepted them, bounded in count and bytes (oldest dropped first). Entries
  have consecutive sequence numbers (``seq``) local to the node.
- A child's session is a **cursor** into that backlog: the seq of the next frame to send.
  Replay and live are the same thing (sending from the cursor until it reaches the end of
  the backlog; a new frame appended while the child is caught up is sent at once), so
  there is no gap or duplicate between replay and live by construction.
- ``hello`` names the streams a child wants and, for each, where to resume: ``from`` a
  position (the first position it lacks), or the ``last`` N frames, or neither (live).
  With ``from`` a child may name ``after``, the identity of the last frame it took: the
  replay then also holds every frame that arrived after that one, whatever its position
  (a reorg's new blocks sit below ``from`` but after the frames they replace).
  The answer (``welcome``) tells each stream's cursor start and, when ``from`` is older
  than the backlog, a ``gap``: the positions [from, oldest) the child must backfill over
  JSON-RPC. The replay is the backlog from there on: bounded by the backlog, never a flood.
- A cursor that falls behind the backlog's oldest entry (the child read slower than the
  stream overwrote it), or more frames or bytes behind its end than its queue allows, is
  **lagging**: the parent says ``bye`` and closes; the child resumes from its position.
- A child relay may prove in its hello (``auth``) that it holds a key the parent lists in
  ``child_keys`` (``tree.auth``); a child that proves none is an anonymous subscriber,
  bounded per address (``tree.admission``) and refused with ``CLOSE_TOO_MANY`` and a
  ``retry_after`` past those bounds.
- A child accepts the first copy of each identity (``Dedup``) and tracks positions
  (``Positions``): a frame past the next expected position reveals a gap to backfill; a
  frame at or below a position already delivered, with a new identity, is a reorg.
- Between the workers of one node (``serve --workers N``) the feeder also sends each new
  head's header (``head``) as soon as it has it, before the block's frame: the others
  announce it to their newHeads subscribers at once, as the feeder does to its own.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from chainrelay.tree.auth import AuthError, Proof, parse_proof

PROTOCOL_VERSION = 1
_NODE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Control messages are small JSON objects; anything larger is abuse.
MAX_CONTROL_BYTES = 64 * 1024
# Streams one hello may name: a node carries a handful of chains' blocks and batches.
MAX_HELLO_STREAMS = 16
# Positions, counts and sizes a control message carries are below this: block numbers and
# batch seqs are kept in sqlite (the batch log, the log store), whose integers are signed
# 64-bit, and no real position or count comes near it.
POSITION_END = 2**63
# A stream's name as the frames carry it: 1-32 printable ASCII characters (the frame's
# stream field), so a name a child sends is never longer than any this node has.
_STREAM_NAME = re.compile(r"[!-~]{1,32}")

# Close codes (RFC 6455 private range 4000-4999): why a parent ended a session.
CLOSE_BAD_HELLO = 4400
# A hello's proof (``auth``) that names no key the parent knows (``tree.auth``).
CLOSE_UNAUTHORIZED = 4401
CLOSE_UNKNOWN_STREAM = 4404
CLOSE_LAGGING = 4408
# Too many anonymous sessions (from the child's address, or on the node), or opened too
# fast: the error message before the close says in how many seconds to retry
# (``retry_after``), as HTTP's 429 and its Retry-After would.
CLOSE_TOO_MANY = 4429
CLOSE_SHUTDOWN = 1001


class ControlError(ValueError):
    """A control message that breaks the protocol; the session closes with ``code``."""

    def __init__(self, message: str, code: int = CLOSE_BAD_HELLO) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Entry:
    seq: int
    position: int
    identity: bytes
    raw: bytes
    offset: int  # bytes appended to the backlog before this frame, for O(1) lag in bytes


class Backlog:
    """One stream's recent frames, first copies only, bounded by count and bytes."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        if max_frames < 1 or max_bytes < 1:
            raise ValueError("a backlog holds at least one frame")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.entries: deque[Entry] = deque()
        self.bytes = 0
        self.next_seq = 0  # seq the next appended frame gets
        self.appended_bytes = 0  # every frame's bytes ever appended

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def base_seq(self) -> int:
        """Seq of the oldest frame held (== ``next_seq`` when empty)."""
        return self.entries[0].seq if self.entries else self.next_seq

    @property
    def oldest_position(self) -> int | None:
        return min((e.position for e in self.entries), default=None)

    @property
    def newest_position(self) -> int | None:
        return max((e.position for e in self.entries), default=None)

    def append(self, position: int, identity: bytes, raw: bytes) -> int:
        e = Entry(self.next_seq, position, identity, raw, self.appended_bytes)
        self.next_seq += 1
        self.appended_bytes += len(raw)
        self.entries.append(e)
        self.bytes += len(raw)
        entries = self.entries
        while len(entries) > 1 and (len(entries) > self.max_frames or self.bytes > self.max_bytes):
            self.bytes -= len(entries.popleft().raw)
        return e.seq

    def get(self, seq: int) -> Entry | None:
        i = seq - self.base_seq
        if 0 <= i < len(self.entries):
            return self.entries[i]
        return None

    def trim_below(self, position: int) -> None:
        """Drop frames below ``position`` from the front (confirmed, never needed again)."""
        entries = self.entries
        while entries and entries[0].position < position:
            self.bytes -= len(entries.popleft().raw)

    def resume(
        self, from_position: int | None, last: int | None, after: bytes | None = None
    ) -> tuple[int, Gap | None]:
        """Where a child's cursor starts, and the positions it must backfill, if any."""
        start, gap = self._resume(from_position, last)
        if after is not None:
            for e in self.entries:
                if e.identity == after:
                    # What came after the child's last frame, reorgs below ``from`` too.
                    return min(start, e.seq + 1), gap
        return start, gap

    def _resume(self, from_position: int | None, last: int | None) -> tuple[int, Gap | None]:
        if last is not None:
            return max(self.base_seq, self.next_seq - last), None
        if from_position is None or not self.entries:
            return self.next_seq, None
        oldest = self.oldest_position
        assert oldest is not None
        if from_position < oldest:
            return self.base_seq, Gap(from_position, oldest)
        for e in self.entries:
            if e.position >= from_position:
                return e.seq, None
        return self.next_seq, None


@dataclass(frozen=True, slots=True)
class Gap:
    """Positions ``[start, end)`` a child lacks and no frame will bring."""

    start: int
    end: int


@dataclass(slots=True)
class Cursor:
    """A child's place in one stream's backlog, and how far behind it may fall.

    The queue bound counts only frames that arrived after the session began (``live_seq``
    on): a child replaying a long backlog is not lagging for that, only for falling
    behind the live stream or out of the backlog."""

    seq: int
    max_frames: int
    max_bytes: int
    live_seq: int = 0  # backlog.next_seq when the session began
    live_bytes: int = 0  # backlog.appended_bytes when the session began
    # Frames larger than the child takes (its hello's max_frame_bytes) are passed over: the
    # child sees the jump in positions and backfills that block over JSON-RPC.
    max_frame: int | None = None
    skipped: int = 0  # frames passed over for being larger than max_frame

    @classmethod
    def at(cls, backlog: Backlog, seq: int, max_frames: int, max_bytes: int) -> Cursor:
        return cls(seq, max_frames, max_bytes, backlog.next_seq, backlog.appended_bytes)

    def lagging(self, backlog: Backlog) -> bool:
        if self.seq < backlog.base_seq:
            return True  # the frames it still needed are gone
        if backlog.next_seq - max(self.seq, self.live_seq) > self.max_frames:
            return True
        e = backlog.get(self.seq)
        if e is None:
            return False  # caught up
        return backlog.appended_bytes - max(e.offset, self.live_bytes) > self.max_bytes

    def take(self, backlog: Backlog, budget: int) -> list[bytes]:
        """Frames to write now, at most ``budget`` bytes (at least one frame if any is
        due), advancing the cursor past them."""
        out: list[bytes] = []
        used = 0
        while self.seq < backlog.next_seq:
            e = backlog.get(self.seq)
            if e is None:
                break  # lagging: the caller checks ``lagging`` and closes
            if self.max_frame is not None and len(e.raw) > self.max_frame:
                self.seq += 1
                self.skipped += 1
                continue
            if out and used + len(e.raw) > budget:
                break
            out.append(e.raw)
            used += len(e.raw)
            self.seq += 1
        return out


class Dedup:
    """The identities seen lately (first copy wins); bounded by count."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, identity: bytes) -> bool:
        return identity in self._seen

    def add(self, identity: bytes) -> bool:
        """True the first time ``identity`` is seen (within the window)."""
        seen = self._seen
        if identity in seen:
            return False
        seen[identity] = None
        if len(seen) > self.max_entries:
            seen.popitem(last=False)
        return True


@dataclass(slots=True)
class Positions:
    """What a child has delivered of one stream: the next position it expects."""

    next: int | None = None

    def gap_before(self, position: int) -> Gap | None:
        """The positions missing before ``position`` arrives, if any."""
        if self.next is not None and position > self.next:
            return Gap(self.next, position)
        return None

    def is_reorg(self, position: int) -> bool:
        return self.next is not None and position < self.next

    def delivered(self, position: int) -> None:
        self.next = position + 1


# --- control messages ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Want:
    stream: str
    from_position: int | None = None
    last: int | None = None
    after: bytes | None = None  # identity of the last frame the child took


@dataclass(slots=True)
class Hello:
    wants: list[Want] = field(default_factory=list)
    # The largest frame the child takes (a WebSocket message past it would end its link):
    # larger ones are not sent to it. None: no bound given.
    max_frame_bytes: int | None = None
    # The child node's name, when it is a relay (its Via name): what it says it holds
    # (``held``) counts towards acknowledgements that wait for relays, once per name.
    node: str | None = None
    # Its proof of a key the parent knows (``tree.auth``), made for the parent's challenge.
    auth: Proof | None = None


def _int_or_none(v: Any, what: str) -> int | None:
    if v is None:
        return None
    # type(): true is an int in Python, and not a position.
    if type(v) is not int or not 0 <= v < POSITION_END:
        raise ControlError(f"{what} must be an integer from 0 to 2^63-1")
    return v


def _identity_or_none(v: Any) -> bytes | None:
    if v is None:
        return None
    if not isinstance(v, str) or len(v) != 66 or not v.startswith("0x"):
        raise ControlError("after must be a 0x-prefixed 32-byte identity")
    try:
        return bytes.fromhex(v[2:])
    except ValueError:
        raise ControlError("after must be a 0x-prefixed 32-byte identity") from None


def encode_hello(
    wants: list[Want],
    max_frame_bytes: int | None = None,
    node: str | None = None,
    auth: Proof | None = None,
) -> bytes:
    streams = []
    for w in wants:
        s: dict[str, Any] = {"stream": w.stream}
        if w.from_position is not None:
            s["from"] = w.from_position
        if w.last is not None:
            s["last"] = w.last
        if w.after is not None:
            s["after"] = "0x" + w.after.hex()
        streams.append(s)
    msg: dict[str, Any] = {"type": "hello", "version": PROTOCOL_VERSION, "streams": streams}
    if max_frame_bytes is not None:
        msg["max_frame_bytes"] = max_frame_bytes
    if node is not None:
        msg["node"] = node
    if auth is not None:
        msg["auth"] = auth.to_json()
    return orjson.dumps(msg)


def parse_hello(data: bytes | str) -> Hello:
    msg = parse_control(data)
    if msg.get("type") != "hello":
        raise ControlError("the first message must be a hello")
    version = msg.get("version")
    # type(): true and 1.0 equal 1 in Python but are not the protocol's version number.
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ControlError(f"unsupported feed protocol version {version!r}")
    streams = msg.get("streams")
    if not isinstance(streams, list) or not streams or len(streams) > MAX_HELLO_STREAMS:
        raise ControlError(f"streams must be a list of 1-{MAX_HELLO_STREAMS} entries")
    node = msg.get("node")
    if node is not None and (not isinstance(node, str) or not _NODE.fullmatch(node)):
        raise ControlError("node must be a name of 1-64 letters, digits, '.', '_' or '-'")
    auth = None
    if "auth" in msg:
        if node is None:
            raise ControlError("auth needs the node name it was made for")
        try:
            auth = parse_proof(msg["auth"])
        except AuthError as exc:
            raise ControlError(str(exc)) from None
    hello = Hello(
        max_frame_bytes=_int_or_none(msg.get("max_frame_bytes"), "max_frame_bytes"),
        node=node,
        auth=auth,
    )
    names: set[str] = set()
    for s in streams:
        if not isinstance(s, dict) or not isinstance(s.get("stream"), str):
            raise ControlError("each stream entry needs a stream name")
        name = s["stream"]
        if not _STREAM_NAME.fullmatch(name):
            raise ControlError("a stream name is 1-32 printable ASCII characters")
        if name in names:
            raise ControlError(f"stream {name} named twice")
        names.add(name)
        from_ = _int_or_none(s.get("from"), "from")
        last = _int_or_none(s.get("last"), "last")
        if from_ is not None and last is not None:
            raise ControlError("give from or last, not both")
        after = _identity_or_none(s.get("after"))
        if after is not None and from_ is None:
            raise ControlError("after goes with from")
        hello.wants.append(Want(name, from_, last, after))
    return hello


def parse_control(data: bytes | str) -> dict[str, Any]:
    if len(data) > MAX_CONTROL_BYTES:
        raise ControlError("control message too large")
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ControlError("control message is not JSON") from None
    if not isinstance(msg, dict):
        raise ControlError("control message must be an object")
    return msg


def encode_welcome(streams: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "welcome", "streams": streams})


def welcome_entry(want: Want, backlog: Backlog, gap: Gap | None) -> dict[str, Any]:
    """What a child learns of one stream it asked for (a gap is its cue to backfill)."""
    entry: dict[str, Any] = {
        "stream": want.stream,
        "oldest": backlog.oldest_position,
        "newest": backlog.newest_position,
    }
    if gap is not None:
        entry["gap"] = [gap.start, gap.end]
    return entry


def encode_bye(reason: str) -> bytes:
    return orjson.dumps({"type": "bye", "reason": reason})


def encode_head(header: dict[str, Any]) -> bytes:
    """A head's header, ahead of its block's frame: sent only to the other workers of the
    parent's own node (``serve --workers N``), whose newHeads subscribers then get it as
    early as the feeder's own do. No other child is sent one."""
    return orjson.dumps({"type": "head", "header": header})


def encode_error(message: str, retry_after: float | None = None) -> bytes:
    """A refusal; ``retry_after``: seconds before the child should try again."""
    msg: dict[str, Any] = {"type": "error", "message": message}
    if retry_after is not None:
        msg["retry_after"] = round(retry_after, 3)
    return orjson.dumps(msg)


def encode_confirmed(stream: str, seq: int, signature: bytes) -> bytes:
    """A sequencer's confirmation passed down the tree, its signature as it came."""
    return orjson.dumps(
        {"type": "confirmed", "stream": stream, "seq": seq, "signature": "0x" + signature.hex()}
    )


def encode_held(stream: str, position: int) -> bytes:
    """A child relay's word that it holds every batch of ``stream`` up to ``position``."""
    return orjson.dumps({"type": "held", "stream": stream, "position": position})


def parse_held(msg: dict[str, Any]) -> tuple[str, int]:
    """``(stream, position)`` of a child's ``held`` message; ``ControlError`` if malformed."""
    stream, position = msg.get("stream"), msg.get("position")
    if (
        msg.get("type") != "held"
        or not isinstance(stream, str)
        or type(position) is not int
        or not 0 <= position < POSITION_END
    ):
        raise ControlError("after the hello only held messages")
    return stream, position


def parse_confirmed(msg: dict[str, Any]) -> tuple[str, int, bytes]:
    """``(stream, seq, signature)`` of a confirmed message; ``ControlError`` if malformed."""
    stream, seq, sig = msg.get("stream"), msg.get("seq"), msg.get("signature")
    if not isinstance(stream, str) or type(seq) is not int or not 0 <= seq < POSITION_END:
        raise ControlError("confirmed needs a stream and a seq")
    if not isinstance(sig, str) or len(sig) != 132 or not sig.startswith("0x"):
        raise ControlError("confirmed needs a 65-byte 0x signature")
    try:
        return stream, seq, bytes.fromhex(sig[2:])
    except ValueError:
        raise ControlError("confirmed needs a 65-byte 0x signature") from None
