"""Configuration: TOML files, loaded in a fixed order.

read → expand ``${ENV}`` in string values → strict decode (an unknown key is an error naming
its full path) → defaults (each field names its value in ``defaults.py``) → validate.
``chainrelay validate FILE`` runs exactly this.

Each section is a dataclass in ``sections.py`` and checks itself (``check``); ``Config.check``
runs them and then the few rules that span sections. This package imports no service:
services import their section from here.
"""

from __future__ import annotations

import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from chainrelay import defaults as d
from chainrelay.config.checks import require
from chainrelay.config.decode import decode, expand_env, expand_values
from chainrelay.config.sections import (
    CACHE_BACKENDS,
    FOLLOW_MODES,
    REDIS_SCHEMES,
    AuthConfig,
    BatchesConfig,
    BatchStreamConfig,
    CacheConfig,
    ChainConfig,
    ClientKeyConfig,
    FiltersConfig,
    HeadConfig,
    LimitsConfig,
    LogsConfig,
    MethodsConfig,
    NitroConfig,
    NitroInputConfig,
    PoolConfig,
    ServerConfig,
    SubscriptionsConfig,
    TierConfig,
    TreeConfig,
    TreeParentConfig,
    UpstreamConfig,
    check_client_keys,
    check_upstreams,
    parse_listen,
)
from chainrelay.errors import ConfigError

__all__ = [
    "CACHE_BACKENDS",
    "FOLLOW_MODES",
    "REDIS_SCHEMES",
    "AuthConfig",
    "BatchStreamConfig",
    "BatchesConfig",
    "CacheConfig",
    "ChainConfig",
    "ClientKeyConfig",
    "Config",
    "FiltersConfig",
    "HeadConfig",
    "LimitsConfig",
    "LogsConfig",
    "MethodsConfig",
    "NitroConfig",
    "NitroInputConfig",
    "PoolConfig",
    "ServerConfig",
    "SubscriptionsConfig",
    "TierConfig",
    "TreeConfig",
    "TreeParentConfig",
    "UpstreamConfig",
    "expand_env",
    "load",
    "load_keys",
    "loads",
    "parse_listen",
    "quick",
    "validate",
]

# Bytes a batch push or a batch's frame carries beyond its payload (headers, signature).
_BATCH_OVERHEAD = 1024


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    chain: ChainConfig = field(default_factory=ChainConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    subscriptions: SubscriptionsConfig = field(default_factory=SubscriptionsConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    batches: BatchesConfig = field(default_factory=BatchesConfig)
    upstreams: list[UpstreamConfig] = field(default_factory=list)
    # What each tier of clients may ask; the "default" tier is there even when not written.
    tiers: dict[str, TierConfig] = field(default_factory=dict)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    nitro: NitroConfig = field(default_factory=NitroConfig)

    def check(self) -> None:
        """Every section's own rules, then those that span sections. Fills in what is
        derived (upstream and parent names, parents' JSON-RPC URLs, upstreams from parents)."""
        tree, batches = self.tree, self.batches
        tree.check(batch_streams=bool(batches.streams))
        if tree.parents and not self.upstreams:
            # Misses go to the parents' JSON-RPC endpoints, as to any upstream.
            self.upstreams = [UpstreamConfig(url=p.rpc, name=p.name) for p in tree.parents]
        batches.check(taken=tree.streams)
        self.nitro.check([s.name for s in batches.streams], bool(batches.log))
        require(
            not (self.nitro.inputs and not (tree.node_key or tree.node_key_file)),
            "nitro.inputs: an entry node signs the feed's frames with its tree.node_key; set it",
        )
        # POST /batches bodies pass the HTTP body bound first: a legal push must fit it.
        require(
            not (
                batches.log
                and batches.max_payload_bytes + _BATCH_OVERHEAD > self.limits.max_body_bytes
            ),
            "batches.max_payload_bytes: a push must fit in limits.max_body_bytes",
        )
        require(
            not (
                batches.streams
                and batches.max_payload_bytes + _BATCH_OVERHEAD > tree.max_frame_bytes
            ),
            "batches.max_payload_bytes: a batch's frame must fit in tree.max_frame_bytes",
        )
        # Under workers every worker would take pushes and write the log: one must.
        require(
            not (batches.log and self.server.workers > 1),
            "batches.log: an ingress writes its durable log from one process; "
            "set server.workers = 1",
        )
        check_upstreams(self.upstreams)
        self.chain.check()
        self.cache.check()
        self.server.check()
        self.limits.check()
        self.pool.check()
        self.filters.check()
        self.subscriptions.check()
        self.head.check()
        self.methods.check()
        self.logs.check()
        self.tiers.setdefault(d.DEFAULT_TIER, TierConfig())
        for name, tier in self.tiers.items():
            tier.check(name)
        load_keys(self)  # the keys file too: a node that would refuse it does not start


@dataclass
class _KeysFile:
    """What ``auth.keys_file`` holds: ``[[keys]]`` tables, as ``[[auth.keys]]``."""

    keys: list[ClientKeyConfig] = field(default_factory=list)


def load_keys(cfg: Config) -> list[ClientKeyConfig]:
    """Every API key: the config's, then its keys file's (read now: the node reads it again
    on SIGHUP), checked together. ``${ENV}`` expands in the file's strings too."""
    auth = cfg.auth
    keys = list(auth.keys)
    path = "auth.keys"
    if auth.keys_file:
        p = Path(auth.keys_file)
        try:
            raw = tomllib.loads(p.read_text())
        except OSError as exc:
            raise ConfigError(f"auth.keys_file: {p}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"auth.keys_file: {p}: not valid TOML: {exc}") from None
        got: _KeysFile = decode(_KeysFile, expand_values(raw, None), str(p))
        keys += got.keys
        path = f"auth.keys + {p}: keys"
    check_client_keys(keys, cfg.tiers.keys() or {d.DEFAULT_TIER}, path)
    return keys


def validate(cfg: Config) -> Config:
    cfg.check()
    return cfg


def loads(text: str, env: typing.Mapping[str, str] | None = None) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    cfg: Config = decode(Config, expand_values(raw, env))
    return validate(cfg)


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
