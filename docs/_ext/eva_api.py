"""Sphinx extension: the API reference generated from ``eva_optax.__all__``.

``.. eva-optax-api::`` expands, at build time, to the public names (in
``eva_optax.__all__``, then in the ``__all__`` of every public submodule such as
``eva_optax.nnx``), each documented by autodoc under its public path
(``eva_optax.eva``, not the private module that defines it). A new public name
therefore appears without editing the docs.

The sections follow the private tree ``eva_optax._src``, walked recursively
(:func:`pkgutil.walk_packages`), so no module name is written here: a module
directly in ``_src`` is a section of its own; a module in a concept subpackage
(``_src/optimizers/eva.py``) is a subsection of its subpackage's section. Every
title is the summary of the module's (or subpackage's) docstring, up to its
first colon or full stop; sections come in the tree's order.

The build then checks that every public name was documented and warns otherwise (a
failure under ``sphinx-build -W``), like optax's ``docs/ext/coverage_check.py``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import re
from types import ModuleType
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.pycode import PycodeError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

PACKAGE = "eva_optax"
SRC = f"{PACKAGE}._src"


def public_names() -> dict[str, Any]:
  """``{public dotted name: object}``: ``eva_optax.__all__`` and public submodules'."""
  package = importlib.import_module(PACKAGE)
  names = {f"{PACKAGE}.{n}": getattr(package, n) for n in package.__all__}
  for info in pkgutil.iter_modules(package.__path__):
    if info.name.startswith("_"):
      continue
    module = importlib.import_module(f"{PACKAGE}.{info.name}")
    names.pop(f"{PACKAGE}.{info.name}", None)     # the module itself: its names below
    for n in getattr(module, "__all__", ()):
      names[f"{PACKAGE}.{info.name}.{n}"] = getattr(module, n)
  return names


@functools.cache
def _src_modules() -> dict[str, ModuleType]:
  """Every module of ``eva_optax._src`` by dotted name, subpackages included."""
  src = importlib.import_module(SRC)
  modules = {}
  for info in pkgutil.walk_packages(src.__path__, prefix=f"{SRC}."):
    modules[info.name] = importlib.import_module(info.name)
  return modules


def _source_module(name: str, obj: Any) -> tuple[str, str]:
  """``(module, attribute)`` that defines ``obj``, ``module`` a full dotted name.

  A class or function names its module. A constant carries no ``__module__``:
  its module is the one whose top level assigns it (it may be re-exported under
  another name, as ``ADAPTIVE_LOSSES`` is), else the public module that exports it.
  """
  if inspect.isclass(obj) or inspect.isroutine(obj):
    module = getattr(obj, "__module__", "") or ""
    if module.startswith(f"{PACKAGE}."):
      return module, obj.__name__
  for mod_name, mod in _src_modules().items():
    for attr in _assigned_names(mod):
      if getattr(mod, attr, None) is obj:
        return mod_name, attr
  return name.rsplit(".", 1)[0], name.rsplit(".", 1)[-1]


def _assigned_names(module: Any) -> list[str]:
  """Names assigned at the top level of a module's source."""
  try:
    tree = ast.parse(inspect.getsource(module))
  except (OSError, TypeError):
    return []
  names = []
  for node in tree.body:
    targets = node.targets if isinstance(node, ast.Assign) else (
        [node.target] if isinstance(node, ast.AnnAssign) else [])
    names += [t.id for t in targets if isinstance(t, ast.Name)]
  return names


def _place(module: str) -> tuple[str, str | None]:
  """``(section, subsection)`` modules of a defining module.

  ``eva_optax._src.eva`` (flat) is its own section; ``eva_optax._src.optimizers.eva``
  is a subsection of ``eva_optax._src.optimizers``. Anything outside ``_src`` (a
  public module) is a section of its own.
  """
  if not module.startswith(f"{SRC}."):
    return module, None
  parts = module[len(SRC) + 1:].split(".")
  if len(parts) == 1:
    return module, None
  return f"{SRC}.{parts[0]}", module


_ROLE = re.compile(r":[\w:]+:`~?([^`]+)`")


