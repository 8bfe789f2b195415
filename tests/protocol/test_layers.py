"""Import contracts: the layering the package names promise, checked on every run.

* The sans-I/O cores (wire formats, policy tables, state machines) import no asyncio, no
  sockets, no I/O library and no service: they are driven by bytes in, bytes out.
* ``config`` imports no service: a file can be validated without building a node.
* The client libraries import no server module: a subscriber or a publisher is a client of a
  node's public endpoints, and ships without the node.
* Nothing but the entry points imports the app, the CLI or the worker supervisor.

Every import counts, also one inside a function or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import chainrelay

PACKAGE = Path(chainrelay.__file__).resolve().parent

SANS_IO = (
    "chainrelay.wire.jsonrpc",
    "chainrelay.wire.wsframes",
    "chainrelay.wire.pieces",
    "chainrelay.rpc.policy",
    "chainrelay.rpc.cache",
    "chainrelay.rpc.replay",
    "chainrelay.rpc.inflight",
    "chainrelay.upstreams.batching",
    "chainrelay.upstreams.budget",
    "chainrelay.upstreams.capabilities",
    "chainrelay.upstreams.route",
    "chainrelay.upstreams.httpwire",
    "chainrelay.upstreams.failures",
    "chainrelay.access.identity",
    "chainrelay.access.methods",
    "chainrelay.rpc.logguards",
    "chainrelay.rpc.logsplit",
    "chainrelay.access.buckets",
    "chainrelay.access.forwarded",
    "chainrelay.access.proxyproto",
    "chainrelay.access.keys",
    "chainrelay.access.door",
    "chainrelay.server.budget",
    "chainrelay.server.phases",
    "chainrelay.server.replays",
    "chainrelay.server.metricsum",
    "chainrelay.server.compress",
    "chainrelay.server.plainhead",
    "chainrelay.chain.profiles",
    "chainrelay.chain.headpoll",
    "chainrelay.chain.quorum",
    "chainrelay.chain.blockorder",
    "chainrelay.chain.events",
    "chainrelay.chain.offers",
    "chainrelay.chain.logstore",
    "chainrelay.chain.sharedhead",
    "chainrelay.chain.windowfill",
    "chainrelay.subscriptions.registry",
    "chainrelay.subscriptions.filtertable",
    "chainrelay.subscriptions.logfilter",
    "chainrelay.subscriptions.fanout",
    "chainrelay.subscriptions.ids",
    "chainrelay.tree.frame",
    "chainrelay.tree.session",
    "chainrelay.tree.choice",
    "chainrelay.tree.auth",
    "chainrelay.tree.admission",
    "chainrelay.batches.frame",
    "chainrelay.batches.rules",
    "chainrelay.batches.order",
    "chainrelay.nitro.codec",
    "chainrelay.nitro.intake",
    "chainrelay.nitro.deflate",
    "chainrelay.nitro.dictionary",
    "chainrelay.status.samples",
)
# What a sans-I/O module may never import: event loops, sockets, I/O clients and servers.
IO_MODULES = (
    "asyncio",
    "socket",
    "selectors",
    "ssl",
    "threading",
    "subprocess",
    "sqlite3",
    "uvloop",
    "aiohttp",
    "httptools",
    "redis",
    "websockets.asyncio",
    "websockets.client",
    "websockets.server",
    "websockets.sync",
)
# Project modules every layer may use: the error tree and the named limits.
BASE = ("chainrelay.errors", "chainrelay.defaults")

CLIENTS = (
    "chainrelay.clients",
    "chainrelay.subscriber",
    "chainrelay.batchsubscriber",
    "chainrelay.publisher",
    "chainrelay.tree.link",
)
# What the client libraries may import of the project: the formats they read and write, the
# feed session they speak, and the link they speak it over.
CLIENT_ALLOWED = (
    *BASE,
    *CLIENTS,
    "chainrelay.wire",
    "chainrelay.tree.frame",
    "chainrelay.tree.session",
    "chainrelay.tree.auth",  # the proof a child relay's hello carries
    "chainrelay.batches.frame",
)
ENTRY_POINTS = ("chainrelay.app", "chainrelay.cli", "chainrelay.workers")
ENTRY_IMPORTERS = ("chainrelay.__main__", "chainrelay.cli", "chainrelay.workers")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> Iterator[str]:
    """Every module ``name`` imports (for ``from a import b``, both ``a`` and ``a.b``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def project_imports(name: str) -> set[str]:
    """The project's modules ``name`` imports (``from chainrelay import x`` counts as x)."""
    return {m for m in imports_of(name) if m in MODULES and m != "chainrelay"}


def test_every_contract_names_real_modules() -> None:
    for name in (*SANS_IO, *BASE, *ENTRY_POINTS, *ENTRY_IMPORTERS, *CLIENTS, *CLIENT_ALLOWED):
        assert name in MODULES, f"{name} is named by a contract but does not exist"


@pytest.mark.parametrize("name", SANS_IO)
def test_sans_io_cores_import_no_io_and_no_service(name: str) -> None:
    io = sorted(m for m in imports_of(name) if within(m, IO_MODULES))
    assert io == [], f"{name} is sans-I/O but imports {io}"
    outside = sorted(m for m in project_imports(name) if not within(m, (*SANS_IO, *BASE)))
    assert outside == [], f"{name} is sans-I/O but imports {outside}"


def test_config_imports_no_service() -> None:
    config = [n for n in MODULES if within(n, ("chainrelay.config",))]
    for name in config:
        allowed = (*BASE, *SANS_IO, "chainrelay.config")
        outside = sorted(m for m in project_imports(name) if not within(m, allowed))
        assert outside == [], f"{name} imports {outside}"


@pytest.mark.parametrize("name", [n for n in MODULES if within(n, CLIENTS)])
def test_client_libraries_import_no_server_module(name: str) -> None:
    outside = sorted(m for m in project_imports(name) if not within(m, CLIENT_ALLOWED))
    assert outside == [], f"the client library {name} imports {outside}"


def test_only_the_entry_points_import_the_app() -> None:
    for name in MODULES:
        if within(name, ENTRY_IMPORTERS):
            continue
        reached = sorted(m for m in project_imports(name) if within(m, ENTRY_POINTS))
        assert reached == [], f"{name} imports {reached}"


def test_the_base_modules_import_nothing_of_the_project() -> None:
    for name in BASE:
        assert project_imports(name) == set(), name


@pytest.mark.parametrize(
    ("documented", "library"),
    [
        ("chainrelay.subscriber", "chainrelay.clients.subscriber"),
        ("chainrelay.batchsubscriber", "chainrelay.clients.batchsubscriber"),
        ("chainrelay.publisher", "chainrelay.clients.publisher"),
    ],
)
def test_documented_client_import_paths_name_the_libraries_objects(
    documented: str, library: str
) -> None:
    """``from chainrelay.subscriber import subscribe`` (as the README shows) keeps working:
    each documented path re-exports its library's public names, the same objects."""
    public = importlib.import_module(documented)
    lib = importlib.import_module(library)
    assert public.__all__
    for name in public.__all__:
        assert getattr(public, name) is getattr(lib, name), name
