"""An upstream from its config: over WebSocket or HTTP by its URL, with its route and
headers."""

from __future__ import annotations

import base64

from chainrelay.config import PoolConfig, UpstreamConfig
from chainrelay.upstreams.budget import Budget
from chainrelay.upstreams.capabilities import Capabilities
from chainrelay.upstreams.route import ROLES, Route
from chainrelay.upstreams.upstream import HttpUpstream, Upstream
from chainrelay.upstreams.wslink import WsUpstream


def make_upstream(u: UpstreamConfig, pool: PoolConfig, *, via: str = "") -> Upstream:
    """The upstream ``u`` names, over WebSocket or HTTP by its URL, with the pool's
    per-upstream settings and its own route (role, weight, budget, capabilities) and
    headers. A try never outlasts a call's whole deadline: the timeout is the shorter of
    the two (a call's later tries are cut to what is left of it)."""
    timeout = min(pool.timeout, pool.deadline)
    upstream: Upstream
    if u.url.startswith(("ws://", "wss://")):
        upstream = WsUpstream(
            u.name,
            u.url,
            timeout=timeout,
            connections=pool.connections,
            ping_interval=pool.ws_ping_interval,
            max_message_bytes=pool.ws_max_message_bytes,
            via=via,
            lanes=pool.ws_lanes,
        )
    else:
        upstream = HttpUpstream(
            u.name,
            u.url,
            timeout=timeout,
            connections=u.connections or pool.connections,
            via=via,
            pipeline_depth=pool.http_pipeline_depth,
            keepalive=pool.http_keepalive_timeout,
            max_answer_bytes=pool.http_max_answer_bytes,
            accept_encoding=pool.http_accept_encoding,
            ca_file=u.ca_file,
            headers=request_headers(u),
        )
    upstream.route = Route(
        tier=ROLES[u.role],
        weight=u.weight,
        budget=Budget(u.max_rps, u.max_concurrency, auto_tune=pool.auto_tune),
        caps=Capabilities(archive=u.archive, ttl=pool.capability_ttl),
    )
    upstream.headers = request_headers(u)
    upstream.head_by_number = u.head_by_number
    return upstream


def request_headers(u: UpstreamConfig) -> dict[str, str]:
    """The headers ``u`` asks to send: its ``headers`` table, and ``auth`` ("user:pass")
    as HTTP basic auth (an Authorization header of the table wins, and either wins over
    the URL's userinfo)."""
    headers = dict(u.headers)
    if u.auth and not any(k.lower() == "authorization" for k in headers):
        token = base64.b64encode(u.auth.encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return headers
