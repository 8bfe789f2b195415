"""Rate limits shared by every worker and node of a region, through the Redis tier.

Each identity's bucket lives in Redis (a hash refilled by one Lua script, run by EVALSHA:
one round trip, no lock; Redis' own clock, so hosts' clocks never matter). A process does
not ask Redis per call: it leases a slice of the bucket (``RATE_LEASE_SECONDS`` of the
rate, at most ``RATE_LEASE_BURST_SHARE`` of the burst) and takes its calls from that slice
without I/O; it asks for the next slice in the background when the slice runs low, and a
call waits for Redis only when its identity's slice is empty. What is leased is gone from
the shared bucket, so the processes together never admit more than the budget; what they
hold unused at once is a slice each, a few percent of it.

Redis is an accelerator here as for the cache: while the tier is down (``RedisCache``
marks it down on the first failed command, each bounded by ``cache.redis_timeout``, and
probes it until it answers), every process counts in its own buckets (``buckets.Limiter``),
and goes back to the shared ones when Redis answers again. The node never stops answering
because Redis did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from chainrelay import defaults
from chainrelay.access.buckets import ASK, NEVER, Limiter, TierRate
from chainrelay.access.identity import Identity

log = logging.getLogger(__name__)

# KEYS[1]: the bucket. ARGV: rate, burst, need, want. Refills by Redis' clock, then grants
# ``want`` tokens (or what is left, when at least ``need``); a bucket untouched until it
# would be full expires (one made again is full). Answers {granted, seconds to wait}, as
# strings (Lua numbers become integers in replies).
LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local need = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(b[1])
local stamp = tonumber(b[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
end
tokens = tokens + math.max(0, now - stamp) * rate
if tokens > burst then tokens = burst end
local grant = 0
if tokens >= need then
  grant = math.min(tokens, want)
  tokens = tokens - grant
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 's', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
if grant > 0 then
  return {tostring(grant), '0'}
end
return {'0', tostring((need - tokens) / rate)}
"""


class ScriptRunner(Protocol):
    """The Redis tier as the shared buckets use it (``rpc.shared_cache.RedisCache``)."""

    @property
    def up(self) -> bool: ...

    @property
    def key_base(self) -> bytes: ...

    def script(self, lua: str) -> Callable[..., Awaitable[Any]]: ...

    async def run_script(
        self, script: Callable[..., Awaitable[Any]], keys: list[bytes], args: list[Any]
    ) -> Any: ...


