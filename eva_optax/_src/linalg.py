"""Closed-form and dense solves used by the preconditioners (float32 in, float32 out).

Matrices are in the *layer view* ``(d_in [+1], d_out)`` (a Flax kernel with the bias
as a last row), so the paper's ``G_hat (d_out x d_in)`` is our ``G_hat^T``. Eva's and
Eva-f's closed forms take that view in its two pieces, kernel and bias row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _split(a: Array, d_in: int) -> tuple[Array, Array | None]:
  """``a = [a_kernel; a_bias]``: the kernel part and the bias entry (or None)."""
  return a[:d_in], (a[d_in] if a.shape[0] > d_in else None)


def _sq(x: Array | None) -> Array:
  return jnp.zeros((), jnp.float32) if x is None else jnp.vdot(x, x)


def pow2_scale(x: Array) -> Array:
  """A power of two ``s`` with ``max|x| / s`` in ``[1, 2)`` (1 if ``x`` is zero).

  Dividing by ``s`` is exact, so a computation on ``x / s`` gives bit for bit the
  same result for ``x`` and ``2^k x``, and squares of ``x / s`` cannot overflow.
  """
  m = jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)
  ok = jnp.logical_and(m > 0, jnp.isfinite(m))
  e = jnp.floor(jnp.log2(jnp.where(ok, m, 1.0)))
  return jnp.exp2(jnp.clip(e, -126.0, 127.0)).astype(jnp.float32)


def _scaled_damping(damping: Array, *scales: Array) -> Array:
  """``damping / prod(scales)^2`` in log space (over- and underflow safe)."""
  log = jnp.log(damping) - 2.0 * sum(jnp.log(s) for s in scales)
  return jnp.exp(log)


def _inner(u_kernel: Array, kernel: Array, u_bias: Array | None,
           bias: Array | None) -> Array:
  inner = jnp.vdot(u_kernel, kernel)
  return inner if bias is None else inner + jnp.vdot(u_bias, bias)


def eva_solve(kernel: Array, bias: Array | None, a: Array, g: Array,
              damping: Array) -> tuple[Array, Array | None, Array]:
  """``U = (v v^T + damping I)^{-1} vec(G_hat)``, ``v = vec(a g^T)`` (Sherman-Morrison).

  .. math::
    U = \\frac{1}{\\gamma}\\Big[\\hat G - c_\\gamma\\, a g^T\\Big], \\quad
    c_\\gamma = \\frac{a^T \\hat G g}{\\gamma + \\|a\\|^2\\|g\\|^2}

  ``G_hat = [kernel; bias]`` is taken in its two pieces (``kernel`` of shape
  ``(d_in, d_out)``, ``bias`` of shape ``(d_out,)`` or None; ``a`` has the bias
  entry last), so the ``(d_in + 1, d_out)`` matrix is never built. Costs one
  matrix-vector product and one rank-one update; no matrix inverse.

  ``a`` and ``g`` are first divided by powers of two ``s_a, s_g`` (exact) and the
  damping by ``(s_a s_g)^2`` in log space, so ``|a|^2 |g|^2`` cannot overflow or
  underflow: inputs scaled by ``1e15`` give the same update as unscaled ones
  (the limit ``gamma -> 0``, a projection, when the scaled damping underflows).

  Returns:
    ``(U_kernel, U_bias, <U, G_hat>)``; the inner product for the KL scalings.
  """
  sa, sg = pow2_scale(a), pow2_scale(g)
  a, g = a / sa, g / sg
  gamma = _scaled_damping(damping, sa, sg)
  ak, ab = _split(a, kernel.shape[0])
  c = jnp.vdot(ak, kernel @ g)
  if bias is not None:
    c = c + ab * jnp.vdot(bias, g)
  coef = c / (_sq(a) * _sq(g) + gamma)
  v_kernel = kernel - coef * jnp.outer(ak, g)
  v_bias = None if bias is None else bias - (coef * ab) * g
  inner = _inner(v_kernel, kernel, v_bias, bias) / damping
  return (v_kernel / damping, None if v_bias is None else v_bias / damping, inner)


def eva_f_solve(kernel: Array, bias: Array | None, a: Array,
                damping: Array) -> tuple[Array, Array | None, Array]:
  """``U = (a a^T + damping I)^{-1} G_hat`` (the paper's ``G_hat (a a^T + γI)^{-1}``).

  .. math::
    U = \\frac{1}{\\gamma}\\Big[\\hat G - a r^T\\Big], \\quad
    r = \\frac{\\hat G^T a}{\\gamma + \\|a\\|^2}

  In the two pieces of ``G_hat`` as :func:`eva_solve` (``a`` rescaled the same
  way), and returns the same triple.
  """
  sa = pow2_scale(a)
  a = a / sa
  gamma = _scaled_damping(damping, sa)
  ak, ab = _split(a, kernel.shape[0])
  ga = ak @ kernel
  if bias is not None:
    ga = ga + ab * bias
  r = ga / (_sq(a) + gamma)
  v_kernel = kernel - jnp.outer(ak, r)
  v_bias = None if bias is None else bias - ab * r
  inner = _inner(v_kernel, kernel, v_bias, bias) / damping
  return (v_kernel / damping, None if v_bias is None else v_bias / damping, inner)


def damped_inverse(m: Array, damping: Array) -> Array:
  """``(m + damping I)^{-1}`` for a symmetric PSD ``m``, by Cholesky.

  ``m`` is divided by a power of two first (exact), so factors of any finite
  scale give a finite inverse.
  """
  s = pow2_scale(m)
  eye = jnp.eye(m.shape[-1], dtype=m.dtype)
  chol = jax.scipy.linalg.cho_factor(m / s + (damping / s) * eye, lower=True)
  return jax.scipy.linalg.cho_solve(chol, eye) / s


def symmetric_eig(m: Array, floor: float = 1e-10) -> tuple[Array, Array]:
  """Eigenvalues (ascending, those below ``floor`` set to 0) and eigenvectors."""
  m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
  s = pow2_scale(m)   # exact; keeps eigh of factors of any finite scale finite
  m = m / s
  if m.ndim > 2:
    # One unbatched eigh at a time: jaxlib's batched CPU eigh can deadlock when
    # several run at once on few cores (both workers wait in ParallelBatchMap).
    flat = m.reshape((-1,) + m.shape[-2:])
    d, q = jax.lax.map(jnp.linalg.eigh, flat)
    d, q = d.reshape(m.shape[:-1]), q.reshape(m.shape)
  else:
    d, q = jnp.linalg.eigh(m)
  d = d * s
  return jnp.where(d > floor, d, 0.0), q
