"""Which methods a client may call: the node's allow list, each tier's, and each key's.

A node on a public URL serves what a dapp needs and nothing of its upstreams' insides: the
reads and writes of the policy table (``rpc/policy.py``), the standard ``net_``/``web3_``
methods, a few standard reads the table passes through uncached (``STANDARD_READS``), and
what the node answers itself (subscriptions, filters). Everything else is refused with
-32601 before it can reach an upstream: the families that reach into a node's internals or
its operator's powers (``GATED_FAMILIES``: tracing, the transaction pool, admin, keys,
mining, the engine API, a devnet's ``anvil_``/``evm_``/``hardhat_`` controls) and methods
that sign with the node's own keys are *disabled* (a known method this node does not serve
to this client), and any other name is *unknown*, in geth's own words.

The lists are written as exact names or whole families (``"debug_*"``) and applied in
order: the defaults, then ``[methods] enable``, ``[methods] disable``, then a tier's
``enable_methods`` and ``disable_methods``; a key's own list (``Identity.methods``) narrows
its tier's further, never widens it.

The hot path asks one question, ``method in names``, of a frozenset made once per tier
(``TierMethods.names``); a method not in it (an enabled family's uncatalogued member, or a
refusal) takes ``MethodRules.refusal``, which decides and words it. Sans-I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from chainrelay.access.identity import Identity
from chainrelay.defaults import DEFAULT_TIER
from chainrelay.rpc.policy import RULES

# Families refused unless enabled: node internals (debug_, trace_, txpool_, admin_),
# the operator's keys and powers (personal_, miner_, engine_), and a devnet's controls,
# which rewrite the chain itself (anvil_setBalance, evm_revert, hardhat_reset).
GATED_FAMILIES = (
    "debug_",
    "trace_",
    "txpool_",
    "admin_",
    "personal_",
    "miner_",
    "engine_",
    "anvil_",
    "evm_",
    "hardhat_",
)
# eth_ methods that sign with the node's own unlocked keys: never a public endpoint's.
NODE_KEY_METHODS = frozenset(
    {
        "eth_sendTransaction",
        "eth_sign",
        "eth_signTransaction",
        "eth_signTypedData",
        "eth_signTypedData_v3",
        "eth_signTypedData_v4",
    }
)
# The standard net_ and web3_ methods (execution-apis, geth).
NET_WEB3 = frozenset(
    {"net_version", "net_listening", "net_peerCount", "web3_clientVersion", "web3_sha3"}
)
# Standard reads outside the policy table, passed through uncached: execution-apis'
# eth_simulateV1, eth_getStorageValues and eth_config, and the legacy reads every client
# still answers (or refuses) itself.
STANDARD_READS = frozenset(
    {
        "eth_accounts",
        "eth_config",
        "eth_simulateV1",
        "eth_getStorageValues",
        "eth_protocolVersion",
        "eth_coinbase",
        "eth_mining",
        "eth_hashrate",
    }
)


def _ungated(names: Iterable[str]) -> frozenset[str]:
    return frozenset(n for n in names if not n.startswith(GATED_FAMILIES))


# What every client may call on a node with no [methods] section: the policy table (but for
# its debug_ traces), eth_sendRawTransaction, eth_subscribe and filters among them.
DEFAULT_METHODS = _ungated(RULES) | NET_WEB3 | STANDARD_READS
# Names that are methods of some client, whatever this node serves: a refusal of one of
# them says "disabled", of any other name "does not exist".
CATALOGUE = frozenset(RULES) | NET_WEB3 | STANDARD_READS | NODE_KEY_METHODS

# A list entry: a method's name, or a family written "<prefix>_*".
ENTRY = re.compile(r"[A-Za-z][A-Za-z0-9]*_([A-Za-z0-9_]+|\*)")

METHOD_NOT_FOUND = -32601


def check_entries(entries: Sequence[str], path: str) -> str | None:
    """What is wrong with a config list of methods (``path`` names it), or None."""
    for i, entry in enumerate(entries):
        if not isinstance(entry, str) or ENTRY.fullmatch(entry) is None:
            return (
                f"{path}[{i}]: {entry!r} is neither a method name (eth_call) "
                'nor a family ("debug_*")'
            )
    return None


@dataclass(frozen=True, slots=True)
class _Step:
    """One list applied in order: its names and families either allowed or refused."""

    allow: bool
    names: frozenset[str]
    families: tuple[str, ...]  # prefixes, "debug_" for "debug_*"

    def matches(self, method: str) -> bool:
        return method in self.names or method.startswith(self.families)


def _step(allow: bool, entries: Iterable[str]) -> _Step:
    names = frozenset(e for e in entries if not e.endswith("*"))
    families = tuple(sorted({e[:-1] for e in entries if e.endswith("*")}))
    return _Step(allow, names, families)


class TierMethods:
    """What the clients of one tier may call: ``names``, the allowed methods the node knows
    of (the hot path's frozenset), and ``allows`` for any name at all."""

    __slots__ = ("_steps", "names")

    def __init__(self, steps: Sequence[_Step], known: Iterable[str]) -> None:
        self._steps = tuple(steps)
        self.names = frozenset(m for m in known if self.allows(m))

    def allows(self, method: str) -> bool:
        allowed = method in DEFAULT_METHODS
        for step in self._steps:
            if step.matches(method):
                allowed = step.allow
        return allowed


@dataclass(frozen=True, slots=True)
class TierLists:
    """A tier's own lists: ``enable`` and ``disable`` (names, or families "debug_*")."""

    enable: Sequence[str] = ()
    disable: Sequence[str] = ()


class MethodRules:
    """The allow lists of every tier, from the node's lists and the tiers' own."""

    # Keys' narrowed lists made so far, by (tier, key's list); keys come from config, so
    # this stays small, and the bound keeps it so whatever hands identities in.
    MAX_NARROWED = 4096

    def __init__(
        self,
        enable: Sequence[str] = (),
        disable: Sequence[str] = (),
        tiers: Mapping[str, TierLists] | None = None,
    ) -> None:
        tiers = dict(tiers or {})
        tiers.setdefault(DEFAULT_TIER, TierLists())
        node = [_step(True, enable), _step(False, disable)]
        named = {e for lists in tiers.values() for e in (*lists.enable, *lists.disable)}
        named |= {*enable, *disable}
        # Every name the config writes is known too: a method disabled by name says so.
        self.known = CATALOGUE | {e for e in named if not e.endswith("*")}
        self.tiers: dict[str, TierMethods] = {
            name: TierMethods(
                [*node, _step(True, lists.enable), _step(False, lists.disable)], self.known
            )
            for name, lists in tiers.items()
        }
        self.default = self.tiers[DEFAULT_TIER]
        # The hot path's table: tier -> its names.
        self.names_by_tier: dict[str, frozenset[str]] = {
            name: t.names for name, t in self.tiers.items()
        }
        self._narrowed: dict[tuple[str, frozenset[str]], frozenset[str]] = {}

    def tier(self, who: Identity) -> TierMethods:
        return self.tiers.get(who.tier, self.default)

    def names(self, who: Identity) -> frozenset[str]:
        """The known methods ``who`` may call (a key's own list applied)."""
        tier = self.tier(who)
        own = who.methods
        if own is None:
            return tier.names
        slot = (who.tier, own)
        got = self._narrowed.get(slot)
        if got is None:
            if len(self._narrowed) >= self.MAX_NARROWED:
                self._narrowed.clear()
            got = self._narrowed[slot] = frozenset(m for m in tier.names if _listed(m, own))
        return got

    def refusal(self, method: str, who: Identity) -> str | None:
        """Why ``who`` may not call ``method`` (the message of a -32601 answer), or None
        when it may: the slow path, for a method not in ``names(who)``."""
        tier = self.tier(who)
        if not tier.allows(method):
            if method in self.known or method.startswith(GATED_FAMILIES):
                return f"the method {method} is disabled on this node"
            return f"the method {method} does not exist/is not available"
        own = who.methods
        if own is not None and not _listed(method, own):
            return f"the method {method} is not enabled for this API key"
        return None


def _listed(method: str, own: frozenset[str]) -> bool:
    """Whether a key's own list names ``method``, by name or by family."""
    if method in own:
        return True
    family = method.split("_", 1)[0] + "_*"
    return family in own
