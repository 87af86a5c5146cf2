"""Shared helpers for the eva_optax tests: small models and float64 NumPy oracles.

Everything here is written independently of the library: im2col, the layer
view of a gradient and the dense solves are plain NumPy, so the tests compare
the library against a second implementation, not against itself.

Import the plain functions with ``from conftest import ...``.
"""

from __future__ import annotations

import os

# XLA's CPU compiler dominates this suite's time; these flags cut its CPU time
# about 3x for the small test programs (no LLVM optimization, no fusion
# emitters). They change no result beyond float32 rounding, which every test
# tolerates; subprocesses (examples, multi-device) inherit them. Set before any
# backend starts; a user's own XLA_FLAGS come first and win.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false "
                      "--xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = " ".join(
    [FAST_COMPILE_FLAGS, os.environ.get("XLA_FLAGS", "")]).strip()

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import itertools  # pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


# ----------------------------------------------------------------------------
# NumPy oracles.


def to64(x: Any) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def rel_err(x: Any, ref: Any) -> float:
  """``|x - ref| / |ref|`` (Frobenius), in float64."""
  x, ref = to64(x), to64(ref)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def assert_trees_close(actual: Any, expected: Any, *, rtol: float = 1e-5,
                       atol: float = 1e-6) -> None:
  """Same tree structure, same leaf shapes, and leaves close (chex names the failing path)."""
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_shapes(actual, expected)
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def assert_like_params(updates: Any, params: Any) -> None:
  """``updates`` mirrors ``params``: structure, shapes and dtypes (an optax update's contract)."""
  chex.assert_trees_all_equal_structs(updates, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)


