"""Method policy: what each method reads, at which block, and how its answer may be cached.

Every caching decision lives in this file, as a table (``RULES``) plus two functions:
``plan`` turns a call and a view of the head into a ``Plan`` (how to key and forward it),
and ``store_decision`` says whether and how an answer to that plan is stored, for every
writer of the cache (the request pipeline's misses, the block follower's warming). It does no
I/O.

The four finality classes of DESIGN.md:

* ``FINALIZED``   - the block is final: cache forever, key by block number.
* ``UNFINALIZED`` - key by block **hash**, so a reorg can never serve the old answer.
* ``REALTIME``    - about the head: keyed by the head's hash, lives about one block time.
* ``NEVER``       - writes, filters, subscriptions, ``pending`` and unknown methods.

Tags are resolved against the node's head before keying, and the forwarded request names
the resolved block, so the answer stored under a key is the answer *for that block*.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

Params = list[Any] | dict[str, Any]


class Finality(enum.IntEnum):
    FINALIZED = 0
    UNFINALIZED = 1
    REALTIME = 2
    NEVER = 3


class Kind(enum.Enum):
    BLOCK = "block"  # reads state or data at a block given by a block parameter
    BLOCK_HASH = "block_hash"  # names a block by hash; answer valid while it is canonical
    TX_HASH = "tx_hash"  # names a transaction; answer valid while its block is canonical
    LOGS = "logs"  # eth_getLogs filter object
    CHAIN = "chain"  # a fact of the chain that never changes (chain id)
    HEAD = "head"  # the head's number, answered locally
    REALTIME = "realtime"  # about the current head (gas price, syncing)
    SEND = "send"  # eth_sendRawTransaction: to every primary (``UpstreamPool.broadcast``)
    # Subscriptions belong to a connection; forwarding them over a shared upstream
    # connection would lose every notification, so they are refused, as geth does on HTTP.
    SUBSCRIBE = "subscribe"
    # Installed filters are answered by the node's own filter table (subscriptions/filtertable.py),
    # fed by its head stream: an upstream's filter id would die with that upstream.
    FILTER = "filter"
    NEVER = "never"  # passes through, never cached


@dataclass(frozen=True, slots=True)
class Rule:
    kind: Kind
    # Index of the block parameter (BLOCK) or of the hash (BLOCK_HASH, TX_HASH).
    index: int = 0
    # Tag assumed when the block parameter is omitted; None: do not cache when omitted.
    default: str | None = "latest"
    # An unfinalized block is forwarded by its hash (a reorg then cannot answer for another
    # block): as an EIP-1898 {"blockHash": ...} object, or as the bare hash with bare_hash.
    by_hash: bool = False
    # eth_getBlockReceipts takes BlockNumberOrTagOrHash (execution-apis; geth, erigon and
    # anvil agree), and some upstreams refuse the EIP-1898 object for it (-32602).
    bare_hash: bool = False
    # What in the answer names its block: "block" (a block object), "item" (an object with
    # blockHash/blockNumber) or "items" (a list of those). Checked before storing.
    anchor: str | None = None


_B = Kind.BLOCK
RULES: dict[str, Rule] = {
    # state at a block
    "eth_getBalance": Rule(_B, 1, by_hash=True),
    "eth_getTransactionCount": Rule(_B, 1, by_hash=True),
    "eth_getCode": Rule(_B, 1, by_hash=True),
    "eth_getStorageAt": Rule(_B, 2, by_hash=True),
    "eth_call": Rule(_B, 1, by_hash=True),
    "eth_getProof": Rule(_B, 2, by_hash=True),
    # geth estimates against "pending" when the block is omitted: never cached then.
    "eth_estimateGas": Rule(_B, 1, default=None, by_hash=True),
    "eth_createAccessList": Rule(_B, 1, default=None, by_hash=True),
    # blocks by number
    "eth_getBlockByNumber": Rule(_B, 0, default=None, anchor="block"),
    "eth_getBlockReceipts": Rule(_B, 0, default=None, by_hash=True, bare_hash=True, anchor="items"),
    "eth_getBlockTransactionCountByNumber": Rule(_B, 0, default=None),
    "eth_getUncleCountByBlockNumber": Rule(_B, 0, default=None),
    "eth_getTransactionByBlockNumberAndIndex": Rule(_B, 0, default=None, anchor="item"),
    "eth_getUncleByBlockNumberAndIndex": Rule(_B, 0, default=None, anchor="block"),
    "eth_feeHistory": Rule(_B, 1, default=None),
    "debug_traceBlockByNumber": Rule(_B, 0, default=None),
    # blocks by hash
    "eth_getBlockByHash": Rule(Kind.BLOCK_HASH, 0, anchor="block"),
    "eth_getBlockTransactionCountByHash": Rule(Kind.BLOCK_HASH, 0),
    "eth_getUncleCountByBlockHash": Rule(Kind.BLOCK_HASH, 0),
    "eth_getTransactionByBlockHashAndIndex": Rule(Kind.BLOCK_HASH, 0, anchor="item"),
    "eth_getUncleByBlockHashAndIndex": Rule(Kind.BLOCK_HASH, 0, anchor="block"),
    "debug_traceBlockByHash": Rule(Kind.BLOCK_HASH, 0),
    # transactions by hash
    "eth_getTransactionByHash": Rule(Kind.TX_HASH, 0, anchor="item"),
    "eth_getTransactionReceipt": Rule(Kind.TX_HASH, 0, anchor="item"),
    # logs
    "eth_getLogs": Rule(Kind.LOGS, 0, anchor="items"),
    # chain facts and the head
    "eth_chainId": Rule(Kind.CHAIN),
    "net_version": Rule(Kind.CHAIN),
    "eth_blockNumber": Rule(Kind.HEAD),
    "eth_gasPrice": Rule(Kind.REALTIME),
    "eth_maxPriorityFeePerGas": Rule(Kind.REALTIME),
    "eth_blobBaseFee": Rule(Kind.REALTIME),
    "eth_syncing": Rule(Kind.REALTIME),
    "net_peerCount": Rule(Kind.REALTIME),
    "web3_clientVersion": Rule(Kind.REALTIME),
    # writes
    "eth_sendRawTransaction": Rule(Kind.SEND),
    # subscriptions
    "eth_subscribe": Rule(Kind.SUBSCRIBE),
    "eth_unsubscribe": Rule(Kind.SUBSCRIBE),
    # filters: state of this node, never cached
    "eth_newFilter": Rule(Kind.FILTER),
    "eth_newBlockFilter": Rule(Kind.FILTER),
    "eth_newPendingTransactionFilter": Rule(Kind.FILTER),
    "eth_getFilterChanges": Rule(Kind.FILTER),
    "eth_getFilterLogs": Rule(Kind.FILTER),
    "eth_uninstallFilter": Rule(Kind.FILTER),
}

TAGS = frozenset({"latest", "safe", "finalized", "earliest", "pending"})


class HeadView:
    """What ``plan`` needs to know of the head; filled by the head tracker."""

    __slots__ = ("canonical", "finalized", "generation", "hash", "number", "numbers", "safe")

    def __init__(self) -> None:
        self.number = -1
        self.hash = ""
        self.safe = -1
        self.finalized = -1
        # number -> hash of the recent canonical chain (a bounded window).
        self.canonical: dict[int, str] = {}
        # hash -> number, the same window seen the other way.
        self.numbers: dict[str, int] = {}
        # Bumped on every change, so plans derived from this view can be memoised.
        self.generation = 0

    @property
    def known(self) -> bool:
        return self.number >= 0

    def is_canonical(self, number: int, block_hash: str) -> bool | None:
        """True/False when known; None when the block is outside the remembered window."""
        got = self.canonical.get(number)
        if got is None:
            return None
        return got == block_hash


@dataclass(slots=True)
class Plan:
    """How to serve one call. ``key`` None: do not cache, forward ``params`` as they are."""

    finality: Finality
    key: bytes | None = None
    params: Params | None = None  # what to forward; None: the caller's params
    min_block: int = -1  # only upstreams at or past this block should answer
    block_number: int = -1  # the resolved block, for checks on the answer
    block_hash: str | None = None  # the resolved block's hash when unfinalized
    anchor: str | None = None  # see Rule.anchor
    validate_canonical: bool = False  # a by-hash answer: check its block on every hit
    # The forwarded request names its block by hash, so the answer is about that very block
    # and can never change, whatever it holds: an empty one ("0x", []) is stored too.
    pinned: bool = False
    # ``params`` naming the block by number instead, for an upstream that is one node and
    # whose own head is that very block (``block_hash``): the same state, and a number at
    # its head can be faster than a hash (``defaults.UPSTREAM_HEAD_BY_NUMBER``). Set for
    # unfinalized reads forwarded by hash.
    at_head: Params | None = None


PASS = Plan(Finality.NEVER)


def _hexint(value: Any) -> int | None:
    if isinstance(value, str) and value.startswith(("0x", "0X")) and 2 < len(value) <= 18:
        try:
            return int(value, 16)
        except ValueError:
            return None
    return None


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 66 and value[:2] in ("0x", "0X")


@dataclass(slots=True)
class _Block:
    number: int
    hash: str | None  # set when unfinalized
    final: bool


def ref_number(ref: Any, head: HeadView, *, pending: bool = False) -> int | None:
    """A block reference's number (a tag resolved against ``head``, a hex number, an
    EIP-1898 ``{"blockNumber": ...}``); None when it names none the head can say: a tag it
    does not know yet, a by-hash reference, an odd value, and "pending" unless ``pending``
    (a range bound reads it as the head; a cached read never names it).

    The one reading of a reference both for keying a read (``_resolve``) and for judging a
    log query's range (``logguards``)."""
    if isinstance(ref, dict):
        if "blockHash" in ref:
            return None  # by-hash references are keyed as given, see plan()
        ref = ref.get("blockNumber")
    if not isinstance(ref, str):
        return None
    if ref == "latest" or (pending and ref == "pending"):
        n = head.number
    elif ref == "safe":
        n = head.safe
    elif ref == "finalized":
        n = head.finalized
    elif ref == "earliest":
        return 0
    else:
        return _hexint(ref)  # past 64 bits: the upstream's own error answers it
    return n if n >= 0 else None


