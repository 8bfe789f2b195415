"""L2 batches: the batch frame, the ingress's sequence rules and durable log, the order in
which relays pass a batch stream on, and replay of any range."""
