"""Walking parameter trees by path: layer nodes, probes, and the pairing of
params, gradients and statistics.

A *layer node* is a mapping with a ``kernel`` (rank >= 2) or an ``embedding``
(rank 2, or more when stacked), possibly inside Flax metadata boxes
(``nn.Partitioned``) or NNX variables. Paths are tuples of key names (strings),
as :func:`jax.tree_util.keystr` would spell them without the brackets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax

from eva_optax._src.vocabulary import views
from eva_optax._src.vocabulary.statistics import is_layer_statistics

Path = tuple[str, ...]

# Key under which the capture adds its zero probes to a layer node.
PROBE = "__eva_optax_probe__"


def path_str(path: Path) -> str:
  return "/".join(path) if path else "<root>"


def key_name(key: Any) -> str:
  """The plain name of a :func:`jax.tree_util` path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def is_layer(node: Any) -> bool:
  return views.weight_name(node) is not None


def _items(node: Mapping):
  return node.items()


def find_layers(tree: Any) -> dict[Path, Mapping]:
  """All layer nodes of a tree of mappings, by path."""
  found: dict[Path, Mapping] = {}

  def walk(node, path):
    if is_layer(node):
      found[path] = node
    elif isinstance(node, Mapping):
      for k, v in _items(node):
        walk(v, path + (str(k),))

  walk(tree, ())
  return found


def node_paths(tree: Any) -> set[Path]:
  """The paths of every mapping in a tree of mappings (the root included)."""
  found: set[Path] = set()

  def walk(node, path):
    if isinstance(node, Mapping):
      found.add(path)
      for k, v in _items(node):
        walk(v, path + (str(k),))

  walk(tree, ())
  return found


def _rebuild(node: Mapping, items: dict) -> Mapping:
  """A mapping of ``node``'s type with ``items`` (dict, FrozenDict, nnx.State)."""
  if type(node) is dict:
    return items
  try:
    return type(node)(items)
  except TypeError:
    return items


def map_layers(tree: Any, fn: Callable[[Path, Mapping], Mapping]) -> Any:
  """``tree`` with every layer node replaced by ``fn(path, node)``."""

  def walk(node, path):
    if is_layer(node):
      return fn(path, node)
    if isinstance(node, Mapping):
      return _rebuild(node, {k: walk(v, path + (str(k),)) for k, v in _items(node)})
    return node

  return walk(tree, ())


def with_probes(tree: Any, probes: dict[Path, Any]) -> Any:
  """``tree`` with ``probes[path]`` added under :data:`PROBE` to those layer nodes."""

  def add(path, node):
    if path not in probes:
      return node
    return _rebuild(node, {**dict(_items(node)), PROBE: probes[path]})

  return map_layers(tree, add)


def split_probes(tree: Any) -> tuple[Any, dict[Path, Any]]:
  """``(tree without probes, {path: probe subtree})`` (inverse of :func:`with_probes`)."""
  found: dict[Path, Any] = {}

  def walk(node, path):
    if isinstance(node, Mapping):
      if PROBE in node:
        found[path] = node[PROBE]
      return _rebuild(node, {k: walk(v, path + (str(k),))
                             for k, v in _items(node) if k != PROBE})
    return node

  return walk(tree, ()), found


def get_path(tree: Any, path: Path, default: Any = None) -> Any:
  node = tree
  for k in path:
    if not isinstance(node, Mapping):
      return default
    match = [v for kk, v in _items(node) if str(kk) == k]
    if not match:
      return default
    node = match[0]
  return node


def _original_keys(tree: Any, path: Path) -> tuple[Any, ...]:
  """The keys of ``tree`` (ints stay ints) along the string path ``path``."""
  keys, node = [], tree
  for k in path:
    match = [kk for kk in node.keys() if str(kk) == k] if isinstance(
        node, Mapping) else []
    if not match:
      return tuple(keys) + tuple(path[len(keys):])
    keys.append(match[0])
    node = node[match[0]]
  return tuple(keys)


def nest(by_path: dict[Path, Any], like: Any = None) -> Any:
  """Nested dicts keyed by the paths of ``by_path`` (a single root entry as is);
  with ``like``, the keys are ``like``'s own (e.g. the ints of an nnx.State)."""
  if list(by_path) == [()]:
    return by_path[()]
  out: dict[Any, Any] = {}
  for path, value in by_path.items():
    if not path:
      raise ValueError("a layer at the root path cannot be nested with others.")
    keys = _original_keys(like, path) if like is not None else path
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


def flatten_stats(stats: Any) -> dict[Path, Any]:
  """``{path: LayerStatistics}`` of a stats tree."""
  if is_layer_statistics(stats):
    return {(): stats}
  leaves = jax.tree_util.tree_flatten_with_path(
      stats, is_leaf=is_layer_statistics)[0]
  out = {}
  for kp, leaf in leaves:
    if is_layer_statistics(leaf):
      out[tuple(key_name(k) for k in kp)] = leaf
  return out


def leaves_like(treedef: Any, tree: Any, name: str) -> list[Any]:
  """``tree`` flattened up to ``treedef`` (the updates' structure), or a clear error."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{name}: the updates tree does not match the optimizer state (was the "
        "optimizer initialised with params of the same structure as these "
        f"gradients?): {e}") from e
