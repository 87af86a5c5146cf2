"""What the per-tensor (gradient-only) preconditioners, Eva-s and Shampoo, share:
which leaves they precondition, which leading axes of a leaf are a stack of
layers (``nn.scan``, ``nn.vmap``: each slice is preconditioned as its own
tensor), and the check that a state belongs to the gradients it is given."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from eva_optax._src import layer_match
from eva_optax._src import tree_utils


def is_preconditioned(leaf: Any, depth: int = 0) -> bool:
  """Tensors of rank >= 2 (kernels, conv kernels) are preconditioned; the rest
  get the graft's step. ``depth`` leading axes are a stack of layers, not part
  of the tensor."""
  return hasattr(leaf, "ndim") and leaf.ndim - depth >= 2 and leaf.size > 0


def stack_depths(tree: Any, layer_views: Any) -> list[int]:
  """Per leaf of ``tree`` (in flattening order), how many leading axes are a
  stack of layers.

  A leaf of a layer in ``layer_views`` (from :func:`eva_optax.layer_views` or
  the statistics) has its layer's ``len(view.stack)``. Any other leaf (a
  LayerNorm's scale inside an ``nn.scan`` block) takes the stack of the
  nearest enclosing module that holds layers, when all of them share one stack
  and the leaf's leading axes match it; otherwise 0.
  """
  given = layer_match.views_from(layer_views)
  if not given:
    return [0] * len(jax.tree.leaves(tree))
  depths = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = tuple(tree_utils.key_name(k) for k in path
                  if not isinstance(k, jax.tree_util.GetAttrKey))
    view = next((given[names[:n]] for n in range(len(names), -1, -1)
                 if names[:n] in given), None)
    if view is not None:
      depths.append(len(view.stack))
      continue
    depth = 0
    for n in range(len(names) - 1, -1, -1):
      inside = {v.stack for p, v in given.items() if p[:n] == names[:n]}
      if inside:
        stack = next(iter(inside))
        if (len(inside) == 1 and stack
            and tuple(getattr(leaf, "shape", ())[:len(stack)]) == stack):
          depth = len(stack)
        break
    depths.append(depth)
  return depths


def over_stack(fn: Callable[..., Any], depth: int, **vmap_kwargs: Any
               ) -> Callable[..., Any]:
  """``fn`` of one slice, mapped over ``depth`` leading stack axes."""
  for _ in range(depth):
    fn = jax.vmap(fn, **vmap_kwargs)
  return fn


def named_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
  """``(names, leaves, treedef)``; names are :func:`jax.tree_util.keystr` paths."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [jax.tree_util.keystr(path) for path, _ in with_path]
  return names, [leaf for _, leaf in with_path], treedef


def leaves_like(treedef: Any, tree: Any, name: str) -> list[Any]:
  """``tree`` flattened up to the updates' structure, or a ValueError."""
  return tree_utils.leaves_like(treedef, tree, name)


def raise_mismatch(optimizer: str, leaf: str, got: Any, initialised: Any) -> None:
  """The ValueError for a gradient whose shape is not the one the state is for."""
  got = tuple(got)
  raise ValueError(
      f"{optimizer}: the gradient of leaf {leaf or '<root>'} has shape {got}, "
      f"but the optimizer state was initialised for {initialised}. The "
      "optimizer was initialised with other parameters than these gradients "
      "belong to: call tx.init(params) with this model's params.")
