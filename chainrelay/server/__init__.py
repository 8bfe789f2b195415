"""The front door: HTTP and WebSocket on one port, the fast paths for repeated calls, and
who is asking (client address, relays passed through)."""