def _resolve(ref: Any, head: HeadView) -> _Block | None:
    """A block reference (tag, number, EIP-1898 object) as a concrete block; None: uncacheable."""
    n = ref_number(ref, head)
    if n is None or n > head.number:
        return None
    if n <= head.finalized:
        return _Block(n, None, True)
    h = head.canonical.get(n)
    if h is None:
        return None
    return _Block(n, h, False)


def _key(method: str, params: Any) -> bytes:
    try:
        return method.encode() + b":" + orjson.dumps(params, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer beyond 64 bits
        return method.encode() + b":" + json.dumps(params, sort_keys=True).encode()


def _with(params: list[Any], index: int, value: Any) -> list[Any]:
    out = list(params)
    while len(out) <= index:
        out.append(None)
    out[index] = value
    return out


def _hash_named(
    method: str,
    params: Params,
    block_hash: str,
    head: HeadView,
    anchor: str | None,
    keyed: Params | None = None,
    *,
    pinned: bool = True,
) -> Plan:
    """A read that names its block by hash: keyed as asked, served from cache only while
    that block is canonical. A hash outside the window (an old block, or one never seen)
    is checked through the block fields of the answer, where it has any. ``pinned``: the
    answer cannot change (see ``Plan.pinned``)."""
    n = head.numbers.get(block_hash, -1)
    return Plan(
        Finality.UNFINALIZED,
        _key(method, params if keyed is None else keyed),
        block_number=n,
        block_hash=block_hash if n >= 0 else None,
        anchor=anchor,
        validate_canonical=True,
        pinned=pinned,
    )


def _plan_block(method: str, rule: Rule, params: Params, head: HeadView) -> Plan:
    if not isinstance(params, list) or len(params) > rule.index + 2:
        return PASS
    if len(params) > rule.index:
        ref = params[rule.index]
    elif rule.default is not None:
        ref = rule.default
    else:
        return PASS
    if isinstance(ref, dict) and "blockHash" in ref and _is_hash(ref["blockHash"]):
        h = ref["blockHash"]
        if ref.get("requireCanonical") and h not in head.numbers:
            return PASS  # the answer depends on canonicality we cannot vouch for
        # Keyed like a tag resolved to the same block ("#H"), since that is forwarded as
        # exactly this request; requireCanonical is an answer of its own.
        mark = "#!" if ref.get("requireCanonical") else "#"
        keyed = _with(params, rule.index, mark + h)
        return _hash_named(method, params, h, head, rule.anchor, keyed)
    block = _resolve(ref, head)
    if block is None:
        return PASS
    if block.final:
        fwd_ref: Any = hex(block.number)
        keyed = _with(params, rule.index, fwd_ref)
        return Plan(
            Finality.FINALIZED,
            _key(method, keyed),
            params=keyed,
            min_block=block.number,
            block_number=block.number,
            anchor=rule.anchor,
        )
    assert block.hash is not None
    keyed = _with(params, rule.index, "#" + block.hash)
    if rule.bare_hash:
        fwd_ref = block.hash
    elif rule.by_hash:
        fwd_ref = {"blockHash": block.hash}
    else:
        fwd_ref = hex(block.number)
    return Plan(
        Finality.UNFINALIZED,
        _key(method, keyed),
        params=_with(params, rule.index, fwd_ref),
        min_block=block.number,
        block_number=block.number,
        block_hash=block.hash,
        anchor=rule.anchor,
        pinned=rule.by_hash,
        at_head=_with(params, rule.index, hex(block.number)) if rule.by_hash else None,
    )


def _plan_logs(method: str, params: Params, head: HeadView) -> Plan:
    if not isinstance(params, list) or len(params) != 1 or not isinstance(params[0], dict):
        return PASS
    flt: dict[str, Any] = params[0]
    if "blockHash" in flt:
        if not _is_hash(flt["blockHash"]) or "fromBlock" in flt or "toBlock" in flt:
            return PASS
        # Not pinned: some nodes answer [] for a block hash they do not know (yet).
        return _hash_named(method, params, flt["blockHash"], head, "items", pinned=False)
    lo = _resolve(flt.get("fromBlock", "latest"), head)
    hi = _resolve(flt.get("toBlock", "latest"), head)
    if lo is None or hi is None or lo.number > hi.number:
        return PASS
    fwd = dict(flt)
    fwd["fromBlock"] = hex(lo.number)
    fwd["toBlock"] = hex(hi.number)
    if hi.final:
        finality, keyed = Finality.FINALIZED, fwd
    else:
        # The hash of the last block commits to every block before it.
        finality, keyed = Finality.UNFINALIZED, {**fwd, "toBlock": "#" + str(hi.hash)}
    return Plan(
        finality,
        _key(method, [keyed]),
        params=[fwd],
        min_block=hi.number,
        block_number=hi.number,
        block_hash=None if hi.final else hi.hash,
        anchor="items",
    )


def plan(method: str, params: Params, head: HeadView, rules: Mapping[str, Rule] = RULES) -> Plan:
    """Decide how to serve ``method(params)`` given the node's current head."""
    rule = rules.get(method)
    if rule is None:
        return PASS
    kind = rule.kind
    if kind is Kind.BLOCK:
        if not head.known:
            return PASS
        return _plan_block(method, rule, params, head)
    if kind is Kind.BLOCK_HASH or kind is Kind.TX_HASH:
        if not isinstance(params, list) or not params or not _is_hash(params[0]):
            return PASS
        if kind is Kind.BLOCK_HASH:
            return _hash_named(method, params, params[0], head, rule.anchor)
        return Plan(
            Finality.UNFINALIZED,
            _key(method, params),
            anchor=rule.anchor,
            validate_canonical=True,
        )
    if kind is Kind.LOGS:
        if not head.known:
            return PASS
        return _plan_logs(method, params, head)
    if kind is Kind.CHAIN:
        return Plan(Finality.FINALIZED, _key(method, params))
    if kind is Kind.REALTIME:
        if not head.known:
            return PASS
        return Plan(Finality.REALTIME, _key(method, params) + b"@" + head.hash.encode())
    return PASS


def anchor_of(answer: Any, anchor: str | None) -> tuple[int, str] | bool | None:
    """The (number, hash) of the block a decoded answer belongs to.

    Returns None when the answer names no block (nothing to check), False when it is
    malformed or not yet in a block (a pending transaction): such answers are not stored.
    """
    if anchor is None or answer is None:
        return None
    try:
        if anchor == "block":
            return int(answer["number"], 16), answer["hash"]
        if anchor == "item":
            if answer.get("blockHash") is None:
                return False
            return int(answer["blockNumber"], 16), answer["blockHash"]
        if anchor == "items":
            if not answer:
                return None
            first = answer[0]
            if first.get("blockHash") is None:
                return False
            return int(first["blockNumber"], 16), first["blockHash"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return None


def items_canonical(answer: Any, head: HeadView) -> bool:
    """Every item of a list answer (logs, receipts) sits on the chain this node follows."""
    if not isinstance(answer, list):
        return True
    seen: tuple[str, str] | None = None  # the last item's block, checked: most share it
    for item in answer:
        try:
            block = (item["blockNumber"], item["blockHash"])
            if block == seen:
                continue
            n = int(block[0], 16)
        except (KeyError, TypeError, ValueError):
            return False
        if n > head.finalized and head.is_canonical(n, block[1]) is False:
            return False
        seen = block
    return True


# Results that say "nothing here (yet)": a block or transaction not seen, no receipts, no
# code. Stored only for final blocks, where they can no longer change, or as the answer to
# a request pinned to a block hash (``Plan.pinned``), which cannot change either. ``null``
# only for final blocks: a node that has not seen a block (yet) answers ``null`` for it.
EMPTY_RESULTS = (b"null", b"[]", b'"0x"')
NOT_FOUND = b"null"


class Storing(NamedTuple):
    """How an answer is stored: under ``key``, for ``lifetime`` seconds (0: until evicted),
    and served only while the block (``anchor_number``, ``anchor_hash``) is canonical
    (-1, None: no check on hits)."""

    key: bytes
    lifetime: float
    anchor_number: int
    anchor_hash: str | None


def store_decision(
    p: Plan,
    result: bytes | None,
    error: bytes | None,
    decoded: Any,
    head: HeadView,
    block_time: float,
    block: tuple[int, str] | None = None,
) -> Storing | None:
    """Whether an answer to a call planned as ``p`` is stored, and how; None: not stored.

    ``result``/``error``: the raw answer; ``decoded``: the decoded result when at hand (its
    block fields are checked against the key); ``block``: the block the answer is known to
    belong to without decoding it (the block follower's own blocks). Never stored: errors,
    uncacheable plans, empty answers to blocks that are not final unless the request is
    pinned to its block by hash (then never ``null``), answers of another
    fork than the key names, or of a block that is reorged away or past the head.
    """
    if error is not None or result is None or p.key is None:
        return None
    if (
        result in EMPTY_RESULTS
        and p.finality is not Finality.FINALIZED
        and (not p.pinned or result == NOT_FOUND)
    ):
        return None
    anchor = block if block is not None else anchor_of(decoded, p.anchor)
    if anchor is False:
        return None
    lifetime = 0.0
    a_num, a_hash = -1, None
    if p.finality is Finality.REALTIME:
        lifetime = block_time
    elif p.block_hash is not None or p.validate_canonical:
        # Every answer keyed by a block hash carries that block, so a hit is refused
        # once the block is reorged away, however the caller named it.
        if p.block_hash is not None:
            a_num, a_hash = p.block_number, p.block_hash
        elif isinstance(anchor, tuple):
            a_num, a_hash = anchor
        if a_hash is not None:
            if a_num > head.number or head.is_canonical(a_num, a_hash) is False:
                return None
            if isinstance(anchor, tuple) and p.anchor != "items" and anchor[1] != a_hash:
                return None  # answered from another fork than the one the key names
            if a_num <= head.finalized:
                a_num, a_hash = -1, None  # final: no check needed on hits
    elif isinstance(anchor, tuple) and p.anchor == "block" and anchor[0] != p.block_number:
        return None  # a final block asked by number, answered with another one
    if p.anchor == "items" and not items_canonical(decoded, head):
        return None
    return Storing(p.key, lifetime, a_num, a_hash)
