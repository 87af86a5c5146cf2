"""The closed forms of the vectorized (rank-one) curvature: Sherman-Morrison.

Every method of the Eva family approximates a curvature block by a rank-one
term plus damping, ``v v^T + gamma I``, and applies its inverse in closed form,
``(v v^T + gamma I)^{-1} x = (x - v (v^T x) / (gamma + |v|^2)) / gamma``, so no
matrix is formed or inverted:

* Eva: ``v = a (x) g`` over one layer's ``(d_in [+1], d_out)`` gradient
  (:func:`eva_solve`);
* Eva-f: ``a a^T`` on the input side only (:func:`eva_f_solve`);
* Eva-s: ``u = s_1 (x) ... (x) s_r`` over a gradient tensor of rank ``r``,
  one vector per axis (:func:`eva_s_direction`, and the plain
  :func:`eva_s_solve`), with the mean vectors it accumulates
  (:func:`mean_vectors`).

References:
  Zhang et al., "Eva: A General Vectorized Approximation Framework for
  Second-order Optimization" (the journal version of `Eva: Practical
  Second-order Optimization with Kronecker-vectorized Approximation
  <https://openreview.net/forum?id=_Mic8V96Voy>`_, ICLR 2023), section "Eva-s".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eva_optax._src.linalg.pow2 import scaled_damping
from eva_optax._src.linalg.pow2 import pow2_scale

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

# ----------------------------------------------------------------------------
# Eva and Eva-f: the rank-one closed forms of one layer, in its
# ``(d_in [+1], d_out)`` view (a Flax kernel with the bias as a last row; the
# paper's ``G_hat (d_out x d_in)`` is our ``G_hat^T``), taken in its two
# pieces, kernel and bias row.


def _split(a: Array, d_in: int) -> tuple[Array, Array | None]:
  """``a = [a_kernel; a_bias]``: the kernel part and the bias entry (or None)."""
  return a[:d_in], (a[d_in] if a.shape[0] > d_in else None)


def _sq(x: Array | None) -> Array:
  return jnp.zeros((), jnp.float32) if x is None else jnp.vdot(x, x)


def _left_product(kernel: Array, bias: Array | None, u_kernel: Array,
                  u_bias: Array | None) -> Array:
  """``u^T G_hat`` in the two pieces of ``G_hat``."""
  p = u_kernel @ kernel
  return p if bias is None else p + u_bias * bias


def _stable_inner(kernel: Array, bias: Array | None, u_kernel: Array,
                  u_bias: Array | None, w: Array, inv_scale: Array = 1.0) -> Array:
  """``<G_hat - u w^T, G_hat>`` summed elementwise (no cancellation of
  ``|G_hat|^2 - u^T G_hat w``, which loses everything when ``G_hat`` is
  itself nearly ``u w^T``: a batch of one), ``G_hat`` times the exact
  ``inv_scale`` (a power of two) inside the reduction."""
  k = kernel * inv_scale
  inner = jnp.sum(k * (k - u_kernel[:, None] * w[None, :]))
  if bias is not None:
    b = bias * inv_scale
    inner = inner + jnp.sum(b * (b - u_bias * w))
  return inner


def eva_coefficients(kernel: Array, bias: Array | None, a: Array, g: Array,
                     damping: Array, scale: Array = 1.0
                     ) -> tuple[Array, Array | None, Array, Array]:
  """Eva's closed form as ``U = (G_hat - u w^T) / gamma``: ``(u_kernel,
  u_bias, w, <U, G_hat>)``.

  .. math::
    U = \\frac{1}{\\gamma}\\Big[\\hat G - c_\\gamma\\, a g^T\\Big], \\quad
    c_\\gamma = \\frac{a^T \\hat G g}{\\gamma + \\|a\\|^2\\|g\\|^2}

  (the Sherman-Morrison form of ``(v v^T + gamma I)^{-1} vec(G_hat)``,
  ``v = vec(a g^T)``), with ``u = a`` and ``w = c_gamma g``. ``G_hat =
  [kernel; bias]`` is taken in its two pieces (``kernel`` ``(d_in, d_out)``,
  ``bias`` ``(d_out,)`` or None; ``a`` has the bias entry last). The caller
  forms ``U`` itself, fused with what follows (the scaling, momentum): only
  the reductions ``a^T G_hat`` and ``<U, G_hat>`` read ``G_hat`` here.

  ``a`` and ``g`` are first divided by powers of two ``s_a, s_g`` (exact) and the
  damping by ``(s_a s_g)^2`` in log space, so ``|a|^2 |g|^2`` cannot overflow or
  underflow: inputs scaled by ``1e15`` give the same update as unscaled ones
  (the limit ``gamma -> 0``, a projection, when the scaled damping underflows).

  ``G_hat`` is read as ``G_hat / scale`` (``scale`` a power of two, so the
  division is exact): the caller's global scale, applied inside the two
  reductions, so that the scaled gradient is never materialized.
  """
  sa, sg = pow2_scale(a), pow2_scale(g)
  a, g = a / sa, g / sg
  gamma = scaled_damping(damping, sa, sg)
  ak, ab = _split(a, kernel.shape[0])
  p = _left_product(kernel, bias, ak, ab) / scale
  w = (jnp.vdot(p, g) / (_sq(a) * _sq(g) + gamma)) * g
  inner = _stable_inner(kernel, bias, ak, ab, w, 1.0 / scale) / damping
  return ak, ab, w, inner


def eva_f_coefficients(kernel: Array, bias: Array | None, a: Array,
                       damping: Array, scale: Array = 1.0
                       ) -> tuple[Array, Array | None, Array, Array]:
  """Eva-f's closed form as ``U = (G_hat - u w^T) / gamma`` (see
  :func:`eva_coefficients`): ``u = a``, ``w = G_hat^T a / (gamma + |a|^2)``.

  .. math::
    U = \\frac{1}{\\gamma}\\Big[\\hat G - a r^T\\Big], \\quad
    r = \\frac{\\hat G^T a}{\\gamma + \\|a\\|^2}

  (the paper's ``G_hat (a a^T + gamma I)^{-1}`` in its ``(d_out, d_in)``
  view), ``a`` rescaled and ``G_hat`` read as ``G_hat / scale`` as in
  :func:`eva_coefficients`.
  """
  sa = pow2_scale(a)
  a = a / sa
  gamma = scaled_damping(damping, sa)
  ak, ab = _split(a, kernel.shape[0])
  p = _left_product(kernel, bias, ak, ab) / scale
  w = p / (_sq(a) + gamma)
  inner = _stable_inner(kernel, bias, ak, ab, w, 1.0 / scale) / damping
  return ak, ab, w, inner


def apply_coefficients(kernel: Array, bias: Array | None, u_kernel: Array,
                       u_bias: Array | None, w: Array, scale: Array
                       ) -> tuple[Array, Array | None]:
  """``scale * (G_hat - u w^T)`` in its two pieces (one elementwise pass);
  leading axes (slices) broadcast through."""
  uk = scale * (kernel - u_kernel[..., :, None] * w[..., None, :])
  ub = None if bias is None else scale * (
      bias - jnp.asarray(u_bias)[..., None] * w)
  return uk, ub


def eva_solve(kernel: Array, bias: Array | None, a: Array, g: Array,
              damping: Array) -> tuple[Array, Array | None, Array]:
  """``U = (v v^T + damping I)^{-1} vec(G_hat)``, ``v = vec(a g^T)``: the
  formed update of :func:`eva_coefficients`, ``(U_kernel, U_bias, <U,
  G_hat>)``."""
  ak, ab, w, inner = eva_coefficients(kernel, bias, a, g, damping)
  return (*apply_coefficients(kernel, bias, ak, ab, w, 1.0 / damping), inner)


def eva_f_solve(kernel: Array, bias: Array | None, a: Array,
                damping: Array) -> tuple[Array, Array | None, Array]:
  """``U = (a a^T + damping I)^{-1} G_hat`` (the paper's ``G_hat (a a^T +
  γI)^{-1}``): the formed update of :func:`eva_f_coefficients`."""
  ak, ab, w, inner = eva_f_coefficients(kernel, bias, a, damping)
  return (*apply_coefficients(kernel, bias, ak, ab, w, 1.0 / damping), inner)
