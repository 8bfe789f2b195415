"""``[nitro]`` and ``[[nitro.inputs]]``: what an entry node and a leaf need, each mistake
named by its key; the shipped examples in configs/nitro validate."""

from __future__ import annotations

from pathlib import Path

import pytest

from chainrelay import defaults
from chainrelay.config import load, loads
from chainrelay.errors import ConfigError

UPSTREAM = '[[upstreams]]\nurl = "http://127.0.0.1:8545"\n'
ENTRY = "0x" + "11" * 20
STREAM = (
    f'[[batches.streams]]\nname = "arbitrum/nitro-feed"\nchain_id = 42161\n'
    f'sequencers = ["{ENTRY}"]\n'
)
INGRESS = '[batches]\nlog = "/tmp/x.sqlite"\napi_keys = ["a-long-enough-api-key"]\n'
NODE_KEY = '[tree]\nnode_key = "0x' + "22" * 32 + '"\n'
INPUT = '[[nitro.inputs]]\nurl = "wss://arb1-feed.arbitrum.io/feed"\n'
CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "nitro").glob("*.toml"))


def test_defaults_are_nitros_port_and_the_stream() -> None:
    cfg = loads(UPSTREAM + STREAM)
    assert cfg.nitro.listen == defaults.NITRO_LISTEN == ":9642"
    assert cfg.nitro.stream == "arbitrum/nitro-feed" and not cfg.nitro.inputs


def test_an_entry_node_is_accepted() -> None:
    cfg = loads(UPSTREAM + NODE_KEY + INGRESS + STREAM + INPUT)
    assert [i.url for i in cfg.nitro.inputs] == ["wss://arb1-feed.arbitrum.io/feed"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (NODE_KEY + INGRESS + STREAM.replace("nitro-feed", "batches") + INPUT, "nitro.stream"),
        (NODE_KEY + STREAM + INPUT, "nitro.inputs: an entry node keeps"),  # no log
        (INGRESS + STREAM + INPUT, "tree.node_key"),  # nothing to sign with
        (NODE_KEY + INGRESS + STREAM + '[[nitro.inputs]]\nurl = "http://x"\n', "inputs\\[0\\]"),
        ('[nitro]\nallowed_signers = ["0x12"]\n', "allowed_signers\\[0\\]"),
        ('[nitro]\nlisten = "9642"\n', "nitro.listen"),
        ("[nitro]\nsend_queue_messages = 0\n", "nitro.send_queue_messages"),
        ("[nitro]\nretry_delay = 10.0\nretry_max = 1.0\n", "retry_delay"),
        ("[nitro]\nlistn = 1\n", "nitro.listn"),
    ],
)
def test_bad_nitro_settings_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loads(UPSTREAM + text)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_nitro_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ARBITRUM_RPC_URL": "https://arb1.example",
        "CHAINRELAY_BATCH_KEY": "a-long-enough-api-key",
        "ENTRY_EU_ADDRESS": ENTRY,
        "ENTRY_US_ADDRESS": "0x" + "33" * 20,
        "ARBITRUM_FEED_SIGNER": "0x" + "44" * 20,
    }.items():
        monkeypatch.setenv(name, value)
    cfg = load(path)
    assert cfg.nitro.listen == "0.0.0.0:9642"
    assert bool(cfg.nitro.inputs) == path.name.startswith("entry")


def test_there_are_shipped_configs() -> None:
    assert len(CONFIGS) == 2
