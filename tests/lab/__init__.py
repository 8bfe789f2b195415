"""The test lab: real processes (anvil, redis-server, relay nodes) started and cleaned up by PID."""
