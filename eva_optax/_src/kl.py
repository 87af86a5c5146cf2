"""The paper's global scalings of the preconditioned update (over captured layers).

* KL-clip (ICLR 2023 Eva, K-FAC, FOOF): ``nu = min(1, sqrt(kappa / (lr^2 S)))`` with
  ``S = sum_l <U_l, G_hat_l>``; ``nu = 1`` when ``S <= 0``.
* KL-normalization (journal Eva, Eva-f): ``U sqrt(gamma / S)`` when ``S > 0``, else
  ``gamma U``. With ``V = gamma U`` this is the authors' ``V / sqrt(sum <V, G_hat>)``.

Both use the *original* gradient ``G_hat`` in the inner product; the solves return
``<U_l, G_hat_l>`` (in closed form for Eva and Eva-f), and these functions turn the
sum into the scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def kl_clip_scale(inner: Array, learning_rate: Array, kappa: float) -> Array:
  """``nu = min(1, sqrt(kappa / (lr^2 S)))`` for ``S = sum <U, G>`` (ICLR Eva);
  ``1`` when ``S <= 0``."""
  s = learning_rate**2 * inner
  return jnp.where(s > 0, jnp.minimum(1.0, jnp.sqrt(kappa / jnp.where(s > 0, s, 1.0))), 1.0)


def kl_normalize_scale(inner: Array, damping: Array) -> Array:
  """``sqrt(gamma / S)`` for ``S = sum <U, G>`` (journal Eva); ``gamma`` when ``S <= 0``."""
  return jnp.where(inner > 0, jnp.sqrt(damping / jnp.where(inner > 0, inner, 1.0)), damping)
