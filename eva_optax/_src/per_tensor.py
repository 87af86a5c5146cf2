"""What the per-tensor (gradient-only) preconditioners, Eva-s and Shampoo, share:
which leaves they precondition, and the check that a state belongs to the
gradients it is given."""

from __future__ import annotations

from typing import Any

import jax

from eva_optax._src import tree_utils


def is_preconditioned(leaf: Any) -> bool:
  """Tensors of rank >= 2 (kernels, conv kernels) are preconditioned; the rest
  get the graft's step."""
  return hasattr(leaf, "ndim") and leaf.ndim >= 2 and leaf.size > 0


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
