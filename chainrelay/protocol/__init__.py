"""Sans-I/O protocol logic: method policy, chain profiles. No asyncio here."""
