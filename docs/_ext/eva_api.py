"""Sphinx extension: the API reference generated from ``eva_optax.__all__``.

``.. eva-optax-api::`` expands, at build time, to one section per source module of the
public names (in ``eva_optax.__all__``, then in the ``__all__`` of every public submodule
such as ``eva_optax.nnx``), each name documented by autodoc under its public path
(``eva_optax.eva``, not ``eva_optax._src.eva.eva``). A new public name therefore appears
without editing the docs; its section is titled from ``TOPICS`` when its module is listed
there, else from the first line of its module's docstring.

The build then checks that every public name was documented and warns otherwise (a
failure under ``sphinx-build -W``), like optax's ``docs/ext/coverage_check.py``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
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

# Section titles and order for the known source modules (others follow, titled from their
# module docstring).
TOPICS = {
    "linen": "Gradients and layer statistics",
    "statistics": "Gradients and layer statistics",
    "describe": "Gradients and layer statistics",
    "eva": "Eva and Eva-f",
    "eva_f": "Eva and Eva-f",
    "eva_s": "Eva-s",
    "kfac": "K-FAC",
    "foof": "FOOF",
    "shampoo": "Shampoo",
    "training_chain": "The training chain",
    "layerwise": "Optimizer states",
    "adaptive": "Adaptive learning rate, momentum and damping",
    "quadratic_model": "Adaptive learning rate, momentum and damping",
    "multi_steps": "Gradient accumulation and training state",
    "train_state": "Gradient accumulation and training state",
}


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


def _source_module(name: str, obj: Any) -> tuple[str, str]:
  """``(module, attribute)`` that defines ``obj`` (``("eva", "eva")`` for ``eva_optax.eva``).

  ``module`` is the file's name in ``eva_optax._src`` (in any of its folders). A constant carries no
  ``__module__``: its module is the one whose top level assigns it (it may be
  re-exported under another name, as ``ADAPTIVE_LOSSES`` is).
  """
  if inspect.isclass(obj) or inspect.isroutine(obj):
    module = getattr(obj, "__module__", "") or ""
    if module.startswith(f"{PACKAGE}."):
      return module.rsplit(".", 1)[-1], obj.__name__
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


def _src_modules() -> dict[str, Any]:
  """``{file name: module}`` of every module under ``eva_optax._src``, its
  concept folders included (file names are unique across the folders)."""
  src = importlib.import_module(f"{PACKAGE}._src")
  return {i.name.rsplit(".", 1)[-1]: importlib.import_module(i.name)
          for i in pkgutil.walk_packages(src.__path__, f"{src.__name__}.")
          if not i.ispkg}


def _title(module: str) -> str:
  if module in TOPICS:
    return TOPICS[module]
  found = _src_modules().get(module)
  doc = inspect.getdoc(found if found is not None
                       else importlib.import_module(module)) or module
  return doc.splitlines()[0].rstrip(".")


def _constant_doc(module: str, attribute: str) -> list[str]:
  """The ``#:`` comment (or string after the assignment) of a constant in its module."""
  try:
    docs = ModuleAnalyzer.for_module(_src_modules()[module].__name__).find_attr_docs()
  except PycodeError:
    return []
  return list(docs.get(("", attribute), []))


def _submodule_title(module: str) -> str:
  doc = inspect.getdoc(importlib.import_module(module)) or ""
  first = doc.splitlines()[0].rstrip(".") if doc else ""
  return f"{module}: {first}" if first else module


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


def api_rst() -> list[str]:
  """The reStructuredText of the whole reference."""
  order = list(dict.fromkeys(TOPICS.values()))
  groups: dict[str, list[str]] = {}
  names = public_names()
  sources = {name: _source_module(name, obj) for name, obj in names.items()}
  for name in names:
    parts = name.split(".")
    if len(parts) > 2:       # a public submodule (eva_optax.nnx): one section of its own
      groups.setdefault(_submodule_title(".".join(parts[:-1])), []).append(name)
    else:
      groups.setdefault(_title(sources[name][0]), []).append(name)
  titles = sorted(groups, key=lambda t: (order.index(t) if t in order else len(order), t))
  lines = []
  for title in titles:
    lines += [title, "-" * len(title), ""]
    for name in sorted(groups[title], key=lambda n: (n.count("."), n.lower())):
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
