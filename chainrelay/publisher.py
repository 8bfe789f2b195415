"""The documented import path of the batch publisher: ``from chainrelay.publisher import
Publisher``. The library lives in ``chainrelay.clients.publisher``."""

from chainrelay.clients.publisher import (
    Ack,
    Publisher,
    PublishPlan,
    generated_payload,
    ingress_url,
    publish,
    publish_plan,
    read_batches,
    run_publish,
)

__all__ = [
    "Ack",
    "PublishPlan",
    "Publisher",
    "generated_payload",
    "ingress_url",
    "publish",
    "publish_plan",
    "read_batches",
    "run_publish",
]
