"""The paper's global scalings of the preconditioned update (over captured layers).

* KL-clip (ICLR 2023 Eva, K-FAC, FOOF): ``nu = min(1, sqrt(kappa / (lr^2 S)))`` with
  ``S = sum_l <U_l, G_hat_l>``; ``nu = 1`` when ``S <= 0``.
* KL-normalization (journal Eva, Eva-f): ``U sqrt(gamma / S)`` when ``S > 0``, else
  ``gamma U``. With ``V = gamma U`` this is the authors' ``V / sqrt(sum <V, G_hat>)``.

Both use the *original* gradient ``G_hat`` in the inner product. The solves run
on ``G_hat / s`` for a power of two ``s`` (so that nothing overflows): they
return ``U' = U / s`` and ``S' = S / s^2``, and these functions give the factor
``f`` with ``final update = f U'``, computed without forming ``S`` itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def kl_clip_scale(inner: Array, learning_rate: Array, kappa: float,
                  scale: Array) -> Array:
  """``f = s min(1, sqrt(kappa / (lr^2 s^2 S')))``; ``s`` when ``S' <= 0``."""
  ok = jnp.logical_and(inner > 0, learning_rate > 0)
  clip = jnp.sqrt(kappa) / (learning_rate * jnp.sqrt(jnp.where(ok, inner, 1.0)))
  return jnp.where(ok, jnp.minimum(scale, jnp.where(ok, clip, scale)), scale)


def kl_normalize_scale(inner: Array, damping: Array, scale: Array) -> Array:
  """``f = sqrt(gamma / S')`` when ``S' > 0`` (scale-free), else ``gamma s``."""
  ok = inner > 0
  return jnp.where(ok, jnp.sqrt(damping / jnp.where(ok, inner, 1.0)),
                   damping * scale)
