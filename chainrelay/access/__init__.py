"""Who a client is, and what it may ask of the node: identities and the rules on them."""
