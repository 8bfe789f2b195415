"""The request pipeline: what each method reads and how its answer is cached (``policy``),
the memory and shared caches, coalescing of identical calls, and the service that runs a
call through them."""
