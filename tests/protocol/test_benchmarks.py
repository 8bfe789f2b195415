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
