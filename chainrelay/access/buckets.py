"""Token buckets per identity: how many calls a client may make, and what each call costs.

Sans-I/O: every operation takes ``now`` (any monotonic clock, in seconds), so the bucket
math is tested with a fake clock and the same object serves one process (``Limiter``) or
holds the allowance a process leased from a shared Redis (``access/sharedbuckets.py``).

The rules, in one place:

* An identity of a tier with ``rate`` > 0 has a bucket of ``burst`` tokens, refilled at
  ``rate`` tokens a second. A call costs its method's cost (``Costs``); a cache hit may cost
  a share of it (``hit_cost_factor``).
* A request is admitted only if the bucket can pay its whole cost up front: a batch of
  1,000 calls is paid for before any of its calls is served, so it never overdraws the
  bucket. A request costing more than the whole bucket is never admitted (``NEVER``).
* What a request paid for a cache hit beyond its hit cost may be refunded after serving;
  a refund never fills the bucket beyond ``burst``. So whatever an identity does, what it
  was charged in all, net of refunds, stays within ``burst + rate x elapsed``.
* The table is bounded (``max_buckets``): at the bound, buckets that have refilled since
  their last call are dropped (one made again is full: the same bucket), at most once per
  ``SWEEP_INTERVAL``; with every bucket still refilling, identities without a bucket share
  one per tier (``OVERFLOW``), so an address scan shares one budget and can grow neither
  the table nor the work per call. (A client dropped from the table while full and then
  pushed into the overflow bucket may get that bucket's share on top of its own: only
  while the table is full of active clients.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from chainrelay import defaults
from chainrelay.access.identity import Identity

# A request that costs more than its identity's whole bucket: it can never be admitted.
NEVER = math.inf
# Not known without asking the shared tier (``sharedbuckets.SharedLimiter``): the caller
# awaits ``lease`` first.
ASK = -1.0
# The bucket new identities share while the table is full of buckets still refilling.
OVERFLOW = "\x00overflow"
# A table at its bound is swept of full buckets at most this often: a scan of new
# addresses against a table of active ones costs a dict lookup a call, not a sweep.
SWEEP_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class TierRate:
    """A tier's bucket: ``rate`` tokens a second, ``burst`` at most, a hit's share of a
    miss's cost."""

    rate: float
    burst: float
    hit_factor: float = 1.0


class Costs:
    """What a call of each method costs against its identity's bucket."""

    __slots__ = ("default", "table")

    def __init__(self, table: Mapping[str, float], default: float = defaults.RATE_DEFAULT_COST):
        self.table = dict(table)
        self.default = default

    def of(self, method: str) -> float:
        return self.table.get(method, self.default)

    def total(self, methods: Iterable[str]) -> float:
        table, default = self.table, self.default
        return sum(table.get(m, default) for m in methods)


class Buckets:
    """Token buckets by name, bounded in number (see the module docstring)."""

    __slots__ = ("_swept_at", "_table", "max_buckets")

    def __init__(self, max_buckets: int = defaults.MAX_RATE_BUCKETS) -> None:
        self.max_buckets = max_buckets
        self._swept_at = -math.inf
        # name -> [tokens, when counted, rate, burst]: a list, the cheapest to update.
        self._table: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._table)

    def take(self, name: str, cost: float, rate: float, burst: float, now: float) -> float:
        """Take ``cost`` tokens from ``name``'s bucket: 0.0 when taken, else the seconds
        until the bucket holds them (``NEVER`` when it never can)."""
        b = self._table.get(name)
        if b is None:
            if cost > burst:
                return NEVER
            b = self._new(name, rate, burst, now)
        tokens = b[0] + (now - b[1]) * rate
        if tokens > burst:
            tokens = burst
        b[1] = now
        if tokens >= cost:
            b[0] = tokens - cost
            return 0.0
        b[0] = tokens
        if cost > burst:
            return NEVER
        return (cost - tokens) / rate

    def give(self, name: str, amount: float, now: float) -> None:
        """Give back ``amount`` tokens (a refund), never beyond the bucket's burst."""
        b = self._table.get(name)
        if b is None:
            return  # dropped meanwhile: it was full
        tokens = b[0] + (now - b[1]) * b[2] + amount
        b[0] = tokens if tokens < b[3] else b[3]
        b[1] = now

    def tokens(self, name: str, now: float) -> float | None:
        """What ``name``'s bucket holds now (None: no bucket, as good as full)."""
        b = self._table.get(name)
        if b is None:
            return None
        return min(b[3], b[0] + (now - b[1]) * b[2])

    def _new(self, name: str, rate: float, burst: float, now: float) -> list[float]:
        table = self._table
        if len(table) >= self.max_buckets:
            if now - self._swept_at >= SWEEP_INTERVAL:
                self._swept_at = now
                self.sweep(now)
            if len(table) >= self.max_buckets:
                name = f"{OVERFLOW}{rate}/{burst}"  # one per tier's rate
                shared = table.get(name)
                if shared is not None:
                    return shared
        b = [burst, now, rate, burst]
        table[name] = b
        return b

    def sweep(self, now: float) -> int:
        """Drop the buckets full by now; how many went."""
        table = self._table
        full = [k for k, b in table.items() if b[0] + (now - b[1]) * b[2] >= b[3]]
        for k in full:
            del table[k]
        return len(full)