class SharedLimiter:
    """``buckets.Limiter``'s interface over buckets kept in Redis, with a slice of each
    leased to this process. ``take`` answers ``ASK`` when the identity's slice cannot pay:
    the caller awaits ``lease`` and serves the request then."""

    def __init__(
        self,
        local: Limiter,
        redis: ScriptRunner,
        lease_seconds: float = defaults.RATE_LEASE_SECONDS,
        lease_burst_share: float = defaults.RATE_LEASE_BURST_SHARE,
    ) -> None:
        # The buckets counted while Redis is down, and the tiers and costs.
        self.local = local
        self.tiers = local.tiers
        self.costs = local.costs
        self.redis = redis
        self._lease = redis.script(LEASE_LUA)
        self._prefix = redis.key_base + b":rl:"
        self.lease_seconds = lease_seconds
        self.lease_burst_share = lease_burst_share
        # name -> tokens leased from Redis and not spent yet.
        self._allowance: dict[str, float] = {}
        # name -> the lease under way for it (one at a time per identity).
        self._leasing: dict[str, asyncio.Future[float]] = {}
        self._max = local.buckets.max_buckets
        # Each tier's slice, and the allowance left under which the next is leased.
        self._slices = {name: self._slice(t) for name, t in self.tiers.items()}

    def _slice(self, tier: TierRate) -> float:
        return max(1.0, min(tier.rate * self.lease_seconds, tier.burst * self.lease_burst_share))

    # --- the synchronous side: what the hot path calls ---------------------------------
    def take(self, who: Identity, cost: float) -> float:
        """``Limiter.take``, or ``ASK`` when ``who``'s slice cannot pay ``cost``."""
        if not cost:
            return 0.0
        tier = self.tiers.get(who.tier)
        if tier is None or not who.name:
            return 0.0
        if not self.redis.up:
            return self.local.take(who, cost)
        if cost > tier.burst:
            return NEVER
        name = who.name
        allowance = self._allowance
        left = allowance.get(name, 0.0) - cost
        if left < 0:
            return ASK
        allowance[name] = left
        if left + left < self._slices[who.tier] and name not in self._leasing:
            self._start_lease(name, tier, 0.0)  # the next slice, before this one runs out
        return 0.0

    def take_call(self, who: Identity, method: str, hit: bool) -> float:
        """``take`` of one call of ``method`` (a hit, its tier's share of the cost)."""
        tier = self.tiers.get(who.tier)
        if tier is None or not who.name:
            return 0.0
        costs = self.costs
        cost = costs.table.get(method, costs.default)
        return self.take(who, cost * tier.hit_factor if hit else cost)

    def cost(self, who: Identity, method: str, hit: bool) -> float:
        return self.local.cost(who, method, hit)

    def batch_cost(self, who: Identity, methods: Iterable[str]) -> float:
        return self.local.batch_cost(who, methods)

    def refund_hits(self, who: Identity, methods: Iterable[str]) -> None:
        amount = self.local.hit_refund(who, methods)
        if amount > 0:
            self.give(who, amount)

    def give(self, who: Identity, amount: float) -> None:
        if not self.redis.up:
            self.local.give(who, amount)
            return
        tier = self.tiers.get(who.tier)
        if tier is None:
            return
        name = who.name
        # Kept in this process's slice (never more than a burst): a later call spends it.
        self._allowance[name] = min(tier.burst, self._allowance.get(name, 0.0) + amount)

    def tier(self, who: Identity) -> TierRate | None:
        return self.tiers.get(who.tier) if who.name else None

    # --- the asynchronous side ------------------------------------------------------------
    async def lease(self, who: Identity, need: float) -> float:
        """Make ``who``'s slice hold ``need`` tokens: 0.0 when it does (the caller takes
        them at once, in the same turn of the loop), else the seconds to wait."""
        tier = self.tiers.get(who.tier)
        if tier is None or not who.name:
            return 0.0
        name = who.name
        for _ in range(4):
            if not self.redis.up:
                wait = self.local.take(who, need)
                if wait == 0.0:
                    self.local.give(who, need)  # taken again by the caller's ``take``
                return wait
            if self._allowance.get(name, 0.0) >= need:
                return 0.0
            fut = self._leasing.get(name)
            if fut is None:
                fut = self._start_lease(name, tier, need)
            wait = await asyncio.shield(fut)
            if wait > 0.0:
                return wait
        return 0.0 if self._allowance.get(name, 0.0) >= need else tier.burst / tier.rate

    async def admit(self, name: str, cost: float, rate: float, burst: float) -> float:
        """Charge ``cost`` to the bucket ``name`` in Redis itself, no slice (rare calls:
        the sender limit); in this process's buckets while Redis is down."""
        if cost > burst:
            return NEVER
        got = await self.redis.run_script(
            self._lease, [self._prefix + name.encode()], [rate, burst, cost, cost]
        )
        if got is None:
            return self.local.buckets.take(name, cost, rate, burst, self.local.clock())
        return 0.0 if float(got[0]) > 0 else float(got[1])

    def _start_lease(self, name: str, tier: TierRate, need: float) -> asyncio.Future[float]:
        fut = asyncio.ensure_future(self._ask(name, tier, need))
        self._leasing[name] = fut
        fut.add_done_callback(lambda _f: self._leasing.pop(name, None))
        return fut

    async def _ask(self, name: str, tier: TierRate, need: float) -> float:
        """One round trip: a slice (at least ``need``) into ``name``'s allowance; 0.0, or
        the seconds until the shared bucket holds ``need``."""
        have = self._allowance.get(name, 0.0)
        short = max(need - have, 0.0)
        want = max(self._slice(tier), short)
        got = await self.redis.run_script(
            self._lease,
            [self._prefix + name.encode()],
            [tier.rate, tier.burst, max(short, min(want, 1.0)), want],
        )
        if got is None:
            return 0.0  # Redis down: ``lease`` counts locally from now on
        granted = float(got[0])
        if granted <= 0:
            return float(got[1]) if need > 0 else 0.0
        allowance = self._allowance
        if name not in allowance and len(allowance) >= self._max:
            self._shed()
        allowance[name] = allowance.get(name, 0.0) + granted
        return 0.0 if allowance[name] >= need else tier.burst / tier.rate

    def _shed(self) -> None:
        """The allowance table at its bound: the emptiest eighth goes (what they held is
        spent from the shared budget, never admitted: the budget still holds)."""
        allowance = self._allowance
        for name in sorted(allowance, key=allowance.__getitem__)[: max(1, len(allowance) // 8)]:
            del allowance[name]
