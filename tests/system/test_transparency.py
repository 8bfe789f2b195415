"""Transparency: behind a relay, every recorded request gets the recorded response.

Each corpus of ``tests/corpora`` is replayed by a fake upstream
(``tests.lab.recorded_upstream``, the only kind of upstream that can answer as those nodes
did); a relay process sits in front of it, and every recorded request is sent through the
relay twice - the second time mostly from its cache - and each answer is compared with the
recorded response as parsed JSON, the id aside (the relay must return the caller's id).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chainrelay.devnet import free_port
from tests.lab.corpora import CORPORA, Exchange, corpus_dir, load
from tests.lab.procs import ROOT, Procs, Relay, RelayFactory, rpc, until
from tests.lab.recorded_upstream import NOT_RECORDED, recordings_for
from tests.lab.timing import SECOND

pytestmark = pytest.mark.lab

# The recorded upstream answers only what was recorded: the relay's start-up backfill of
# recent block hashes (lookups by hash of arbitrary blocks) is turned off, so everything
# the relay sends comes from the replayed requests and the head tracker's tag reads.
STATIC_HEAD = "[head]\nbackfill_blocks = 0\n"


def serving(exchanges: list[Exchange]) -> str:
    """The relay's config: every method the recordings call is served (by default a relay
    refuses debug_, txpool_ and unknown methods: access/methods.py), so each recorded
    answer, an upstream's refusal included, comes back as recorded."""
    names = ", ".join(f'"{m}"' for m in sorted({ex.method for ex in exchanges}))
    return f"{STATIC_HEAD}[methods]\nenable = [{names}]\n"


# execution-apis: 232 files, 4 of them with two exchanges (see the corpora's README.md).
EXECUTION_APIS_EXCHANGES = 236
ARB_SEPOLIA_EXCHANGES = 95

# Recordings that no relay can reproduce, each with its reason. Every other exchange must
# come back exactly as recorded.
EXECUTION_APIS_EXCLUDED: dict[str, str] = {}

# erigon rpc-tests write "don't compare" into a recording in two ways (run_tests.py,
# process_response): a response with neither "result" nor "error", and "result": null for a
# value that changes from run to run. Neither is an answer a node gives.
_NO_VALUE = (
    "recorded with neither result nor error (rpc-tests' 'do not compare' placeholder); "
    "replayed verbatim it is a malformed JSON-RPC answer, which the relay must not pass on"
)
ARB_SEPOLIA_EXCLUDED: dict[str, str] = {
    "eth_blockNumber/test_01.json#0": (
        "recorded result null (rpc-tests' 'do not compare' for a value that changes every "
        "block); the relay answers eth_blockNumber from its head, as designed"
    ),
    "eth_call/test_12.json#0": _NO_VALUE,
    "eth_estimateGas/test_01.json#0": _NO_VALUE,
    "eth_estimateGas/test_02.json#0": _NO_VALUE,
    "eth_estimateGas/test_03.json#0": _NO_VALUE,
    "eth_estimateGas/test_04.json#0": _NO_VALUE,
    "eth_estimateGas/test_06.json#0": _NO_VALUE,
    "eth_estimateGas/test_07.json#0": _NO_VALUE,
    "eth_estimateGas/test_08.json#0": _NO_VALUE,
    "eth_estimateGas/test_10.json#0": _NO_VALUE,
}

# The relay's head tracker asks for these tags; the arb-sepolia recordings hold no answer
# for them, so the replay says "not recorded" and the relay falls back to its profile depth.
ARB_SEPOLIA_UNRECORDED_TAGS = [
    {"method": "eth_getBlockByNumber", "params": ["finalized", False]},
    {"method": "eth_getBlockByNumber", "params": ["safe", False]},
]


def block_fill(request: dict[str, Any]) -> bool:
    """Whether a forwarded request is the node's own fill of a block a client's receipt or
    transaction miss named (chainrelay/chain/fill.py), which no recording asked."""
    method, params = request["method"], request["params"]
    if method == "eth_getBlockReceipts":
        return len(params) == 1 and isinstance(params[0], str)
    return method == "eth_getBlockByHash" and len(params) == 2 and params[1] is True


def never_recorded(stats: dict[str, Any]) -> list[Any]:
    """What the relay forwarded that no recording holds, but for its own block fills."""
    return [u for u in stats["unmatched"] if not block_fill(u)]


def corpora_root() -> Path:
    """The corpora folder; they live in the repository, so a missing one is a failure."""
    assert CORPORA.is_dir(), f"recorded corpora not found at {CORPORA}"
    return CORPORA