class Limiter:
    """Rate limits per identity in one process: the tiers' buckets and the calls' costs.

    Every method answers at once (no I/O): 0.0 admitted, else seconds to wait (``NEVER``:
    the request costs more than the whole bucket). Identities of tiers without a rate, and
    the node's own calls, pass without a lookup of their bucket."""

    __slots__ = ("buckets", "clock", "costs", "tiers")

    def __init__(
        self,
        tiers: Mapping[str, TierRate],
        costs: Costs,
        clock: Callable[[], float],
        max_buckets: int = defaults.MAX_RATE_BUCKETS,
    ) -> None:
        self.tiers = {name: t for name, t in tiers.items() if t.rate > 0}
        self.costs = costs
        self.clock = clock
        self.buckets = Buckets(max_buckets)

    def take(self, who: Identity, cost: float) -> float:
        """Charge ``cost`` to ``who``'s bucket."""
        if not cost:
            return 0.0
        tier = self.tiers.get(who.tier)
        if tier is None or not who.name:
            return 0.0
        return self.buckets.take(who.name, cost, tier.rate, tier.burst, self.clock())

    def take_call(self, who: Identity, method: str, hit: bool) -> float:
        """``take`` of one call of ``method`` (a hit, its tier's share of the cost): the
        replays' hot path, in one Python call (the bucket math of ``Buckets.take`` inline)."""
        tier = self.tiers.get(who.tier)
        if tier is None:
            return 0.0
        name = who.name
        if not name:
            return 0.0
        costs = self.costs
        cost = costs.table.get(method, costs.default)
        if hit:
            cost *= tier.hit_factor
        b = self.buckets._table.get(name)
        if b is None or cost > tier.burst:
            return self.buckets.take(name, cost, tier.rate, tier.burst, self.clock())
        now = self.clock()
        tokens = b[0] + (now - b[1]) * b[2]
        if tokens > b[3]:
            tokens = b[3]
        b[1] = now
        if tokens >= cost:
            b[0] = tokens - cost
            return 0.0
        b[0] = tokens
        return (cost - tokens) / b[2]

    def cost(self, who: Identity, method: str, hit: bool) -> float:
        """What one call of ``method`` costs ``who`` (a hit, its tier's share); 0.0 when
        ``who`` is not limited."""
        tier = self.tiers.get(who.tier)
        if tier is None or not who.name:
            return 0.0
        cost = self.costs.table.get(method, self.costs.default)
        return cost * tier.hit_factor if hit else cost

    def batch_cost(self, who: Identity, methods: Iterable[str]) -> float:
        """What a batch of calls of ``methods`` costs ``who``, paid up front (as misses)."""
        if self.tiers.get(who.tier) is None or not who.name:
            return 0.0
        return self.costs.total(methods)

    def refund_hits(self, who: Identity, methods: Iterable[str]) -> None:
        """Give back what cache hits of ``methods`` were charged beyond their hit cost."""
        amount = self.hit_refund(who, methods)
        if amount > 0:
            self.give(who, amount)

    def hit_refund(self, who: Identity, methods: Iterable[str]) -> float:
        """What cache hits of ``methods`` were charged beyond their hit cost."""
        tier = self.tiers.get(who.tier)
        if tier is None or not who.name or tier.hit_factor >= 1.0:
            return 0.0
        return self.costs.total(methods) * (1.0 - tier.hit_factor)

    def give(self, who: Identity, amount: float) -> None:
        self.buckets.give(who.name, amount, self.clock())

    async def lease(self, who: Identity, need: float) -> float:
        """What ``SharedLimiter.lease`` is for; here every answer is known at once."""
        wait = self.take(who, need)
        if wait == 0.0:
            self.give(who, need)  # taken again by the caller's ``take``
        return wait

    async def admit(self, name: str, cost: float, rate: float, burst: float) -> float:
        """Charge ``cost`` to the bucket ``name`` (not an identity's: a sender's)."""
        return self.buckets.take(name, cost, rate, burst, self.clock())

    def tier(self, who: Identity) -> TierRate | None:
        """``who``'s tier when it has a rate (None: not limited)."""
        return self.tiers.get(who.tier) if who.name else None
