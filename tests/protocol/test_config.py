"""Configuration: strict TOML, ${ENV} expansion, defaults, validation. No sockets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chainrelay import cli, defaults
from chainrelay.config import Config, expand_env, load, loads, parse_listen, quick
from chainrelay.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))

UPSTREAM = '[[upstreams]]\nurl = "http://127.0.0.1:8545"\n'


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        loads(text, env or {})
    return str(exc.value)


# --- strict decoding -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("[pool]\ntimeoutt = 3.0\n" + UPSTREAM, "pool.timeoutt"),
        ('[[upstreams]]\nurll = "http://127.0.0.1:1"\n', "upstreams[0].urll"),
        (UPSTREAM + '[[upstreams]]\nurl = "http://127.0.0.1:2"\nnmae = "b"\n', "upstreams[1].nmae"),
        ("[serverr]\n" + UPSTREAM, "serverr"),
        ("verbose = true\n" + UPSTREAM, "verbose"),
        ("[limits]\nmax_body_byte = 1\n" + UPSTREAM, "limits.max_body_byte"),
        ("[cache.memory]\nbytes = 1\n" + UPSTREAM, "cache.memory"),
        ("[tiers.pro]\nmax_batch_lenn = 1\n" + UPSTREAM, "tiers.pro.max_batch_lenn"),
    ],
)
def test_unknown_key_is_an_error_naming_its_full_path(text: str, path: str) -> None:
    msg = error_of(text)
    assert f"'{path}'" in msg
    assert "unknown key" in msg


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ('[pool]\ntimeout = "3"\n' + UPSTREAM, "pool.timeout", "expected float"),
        ("[limits]\nmax_batch_len = 1.5\n" + UPSTREAM, "limits.max_batch_len", "expected int"),
        ("[limits]\nmax_batch_len = true\n" + UPSTREAM, "limits.max_batch_len", "expected int"),
        ('[pool]\nhedge = "yes"\n' + UPSTREAM, "pool.hedge", "expected bool"),
        ("[server]\nlisten = 8545\n" + UPSTREAM, "server.listen", "expected str"),
        ('[server]\ncors_origins = "*"\n' + UPSTREAM, "server.cors_origins", "array"),
        ("server = 1\n" + UPSTREAM, "server", "table"),
        ('upstreams = ["http://127.0.0.1:1"]\n', "upstreams[0]", "table"),
        ("tiers = 1\n" + UPSTREAM, "tiers", "table"),
        ("[tiers]\npro = 1\n" + UPSTREAM, "tiers.pro", "table"),
        ("[tiers.pro]\nmax_batch_len = 0\n" + UPSTREAM, "tiers.pro.max_batch_len", "positive"),
    ],
)
def test_wrong_types_name_the_key(text: str, path: str, words: str) -> None:
    msg = error_of(text)
    assert path in msg and words in msg


def test_int_is_accepted_where_a_float_is_expected() -> None:
    cfg = loads("[pool]\ntimeout = 3\n" + UPSTREAM, {})
    assert cfg.pool.timeout == 3.0 and isinstance(cfg.pool.timeout, float)


def test_not_toml_is_a_config_error() -> None:
    assert "TOML" in error_of("[server\nlisten=")


# --- defaults --------------------------------------------------------------------------------
def test_omitted_keys_take_the_defaults() -> None:
    cfg = loads(UPSTREAM, {})
    assert isinstance(cfg, Config)
    assert cfg.limits.max_body_bytes == defaults.MAX_BODY_BYTES
    assert cfg.limits.max_batch_len == defaults.MAX_BATCH_LEN
    assert cfg.pool.timeout == defaults.UPSTREAM_TIMEOUT
    assert cfg.cache.memory_bytes == defaults.CACHE_MEMORY_BYTES
    assert cfg.cache.logs_bytes == defaults.CACHE_LOGS_BYTES
    assert cfg.cache.logs_max_upstream_ranges == defaults.CACHE_LOGS_MAX_UPSTREAM_RANGES
    assert cfg.server.listen == defaults.LISTEN
    assert cfg.upstreams[0].name == "upstream0"  # named by position when unnamed


def test_overrides_land_where_they_belong() -> None:
    cfg = loads(
        "[limits]\nmax_body_bytes = 100000\nmax_batch_len = 7\n"
        "[pool]\nmax_attempts = 5\nhedge = false\n"
        '[chain]\nprofile = "bsc"\nchain_id = 56\n'
        '[[upstreams]]\nname = "a"\nurl = "ws://127.0.0.1:1"\n'
        '[[upstreams]]\nname = "b"\nurl = "https://example.org/rpc"\n',
        {},
    )
    assert (cfg.limits.max_body_bytes, cfg.limits.max_batch_len) == (100000, 7)
    assert (cfg.pool.max_attempts, cfg.pool.hedge) == (5, False)
    assert (cfg.chain.profile, cfg.chain.chain_id) == ("bsc", 56)
    assert [(u.name, u.url) for u in cfg.upstreams] == [
        ("a", "ws://127.0.0.1:1"),
        ("b", "https://example.org/rpc"),
    ]


# --- ${ENV} expansion ------------------------------------------------------------------------
def test_env_variables_expand_in_string_values() -> None:
    cfg = loads(
        '[server]\nlisten = "${HOST}:${PORT}"\n'
        '[[upstreams]]\nurl = "https://rpc.example/v1/${KEY}"\n',
        {"HOST": "127.0.0.2", "PORT": "9000", "KEY": "s3cr3t"},
    )
    assert cfg.server.listen == "127.0.0.2:9000"
    assert cfg.upstreams[0].url == "https://rpc.example/v1/s3cr3t"


def test_env_default_is_used_only_when_the_variable_is_unset() -> None:
    text = '[server]\nlisten = "${LISTEN:-127.0.0.1:7000}"\n' + UPSTREAM
    assert loads(text, {}).server.listen == "127.0.0.1:7000"
    assert loads(text, {"LISTEN": "127.0.0.1:7001"}).server.listen == "127.0.0.1:7001"
    # An empty value is a value: it is used, and then fails validation as a listen address.
    assert "server.listen" in error_of(text, {"LISTEN": ""})


def test_unset_env_variable_is_an_error_naming_key_and_variable() -> None:
    msg = error_of('[[upstreams]]\nurl = "https://rpc.example/${API_KEY}"\n')
    assert "API_KEY" in msg and "upstreams[0].url" in msg


def test_env_is_not_expanded_in_comments() -> None:
    cfg = loads('# url = "${NOT_SET}"\n' + UPSTREAM, {})
    assert cfg.upstreams[0].url == "http://127.0.0.1:8545"


def test_expand_env_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAINRELAY_TEST_VALUE", "v")
    assert expand_env("a-${CHAINRELAY_TEST_VALUE}-b") == "a-v-b"
    assert expand_env("$NOT_BRACED and ${X:-d}", {}) == "$NOT_BRACED and d"


# --- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "upstreams"),
        ('[[upstreams]]\nurl = "127.0.0.1:8545"\n', "upstreams[0].url"),
        ('[[upstreams]]\nurl = "ftp://127.0.0.1"\n', "upstreams[0].url"),
        (
            '[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:1"\n'
            '[[upstreams]]\nname = "a"\nurl = "http://127.0.0.1:2"\n',
            "unique",
        ),
        ('[chain]\nprofile = "solana"\n' + UPSTREAM, "chain.profile"),
        ('[cache]\nbackend = "memcached"\n' + UPSTREAM, "cache.backend"),
        ('[server]\nlisten = "localhost"\n' + UPSTREAM, "server.listen"),
        ('[server]\nlisten = "127.0.0.1:http"\n' + UPSTREAM, "server.listen"),
        ("[limits]\nmax_body_bytes = 0\n" + UPSTREAM, "limits.max_body_bytes"),
        ("[limits]\nmax_batch_len = -1\n" + UPSTREAM, "limits.max_batch_len"),
        ("[cache]\nmemory_bytes = 0\n" + UPSTREAM, "cache.memory_bytes"),
        ("[cache]\nlogs_bytes = 0\n" + UPSTREAM, "cache.logs_bytes"),
        (
            "[cache]\nlogs_max_upstream_ranges = -1\n" + UPSTREAM,
            "cache.logs_max_upstream_ranges",
        ),
        ("[pool]\nmax_attempts = 0\n" + UPSTREAM, "pool.max_attempts"),
        ("[subscriptions]\nslow_close_grace = 0\n" + UPSTREAM, "subscriptions.slow_close_grace"),
        (
            "[subscriptions]\nfeed_fetch_attempts = 0\n" + UPSTREAM,
            "subscriptions.feed_fetch_attempts",
        ),
        (
            "[subscriptions]\npending_max_message = -1\n" + UPSTREAM,
            "subscriptions.pending_max_message",
        ),
        (
            '[subscriptions]\nfollow_blocks = "sometimes"\n' + UPSTREAM,
            "subscriptions.follow_blocks",
        ),
    ],
)
def test_invalid_values_are_refused_naming_the_key(text: str, words: str) -> None:
    assert words in error_of(text)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8545") == ("127.0.0.1", 8545)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    assert parse_listen(":9000") == ("127.0.0.1", 9000)


def test_quick_config_names_upstreams_by_position() -> None:
    cfg = quick(["http://127.0.0.1:1", "ws://127.0.0.1:2"], "127.0.0.1:9")
    assert [u.name for u in cfg.upstreams] == ["upstream0", "upstream1"]
    assert cfg.server.listen == "127.0.0.1:9"
    with pytest.raises(ConfigError):
        quick([])


def test_load_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[pool]\ntimeoutt = 1\n" + UPSTREAM)
    with pytest.raises(ConfigError) as exc:
        load(bad)
    assert str(bad) in str(exc.value) and "pool.timeoutt" in str(exc.value)
    with pytest.raises(ConfigError) as missing:
        load(tmp_path / "missing.toml")
    assert "missing.toml" in str(missing.value)


def test_validate_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(UPSTREAM)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[upstreams]]\nurll = "http://127.0.0.1:1"\n')
    assert cli.main(["validate", str(good)]) == 0
    assert cli.main(["validate", str(bad)]) == 2
    assert "upstreams[0].urll" in capsys.readouterr().err


# --- the shipped configs ---------------------------------------------------------------------
@pytest.mark.skipif(not CONFIGS, reason="no configs/*.toml yet")
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load(path)
    assert cfg.upstreams
    assert all(u.name for u in cfg.upstreams)


def test_hit_table_and_memo_bounds_are_limits_and_must_be_positive() -> None:
    base = '[[upstreams]]\nurl = "http://127.0.0.1:1"\n'
    cfg = loads("[limits]\nmax_hit_table_entries = 7\nmemo_max_params_bytes = 64\n" + base)
    assert (cfg.limits.max_hit_table_entries, cfg.limits.memo_max_params_bytes) == (7, 64)
    for key in ("max_hit_table_bytes", "max_hit_table_entries", "memo_max_params_bytes"):
        with pytest.raises(ConfigError, match=f"limits.{key}: must be positive"):
            loads(f"[limits]\n{key} = 0\n" + base)


# --- one rule for positive bounds ------------------------------------------------------------
# Exactly the keys refused at 0, each with the one message: a bound whose check is lost, or
# one newly checked (a config that loaded would stop loading), shows up here.
POSITIVE_KEYS = {
    "server": "workers max_forwarded_hops max_proxy_header_bytes admin_scrape_timeout "
    "access_log_flush_interval access_log_flush_bytes access_log_max_buffer_bytes "
    "request_id_max_bytes gzip_min_bytes status_history status_max_children",
    "limits": "max_body_bytes max_batch_len max_pending_replies ws_close_timeout max_relay_hops "
    "max_hit_table_bytes max_hit_table_entries max_named_heads memo_max_params_bytes "
    "max_upstream_in_flight max_upstream_in_flight_per_client "
    "max_buffered_bytes_per_ip max_buffered_bytes_total body_read_timeout linger_timeout "
    "linger_bytes max_requests_per_turn default_cost max_rate_buckets sender_burst",
    "cache": "memory_bytes max_entry_bytes logs_bytes redis_max_entry_bytes "
    "redis_ttl_unfinalized redis_lock_ttl redis_timeout redis_connect_timeout "
    "redis_retry_interval redis_max_connections",
    "pool": "deadline max_attempts probe_interval ws_ping_interval ws_max_message_bytes ws_lanes "
    "batch_len "
    "http_keepalive_timeout http_pipeline_depth http_max_answer_bytes capability_ttl",
    "head": "poll_near interval_alpha interval_min_factor poll_min_interval poll_probe_every "
    "max_ahead_blocks syncing_every fallback_interval",
    "filters": "idle_timeout max_filters max_changes max_changes_total max_per_ip max_addresses "
    "max_topics_per_position",
    "logs": "max_addresses max_topics_per_position max_answer_bytes split_concurrency",
    "subscriptions": "max_per_connection max_per_ip max_total max_log_filters "
    "max_log_filters_per_ip max_held_notifications max_held_bytes pending_tx_fetches "
    "slow_close_grace follow_recent_blocks max_block_fills filled_blocks_remembered "
    "fill_window_at_once fill_window_after_misses "
    "feed_fetch_retry_delay feed_fetch_attempts "
    "feed_block_passes feed_receipts_retry_blocks pending_max_message",
    "tree": "parents_k backlog_frames backlog_bytes child_queue_frames child_queue_bytes "
    "child_buffer_bytes dedup_entries max_frame_bytes max_payload_bytes max_children "
    "stale_positions probe_interval degrade_factor connect_timeout retry_delay retry_max "
    "ping_interval probe_timeout probe_failures_down link_failures_down link_check_interval "
    "hello_timeout stall_rounds offered_max_bytes anon_per_address anon_max_sessions "
    "anon_idle_addresses",
    "batches": "max_payload_bytes commit_max_batches commit_max_bytes max_in_flight "
    "recent_hashes relay_ack_timeout backlog_frames backlog_bytes order_max_held "
    "order_max_held_bytes order_wait child_queue_frames fetch_rounds range_max_frames "
    "range_max_bytes range_timeout",
    "nitro": "max_message_bytes order_max_held order_max_held_bytes gap_wait retry_delay "
    "retry_max connect_timeout max_connections_per_ip max_connections send_queue_messages "
    "send_timeout write_buffer_bytes recent_messages range_page range_cache_bytes range_loads "
    "log_keep_messages log_keep_seconds log_trim_interval",
}


def test_exactly_the_bounded_keys_must_be_positive_with_one_message() -> None:
    refused: set[str] = set()
    cfg = Config()
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            default = getattr(values, f.name)
            if isinstance(default, bool) or not isinstance(default, int | float):
                continue
            try:
                loads(f"[{section.name}]\n{f.name} = 0\n" + UPSTREAM)
            except ConfigError as exc:
                if str(exc) == f"{section.name}.{f.name}: must be positive":
                    refused.add(f"{section.name}.{f.name}")
    expected = {f"{s}.{k}" for s, keys in POSITIVE_KEYS.items() for k in keys.split()}
    assert refused == expected


def test_tiers_are_named_tables_and_the_default_tier_is_always_there() -> None:
    cfg = loads("[tiers.pro]\nmax_batch_len = 50\n" + UPSTREAM, {})
    assert cfg.tiers["pro"].max_batch_len == 50
    assert cfg.tiers[defaults.DEFAULT_TIER].max_batch_len == defaults.MAX_BATCH_LEN
