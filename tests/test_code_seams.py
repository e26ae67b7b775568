"""The runtime's modules talk through public names only: no module reads or writes another
module's private attributes (``obj._name`` where ``_name`` is not defined in the same module).
A refactor that reaches across a seam fails here with the file, line and name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pie_local"
CHECKED = ["runtime", "server", "tui"]  # packages whose modules must keep to each other's public surface
STDLIB_API = {"_current_frames"}  # sys._current_frames: documented CPython API, not our private name


def private_names_defined(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, class attributes, self._x assignments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_")}


def foreign_private_accesses(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    own = private_names_defined(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            if name.startswith("_") and not name.startswith("__") and name not in own | STDLIB_API:
                found.append(f"{path.relative_to(root)}:{node.lineno}: .{name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pie_local"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: import {alias.name}")
    return found


@pytest.mark.parametrize("package", CHECKED)
def test_modules_use_only_each_others_public_names(package: str) -> None:
    violations = [v for path in sorted((PACKAGE / package).glob("*.py")) for v in foreign_private_accesses(path)]
    assert not violations, "private names used across modules:\n" + "\n".join(violations)


def test_the_check_catches_a_foreign_private_access(tmp_path: Path) -> None:
    module = tmp_path / "probe.py"
    module.write_text("from pie_local.x import _helper\n\nclass A:\n    def __init__(self):\n        self._mine = 1\n\n"
                      "def f(ctx, a):\n    return ctx._pages, a._mine\n")
    assert foreign_private_accesses(module, tmp_path) == ["probe.py:1: import _helper", "probe.py:8: ._pages"]
