"""The parts' layering, read from the imports of the installed package (no module is executed).

Parts from the bottom up (docs/ARCHITECTURE.md): the base of `modelcd/` (settings, logs, runner,
errors), events.schemas, events, store, placement, runtimes, ingest, serving, shadow, rollout,
retirement, fleet, console, and the shell of `modelcd/` (cli, up, demo). A part imports only parts below it; no two parts import
each other (directly or through others); no part's CLI imports another part's CLI.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

# Bottom first. A module belongs to the most specific entry whose package contains it.
ORDER = ["base", "events.schemas", "events", "store", "placement", "runtimes", "ingest", "serving", "shadow",
         "rollout", "retirement", "fleet", "console", "shell"]
BASE_MODULES = {"__init__", "settings", "logs", "runner", "errors", "units"}  # modelcd/'s bottom half; the rest is the shell

Edge = tuple[str, str]


def part_of(module: str) -> str | None:
    """'modelcd.serving.node' -> 'serving'; 'modelcd.cli' -> 'shell'; None for anything not ours."""
    bits = module.split(".")
    if bits[0] != "modelcd":
        return None
    if len(bits) == 1:
        return "base"
    if bits[1] == "events":
        return "events.schemas" if len(bits) > 2 and bits[2] == "schemas" else "events"
    if bits[1] in ORDER:
        return bits[1]
    return "base" if bits[1] in BASE_MODULES else "shell"


def installed_modules() -> dict[str, Path]:
    """Every module of the installed `modelcd` package (its subpackages live in folders of their own)."""
    out: dict[str, Path] = {}
    for pkg in ["modelcd", "modelcd.events", "modelcd.events.schemas", "modelcd.store", "modelcd.placement",
                "modelcd.runtimes", "modelcd.ingest", "modelcd.serving", "modelcd.shadow", "modelcd.rollout",
                "modelcd.retirement", "modelcd.fleet", "modelcd.console"]:
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.submodule_search_locations, f"{pkg} is not installed"
        for folder in spec.submodule_search_locations:
            for f in Path(folder).glob("*.py"):
                out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def imports_of(module: str, path: Path) -> Iterable[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved, lazy ones included."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from modelcd.rollout import cli` imports a module too
                yield f"{target}.{alias.name}", node.lineno


def part_edges(modules: Mapping[str, Path]) -> dict[Edge, list[str]]:
    """(importing part, imported part) -> where, for every import that crosses parts."""
    edges: dict[Edge, list[str]] = {}
    for module, path in modules.items():
        src = part_of(module)
        for target, line in imports_of(module, path):
            if target not in modules and target.rpartition(".")[0] in modules:
                target = target.rpartition(".")[0]  # `from modelcd import __version__` imports modelcd, not a module
            dst = part_of(target)
            if src and dst and dst != src:
                edges.setdefault((src, dst), []).append(f"{module} (line {line}) imports {target}")
    return edges


def find_cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """Each simple cycle among parts once, as [a, b, ..., a], rooted at its alphabetically first part."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    cycles: list[list[str]] = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                cycles.append([*path, start])
            elif nxt > start and nxt not in path:  # only parts after the root: each cycle is found once
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return cycles


@pytest.fixture(scope="module")
def edges() -> dict[Edge, list[str]]:
    return part_edges(installed_modules())


def test_no_import_cycle_between_parts(edges: dict[Edge, list[str]]) -> None:
    """No two parts import each other, directly or through other parts; a cycle is named with its imports."""
    cycles = find_cycles(edges)
    described = [" -> ".join(c) + ": " + "; ".join(edges[(a, b)][0] for a, b in zip(c, c[1:])) for c in cycles]
    assert not described, "import cycles between parts:\n" + "\n".join(described)


def test_parts_import_only_parts_below_them(edges: dict[Edge, list[str]]) -> None:
    """Every cross-part import goes down the declared order (serving never imports ingest, shadow or rollout...)."""
    upward = [f"{a} imports {b} (above it): {where[0]}" for (a, b), where in sorted(edges.items())
              if ORDER.index(b) > ORDER.index(a)]
    assert not upward, "\n".join(upward)


def test_no_part_cli_imports_another_parts_cli() -> None:
    """Each part owns its subcommands; only the shell (modelcd/cli.py) puts them together."""
    bad = []
    for module, path in installed_modules().items():
        src = part_of(module)
        if src in ("shell", "base"):
            continue
        for target, line in imports_of(module, path):
            if target.endswith(".cli") and part_of(target) not in (src, "shell", None):
                bad.append(f"{module} (line {line}) imports {target}")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_every_part(edges: dict[Edge, list[str]]) -> None:
    """The walk reads the installed package: every part is found and the known edges are there."""
    parts = {a for a, _ in edges} | {b for _, b in edges}
    assert set(ORDER) <= parts, f"parts never seen in an import: {set(ORDER) - parts}"
    assert ("serving", "runtimes") in edges and ("ingest", "runtimes") in edges
    assert ("shadow", "serving") in edges  # the executor knows the node's hooks, not the reverse


def test_cycle_finder_names_cycles() -> None:
    """The checker itself: a two-part and a three-part cycle are found, a chain is not a cycle."""
    assert find_cycles([("ingest", "serving"), ("serving", "ingest")]) == [["ingest", "serving", "ingest"]]
    three = find_cycles([("store", "ingest"), ("ingest", "serving"), ("serving", "store")])
    assert len(three) == 1 and set(three[0]) == {"store", "ingest", "serving"}
    assert find_cycles([("ingest", "store"), ("serving", "store"), ("rollout", "ingest")]) == []


def test_part_of_and_relative_imports(tmp_path: Path) -> None:
    """Relative imports resolve inside their package; `from pkg import module` counts as importing the module."""
    f = tmp_path / "node.py"
    f.write_text("from .hooks import X\nfrom ..store import blobs\nfrom modelcd.rollout import cli\n")
    got = {t for t, _ in imports_of("modelcd.serving.node", f)}
    assert {"modelcd.serving.hooks", "modelcd.store.blobs", "modelcd.rollout.cli"} <= got
    assert part_of("modelcd.events.schemas.traffic") == "events.schemas"
    assert part_of("modelcd.cli") == "shell" and part_of("modelcd.settings") == "base"
