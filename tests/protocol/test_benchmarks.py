"""The benchmark scripts: one way to run each, one way to import the harness, all run by
``run_all``. Nothing is measured and no process or socket is opened: each script is
imported as the module its docstring names and asked for ``--help``."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from benchmarks import run_all

FOLDER = Path(__file__).resolve().parents[2] / "benchmarks"
# Scripts every other script imports from; not run on their own.
LIBRARIES = {"__init__", "common", "wrk"}
SCRIPTS = sorted(p.stem for p in FOLDER.glob("*.py") if p.stem not in LIBRARIES)
SIBLINGS = {p.stem for p in FOLDER.glob("*.py")}
# Floors measure only themselves: they import nothing of the project.
FLOORS = ("floor_server", "miss_floor")


def _tree(name: str) -> ast.Module:
    return ast.parse((FOLDER / f"{name}.py").read_text())


def _imported(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("name", SCRIPTS)
def test_docstring_names_the_run_command(name: str) -> None:
    doc = ast.get_docstring(_tree(name)) or ""
    assert f"python -m benchmarks.{name}" in doc
    assert "python benchmarks/" not in doc


@pytest.mark.parametrize("name", sorted(SIBLINGS - {"__init__"}))
def test_harness_is_imported_as_a_package_module(name: str) -> None:
    for imported in _imported(_tree(name)):
        top = imported.split(".")[0]
        assert top not in SIBLINGS, f"{imported}: import it as benchmarks.{top}"
        assert not imported.startswith("benchmarks.common."), "use: from benchmarks import common"


@pytest.mark.parametrize("name", FLOORS)
def test_floors_import_nothing_of_the_project(name: str) -> None:
    for imported in _imported(_tree(name)):
        assert imported.split(".")[0] not in {"chainrelay", "benchmarks", "tests"}, imported


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_run_all_runs_every_benchmark() -> None:
    assert len(set(run_all.SCRIPTS)) == len(run_all.SCRIPTS)
    assert set(run_all.SCRIPTS) | run_all.HELPERS == set(SCRIPTS) - {"run_all"}
    assert not set(run_all.SCRIPTS) & run_all.HELPERS
    assert set(run_all.LIMIT_SECONDS) == set(run_all.SCRIPTS)
    assert run_all.SCRIPTS[: len(run_all.common.SECTIONS)] == run_all.common.SECTIONS


def test_dapp_burst_reads_the_loop_lag_histogram_between_two_scrapes() -> None:
    from benchmarks import dapp_burst

    def scrape(counts: dict[str, int]) -> dict[str, float]:
        name = dapp_burst.LAG_HISTOGRAM
        samples = {f'{name}_bucket{{le="{le}"}}': float(n) for le, n in counts.items()}
        samples[f"{name}_count"] = float(counts["+Inf"])
        samples["chainrelay_requests_total"] = 7.0
        return samples

    before = dapp_burst.lag_buckets(scrape({"0.001": 10, "0.002": 10, "0.005": 10, "+Inf": 10}))
    # 100 more observations: 90 under 1 ms, 8 from 1 to 2 ms, 2 from 2 to 5 ms.
    after = dapp_burst.lag_buckets(scrape({"0.001": 100, "0.002": 108, "0.005": 110, "+Inf": 110}))
    assert after[float("inf")] == 110.0
    value, past = dapp_burst.histogram_quantile(0.99, before, after) or (0.0, True)
    assert not past
    assert abs(value - 0.0035) < 1e-9  # halfway through the 2-5 ms bucket
    p50 = dapp_burst.histogram_quantile(0.5, before, after)
    assert p50 is not None and abs(p50[0] - 0.001 * 50 / 90) < 1e-9
    assert dapp_burst.histogram_quantile(0.99, after, after) is None  # nothing observed
    slow = dapp_burst.lag_buckets(scrape({"0.001": 10, "0.002": 10, "0.005": 10, "+Inf": 110}))
    assert dapp_burst.histogram_quantile(0.99, before, slow) == (0.005, True)
    assert dapp_burst.lag_buckets({"chainrelay_requests_total": 1.0}) == {}
