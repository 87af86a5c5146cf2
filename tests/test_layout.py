"""The library's layout shows its architecture: concept folders, imports downward.

``eva_optax/_src`` is grouped into folders, one concept each, and a module
imports only from its own folder and from the folders below it (every import,
lazy ones inside functions included):

* ``vocabulary``, ``linalg``: the bottom (no library imports);
* ``capture``: the vocabulary;
* ``preconditioner``: the vocabulary and linalg;
* ``optimizers``: the preconditioner, linalg and the vocabulary;
* ``wrappers``: anything below them.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "eva_optax" / "_src"
ALLOWED = {
    "vocabulary": set(),
    "linalg": set(),
    "capture": {"vocabulary"},
    "preconditioner": {"vocabulary", "linalg"},
    "optimizers": {"preconditioner", "linalg", "vocabulary"},
    "wrappers": {"optimizers", "preconditioner", "capture", "vocabulary", "linalg"},
}
MODULES = sorted(p for p in SRC.rglob("*.py") if p.parent != SRC)


def _imported_folders(path: pathlib.Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      parts = node.module.split(".")
      if parts[:2] == ["eva_optax", "_src"]:
        found.add(parts[2] if len(parts) > 2 else "?")
    elif isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[:2] == ["eva_optax", "_src"]:
          found.add(parts[2] if len(parts) > 2 else "?")
  return found


def test_every_module_is_in_a_concept_folder():
  assert {p.parent.name for p in MODULES} == set(ALLOWED)
  assert [p.name for p in SRC.glob("*.py")] == ["__init__.py"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_imports_run_downward(path):
  folder = path.parent.name
  wrong = _imported_folders(path) - ALLOWED[folder] - {folder}
  assert not wrong, f"{folder}/{path.name} imports from {sorted(wrong)}"


def test_the_checker_sees_a_wrong_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def f():\n  from eva_optax._src.optimizers import eva\n")
  assert _imported_folders(bad) == {"optimizers"}
