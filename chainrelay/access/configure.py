"""The node's ``Door`` from its config: trusted proxies from ``[server]``, keys from
``[auth]`` (read by ``config.load_keys``: at start, and again on SIGHUP)."""

from __future__ import annotations

from chainrelay.access.door import Door
from chainrelay.access.forwarded import Trusted, parse_networks
from chainrelay.access.keys import KeyRing, client_key
from chainrelay.config import ClientKeyConfig, Config


def door_for(cfg: Config, keys: list[ClientKeyConfig]) -> Door | None:
    """The rules that name a request's client; None when there are none beyond the
    connection's address (no trusted proxy, no keys): then no request is asked."""
    server, auth = cfg.server, cfg.auth
    if not server.trusted_proxies and not auth.enabled:
        return None
    ring = None
    if auth.enabled:
        ring = KeyRing((k.key, client_key(k.name, k.tier, k.methods, k.origins)) for k in keys)
    return Door(
        Trusted(parse_networks(server.trusted_proxies)),
        header=server.client_address_header,
        max_hops=server.max_forwarded_hops,
        ipv6_prefix=server.ipv6_prefix,
        keys=ring,
        required=auth.required,
    )
