"""The six optimizers as bare preconditioners, and float64 NumPy references of
one preconditioning step of each, written independently of the library
(re-exported by conftest)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from oracles import eva_dense_solve
from oracles import eva_f_dense_solve
from oracles import to64

# ----------------------------------------------------------------------------
# The six optimizers as bare preconditioners (no KL scaling, momentum or lr),
# at dampings small enough that a wrong statistic changes the update.

LAYERWISE = ("eva", "eva_f", "kfac", "foof")
OPTIMIZERS = LAYERWISE + ("eva_s", "shampoo")
SMALL_DAMPING = {"eva": 1e-6, "eva_f": 1e-4, "kfac": 1e-3, "foof": 1e-2,
                 "eva_s": 1e-9, "shampoo": 1e-6}


def preconditioner(name: str, damping: float | None = None, *,
                   layer_views: Any = None):
  """``scale_by_<name>`` with a small damping, the new statistic's weight 1, and
  no KL scaling (each layer's update depends on that layer alone);
  ``layer_views`` is passed on when given."""
  import eva_optax  # pylint: disable=g-import-not-at-top
  damping = SMALL_DAMPING[name] if damping is None else damping
  views = {} if layer_views is None else {"layer_views": layer_views}
  if name == "eva":
    return eva_optax.scale_by_eva(damping, 1.0, **views)
  if name == "eva_f":
    return eva_optax.scale_by_eva_f(damping, 1.0, **views)
  if name == "kfac":
    return eva_optax.scale_by_kfac(damping, 1.0, **views)
  if name == "foof":
    return eva_optax.scale_by_foof(damping, 1.0, **views)
  if name == "eva_s":
    return eva_optax.scale_by_eva_s(damping, **views)
  if name == "shampoo":
    return eva_optax.scale_by_shampoo(damping, start_preconditioning_step=0, **views)
  raise ValueError(f"unknown optimizer {name!r}")


def cosine(x: Any, y: Any) -> float:
  x, y = to64(x).ravel(), to64(y).ravel()
  return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def numpy_init(model: nn.Module, *args: Any, seed: int = 0, **kwargs: Any) -> Any:
  """``model.init(...)["params"]`` filled with NumPy random numbers (no XLA compile).

  Shapes (and boxes, e.g. ``nn.LogicallyPartitioned``) come from
  :func:`jax.eval_shape`; kernels and embeddings get ``N(0, 1/m)`` with ``m``
  the largest of their axes but the last, biases and other leaves
  ``N(0, 0.1^2)``, in the dtype the model declares.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), *args, **kwargs)

  def fill(kp, s):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in kp]
    names = [n for n in names if n != "value"]   # the field of a metadata box
    name = names[-1] if names else ""
    if name in ("kernel", "embedding") and len(s.shape) >= 2:
      scale = 1.0 / np.sqrt(max(s.shape[:-1]))
    else:
      scale = 0.1
    return jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes["params"])


# ----------------------------------------------------------------------------
# NumPy references of one preconditioning step of each optimizer (float64),
# for the first update (the running averages are the statistics themselves).


def layer_matrix(node: Any, d_in: int) -> np.ndarray:
  """``[kernel as (d_in, d_out); bias]`` of a layer node (kernel or embedding)."""
  w = node["kernel"] if "kernel" in node else node["embedding"]
  m = to64(w).reshape(d_in, -1)
  if "bias" in node:
    m = np.concatenate([m, to64(node["bias"]).reshape(1, -1)], axis=0)
  return m


def matrix_to_node(m: np.ndarray, like: Any) -> dict[str, np.ndarray]:
  """Inverse of :func:`layer_matrix`, shaped like the leaves of ``like``."""
  name = "kernel" if "kernel" in like else "embedding"
  shape = np.shape(like[name])
  out = {name: m[:m.shape[0] - int("bias" in like)].reshape(shape)}
  if "bias" in like:
    out["bias"] = m[-1].reshape(np.shape(like["bias"]))
  return out


def _inv_root(m: np.ndarray, p: int) -> np.ndarray:
  d, q = np.linalg.eigh(m)
  return (q * np.maximum(d, 1e-300) ** (-1.0 / p)) @ q.T


