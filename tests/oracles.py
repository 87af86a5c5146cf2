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


# ----------------------------------------------------------------------------
# Tolerances from the computation, not from what one CPU printed.
#
# A float32 result r of a backward-stable computation is the exact result of
# inputs perturbed by at most ``ops * eps32`` relative, where ``ops`` counts the
# roundings on its longest dependency chain (n for a sum or dot product of n
# terms, n for a solve, Cholesky or eigendecomposition of order n, the sum of
# the stages' counts for a pipeline). To first order its relative error against
# the exact (float64) result is then at most ``cond * ops * eps32``, with
# ``cond`` the condition number of the result with respect to those inputs.
# Roundings after the last input-dependent step (a final division or root)
# are relative errors of the result itself: they add ``k * eps32 * |result|``
# (a function insensitive to its inputs, as a cosine near 1, still has them).
# Two float32 computations of the same quantity (eager and jit, sharded and
# replicated) differ by at most the sum of their bounds. The bounds are worst
# cases (rounding errors add like a random walk in practice), so a correct
# result passes on every CPU, while an error of the method (a wrong statistic,
# damping or formula) changes the result by far more than eps32 * cond.

EPS32 = float(np.finfo(np.float32).eps)   # 2^-23 = 1.19e-7


def float32_tol(cond: float = 1.0, ops: float = 1.0) -> float:
  """``cond * ops * eps32``: the first-order bound on a float32 result's relative error.

  Args:
    cond: the condition number of the result (1 for products and sums of
      same-sign terms; see :func:`relative_condition`, :func:`propagated_tol`
      and :func:`spectral_apply_bound` for the others).
    ops: the roundings on the longest path of the computation (above).
  """
  return float(cond) * float(ops) * EPS32


def propagated_bound(fn: Any, *inputs: tuple[Any, Any], h: float = 1e-6) -> np.ndarray:
  """Entrywise first-order bound on ``fn``'s float32 error, from its inputs' errors.

  ``inputs`` are ``(x, ops)`` pairs: every entry of ``x`` is off by at most
  ``ops * eps32`` relative (``ops`` a number or an array like ``x``: the
  roundings on that input's path as a backward error; a sum or dot product
  of n terms is exact for its terms perturbed by n roundings, a product for
  one). To first order every entry of the result is then off by at most
  ``eps32 * sum_x |J_x| (ops_x |x|)``, J_x the Jacobian of ``fn`` (float64,
  central differences of relative step ``h``): for a sum, ``ops eps32`` times
  the sum of the terms' magnitudes, cancellations included. Meant for the
  small oracles of these tests (two calls of ``fn`` per input entry).
  """
  args = [to64(x) for x, _ in inputs]
  f0 = to64(fn(*args))
  acc = np.zeros(f0.size)
  for i, (x, (_, ops)) in enumerate(zip(args, inputs)):
    flat, weight = x.ravel(), np.broadcast_to(to64(ops), x.shape).ravel()
    for j in np.flatnonzero(flat * weight):
      step = h * abs(flat[j])
      out = []
      for sign in (1.0, -1.0):
        xj = flat.copy()
        xj[j] += sign * step
        out.append(to64(fn(*args[:i], xj.reshape(x.shape), *args[i + 1:])).ravel())
      acc += weight[j] * np.abs(out[0] - out[1]) / (2.0 * h)   # ops |df/dx_j| |x_j|
  return EPS32 * acc.reshape(f0.shape)


def propagated_tol(fn: Any, *inputs: tuple[Any, Any], h: float = 1e-6) -> float:
  """The relative (Frobenius) form of :func:`propagated_bound`: the conditioning of
  this very problem, cancellations included, times its inputs' roundings."""
  bound = propagated_bound(fn, *inputs, h=h)
  return float(np.linalg.norm(bound) / np.linalg.norm(to64(fn(*(to64(x) for x, _ in inputs)))))


def assert_propagated(got: Any, fn: Any, *inputs: tuple[Any, Any], err_msg: str = "") -> None:
  """``got`` (float32) equals ``fn(*x)`` (float64) within :func:`propagated_bound`, entrywise."""
  ref = to64(fn(*(to64(x) for x, _ in inputs)))
  bound = propagated_bound(fn, *inputs)
  err = np.abs(to64(got) - ref)
  worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.ndim else ()
  assert np.all(err <= bound), (
      f"{err_msg}: |got - ref| = {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}")