async def start_recorded_upstream(procs: Procs, tmp_path: Path, corpus: str, root: Path) -> str:
    """Start ``tests.lab.recorded_upstream`` for ``corpus``; its URL once it answers."""
    port = free_port()
    log_path = tmp_path / f"recorded-{corpus}-{port}.log"
    with log_path.open("ab") as log:
        proc = procs.spawn(
            [
                sys.executable,
                "-m",
                "tests.lab.recorded_upstream",
                "--port",
                str(port),
                "--corpus",
                corpus,
                "--root",
                str(root),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{port}"

    async def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"recorded upstream exited: {log_path.read_text()[-3000:]}")
        try:
            got = await rpc(url, "eth_chainId")
        except (aiohttp.ClientError, OSError):
            return False
        return "result" in got

    await until(answers, 20 * SECOND, f"the recorded {corpus} upstream to answer")
    return url


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return json.loads(await r.read())


async def replay(url: str, exchanges: list[Exchange], first_id: int) -> list[Any]:
    """Send every recorded request, one after the other, each with a fresh id."""
    answers: list[Any] = []
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        for i, ex in enumerate(exchanges):
            body = json.dumps({**ex.request, "id": first_id + i})
            async with s.post(url, data=body, headers=headers) as r:
                answers.append(json.loads(await r.read()))
    return answers


def without_id(doc: Any) -> Any:
    return {k: v for k, v in doc.items() if k != "id"} if isinstance(doc, dict) else doc


def differences(
    exchanges: list[Exchange], answers: list[Any], first_id: int, excluded: dict[str, str]
) -> list[str]:
    """One line per exchange whose answer is not the recorded response (ids aside)."""
    out: list[str] = []
    for i, (ex, got) in enumerate(zip(exchanges, answers, strict=True)):
        if not isinstance(got, dict) or got.get("id") != first_id + i:
            out.append(f"{ex.name}: answered {str(got)[:200]} to id {first_id + i}")
        elif ex.name not in excluded and without_id(got) != without_id(ex.response):
            want = json.dumps(without_id(ex.response), sort_keys=True)
            have = json.dumps(without_id(got), sort_keys=True)
            pairs = enumerate(zip(want, have, strict=False))
            at = next((j for j, (a, b) in pairs if a != b), min(len(want), len(have)))
            out.append(
                f"{ex.name} ({ex.method}): recorded ...{want[max(0, at - 60) : at + 140]} "
                f"!= relayed ...{have[max(0, at - 60) : at + 140]}"
            )
    return out


async def relay_counts(relay: Relay) -> tuple[float, float]:
    """(answers served from the cache, calls the relay sent upstream) so far."""
    m = await relay.metrics()
    hits = sum(
        v
        for k, v in m.items()
        if k.startswith("chainrelay_requests_total{") and 'outcome="hit"' in k
    )
    upstream = sum(v for k, v in m.items() if k.startswith("chainrelay_upstream_calls_total{"))
    return hits, upstream


async def replay_twice(
    relay: Relay, exchanges: list[Exchange], excluded: dict[str, str]
) -> tuple[list[Any], list[Any]]:
    """Both passes, checked against the recordings; returns the two passes' answers."""
    assert set(excluded) <= {ex.name for ex in exchanges}, "an exclusion names no exchange"
    second_id = 1_000_001  # distinct ids, so an answer carrying another call's id shows
    hits0, up0 = await relay_counts(relay)
    first = await replay(relay.url, exchanges, 1)
    hits1, up1 = await relay_counts(relay)
    second = await replay(relay.url, exchanges, second_id)
    hits2, up2 = await relay_counts(relay)
    diffs1 = differences(exchanges, first, 1, excluded)
    diffs2 = differences(exchanges, second, second_id, excluded)
    compared = len(exchanges) - len(excluded)
    print(
        f"\n{len(exchanges)} recorded exchanges, {len(excluded)} excluded, {compared} compared "
        f"twice: {compared - len(diffs1)} matched in pass 1, {compared - len(diffs2)} in pass 2; "
        f"cache hits {hits1 - hits0:.0f} then {hits2 - hits1:.0f}; upstream calls "
        f"{up1 - up0:.0f} then {up2 - up1:.0f}"
    )
    diffs = diffs1 + [f"second pass: {d}" for d in diffs2]
    assert not diffs, f"{len(diffs)} answers differ from the recordings:\n" + "\n".join(diffs)
    # The second pass is served largely from the cache: more hits, fewer upstream calls.
    assert hits2 - hits1 > hits1 - hits0
    assert up2 - up1 < up1 - up0
    return first, second


def names_by_hash(request: dict[str, Any]) -> bool:
    """Whether a forwarded request names its block by an EIP-1898 {"blockHash": ...}."""
    return any(isinstance(p, dict) and "blockHash" in p for p in request["params"])


async def wait_finality(relay: Relay) -> int:
    """The relay's finalized block, once its head tracker has settled on one."""
    found: list[int] = []

    async def known() -> bool:
        body = await get_json(relay.url + "/health")
        found[:] = [body.get("finalized")]
        return isinstance(found[0], int) and found[0] >= 0

    await until(known, 10 * SECOND, "the relay to learn a finalized block")
    return found[0]


async def test_execution_apis_recordings_pass_through_relay(
    procs: Procs, tmp_path: Path, relay_factory: RelayFactory
) -> None:
    root = corpora_root()
    exchanges = load("execution-apis", root)
    assert len(exchanges) == EXECUTION_APIS_EXCHANGES
    assert len({ex.source for ex in exchanges}) == 232
    upstream = await start_recorded_upstream(procs, tmp_path, "execution-apis", root)
    relay = await relay_factory([upstream], serving(exchanges))
    # The recorded chain is final up to its head (0x36): latest/safe/finalized are block 54.
    assert await wait_finality(relay) == 0x36

    await replay_twice(relay, exchanges, EXECUTION_APIS_EXCLUDED)

    stats = await get_json(upstream + "/stats")
    assert stats["conflicts"] == {}
    assert never_recorded(stats) == [], "the relay forwarded requests that were never recorded"
    # Tags the relay resolved reached the replay as concrete blocks, and still matched; the
    # whole recorded chain is final, so each was named by its hex number.
    assert stats["rewritten"], "no request reached the replay with its tag resolved"
    assert not [r for r in stats["rewritten"] if names_by_hash(r)]


async def test_arb_sepolia_recordings_pass_through_relay(
    procs: Procs, tmp_path: Path, relay_factory: RelayFactory
) -> None:
    root = corpora_root()
    assert corpus_dir("arb-sepolia", root).is_dir()
    exchanges = load("arb-sepolia", root)
    assert len(exchanges) == ARB_SEPOLIA_EXCHANGES
    placeholders = {ex.name for ex in exchanges if not {"result", "error"} & set(ex.response)}
    assert placeholders == {n for n, why in ARB_SEPOLIA_EXCLUDED.items() if why is _NO_VALUE}
    upstream = await start_recorded_upstream(procs, tmp_path, "arb-sepolia", root)
    relay = await relay_factory([upstream], serving(exchanges))
    # No recorded "finalized": the relay keeps its profile's depth below the head, so
    # "latest" stays unfinalized and is forwarded by block hash for state methods.
    head = (await get_json(upstream + "/stats"))["head"]
    assert 0 <= await wait_finality(relay) < head

    first, second = await replay_twice(relay, exchanges, ARB_SEPOLIA_EXCLUDED)

    by_name = {ex.name: i for i, ex in enumerate(exchanges)}
    for answers in (first, second):
        got = answers[by_name["eth_blockNumber/test_01.json#0"]]
        assert got["result"] == hex(head)
        for name, reason in ARB_SEPOLIA_EXCLUDED.items():
            if reason is _NO_VALUE:
                assert "error" in answers[by_name[name]], name
    stats = await get_json(upstream + "/stats")
    assert stats["conflicts"] == {}
    unmatched = [u for u in never_recorded(stats) if u not in ARB_SEPOLIA_UNRECORDED_TAGS]
    assert unmatched == [], "the relay forwarded requests that were never recorded"
    # "latest" is not final here: state methods reach the upstream as {"blockHash": head}
    # (an upstream not declared one node: head_by_number is off).
    by_hash = {r["method"] for r in stats["rewritten"] if names_by_hash(r)}
    assert by_hash == {"eth_getCode", "eth_getTransactionCount", "eth_call"}


def test_replay_knows_blocks_however_the_relay_names_them() -> None:
    """The oracle itself, without processes: the forms a relay forwards a resolved tag in
    get the recorded answer, and a different block does not."""
    root = corpora_root()
    rec = recordings_for("execution-apis", root)
    chain = rec.chain
    # Hashes decoded from chain.rlp agree with the recorded blocks' parent links.
    for number, forms in chain.blocks.items():
        for block in forms.values():
            if number > 0:
                assert chain.numbers[block["parentHash"].lower()] == number - 1

    def ask(method: str, params: list[Any]) -> Any:
        return rec.answer({"jsonrpc": "2.0", "id": 7, "method": method, "params": params})

    addr = "0x7dcd17433742f4c0ca53122ab541d0ba67fc27df"
    (recorded,) = [
        ex.response
        for ex in load("execution-apis", root)
        if ex.source == "eth_getBalance/get-balance.io"
    ]
    want = {**recorded, "id": 7}
    head = chain.block(0x36, full=True)
    assert head is not None
    for ref in ("latest", "finalized", "0x36", head["hash"], {"blockHash": head["hash"]}):
        assert ask("eth_getBalance", [addr, ref]) == want, ref
    assert ask("eth_getBalance", [addr, {"blockNumber": "0x36"}]) == want
    assert ask("eth_getBalance", [addr]) == want
    for other in ("0x35", "pending", {"blockHash": "0x" + "11" * 32}):
        assert ask("eth_getBalance", [addr, other])["error"]["code"] == NOT_RECORDED, other

    # What a head tracker asks: the hashes-only head, derived from the recorded full block.
    latest = ask("eth_getBlockByNumber", ["latest", False])["result"]
    assert latest == {**head, "transactions": [tx["hash"] for tx in head["transactions"]]}
    assert latest["transactions"] and all(isinstance(h, str) for h in latest["transactions"])
    assert ask("eth_getBlockByHash", [head["hash"], False])["result"] == latest
    assert ask("eth_getBlockByHash", [head["hash"], True])["result"] == head
    assert rec.conflicts == {}
