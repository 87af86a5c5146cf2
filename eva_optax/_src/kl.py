"""The paper's global scalings of the preconditioned update (over captured layers).

* KL-clip (ICLR 2023 Eva, K-FAC, FOOF): ``nu = min(1, sqrt(kappa / (lr^2 S)))`` with
  ``S = sum_l <U_l, G_hat_l>``; ``nu = 1`` when ``S <= 0``.
* KL-normalization (journal Eva, Eva-f): ``U sqrt(gamma / S)`` when ``S > 0``, else
  ``gamma U``. With ``V = gamma U`` this is the authors' ``V / sqrt(sum <V, G_hat>)``.

Both use the *original* gradient ``G_hat`` in the inner product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _inner(us: list[Array], gs: list[Array]) -> Array:
  return sum((jnp.vdot(u, g) for u, g in zip(us, gs)), jnp.zeros((), jnp.float32))


def kl_clip(us: list[Array], gs: list[Array], learning_rate: Array,
            kappa: float) -> list[Array]:
  """``nu U`` with ``nu = min(1, sqrt(kappa / (lr^2 sum <U, G>)))`` (ICLR Eva)."""
  s = learning_rate**2 * _inner(us, gs)
  nu = jnp.where(s > 0, jnp.minimum(1.0, jnp.sqrt(kappa / jnp.where(s > 0, s, 1.0))), 1.0)
  return [nu * u for u in us]


def kl_normalize(us: list[Array], gs: list[Array], damping: Array) -> list[Array]:
  """``sqrt(gamma) U / sqrt(sum <U, G>)`` (journal Eva; ``gamma U`` if the sum is <= 0)."""
  s = _inner(us, gs)
  scale = jnp.where(s > 0, jnp.sqrt(damping / jnp.where(s > 0, s, 1.0)), damping)
  return [scale * u for u in us]