def layerwise_reference(name: str, gm: Any, st: Any, damping: float) -> np.ndarray:
  """One step of ``scale_by_<name>`` (no KL scaling) on the layer matrix ``gm``.

  ``st`` has ``a``, ``g`` (and ``A``, ``G`` for K-FAC / FOOF; an ``A`` given as
  a vector is a diagonal factor, as for embeddings).
  """
  gm = to64(gm)
  if name == "eva":
    return eva_dense_solve(gm, st["a"], st["g"], damping)
  if name == "eva_f":
    return eva_f_dense_solve(gm, st["a"], damping)
  a_f = to64(st["A"])
  a_f = np.diag(a_f) if a_f.ndim == 1 else a_f
  if name == "foof":
    return np.linalg.solve(a_f + damping * np.eye(len(a_f)), gm)
  if name == "kfac":
    g_f = to64(st["G"])
    pi = np.sqrt((np.trace(a_f) / len(a_f)) / (np.trace(g_f) / len(g_f)))
    left = np.linalg.inv(a_f + np.sqrt(damping) * pi * np.eye(len(a_f)))
    right = np.linalg.inv(g_f + np.sqrt(damping) / pi * np.eye(len(g_f)))
    return left @ gm @ right
  raise ValueError(name)


def eva_s_reference(t: Any, damping: float) -> np.ndarray:
  """First Eva-s step (``stat_decay=None``, ``graft="sgd"``) on one tensor.

  ``s_i`` = mean of ``t`` over every axis but ``i``, ``u = s_1 o ... o s_r``,
  ``P = (t - <t, u> / (gamma + prod |s_i|^2) u) / gamma``, grafted to ``|t|``.
  Tensors of rank <= 1 keep their gradient.
  """
  t = to64(t)
  if t.ndim < 2:
    return t
  s = [t.mean(axis=tuple(j for j in range(t.ndim) if j != i)) for i in range(t.ndim)]
  u = s[0]
  for v in s[1:]:
    u = np.multiply.outer(u, v)
  mu = np.prod([v @ v for v in s])
  p = t - np.sum(t * u) / (damping + mu) * u
  return p / np.linalg.norm(p) * np.linalg.norm(t)


def shampoo_reference(t: Any, eps: float) -> np.ndarray:
  """First Shampoo step (preconditioning from step 0, one block, ``graft="sgd"``).

  ``G = t`` as ``(prod(shape[:-1]), shape[-1])``, ``L = G G^T``, ``R = G^T G``,
  ``P = (L + eps l_max I)^{-1/4} G (R + eps r_max I)^{-1/4}``, grafted to ``|t|``.
  """
  t = to64(t)
  if t.ndim < 2:
    return t
  g = t.reshape(-1, t.shape[-1])
  left, right = g @ g.T, g.T @ g
  left_root = _inv_root(left + eps * np.linalg.eigvalsh(left).max() * np.eye(len(left)), 4)
  right_root = _inv_root(right + eps * np.linalg.eigvalsh(right).max() * np.eye(len(right)), 4)
  p = left_root @ g @ right_root
  return (p / np.linalg.norm(p) * np.linalg.norm(t)).reshape(t.shape)


def reference_update(name: str, node: Any, st: Any, damping: float | None = None
                     ) -> dict[str, np.ndarray]:
  """One step of :func:`preconditioner` ``(name)`` on one layer node, in NumPy.

  ``node`` is the layer's gradient ``{kernel|embedding, bias?}``; ``st`` its
  statistics (unused by Eva-s and Shampoo). The kernel's leading axes (all but
  the last) are its input side, as for Dense, DenseGeneral, Conv and Embed.
  """
  damping = SMALL_DAMPING[name] if damping is None else damping
  if name in ("eva_s", "shampoo"):
    fn = eva_s_reference if name == "eva_s" else shampoo_reference
    return {k: fn(v, damping) for k, v in node.items()}
  d_in = len(np.asarray(st["a"])) - int("bias" in node)
  st = {k: to64(getattr(st, k)) for k in ("a", "g", "A", "G")
        if getattr(st, k, None) is not None}
  u = layerwise_reference(name, layer_matrix(node, d_in), st, damping)
  return matrix_to_node(u, node)
