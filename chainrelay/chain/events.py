"""What the block follower hands its listeners: one ``BlockEvent`` per block delivered or
retracted, and the newHeads payload of a block.

A head's newHeads payload is the header its upstream pushed for that very block (by hash);
a head only polled gets geth's header form (``HEADER_FIELDS``), never the whole block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

# The fields of a newHeads payload as geth sends it (RPCMarshalHeader; a Go map, so its
# keys come out sorted): what BSC nodes send, where no upstream pushed this block's header.
HEADER_FIELDS = tuple(
    sorted(
        (
            "baseFeePerGas",
            "blobGasUsed",
            "difficulty",
            "excessBlobGas",
            "extraData",
            "gasLimit",
            "gasUsed",
            "hash",
            "logsBloom",
            "miner",
            "mixHash",
            "nonce",
            "number",
            "parentBeaconBlockRoot",
            "parentHash",
            "receiptsRoot",
            "requestsHash",
            "sha3Uncles",
            "stateRoot",
            "timestamp",
            "transactionsRoot",
            "withdrawalsRoot",
        )
    )
)


@dataclass(frozen=True, slots=True)
class BlockEvent:
    number: int
    hash: str
    # The newHeads payload and eth_getBlockByHash(hash, true) as answered; both empty ({})
    # in removed events: the follower keeps only what a reorg needs (number, hash, logs).
    header: dict[str, Any]
    block: dict[str, Any]
    logs: list[dict[str, Any]]  # the block's logs in log-index order; "removed": True on removal
    removed: bool  # True: this block was reorged away
    announced: bool = False  # True: head listeners got this header before the block's fetch
    # The logs of an event kept for a reorg (``kept``), encoded: ``logs`` is then empty. A
    # reorg window of decoded logs is hundreds of thousands of objects for the garbage
    # collector to walk at every full collection; bytes are none.
    logs_raw: bytes | None = None


BlockListener = Callable[[list[BlockEvent]], None]
# Called with each block the follower fetched (not the removed ones): its event and the
# bytes its upstream answered for the full block and its receipts (None: logs came another
# way).
FetchedListener = Callable[[BlockEvent, bytes, bytes | None], None]
# Called with a head's newHeads payload, as the upstream pushed it, ahead of its block.
HeadListener = Callable[[dict[str, Any]], None]


def geth_header(block: dict[str, Any]) -> dict[str, Any]:
    """geth's newHeads payload of ``block`` (``HEADER_FIELDS``, in its sorted order)."""
    return {k: block[k] for k in HEADER_FIELDS if k in block}


def kept(ev: BlockEvent, logs_raw: bytes | None = None) -> BlockEvent:
    """What the follower keeps of a delivered block for a reorg: number, hash, and its
    logs encoded (decoded again only if a reorg retracts it); ``logs_raw``: that encoding,
    when at hand."""
    if logs_raw is None:
        # Its own allocation: orjson's output keeps the buffer it grew.
        logs_raw = bytes(memoryview(orjson.dumps(ev.logs)))
    return BlockEvent(ev.number, ev.hash, {}, {}, [], False, ev.announced, logs_raw)


def removed(ev: BlockEvent) -> BlockEvent:
    """The retraction of a delivered (or kept) block: its logs marked removed."""
    logs_of = orjson.loads(ev.logs_raw) if ev.logs_raw is not None else ev.logs
    logs = [{**x, "removed": True} for x in logs_of]
    return BlockEvent(ev.number, ev.hash, ev.header, ev.block, logs, True, ev.announced)
