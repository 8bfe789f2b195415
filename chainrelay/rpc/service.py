"""The JSON-RPC request pipeline: policy → cache → coalescer → upstream pool → store.

``handle`` answers a body synchronously when every call in it is a cache hit or a local
answer (the hot path: no task, no upstream I/O, one concatenation per answer), and returns
an awaitable otherwise. Transports (HTTP, WebSocket) own nothing of this logic. A call
answered so is remembered for the rest of the head as a ``Seen`` record, which answers its
repeats under other ids: by the body's remainder inside ``handle``, or by whole request
bytes that a transport keeps (``serve`` returns the record with the answer) and checks
again through ``replay``. Those tables are ``ReplayTable``s (``rpc/replay.py``).

A read that is never cached goes straight to a healthy WebSocket or HTTP upstream (one only)
(``rpc/forward.py``): no task, and its answer readdressed to the caller's id without
decoding; its repeats at the same head are sent as the relay encoded the first one,
id aside, with no decoding (a node must never read a repeat otherwise than the first call).
A transport error hands the call to the full path, which retries and fails over.

A client batch is one unit of upstream work: its plain upstream reads go up as JSON-RPC
batches of ``[pool] batch_len`` calls (``_gather``, ``_chunk``), each call answered,
coalesced and stored as it would be alone. Every client miss passes the gate of upstream
calls in flight (``rpc/gate.py``): per client address, where a client past its bound waits
for its own earlier calls, and node-wide, where the node answers -32005 at once.

Every body of a client pays its identity's rate limit (``access/buckets.py``) before any of
its calls is answered, on every way in: a ``Seen`` replay, a forwarded repeat, a single
call (a hit at its hit cost), a batch (the sum of its calls' costs, up front). Past it,
``serve`` raises ``RateLimited`` (the transport answers 429 or -32005); under shared buckets
whose slice is empty it returns an awaitable that leases first (``_leased``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import CoroutineType
from typing import Any, Final, Protocol

import orjson

from chainrelay import defaults as d
from chainrelay.access.buckets import ASK, Limiter
from chainrelay.access.identity import NODE, Identity
from chainrelay.access.methods import METHOD_NOT_FOUND, MethodRules
from chainrelay.access.senders import SenderLimit
from chainrelay.access.sharedbuckets import SharedLimiter
from chainrelay.chain.head import HeadTracker
from chainrelay.config import LimitsConfig, TierConfig
from chainrelay.errors import (
    RateLimited,
    RequestError,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamUnavailable,
    error_code,
    error_message,
)
from chainrelay.metrics import REPLAY_TIMED_EVERY, Metrics
from chainrelay.rpc import logscan, logsplit, policy
from chainrelay.rpc.cache import ANCHOR_HASH, ANCHOR_NUMBER, VALUE, Entry, MemoryCache, stored_entry
from chainrelay.rpc.coalesce import Coalescer
from chainrelay.rpc.forward import AnswerSink, Forwarder
from chainrelay.rpc.gate import CALLER, UpstreamGate
from chainrelay.rpc.logguards import LogGuards
from chainrelay.rpc.logscan import Spliced
from chainrelay.rpc.logsplit import SplitRule
from chainrelay.rpc.policy import Finality, Kind, Plan
from chainrelay.rpc.replay import ReplayTable, Seen
from chainrelay.server.ws import current_subscriptions
from chainrelay.slices import decode_result
from chainrelay.upstreams.pool import AtHead, UpstreamPool
from chainrelay.upstreams.route import PRIMARY
from chainrelay.upstreams.upstream import Upstream
from chainrelay.wire.jsonrpc import (
    NULL_ID,
    Answer,
    Call,
    Item,
    encode_error,
    encode_error_raw,
    encode_result,
    id_probe,
    join_batch,
    kept,
    parse_body,
    split_id,
)

log = logging.getLogger(__name__)

_RULES = policy.RULES
_UNSET = b"\x00unset"
NOTIFICATIONS_UNSUPPORTED = b'{"code":-32601,"message":"notifications not supported"}'
SUBSCRIBE_WITHOUT_ID = b'{"code":-32600,"message":"eth_subscribe needs an id"}'
_TIMED_MASK = REPLAY_TIMED_EVERY - 1
_CHAIN_ID = "eth_chainId"
# Reads whose miss brings in the rest of their block (``chain.fill``).
_FILLED_BY = frozenset({"eth_getTransactionReceipt", "eth_getTransactionByHash"})
_BLOCK_NUMBER = "eth_blockNumber"
_GET_LOGS = "eth_getLogs"
# Once a client batch holds a miss, its own work (planning its calls, writing their
# answers: ~30 us a call) gives the event loop back after this long: every batch under way
# takes a step per loop turn, so ten batches of 1,000 arriving at once hold a turn for
# ~5 ms, not for the 300 ms their calls take in all.
BATCH_STEP = 0.0005
# Answers of a batch written between looks at the clock.
_ANSWERS_PER_LOOK = 64
# Kinds whose calls in a client batch keep their own path (``_fetch``'s), never an upstream
# batch: writes go to every primary (``pool.broadcast``), subscriptions and filters are the
# node's own, and a log query's answer is measured against its size guard there.
_OWN_PATH = frozenset((Kind.SEND, Kind.SUBSCRIBE, Kind.FILTER, Kind.LOGS))


class SharedCache(Protocol):
    """A cache tier shared by several processes or nodes (Redis), behind the memory LRU.

    Every method must stay fast and must not raise when the shared tier is down: the
    shared cache is an accelerator, never a point of failure.
    """

    async def get(self, key: bytes) -> Entry | None: ...

    async def put(self, key: bytes, entry: Entry, finality: Finality) -> None: ...

    async def exclusive(self, key: bytes, produce: Callable[[], Awaitable[Answer]]) -> Answer:
        """Run ``produce`` in one process at a time for ``key``; the others wait for the
        answer it stores, and run ``produce`` themselves if the holder dies or stores none."""
        ...


# (method, params, derive): a client read that ``RpcService.follower_call`` answers from its
# own call's decoded answer (``derive`` returns the decoded value, None when it has none).
Derived = tuple[str, list[Any], Callable[[Any], Any]]


class FilterCalls(Protocol):
    """The node's filter service (``subscriptions/filters.py``), as the pipeline sees it."""

    async def call(self, method: str, params: policy.Params | None) -> Answer: ...


class Lookup(enum.Enum):
    """Why ``RpcService._answer_now`` found no answer without I/O."""

    MISS = "miss"  # cacheable, but not in the cache (or no longer canonical)
    UNCACHED = "uncached"  # never cached: may go straight to an upstream, unplanned


