"""The chain and how it is reached: ``[chain]``, ``[[upstreams]]``, ``[pool]`` (picking,
retrying and hedging among upstreams) and ``[head]`` (following the chain's head)."""

from __future__ import annotations

from dataclasses import dataclass

from chainrelay import defaults as d
from chainrelay.chain.profiles import PROFILES
from chainrelay.config.checks import check_fields, positive, require


@dataclass
class ChainConfig:
    # A profile from chainrelay.chain.profiles ("bsc", "arbitrum", "devnet"); empty: by id.
    profile: str = ""
    # Expected chain id; upstreams on another chain are refused. 0: read from upstreams.
    chain_id: int = 0

    def check(self) -> None:
        require(
            not self.profile or self.profile in PROFILES,
            f"chain.profile: unknown profile {self.profile!r} (one of {sorted(PROFILES)})",
        )


@dataclass
class UpstreamConfig:
    url: str = ""
    name: str = ""  # empty: "upstream<index>"


def check_upstreams(upstreams: list[UpstreamConfig]) -> None:
    """The ``[[upstreams]]`` list: at least one, each a URL, names unique (and given)."""
    require(
        bool(upstreams),
        "upstreams: at least one [[upstreams]] entry (or [[tree.parents]]) is needed",
    )
    for i, u in enumerate(upstreams):
        require(
            u.url.startswith(("http://", "https://", "ws://", "wss://")),
            f"upstreams[{i}].url: expected an http(s):// or ws(s):// URL",
        )
        if not u.name:
            u.name = f"upstream{i}"
    names = [u.name for u in upstreams]
    require(len(set(names)) == len(names), "upstreams: names must be unique")


@dataclass
class PoolConfig:
    timeout: float = d.UPSTREAM_TIMEOUT
    max_attempts: int = positive(d.UPSTREAM_MAX_ATTEMPTS)
    hedge: bool = d.HEDGE
    hedge_quantile: float = d.HEDGE_QUANTILE
    hedge_min_delay: float = d.HEDGE_MIN_DELAY
    max_lag_blocks: int = d.MAX_LAG_BLOCKS
    max_consecutive_errors: int = d.MAX_CONSECUTIVE_ERRORS
    probe_interval: float = d.PROBE_INTERVAL
    connections: int = d.UPSTREAM_CONNECTIONS
    ws_ping_interval: float = positive(d.WS_PING_INTERVAL)
    ws_max_message_bytes: int = positive(d.WS_MAX_MESSAGE_BYTES)

    def check(self) -> None:
        check_fields(self, "pool")


@dataclass
class HeadConfig:
    reorg_window: int = d.REORG_WINDOW
    backfill_blocks: int = d.BACKFILL_BLOCKS
    finality_refresh_blocks: int = d.FINALITY_REFRESH_BLOCKS
    fresh_blocks: float = d.HEAD_FRESH_BLOCKS
    poll_lead: float = d.HEAD_POLL_LEAD
    poll_near: float = positive(d.HEAD_POLL_NEAR)
    interval_alpha: float = positive(d.HEAD_INTERVAL_ALPHA)
    interval_min_factor: float = positive(d.HEAD_INTERVAL_MIN_FACTOR)
    interval_max_factor: float = d.HEAD_INTERVAL_MAX_FACTOR
    poll_backoff: float = d.HEAD_POLL_BACKOFF
    poll_min_interval: float = positive(d.HEAD_POLL_MIN_INTERVAL)
    poll_max_interval: float = d.HEAD_POLL_MAX_INTERVAL
    poll_probe_every: int = positive(d.HEAD_POLL_PROBE_EVERY)

    def check(self) -> None:
        check_fields(self, "head")
        require(
            # Written as refusals, so a NaN (valid TOML) passes exactly as it always has.
            not (self.poll_lead < 0 or self.interval_alpha > 1 or self.poll_backoff < 1),
            "head: poll_lead >= 0, interval_alpha <= 1 and poll_backoff >= 1",
        )
        require(
            not (
                self.interval_max_factor < self.interval_min_factor
                or self.poll_max_interval < self.poll_min_interval
            ),
            "head: interval_max_factor >= interval_min_factor and "
            "poll_max_interval >= poll_min_interval",
        )

    def poll_settings(self) -> dict[str, float]:
        """The HTTP head poller's settings (chain/headpoll.py), by its own names."""
        return {
            "lead": self.poll_lead,
            "near": self.poll_near,
            "alpha": self.interval_alpha,
            "min_factor": self.interval_min_factor,
            "max_factor": self.interval_max_factor,
            "backoff": self.poll_backoff,
            "min_interval": self.poll_min_interval,
            "max_interval": self.poll_max_interval,
            "probe_every": self.poll_probe_every,
        }
