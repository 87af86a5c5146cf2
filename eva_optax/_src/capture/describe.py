"""A readable report of what the capture found and what each optimizer will do."""

from __future__ import annotations

from typing import Any

import jax

from eva_optax._src.vocabulary import tree_utils
from eva_optax._src.vocabulary import views


def describe(stats: Any, params: Any) -> str:
  """Lists every layer of ``params`` with its statistics and how it is treated.

  For each layer (a node with a ``kernel`` or an ``embedding``): its path, the
  layer type the capture saw, the shapes of its statistics, and how the
  layer-wise optimizers (Eva, Eva-f, K-FAC, FOOF) read it: the
  ``(d_in + 1, d_out)`` view, with the stack in front for stacked layers
  (``nn.scan``: ``4 x (65, 64)`` is four layers of that shape). A layer that
  is not captured says why; its parameters, and every parameter outside a
  layer, get the plain gradient (then momentum and the learning rate).

  Args:
    stats: the statistics from :func:`eva_optax.value_and_grad`.
    params: the parameters they belong to.

  Returns:
    A multi-line string (print it).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, eva_optax
    >>> model = nn.Sequential([nn.Dense(4), nn.LayerNorm(), nn.Dense(2)])
    >>> x = jnp.ones((3, 5))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
    >>> _, _, stats = eva_optax.value_and_grad(loss_fn)(params)
    >>> print(eva_optax.describe(stats, params))  # doctest: +NORMALIZE_WHITESPACE
    layer | type | statistics | preconditioned as
    layers_0 | Dense | a (6,), g (4,) | kernel + bias as (5 + 1, 4)
    layers_2 | Dense | a (5,), g (2,) | kernel + bias as (4 + 1, 2)
    plain gradient: layers_1/bias, layers_1/scale
  """
  by_path = tree_utils.flatten_stats(stats)
  layers = tree_utils.find_layers(params)
  lines = ["layer | type | statistics | preconditioned as"]
  covered = set()
  for path, node in layers.items():
    name = tree_utils.path_str(path)
    st = by_path.get(path)
    weight = views.weight_name(node)
    bias = st.view.bias_param if st is not None and st.view is not None else "bias"
    leaves = [weight] + ([bias] if views.bias_of(node, bias) is not None else [])
    covered.update(path + (k,) for k in leaves)
    if st is None:
      lines.append(f"{name} | ? | MISSING (layer-wise optimizers will raise) | -")
      continue
    if not st.captured:
      lines.append(f"{name} | {st.kind} | not captured: {st.note} | "
                   f"none (plain gradient for {', '.join(leaves)})")
      continue
    shapes = ", ".join(
        f"{k} {tuple(getattr(st, k).shape)}"
        for k in ("a", "g", "A", "G", "a_rows", "g_rows")
        if getattr(st, k) is not None)
    view = st.view.describe() if st.view is not None else "?"
    note = f" ({st.note})" if st.note else ""
    lines.append(f"{name} | {st.kind} | {shapes} | {' + '.join(leaves)} as "
                 f"{view}{note}")
  for path in by_path:
    if path not in layers:
      lines.append(f"{tree_utils.path_str(path)} | ? | statistics for a layer "
                   "params has not | -")
  plain = []
  for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    # A box's field (nn.Partitioned.value) is not part of the path; a module
    # named "value" (an attention projection) is.
    key = tuple(tree_utils.key_name(k) for k in kp
                if not isinstance(k, jax.tree_util.GetAttrKey))
    if key not in covered:
      plain.append("/".join(key))
  lines.append("plain gradient: " + (", ".join(plain) if plain else "(none)"))
  return "\n".join(lines)
