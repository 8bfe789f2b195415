"""The JSON-RPC request pipeline: policy → cache → coalescer → upstream pool → store.

``handle`` answers a body synchronously when every call in it is a cache hit or a local
answer (the hot path: no task, no upstream I/O, one concatenation per answer), and returns
an awaitable otherwise. Transports (HTTP, WebSocket) own nothing of this logic. A call
answered so is remembered for the rest of the head as a ``Seen`` record, which answers its
repeats under other ids: by the body's remainder inside ``handle``, or by whole request
bytes that a transport keeps (``last_seen``) and checks again through ``replay``.

A read that is never cached goes straight to a healthy WebSocket upstream when there is one
(``_forward``): no task, and its answer readdressed to the caller's id without decoding
(``Forward``); its repeats at the same head are sent as the relay encoded the first one,
id aside, with no decoding (a node must never read a repeat otherwise than the first call).
A transport error hands the call to the full path, which retries and fails over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import orjson

from chainrelay import defaults
from chainrelay.chain.head import HeadTracker
from chainrelay.errors import RequestError, UpstreamError, error_code, error_message
from chainrelay.metrics import REPLAY_TIMED_EVERY, Metrics
from chainrelay.rpc import policy
from chainrelay.rpc.cache import Entry, MemoryCache
from chainrelay.rpc.coalesce import Coalescer
from chainrelay.rpc.policy import Finality, Kind, Plan
from chainrelay.server.ws import current_subscriptions
from chainrelay.upstreams.pool import UpstreamPool
from chainrelay.upstreams.upstream import TransportError, Upstream, WsUpstream
from chainrelay.wire.jsonrpc import (
    NULL_ID,
    Answer,
    Call,
    encode_error,
    encode_error_raw,
    encode_request,
    encode_result,
    id_probe,
    join_batch,
    parse_answer,
    parse_body,
    readdress,
    split_id,
)

log = logging.getLogger(__name__)

_RULES = policy.RULES
_UNSET = b"\x00unset"
NOTIFICATIONS_UNSUPPORTED = b'{"code":-32601,"message":"notifications not supported"}'
# A read derived from the block follower's call that failed, which no client had joined.
DERIVED_UNAVAILABLE = b'{"code":-32000,"message":"block data not available yet"}'
SUBSCRIBE_WITHOUT_ID = b'{"code":-32600,"message":"eth_subscribe needs an id"}'
_TIMED_MASK = REPLAY_TIMED_EVERY - 1
_CHAIN_ID = "eth_chainId"
_BLOCK_NUMBER = "eth_blockNumber"
# Kinds whose calls are never sent straight to one upstream (``RpcService._forward``):
# writes go to every upstream, subscriptions and filters are the node's own.
_NOT_FORWARDED = frozenset((Kind.SEND, Kind.SUBSCRIBE, Kind.FILTER))
_REQUEST_OPEN = b'{"jsonrpc":"2.0","id":'
_REQUEST_OPEN_LEN = len(_REQUEST_OPEN)


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
    """The node's filter service (``services/filters.py``), as the pipeline sees it."""

    async def call(self, method: str, params: policy.Params | None) -> Answer: ...


class Seen:
    """A call answered at one head (view generation) from cache or locally, recognised
    later by its bytes without its id: a repeat is answered with no decoding or planning.

    Whether an entry's block is canonical cannot change within a generation (every change
    of the canonical window bumps it), so the check made when the call was first answered
    holds for every repeat while ``entry`` is still the one the cache holds.
    """

    __slots__ = ("entry", "generation", "key", "method", "slot", "value")

    def __init__(
        self,
        generation: int,
        method: str,
        key: bytes | None,
        entry: Entry | None,
        value: bytes,
        slot: list[int],
    ) -> None:
        self.generation = generation
        self.method = method
        self.key = key  # None: a local answer (eth_chainId, eth_blockNumber), ``value``
        self.entry = entry
        self.value = value
        self.slot = slot  # the (method, outcome) counter in Metrics


