"""Exact power-of-two scaling: dividing by ``2^k`` changes no bit of a float's
mantissa, so a computation on ``x / s`` gives bit for bit the same result for
``x`` and ``2^j x``, and squares of ``x / s`` cannot overflow."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def pow2_scale(x: Array) -> Array:
  """A power of two ``s`` with ``max|x| / s`` in ``[1, 2)`` (1 if ``x`` is zero).

  Dividing by ``s`` is exact, so a computation on ``x / s`` gives bit for bit the
  same result for ``x`` and ``2^k x``, and squares of ``x / s`` cannot overflow.
  """
  m = jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)
  ok = jnp.logical_and(m > 0, jnp.isfinite(m))
  e = jnp.floor(jnp.log2(jnp.where(ok, m, 1.0)))
  return jnp.exp2(jnp.clip(e, -126.0, 127.0)).astype(jnp.float32)


def scaled_damping(damping: Array, *scales: Array) -> Array:
  """``damping / prod(scales)^2`` in log space (over- and underflow safe)."""
  log = jnp.log(damping) - 2.0 * sum(jnp.log(s) for s in scales)
  return jnp.exp(log)
