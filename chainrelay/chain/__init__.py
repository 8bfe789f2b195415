"""The chain as this node sees it: chain profiles, the head and finality, the order in
which new blocks are fetched, and the block follower that fetches each one once."""
