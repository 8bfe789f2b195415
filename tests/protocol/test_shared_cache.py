"""The Redis tier without Redis: its value codec, key names, TTLs, config, and what it does
while marked down (no socket is opened: the client connects lazily and is never used)."""

from __future__ import annotations

import pytest

from chainrelay import config, defaults
from chainrelay.errors import ConfigError
from chainrelay.metrics import Metrics
from chainrelay.rpc import shared_cache as sc
from chainrelay.rpc.cache import ANCHOR_HASH, ANCHOR_NUMBER, EXPIRES, VALUE, new_entry
from chainrelay.rpc.policy import Finality
from chainrelay.wire.jsonrpc import Answer

HASH = "0x" + "ab" * 32
UPSTREAM = '[[upstreams]]\nurl = "ws://127.0.0.1:8546"\n'


# --- entry codec -------------------------------------------------------------------------------
def test_a_plain_entry_costs_one_header_byte() -> None:
    raw = sc.encode_entry(new_entry(b'"0x1"'), 1000.0, 50.0)
    assert raw == b'\x10"0x1"'
    got = sc.decode_entry(raw, 2000.0, 90.0)
    assert got is not None
    assert (got[VALUE], got[EXPIRES], got[ANCHOR_NUMBER], got[ANCHOR_HASH]) == (
        b'"0x1"',
        0.0,
        -1,
        None,
    )


def test_an_anchored_entry_keeps_its_block_in_40_bytes() -> None:
    entry = new_entry(b'{"x":1}', anchor_number=123_456, anchor_hash=HASH)
    raw = sc.encode_entry(entry, 0.0, 0.0)
    assert len(raw) == 1 + 8 + 32 + len(b'{"x":1}')
    got = sc.decode_entry(raw, 0.0, 0.0)
    assert got is not None
    assert (got[VALUE], got[ANCHOR_NUMBER], got[ANCHOR_HASH]) == (b'{"x":1}', 123_456, HASH)


@pytest.mark.parametrize("h", ["0x" + "AB" * 32, "0xabc", "not-a-hash", "0x" + "zz" * 32])
def test_a_hash_not_in_lowercase_hex_comes_back_exactly_as_given(h: str) -> None:
    raw = sc.encode_entry(new_entry(b"1", anchor_number=7, anchor_hash=h), 0.0, 0.0)
    got = sc.decode_entry(raw, 0.0, 0.0)
    assert got is not None and (got[ANCHOR_NUMBER], got[ANCHOR_HASH], got[VALUE]) == (7, h, b"1")


def test_expiry_travels_as_wall_time_and_lands_on_the_readers_monotonic_clock() -> None:
    # Writer: monotonic 100 s, wall 5000 s, expires in 0.75 s.
    raw = sc.encode_entry(new_entry(b'"0x5"', expires=100.75), 5000.0, 100.0)
    # Reader, another process: its monotonic clock reads 7 s at wall 5000.25 s.
    got = sc.decode_entry(raw, 5000.25, 7.0)
    assert got is not None
    assert got[EXPIRES] == pytest.approx(7.5)
    # At or past the deadline the entry is gone.
    assert sc.decode_entry(raw, 5000.75, 7.0) is None
    assert sc.decode_entry(raw, 5001.0, 7.0) is None


def test_expiry_and_anchor_together() -> None:
    entry = new_entry(b"[]", expires=10.5, anchor_number=9, anchor_hash=HASH)
    got = sc.decode_entry(sc.encode_entry(entry, 100.0, 10.0), 100.0, 10.0)
    assert got is not None
    assert (got[EXPIRES], got[ANCHOR_NUMBER], got[ANCHOR_HASH], got[VALUE]) == (
        10.5,
        9,
        HASH,
        b"[]",
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x10",  # no value
        b'\x20"0x1"',  # another version
        b'\x18"0x1"',  # a flag this version does not know
        b"\x11\x00\x00",  # expiry cut short
        b"\x12" + b"\x00" * 8 + b"\xab" * 10,  # anchor hash cut short
        b"\x14" + b"\x00" * 8 + b"\x09abc",  # text anchor shorter than its length
    ],
)
def test_malformed_values_read_as_a_miss(raw: bytes) -> None:
    assert sc.decode_entry(raw, 0.0, 0.0) is None


