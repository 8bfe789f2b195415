"""The recorded corpora live in the repository, whole, with their licences.

Every corpus test reads them from ``tests/corpora``; if a folder went missing those tests
would fail (and a skip fails the run, see ``tests/conftest.py``). This checks the data
itself, so a partial copy is named here rather than deep inside a system test.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.lab.corpora import CORPORA, FOLDERS, load

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent

# What the corpus tests count on (tests/system/test_transparency.py holds the same numbers
# for what it replays).
EXECUTION_APIS_FILES = 232
ARB_SEPOLIA_FILES = 95


def test_the_corpora_are_inside_the_repository() -> None:
    assert CORPORA.is_dir()
    assert CORPORA.resolve().is_relative_to(ROOT)
    for folder in FOLDERS.values():
        assert (CORPORA / folder).is_dir(), folder


def test_every_corpus_is_whole() -> None:
    assert len({ex.source for ex in load("execution-apis", CORPORA)}) == EXECUTION_APIS_FILES
    assert len({ex.source for ex in load("arb-sepolia", CORPORA)}) == ARB_SEPOLIA_FILES
    assert (CORPORA / "execution-apis" / "chain.rlp").stat().st_size > 0
    assert (CORPORA / "execution-apis" / "genesis.json").stat().st_size > 0
    mainnet = CORPORA / "erigon-mainnet-block-18000000"
    assert sorted(p.name for p in mainnet.glob("*.json"))
    assert (CORPORA / "arbitrum-one-block-0x1db7fd9c.json").stat().st_size > 0


def test_each_corpus_keeps_its_origin_and_licence() -> None:
    readme = (CORPORA / "README.md").read_text()
    for name in (*FOLDERS.values(), "erigon-mainnet-block-18000000"):
        assert f"`{name}/`" in readme, name
    for folder in ("erigon-arb-sepolia", "erigon-mainnet-block-18000000"):
        assert (CORPORA / folder / "LICENSE-apache-2.0.txt").is_file(), folder
    assert (CORPORA / "execution-apis" / "LICENSE-CC0-1.0.txt").is_file()
    assert (CORPORA / "LICENSE-apache-2.0.txt").is_file()  # the erpc block at the top


def test_nothing_reads_corpora_from_outside_the_repository() -> None:
    """No test, lab module or benchmark names ``shared/`` or skips a corpus test."""
    for folder in (TESTS, ROOT / "benchmarks"):
        for path in folder.rglob("*.py"):
            if path == Path(__file__).resolve():
                continue
            text = path.read_text()
            assert '"shared"' not in text and "shared/corpora" not in text, path
            if "corpora" in text:
                calls = [
                    n
                    for n in ast.walk(ast.parse(text))
                    if isinstance(n, ast.Attribute) and n.attr in {"skip", "skipif"}
                ]
                assert not calls, path
