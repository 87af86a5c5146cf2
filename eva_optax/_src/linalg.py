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


def eva_solve(kernel: Array, bias: Array | None, a: Array, g: Array,
              damping: Array) -> tuple[Array, Array | None, Array]:
  """``U = (v v^T + damping I)^{-1} vec(G_hat)``, ``v = vec(a g^T)`` (Sherman-Morrison).

  .. math::
    U = \\frac{1}{\\gamma}\\Big[\\hat G - c_\\gamma\\, a g^T\\Big], \\quad
    c_\\gamma = \\frac{a^T \\hat G g}{\\gamma + \\|a\\|^2\\|g\\|^2}, \\quad
    \\langle U, \\hat G\\rangle = \\frac{\\|\\hat G\\|^2 - c_\\gamma\\, a^T \\hat G g}{\\gamma}

  ``G_hat = [kernel; bias]`` is taken in its two pieces (``kernel`` of shape
  ``(d_in, d_out)``, ``bias`` of shape ``(d_out,)`` or None; ``a`` has the bias
  entry last), so the ``(d_in + 1, d_out)`` matrix is never built. Costs one
  matrix-vector product and one rank-one update; no matrix inverse.

  Returns:
    ``(U_kernel, U_bias, <U, G_hat>)``; the inner product in closed form, for
    the KL scalings.
  """
  ak, ab = _split(a, kernel.shape[0])
  gg = kernel @ g
  c = jnp.vdot(ak, gg)
  if bias is not None:
    c = c + ab * jnp.vdot(bias, g)
  coef = c / (_sq(a) * _sq(g) + damping)
  u_kernel = (kernel - coef * jnp.outer(ak, g)) / damping
  u_bias = None if bias is None else (bias - (coef * ab) * g) / damping
  inner = (_sq(kernel) + _sq(bias) - coef * c) / damping
  return u_kernel, u_bias, inner


def eva_f_solve(kernel: Array, bias: Array | None, a: Array,
                damping: Array) -> tuple[Array, Array | None, Array]:
  """``U = (a a^T + damping I)^{-1} G_hat`` (the paper's ``G_hat (a a^T + γI)^{-1}``).

  .. math::
    U = \\frac{1}{\\gamma}\\Big[\\hat G - a r^T\\Big], \\quad
    r = \\frac{\\hat G^T a}{\\gamma + \\|a\\|^2}, \\quad
    \\langle U, \\hat G\\rangle = \\frac{\\|\\hat G\\|^2 - r^T \\hat G^T a}{\\gamma}

  In the two pieces of ``G_hat`` as :func:`eva_solve`, and returns the same triple.
  """
  ak, ab = _split(a, kernel.shape[0])
  ga = ak @ kernel
  if bias is not None:
    ga = ga + ab * bias
  r = ga / (_sq(a) + damping)
  u_kernel = (kernel - jnp.outer(ak, r)) / damping
  u_bias = None if bias is None else (bias - ab * r) / damping
  inner = (_sq(kernel) + _sq(bias) - jnp.vdot(r, ga)) / damping
  return u_kernel, u_bias, inner


def damped_inverse(m: Array, damping: Array) -> Array:
  """``(m + damping I)^{-1}`` for a symmetric PSD ``m``, by Cholesky."""
  eye = jnp.eye(m.shape[-1], dtype=m.dtype)
  chol = jax.scipy.linalg.cho_factor(m + damping * eye, lower=True)
  return jax.scipy.linalg.cho_solve(chol, eye)


def symmetric_eig(m: Array, floor: float = 1e-10) -> tuple[Array, Array]:
  """Eigenvalues (ascending, those below ``floor`` set to 0) and eigenvectors."""
  m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
  if m.ndim > 2:
    # One unbatched eigh at a time: jaxlib's batched CPU eigh can deadlock when
    # several run at once on few cores (both workers wait in ParallelBatchMap).
    flat = m.reshape((-1,) + m.shape[-2:])
    d, q = jax.lax.map(jnp.linalg.eigh, flat)
    d, q = d.reshape(m.shape[:-1]), q.reshape(m.shape)
  else:
    d, q = jnp.linalg.eigh(m)
  return jnp.where(d > floor, d, 0.0), q
