"""When to poll an HTTP upstream for its head next; sans-I/O.

Rules, all of them here:

* A new block is expected about one interval after the last one appeared. The interval
  starts at the chain profile's block time and is learned from the blocks seen (a smoothed
  estimate, bounded around the profile's block time so a stall or a burst cannot run away
  with it).
* When a block appeared is known only to lie between the last poll that did not see it and
  the poll that did; the expected time (the last block's plus the interval) is used when it
  lies in that span, else the nearest end of the span. This locks the schedule to the
  chain's phase the way a clock follows a reference.
* After a new block: no poll until half a ``poll_near`` step after the next one is due, so
  a block on time costs one poll. Every ``poll_probe_every`` blocks the first poll goes
  ``poll_lead`` (a fraction of the interval) before it is due instead, which tells whether
  blocks now come earlier than expected (a poll after the due time cannot); while they do,
  the probe goes earlier each block. Then one poll every ``poll_near`` (a fraction of the
  interval) until the block arrives; once it is overdue by half an interval the chain is
  taken as stalled and the wait grows by ``poll_backoff`` each poll, never beyond
  ``poll_max_interval``.
* An answer that is not a newer block (the same head, a lagging upstream's older one, a
  reorg's sibling at the same height) moves nothing but the "not seen yet" edge.

Times are the caller's monotonic seconds at which each poll was sent: that is the moment
the answer describes. The object answers "poll next at"; it sleeps on nothing.
"""

from __future__ import annotations

from typing import Protocol

# A block that came before the first poll looked for it doubles how early the next one is
# looked for: the phase is found again in a few blocks after a stall or a wrong estimate.
EARLY_WIDEN = 2.0
# Each block found by a later poll gives a quarter of that back, down to ``poll_lead``.
EARLY_NARROW = 0.75
# Never look earlier than half an interval ahead: that would be polling all the time.
MAX_EARLY = 0.5


class PollSettings(Protocol):
    """What the schedule reads of the ``[head]`` section (``config.HeadConfig``), under its
    keys: a sans-I/O core imports no config."""

    poll_lead: float
    poll_near: float
    poll_backoff: float
    poll_min_interval: float
    poll_max_interval: float
    poll_probe_every: int
    interval_alpha: float
    interval_min_factor: float
    interval_max_factor: float


class HeadPollSchedule:
    """The polling plan for one upstream. Call ``first`` before the first poll, then
    ``polled`` with each answer's head number (None when the poll failed)."""

    def __init__(self, block_time: float, cfg: PollSettings) -> None:
        """``cfg``: the ``[head]`` section, whose ``poll_*`` and ``interval_*`` keys shape
        the plan."""
        self.block_time = block_time
        self.cfg = cfg
        self.low = block_time * cfg.interval_min_factor
        self.high = block_time * cfg.interval_max_factor
        # The learned seconds between blocks.
        self.interval = block_time
        self.number: int | None = None  # the highest head seen
        self.appeared_at: float | None = None  # when that head is taken to have appeared
        self.missed_at: float | None = None  # the last poll that saw no newer head
        self._step = 0.0  # the current wait between overdue polls
        # How early the next block is looked for: widened while blocks come before the
        # first poll looks (nothing then says how early they came), narrowed back after.
        self.early = cfg.poll_lead
        self._looked = False  # whether a poll since the last block was a "near" one
        # Whether the next block is looked for before it is due (a probe of the phase)
        # rather than just after, and the blocks since the last probe.
        self.probing = True
        self._since_probe = 0

    @property
    def due(self) -> float | None:
        """When the next block is expected, if a block has been seen."""
        if self.appeared_at is None:
            return None
        return self.appeared_at + self.interval

    def polled(self, now: float, number: int | None) -> float:
        """Record a poll sent at ``now`` that answered head ``number`` (None: failed);
        return when to send the next one."""
        if number is not None and (self.number is None or number > self.number):
            self._advance(now, number)
        else:
            self.missed_at = now
        return self._next(now)

    def _advance(self, now: float, number: int) -> None:
        due = self.due
        low = self.missed_at if self.missed_at is not None else now
        if self.number is None or self.appeared_at is None or due is None:
            appeared = now
        else:
            # The expected time if it lies in the span in which the block must have
            # appeared; a block later than expected is put in the middle of the span (the
            # last miss and this poll are a near step apart), an earlier one at its end.
            expected = due + self.interval * (number - self.number - 1)
            appeared = (low + now) / 2 if expected < low else min(expected, now)
            observed = (appeared - self.appeared_at) / (number - self.number)
            observed = min(max(observed, self.low), self.high)
            self.interval += self.cfg.interval_alpha * (observed - self.interval)
        lead = self.cfg.poll_lead
        if due is not None and self.probing:
            if self._looked:
                self.early = max(lead, self.early * EARLY_NARROW)
            else:
                self.early = min(MAX_EARLY, self.early * EARLY_WIDEN)
            self._since_probe = 0
        elif due is not None:
            self._since_probe += 1
        self.probing = self.early > lead or self._since_probe + 1 >= self.cfg.poll_probe_every
        self._looked = False
        self.number = number
        self.appeared_at = appeared
        # The poll that saw this block saw no later one.
        self.missed_at = now
        self._step = 0.0

    def _next(self, now: float) -> float:
        cfg, due = self.cfg, self.due
        near = max(cfg.poll_min_interval, cfg.poll_near * self.interval)
        max_interval = cfg.poll_max_interval
        if due is None:
            return now + min(max_interval, near)
        if self.probing:
            start = due - self.early * self.interval
        else:
            # Half a near step after the block is due: usually the only poll it costs.
            start = due + near / 2
        if now < start:
            return min(start, now + max_interval)
        self._looked = True
        if now < due + self.interval / 2:
            return now + min(near, max_interval)
        # Overdue: a stalled chain or upstream is asked less and less often.
        self._step = min(max_interval, max(near, self._step * cfg.poll_backoff))
        return now + self._step
