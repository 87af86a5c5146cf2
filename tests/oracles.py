"""float64 NumPy oracles for the tests: im2col, the layer view of a gradient and
the dense solves of Eva's and Eva-f's definitions, written independently of the
library (re-exported by conftest)."""

from __future__ import annotations

import itertools
from typing import Any

import chex
import numpy as np

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
