"""Dense symmetric solves used by the full-matrix methods (float32 in, float32 out):
damped inverses by Cholesky (K-FAC), eigendecompositions (FOOF) and inverse
roots (Shampoo)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eva_optax._src.linalg.pow2 import pow2_scale

Array = jax.Array


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


def inverse_root(m: Array, exponent: float, epsilon: Any) -> Array:
  """``(m + epsilon * lambda_max I)^{-1/exponent}`` for a symmetric PSD ``m``.

  The ridge is relative to the largest eigenvalue, floored at 1e-30 so that an
  all-zero block maps to a finite matrix.
  """
  d, q = symmetric_eig(m, floor=0.0)
  lam_max = jnp.max(d, axis=-1, keepdims=True)
  ridge = jnp.maximum(epsilon * lam_max, 1e-30)
  scale = (d + ridge) ** (-1.0 / exponent)
  return (q * scale[..., None, :]) @ jnp.swapaxes(q, -1, -2)
