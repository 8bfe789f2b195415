"""The documented import path of the block subscriber: ``from chainrelay.subscriber import
subscribe``. The library lives in ``chainrelay.clients.subscriber``."""

from chainrelay.clients.subscriber import FeedBlock, Subscription, feed_url, print_blocks, subscribe

__all__ = ["FeedBlock", "Subscription", "feed_url", "print_blocks", "subscribe"]
