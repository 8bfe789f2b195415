"""``chainrelay keygen``: a key file every ``*_file`` setting reads, its address printed,
and never a key written over another."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from eth_account import Account

from chainrelay.cli import main
from chainrelay.config.sections import TreeConfig
from chainrelay.tree.origin import load_signer


def test_keygen_writes_a_private_key_file_and_prints_its_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sequencer.key"
    assert main(["keygen", "--out", str(out)]) == 0
    address = capsys.readouterr().out.strip()
    key = out.read_text().strip()
    assert Account.from_key(key).address == address
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # What an origin's [tree] key_file (and a sequencer's --key-file) reads.
    signer = load_signer(TreeConfig(key_file=str(out)))
    assert signer is not None and "0x" + signer.address.hex() == address.lower()


def test_keygen_never_replaces_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "origin.key"
    assert main(["keygen", "--out", str(out)]) == 0
    before = out.read_text()
    capsys.readouterr()
    assert main(["keygen", "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == before


def test_keygen_without_a_file_prints_a_fresh_key_each_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = set()
    for _ in range(2):
        assert main(["keygen"]) == 0
        lines = dict(line.split() for line in capsys.readouterr().out.splitlines())
        assert Account.from_key(lines["key"]).address == lines["address"]
        seen.add(lines["key"])
    assert len(seen) == 2
