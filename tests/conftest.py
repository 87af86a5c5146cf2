"""Shared helpers for the eva_optax tests: small models and float64 NumPy oracles.

Everything here is written independently of the library: im2col, the layer
view of a gradient and the dense solves are plain NumPy, so the tests compare
the library against a second implementation, not against itself.

Import the plain functions with ``from conftest import ...``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

# XLA's CPU compiler dominates this suite's time; the fast-compile flags of
# examples/harness/xla_flags.py (no LLVM optimization, no fusion emitters, one
# codegen split) cut its CPU time about 3x for the small test programs. They
# change no result beyond float32 rounding, which every test tolerates. Only the
# flags the installed jaxlib accepts are used (an unknown flag aborts XLA); the
# probe's answer is cached in the environment, so subprocesses (examples,
# multi-device scripts) inherit both the flags and the answer. Set before any
# backend starts; a user's own XLA_FLAGS come last and win. The module is loaded
# from its file: the `harness` package imports jax, flax and matplotlib.
_XLA_FLAGS_FILE = (pathlib.Path(__file__).resolve().parent.parent
                   / "examples" / "harness" / "xla_flags.py")
_spec = importlib.util.spec_from_file_location("eva_optax_xla_flags", _XLA_FLAGS_FILE)
xla_flags = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xla_flags)
FAST_COMPILE_FLAGS = " ".join(xla_flags.fast_compile_flags())
os.environ["XLA_FLAGS"] = xla_flags.with_fast_compile(os.environ.get("XLA_FLAGS", ""))

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The NumPy oracles and the optimizers' references live in their own modules;
# tests import them from here.
from oracles import (  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
    EPS32, assert_float32_twins, assert_like_params, assert_propagated, assert_trees_close,
    eva_closed_form, eva_dense_solve, eva_f_dense_solve, float32_tol, im2col,
    inverse_root_apply_bound, layer_view, propagated_bound, propagated_tol, rel_err,
    relative_condition, same_padding, spectral_apply_bound, to64, with_one)
from optimizer_refs import (  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
    LAYERWISE, OPTIMIZERS, SMALL_DAMPING, cosine, eva_s_reference,
    layer_matrix, layerwise_reference, matrix_to_node, numpy_init,
    preconditioner, reference_tol, reference_update, shampoo_reference)

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

  def dy_ops(self) -> np.ndarray:
    """Per entry of ``dy``, the roundings of the library's float32 ``dL/dy``.

    ``y`` is a dot product of d_in + 1 terms (d_in + 1 roundings on
    ``|x||W| + |b|``), then ``(y - t) / B`` (two more): relative to ``|dy|``,
    ``(d_in + 1) (|x||W| + |b|) / |y - t| + 2``.
    """
    rows = with_one(self.rows)
    y_abs = np.abs(rows) @ np.abs(layer_view(self.params))
    return rows.shape[-1] * y_abs / np.abs(self.dy * self.x.shape[0]) + 2


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
  # The layer's float32 output: dot products of d_in + 1 terms (+1 rounding).
  assert_propagated(y.reshape(y_rows.shape), lambda w: with_one(rows) @ w,
                    (w_hat, rows.shape[-1] + 2),
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
