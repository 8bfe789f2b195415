"""Per-chain facts the cache and head tracker depend on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ChainProfile:
    name: str
    chain_id: int
    # Seconds between blocks; realtime answers live about this long.
    block_time: float
    # Depth below the head treated as final when an upstream does not answer the
    # "finalized" tag. Chosen on the safe side of each chain's real finality.
    fallback_finality_depth: int
    # Depth below the head treated as "safe" when the tag is missing.
    fallback_safe_depth: int
    # The widest eth_getLogs block range a client may ask ([logs] max_block_range unset).
    logs_max_block_range: int
    # A wider eth_getLogs is asked upstream in chunks of this many blocks ([logs]
    # split_blocks unset): the widest range the chain's usual providers accept.
    logs_split_blocks: int = 10_000


PROFILES: dict[str, ChainProfile] = {
    # BSC: 0.75 s blocks since the Maxwell upgrade; fast finality finalizes in ~2 blocks,
    # and before it the rule of thumb was 15 blocks (2/3 of 21 validators plus one).
    # Logs: 10,000 blocks (about 2 hours), the range BSC's public providers serve; a busy
    # block holds ~2,000 logs. Chunks of 5,000: BSC's public endpoints (bnbchain's,
    # publicnode's) answer "exceed maximum block range: 5000" past it.
    "bsc": ChainProfile("bsc", 56, 0.75, 15, 2, 10_000, 5_000),
    # Arbitrum One: ~0.25 s blocks; "finalized" follows L1 finality (~15-20 min). Without
    # the tag nothing under 30 min (7,200 blocks) is assumed final.
    # Logs: 100,000 blocks (about 7 hours): blocks come 3x as often as BSC's, each holding
    # a few logs. Chunks of 10,000: publicnode's Arbitrum endpoint answers "exceed maximum
    # block range: 10000" past it (dRPC's free tier refuses "ranges over 10000 blocks").
    "arbitrum": ChainProfile("arbitrum", 42161, 0.25, 7200, 240, 100_000, 10_000),
    "bsc-testnet": ChainProfile("bsc-testnet", 97, 0.75, 15, 2, 10_000, 5_000),
    "arbitrum-sepolia": ChainProfile("arbitrum-sepolia", 421614, 0.25, 7200, 240, 100_000, 10_000),
    # A local anvil devnet: one block a second; anvil answers the tags itself. Logs: 100,000
    # blocks, more than a day of a devnet whose blocks are nearly empty; chunks of 10,000
    # (anvil has no cap; the Arbitrum figure, so a devnet splits as a real chain does).
    "devnet": ChainProfile("devnet", 31337, 1.0, 64, 32, 100_000, 10_000),
}

BY_CHAIN_ID: dict[int, ChainProfile] = {p.chain_id: p for p in PROFILES.values()}


def profile_for(name: str | None, chain_id: int | None) -> ChainProfile:
    """The named profile, else the one for ``chain_id``, else the devnet profile."""
    if name:
        return PROFILES[name]
    if chain_id is not None and chain_id in BY_CHAIN_ID:
        return BY_CHAIN_ID[chain_id]
    return PROFILES["devnet"]