def summary(module: str) -> str:
  """A title from a module's docstring: its first paragraph, up to the first
  colon or full stop, with cross-reference roles shown as literals."""
  try:
    doc = inspect.getdoc(importlib.import_module(module)) or ""
  except ImportError:
    doc = ""
  paragraph = " ".join(doc.split("\n\n", 1)[0].split())
  paragraph = _ROLE.sub(r"``\1``", paragraph)
  title = re.split(r"(?<!\.)[:.](?:\s|$)", paragraph, maxsplit=1)[0].strip()
  return title or module.rsplit(".", 1)[-1]


def _constant_doc(module: str, attribute: str) -> list[str]:
  """The ``#:`` comment (or string after the assignment) of a constant in its module."""
  try:
    docs = ModuleAnalyzer.for_module(module).find_attr_docs()
  except PycodeError:
    return []
  return list(docs.get(("", attribute), []))


def _directive(name: str, obj: Any, source: tuple[str, str]) -> list[str]:
  if inspect.isclass(obj):
    lines = [f".. autoclass:: {name}"]
    if not issubclass(obj, tuple):          # NamedTuple states: fields are in the docstring
      lines += ["   :members:"]
    return lines
  if inspect.isroutine(obj):
    return [f".. autofunction:: {name}"]
  # A constant: its value, and its doc comment where the source module has one (autodoc
  # would show the docstring of its type, e.g. tuple's).
  doc = _constant_doc(*source) or ["A constant."]
  return [f".. py:data:: {name}", f"   :value: {obj!r}", ""] + [f"   {l}" for l in doc]


def _heading(title: str, underline: str) -> list[str]:
  return [title, underline * len(title), ""]


def api_rst() -> list[str]:
  """The reStructuredText of the whole reference.

  ``{section module: {subsection module or None: [public names]}}``, then one
  section per ``_src`` module or subpackage in the tree's order, and one per
  public submodule (``eva_optax.nnx``) last.
  """
  names = public_names()
  sources = {name: _source_module(name, obj) for name, obj in names.items()}
  groups: dict[tuple[bool, str], dict[str | None, list[str]]] = {}
  for name in names:
    parts = name.split(".")
    if len(parts) > 2:       # a public submodule (eva_optax.nnx): one section of its own
      section, subsection = (True, ".".join(parts[:-1])), None
    else:
      module, subsection = _place(sources[name][0])
      section = (False, module)
    groups.setdefault(section, {}).setdefault(subsection, []).append(name)
  lines = []
  for (public, section) in sorted(groups):
    title = f"{section}: {summary(section)}" if public else summary(section)
    lines += _heading(title, "-")
    for subsection in sorted(groups[(public, section)], key=lambda m: m or ""):
      if subsection is not None:
        lines += _heading(summary(subsection), "~")
      members = groups[(public, section)][subsection]
      for name in sorted(members, key=lambda n: (n.count("."), n.lower())):
        lines += _directive(name, names[name], sources[name]) + [""]
  return lines


class PublicApi(SphinxDirective):
  """``.. eva-optax-api::``: the reference of every public name."""

  has_content = False

  def run(self) -> list[nodes.Node]:
    container = nodes.container()
    content = StringList(api_rst(), source="<eva_optax.__all__>")
    nested_parse_with_titles(self.state, content, container)
    return container.children


def _check_coverage(app: Sphinx, env: Any) -> None:
  documented = set(env.get_domain("py").objects)
  missing = sorted(set(public_names()) - documented)
  if missing:
    logger.warning("public names missing from the API reference: %s", ", ".join(missing),
                   type="eva_optax", subtype="coverage")


def _alias_names(app, what, name, obj, options, signature, return_annotation):
  """Shows ``chex.Numeric | None`` as written, not as ``TypeAliasForwardRef('...') | None``."""
  del app, what, name, obj, options

  def fix(text: str | None) -> str | None:
    return text and re.sub(r"TypeAliasForwardRef\('([^']+)'\)", r"\1", text)

  return fix(signature), fix(return_annotation)


def setup(app: Sphinx) -> dict[str, Any]:
  app.add_directive("eva-optax-api", PublicApi)
  app.connect("autodoc-process-signature", _alias_names)
  app.connect("env-check-consistency", _check_coverage)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