def test_answers_handed_off_keep_result_or_error() -> None:
    ok = sc.decode_answer(sc.encode_answer(Answer(b'"0x2"', None)))
    assert ok is not None and (ok.result, ok.error) == (b'"0x2"', None)
    err = sc.decode_answer(sc.encode_answer(Answer(None, b'{"code":3,"message":"reverted"}')))
    assert err is not None and (err.result, err.error) == (None, b'{"code":3,"message":"reverted"}')
    assert sc.decode_answer(b"x1") is None
    assert sc.decode_answer(b"r") is None


# --- keys and TTLs ------------------------------------------------------------------------------
def test_keys_are_namespaced_by_prefix_and_chain() -> None:
    k = b'eth_getBalance:["0x1","0x10"]'
    bsc, arb = sc.RedisKeys("cr:", 56), sc.RedisKeys("cr:", 42161)
    assert bsc.value(k) == b'cr:56:v:eth_getBalance:["0x1","0x10"]'
    assert arb.value(k) != bsc.value(k)
    value, lock, answer = bsc.all(k)
    assert len({value, lock, answer}) == 3
    assert lock.startswith(b"cr:56:l::") and answer.startswith(b"cr:56:a::")


def test_a_relay_and_its_parent_share_answers_but_never_a_lock() -> None:
    k = b'eth_getBalance:["0x1","0x10"]'
    leaf = sc.lock_scope(["http://regional-eu:8545", "http://regional-us:8545"])
    peer = sc.lock_scope(["http://regional-us:8545", "http://regional-eu:8545"])
    parent = sc.lock_scope(["http://origin:8545"])
    assert leaf == peer != parent
    a, b = sc.RedisKeys("eu:", 56, leaf).all(k), sc.RedisKeys("eu:", 56, parent).all(k)
    assert a[0] == b[0]  # the same entry
    assert a[1] != b[1] and a[2] != b[2]  # different locks and hand-offs


def test_long_keys_are_stored_under_a_digest() -> None:
    keys = sc.RedisKeys("cr:", 56)
    long_a = b"eth_call:" + b"a" * 5000
    long_b = b"eth_call:" + b"a" * 4999 + b"b"
    assert len(keys.value(long_a)) == len(b"cr:56:v:#") + 40
    assert keys.value(long_a) != keys.value(long_b)
    assert keys.value(long_a) == keys.value(bytes(long_a))  # stable
    edge = b"m:" + b"x" * (sc.MAX_RAW_KEY_BYTES - 2)
    assert keys.value(edge) == b"cr:56:v:" + edge


def test_every_non_finalized_class_lives_a_bounded_time() -> None:
    s = config.CacheConfig(redis_ttl_finalized=0.0, redis_ttl_unfinalized=1800.0)
    e = new_entry(b"1")
    assert sc.ttl_ms(Finality.FINALIZED, e, s, 0.0) == 0  # no TTL: maxmemory + LRU bound it
    minute = config.CacheConfig(redis_ttl_finalized=60.0)
    assert sc.ttl_ms(Finality.FINALIZED, e, minute, 0.0) == 60_000
    assert sc.ttl_ms(Finality.UNFINALIZED, e, s, 0.0) == 1_800_000
    # Realtime entries live what is left of their own expiry, and not at all once expired.
    assert sc.ttl_ms(Finality.REALTIME, new_entry(b"1", expires=10.75), s, 10.0) == 750
    assert sc.ttl_ms(Finality.REALTIME, new_entry(b"1", expires=10.0), s, 10.5) is None
    assert sc.ttl_ms(Finality.REALTIME, new_entry(b"1"), s, 10.0) is None
    assert sc.ttl_ms(Finality.NEVER, e, s, 0.0) is None


def test_defaults_keep_every_non_finalized_class_bounded() -> None:
    assert 0 < defaults.REDIS_TTL_UNFINALIZED < defaults.REDIS_TTL_FINALIZED
    assert defaults.REDIS_LOCK_TTL < defaults.REDIS_TTL_UNFINALIZED
    assert defaults.REDIS_TIMEOUT < defaults.REDIS_LOCK_TTL


# --- config -------------------------------------------------------------------------------------
def test_cache_section_defaults_come_from_the_defaults_module() -> None:
    cfg = config.loads(UPSTREAM)
    c = cfg.cache
    assert c.backend == "memory"
    assert (c.redis_url, c.redis_key_prefix) == (defaults.REDIS_URL, defaults.REDIS_KEY_PREFIX)
    assert c.redis_max_entry_bytes == defaults.REDIS_MAX_ENTRY_BYTES
    assert (c.redis_ttl_finalized, c.redis_ttl_unfinalized) == (
        defaults.REDIS_TTL_FINALIZED,
        defaults.REDIS_TTL_UNFINALIZED,
    )
    assert (c.redis_lock_ttl, c.redis_timeout) == (defaults.REDIS_LOCK_TTL, defaults.REDIS_TIMEOUT)


