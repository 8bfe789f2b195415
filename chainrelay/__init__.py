"""chainrelay: a relay for blockchain ledger sync and JSON-RPC acceleration."""

__version__ = "0.1.0"