def same_padding(spatial: tuple[int, ...], kernel_size: tuple[int, ...],
                 strides: tuple[int, ...],
                 dilation: tuple[int, ...]) -> list[tuple[int, int]]:
  """XLA's 'SAME' padding: output ceil(in / stride), extra padding on the high side."""
  pads = []
  for n, k, s, d in zip(spatial, kernel_size, strides, dilation):
    out = -(-n // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
    pads.append((total // 2, total - total // 2))
  return pads


def im2col(x: Any, kernel_size: tuple[int, ...], strides: tuple[int, ...] | None = None,
           padding: Any = "VALID",
           dilation: tuple[int, ...] | None = None) -> np.ndarray:
  """Image patches of ``x`` (batch, *spatial, C) as (batch, positions, d_in), float64.

  Zero padding, strides and kernel dilation as in ``jax.lax.conv_general_dilated``;
  each patch is flattened in the Flax kernel's order (kh, kw, ..., C_in), and the
  positions in row-major order of the output grid.
  """
  x = to64(x)
  nd = len(kernel_size)
  strides = tuple(strides or (1,) * nd)
  dilation = tuple(dilation or (1,) * nd)
  spatial = x.shape[1:1 + nd]
  if padding == "VALID":
    pads = [(0, 0)] * nd
  elif padding == "SAME":
    pads = same_padding(spatial, kernel_size, strides, dilation)
  else:
    pads = [tuple(p) for p in padding]
  xp = np.pad(x, [(0, 0)] + pads + [(0, 0)])
  out = [(n + lo + hi - d * (k - 1) - 1) // s + 1
         for n, (lo, hi), k, s, d in zip(spatial, pads, kernel_size, strides, dilation)]
  batch, c_in = x.shape[0], x.shape[-1]
  patches = np.zeros((batch, int(np.prod(out)), int(np.prod(kernel_size)) * c_in))
  for p, o in enumerate(itertools.product(*(range(n) for n in out))):
    cols = []
    for k in itertools.product(*(range(n) for n in kernel_size)):
      idx = tuple(oi * s + ki * d for oi, ki, s, d in zip(o, k, strides, dilation))
      cols.append(xp[(slice(None),) + idx])  # (batch, C_in)
    patches[:, p] = np.concatenate(cols, axis=-1)
  return patches


def with_one(rows: Any) -> np.ndarray:
  """Appends the bias coordinate 1 to every row."""
  rows = to64(rows)
  return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1)


def layer_view(node: Any) -> np.ndarray:
  """``[kernel_2d; bias]`` of shape (d_in + 1, d_out), float64.

  The kernel is flattened in its own memory order to (d_in, d_out), where
  d_out is the bias size (all output feature axes together).
  """
  bias = to64(node["bias"]).reshape(-1)
  kernel = to64(node["kernel"]).reshape(-1, bias.size)
  return np.concatenate([kernel, bias[None]], axis=0)


def eva_dense_solve(gmat: Any, a: Any, g: Any, damping: float) -> np.ndarray:
  """``(v v^T + damping I)^{-1} vec(G_hat)``, ``v = a (x) g``, as an explicit dense solve.

  ``vec`` is the row-major flatten of the (d_a, d_out) layer view, under which
  ``vec(a g^T) = kron(a, g)``.
  """
  gmat, a, g = to64(gmat), to64(a), to64(g)
  v = np.kron(a, g)
  fisher = np.outer(v, v) + damping * np.eye(v.size)
  return np.linalg.solve(fisher, gmat.reshape(-1)).reshape(gmat.shape)


def eva_f_dense_solve(gmat: Any, a: Any, damping: float) -> np.ndarray:
  """``(a a^T + damping I)^{-1} G_hat`` in the (d_a, d_out) view, as a dense solve."""
  gmat, a = to64(gmat), to64(a)
  return np.linalg.solve(np.outer(a, a) + damping * np.eye(a.size), gmat)


def eva_closed_form(gmat: Any, a: Any, g: Any, damping: float) -> np.ndarray:
  """The Sherman-Morrison form of :func:`eva_dense_solve` (float64), for many layers."""
  gmat, a, g = to64(gmat), to64(a), to64(g)
  c = a @ gmat @ g
  return (gmat - c / (damping + (a @ a) * (g @ g)) * np.outer(a, g)) / damping


# ----------------------------------------------------------------------------
# The captured layer types, with an independent description of their rows.


@dataclasses.dataclass(frozen=True)
class LayerCase:
  """One captured layer type: how to build it and how its input becomes rows."""

  name: str
  make: Callable[[], nn.Module]
  x_shape: tuple[int, ...]
  conv: dict[str, Any] | None = None   # im2col arguments for conv layers
  dg_axes: int = 0                     # DenseGeneral: number of trailing input axes contracted

  def rows(self, x: Any) -> np.ndarray:
    """Layer input as (examples, positions, d_in), float64, without the bias 1."""
    x = to64(x)
    if self.conv is not None:
      return im2col(x, **self.conv)
    if self.dg_axes:
      lead = x.shape[:x.ndim - self.dg_axes]
      x = x.reshape(lead + (-1,))
    return x.reshape(x.shape[0], -1, x.shape[-1])


LAYER_CASES = (
    LayerCase("dense", lambda: nn.Dense(4), (6, 5)),
    LayerCase("dense_tokens", lambda: nn.Dense(3), (4, 3, 5)),
    LayerCase("dense_general", lambda: nn.DenseGeneral(features=(2, 3), axis=(-2, -1)),
              (5, 4, 3), dg_axes=2),
    LayerCase("conv2d_stride2_same",
              lambda: nn.Conv(4, (3, 3), strides=2, padding="SAME"), (3, 8, 8, 3),
              conv=dict(kernel_size=(3, 3), strides=(2, 2), padding="SAME")),
    LayerCase("conv1d", lambda: nn.Conv(3, (3,), strides=(2,), padding="VALID"),
              (4, 9, 2), conv=dict(kernel_size=(3,), strides=(2,), padding="VALID")),
    LayerCase("conv_pad_dilation",
              lambda: nn.Conv(3, (2, 3), padding=((1, 2), (0, 1)), kernel_dilation=(2, 1)),
              (3, 6, 5, 2),
              conv=dict(kernel_size=(2, 3), padding=((1, 2), (0, 1)), dilation=(2, 1))),
)


def case_ids(cases=LAYER_CASES) -> list[str]:
  return [c.name for c in cases]


@dataclasses.dataclass
class SingleLayerProblem:
  """A one-layer model with a quadratic loss whose dL/dy is known in closed form.

  ``loss(params) = 0.5 * sum((y - target)^2) / B`` (a batch mean), so every row
  of ``dL/dy`` is ``(y_row - target_row) / B``. ``rows`` (examples, positions,
  d_in) and ``dy`` (examples, positions, d_out) are float64 and computed in NumPy
  from the raw input (im2col for conv), not by the library.
  """

  model: nn.Module
  params: Any
  x: jax.Array
  target: jax.Array
  rows: np.ndarray
  dy: np.ndarray
  y: jax.Array

  def loss(self, params, x=None):
    x = self.x if x is None else x
    y = self.model.apply({"params": params}, x)
    return 0.5 * jnp.sum((y - self.target) ** 2) / x.shape[0]

  @property
  def a(self) -> np.ndarray:
    """Mean over all rows of [x_row, 1]."""
    return with_one(self.rows.reshape(-1, self.rows.shape[-1])).mean(axis=0)

  @property
  def g(self) -> np.ndarray:
    """Mean over all rows of dL/dy."""
    return self.dy.reshape(-1, self.dy.shape[-1]).mean(axis=0)


def single_layer_problem(case: LayerCase, seed: int = 0, x_mean: float = 1.0,
                         target_shift: float = -2.0) -> SingleLayerProblem:
  """Builds :class:`SingleLayerProblem` for a layer case, inputs with non-zero mean."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=case.x_shape) + x_mean, jnp.float32)
  model = case.make()
  params = model.init(jax.random.PRNGKey(seed), x)["params"]
  y = model.apply({"params": params}, x)
  target = jnp.asarray(rng.normal(size=y.shape) + target_shift, jnp.float32)
  rows = case.rows(x)
  w_hat = layer_view(params)
  y_rows = with_one(rows) @ w_hat              # (examples, positions, d_out)
  y_ref = y_rows.reshape(y.shape)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4,
                             err_msg=f"the test's own im2col/layer view is wrong for {case.name}")
  t_rows = to64(target).reshape(y_rows.shape)
  dy = (y_rows - t_rows) / x.shape[0]
  return SingleLayerProblem(model=model, params=params, x=x, target=target,
                            rows=rows, dy=dy, y=y)


# ----------------------------------------------------------------------------
# Small multi-layer models.


class MLP(nn.Module):
  """Dense -> tanh -> Dense -> tanh -> Dense."""

  features: tuple[int, ...] = (8, 6, 3)
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f, param_dtype=self.param_dtype)(x)
      if i < len(self.features) - 1:
        x = jnp.tanh(x)
    return x


class ConvNet(nn.Module):
  """Conv -> relu -> Conv(stride 2) -> mean pool -> LayerNorm -> Dense."""

  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), param_dtype=self.param_dtype)(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, param_dtype=self.param_dtype)(x))
    x = x.mean(axis=(1, 2))
    x = nn.LayerNorm(param_dtype=self.param_dtype)(x)
    return nn.Dense(3, param_dtype=self.param_dtype)(x)


def regression_batch(batch: int = 16, d_in: int = 5, d_out: int = 3, seed: int = 0):
  """``(x, y)`` with ``y`` a fixed smooth function of ``x`` (a learnable target)."""
  rng = np.random.default_rng(seed)
  w = np.random.default_rng(1234).normal(size=(d_in, d_out)) / np.sqrt(d_in)
  x = rng.normal(size=(batch, d_in)) + 0.5
  y = np.tanh(x @ w) + 0.1
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def mse_loss(model: nn.Module):
  """``loss(params, x, y)``: mean squared error of ``model``."""

  def loss(params, x, y):
    out = model.apply({"params": params}, x)
    return jnp.mean(jnp.sum((out - y.astype(out.dtype)) ** 2, axis=-1).astype(jnp.float32))

  return loss


@pytest.fixture
def mlp_problem():
  """``(model, params, loss, x, y)`` for a small 3-layer MLP regression."""
  model = MLP()
  x, y = regression_batch()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  return model, params, mse_loss(model), x, y


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
