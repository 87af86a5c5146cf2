"""Every public function and class has a complete Google-style docstring.

For each name in ``eva_optax.__all__`` (and in the ``__all__`` of each public submodule,
such as ``eva_optax.nnx``) that is a function or a class:

* functions: an ``Args:`` section that documents every parameter (when there are any),
  and a ``Returns:`` section;
* classes: an ``Attributes:`` (or ``Args:``) section that documents every field or
  constructor parameter (when there are any);
* both: a ``References:`` section, or a pointer (``:func:`` / ``:class:``) to a public
  name whose docstring has one.

Constants (``STATISTICS``) are not checked. Names that do not pass yet are listed in
``KNOWN_INCOMPLETE`` with what they miss. That list can only shrink: a listed name that
becomes complete fails ``test_docstring_complete`` until it is removed from the list.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
from typing import Any

import pytest

import eva_optax

# Public names whose docstrings are incomplete today, and what each one misses. The owner
# of each name completes its docstring and removes it from this list (the test fails
# when a listed name becomes complete, so the list can only shrink; never add to it).
KNOWN_INCOMPLETE = {
    # The states (eva_optax/_src/preconditioner/layerwise.py).
}

_SECTION = re.compile(r"^(\w[\w ]*):\s*$")
_ENTRY = re.compile(r"^\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:")
_POINTER = re.compile(r":(?:func|class|meth):`~?(?:eva_optax\.)?([\w.]+)`")


def _public_objects() -> dict[str, Any]:
  """``{qualified name: object}`` over ``eva_optax.__all__`` and public submodules."""
  objects = {name: getattr(eva_optax, name) for name in eva_optax.__all__}
  for info in pkgutil.iter_modules(eva_optax.__path__):
    if not info.name.startswith("_"):
      module = importlib.import_module(f"eva_optax.{info.name}")
      for name in getattr(module, "__all__", ()):
        objects[f"{info.name}.{name}"] = getattr(module, name)
  return {n: o for n, o in objects.items() if inspect.isclass(o) or inspect.isroutine(o)}


PUBLIC = _public_objects()


def _sections(doc: str) -> dict[str, list[str]]:
  """Google-style sections: a header line ``Name:`` at indent 0, then indented lines."""
  sections, current = {}, None
  for line in inspect.cleandoc(doc).splitlines():
    match = _SECTION.match(line)
    if match:
      current = sections.setdefault(match.group(1), [])
    elif line and not line[0].isspace():
      current = None
    elif current is not None:
      current.append(line)
  return sections


def _documented(lines: list[str]) -> set[str]:
  """Names of the entries of an Args/Attributes section (at the first entry's indent)."""
  indents = [len(l) - len(l.lstrip()) for l in lines if l.strip()]
  if not indents:
    return set()
  names = set()
  for line in lines:
    match = _ENTRY.match(line)
    if match and len(line) - len(line.lstrip()) == indents[0]:
      names.add(match.group(1).lstrip("*"))
  return names


def _parameters(obj: Any) -> list[str]:
  if inspect.isclass(obj):
    if hasattr(obj, "_fields"):                       # NamedTuple
      return list(obj._fields)
    if dataclasses.is_dataclass(obj):
      return [f.name for f in dataclasses.fields(obj)]
    obj = obj.__init__
  try:
    params = inspect.signature(obj).parameters.values()
  except (TypeError, ValueError):
    return []
  return [p.name for p in params if p.name not in ("self", "cls")]


def _has_references(obj: Any) -> bool:
  return "References" in _sections(inspect.getdoc(obj) or "")


def problems(name: str) -> list[str]:
  """What the docstring of public ``name`` misses (empty when complete)."""
  obj = PUBLIC[name]
  doc = inspect.getdoc(obj)
  if not doc or (inspect.isclass(obj) and doc == inspect.getdoc(type(obj))):
    return ["no docstring"]
  sections = _sections(doc)
  found = []
  params = _parameters(obj)
  if inspect.isclass(obj):
    entries = sections.get("Attributes", sections.get("Args"))
    header = "Attributes"
  else:
    entries = sections.get("Args")
    header = "Args"
    if "Returns" not in sections and "Yields" not in sections:
      found.append("no Returns section")
  if params and entries is None:
    found.append(f"no {header} section")
  elif params:
    missing = [p for p in params if p not in _documented(entries)]
    if missing:
      found.append(f"{header} misses {missing}")
  if "References" not in sections:
    targets = [t.split(".")[-1] for t in _POINTER.findall(doc)]
    pointed = [getattr(eva_optax, t) for t in targets
               if t in eva_optax.__all__ and t != name.split(".")[-1]]
    if not any(_has_references(o) for o in pointed):
      found.append("no References section, nor a pointer to a public name that has one")
  return found


def test_known_incomplete_names_are_public():
  assert set(KNOWN_INCOMPLETE) <= set(PUBLIC), set(KNOWN_INCOMPLETE) - set(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_docstring_complete(name):
  found = problems(name)
  if name in KNOWN_INCOMPLETE:
    assert found, (f"{name}'s docstring is now complete: remove it from KNOWN_INCOMPLETE "
                   "in tests/test_docstrings.py")
  else:
    assert not found, f"{name}: {'; '.join(found)}"


# The checker itself, on small docstrings whose verdict is known.


def _complete(x, *, y=1):
  """Adds.

  Args:
    x: the first.
    y (int): the second,
      on two lines.

  Returns:
    The sum.

  References:
    Someone, 2020.
  """
  return x + y


def _incomplete(x, y):
  """Adds.

  Args:
    x: the first.

  Some text at indent 0 ends the section.
    y: not an entry of Args.
  """
  return x + y


def test_checker_on_known_docstrings(monkeypatch):
  monkeypatch.setitem(PUBLIC, "_complete", _complete)
  monkeypatch.setitem(PUBLIC, "_incomplete", _incomplete)
  assert problems("_complete") == []
  assert problems("_incomplete") == [
      "no Returns section", "Args misses ['y']",
      "no References section, nor a pointer to a public name that has one"]
