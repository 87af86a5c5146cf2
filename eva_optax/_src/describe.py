"""A readable report of what the capture found and what each optimizer will do."""

from __future__ import annotations

from typing import Any

import jax

from eva_optax._src import tree_utils


def describe(stats: Any, params: Any) -> str:
  """Lists every layer of ``params`` with its statistics and how it is treated.

  For each module path: the layer type, the shapes of its statistics, and which
  parameters the layer-wise optimizers (Eva, Eva-f, K-FAC, FOOF) precondition;
  every other parameter gets the plain gradient (then momentum, learning rate).

  Args:
    stats: the statistics from :func:`eva_optax.value_and_grad`.
    params: the parameters they belong to.

  Returns:
    A multi-line string (print it).
  """
  by_path = tree_utils.flatten_stats(stats)
  layers = tree_utils.find_layers(params)
  lines = ["module path | layer | statistics | preconditioned"]
  covered = set()
  for path, node in layers.items():
    name = tree_utils.path_str(path)
    st = by_path.get(path)
    d_in, d_out, has_bias = tree_utils.layer_dims(node)
    leaves = ["kernel"] + (["bias"] if has_bias else [])
    if st is None:
      lines.append(f"{name} | ? | MISSING (layer-wise optimizers will raise) | -")
      continue
    if not st.captured:
      lines.append(f"{name} | {st.kind} | not captured: {st.note} | "
                   f"none (plain gradient for {', '.join(leaves)})")
      covered.update(path + (k,) for k in leaves)
      continue
    shapes = ", ".join(
        f"{k} {tuple(getattr(st, k).shape)}"
        for k in ("a", "g", "A", "G", "a_rows", "g_rows")
        if getattr(st, k) is not None)
    lines.append(f"{name} | {st.kind} | {shapes} | "
                 f"{' + '.join(leaves)} as ({d_in}{' + 1' if has_bias else ''}, {d_out})")
    covered.update(path + (k,) for k in leaves)
  extra = [tree_utils.path_str(p) for p in by_path if p not in layers]
  for name in extra:
    lines.append(f"{name} | ? | statistics for a layer params has not | -")
  plain = []
  for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = tuple(tree_utils.key_name(k) for k in kp)
    if key not in covered:
      plain.append("/".join(key))
  lines.append("plain gradient: " + (", ".join(plain) if plain else "(none)"))
  return "\n".join(lines)