class Forward:
    """Completes a call sent by ``RpcService._forward``, as its upstream's waiter: called
    where the answer is read, it readdresses the answer to the caller's id, measures and
    counts it as the full path would ("pass") and sets the caller's future (``out``). A
    transport error (timeout, connection lost, garbage) starts the call again on the full
    path, which retries and fails over."""

    __slots__ = ("call", "method", "out", "rid", "rpc", "started", "upstream")

    def __init__(
        self,
        rpc: RpcService,
        upstream: WsUpstream,
        rid: bytes,
        method: str,
        call: Call | bytes,
        started: float,
        out: asyncio.Future[bytes],
    ) -> None:
        self.rpc = rpc
        self.upstream = upstream
        self.rid = rid  # the caller's id token
        self.method = method
        self.call = call  # or the body, parsed again only if the call must be retried
        self.started = started
        self.out = out

    def done(self) -> bool:
        return False  # the upstream gives each waiter one outcome, once

    def set_result(self, raw: bytes, /) -> None:
        # Called inside the upstream link's read: nothing may escape into it.
        try:
            self._answered(raw)
        except Exception as exc:
            log.exception("internal error serving %s", self.method)
            if not self.out.done():
                self.out.set_exception(exc)

    def _answered(self, raw: bytes) -> None:
        elapsed = time.perf_counter() - self.started
        rid = self.rid
        got = readdress(raw, rid)
        if got is None:
            try:
                answer = parse_answer(raw)
            except ValueError as err:
                self.set_exception(TransportError(f"malformed answer: {err}", malformed=True))
                return
            if answer.error is not None:
                got = encode_error_raw(rid, answer.error), True
            else:
                got = encode_result(rid, answer.result or NULL_ID), False
        out = self.out
        if out.done():  # the caller went away
            self._measure(elapsed, got[1])
            return
        out.set_result(got[0])
        # Measured once the answer is written: the write was scheduled first.
        out.get_loop().call_soon(self._measure, elapsed, got[1])

    def _measure(self, elapsed: float, is_error: bool) -> None:
        upstream = self.upstream
        upstream.prune()
        upstream.answered(elapsed, is_error)
        self.rpc.metrics.count(self.method, "pass", elapsed)

    def set_exception(self, exc: BaseException, /) -> None:
        rpc, upstream, call = self.rpc, self.upstream, self.call
        upstream.prune()
        if not isinstance(exc, TransportError):
            exc = TransportError(f"{type(exc).__name__}: {exc}")
        rpc.pool.failed(upstream, exc, time.perf_counter() - self.started)
        log.debug("upstream %s %s failed: %s; retried", upstream.name, self.method, exc)
        if self.out.done():
            return  # the caller went away
        if isinstance(call, bytes):
            item = parse_body(call, 1)[0][0]
            assert isinstance(item, Call)  # it was forwarded as one
            call = item
        retry = self.out.get_loop().create_task(
            rpc._answer_later(call, self.started, 1, (upstream,))
        )
        retry.add_done_callback(self._retried)

    def _retried(self, retry: asyncio.Task[bytes | None]) -> None:
        out = self.out
        if out.done():
            return
        if retry.cancelled():
            out.cancel()
        elif (exc := retry.exception()) is not None:
            out.set_exception(exc)
        else:
            out.set_result(retry.result() or b"")


