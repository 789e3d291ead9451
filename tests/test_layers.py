"""DESIGN.md's rule: imports point down the layers only."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "fedloom"

# Layer of each subpackage / top-level module (1 = apps, 5 = foundations).
LAYER = {
    "cli": 1, "demo": 1, "artifacts": 1, "serve": 1,
    "federation": 2, "server": 2,
    "engines": 3,
    "strategies": 4, "client": 4, "privacy": 4, "compress": 4, "pipeline": 4,
    "core": 5, "data": 5, "models": 5,
}  # fmt: skip


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def test_imports_point_down() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        unit = _unit(path)
        if unit == "__init__":
            continue  # the package root re-exports the public API
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "fedloom" or len(parts) < 2:
                    continue
                target = parts[1]
                if target == unit:
                    continue
                assert target in LAYER, f"{target} has no layer in this test"
                # Upward imports are forbidden; so are sideways ones between the math packages
                # of layer 4 (strategies, client, privacy, compress) and between engines.
                if LAYER[target] < LAYER[unit] or (LAYER[target] == LAYER[unit] and LAYER[unit] in (3, 4) and target != "pipeline"):
                    bad.append(f"{path.relative_to(PKG)} imports fedloom.{target}")
    assert not bad, bad