# Read once: a member read off its Enum class costs a Python call per request.
_MISS: Final = Lookup.MISS
_UNCACHED: Final = Lookup.UNCACHED
# A call answered without I/O: (result, cache key, entry); key and entry None for a local
# answer (eth_chainId, eth_blockNumber).
Found = tuple[bytes, bytes | None, Entry | None]
# An answer (or the awaitable of one), with the record that answered it from cache or
# locally when a transport may replay it (see ``RpcService.serve``).
Served = tuple[bytes | Awaitable[bytes | None], Seen | None]


@dataclass(slots=True, eq=False)
class Batched:
    """A call of a client batch that goes upstream in an upstream batch (``_chunk``):
    ``plan`` None for a read that is never cached; ``answer`` settled by its chunk (or by
    the shared tier), and for a cached read listed in the coalescer, so identical calls
    join it."""

    call: Call
    started: float
    plan: Plan | None
    method: str
    params: policy.Params | None
    min_block: int
    answer: asyncio.Future[Answer]
    outcome: str  # counted as: "pass" (never cached), "miss", "shared_hit"


class RpcService:
    def __init__(
        self,
        cache: MemoryCache,
        pool: UpstreamPool,
        head: HeadTracker,
        metrics: Metrics,
        chain_id: int,
        limits: LimitsConfig,
        shared: SharedCache | None = None,
        *,
        methods: MethodRules | None = None,
        log_guards: LogGuards | None = None,
        log_split: SplitRule | None = None,
        tiers: Mapping[str, TierConfig] | None = None,
        limiter: Limiter | SharedLimiter | None = None,
        senders: SenderLimit | None = None,
    ) -> None:
        """``limits``: a batch's length, and the bounds of the replay tables below (their
        bodies, and the answers they keep alive after the cache has let them go).
        ``methods``: who may call what (the defaults when None); ``log_guards``: the
        eth_getLogs guards (the defaults, with the chain profile's range, when None);
        ``log_split``: how a wide eth_getLogs is asked in chunks (the chain profile's chunk
        and the default concurrency when None);
        ``tiers``: each tier's batch length, within the node's ``limits.max_batch_len``;
        ``limiter``: the rate limits per identity (None: none); ``senders``: the limit of
        eth_sendRawTransaction per sender (None: none)."""
        self.cache = cache
        self.limiter = limiter
        self.senders = senders
        self.shared = shared
        self.pool = pool
        self.head = head
        self.view = head.view
        self.metrics = metrics
        # Copied out of ``limits``: read on every request that is not a replay.
        self.max_batch_len = limits.max_batch_len
        # A tier's batch length, the node's at most.
        self.batch_len_by_tier = {
            name: min(tier.max_batch_len, limits.max_batch_len)
            for name, tier in (tiers or {}).items()
        }
        self.methods = methods if methods is not None else MethodRules()
        # tier -> the methods its clients may call: the hot path's one lookup.
        self._names_by_tier = self.methods.names_by_tier
        self.log_guards = log_guards or LogGuards(
            head.profile.logs_max_block_range,
            d.LOGS_MAX_ADDRESSES,
            d.LOGS_MAX_TOPICS_PER_POSITION,
            d.LOGS_MAX_ANSWER_BYTES,
        )
        self.log_split = log_split or SplitRule(
            head.profile.logs_split_blocks, d.LOGS_SPLIT_CONCURRENCY
        )
        self.memo_max_params_bytes = limits.memo_max_params_bytes
        self.chain_id = chain_id
        self._chain_id_json = f'"{hex(chain_id)}"'.encode()
        self._coalescer: Coalescer[Answer] = Coalescer()
        self._block_time = head.profile.block_time
        # (method, params JSON) -> cache key (None: never cached), at this head: skips
        # planning on repeated calls.
        self._memo: ReplayTable[tuple[str, bytes], bytes | None] = ReplayTable(
            limits.max_hit_table_bytes, limits.max_hit_table_entries, _memo_size
        )
        # Body without its id -> what answered it, for bodies answered from cache (or
        # locally) at this head: repeated calls skip decoding too.
        self._seen: ReplayTable[bytes, Seen] = ReplayTable(
            limits.max_hit_table_bytes, limits.max_hit_table_entries, _seen_size
        )
        # Installed filters (eth_newFilter & co), answered by the node; set by the app.
        self.filters: FilterCalls | None = None
        # Told of each miss (the method's name): the block follower follows blocks while
        # misses it could have answered are recent (``BlockFollower.note_miss``).
        self.note_miss: Callable[[str], None] | None = None
        # Told of each receipt or transaction read that went upstream, with the block its
        # answer names (method, number, hash): the block follower fills the rest of that
        # block (``BlockFiller.note``).
        self.note_block_of: Callable[[str, int, str], None] | None = None
        # eth_getLogs from the block logs the node holds (chain/locallogs.py), tried on a miss
        # before the upstreams; its answer None: ask the upstreams.
        self.local_logs: Callable[[policy.Params | None], Awaitable[Answer | None]] | None = None
        # Client reads answerable from a block follower's call under way, by cache key:
        # (that call, the read's plan, how to pick its answer out of the call's). A client
        # that misses on one waits for that call instead of asking upstream; entries go
        # when the call ends (the follower then warms the cache with all of it).
        self._derivable: dict[bytes, tuple[asyncio.Future[Answer], Plan, Callable[[Any], Any]]] = {}
        # Reads that are never cached, sent straight to a WebSocket upstream.
        self._forwarder = Forwarder(pool, metrics, head.view, self._answer_later, limits)
        # Upstream calls under way for clients, node-wide and per client address.
        self.gate = UpstreamGate(
            limits.max_upstream_in_flight, limits.max_upstream_in_flight_per_client
        )
        # Calls per upstream batch, and the one deadline of a client's call (``[pool]
        # deadline``), which covers its wait for the client's own earlier calls too; a
        # batch's chunks end by the deadline of the batch's first miss.
        self.batch_len = pool.settings.batch_len
        self.call_budget = pool.settings.deadline
        self._chunks: set[asyncio.Task[None]] = set()  # upstream batches under way

    # --- entry point -----------------------------------------------------------------
    def handle(self, body: bytes, who: Identity = NODE) -> bytes | Awaitable[bytes | None]:
        """The answer to an HTTP body or WebSocket message from ``who`` (b"", or None
        later, when nothing is owed)."""
        return self.serve(body, who)[0]

    def serve(self, body: bytes, who: Identity = NODE) -> Served:
        """The answer to a body from ``who``, as ``handle`` gives it, and the ``Seen`` record that
        answered it when its repeats (id aside) may be replayed by the caller through
        ``replay``: a transport that keeps whole requests (HttpServer) learns it there."""
        limiter = self.limiter
        split = split_id(body)
        if split is not None:
            record = self._seen.get(split[1])
            if record is not None:
                value = self.replay(record, who)
                if value is not None:
                    if limiter is not None:
                        wait = limiter.take_call(who, record.method, True)
                        if wait:
                            cost = limiter.cost(who, record.method, True)
                            return self._limited(body, who, wait, cost, split[0]), None
                    return encode_result(split[0], value), record
            forwarder = self._forwarder
            if forwarder.passes and forwarder.passes.get_at(split[1], self.view.generation):
                out = forwarder.future()
                again, wait, cost = self._send_again(body, split[0], split[1], who, out)
                if wait:
                    return self._limited(body, who, wait, cost, split[0]), None
                if again:
                    return out, None
        started = time.perf_counter()
        try:
            items, is_batch = parse_body(
                body, self.batch_len_by_tier.get(who.tier, self.max_batch_len)
            )
        except RequestError as exc:
            self.metrics.count("", "invalid", 0.0)
            return encode_error(NULL_ID, exc.code, exc.message), None
        if is_batch:
            if limiter is not None:
                cost = limiter.batch_cost(who, (c.method for c in items if isinstance(c, Call)))
                wait = limiter.take(who, cost)
                if wait:
                    return self._limited(body, who, wait, cost, NULL_ID), None
            return self._batch(items, who), None
        item = items[0]
        if isinstance(item, bytes):
            self.metrics.count("", "invalid", 0.0)
            return item, None
        method = item.method
        names = self._names_by_tier.get(who.tier) if who.methods is None else None  # allowed()
        if names is None:
            names = self.methods.names(who)
        if method not in names or method == _GET_LOGS:
            refused = self._refused(item, who)
            if refused is not None:
                return refused, None
        if limiter is not None:
            # A hit's cost first, before the call is looked up: a client past its rate is
            # refused without planning its call (an abuser's fresh calls fill no table).
            wait = limiter.take_call(who, item.method, True)
            if wait:
                cost = limiter.cost(who, item.method, True)
                return self._limited(body, who, wait, cost, item.id or NULL_ID), None
        found = self._answer_now(item, started)
        if limiter is not None and (found is _MISS or found is _UNCACHED):
            paid = limiter.cost(who, item.method, True)
            more = limiter.cost(who, item.method, False) - paid
            wait = limiter.take(who, more) if more > 0 else 0.0
            if wait:
                limiter.give(who, paid)  # refused whole: what it paid goes back
                return self._limited(body, who, wait, paid + more, item.id or NULL_ID), None
        if found is _UNCACHED and item.id is not None:
            sent = self._forwarder.send(item, started, split)
            if sent is not None:
                return sent, None
        if found is _MISS or found is _UNCACHED:
            return self._answer_gated(item, who, started, found is _UNCACHED), None
        rid = item.id
        if rid is None:
            return b"", None
        record = None
        if split is not None and split[0] == rid:
            record = self._remember(split[1], item.method, found)
        return encode_result(rid, found[0]), record

    def passed(self, rest: bytes) -> int | None:
        """For a body just forwarded uncached (``Forwarder.send``), ``rest`` that body
        without its id: the head's generation when the forwarder remembers its call under
        it (``again`` can send it again), else None."""
        generation = self.view.generation
        if self._forwarder.passes.get_at(rest, generation) is None:
            return None
        return generation

    def again(self, body: bytes, token: bytes, rest: bytes, who: Identity, out: AnswerSink) -> bool:
        """Send the call forwarded before at this head whose body without its id is
        ``rest`` again for ``who`` under the id ``token`` (``Forwarder.again``), its
        upstream cost paid first, its answer to be given to ``out``. False when it must
        take the full path (``serve``): not remembered at this head, a method ``who`` may
        not call, no upstream to send it to now, or ``who`` past its rate (``serve``
        refuses it as it refuses any repeat)."""
        return self._send_again(body, token, rest, who, out)[0]

    def _send_again(
        self, body: bytes, token: bytes, rest: bytes, who: Identity, out: AnswerSink
    ) -> tuple[bool, float, float]:
        """``again``'s send: (True, 0, 0) when sent; (False, the wait, the cost) when
        ``who`` is past its rate (nothing taken); (False, 0, 0) when it takes the full
        path."""
        forwarder = self._forwarder
        limiter = self.limiter
        cost = 0.0
        if limiter is not None:
            known = forwarder.passes.get_at(rest, self.view.generation)
            if known is not None:
                cost = limiter.cost(who, known[0], False)
                wait = limiter.take(who, cost)
                if wait:
                    return False, wait, cost
        sent = forwarder.again(body, token, rest, self.allowed(who), out)
        if not sent and cost:
            assert limiter is not None
            limiter.give(who, cost)  # charged again on the full path
        return sent, 0.0, 0.0

    def allowed(self, who: Identity) -> frozenset[str]:
        """The methods the node knows of that ``who`` may call (``MethodRules.names``): a
        method outside it is refused, or takes ``_refused``'s slower look."""
        if who.methods is None:
            names = self._names_by_tier.get(who.tier)
            if names is not None:
                return names
        return self.methods.names(who)

    def _refused(self, call: Call, who: Identity) -> bytes | None:
        """The answer refusing ``call`` from ``who`` (b"" for a notification, owed nothing),
        or None when it may go on: a method ``who`` may not call (-32601), an eth_getLogs
        past a guard (-32005)."""
        method = call.method
        why: bytes | None = None
        if method not in self.allowed(who):
            message = self.methods.refusal(method, who)
            if message is not None:
                why = orjson.dumps({"code": METHOD_NOT_FOUND, "message": message})
        if why is None and method == _GET_LOGS:
            why = self.log_guards.refusal(call.params, self.view)
        if why is None:
            return None
        self.metrics.count(method, "refused", 0.0)
        return encode_error_raw(call.id, why) if call.id is not None else b""

    def _batch(self, items: list[Item], who: Identity) -> bytes | Awaitable[bytes]:
        """A batch's answer (paid for already, as misses): answered now when all its
        calls are hits or local answers, which are then refunded what a hit costs less."""
        parts: list[bytes | Awaitable[bytes | None] | Batched | None] = []
        allowed = self.allowed(who)
        for at, item in enumerate(items):
            if isinstance(item, bytes):
                self.metrics.count("", "invalid", 0.0)
                parts.append(item)
                continue
            if item.method not in allowed or item.method == _GET_LOGS:
                refused = self._refused(item, who)
                if refused is not None:
                    parts.append(refused or None)
                    continue
            started = time.perf_counter()
            found = self._answer_now(item, started)
            if found is _MISS or found is _UNCACHED:
                return self._gather(parts, items, at, who, started, found is _UNCACHED)
            parts.append(encode_result(item.id, found[0]) if item.id is not None else None)
        limiter = self.limiter
        if limiter is not None:
            limiter.refund_hits(who, (c.method for c in items if isinstance(c, Call)))
        return join_batch([p for p in parts if isinstance(p, bytes)]) if parts else b""

    # --- rate limits -----------------------------------------------------------------
    def _limited(
        self, body: bytes, who: Identity, wait: float, cost: float, rid: bytes
    ) -> Awaitable[bytes | None]:
        """A body its identity's bucket cannot pay for now: ``RateLimited`` raised, or
        under shared buckets whose slice is empty (``ASK``) the awaitable that leases
        the cost first, then serves it."""
        if wait == ASK:
            return self._leased(body, who, cost, rid)
        self.metrics.rejected.labels("rate_limit").inc()
        raise _rate_limited(wait, rid)

    async def _leased(self, body: bytes, who: Identity, cost: float, rid: bytes) -> bytes | None:
        limiter = self.limiter
        assert limiter is not None
        wait = await limiter.lease(who, cost)
        if wait:
            self.metrics.rejected.labels("rate_limit").inc()
            raise _rate_limited(wait, rid)
        out = self.serve(body, who)[0]  # in the same turn: the slice pays it now
        if isinstance(out, bytes):
            return out
        return await out

    async def _gather(
        self,
        parts: list[bytes | Awaitable[bytes | None] | Batched | None],
        items: list[Item],
        at: int,
        who: Identity,
        started: float,
        uncached: bool,
    ) -> bytes:
        """The answer of a batch whose call ``at`` is a miss (``parts``: the answers of
        those before it), in the order of its calls. The calls from ``at`` on are served
        here, ``BATCH_STEP`` of them per turn of the event loop: a batch of a thousand
        calls never holds the loop for all of them.

        Plain upstream reads go upstream as upstream batches of ``batch_len`` calls, each
        sent as soon as it is full and counted as that many calls in flight of the client
        (``_chunk``); every other miss takes a single call's path."""
        ups: list[Batched] = []
        chunks: list[asyncio.Task[None]] = []
        name = who.name
        allowed = self.allowed(who)
        deadline = started + self.call_budget  # perf_counter, as the pool's
        size = self.batch_len
        found: Found | Lookup = _UNCACHED if uncached else _MISS  # call ``at``'s, known
        # Cached reads to look up in the shared tier first (in one MGET), when there is one.
        looked: list[Batched] | None = [] if self.shared is not None else None
        step_end = started + BATCH_STEP
        try:
            for n, item in enumerate(items[at:]):
                if n:
                    started = time.perf_counter()
                    if started > step_end:
                        await asyncio.sleep(0)
                        started = time.perf_counter()
                        step_end = started + BATCH_STEP
                    if isinstance(item, bytes):
                        self.metrics.count("", "invalid", 0.0)
                        parts.append(item)
                        continue
                    if item.method not in allowed or item.method == _GET_LOGS:
                        refused = self._refused(item, who)
                        if refused is not None:
                            parts.append(refused or None)
                            continue
                    found = self._answer_now(item, started)
                assert not isinstance(item, bytes)
                if found is _MISS or found is _UNCACHED:
                    parts.append(
                        self._batch_miss(item, who, started, found is _UNCACHED, ups, looked)
                    )
                    if len(ups) >= size:
                        chunks.append(self._send_chunk(ups, name, deadline))
                        ups = []
                elif item.id is not None:
                    parts.append(encode_result(item.id, found[0]))
                else:
                    parts.append(None)
            if looked:
                for it in await self._shared_misses(looked):
                    ups.append(it)
                    if len(ups) >= size:
                        chunks.append(self._send_chunk(ups, name, deadline))
                        ups = []
            looked = None
        except BaseException:
            for p in parts:  # single calls' paths not started: never will be
                if isinstance(p, CoroutineType):
                    p.close()
            raise
        finally:
            # Even when this client went away: its calls in the coalescer may be joined.
            if looked:
                ups.extend(looked)
            for i in range(0, len(ups), size):
                chunks.append(self._send_chunk(ups[i : i + size], name, deadline))
        waits = [p for p in parts if p is not None and not isinstance(p, bytes | Batched)]
        # A chunk's calls may have been joined by others: a client gone cancels its own wait
        # only, never the chunk (which settles every call of it, whatever happens).
        got = await asyncio.gather(*waits, *(asyncio.shield(c) for c in chunks))
        done = iter(got)
        out: list[bytes] = []
        step_end = time.perf_counter() + BATCH_STEP
        for n, p in enumerate(parts, 1):
            if not n % _ANSWERS_PER_LOOK and time.perf_counter() > step_end:
                await asyncio.sleep(0)
                step_end = time.perf_counter() + BATCH_STEP
            if p is None:
                continue
            if isinstance(p, bytes):
                answer: bytes | None = p
            elif isinstance(p, Batched):
                answer = self._batched_answer(p)
            else:
                answer = next(done)
            if answer:
                out.append(answer)
        return join_batch(out) if out else b""

    def _send_chunk(self, ups: list[Batched], who: str, deadline: float) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._chunk(ups, who, deadline))
        self._chunks.add(task)  # runs on for its joiners if this batch's client goes
        task.add_done_callback(self._chunks.discard)
        return task

    def _batch_miss(
        self,
        call: Call,
        who: Identity,
        started: float,
        uncached: bool,
        ups: list[Batched],
        looked: list[Batched] | None,
    ) -> bytes | Awaitable[bytes | None] | Batched | None:
        """How one miss of a client batch is served, as ``_fetch`` would serve it alone: a
        plain upstream read is added to ``ups`` (its upstream batches), a cached one to
        ``looked`` first when there is a shared tier (``_shared_misses``); writes,
        subscriptions, filters, eth_getLogs (answered from the block logs the node holds
        where it can, and measured against its size guard), reads the node may answer
        itself (a block follower's call under way) and reads joining an identical one under
        way take the single call's path."""
        method = call.method
        rule = _RULES.get(method)
        params = call.params if call.has_params else None
        if rule is not None and rule.kind in _OWN_PATH:  # planned as never cached, too
            return self._answer_gated(call, who, started, uncached)
        if rule is None or uncached:
            return self._batched(ups, call, started, None, params)
        p = policy.plan(method, call.params, self.view)
        key = p.key
        if key is None:
            return self._batched(ups, call, started, None, params)
        entry = self.cache.get(key)
        if entry is not None and self._still_canonical(entry):
            self.metrics.hits += 1
            self.metrics.count(method, "hit", time.perf_counter() - started)
            return encode_result(call.id, entry[VALUE]) if call.id is not None else None
        if key in self._coalescer or key in self._derivable:
            return self._answer_later(call, started)  # joins: no upstream call of its own
        fwd = p.params if p.params is not None else params
        if looked is not None:
            return self._batched(looked, call, started, p, fwd)
        self._count_miss(method)
        return self._batched(ups, call, started, p, fwd)

    def _count_miss(self, method: str) -> None:
        self.metrics.misses += 1
        note = self.note_miss
        if note is not None:
            note(method)

    async def _shared_misses(self, looked: list[Batched]) -> list[Batched]:
        """Answer the cached reads of ``looked`` that the shared tier holds (looked up
        together: one MGET); the others, to ask upstream. Unlike a single call's, their
        upstream calls are not made one process at a time (``SharedCache.exclusive``)."""
        shared = self.shared
        assert shared is not None
        keys = [it.plan.key for it in looked if it.plan is not None and it.plan.key is not None]
        assert len(keys) == len(looked)
        entries = await asyncio.gather(*(shared.get(k) for k in keys))
        misses: list[Batched] = []
        for it, key, entry in zip(looked, keys, entries, strict=True):
            if entry is not None and self._still_canonical(entry):
                self.cache.put(key, entry)
                self.metrics.cache_bytes.set(self.cache.bytes)
                self.metrics.hits += 1
                it.outcome = "shared_hit"
                it.answer.set_result(Answer(entry[VALUE], None))
            else:
                self._count_miss(it.method)
                misses.append(it)
        return misses

    def _batched(
        self,
        ups: list[Batched],
        call: Call,
        started: float,
        p: Plan | None,
        params: policy.Params | None,
    ) -> Batched:
        if p is None:
            fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
            item = Batched(call, started, None, call.method, params, -1, fut, "pass")
        else:
            assert p.key is not None
            fut = self._coalescer.promise(p.key)
            item = Batched(call, started, p, call.method, params, p.min_block, fut, "miss")
        ups.append(item)
        return item

    async def _chunk(self, items: list[Batched], who: str, deadline: float) -> None:
        """Ask upstream for ``items`` as one upstream batch (one call when alone), counted
        as that many calls in flight of ``who``, and settle each: stored as a single call's
        answer is (``_store``), then handed to whoever waits on it. Never raises: every
        call of the chunk is settled, an error being its answer."""
        n = len(items)
        gate = self.gate
        try:
            await gate.enter(who, n, deadline, items[0].method)
        except UpstreamError as exc:
            _settle_failed(items, exc)
            return
        try:
            got: list[Answer | UpstreamError]
            if n == 1:
                it = items[0]
                try:
                    one = await self.pool.call(
                        it.method,
                        it.params,
                        it.min_block,
                        deadline=deadline,
                        at_head=_at_head(it.plan),
                    )
                    got = [one]
                except UpstreamError as exc:
                    got = [exc]
            else:
                calls = [(it.method, it.params) for it in items]
                min_block = max(it.min_block for it in items)
                at_head = [_at_head(it.plan) for it in items]
                got = await self.pool.call_batch(
                    calls, min_block, deadline=deadline, at_head=at_head
                )
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):
                raise  # closed by the collector after its loop ended: no one is waiting
            if not isinstance(exc, Exception):
                _settle_failed(items, UpstreamUnavailable("call abandoned"))
                raise
            log.exception("internal error serving an upstream batch")
            _settle_failed(items, exc)
            return
        finally:
            gate.leave(who, n)
        failed = [a for a in got if not isinstance(a, Answer)]
        if failed:  # once for the chunk: a batch of 1,000 is not 1,000 lines of log
            log.warning("upstream batch of %d: %d calls failed: %s", n, len(failed), failed[0])
        shared = self.shared
        puts = []
        for it, answer in zip(items, got, strict=True):
            if isinstance(answer, Answer):
                p = it.plan
                if p is not None:
                    entry = self._store(p, answer)
                    self._fill_block(it.method, answer)
                    if entry is not None and shared is not None and p.key is not None:
                        puts.append(shared.put(p.key, entry, p.finality))
                it.answer.set_result(answer)
            else:
                _settle_failed([it], answer)
        if puts:
            await asyncio.gather(*puts)

    def _batched_answer(self, item: Batched) -> bytes | None:
        """The answer of a call its chunk settled, counted and addressed as
        ``_answer_later`` answers a call alone."""
        call = item.call
        method = item.method
        rid = call.id or NULL_ID
        elapsed = time.perf_counter() - item.started
        exc = item.answer.exception()
        if exc is not None:
            if isinstance(exc, UpstreamOverloaded):  # never sent: no upstream to name
                self.metrics.count(method, "shed", elapsed)
                return encode_error(rid, exc.code, exc.message)
            self.metrics.count(method, "error", elapsed)
            if isinstance(exc, UpstreamError):  # logged once for its chunk (``_chunk``)
                data = {"upstream": exc.upstream, "attempts": exc.attempts}
                return encode_error(rid, error_code(exc), error_message(exc), data)
            return encode_error(rid, -32603, "internal error")
        self.metrics.count(method, item.outcome, elapsed)
        if call.id is None:
            return None
        answer = item.answer.result()
        if answer.error is not None:
            return encode_error_raw(rid, answer.error)
        assert answer.result is not None
        return encode_result(rid, answer.result)

    async def _answer_gated(
        self, call: Call, who: Identity, started: float, uncached: bool = False
    ) -> bytes | None:
        """``_answer_later`` once the client's upstream calls in flight leave room for one
        more (``UpstreamGate``): at once on the usual path, else after its own earlier calls
        end; -32005 when the node is at its bound or the wait would pass the call's
        deadline."""
        gate = self.gate
        name = who.name
        if not gate.enter_now(name, 1):
            deadline = started + self.call_budget  # ``_answer_later``'s own: the wait counts
            try:
                await gate.enter(name, 1, deadline, call.method)
            except UpstreamError as exc:
                self.metrics.count(call.method, "shed", time.perf_counter() - started)
                if call.id is None:
                    return None
                return encode_error(call.id, error_code(exc), error_message(exc))
        token = CALLER.set(name)  # a split eth_getLogs's chunks take this client's slots
        try:
            return await self._answer_later(call, started, uncached=uncached)
        finally:
            CALLER.reset(token)
            gate.leave(name, 1)

    # --- the hot path ----------------------------------------------------------------
    def _answer_now(self, call: Call, started: float) -> Found | Lookup:
        """A cache hit or a local answer, counted, or why the call needs upstream I/O."""
        method = call.method
        if method == _BLOCK_NUMBER or method == _CHAIN_ID:
            # The chain id is the one checked at start, whatever the head; the head's number
            # only while the head is fresh (else the upstreams are asked: never a number the
            # node cannot vouch for).
            if method == _CHAIN_ID:
                result = self._chain_id_json
            elif self.head.fresh:
                result = f'"{hex(self.view.number)}"'.encode()
            else:
                return _MISS
            self.metrics.count(method, "local", time.perf_counter() - started)
            return result, None, None
        if method not in _RULES:
            return _MISS
        view = self.view
        try:
            params = orjson.dumps(call.params)
        except TypeError:  # an integer beyond 64 bits: not worth memoising
            return _MISS
        if len(params) > self.memo_max_params_bytes:
            key = policy.plan(method, call.params, view).key
        else:
            memo = self._memo
            memo_key = (method, params)
            key = memo.get_at(memo_key, view.generation, _UNSET)
            if key is _UNSET:
                key = policy.plan(method, call.params, view).key
                memo.add((method, kept(params)), key, view.generation)
        if key is None:
            return _UNCACHED
        entry = self.cache.get(key)
        if entry is None or not self._still_canonical(entry):
            return _MISS
        self.metrics.hits += 1
        self.metrics.count(method, "hit", time.perf_counter() - started)
        return entry[VALUE], key, entry

    # --- the hottest path: a call seen before at this head ---------------------------
    def _remember(self, rest: bytes, method: str, found: Found) -> Seen | None:
        """Remember the call just answered by ``_answer_now`` (``found``) under its body's
        remainder; the record, or None when the body cannot be replayed."""
        seen = self._seen
        generation = self.view.generation
        if seen.get_at(rest, generation) is None and not id_probe(rest):
            return None
        value, key, entry = found
        outcome = "local" if key is None else "hit"
        record = Seen(generation, method, key, entry, value, self.metrics.slot(method, outcome))
        seen.add(rest, record, generation)
        return record

    def replay(self, record: Seen, who: Identity = NODE) -> bytes | None:
        """The result of a call recognised by its bytes (see ``Seen``), counted; None when
        it must take the full path: another head, its entry no longer cached, a stale local
        answer, a method ``who`` may not call (its first caller could: the tables key on
        bytes, not on identities), or one call in ``REPLAY_TIMED_EVERY`` of its method and
        outcome (timed there).

        Hot-path invariant: no decoding, no allocation, no upstream I/O."""
        slot = record.slot
        if record.generation != self.view.generation or not (slot[0] + 1) & _TIMED_MASK:
            return None
        # ``allowed(who)`` inlined: this runs for every replayed request.
        names = self._names_by_tier.get(who.tier) if who.methods is None else None
        if record.method not in (names if names is not None else self.methods.names(who)):
            return None
        if record.key is None:
            if not self.head.fresh:
                return None
        else:
            if self.cache.get(record.key) is not record.entry:
                return None
            self.metrics.hits += 1
        slot[0] += 1
        return record.value

    def _still_canonical(self, entry: Entry) -> bool:
        if entry[ANCHOR_HASH] is None:
            return True
        n = entry[ANCHOR_NUMBER]
        view = self.view
        if n > view.number:
            return False
        got = view.canonical.get(n)
        return got is None or got == entry[ANCHOR_HASH]

    # --- misses ----------------------------------------------------------------------
    async def _answer_later(
        self,
        call: Call,
        started: float,
        spent: int = 0,
        tried: Sequence[Upstream] = (),
        *,
        uncached: bool = False,
    ) -> bytes | None:
        """A call that waits for I/O; ``spent``: upstream attempts already made for it (by
        the forwarding path, ``Forward``), on the upstreams ``tried``; ``uncached``: planned
        already as never cached (``Lookup.UNCACHED``), so not planned again. Its upstream
        calls end by one deadline counted from ``started`` (``[pool] deadline``), what the
        forwarding path spent of it included."""
        rid = call.id or NULL_ID
        method = call.method
        deadline = started + self.pool.settings.deadline
        try:
            answer, outcome = await self._fetch(call, spent, tried, uncached, deadline)
        except UpstreamError as exc:
            exc.attempts += spent
            log.warning("%s", exc)
            self.metrics.count(method, "error", time.perf_counter() - started)
            data = {"upstream": exc.upstream, "attempts": exc.attempts}
            return encode_error(rid, error_code(exc), error_message(exc), data)
        except Exception:
            log.exception("internal error serving %s", method)
            self.metrics.count(method, "error", time.perf_counter() - started)
            return encode_error(rid, -32603, "internal error")
        self.metrics.count(method, outcome, time.perf_counter() - started)
        if call.id is None:
            return None
        if answer.error is not None:
            return encode_error_raw(rid, answer.error)
        assert answer.result is not None
        return encode_result(rid, answer.result)

    async def _fetch(
        self,
        call: Call,
        spent: int = 0,
        tried: Sequence[Upstream] = (),
        uncached: bool = False,
        deadline: float | None = None,
    ) -> tuple[Answer, str]:
        """``deadline``: the ``perf_counter`` time its upstream calls end by (None: the
        pool's deadline from each call's start; the node's own calls)."""
        method = call.method
        params = call.params if call.has_params else None
        rule = _RULES.get(method)
        if rule is not None and rule.kind is Kind.SEND:
            senders = self.senders
            if senders is not None and method == "eth_sendRawTransaction":
                refused = await senders.check(params)
                if refused is not None:
                    return Answer(None, refused), "shed"
            return await self.pool.broadcast(method, params, deadline=deadline), "pass"
        if rule is not None and rule.kind is Kind.SUBSCRIBE:
            # A subscription belongs to its WebSocket connection; over HTTP there is none.
            subs = current_subscriptions()
            if subs is None:
                return Answer(None, NOTIFICATIONS_UNSUPPORTED), "invalid"
            if call.id is None and method == "eth_subscribe":
                # Sent as a notification, its answer (the id) is never sent: a subscription
                # made now would hold its notifications for good. None is made.
                return Answer(None, SUBSCRIBE_WITHOUT_ID), "invalid"
            return subs.call(method, call.params), "local"
        if rule is not None and rule.kind is Kind.FILTER and self.filters is not None:
            return await self.filters.call(method, params), "local"
        if uncached or rule is None:
            answer = await self._uncached(method, params, spent, tried, deadline)
            return self._logs_bounded(method, answer), "pass"
        p = policy.plan(method, call.params, self.view)
        if p.key is None:
            answer = await self._uncached(method, params, spent, tried, deadline)
            return self._logs_bounded(method, answer), "pass"
        # A concurrent identical miss may have landed while this call waited.
        entry = self.cache.get(p.key)
        if entry is not None and self._still_canonical(entry):
            self.metrics.hits += 1
            return Answer(entry[VALUE], None), "hit"
        derivable = self._derivable.get(p.key)
        if derivable is not None:
            derived = await self._from_follower(*derivable)
            if derived is not None:
                return derived, "miss"
        fwd = p.params if p.params is not None else params
        if p.key in self._coalescer:
            # Join the call already under way: no shared-tier lookup of our own.
            self.metrics.coalesced.inc()
            answer = await self._coalescer.run(p.key, lambda: self._miss(p, method, fwd, deadline))
            return answer, "miss"
        if self.shared is not None:
            entry = await self.shared.get(p.key)
            if entry is not None and self._still_canonical(entry):
                # Stored by another process or node, maybe one with a larger size guard:
                # held to this node's, and then not kept here either.
                why = self._logs_oversize(method, entry[VALUE])
                if why is not None:
                    return Answer(None, why), "refused"
                self.cache.put(p.key, entry)
                self.metrics.cache_bytes.set(self.cache.bytes)
                self.metrics.hits += 1
                return Answer(entry[VALUE], None), "shared_hit"
        self.metrics.misses += 1
        note = self.note_miss
        if note is not None:
            note(method)
        if p.key in self._coalescer:  # another caller's miss started during our lookup
            self.metrics.coalesced.inc()
        answer = await self._coalescer.run(p.key, lambda: self._miss(p, method, fwd, deadline))
        return answer, "miss"

    async def call(self, method: str, params: policy.Params) -> Answer:
        """One call through the whole pipeline (policy, cache, coalescing, pool), for the
        node's own services: ``eth_getFilterLogs`` reads its range this way, cached, and
        held to the eth_getLogs guards as a client's eth_getLogs is."""
        if method == _GET_LOGS:
            why = self.log_guards.refusal(params, self.view)
            if why is not None:
                return Answer(None, why)
        answer, _ = await self._fetch(Call(None, method, params))
        return answer

    async def follower_call(
        self,
        method: str,
        params: list[Any],
        min_block: int,
        derived: Sequence[Derived] = (),
    ) -> Answer:
        """A read of the block follower, through the cache and the coalescer under the key
        ``policy.plan`` gives a client's same request: a client asking the same block at
        that moment rides on this call (or this call on the client's), so the data costs
        one upstream call. ``derived``: (method, params, derive) of other client reads
        answered from this one (the light block, one transaction's receipt): a client
        missing on one of them while this call runs waits for it. The answer carries its
        decoding."""
        view = self.view
        p = policy.plan(method, params, view)
        if p.key is None:
            return await self.pool.call(method, params, min_block)
        entry = self.cache.get(p.key)
        if entry is not None and self._still_canonical(entry):
            return await decode_result(entry[VALUE])  # a block's: piecewise
        if p.min_block < min_block:
            p.min_block = min_block  # an upstream that has the block, not a lagging one
        fwd = p.params if p.params is not None else params
        if p.key in self._coalescer:
            self.metrics.coalesced.inc()
        task = self._coalescer.start(p.key, lambda: self._miss(p, method, fwd))
        self._derive_from(task, derived)
        answer = await asyncio.shield(task)
        if answer.value is None and answer.result is not None and answer.result != b"null":
            answer = await decode_result(answer.result)
        return answer

    def follower_derive(self, method: str, params: list[Any], derived: Sequence[Derived]) -> None:
        """More client reads answered from the follower's call ``method(params)`` while it
        is under way (see ``follower_call``); none once it is over (its answer is cached,
        and the follower warms the cache with what it holds)."""
        key = policy.plan(method, params, self.view).key
        task = self._coalescer.task(key) if key is not None else None
        if task is not None:
            self._derive_from(task, derived)

    def _derive_from(self, source: asyncio.Future[Answer], derived: Sequence[Derived]) -> None:
        """Make each of ``derived`` answerable from the follower's call ``source`` while it
        runs. No task per read: a block of a thousand transactions costs a thousand dict
        entries, and nothing at all for the reads nobody makes."""
        view = self.view
        table = self._derivable
        keys = []
        for d_method, d_params, derive in derived:
            dp = policy.plan(d_method, d_params, view)
            if dp.key is None or self.cache.get(dp.key) is not None:
                continue
            table[dp.key] = (source, dp, derive)
            keys.append(dp.key)
        if keys:
            source.add_done_callback(partial(self._underivable, keys))

    def _underivable(self, keys: list[bytes], source: asyncio.Future[Answer]) -> None:
        table = self._derivable
        for key in keys:
            got = table.get(key)
            if got is not None and got[0] is source:
                del table[key]

    async def _from_follower(
        self, source: asyncio.Future[Answer], p: Plan, derive: Callable[[Any], Any]
    ) -> Answer | None:
        """A client read answered from the follower's call ``source`` (see
        ``_derive_from``), stored; None when that call fails or holds no answer for it:
        the client asks for itself."""
        self.metrics.coalesced.inc()
        try:
            got = await asyncio.shield(source)
        except UpstreamError:
            return None
        value = derive(got.value) if got.error is None and got.value is not None else None
        if value is None:
            return None
        answer = Answer(orjson.dumps(value), None, value)
        self._store(p, answer)
        return answer

    async def _miss(
        self, p: Plan, method: str, params: policy.Params | None, deadline: float | None = None
    ) -> Answer:
        """The upstream read of a miss, stored; by ``deadline`` (``pool.call``'s). Callers
        that join it (coalesced) came later: it ends by their own deadlines too."""
        if method == _GET_LOGS and self.local_logs is not None:
            local = await self.local_logs(params)
            if local is not None:
                local = self._logs_bounded(method, local)
                self._store(p, local)
                return local
        shared = self.shared
        if shared is None:
            answer = await self._read(p, method, params, deadline)
            answer = self._logs_bounded(method, answer)
            self._store(p, answer)
            self._fill_block(method, answer)
            return answer
        key = p.key
        assert key is not None

        async def produce() -> Answer:
            answer = await self._read(p, method, params, deadline)
            answer = self._logs_bounded(method, answer)
            entry = self._store(p, answer)
            self._fill_block(method, answer)
            if entry is not None:
                await shared.put(key, entry, p.finality)
            return answer

        # What another process stored (or handed over) meanwhile meets this node's guard too.
        return self._logs_bounded(method, await shared.exclusive(key, produce))

    async def _uncached(
        self,
        method: str,
        params: policy.Params | None,
        spent: int,
        tried: Sequence[Upstream],
        deadline: float | None,
    ) -> Answer:
        """A read that is not cached, upstream: an eth_getLogs (bounds given as numbers the
        head tracker cannot vouch for yet) split or bisected as a planned one is."""
        if method == _GET_LOGS:
            return await self._read(policy.PASS, method, params, deadline)
        return await self.pool.call(method, params, spent=spent, tried=tried, deadline=deadline)

    async def _read(
        self, p: Plan, method: str, params: policy.Params | None, deadline: float | None
    ) -> Answer:
        """The upstream read of a planned miss: an eth_getLogs wider than ``[logs]
        split_blocks`` in chunks (``rpc/logscan.py``), anything else in one call; a
        narrower eth_getLogs refused as too large is asked again in halves."""
        span = _logs_span(params) if method == _GET_LOGS else None
        rule = self.log_split
        if span is None or rule.blocks <= 0:
            return await self.pool.call(
                method, params, p.min_block, deadline=deadline, at_head=_at_head(p)
            )
        lo, hi = span
        size = rule.blocks
        if hi - lo + 1 <= size:
            answer = await self.pool.call(method, params, p.min_block, deadline=deadline)
            if hi <= lo or not logsplit.too_large(answer.error):
                return answer
            # Chunks of half the range: their keys are not this call's, whose miss this is.
            size = (hi - lo + 2) // 2
        assert isinstance(params, list)
        guards = self.log_guards
        # Chunks in flight: one in the slot the client's call holds, one more per slot of
        # its own it has free (``UpstreamGate.more``); the node's own scans are not gated.
        who = CALLER.get()
        want = min(rule.concurrency, hi // size - lo // size + 1) - 1
        extra = self.gate.more(who, want) if who is not None else want
        try:
            return await logscan.scan(
                params[0],
                lo,
                hi,
                size,
                1 + extra,
                partial(self._logs_chunk, deadline=deadline),
                guards.max_answer_bytes,
                guards.oversize,
            )
        finally:
            if who is not None and extra:
                self.gate.leave(who, extra)

    async def _logs_chunk(self, params: list[Any], index: int, deadline: float | None) -> Answer:
        """One chunk of a split eth_getLogs, as a call of its own: cached under the key the
        same client request has (a finalized chunk for ever, by its exact range), coalesced
        with identical chunks under way, answered from the block logs held where it can."""
        p = policy.plan(_GET_LOGS, params, self.view)
        key = p.key
        if key is None:
            return await self._spread(params, p.min_block, index, deadline)
        entry = self.cache.get(key)
        if entry is not None and self._still_canonical(entry):
            self.metrics.hits += 1
            return Answer(entry[VALUE], None)
        shared = self.shared
        if shared is not None:
            entry = await shared.get(key)
            if entry is not None and self._still_canonical(entry):
                self.cache.put(key, entry)
                return Answer(entry[VALUE], None)

        async def miss() -> Answer:
            fwd = p.params if p.params is not None else params
            local = await self.local_logs(fwd) if self.local_logs is not None else None
            if local is None:
                local = await self._spread(fwd, p.min_block, index, deadline)
            answer = local
            stored = self._store(p, answer)
            if stored is not None and shared is not None:
                await shared.put(key, stored, p.finality)
            return answer

        return await self._coalescer.run(key, miss)

    async def _spread(
        self, params: policy.Params, min_block: int, index: int, deadline: float | None
    ) -> Answer:
        """A chunk asked first of the ``index``-th caught-up primary in rotation (the others
        after it in the pool's own order, as it would retry; fallbacks last, as it puts
        them): a scan's chunks spread over the primaries that hold their blocks instead of
        all queuing on the first."""
        # Not ``candidates()``: its weighted pick moves on each call, and ``call`` makes one.
        everyone = self.pool.upstreams
        order = [
            u for u in everyone if u.healthy and u.route.tier == PRIMARY and u.latest >= min_block
        ]
        tried: list[Upstream] = []
        if len(order) > 1:
            first = order[index % len(order)]
            tried = [u for u in everyone if u is not first]  # in the pool's order after it
        return await self.pool.call(_GET_LOGS, params, min_block, tried=tried, deadline=deadline)

    def _logs_bounded(self, method: str, answer: Answer) -> Answer:
        """``answer``, or the -32005 refusing it when it is an eth_getLogs answer past the
        size guard (then never stored: errors are not)."""
        why = self._logs_oversize(method, answer.result)
        return answer if why is None else Answer(None, why)

    def _logs_oversize(self, method: str, result: bytes | None) -> bytes | None:
        """The -32005 refusing ``result`` when it is an eth_getLogs answer past the size
        guard, else None."""
        if method != _GET_LOGS or result is None:
            return None
        return self.log_guards.oversize(len(result))

    def _fill_block(self, method: str, answer: Answer) -> None:
        """A transaction or receipt just read upstream: its block may be filled."""
        note = self.note_block_of
        if note is None or method not in _FILLED_BY or not isinstance(answer.value, dict):
            return
        block_hash = answer.value.get("blockHash")
        number = answer.value.get("blockNumber")
        if isinstance(block_hash, str) and isinstance(number, str):
            with contextlib.suppress(ValueError):
                note(method, int(number, 16), block_hash)

    def _store(self, p: Plan, answer: Answer) -> Entry | None:
        """Store a fresh answer as the caching rules say (``policy.store_decision``); the
        entry stored, if any. A split eth_getLogs's answer is not: its chunks are
        (``logscan.Spliced``)."""
        if answer.__class__ is Spliced:
            return None
        how = policy.store_decision(
            p, answer.result, answer.error, answer.value, self.view, self._block_time
        )
        if how is None:
            return None
        assert answer.result is not None  # never stored otherwise
        entry = stored_entry(answer.result, how)
        self.cache.put(how.key, entry)
        self.metrics.cache_bytes.set(self.cache.bytes)
        return entry


def _at_head(p: Plan | None) -> AtHead | None:
    """The by-number form of a read planned by hash, for an upstream at that head."""
    if p is None or p.at_head is None or p.block_hash is None:
        return None
    return p.block_hash, p.at_head


def _rate_limited(wait: float, rid: bytes) -> RateLimited:
    """The refusal of a body past its rate: ``data.retry_after`` the seconds to wait (None:
    the body costs more than the whole bucket; send less at once)."""
    if wait == math.inf:
        message = "limit exceeded: the request costs more than this client's burst"
        data: dict[str, float | None] = {"retry_after": None}
    else:
        message = "limit exceeded"
        data = {"retry_after": round(wait, 3)}
    return RateLimited(wait, encode_error(rid, -32005, message, data))


def _settle_failed(items: list[Batched], exc: BaseException) -> None:
    """Settle the calls of ``items`` not settled yet with ``exc``, marked as read: a call
    whose client went away leaves no "exception never retrieved" behind."""
    for it in items:
        fut = it.answer
        if not fut.done():
            fut.set_exception(exc)
            fut.exception()


def _logs_span(params: policy.Params | None) -> tuple[int, int] | None:
    """The block range of a planned eth_getLogs (bounds resolved to numbers); None for
    a query by block hash, or bounds that are not plain numbers."""
    if not isinstance(params, list) or len(params) != 1 or not isinstance(params[0], dict):
        return None
    flt = params[0]
    if "blockHash" in flt:
        return None
    lo, hi = flt.get("fromBlock"), flt.get("toBlock")
    if not isinstance(lo, str) or not isinstance(hi, str):
        return None
    try:
        return int(lo, 16), int(hi, 16)
    except ValueError:
        return None


def _memo_size(key: tuple[str, bytes], cache_key: bytes | None) -> int:
    return len(key[1]) + (len(cache_key) if cache_key is not None else 0)


def _seen_size(rest: bytes, record: Seen) -> int:
    return len(rest) + len(record.value)
