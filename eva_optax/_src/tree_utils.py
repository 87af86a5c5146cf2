"""Walking parameter trees by module path (the pairing of params and stats)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from eva_optax._src.statistics import is_layer_statistics

Path = tuple[str, ...]
_MISSING = object()


def path_str(path: Path) -> str:
  return "/".join(path) if path else "<root>"


def key_name(key: Any) -> str:
  """The plain name of a :func:`jax.tree_util` path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def is_layer(node: Any) -> bool:
  """A params node is a layer if it maps ``kernel`` to an array of rank >= 2."""
  if not isinstance(node, Mapping) or "kernel" not in node:
    return False
  kernel = node["kernel"]
  return hasattr(kernel, "ndim") and kernel.ndim >= 2


def find_layers(params: Any) -> dict[Path, Mapping]:
  """All layers (see :func:`is_layer`) of a nested-mapping params tree."""
  found: dict[Path, Mapping] = {}

  def walk(node, path):
    if is_layer(node):
      found[path] = node
    elif isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, path + (str(k),))

  walk(params, ())
  return found


def layer_dims(node: Mapping) -> tuple[int, int, bool]:
  """``(d_in, d_out, has_bias)`` of a layer's 2-D view ``kernel -> (d_in, d_out)``.

  ``d_out`` is the size of the bias when there is one (this covers DenseGeneral
  with several feature axes), else the kernel's last axis.
  """
  kernel = node["kernel"]
  bias = node.get("bias")
  has_bias = bias is not None and hasattr(bias, "size")
  d_out = int(bias.size) if has_bias else int(kernel.shape[-1])
  return int(kernel.size) // d_out, d_out, has_bias


def get_path(tree: Any, path: Path, default: Any = _MISSING) -> Any:
  node = tree
  for k in path:
    if is_layer_statistics(node) or not isinstance(node, Mapping) or k not in node:
      if default is _MISSING:
        raise KeyError(path)
      return default
    node = node[k]
  return node


def has_path(tree: Any, path: Path) -> bool:
  return get_path(tree, path, None) is not None


def nest_like_params(by_path: dict[Path, Any], params: Any) -> Any:
  """Nests ``{module_path: value}`` like ``params`` (also under a 'params' key)."""
  prefix: Path = ()
  paths = list(by_path)
  if paths and isinstance(params, Mapping) and "params" in params:
    if not any(has_path(params, p) for p in paths) and any(
        has_path(params["params"], p) for p in paths):
      prefix = ("params",)
  if paths == [()] and not prefix:
    return by_path[()]
  out: dict[str, Any] = {}
  for path, value in by_path.items():
    full = prefix + path
    if not full:
      raise ValueError("a layer at the root path cannot be nested with others.")
    node = out
    for k in full[:-1]:
      node = node.setdefault(k, {})
    node[full[-1]] = value
  return out


def flatten_stats(stats: Any) -> dict[Path, Any]:
  """``{module_path: LayerStatistics}`` of a stats tree."""
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
