"""Upstream JSON-RPC endpoints: one client per endpoint (HTTP or WebSocket) and the pool
that chooses among them, retries, hedges and probes."""
