"""The documented import path of the batch subscriber: ``from chainrelay.batchsubscriber
import subscribe_batches``. The library lives in ``chainrelay.clients.batchsubscriber``."""

from chainrelay.clients.batchsubscriber import (
    BatchCheck,
    BatchSubscription,
    Checked,
    FeedBatch,
    print_batches,
    subscribe_batches,
)

__all__ = [
    "BatchCheck",
    "BatchSubscription",
    "Checked",
    "FeedBatch",
    "print_batches",
    "subscribe_batches",
]
