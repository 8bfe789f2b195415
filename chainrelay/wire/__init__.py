"""Sans-I/O wire formats: JSON-RPC 2.0 framing and id splicing. No asyncio here."""
