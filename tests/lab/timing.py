"""One time unit for every wait in the tests, scaled on slow machines (like websockets' MS)."""

import os

# CHAINRELAY_TEST_SLOWDOWN=3 triples every deadline on a slow or loaded machine.
SLOWDOWN = float(os.environ.get("CHAINRELAY_TEST_SLOWDOWN", "1"))
MS = 0.001 * SLOWDOWN
SECOND = 1000 * MS
