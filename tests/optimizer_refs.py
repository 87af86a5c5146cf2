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
from oracles import float32_tol
from oracles import inverse_root_apply_bound
from oracles import propagated_bound
from oracles import spectral_apply_bound
from oracles import to64

# ----------------------------------------------------------------------------
# The six optimizers as bare preconditioners (no KL scaling, momentum or lr),
# at dampings small enough that a wrong statistic changes the update. Shampoo's
# relative ridge 1e-4 (its default is 1e-6): one gradient gives rank-deficient
# statistics, and the ridge bounds its roots' condition number by ~1 / (4 eps),
# so its float32 bound (reference_tol) stays far below what a 1% error in the
# gradient does, as in tests/test_shampoo.py.

LAYERWISE = ("eva", "eva_f", "kfac", "foof")
OPTIMIZERS = LAYERWISE + ("eva_s", "shampoo")
SMALL_DAMPING = {"eva": 1e-6, "eva_f": 1e-4, "kfac": 1e-3, "foof": 1e-2,
                 "eva_s": 1e-9, "shampoo": 1e-4}


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
  statistics (an object or a dict with ``a``, ``g``, ``A``, ``G``; unused by
  Eva-s and Shampoo). The kernel's leading axes (all but
  the last) are its input side, as for Dense, DenseGeneral, Conv and Embed.
  """
  damping = SMALL_DAMPING[name] if damping is None else damping
  if name in ("eva_s", "shampoo"):
    fn = eva_s_reference if name == "eva_s" else shampoo_reference
    return {k: fn(v, damping) for k, v in node.items()}
  get = (lambda k: st.get(k)) if isinstance(st, dict) else (lambda k: getattr(st, k, None))
  st = {k: to64(get(k)) for k in ("a", "g", "A", "G") if get(k) is not None}
  d_in = len(st["a"] if "a" in st else st["A"]) - int("bias" in node)
  u = layerwise_reference(name, layer_matrix(node, d_in), st, damping)
  return matrix_to_node(u, node)


# ----------------------------------------------------------------------------
# The float32 bound of the library's step against those references.


def _layerwise_bound(name: str, gm: np.ndarray, st: dict[str, np.ndarray], damping: float,
                     input_ops: Any) -> np.ndarray:
  """Entrywise bound on ``layerwise_reference(name, gm, st, damping)``'s float32 error.

  Componentwise (:func:`~oracles.propagated_bound`): every input carries
  ``input_ops`` roundings (where the library's inputs are its own float32 ones
  and the reference's another program's; a number, or a dict by "gm", "a",
  "g", "A", "G" of numbers or arrays like the input) plus the method's own: Eva's and
  Eva-f's closed forms ``d_a + d_out + 4`` on every input, K-FAC's and FOOF's
  products with the inverses ``n_A + n_G`` (FOOF: ``2 n + 2``) on G_hat, the
  traces of K-FAC's pi ``n`` on each factor, a float32 damping one. Then the
  factorizations' normwise backward errors (:func:`~oracles.spectral_apply_bound`):
  Cholesky of each damped K-FAC factor ``3 n + 1``, FOOF's eigh ``n + 1``; a
  diagonal factor (an embedding's) is divided entry by entry, componentwise.
  """
  keys = [k for k in ("a", "g", "A", "G") if k in st]
  fn = lambda gm, d, *vals: layerwise_reference(name, gm, dict(zip(keys, vals)), float(d))
  d_a, d_out = gm.shape
  own = {"eva": dict.fromkeys(["gm", "a", "g", "d"], d_a + d_out + 4),
         "eva_f": dict.fromkeys(["gm", "a", "d"], d_a + d_out + 4),
         "kfac": {"gm": d_a + d_out, "A": d_a, "G": d_out, "d": 1},
         "foof": {"gm": 2 * d_a + 2, "d": 1}}[name]
  extra = input_ops if isinstance(input_ops, dict) else dict.fromkeys(
      ["gm"] + keys, input_ops)
  pairs = [(gm, extra.get("gm", 0.0) + own.get("gm", 0)), (np.float64(damping), own["d"])]
  pairs += [(st[k], extra.get(k, 0.0) + own.get(k, 0)) for k in keys]
  bound = propagated_bound(fn, *pairs)
  a_f = st.get("A")
  if name == "kfac" and a_f.ndim == 2:
    g_f = st["G"]
    pi = np.sqrt((np.trace(a_f) / len(a_f)) / (np.trace(g_f) / len(g_f)))
    a_d = a_f + np.sqrt(damping) * pi * np.eye(len(a_f))
    g_d = g_f + np.sqrt(damping) / pi * np.eye(len(g_f))
    a_inv, g_inv = np.linalg.inv(a_d), np.linalg.inv(g_d)
    spectral = (inverse_root_apply_bound(a_d, 1, 0.0, gm @ g_inv, 3 * d_a + 1)
                + inverse_root_apply_bound(g_d, 1, 0.0, (a_inv @ gm).T, 3 * d_out + 1))
  elif name == "foof" and a_f.ndim == 2:
    f = lambda lam: 1.0 / (lam + damping)
    spectral = spectral_apply_bound(a_f, f, lambda lam: -f(lam) ** 2, gm, d_a + 1)
  else:
    spectral = 0.0
  # The normwise part, spread over the entries in proportion to |reference|.
  ref = np.abs(fn(gm, damping, *(st[k] for k in keys)))
  return bound + spectral * ref / np.linalg.norm(ref)


def _per_tensor_bound(name: str, t: np.ndarray, damping: float, input_ops: float) -> np.ndarray:
  """Entrywise bound on :func:`eva_s_reference` / :func:`shampoo_reference`'s float32 error.

  Eva-s: its axis means, closed form and graft (``2 t.size + 4`` roundings on
  t, as tests/test_eva_s.py). Shampoo: its statistics' and eigh's normwise
  backward errors on each root applied to the rest of the product
  (:func:`~oracles.inverse_root_apply_bound`, ops as tests/test_shampoo.py),
  the products and the graft componentwise on t.
  """
  fn = eva_s_reference if name == "eva_s" else shampoo_reference
  if t.ndim < 2:   # the gradient, grafted to its own norm: two norms of t.size terms
    return propagated_bound(lambda t: t * np.linalg.norm(t) / np.linalg.norm(t),
                            (t, input_ops + 2 * t.size + 4))
  if name == "eva_s":
    return propagated_bound(lambda t: fn(t, damping), (t, input_ops + 2 * t.size + 4))
  g = t.reshape(-1, t.shape[-1])
  m, n = g.shape
  bound = propagated_bound(lambda t: fn(t, damping), (t, input_ops + m + n + t.size + 2))
  left, right = g @ g.T, g.T @ g
  lam = lambda s: max(np.linalg.eigvalsh(s).max(), float(np.finfo(np.float32).tiny))
  inv_root = lambda s: _inv_root(s + damping * lam(s) * np.eye(len(s)), 4)
  l_root, r_root = inv_root(left), inv_root(right)
  p = l_root @ g @ r_root
  spectral = 0.0
  for stat, other, y in ((left, n, g @ r_root), (right, m, (l_root @ g).T)):
    size = len(stat)
    ops = size + (other + 1 + size + 1) * np.trace(stat) / lam(stat)
    spectral += inverse_root_apply_bound(stat, 4, damping, y, ops)
  ref = np.abs(fn(t, damping))
  # Relative to P before the graft, which only rescales.
  return bound + spectral / np.linalg.norm(p) * np.linalg.norm(t) * ref / np.linalg.norm(ref)


def reference_tol(name: str, node: Any, st: Any, damping: float | None = None,
                  input_ops: Any = 0.0) -> dict[str, float]:
  """Per leaf of :func:`reference_update`, the relative float32 bound of the library's step.

  ``input_ops``: roundings by which the library's gradient and statistics may
  differ from the ones given here (0 when the test passes the library's own;
  per input as in :func:`_layerwise_bound`).
  """
  damping = SMALL_DAMPING[name] if damping is None else damping
  if name in ("eva_s", "shampoo"):
    ref = reference_update(name, node, st, damping)
    return {k: float(np.linalg.norm(_per_tensor_bound(name, to64(v), damping, input_ops))
                     / np.linalg.norm(ref[k])) for k, v in node.items()}
  get = (lambda k: st.get(k)) if isinstance(st, dict) else (lambda k: getattr(st, k, None))
  st64 = {k: to64(get(k)) for k in ("a", "g", "A", "G") if get(k) is not None}
  d_in = len(st64["a"] if "a" in st64 else st64["A"]) - int("bias" in node)
  gm = layer_matrix(node, d_in)
  ref = matrix_to_node(layerwise_reference(name, gm, st64, damping), node)
  bound = matrix_to_node(_layerwise_bound(name, gm, st64, damping, input_ops), node)
  return {k: float(np.linalg.norm(bound[k]) / np.linalg.norm(ref[k])) for k in ref}

