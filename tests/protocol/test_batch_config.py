"""The [batches] section: streams, the ingress's log and keys, limits, and the shipped
batch tree configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from chainrelay.config import load, loads
from chainrelay.errors import ConfigError

BATCH_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "batches").glob("*.toml"))
SEQUENCER = "0x" + "ab" * 20
API_KEY = "0123456789abcdef0123"
UPSTREAM = '[[upstreams]]\nurl = "http://127.0.0.1:8545"\n'
STREAM = f'[[batches.streams]]\nname = "arbitrum/batches"\nsequencers = ["{SEQUENCER}"]\n'
INGRESS = f'[batches]\nlog = "/tmp/x.sqlite"\napi_keys = ["{API_KEY}"]\n'


def test_an_ingress_takes_its_streams_keys_and_limits() -> None:
    cfg = loads(UPSTREAM + INGRESS + "max_payload_bytes = 4096\norder_wait = 0.5\n" + STREAM)
    b = cfg.batches
    assert b.log == "/tmp/x.sqlite" and b.api_keys == [API_KEY]
    assert (b.max_payload_bytes, b.order_wait) == (4096, 0.5)
    (st,) = b.streams
    assert (st.name, st.chain_id, st.sequencers, st.first_seq) == (
        "arbitrum/batches",
        0,
        [SEQUENCER],
        0,
    )


def test_a_batches_only_relay_needs_no_block_origin_to_trust() -> None:
    text = '[[tree.parents]]\nurl = "ws://127.0.0.1:9000/feed"\n' + STREAM
    cfg = loads(text)
    assert [u.url for u in cfg.upstreams] == ["http://127.0.0.1:9000"]
    with pytest.raises(ConfigError, match=r"tree\.trust"):
        loads('[[tree.parents]]\nurl = "ws://127.0.0.1:9000/feed"\n')


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (INGRESS, "batches.log: an ingress needs batches.streams"),
        ('[batches]\nlog = "/tmp/x"\n' + STREAM, "batches.api_keys"),
        ('[batches]\nlog = "/tmp/x"\napi_keys = ["short"]\n' + STREAM, "at least 16"),
        ('[[batches.streams]]\nname = "arbitrum/batches"\n', "sequencers"),
        (
            '[[batches.streams]]\nname = "Arbitrum Batches"\nsequencers = ["' + SEQUENCER + '"]\n',
            "name",
        ),
        ('[[batches.streams]]\nname = "a/b"\nsequencers = ["0x12"]\n', "sequencers\\[0\\]"),
        (STREAM + STREAM, "named twice"),
        (STREAM + "first_seq = -1\n", "must not be negative"),
        ("[batches]\nmax_payload_bytes = 0\n" + STREAM, "batches.max_payload_bytes"),
        ("[batches]\norder_wait = 0\n" + STREAM, "batches.order_wait"),
        ("[batches]\nmax_payload_bytes = 99999999\n" + STREAM, "tree.max_frame_bytes"),
        ("[batches]\nlogg = 1\n", "batches.logg"),
        ("[limits]\nmax_body_bytes = 4096\n" + INGRESS + STREAM, "limits.max_body_bytes"),
        ("[batches]\nrecent_hashes = 10\nmax_in_flight = 11\n" + STREAM, "recent_hashes"),
        # Every worker would take pushes and write the one log.
        ('[server]\nlisten = "127.0.0.1:8600"\nworkers = 2\n' + INGRESS + STREAM, "workers"),
    ],
)
def test_bad_batch_settings_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loads(UPSTREAM + text)


@pytest.mark.skipif(not BATCH_CONFIGS, reason="no configs/batches/*.toml")
@pytest.mark.parametrize("path", BATCH_CONFIGS, ids=[p.name for p in BATCH_CONFIGS])
def test_every_shipped_batch_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAINRELAY_BATCH_KEY", API_KEY)
    monkeypatch.setenv("SEQUENCER_ADDRESS", SEQUENCER)
    monkeypatch.setenv("ARBITRUM_RPC_URL", "https://arb1.example")
    cfg = load(path)
    (st,) = cfg.batches.streams
    assert st.sequencers == [SEQUENCER] and st.chain_id == 42161
    assert bool(cfg.batches.log) == path.name.startswith("ingress")
