"""Wire formats shared across capabilities: JSON-RPC and WebSocket frame headers."""
