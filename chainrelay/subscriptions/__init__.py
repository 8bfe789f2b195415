"""eth_subscribe and the node's own filters: the sans-I/O tables and log matching, and the
services that feed them from the block follower."""
