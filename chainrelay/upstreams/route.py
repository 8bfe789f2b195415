"""How the pool routes to one upstream: its role, weight, budget and capabilities.

Primaries share reads by weight (smooth weighted round robin, as nginx shares among
servers: over any ``sum(weights)`` picks each primary is picked ``weight`` times, spread
out, with no random draw); fallbacks serve only what no primary can. Sans-I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from chainrelay import defaults as d
from chainrelay.upstreams.budget import Budget
from chainrelay.upstreams.capabilities import Capabilities

# Tiers, in the order they are asked: a fallback only when no primary can serve.
PRIMARY = 0
FALLBACK = 1
ROLES = {"primary": PRIMARY, "fallback": FALLBACK}


class Route:
    """One upstream's routing state. ``rank``: scratch of the pool's ordering (its class
    for the call being routed), written and read within one ``candidates`` call."""

    __slots__ = ("budget", "caps", "current", "rank", "tier", "weight")

    def __init__(
        self,
        *,
        tier: int = PRIMARY,
        weight: int = d.UPSTREAM_WEIGHT,
        budget: Budget | None = None,
        caps: Capabilities | None = None,
    ) -> None:
        self.tier = tier
        self.weight = weight
        self.budget = budget if budget is not None else Budget()
        self.caps = caps if caps is not None else Capabilities()
        self.current = 0  # smooth weighted round robin's running weight
        self.rank = 0


class Routed(Protocol):
    """What the weighted pick reads of an upstream."""

    route: Route
    latency: float


def pick_weighted(upstreams: Sequence[Routed]) -> Routed | None:
    """Smooth weighted round robin among the ``upstreams`` whose ``rank`` is 0 (primaries
    that can serve the call now): each gains its weight, the highest (the fastest among
    equals: latency is the tie-break) is picked and pays the total back. None when none is
    eligible. O(n), nothing allocated."""
    best: Routed | None = None
    total = 0
    for u in upstreams:
        r = u.route
        if r.rank != 0:
            continue
        total += r.weight
        r.current += r.weight
        if best is None:
            best = u
            continue
        b = best.route
        if r.current > b.current or (r.current == b.current and u.latency < best.latency):
            best = u
    if best is not None:
        best.route.current -= total
    return best
