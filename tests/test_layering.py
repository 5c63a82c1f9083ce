"""Imports point one way: cli → evaluation → retrieval → indexers. Every import statement of every module (those
inside functions too) is read with `ast` and checked against the direction."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> the top-level packages of this project it must not import
FORBIDDEN = {
    "indexers": {"retrieval", "evaluation", "cli"},
    "retrieval": {"evaluation", "cli"},
    "evaluation": {"cli"},
}


def imported_modules(path: Path, here: list[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file of module `here`, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level]
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found += [(node.lineno, ".".join(base + [name])) for name in names]
    return found


def wrong_way_imports(root: Path = ROOT) -> list[str]:
    """'file:line imports module' for every import against the direction."""
    wrong = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            here = [package, *path.relative_to(root / package).with_suffix("").parts]
            wrong += [f"{path.relative_to(root)}:{line} imports {module}"
                      for line, module in imported_modules(path, here) if module.split(".")[0] in forbidden]
    return wrong


def test_imports_point_one_way():
    assert wrong_way_imports() == []


def test_a_wrong_way_import_is_caught(tmp_path):
    """The check itself fails on what it must refuse: a lazy import inside a function, a relative import
    that climbs out of the package, and an indexers module that reaches for the engine."""
    for package in FORBIDDEN:
        (tmp_path / package / "sub").mkdir(parents=True)
    (tmp_path / "retrieval" / "fine.py").write_text("import numpy\nfrom indexers.kinds import kind_of\n")
    (tmp_path / "retrieval" / "lazy.py").write_text("def f():\n    from evaluation.tasks import Task\n")
    (tmp_path / "retrieval" / "sub" / "up.py").write_text("from ... import cli\n")
    (tmp_path / "indexers" / "engine.py").write_text("import retrieval.errors\n")
    assert wrong_way_imports(tmp_path) == ["indexers/engine.py:1 imports retrieval.errors",
                                           "retrieval/lazy.py:2 imports evaluation.tasks",
                                           "retrieval/sub/up.py:1 imports cli"]
