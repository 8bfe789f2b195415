"""Arbitrum's sequencer feed in Nitro's broadcast format: taken in at an entry node,
carried by the tree as a batch stream, served out at every node in Nitro's own protocol."""
