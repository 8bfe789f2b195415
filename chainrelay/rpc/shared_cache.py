"""The Redis tier: a cache shared by every worker and node of a region, behind the memory LRU.

Two parts, as everywhere in chainrelay:

* a sans-I/O codec (``encode_entry``/``decode_entry``, ``encode_answer``/``decode_answer``,
  ``RedisKeys``, ``ttl_ms``): how an ``Entry`` and its block anchor and expiry are laid out
  in a Redis value, how keys are named, how long each finality class lives;
* ``RedisCache``, the asyncio object behind ``rpc.SharedCache``.

Invariants:

* Redis is an accelerator, never a point of failure. Every command runs under a short
  timeout; the first failure marks the tier down (logged once, counted), after which every
  request skips it without touching the network, and a background task probes Redis until
  it answers again.
* Values are bounded (``redis_max_entry_bytes``), every non-finalized class has a TTL, and
  the whole store is bounded by Redis' own ``maxmemory`` with ``allkeys-lru`` (see
  docs/deployment.md; ``start`` warns when the server is not set up that way).
* Keys carry the chain id: two chains can share one Redis without ever mixing answers.
* Cross-process coalescing (``exclusive``) costs one upstream call per miss across all
  processes sharing the Redis: a ``SET NX PX`` lock, waiters poll with backoff for the
  holder's answer and run the call themselves if the holder dies or leaves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from chainrelay.config.sections import CacheConfig
from chainrelay.metrics import LATENCY_BUCKETS, Metrics
from chainrelay.rpc.cache import ANCHOR_HASH, ANCHOR_NUMBER, EXPIRES, VALUE, Entry, new_entry
from chainrelay.rpc.policy import Finality
from chainrelay.wire.jsonrpc import Answer

log = logging.getLogger(__name__)

MiB = 1024 * 1024

# --- Internal limits ------------------------------------------------------------------------
# Keys longer than this (eth_call with kilobytes of calldata) are stored under a 20-byte
# BLAKE2b digest: Redis keeps every key in memory twice (dict and LRU sampling).
MAX_RAW_KEY_BYTES = 256
# First and longest pause between a waiter's polls for the holder's answer: a local anvil
# answers in ~1 ms, a public RPC in ~50-300 ms; doubling reaches 25 ms in four polls.
POLL_FIRST = 0.002
POLL_MAX = 0.025
# Times a waiter tries to take the lock over after the holder left nothing, before it
# simply calls the upstream itself.
LOCK_ROUNDS = 2
# Lookups sent in one MGET at most: a batch of large answers should not stall Redis'
# single thread for long (64 x the 2 MiB cap is the worst case; typical answers are < 2 KB).
MGET_MAX_KEYS = 64
# Shutdown waits this long for lock releases still in flight.
CLOSE_GRACE = 1.0

# --- Value layout ---------------------------------------------------------------------------
# One header byte: version in the high nibble, flags in the low nibble, then the optional
# parts in flag order, then the raw JSON value:
#   _HAS_EXPIRY   float64 wall-clock deadline (monotonic clocks are per host)
#   _HAS_ANCHOR   uint64 block number + 32-byte block hash
#   _ANCHOR_TEXT  uint64 block number + uint8 length + the hash as text (not lowercase hex)
_VERSION = 0x10
_HAS_EXPIRY = 0x01
_HAS_ANCHOR = 0x02
_ANCHOR_TEXT = 0x04
_FLAGS = _HAS_EXPIRY | _HAS_ANCHOR | _ANCHOR_TEXT
_F64 = struct.Struct("!d")
_U64 = struct.Struct("!Q")
# A handed-off answer (one the holder did not store): a tag byte then the raw JSON.
_RESULT = b"r"
_ERROR = b"e"


def encode_entry(entry: Entry, now_wall: float, now_mono: float) -> bytes:
    """The Redis value for ``entry``; its monotonic expiry becomes a wall-clock deadline."""
    flags = 0
    parts: list[bytes] = []
    if entry[EXPIRES]:
        flags |= _HAS_EXPIRY
        parts.append(_F64.pack(now_wall + (entry[EXPIRES] - now_mono)))
    h = entry[ANCHOR_HASH]
    if h is not None:
        number = _U64.pack(max(entry[ANCHOR_NUMBER], 0))
        raw = _hash_bytes(h)
        if raw is not None:
            flags |= _HAS_ANCHOR
            parts.append(number + raw)
        else:
            text = h.encode()[:255]
            flags |= _ANCHOR_TEXT
            parts.append(number + bytes((len(text),)) + text)
    return bytes((_VERSION | flags,)) + b"".join(parts) + entry[VALUE]


def decode_entry(raw: bytes, now_wall: float, now_mono: float) -> Entry | None:
    """The ``Entry`` in a Redis value; None when expired, malformed or of another version."""
    if not raw or raw[0] & 0xF0 != _VERSION or raw[0] & ~_FLAGS & 0x0F:
        return None
    flags = raw[0]
    i = 1
    expires = 0.0
    number, anchor = -1, None
    try:
        if flags & _HAS_EXPIRY:
            (deadline,) = _F64.unpack_from(raw, i)
            i += 8
            left = deadline - now_wall
            if left <= 0:
                return None
            expires = now_mono + left
        if flags & _HAS_ANCHOR:
            (number,) = _U64.unpack_from(raw, i)
            digest = raw[i + 8 : i + 40]
            if len(digest) != 32:
                return None
            anchor = "0x" + digest.hex()
            i += 40
        elif flags & _ANCHOR_TEXT:
            (number,) = _U64.unpack_from(raw, i)
            n = raw[i + 8]
            text = raw[i + 9 : i + 9 + n]
            if len(text) != n:
                return None
            anchor = text.decode()
            i += 9 + n
    except (struct.error, IndexError, UnicodeDecodeError):
        return None
    value = raw[i:]
    if not value:
        return None
    return new_entry(value, expires, number, anchor)


def _hash_bytes(h: str) -> bytes | None:
    """The 32 bytes of a lowercase 0x-hex hash, or None when it is not exactly that."""
    if len(h) != 66 or not h.startswith("0x"):
        return None
    try:
        raw = bytes.fromhex(h[2:])
    except ValueError:
        return None
    return raw if raw.hex() == h[2:] else None  # decoding must give back the same text


def encode_answer(answer: Answer) -> bytes:
    if answer.error is not None:
        return _ERROR + answer.error
    return _RESULT + (answer.result or b"null")


def decode_answer(raw: bytes) -> Answer | None:
    if len(raw) < 2:
        return None
    tag, body = raw[:1], raw[1:]
    if tag == _RESULT:
        return Answer(body, None)
    if tag == _ERROR:
        return Answer(None, body)
    return None


def lock_scope(upstream_urls: list[str]) -> str:
    """Who coalesces with whom: relays with the same upstreams (the workers of one node, the
    replicas of one tier). A relay and its parent may share a Redis and its answers, but
    never a lock: the child would hold it while asking the parent, and the parent would
    wait on it until it expired."""
    text = "\n".join(sorted(upstream_urls)).encode()
    return hashlib.blake2b(text, digest_size=6).hexdigest()


class RedisKeys:
    """Key names for one chain: ``{prefix}{chain id}:v:{key}`` for entries, and
    ``{prefix}{chain id}:{l|a}:{scope}:{key}`` for coalescing locks and for the answers a
    lock's holder hands to its waiters when it did not store them (see ``lock_scope``).

    ``{key}`` is the cache key, or ``#`` and its digest when long. Cache keys start with a
    method name, never ``#``, so a digest cannot collide with a raw key.
    """

    def __init__(self, prefix: str, chain_id: int, scope: str = "") -> None:
        base = f"{prefix}{chain_id}:".encode()
        self.value_prefix = base + b"v:"
        self.lock_prefix = base + b"l:" + scope.encode() + b":"
        self.answer_prefix = base + b"a:" + scope.encode() + b":"

    @staticmethod
    def short(key: bytes) -> bytes:
        if len(key) <= MAX_RAW_KEY_BYTES:
            return key
        return b"#" + hashlib.blake2b(key, digest_size=20).hexdigest().encode()

    def value(self, key: bytes) -> bytes:
        return self.value_prefix + self.short(key)

    def all(self, key: bytes) -> tuple[bytes, bytes, bytes]:
        k = self.short(key)
        return self.value_prefix + k, self.lock_prefix + k, self.answer_prefix + k


def ttl_ms(finality: Finality, entry: Entry, c: CacheConfig, now_mono: float) -> int | None:
    """Milliseconds an entry lives in Redis; 0: no TTL; None: not stored at all."""
    if finality is Finality.FINALIZED:
        return round(c.redis_ttl_finalized * 1000)
    if finality is Finality.UNFINALIZED:
        return max(1, round(c.redis_ttl_unfinalized * 1000))
    if finality is Finality.REALTIME:
        left = round((entry[EXPIRES] - now_mono) * 1000) if entry[EXPIRES] else 0
        return left if left > 0 else None
    return None


# Releases the lock only if this process still holds it (it may have expired and been
# taken by another), after leaving an unstored answer for the waiters.
_RELEASE_LUA = """
if ARGV[2] ~= "" then redis.call("SET", KEYS[2], ARGV[2], "PX", ARGV[3]) end
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
"""


class _Down(Exception):
    """A Redis command failed or timed out; the tier is now marked down."""


T = TypeVar("T")
# What MGET answers: a value per key, None where there is none.
Values = list[bytes | None]


class RedisCache:
    """The ``rpc.SharedCache`` over one Redis. ``await start()``, use, ``await close()``."""

    def __init__(self, cfg: CacheConfig, chain_id: int, metrics: Metrics, scope: str = "") -> None:
        """``cfg``: the validated ``[cache]`` section (its ``redis_*`` keys)."""
        self.cfg = cfg
        self.keys = RedisKeys(cfg.redis_key_prefix, chain_id, scope)
        self._pool = aioredis.BlockingConnectionPool.from_url(
            cfg.redis_url,
            max_connections=cfg.redis_max_connections,
            timeout=cfg.redis_timeout,
            socket_timeout=cfg.redis_timeout,
            socket_connect_timeout=cfg.redis_connect_timeout,
            # One reconnect of a stale pooled connection, then the error is ours to handle.
            retry=Retry(NoBackoff(), 1),
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._release_script = self._redis.register_script(_RELEASE_LUA)
        self._up = False
        self._closed = False
        self._reconnect: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Keys this process holds the lock for -> whether produce() stored an entry.
        self._holding: dict[bytes, bool] = {}
        # Lookups waiting for the next MGET (see get).
        self._batch: list[tuple[bytes, asyncio.Future[bytes | None]]] = []
        self._lock_px = max(1, round(cfg.redis_lock_ttl * 1000))
        self._where = _redact(cfg.redis_url)
        self._register(metrics)

    def _register(self, metrics: Metrics) -> None:
        r = metrics.registry
        self._m_up = Gauge(
            "chainrelay_shared_cache_up", "1 while the Redis tier is in use", registry=r
        )
        gets = Counter(
            "chainrelay_shared_cache_gets",
            "Redis tier lookups by outcome (hit, miss, skipped while down, error)",
            ["outcome"],
            registry=r,
        )
        puts = Counter(
            "chainrelay_shared_cache_puts",
            "Redis tier stores by outcome (stored, too_large, skipped while down, error)",
            ["outcome"],
            registry=r,
        )
        locks = Counter(
            "chainrelay_shared_cache_locks",
            "Cross-process coalescing: acquired (this process called upstream), found "
            "(answer already stored), waited (answer stored by another process), handoff "
            "(another process's unstored answer), fallback (holder gone: own call), skipped",
            ["outcome"],
            registry=r,
        )
        self._m_errors = Counter(
            "chainrelay_shared_cache_errors",
            "Redis commands that failed or timed out, by operation",
            ["op"],
            registry=r,
        )
        self._m_waiting = Gauge(
            "chainrelay_shared_cache_waiting",
            "Misses waiting for another process's upstream call for the same key",
            registry=r,
        )
        self._m_down = Counter(
            "chainrelay_shared_cache_down",
            "Times the Redis tier was marked down",
            registry=r,
        )
        latency = Histogram(
            "chainrelay_shared_cache_latency_seconds",
            "Redis command latency by operation",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._gets = {o: gets.labels(o) for o in ("hit", "miss", "skipped", "error")}
        self._puts = {o: puts.labels(o) for o in ("stored", "too_large", "skipped", "error")}
        self._locks = {
            o: locks.labels(o)
            for o in ("acquired", "found", "waited", "handoff", "fallback", "skipped")
        }
        self._latency = {op: latency.labels(op) for op in ("get", "put", "lock", "wait", "limit")}
        self._m_up.set(0)

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return self._up

    async def start(self) -> None:
        """Connect; a Redis that does not answer is not an error: it is probed until it does."""
        try:
            async with asyncio.timeout(self.cfg.redis_connect_timeout + self.cfg.redis_timeout):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            self._m_errors.labels("ping").inc()
            log.warning(
                "shared cache %s unreachable (%s); serving from memory and upstreams until "
                "it answers",
                self._where,
                _describe(exc),
            )
            self._start_reconnect()
            return
        self._mark_up()
        await self._check_eviction()

    async def close(self) -> None:
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE)
            for t in self._tasks:
                t.cancel()
        self._up = False
        self._m_up.set(0)
        await self._redis.aclose()
        await self._pool.disconnect()

    async def _check_eviction(self) -> None:
        """Warn when Redis could grow without bound: no maxmemory, or a non-LRU/LFU policy."""
        try:
            async with asyncio.timeout(self.cfg.redis_timeout):
                got = await self._redis.config_get("maxmemory*")
        except (RedisError, OSError, TimeoutError):
            return  # managed Redis services often refuse CONFIG; nothing to check then
        conf = {_text(k): _text(v) for k, v in got.items()}
        policy = conf.get("maxmemory-policy", "")
        limit = conf.get("maxmemory", "0")
        if limit == "0" or not policy.startswith("allkeys-"):
            log.warning(
                "shared cache %s runs with maxmemory=%s maxmemory-policy=%s: set maxmemory and "
                "allkeys-lru so cached answers stay bounded (docs/deployment.md)",
                self._where,
                limit,
                policy,
            )

    def _mark_up(self) -> None:
        self._up = True
        self._m_up.set(1)

    def _fail(self, op: str, exc: BaseException) -> None:
        self._m_errors.labels(op).inc()
        if not self._up:
            return
        self._up = False
        self._m_up.set(0)
        self._m_down.inc()
        log.warning(
            "shared cache %s down (%s on %s); serving from memory and upstreams until it answers",
            self._where,
            _describe(exc),
            op,
        )
        self._start_reconnect()

    def _start_reconnect(self) -> None:
        if self._closed or (self._reconnect is not None and not self._reconnect.done()):
            return
        self._reconnect = asyncio.create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.redis_retry_interval)
            # Connections of the old server are dead; new ones are opened on demand.
            with contextlib.suppress(RedisError, OSError):
                await self._pool.disconnect()
            try:
                async with asyncio.timeout(self.cfg.redis_connect_timeout + self.cfg.redis_timeout):
                    await self._redis.ping()
            except (RedisError, OSError, TimeoutError):
                continue
            self._mark_up()
            log.info("shared cache %s answers again; using it", self._where)
            await self._check_eviction()
            return

    async def _run(self, op: str, aw: Awaitable[T]) -> T:
        """One round trip under the command timeout; any failure marks the tier down."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.redis_timeout):
                got = await aw
        except (RedisError, OSError, TimeoutError) as exc:
            self._fail(op, exc)
            raise _Down from None
        self._latency[op].observe(time.perf_counter() - started)
        return got

    def _background(self, aw: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- scripts of other shared state (access/sharedbuckets.py) ---------------------------
    def script(self, lua: str) -> Callable[..., Awaitable[Any]]:
        """``lua`` registered once: called, it runs by EVALSHA (loaded on first use)."""
        return cast("Callable[..., Awaitable[Any]]", self._redis.register_script(lua))

    async def run_script(
        self, script: Callable[..., Awaitable[Any]], keys: list[bytes], args: list[Any]
    ) -> Any:
        """One script call under the command timeout; None when the tier is down or the
        call fails (which marks it down, as any other command does)."""
        if not self._up:
            return None
        try:
            return await self._run("limit", script(keys=keys, args=args))
        except _Down:
            return None

    @property
    def key_base(self) -> bytes:
        """The prefix of this chain's keys, for other shared state to name its own under."""
        return self.keys.value_prefix[:-2]

    # --- SharedCache -----------------------------------------------------------------------
    async def get(self, key: bytes) -> Entry | None:
        """The entry, or None. Lookups made in the same turn of the event loop travel in one
        MGET: under load a Redis round trip is paid per batch, not per call."""
        if not self._up:
            self._gets["skipped"].inc()
            return None
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._batch.append((self.keys.value(key), fut))
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._flush_gets)
        raw = await fut
        entry = decode_entry(raw, time.time(), time.monotonic()) if raw else None
        self._gets["hit" if entry is not None else "miss"].inc()
        return entry

    def _flush_gets(self) -> None:
        batch, self._batch = self._batch, []
        for i in range(0, len(batch), MGET_MAX_KEYS):
            self._background(self._mget(batch[i : i + MGET_MAX_KEYS]))

    async def _mget(self, batch: list[tuple[bytes, asyncio.Future[bytes | None]]]) -> None:
        raws: list[bytes | None]
        try:
            if not self._up:  # marked down since the lookups were queued
                raise _Down
            # Values come back as bytes: the client is made without decode_responses.
            raws = cast(Values, await self._run("get", self._redis.mget([k for k, _ in batch])))
        except _Down:
            self._gets["error"].inc(len(batch))
            raws = [None] * len(batch)
        except BaseException:
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            raise
        for (_, fut), raw in zip(batch, raws, strict=True):
            if not fut.done():  # its caller may have gone
                fut.set_result(raw)

    async def put(self, key: bytes, entry: Entry, finality: Finality) -> None:
        if not self._up:
            self._puts["skipped"].inc()
            return
        if len(entry[VALUE]) > self.cfg.redis_max_entry_bytes:
            self._puts["too_large"].inc()
            return
        now = time.monotonic()
        ttl = ttl_ms(finality, entry, self.cfg, now)
        if ttl is None:
            return
        value = encode_entry(entry, time.time(), now)
        try:
            await self._run("put", self._redis.set(self.keys.value(key), value, px=ttl or None))
        except _Down:
            self._puts["error"].inc()
            return
        self._puts["stored"].inc()
        if key in self._holding:
            self._holding[key] = True

    async def exclusive(self, key: bytes, produce: Callable[[], Awaitable[Answer]]) -> Answer:
        if not self._up:
            self._locks["skipped"].inc()
            return await produce()
        vkey, lkey, akey = self.keys.all(key)
        for _ in range(LOCK_ROUNDS):
            token = os.urandom(8)
            try:
                acquired, raw = await self._run("lock", self._acquire(vkey, lkey, token))
            except _Down:
                self._locks["skipped"].inc()
                return await produce()
            entry = decode_entry(raw, time.time(), time.monotonic()) if raw else None
            if entry is not None:
                if acquired:
                    self._background(self._release(lkey, akey, token, b""))
                self._locks["found"].inc()
                return Answer(entry[VALUE], None)
            if acquired:
                self._locks["acquired"].inc()
                return await self._hold(key, lkey, akey, token, produce)
            self._m_waiting.inc()
            try:
                answer = await self._wait(vkey, lkey, akey)
            finally:
                self._m_waiting.dec()
            if answer is not None:
                return answer
            if not self._up:
                break
        self._locks["fallback"].inc()
        return await produce()

    async def _acquire(self, vkey: bytes, lkey: bytes, token: bytes) -> tuple[bool, bytes | None]:
        """Take the lock and read the value in one round trip: an answer stored between the
        caller's miss and now is used instead of calling the upstream again."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(lkey, token, nx=True, px=self._lock_px)
        pipe.get(vkey)
        acquired, raw = await pipe.execute()
        return bool(acquired), raw

    async def _hold(
        self,
        key: bytes,
        lkey: bytes,
        akey: bytes,
        token: bytes,
        produce: Callable[[], Awaitable[Answer]],
    ) -> Answer:
        self._holding[key] = False
        try:
            answer = await produce()
        except BaseException:
            self._holding.pop(key, None)
            self._background(self._release(lkey, akey, token, b""))  # waiters fall back now
            raise
        stored = self._holding.pop(key, False)
        handoff = b""
        if not stored:
            handoff = encode_answer(answer)
            if len(handoff) > self.cfg.redis_max_entry_bytes:
                handoff = b""
        # The answer is already stored (awaited inside produce): releasing can trail it.
        self._background(self._release(lkey, akey, token, handoff))
        return answer

    async def _release(self, lkey: bytes, akey: bytes, token: bytes, handoff: bytes) -> None:
        if not self._up:
            return  # the lock expires by itself
        with contextlib.suppress(_Down):
            await self._run(
                "lock",
                self._release_script(keys=[lkey, akey], args=[token, handoff, self._lock_px]),
            )

    async def _wait(self, vkey: bytes, lkey: bytes, akey: bytes) -> Answer | None:
        """The holder's answer once it lands; None when the holder is gone without one."""
        deadline = time.monotonic() + self.cfg.redis_lock_ttl
        delay = POLL_FIRST
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
            try:
                got = await self._run("wait", self._redis.mget(vkey, akey, lkey))
                raw, handoff, lock = cast(Values, got)
            except _Down:
                return None
            if raw:
                entry = decode_entry(raw, time.time(), time.monotonic())
                if entry is not None:
                    self._locks["waited"].inc()
                    return Answer(entry[VALUE], None)
            if handoff:
                answer = decode_answer(handoff)
                if answer is not None:
                    self._locks["handoff"].inc()
                    return answer
            if lock is None:
                return None
        return None


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user + ':***@' if user else '***@'}{host}"