class RpcService:
    def __init__(
        self,
        cache: MemoryCache,
        pool: UpstreamPool,
        head: HeadTracker,
        metrics: Metrics,
        chain_id: int,
        max_batch_len: int = defaults.MAX_BATCH_LEN,
        shared: SharedCache | None = None,
        max_hit_table_bytes: int = defaults.MAX_HIT_TABLE_BYTES,
        max_hit_table_entries: int = defaults.MAX_HIT_TABLE_ENTRIES,
        memo_max_params_bytes: int = defaults.MEMO_MAX_PARAMS_BYTES,
    ) -> None:
        self.cache = cache
        self.shared = shared
        self.pool = pool
        self.head = head
        self.view = head.view
        self.metrics = metrics
        self.max_batch_len = max_batch_len
        self.chain_id = chain_id
        self._chain_id_json = f'"{hex(chain_id)}"'.encode()
        self._coalescer: Coalescer[Answer] = Coalescer()
        self._block_time = head.profile.block_time
        # (method, params JSON) -> cache key, for the current head only: skips planning on
        # repeated calls. Cleared whenever the head view changes, and when it grows too big
        # (in entries, or in bytes past ``max_hit_table_bytes``).
        self._memo: dict[tuple[str, bytes], bytes | None] = {}
        self._memo_generation = -1
        self._memo_bytes = 0
        # Body without its id -> what answered it, for bodies answered from cache (or
        # locally) at this head: repeated calls skip decoding too. Same lifetime as the memo.
        self._seen: dict[bytes, Seen] = {}
        self._seen_generation = -1
        self._seen_bytes = 0
        # Bounds the seen table's bodies and the answers it keeps alive after the cache
        # has let them go.
        self.max_hit_table_bytes = max_hit_table_bytes
        self.max_hit_table_entries = max_hit_table_entries
        self.memo_max_params_bytes = memo_max_params_bytes
        self._hit_key: bytes | None = None
        self._hit_entry: Entry | None = None
        # The last call _answer_now found uncacheable by its memo: _fetch forwards that
        # very call without planning it a second time.
        self._pass_call: Call | None = None
        self._hit_local = b""
        # The Seen record that answered the last ``handle`` call, if any: a transport may
        # keep it to answer byte-identical repeats through ``replay``.
        self.last_seen: Seen | None = None
        # Installed filters (eth_newFilter & co), answered by the node; set by the app.
        self.filters: FilterCalls | None = None
        # Told of each miss (the method's name): the block follower follows blocks while
        # misses it could have answered are recent (``BlockFollower.note_miss``).
        self.note_miss: Callable[[str], None] | None = None
        # eth_getLogs from the block follower's recent blocks (BlockFollower.recent_logs), tried on
        # a miss before the upstreams.
        self.local_logs: Callable[[Any], bytes | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop of forwarded reads
        # Body without its id -> (method, the relay's own request after its id), for calls
        # forwarded at this head (``_forward``): their repeats are sent as that request
        # under a new id. Same lifetime and bounds as the seen table.
        self._passes: dict[bytes, tuple[str, bytes]] = {}
        self._passes_generation = -1
        self._passes_bytes = 0

    # --- entry point -----------------------------------------------------------------
    def handle(self, body: bytes) -> bytes | Awaitable[bytes]:
        """The answer to an HTTP body or WebSocket message (b"" when nothing is owed)."""
        self.last_seen = None
        split = split_id(body)
        if split is not None:
            fast = self._seen_hit(split[0], split[1])
            if fast is not None:
                return fast
            if self._passes:
                sent = self._forward_again(body, split[0], split[1])
                if sent is not None:
                    return sent
        started = time.perf_counter()
        try:
            items, is_batch = parse_body(body, self.max_batch_len)
        except RequestError as exc:
            self.metrics.count("", "invalid", 0.0)
            return encode_error(NULL_ID, exc.code, exc.message)
        if not is_batch:
            item = items[0]
            if isinstance(item, bytes):
                self.metrics.count("", "invalid", 0.0)
                return item
            self._hit_key = None
            self._hit_local = b""
            fast = self._answer_now(item, started)
            if fast is not None:
                if (
                    (self._hit_key is not None or self._hit_local)
                    and split is not None
                    and split[0] == item.id
                ):
                    self._remember(split[1], item.method)
                return fast if item.id is not None else b""
            if self._pass_call is item and item.id is not None:
                sent = self._forward(item, started, body, split)
                if sent is not None:
                    return sent
            return self._answer_later(item, started)
        parts: list[bytes | Awaitable[bytes | None] | None] = []
        slow = False
        for item in items:
            if isinstance(item, bytes):
                self.metrics.count("", "invalid", 0.0)
                parts.append(item)
                continue
            started = time.perf_counter()
            fast = self._answer_now(item, started)
            if fast is not None:
                parts.append(fast if item.id is not None else None)
            else:
                parts.append(self._answer_later(item, started))
                slow = True
        if not slow:
            return join_batch([p for p in parts if isinstance(p, bytes)]) if parts else b""
        return self._gather(parts)

    async def _gather(self, parts: list[bytes | Awaitable[bytes | None] | None]) -> bytes:
        waits = [p for p in parts if p is not None and not isinstance(p, bytes)]
        done = iter(await asyncio.gather(*waits))
        out: list[bytes] = []
        for p in parts:
            if p is None:
                continue
            got = p if isinstance(p, bytes) else next(done)
            if got:
                out.append(got)
        return join_batch(out) if out else b""

    # --- the hot path ----------------------------------------------------------------
    def _answer_now(self, call: Call, started: float) -> bytes | None:
        """A cache hit or a local answer, or None when the call needs upstream I/O."""
        method = call.method
        if method == _BLOCK_NUMBER or method == _CHAIN_ID:
            if not self.head.fresh:
                return None
            if method == _CHAIN_ID:
                result = self._chain_id_json
            else:
                result = f'"{hex(self.view.number)}"'.encode()
            self._hit_local = result
            self.metrics.count(method, "local", time.perf_counter() - started)
            return encode_result(call.id or NULL_ID, result)
        if method not in _RULES:
            return None
        view = self.view
        memo = self._memo
        if (
            self._memo_generation != view.generation
            or len(memo) >= self.max_hit_table_entries
            or self._memo_bytes > self.max_hit_table_bytes
        ):
            memo.clear()
            self._memo_generation = view.generation
            self._memo_bytes = 0
        try:
            params = orjson.dumps(call.params)
        except TypeError:  # an integer beyond 64 bits: not worth memoising
            return None
        if len(params) > self.memo_max_params_bytes:
            key = policy.plan(method, call.params, view).key
        else:
            memo_key = (method, params)
            key = memo.get(memo_key, _UNSET)
            if key is _UNSET:
                key = memo[memo_key] = policy.plan(method, call.params, view).key
                self._memo_bytes += len(params) + (len(key) if key is not None else 0)
        if key is None:
            self._pass_call = call
            return None
        entry = self.cache.get(key)
        if entry is None or not self._still_canonical(entry):
            return None
        self._hit_key = key
        self._hit_entry = entry
        self.metrics.hits += 1
        self.metrics.count(method, "hit", time.perf_counter() - started)
        return encode_result(call.id or NULL_ID, entry.value)

    # --- the hottest path: a call seen before at this head ---------------------------
    def _remember(self, rest: bytes, method: str) -> None:
        """Remember the call just answered by ``_answer_now`` under its body's remainder."""
        seen = self._seen
        generation = self.view.generation
        if (
            self._seen_generation != generation
            or len(seen) >= self.max_hit_table_entries
            or self._seen_bytes > self.max_hit_table_bytes
        ):
            seen.clear()
            self._seen_generation = generation
            self._seen_bytes = 0
        if rest not in seen and not id_probe(rest):
            return
        key = self._hit_key
        if key is None:
            record = Seen(
                generation, method, None, None, self._hit_local, self.metrics.slot(method, "local")
            )
        else:
            entry = self._hit_entry
            assert entry is not None
            record = Seen(
                generation, method, key, entry, entry.value, self.metrics.slot(method, "hit")
            )
        seen[rest] = self.last_seen = record
        self._seen_bytes += len(rest) + len(record.value)

    def _seen_hit(self, id_token: bytes, rest: bytes) -> bytes | None:
        """A hit for a body that, id aside, was answered from cache at this head.

        No decoding and no planning: the body's remainder names the answer. Counted, and
        timed like replays: one in ``REPLAY_TIMED_EVERY`` takes the full path instead."""
        record = self._seen.get(rest)
        if record is None:
            return None
        value = self.replay(record)
        if value is None:
            return None
        self.last_seen = record
        return encode_result(id_token, value)

    def replay(self, record: Seen) -> bytes | None:
        """The result of a call recognised by its bytes (see ``Seen``), counted; None when
        it must take the full path: another head, its entry no longer cached, a stale local
        answer, or one call in ``REPLAY_TIMED_EVERY`` of its method and outcome (timed
        there).

        Hot-path invariant: no decoding, no allocation, no upstream I/O."""
        slot = record.slot
        if record.generation != self.view.generation or not (slot[0] + 1) & _TIMED_MASK:
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
        if entry.anchor_hash is None:
            return True
        n = entry.anchor_number
        view = self.view
        if n > view.number:
            return False
        got = view.canonical.get(n)
        return got is None or got == entry.anchor_hash

    # --- forwarded reads -------------------------------------------------------------
    def _forward(
        self, call: Call, started: float, body: bytes, split: tuple[bytes, bytes] | None
    ) -> asyncio.Future[bytes] | None:
        """A read that is never cached, sent at once to a WebSocket upstream (the pool's
        ``direct``): the future of its answer, or None when it takes the full path.

        No task and no decoding: the upstream's answer is paired by its id where it
        arrives and readdressed to the caller's id in a done-callback (``Forward``)."""
        if _RULES[call.method].kind in _NOT_FORWARDED:
            return None
        upstream = self.pool.direct()
        if upstream is None:
            return None
        loop = self._loop
        if loop is None:
            # Kept: asking asyncio for the running loop costs a getpid() system call.
            loop = self._loop = asyncio.get_running_loop()
        out: asyncio.Future[bytes] = loop.create_future()
        method = call.method
        rid = call.id or NULL_ID
        request = encode_request(0, method, call.params if call.has_params else None)
        forward = Forward(self, upstream, rid, method, call, started, out)
        # The request around its id (orjson keeps the members in order, "id" second).
        tail = request[_REQUEST_OPEN_LEN + 1 :]
        if not upstream.send_now(_REQUEST_OPEN, tail, forward):
            return None
        self._pass_call = None
        if split is not None and split[0] == rid:
            self._remember_pass(split[1], method, tail)
        return out

    def _remember_pass(self, rest: bytes, method: str, tail: bytes) -> None:
        """Remember a call just forwarded by its body without its id (``split_id``), with
        the request it was sent as (``tail``: what follows the id), so that its repeats at
        this head are sent the same with no decoding (``_forward_again``)."""
        passes = self._passes
        generation = self.view.generation
        if (
            self._passes_generation != generation
            or len(passes) >= self.max_hit_table_entries
            or self._passes_bytes > self.max_hit_table_bytes
        ):
            passes.clear()
            self._passes_generation = generation
            self._passes_bytes = 0
        if rest in passes or not id_probe(rest):
            return
        passes[rest] = (method, tail)
        self._passes_bytes += len(rest) + len(tail)

    def _forward_again(
        self, body: bytes, token: bytes, rest: bytes
    ) -> asyncio.Future[bytes] | None:
        """A call forwarded before at this head (``_remember_pass``), id aside, sent again
        as the relay encoded it the first time, under a new id: no decoding, no planning.
        Never the caller's bytes: a node might read them otherwise (a key twice, a member
        spelled in another case) than the relay did."""
        known = self._passes.get(rest)
        if known is None or self._passes_generation != self.view.generation:
            return None
        upstream = self.pool.direct()
        loop = self._loop
        if upstream is None or loop is None:
            return None
        method, tail = known
        out: asyncio.Future[bytes] = loop.create_future()
        forward = Forward(self, upstream, token, method, body, time.perf_counter(), out)
        if not upstream.send_now(_REQUEST_OPEN, tail, forward):
            return None
        return out

    # --- misses ----------------------------------------------------------------------
    async def _answer_later(
        self, call: Call, started: float, spent: int = 0, tried: Sequence[Upstream] = ()
    ) -> bytes | None:
        """A call that waits for I/O; ``spent``: upstream attempts already made for it (by
        the forwarding path, ``Forward``), on the upstreams ``tried``."""
        rid = call.id or NULL_ID
        method = call.method
        try:
            answer, outcome = await self._fetch(call, spent, tried)
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
        self, call: Call, spent: int = 0, tried: Sequence[Upstream] = ()
    ) -> tuple[Answer, str]:
        method = call.method
        params = call.params if call.has_params else None
        rule = _RULES.get(method)
        if rule is not None and rule.kind is Kind.SEND:
            return await self.pool.broadcast(method, params), "pass"
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
        if call is self._pass_call:
            self._pass_call = None
            return await self.pool.call(method, params, spent=spent, tried=tried), "pass"
        p = policy.plan(method, call.params, self.view) if rule is not None else policy.PASS
        if p.key is None:
            return await self.pool.call(method, params, spent=spent, tried=tried), "pass"
        # A concurrent identical miss may have landed while this call waited.
        entry = self.cache.get(p.key)
        if entry is not None and self._still_canonical(entry):
            self.metrics.hits += 1
            return Answer(entry.value, None), "hit"
        fwd = p.params if p.params is not None else params
        if p.key in self._coalescer:
            # Join the call already under way: no shared-tier lookup of our own.
            self.metrics.coalesced.inc()
            return await self._coalescer.run(p.key, lambda: self._miss(p, method, fwd)), "miss"
        if self.shared is not None:
            entry = await self.shared.get(p.key)
            if entry is not None and self._still_canonical(entry):
                self.cache.put(p.key, entry)
                self.metrics.cache_bytes.set(self.cache.bytes)
                self.metrics.hits += 1
                return Answer(entry.value, None), "shared_hit"
        self.metrics.misses += 1
        note = self.note_miss
        if note is not None:
            note(method)
        if p.key in self._coalescer:  # another caller's miss started during our lookup
            self.metrics.coalesced.inc()
        answer = await self._coalescer.run(p.key, lambda: self._miss(p, method, fwd))
        return answer, "miss"

    async def call(self, method: str, params: policy.Params) -> Answer:
        """One call through the whole pipeline (policy, cache, coalescing, pool), for the
        node's own services: ``eth_getFilterLogs`` reads its range this way, cached."""
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
        answered from this one (the light block, one transaction's receipt), started at
        once as calls of their own that clients join. The answer carries its decoding."""
        view = self.view
        p = policy.plan(method, params, view)
        if p.key is None:
            return await self.pool.call(method, params, min_block)
        entry = self.cache.get(p.key)
        if entry is not None and self._still_canonical(entry):
            return Answer(entry.value, None, orjson.loads(entry.value))
        if p.min_block < min_block:
            p.min_block = min_block  # an upstream that has the block, not a lagging one
        fwd = p.params if p.params is not None else params
        if p.key in self._coalescer:
            self.metrics.coalesced.inc()
        task = self._coalescer.start(p.key, lambda: self._miss(p, method, fwd))
        for d_method, d_params, derive in derived:
            dp = policy.plan(d_method, d_params, view)
            if dp.key is None or dp.key in self._coalescer or self.cache.get(dp.key) is not None:
                continue
            d_fwd = dp.params if dp.params is not None else d_params
            self._coalescer.start(
                dp.key,
                lambda dp=dp, m=d_method, f=d_fwd, fn=derive: self._derived(task, dp, m, f, fn),
            )
        answer = await asyncio.shield(task)
        if answer.value is None and answer.result is not None and answer.result != b"null":
            answer = Answer(answer.result, answer.error, orjson.loads(answer.result))
        return answer

    async def _derived(
        self,
        source: asyncio.Task[Answer],
        p: Plan,
        method: str,
        params: policy.Params | None,
        derive: Callable[[Any], Any],
    ) -> Answer:
        """A client read answered from the feed's call ``source``; when that call fails or
        holds no answer for it, the joined clients' own upstream call (none when nobody
        joined: a block of 500 transactions must not cost 500 receipt calls)."""
        with contextlib.suppress(UpstreamError):
            got = await asyncio.shield(source)
            value = derive(got.value) if got.error is None and got.value is not None else None
            if value is not None:
                answer = Answer(orjson.dumps(value), None, value)
                self._store(p, answer)
                return answer
        assert p.key is not None
        if not self._coalescer.joiners(p.key):
            return Answer(None, DERIVED_UNAVAILABLE)
        return await self._miss(p, method, params)

    async def _miss(self, p: Plan, method: str, params: policy.Params | None) -> Answer:
        if method == "eth_getLogs" and self.local_logs is not None:
            local = self.local_logs(params)
            if local is not None:
                answer = Answer(local, None)
                self._store(p, answer)
                return answer
        shared = self.shared
        if shared is None:
            answer = await self.pool.call(method, params, p.min_block)
            self._store(p, answer)
            return answer
        key = p.key
        assert key is not None

        async def produce() -> Answer:
            answer = await self.pool.call(method, params, p.min_block)
            entry = self._store(p, answer)
            if entry is not None:
                await shared.put(key, entry, p.finality)
            return answer

        return await shared.exclusive(key, produce)

    def _store(self, p: Plan, answer: Answer) -> Entry | None:
        """Store a fresh answer when the caching rules allow it; the entry stored, if any."""
        if answer.error is not None or answer.result is None or p.key is None:
            return None
        if answer.is_empty and p.finality is not Finality.FINALIZED:
            return None
        view = self.view
        anchor = policy.anchor_of(answer.value, p.anchor)
        if anchor is False:
            return None
        expires = 0.0
        a_num, a_hash = -1, None
        if p.finality is Finality.REALTIME:
            expires = time.monotonic() + self._block_time
        elif p.block_hash is not None or p.validate_canonical:
            # Every answer keyed by a block hash carries that block, so a hit is refused
            # once the block is reorged away, however the caller named it.
            if p.block_hash is not None:
                a_num, a_hash = p.block_number, p.block_hash
            elif isinstance(anchor, tuple):
                a_num, a_hash = anchor
            if a_hash is not None:
                if a_num > view.number or view.is_canonical(a_num, a_hash) is False:
                    return None
                if isinstance(anchor, tuple) and p.anchor != "items" and anchor[1] != a_hash:
                    return None  # answered from another fork than the one the key names
                if a_num <= view.finalized:
                    a_num, a_hash = -1, None  # final: no check needed on hits
        elif isinstance(anchor, tuple) and p.anchor == "block" and anchor[0] != p.block_number:
            return None  # a final block asked by number, answered with another one
        if p.anchor == "items" and not policy.items_canonical(answer.value, view):
            return None
        entry = Entry(answer.result, expires, a_num, a_hash)
        self.cache.put(p.key, entry)
        self.metrics.cache_bytes.set(self.cache.bytes)
        return entry
