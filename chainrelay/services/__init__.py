"""Asyncio services, one concern each, each with start/stop."""
