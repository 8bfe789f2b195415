"""What an entry node takes from its Nitro feed inputs, sans-I/O: each sequence number
once, in order, each message checked.

A node follows the sequencer's feed through one or more inputs (the sequencer, Nitro's
relays), as a Nitro node does with several ``--node.feed.input.url``. The same message
comes from each of them, at different times, and a reconnected input replays what it
had; so a message is taken by its sequence number:

- below the next number wanted, or held already: a **duplicate**, dropped (the common
  case with two inputs: half of everything);
- a number an input sends at or below one it sent before on the same connection: that
  input goes **backwards**, dropped and counted apart (a healthy feed never does it);
- the next number: passed on, with every held one that now follows it;
- past it: **held** (``batches.order``'s gate, bounded in count and bytes) until the
  missing ones arrive from another input or a reconnect; past the bounds, refused.

Before any is passed on, a message is checked: within the size limit, and, when the node
has ``allowed_signers``, carrying a signature of one of them over Nitro's hash (as a
Nitro node's feed verifier checks; ``codec.feed_signer``). A message that fails is not
held and not passed on; its number stays missing until a good copy arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chainrelay.batches.order import BatchOrder, Missing
from chainrelay.nitro.codec import Broadcast, FeedMessage, NitroFormatError, feed_signer


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message not taken, and why (``outcome``: its counter's label)."""

    seq: int
    outcome: str
    reason: str


@dataclass(slots=True)
class Taken:
    """What one broadcast message brought: feed messages to pass on now, in order; the
    sequencer's confirmation (if it moved on); every message refused, and how many were
    duplicates."""

    released: list[FeedMessage] = field(default_factory=list)
    confirmed: int | None = None
    refused: list[Refusal] = field(default_factory=list)
    duplicates: int = 0


class FeedIntake:
    """The entry node's view of its inputs: the next number wanted and what is held."""

    def __init__(
        self,
        *,
        chain_id: int,
        allowed_signers: frozenset[bytes],
        max_payload_bytes: int,
        max_held: int,
        max_held_bytes: int,
        next_seq: int | None = None,
    ) -> None:
        """``next_seq``: the number after the last one kept (None: start with the first
        message any input sends)."""
        self.chain_id = chain_id
        self.allowed = allowed_signers
        self.max_payload_bytes = max_payload_bytes
        self.order: BatchOrder[FeedMessage] = BatchOrder(max_held, max_held_bytes, next_seq)
        self.confirmed: int | None = None
        self._last: dict[str, int] = {}  # each input's last number on its connection

    @property
    def next(self) -> int | None:
        return self.order.next

    def connected(self, source: str) -> None:
        """Input ``source`` (re)connected: it starts over from the number it asked for."""
        self._last.pop(source, None)

    def missing(self) -> Missing | None:
        return self.order.missing()

    def take(self, source: str, broadcast: Broadcast) -> Taken:
        out = Taken()
        for msg in broadcast.messages:
            self._one(source, msg, out)
        c = broadcast.confirmed
        if c is not None and (self.confirmed is None or c > self.confirmed):
            self.confirmed = out.confirmed = c
        return out

    def _one(self, source: str, msg: FeedMessage, out: Taken) -> None:
        seq = msg.seq
        last = self._last.get(source)
        if last is not None and seq <= last:
            out.refused.append(
                Refusal(seq, "backwards", f"sequence number {seq} after {last} on one connection")
            )
            return
        order = self.order
        if not order.is_new(seq):
            self._last[source] = seq
            out.duplicates += 1
            return
        # A message refused here does not move the input's last number on: its number is
        # not to be trusted (a forged one ahead would make the real one look backwards).
        if len(msg.raw) > self.max_payload_bytes:
            out.refused.append(
                Refusal(
                    seq, "too_large", f"{len(msg.raw)} bytes (at most {self.max_payload_bytes})"
                )
            )
            return
        if self.allowed:
            refusal = self._check_signature(msg)
            if refusal is not None:
                out.refused.append(refusal)
                return
        self._last[source] = seq
        released = order.offer(seq, msg, len(msg.raw))
        if released is None:
            out.refused.append(
                Refusal(seq, "held_full", f"too much held past missing {order.next}")
            )
            return
        out.released.extend(released)

    def _check_signature(self, msg: FeedMessage) -> Refusal | None:
        try:
            who = feed_signer(msg.raw, self.chain_id)
        except NitroFormatError as exc:
            return Refusal(msg.seq, "signature", str(exc))
        if who is None:
            return Refusal(msg.seq, "signature", "no signature (allowed_signers is set)")
        if who not in self.allowed:
            return Refusal(msg.seq, "signer", f"signed by 0x{who.hex()}, not an allowed signer")
        return None