def assert_float32_twins(got: Any, ref: Any, ops: float, magnitude: Any = None,
                         err_msg: str = "") -> None:
  """Two float32 evaluations of the same quantity by different operation orders.

  Each is within ``ops * eps32`` of the exact value, relative to the
  magnitude of its terms (``ops``: the roundings on the longest path, e.g. a
  sum's length), so they differ by at most ``2 ops eps32 magnitude``,
  entrywise. ``magnitude``: the same quantity computed from the absolute
  values of its terms where the test has them (a mean of |rows|; cancelling
  terms make it exceed |ref|); by default ``|ref|`` with a floor of
  ``max |ref|``, i.e. terms that share their sign or cancel to at most the
  largest entry (means of positive activations, Gram matrices, the loss and
  gradients of these small well-scaled models).
  """
  got, ref = to64(got), to64(ref)
  if magnitude is None:
    magnitude = np.maximum(np.abs(ref), np.abs(ref).max(initial=0.0))
  bound = 2.0 * float32_tol(1.0, ops) * to64(magnitude)
  err = np.abs(got - ref)
  worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.ndim else ()
  assert np.all(err <= bound), (
      f"{err_msg}: |got - ref| = {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}")


def relative_condition(fn: Any, *args: Any) -> float:
  """The componentwise relative condition number of ``fn`` at ``args`` (float64).

  ``|| |J| |x| || / ||fn(x)||``: a relative perturbation of at most e of every
  input entry changes the result by at most ``cond * e`` relative, to first
  order (:func:`propagated_tol` with one rounding per entry, over eps32).
  """
  return propagated_tol(fn, *((a, 1.0) for a in args)) / EPS32


def spectral_apply_bound(m: Any, fn: Any, dfn: Any, y: Any, ops: float) -> float:
  """Bound on the float32 error of ``f(m) @ y`` for a symmetric PSD ``m`` and a spectral ``f``.

  ``fn(lam)`` and ``dfn(lam)`` give f and f' at the eigenvalues (ascending).
  An eigendecomposition or Cholesky factorization (and a statistic summed in
  float32) is exact for ``m + E`` with ``||E|| <= ops * eps32 * lambda_max``
  (normwise). In the eigenbasis ``m = Q diag(lam) Q^T`` the first-order change
  of ``f(m)`` is ``Q (F o Q^T E Q) Q^T`` with ``F_ij = f[lam_i, lam_j]`` the
  divided differences (Daleckii-Krein). With ``Y = Q^T y``, entry (i, c) of
  ``(F o E') Y`` (``E' = Q^T E Q``) is ``e_i^T E' v`` with ``v_j = F_ij Y_jc``,
  at most ``||E|| |v|`` (Cauchy-Schwarz), so ``||delta f(m) y||_F <= ||E|| *
  sqrt(sum_icj F_ij^2 Y_jc^2)``. It grows with ``|f'|`` where ``y`` has weight
  (small eigenvalues for an inverse or inverse root: the eigenvalue spread over
  the damping), and with ``1 / gap`` where f jumps between eigenvalues (a
  rank-k truncation).
  """
  m, y = to64(m), to64(y)
  lam, q = np.linalg.eigh(0.5 * (m + m.T))
  lam = np.clip(lam, 0.0, None)
  f, fprime = to64(fn(lam)), to64(dfn(lam))
  li, lj = np.meshgrid(lam, lam, indexing="ij")
  close = np.abs(li - lj) <= 1e-12 * max(lam[-1], 1e-300)
  with np.errstate(divide="ignore", invalid="ignore"):
    div = np.where(close, 0.5 * (fprime[:, None] + fprime[None, :]),
                   (f[:, None] - f[None, :]) / (li - lj))
  e_norm = ops * EPS32 * lam[-1]
  return float(e_norm * np.sqrt(np.sum(div ** 2 @ (q.T @ y) ** 2)))


def inverse_root_apply_bound(m: Any, p: float, ridge: float, y: Any, ops: float,
                             shift: float = 0.0) -> float:
  """:func:`spectral_apply_bound` for ``f(x) = (x + r)^{-1/p}``, ``r = ridge *
  lambda_max + shift`` (a relative ridge as Shampoo's, an absolute damping as
  K-FAC's and FOOF's: ``p = 1`` is the damped inverse). ``f'(x) = -(1/p) f(x)
  / (x + r)``: the bound grows with the spread of the eigenvalues over r.
  """
  lam_max = max(float(np.linalg.eigvalsh(to64(m)).max()), float(np.finfo(np.float32).tiny))
  r = ridge * lam_max + shift
  fn = lambda lam: (lam + r) ** (-1.0 / p)
  return spectral_apply_bound(m, fn, lambda lam: -(1.0 / p) * fn(lam) / (lam + r), y, ops)


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
