"""The [tree] section: roles from config, derived upstreams, and the shipped tree configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eth_account import Account
from eth_typing import HexStr

from chainrelay.config import load, loads
from chainrelay.errors import ConfigError
from chainrelay.tree.auth import ChildKeys, Credentials
from chainrelay.tree.origin import load_credentials, load_signer

TREE_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "tree").glob("*.toml"))
KEY = "0x" + "11" * 32
ADDRESS = Account.from_key(KEY).address
UPSTREAM = '[[upstreams]]\nurl = "http://a:1"\n'
PARENTS = f"""
[tree]
trust = ["{ADDRESS}"]
[[tree.parents]]
url = "ws://10.0.0.2:8545/feed"
region = "us"
[[tree.parents]]
name = "asia"
url = "wss://asia.example/feed"
rpc = "https://asia.example/rpc"
region = "asia"
"""


def test_parents_become_upstreams_when_none_are_listed() -> None:
    cfg = loads(PARENTS)
    assert [(u.name, u.url) for u in cfg.upstreams] == [
        ("parent0", "http://10.0.0.2:8545"),
        ("asia", "https://asia.example/rpc"),
    ]
    assert cfg.tree.enabled and cfg.tree.parents_k == 2


def test_listed_upstreams_are_kept_beside_parents() -> None:
    cfg = loads(PARENTS + '[[upstreams]]\nurl = "http://127.0.0.1:1"\n')
    assert [u.url for u in cfg.upstreams] == ["http://127.0.0.1:1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (PARENTS.replace(f'trust = ["{ADDRESS}"]', "trust = []"), "tree.trust: a node"),
        (PARENTS.replace(ADDRESS, "0x1234"), r"tree.trust\[0\]"),
        (PARENTS.replace("ws://10.0.0.2", "http://10.0.0.2"), r"tree.parents\[0\].url"),
        (PARENTS.replace('rpc = "https://', 'rpc = "ftp://'), r"tree.parents\[1\].rpc"),
        (PARENTS.replace('name = "asia"', 'name = "parent0"'), "names must be unique"),
        ("[tree]\nparents_k = 0\n" + '[[upstreams]]\nurl = "http://a:1"\n', "tree.parents_k"),
        ('[tree]\nstreams = ["BSC blocks"]\n[[upstreams]]\nurl = "http://a:1"\n', "streams"),
        (f'[tree]\nkey = "{KEY}"\nkey_file = "k"\n[[upstreams]]\nurl = "http://a:1"\n', "not both"),
        ("[tree]\nbacklog_bytes = -1\n" + '[[upstreams]]\nurl = "http://a:1"\n', "backlog_bytes"),
        (
            "[tree]\nchild_queue_bytes = 1000\nmax_frame_bytes = 2000\n"
            + '[[upstreams]]\nurl = "http://a:1"\n',
            "child_queue_bytes: must be at least",
        ),
        ('[tree]\nchild_keys = ["short"]\n' + UPSTREAM, r"tree.child_keys\[0\]: expected"),
        ('[tree]\nchild_keys = ["0x1234"]\n' + UPSTREAM, r"tree.child_keys\[0\]: expected"),
        (
            f'[tree]\nnode_key = "{KEY}"\nnode_secret = "{"s" * 16}"\n' + UPSTREAM,
            "give one of node_key",
        ),
        ('[tree]\nnode_secret = "too short"\n' + UPSTREAM, "tree.node_secret: at least"),
        (f'[tree]\nnode_secret = "{ADDRESS}"\n' + UPSTREAM, "tree.node_secret: at least"),
        ("[tree]\nanon_reconnect_cooldown = -1\n" + UPSTREAM, "anon_reconnect_cooldown"),
        ("[tree]\nanon_per_address = 0\n" + UPSTREAM, "tree.anon_per_address: must be"),
    ],
)
def test_bad_tree_settings_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loads(text)


def test_origin_keys_load_as_eth_account_loads_them(tmp_path: Path) -> None:
    hex_cfg = loads(f'[tree]\nkey = "{KEY}"\n[[upstreams]]\nurl = "http://a:1"\n')
    signer = load_signer(hex_cfg.tree)
    assert signer is not None and "0x" + signer.address.hex() == ADDRESS.lower()
    keystore = tmp_path / "origin.json"
    keystore.write_text(json.dumps(Account.encrypt(HexStr(KEY), "pw", kdf="pbkdf2", iterations=2)))
    ks_cfg = loads(
        f'[tree]\nkey_file = "{keystore}"\nkey_password = "pw"\n[[upstreams]]\nurl = "http://a:1"\n'
    )
    ks = load_signer(ks_cfg.tree)
    assert ks is not None and ks.address == signer.address
    ks_cfg.tree.key_password = "wrong"
    with pytest.raises(ConfigError, match="cannot decrypt"):
        load_signer(ks_cfg.tree)
    assert load_signer(loads('[[upstreams]]\nurl = "http://a:1"\n').tree) is None
    with pytest.raises(ConfigError, match="not a secp256k1"):
        load_signer(loads('[tree]\nkey = "0x12"\n[[upstreams]]\nurl = "http://a:1"\n').tree)


def test_child_keys_and_node_credentials_load_from_config(tmp_path: Path) -> None:
    secret = "a secret the relays share"
    cfg = loads(f'[tree]\nchild_keys = ["{ADDRESS}", "{secret}"]\n' + UPSTREAM)
    keys = ChildKeys.of(cfg.tree.child_keys)
    assert keys.addresses == {bytes.fromhex(ADDRESS[2:])} and keys.secrets == (
        (1, secret.encode()),
    )
    assert not load_credentials(cfg.tree)  # a parent with keys proves nothing itself
    keyed = load_credentials(loads(f'[tree]\nnode_key = "{KEY}"\n' + UPSTREAM).tree)
    assert keyed.signer is not None and "0x" + keyed.signer.address.hex() == ADDRESS.lower()
    key_file = tmp_path / "node.key"
    key_file.write_text(KEY + "\n")
    from_file = load_credentials(loads(f'[tree]\nnode_key_file = "{key_file}"\n' + UPSTREAM).tree)
    assert from_file.signer is not None and from_file.signer.address == keyed.signer.address
    shared = load_credentials(loads(f'[tree]\nnode_secret = "{secret}"\n' + UPSTREAM).tree)
    assert isinstance(shared, Credentials) and shared.signer is None and shared
    with pytest.raises(ConfigError, match=r"tree\.node_key: not a secp256k1"):
        load_credentials(loads('[tree]\nnode_key = "0x12"\n' + UPSTREAM).tree)
    with pytest.raises(ConfigError, match=r"tree\.node_key_file"):
        load_credentials(loads(f'[tree]\nnode_key_file = "{tmp_path / "none"}"\n' + UPSTREAM).tree)


@pytest.mark.parametrize("path", TREE_CONFIGS, ids=[p.name for p in TREE_CONFIGS])
def test_every_shipped_tree_config_validates(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAINRELAY_ORIGIN_KEY", KEY)
    monkeypatch.setenv("CHAINRELAY_ORIGIN_ADDRESS", ADDRESS)
    cfg = load(path)
    assert cfg.tree.enabled and cfg.tree.region
    if cfg.tree.parents:
        assert len({p.region for p in cfg.tree.parents}) >= 2  # two regions to choose from
        assert cfg.tree.trust == [ADDRESS]
    else:
        assert load_signer(cfg.tree) is not None


def test_the_tree_example_has_three_regions() -> None:
    regions = set()
    for path in TREE_CONFIGS:
        text = path.read_text()
        regions |= {line.split('"')[1] for line in text.splitlines() if line.startswith("region")}
    assert regions == {"eu", "us", "asia"}
