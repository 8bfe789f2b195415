"""Configuration: TOML files, loaded in a fixed order.

read → expand ``${ENV}`` in string values → strict decode (an unknown key is an error naming
its full path) → defaults (from ``defaults.py``) → validate.
``chainrelay validate FILE`` runs exactly this.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chainrelay import defaults as d
from chainrelay.errors import ConfigError
from chainrelay.protocol.chains import PROFILES

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class ServerConfig:
    listen: str = d.LISTEN
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    workers: int = 1


@dataclass
class LimitsConfig:
    max_body_bytes: int = d.MAX_BODY_BYTES
    max_batch_len: int = d.MAX_BATCH_LEN
    max_header_bytes: int = d.MAX_HEADER_BYTES
    max_pending_per_connection: int = d.MAX_PENDING_PER_CONNECTION
    max_connections_per_ip: int = d.MAX_CONNECTIONS_PER_IP
    keepalive_timeout: float = d.KEEPALIVE_TIMEOUT
    max_ws_message_bytes: int = d.MAX_WS_MESSAGE_BYTES
    max_ws_send_buffer: int = d.MAX_WS_SEND_BUFFER


@dataclass
class CacheConfig:
    backend: str = "memory"
    memory_bytes: int = d.CACHE_MEMORY_BYTES
    max_entry_bytes: int = d.CACHE_MAX_ENTRY_BYTES


@dataclass
class ChainConfig:
    # A profile from chainrelay.protocol.chains ("bsc", "arbitrum", "devnet"); empty: by id.
    profile: str = ""
    # Expected chain id; upstreams on another chain are refused. 0: read from upstreams.
    chain_id: int = 0


@dataclass
class UpstreamConfig:
    url: str = ""
    name: str = ""


@dataclass
class PoolConfig:
    timeout: float = d.UPSTREAM_TIMEOUT
    max_attempts: int = d.UPSTREAM_MAX_ATTEMPTS
    hedge: bool = True
    hedge_quantile: float = d.HEDGE_QUANTILE
    hedge_min_delay: float = d.HEDGE_MIN_DELAY
    max_lag_blocks: int = d.MAX_LAG_BLOCKS
    max_consecutive_errors: int = d.MAX_CONSECUTIVE_ERRORS
    probe_interval: float = d.PROBE_INTERVAL
    connections: int = d.UPSTREAM_CONNECTIONS


@dataclass
class HeadConfig:
    reorg_window: int = d.REORG_WINDOW
    finality_refresh_blocks: int = d.FINALITY_REFRESH_BLOCKS
    fresh_blocks: float = d.HEAD_FRESH_BLOCKS


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    upstreams: list[UpstreamConfig] = field(default_factory=list)


def expand_env(text: str, env: typing.Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` (or ``${NAME:-default}``) with the environment's value."""
    env = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set")

    return _ENV.sub(sub, text)


def _decode(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key {where!r}")
    kwargs = {k: _value(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _value(tp: Any, v: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _decode(tp, v, path)  # type: ignore[arg-type]
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(v, list):
            raise ConfigError(f"{path}: expected an array")
        return [_value(inner, x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"{path}: unsupported type")  # pragma: no cover
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if tp in (int, float, str, bool) and (type(v) is not tp):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {type(v).__name__}")
    return v


def validate(cfg: Config) -> Config:
    if not cfg.upstreams:
        raise ConfigError("upstreams: at least one [[upstreams]] entry is needed")
    for i, u in enumerate(cfg.upstreams):
        if not u.url.startswith(("http://", "https://", "ws://", "wss://")):
            raise ConfigError(f"upstreams[{i}].url: expected an http(s):// or ws(s):// URL")
        if not u.name:
            u.name = f"upstream{i}"
    names = [u.name for u in cfg.upstreams]
    if len(set(names)) != len(names):
        raise ConfigError("upstreams: names must be unique")
    if cfg.chain.profile and cfg.chain.profile not in PROFILES:
        raise ConfigError(
            f"chain.profile: unknown profile {cfg.chain.profile!r} (one of {sorted(PROFILES)})"
        )
    if cfg.cache.backend not in ("memory",):
        raise ConfigError(f"cache.backend: unknown backend {cfg.cache.backend!r}")
    parse_listen(cfg.server.listen)
    for path, value in (
        ("limits.max_body_bytes", cfg.limits.max_body_bytes),
        ("limits.max_batch_len", cfg.limits.max_batch_len),
        ("cache.memory_bytes", cfg.cache.memory_bytes),
        ("pool.max_attempts", cfg.pool.max_attempts),
        ("server.workers", cfg.server.workers),
    ):
        if value <= 0:
            raise ConfigError(f"{path}: must be positive")
    return cfg


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"server.listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _expand_values(data: Any, env: typing.Mapping[str, str] | None, path: str) -> Any:
    """Expand ``${ENV}`` inside string values only, so comments may mention variables."""
    if isinstance(data, str):
        try:
            return expand_env(data, env)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    if isinstance(data, dict):
        return {
            k: _expand_values(v, env, f"{path}.{k}" if path else k) for k, v in data.items()
        }
    if isinstance(data, list):
        return [_expand_values(v, env, f"{path}[{i}]") for i, v in enumerate(data)]
    return data


def loads(text: str, env: typing.Mapping[str, str] | None = None) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    return validate(_decode(Config, _expand_values(raw, env, ""), ""))


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: {exc.strerror}") from None
    try:
        return loads(text)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def quick(upstreams: list[str], listen: str = d.LISTEN) -> Config:
    """The config of ``chainrelay serve --upstream URL ...``."""
    cfg = Config()
    cfg.server.listen = listen
    cfg.upstreams = [UpstreamConfig(url=u, name=f"upstream{i}") for i, u in enumerate(upstreams)]
    return validate(cfg)