def test_a_tiered_cache_section_loads() -> None:
    cfg = config.loads(
        '[server]\nlisten = "127.0.0.1:8600"\nworkers = 4\n'
        '[cache]\nbackend = "tiered"\nmemory_bytes = 65536\n'
        'redis_url = "redis://10.0.0.5:6379/2"\nredis_key_prefix = "eu1:"\n'
        "redis_ttl_finalized = 0\nredis_lock_ttl = 2\nredis_timeout = 0.1\n" + UPSTREAM
    )
    c = cfg.cache
    assert (c.backend, c.memory_bytes, c.redis_url) == ("tiered", 65536, "redis://10.0.0.5:6379/2")
    assert (c.redis_key_prefix, c.redis_ttl_finalized, c.redis_lock_ttl) == ("eu1:", 0.0, 2.0)
    assert cfg.server.workers == 4


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[cache]\nbackend = "memcached"\n', "cache.backend"),
        ('[cache]\nbackend = "redis"\nredis_url = "http://x:6379"\n', "cache.redis_url"),
        ('[cache]\nbackend = "tiered"\nredis_url = "localhost:6379"\n', "cache.redis_url"),
        ("[cache]\nredis_ttl_unfinalized = 0\n", "cache.redis_ttl_unfinalized"),
        ("[cache]\nredis_ttl_finalized = -1\n", "cache.redis_ttl_finalized"),
        ("[cache]\nredis_lock_ttl = 0\n", "cache.redis_lock_ttl"),
        ("[cache]\nredis_timeout = -0.5\n", "cache.redis_timeout"),
        ("[cache]\nredis_max_entry_bytes = 0\n", "cache.redis_max_entry_bytes"),
        ("[cache]\nredis_max_connections = 0\n", "cache.redis_max_connections"),
        ('[cache]\nredis_urll = "redis://x"\n', "cache.redis_urll"),
        ('[cache]\nredis_timeout = "fast"\n', "cache.redis_timeout"),
        ('[server]\nlisten = "127.0.0.1:0"\nworkers = 2\n', "server.listen"),
        ('[server]\nlisten = "127.0.0.1:8545"\nworkers = 0\n', "server.workers"),
    ],
)
def test_bad_cache_and_worker_settings_name_their_key(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.loads(text + UPSTREAM)
    assert words in str(exc.value)


def test_memory_backend_does_not_look_at_the_redis_url() -> None:
    cfg = config.loads('[cache]\nbackend = "memory"\nredis_url = "whatever"\n' + UPSTREAM)
    assert cfg.cache.backend == "memory"


# --- marked down: every call skips Redis and touches no socket ----------------------------------
def sample(m: Metrics, name: str, **labels: str) -> float:
    got = m.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


async def test_a_tier_marked_down_is_skipped_by_every_operation() -> None:
    m = Metrics()
    # A port nothing listens on; the tier is never started, so it is down and never dials.
    cache = sc.RedisCache(config.CacheConfig(redis_url="redis://127.0.0.1:9/0"), 56, m)
    assert not cache.up
    assert await cache.get(b"k") is None
    await cache.put(b"k", new_entry(b'"0x1"'), Finality.FINALIZED)
    calls = 0

    async def produce() -> Answer:
        nonlocal calls
        calls += 1
        return Answer(b'"0x1"', None)

    answer = await cache.exclusive(b"k", produce)
    assert (answer.result, calls) == (b'"0x1"', 1)
    assert sample(m, "chainrelay_shared_cache_gets_total", outcome="skipped") == 1
    assert sample(m, "chainrelay_shared_cache_puts_total", outcome="skipped") == 1
    assert sample(m, "chainrelay_shared_cache_locks_total", outcome="skipped") == 1
    assert sample(m, "chainrelay_shared_cache_up") == 0
    assert sample(m, "chainrelay_shared_cache_errors_total", op="get") == 0
    await cache.close()


def test_passwords_stay_out_of_logs() -> None:
    assert sc._redact("redis://user:s3cret@h:6379/0") == "redis://user:***@h:6379/0"
    assert sc._redact("redis://:s3cret@h:6379/0") == "redis://***@h:6379/0"
    assert sc._redact("redis://h:6379/0") == "redis://h:6379/0"
