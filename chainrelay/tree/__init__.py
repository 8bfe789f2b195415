"""The relay tree: signed frames, the feed session (hello, replay, live), the hub that
fans frames out to children, the links to parents and their choice, the origin that makes
block frames and the intake that takes them in."""
