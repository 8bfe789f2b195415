"""What clients may hold: ``[filters]`` (eth_newFilter & co) and ``[subscriptions]``
(eth_subscribe, and when the block feed follows blocks)."""

from __future__ import annotations

from dataclasses import dataclass

from chainrelay import defaults as d
from chainrelay.config.checks import check_fields, positive, require

# When the block follower follows blocks (see chainrelay.chain.follower).
FOLLOW_MODES = ("auto", "always", "never")


@dataclass
class FiltersConfig:
    idle_timeout: float = positive(d.FILTER_IDLE_TIMEOUT)
    max_filters: int = positive(d.MAX_FILTERS)
    max_changes: int = positive(d.MAX_FILTER_CHANGES)
    max_per_ip: int = positive(d.MAX_FILTERS_PER_IP)
    max_addresses: int = positive(d.MAX_FILTER_ADDRESSES)
    max_topics_per_position: int = positive(d.MAX_TOPICS_PER_POSITION)

    def check(self) -> None:
        check_fields(self, "filters")


@dataclass
class SubscriptionsConfig:
    max_per_connection: int = positive(d.MAX_SUBSCRIPTIONS_PER_CONNECTION)
    max_per_ip: int = positive(d.MAX_SUBSCRIPTIONS_PER_IP)
    max_total: int = positive(d.MAX_SUBSCRIPTIONS_TOTAL)
    max_log_filters: int = positive(d.MAX_LOG_FILTERS)
    max_log_filters_per_ip: int = positive(d.MAX_LOG_FILTERS_PER_IP)
    max_held_notifications: int = positive(d.MAX_HELD_NOTIFICATIONS)
    max_held_bytes: int = positive(d.MAX_HELD_BYTES)
    pending_tx_fetches: int = positive(d.PENDING_TX_FETCHES)
    slow_close_grace: float = positive(d.SLOW_CLOSE_GRACE)
    follow_blocks_always: bool = d.FOLLOW_BLOCKS_ALWAYS
    follow_blocks: str = d.FOLLOW_BLOCKS
    follow_recent_blocks: int = positive(d.FOLLOW_RECENT_BLOCKS)
    feed_fetch_retry_delay: float = positive(d.FEED_FETCH_RETRY_DELAY)
    feed_fetch_attempts: int = positive(d.FEED_FETCH_ATTEMPTS)
    feed_block_passes: int = positive(d.FEED_BLOCK_PASSES)
    feed_receipts_retry_blocks: int = positive(d.FEED_RECEIPTS_RETRY_BLOCKS)
    pending_max_message: int = positive(d.PENDING_MAX_MESSAGE)

    def check(self) -> None:
        check_fields(self, "subscriptions")
        require(
            self.follow_blocks in FOLLOW_MODES,
            f"subscriptions.follow_blocks: expected one of {', '.join(FOLLOW_MODES)}, "
            f"got {self.follow_blocks!r}",
        )

    @property
    def follow(self) -> str:
        """The follow mode in force: ``follow_blocks_always`` overrides ``follow_blocks``."""
        return "always" if self.follow_blocks_always else self.follow_blocks
