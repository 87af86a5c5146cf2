"""Eva-s's closed form: the rank-one Kronecker inverse of one gradient tensor.

For a gradient tensor ``T`` of rank ``r`` and one vector per axis,
``u = s_1 (x) ... (x) s_r``, Sherman-Morrison gives
``(u u^T + gamma I)^{-1} vec(T)`` without forming a matrix. This module holds
that closed form in two arrangements (the plain one, and the one that stays
accurate in float32 at any scale and for rank-one gradients), and the mean
vectors that Eva-s accumulates.

References:
  Zhang et al., "Eva: A General Vectorized Approximation Framework for
  Second-order Optimization" (the journal version of `Eva: Practical
  Second-order Optimization with Kronecker-vectorized Approximation
  <https://openreview.net/forum?id=_Mic8V96Voy>`_, ICLR 2023), section "Eva-s".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# The part of T orthogonal to u that float32 cannot tell from rounding: below
# _RESOLUTION * |T|, the residual of T - <T, u_hat> u_hat is treated as zero.
_RESOLUTION = 4 * float(jnp.finfo(jnp.float32).eps)


def rank_one_tensor(vectors: list[Array]) -> Array:
  """``s_1 o s_2 o ... o s_r`` as a tensor of shape ``(len(s_1), ..., len(s_r))``."""
  out = vectors[0]
  for v in vectors[1:]:
    out = out[..., None] * v.reshape((1,) * out.ndim + v.shape)
  return out


def _contract(t: Array, vectors: list[Array]) -> Array:
  """``<t, s_1 o ... o s_r>`` by contracting one axis at a time."""
  c = t
  for v in vectors:
    c = jnp.tensordot(v, c, axes=(0, 0))
  return c


def _unit(v: Array) -> tuple[Array, Array]:
  """``(v / |v|, log |v|)`` by max-abs scaling; ``(0, -inf)`` for ``v = 0``."""
  m = jnp.max(jnp.abs(v))
  safe = jnp.where(m > 0, m, 1.0)
  w = v / safe
  n = jnp.sqrt(jnp.sum(w * w))
  unit = w / jnp.where(n > 0, n, 1.0)
  log_norm = jnp.where(m > 0, jnp.log(safe) + jnp.log(jnp.where(n > 0, n, 1.0)),
                       -jnp.inf)
  return unit, log_norm


def eva_s_direction(t: Array, vectors: list[Array], damping: Array) -> Array:
  """The direction of ``(u u^T + damping I)^{-1} vec(T)``, ``u = s_1 (x) ... (x) s_r``.

  .. math::
    \\gamma (u u^T + \\gamma I)^{-1} T
      = \\underbrace{T - \\langle T, \\hat u\\rangle \\hat u}_{R}
      + \\frac{\\gamma}{\\gamma + \\mu} \\langle T, \\hat u\\rangle \\hat u,
    \\qquad \\hat u = \\frac{u}{|u|}, \\quad \\mu = \\prod_i |s_i|^2

  Sherman-Morrison rearranged for float32: the vectors are normalized (their
  norms enter only through ``log mu``), ``gamma / (gamma + mu)`` is a sigmoid of
  ``log gamma - log mu`` (no overflow of ``mu``, no ``1 - w`` cancellation),
  ``T`` is scaled by its max-abs, the residual ``R`` is re-projected once, and a
  residual below float32's resolution of ``T`` (``4 eps |T|``) is treated as
  zero (shrunk by ``max(0, 1 - (4 eps |T| / |R|)^2)``, continuous), as rank-
  revealing solvers treat singular values below ``eps`` times the largest. The
  result is the exact Eva-s direction of a gradient within ``4 eps |T|`` of
  ``T``: for a rank-one gradient (a batch of one), where ``R`` is rounding noise
  and the answer is ``T`` itself, it is ``T``'s direction. The scale of the
  result is arbitrary (of the order of ``T / max|T|``); the caller grafts it.

  Args:
    t: the gradient tensor ``T`` (float32, rank ``r >= 2``).
    vectors: ``[s_1, ..., s_r]``, float32, ``len(s_i) = T.shape[i]``.
    damping: ``gamma > 0``.

  Returns:
    A float32 tensor of ``T``'s shape along ``(u u^T + gamma I)^{-1} vec(T)``.
  """
  m = jnp.max(jnp.abs(t))
  tn = t / jnp.where(m > 0, m, 1.0)
  units, logs = zip(*[_unit(v) for v in vectors])
  units = list(units)
  log_mu = 2.0 * sum(logs)
  keep = jax.nn.sigmoid(jnp.log(damping) - log_mu)   # gamma / (gamma + mu)
  q = 1.0
  for u in units:
    q = q * jnp.vdot(u, u)                            # |u_hat|^2, 1 up to rounding
  q = jnp.where(q > 0, q, 1.0)
  u_hat = rank_one_tensor(units)
  c = _contract(tn, units) / q
  resid = tn - c * u_hat
  resid = resid - (_contract(resid, units) / q) * u_hat
  r2 = jnp.sum(resid * resid)
  tol2 = jnp.square(_RESOLUTION) * jnp.sum(tn * tn)
  resid = resid * jnp.maximum(0.0, 1.0 - tol2 / jnp.where(r2 > 0, r2, 1.0))
  return resid + (keep * c) * u_hat


def eva_s_solve(t: Array, vectors: list[Array], damping: Array) -> Array:
  """``(u u^T + damping I)^{-1} vec(T)`` with ``u = s_1 (x) ... (x) s_r`` (per tensor).

  .. math::
    P = \\frac{1}{\\gamma}\\Big[T - \\frac{\\langle T, s_1\\circ\\cdots\\circ s_r\\rangle}
        {\\gamma + \\prod_i \\|s_i\\|^2}\\, s_1\\circ\\cdots\\circ s_r\\Big]

  The plain closed form, for moderate scales (tests and diagnostics); the
  optimizer uses :func:`eva_s_direction`, which is safe for any finite input.
  """
  c = _contract(t, vectors)
  mu = 1.0
  for v in vectors:
    mu = mu * jnp.vdot(v, v)
  return (t - (c / (damping + mu)) * rank_one_tensor(vectors)) / damping


def mean_vectors(t: Array) -> tuple[Array, ...]:
  """``s_i`` = mean of ``t`` over every axis but ``i``, one vector per axis.

  Computed on ``t`` scaled by its max-abs, so that no sum overflows.
  """
  m = jnp.max(jnp.abs(t))
  safe = jnp.where(m > 0, m, 1.0)
  tn = t / safe
  axes = range(t.ndim)
  return tuple(safe * jnp.mean(tn, axis=tuple(j for j in axes if j != i))
               for i in axes)
