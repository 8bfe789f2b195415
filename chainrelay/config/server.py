"""The front door's sections: ``[server]`` (where and how many processes listen) and
``[limits]`` (what one request, connection or client may cost)."""

from __future__ import annotations

from dataclasses import dataclass, field

from chainrelay import defaults as d
from chainrelay.config.checks import check_fields, positive, require
from chainrelay.errors import ConfigError


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"server.listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class ServerConfig:
    listen: str = d.LISTEN
    cors_origins: list[str] = field(default_factory=lambda: list(d.CORS_ORIGINS))
    workers: int = positive(d.WORKERS)

    def check(self) -> None:
        _, port = parse_listen(self.listen)
        check_fields(self, "server")
        require(
            self.workers <= 1 or port != 0,
            "server.listen: port 0 gives each worker its own port; name one",
        )


@dataclass
class LimitsConfig:
    max_body_bytes: int = positive(d.MAX_BODY_BYTES)
    max_batch_len: int = positive(d.MAX_BATCH_LEN)
    max_header_bytes: int = d.MAX_HEADER_BYTES
    max_pending_per_connection: int = d.MAX_PENDING_PER_CONNECTION
    max_pending_replies: int = positive(d.MAX_PENDING_REPLIES)
    max_connections_per_ip: int = d.MAX_CONNECTIONS_PER_IP
    keepalive_timeout: float = d.KEEPALIVE_TIMEOUT
    max_ws_message_bytes: int = d.MAX_WS_MESSAGE_BYTES
    max_ws_send_buffer: int = d.MAX_WS_SEND_BUFFER
    ws_close_timeout: float = positive(d.WS_CLOSE_TIMEOUT)
    max_relay_hops: int = positive(d.MAX_RELAY_HOPS)
    max_hit_table_bytes: int = positive(d.MAX_HIT_TABLE_BYTES)
    max_hit_table_entries: int = positive(d.MAX_HIT_TABLE_ENTRIES)
    memo_max_params_bytes: int = positive(d.MEMO_MAX_PARAMS_BYTES)

    def check(self) -> None:
        check_fields(self, "limits")
