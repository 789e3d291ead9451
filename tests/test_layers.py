"""DESIGN.md's rule: imports point down the layers only, and the packages import each other without a cycle.

Every import in every module counts, including those under ``TYPE_CHECKING`` and inside
functions: a lazy import still ties the packages together. A sideways import (within a
layer) is allowed only while the package-level import graph stays acyclic.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping, Set
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "fedloom"

# Layer of each subpackage / top-level module (1 = apps, 5 = foundations).
LAYER = {
    "cli": 1, "demo": 1, "edge": 1, "artifacts": 1, "serve": 1, "run": 1, "report": 1,
    "federation": 2, "server": 2, "agent": 2,
    "engines": 3,
    "strategies": 4, "client": 4, "pipeline": 4, "privacy": 4, "compress": 4, "secure": 4,
    "transport": 4, "store": 4, "cutting": 4, "attacks": 4,
    "core": 5, "data": 5, "models": 5,
}  # fmt: skip


def _unit(path: Path) -> str:
    return path.relative_to(PKG).parts[0].removesuffix(".py")


def _imported_modules(path: Path, root: Path = PKG) -> Iterator[str]:
    """Absolute names of every module ``path`` (in package ``root``) imports; ``from X import y`` also yields ``X.y``."""
    rel = path.relative_to(root.parent).with_suffix("")
    package = list(rel.parts if rel.name == "__init__" else rel.parts[:-1])
    if package and package[-1] == "__init__":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{a.name}" for a in node.names if a.name != "*")


def import_graph() -> dict[str, set[str]]:
    """Package-level graph: unit -> the other units its modules import (the package root excluded)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue  # the package root re-exports the public API
        edges = graph.setdefault(unit, set())
        for name in _imported_modules(path):
            parts = name.split(".")
            if parts[0] != "fedloom" or len(parts) < 2 or parts[1] == unit:
                continue
            target = parts[1]
            if (PKG / target).is_dir() or (PKG / f"{target}.py").is_file():
                edges.add(target)
    return graph


def find_cycle(graph: Mapping[str, Set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path ``[a, b, ..., a]``, or None if it is acyclic (iterative DFS)."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(graph, white)
    for root in sorted(graph):
        if color[root] != white:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        color[root] = grey
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                color[node] = black
                stack.pop()
            elif color.get(child, white) == grey:
                path = [n for n, _ in stack]
                return [*path[path.index(child) :], child]
            elif color.get(child, white) == white:
                color[child] = grey
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_every_unit_has_a_layer() -> None:
    unknown = sorted((set(import_graph()) | {t for ts in import_graph().values() for t in ts}) - set(LAYER))
    assert not unknown, f"{unknown} have no layer in this test (add them, and to DESIGN.md)"


def test_imports_point_down() -> None:
    bad = [
        f"{unit} (layer {LAYER[unit]}) imports fedloom.{target} (layer {LAYER[target]})"
        for unit, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if LAYER[target] < LAYER[unit]
    ]
    assert not bad, bad


def test_the_package_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


def test_the_agent_and_the_server_know_nothing_of_each_other() -> None:
    graph = import_graph()
    assert "server" not in graph["agent"] and "agent" not in graph["server"]


def test_only_transport_server_and_agent_import_grpc_protobuf_or_cryptography() -> None:
    """...and ``secure`` imports cryptography (its primitives); test_no_grpc_in_simulation checks a plain run loads none."""
    bad = [
        f"{path.relative_to(PKG)} imports {name}"
        for path in sorted(PKG.rglob("*.py"))
        if _unit(path) not in ("transport", "server", "agent")
        for name in _imported_modules(path)
        if name.split(".")[0] in ("grpc", "grpc_tools") or name.startswith("google.protobuf")
        or (name.split(".")[0] == "cryptography" and _unit(path) != "secure")
    ]
    assert not bad, bad


def test_cycle_detector_on_synthetic_graphs() -> None:
    assert find_cycle({}) is None
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None  # a diamond is no cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"x"}}) == ["x", "y", "x"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"b"}}) == ["b", "c", "d", "b"]  # the cycle, not the way in
    assert find_cycle({"a": {"z"}}) is None  # edges to nodes without entries


def test_import_graph_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    """The collector reads imports anywhere in a module, and resolves relative ones."""
    mod = tmp_path / "fedloom" / "engines" / "x.py"
    mod.parent.mkdir(parents=True)
    mod.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from fedloom.server.deploy import a\n"
        "def f():\n    import fedloom.store.sqlite\n    from ..federation import loop\n"
    )
    names = set(_imported_modules(mod, tmp_path / "fedloom"))
    assert {"fedloom.server.deploy", "fedloom.store.sqlite", "fedloom.federation", "fedloom.federation.loop"} <= names
