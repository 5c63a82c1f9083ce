"""Imports point one way: cli → evaluation → retrieval → indexers. Every import of every module — statements
inside functions too, `importlib.import_module` / `__import__` of a constant name, and the classes a built-in
family.json names — is read with `ast` (or JSON) and checked against the direction."""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# module prefix -> the top-level modules it must not import
FORBIDDEN = {
    "indexers": {"retrieval", "evaluation", "cli"},
    "retrieval": {"evaluation", "cli"},
    "retrieval.encoders": {"indexers", "faiss"},  # encoders embed; they know nothing of indexes
    "evaluation": {"cli"},
}
DYNAMIC = {"import_module", "__import__"}


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
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in DYNAMIC):
            found.append((node.lineno, node.args[0].value))
    return found


def family_references(path: Path) -> list[tuple[int, str]]:
    """The modules a family.json names (encoder, objective, importer), as (0, module)."""
    spec = json.loads(path.read_text())
    references = [spec.get("encoder"), spec.get("objective"), (spec.get("importer") or {}).get("function")]
    return [(0, reference.split(":")[0]) for reference in references if reference]


def forbidden_for(module: str) -> set[str]:
    return set().union(*(names for prefix, names in FORBIDDEN.items()
                         if module == prefix or module.startswith(prefix + ".")))


def wrong_way_imports(root: Path = ROOT) -> list[str]:
    """'file:line imports module' for every import against the direction."""
    wrong = []
    for package in ("indexers", "retrieval", "evaluation"):
        for path in sorted((root / package).rglob("*.py")) + sorted((root / package).rglob("family.json")):
            parts = path.relative_to(root).with_suffix("").parts
            module = ".".join(parts[:-1] if path.suffix == ".json" else parts)
            imports = family_references(path) if path.suffix == ".json" else imported_modules(path, list(parts))
            wrong += [f"{path.relative_to(root)}:{line} imports {name}" for line, name in imports
                      if name.split(".")[0] in forbidden_for(module)]
    return sorted(wrong)


def test_imports_point_one_way():
    assert wrong_way_imports() == []


def test_a_wrong_way_import_is_caught(tmp_path):
    """The check fails on what it must refuse: a lazy import inside a function, a relative import that climbs out
    of the package, a dynamic import, an encoder that reaches for FAISS, a family.json naming the benchmark, and
    an indexers module that reaches for the engine."""
    for folder in ("indexers", "evaluation", "retrieval/sub", "retrieval/encoders/fam"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "retrieval" / "fine.py").write_text("import numpy\nfrom indexers.kinds import kind_of\n")
    (tmp_path / "retrieval" / "lazy.py").write_text("def f():\n    from evaluation.tasks import Task\n")
    (tmp_path / "retrieval" / "sub" / "up.py").write_text("from ... import cli\n")
    (tmp_path / "retrieval" / "sub" / "dynamic.py").write_text("import importlib\nimportlib.import_module('cli')\n")
    (tmp_path / "retrieval" / "encoders" / "fam" / "__init__.py").write_text("import faiss\n")
    (tmp_path / "retrieval" / "encoders" / "fam" / "family.json").write_text(json.dumps(
        {"family": "fam", "encoder": "retrieval.encoders.fam:E", "objective": "evaluation.train:Objective"}))
    (tmp_path / "indexers" / "engine.py").write_text("import retrieval.errors\n")
    (tmp_path / "evaluation" / "fine.py").write_text("import retrieval\nimport indexers\n")
    assert wrong_way_imports(tmp_path) == ["indexers/engine.py:1 imports retrieval.errors",
                                           "retrieval/encoders/fam/__init__.py:1 imports faiss",
                                           "retrieval/encoders/fam/family.json:0 imports evaluation.train",
                                           "retrieval/lazy.py:2 imports evaluation.tasks",
                                           "retrieval/sub/dynamic.py:2 imports cli",
                                           "retrieval/sub/up.py:1 imports cli"]
