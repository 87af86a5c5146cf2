"""Exact power-of-two scaling: dividing by ``2^k`` changes no bit of a float's
mantissa, so a computation on ``x / s`` gives bit for bit the same result for
``x`` and ``2^j x``, and squares of ``x / s`` cannot overflow.

The power of two is built from its bits (exponent field ``k + 127``, mantissa
zero), never with ``exp2``: XLA's CPU ``exp2`` of an integer is not exact for
most exponents (221 of the 254 normal ones on jaxlib 0.10), and an inexact
``s`` would make ``x / s`` round, and ``x / s`` and ``x * (1 / s)`` (which XLA
may substitute) differ."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def pow2_scale(x: Array) -> Array:
  """A power of two ``s`` with ``max|x| / s`` in ``[1, 2)`` (1 if ``x`` is zero).

  Dividing by ``s`` is exact, so a computation on ``x / s`` gives bit for bit the
  same result for ``x`` and ``2^k x``, and squares of ``x / s`` cannot overflow.
  """
  m = jnp.max(jnp.abs(x)).astype(jnp.float32) if x.size else jnp.zeros((), jnp.float32)
  ok = jnp.logical_and(m > 0, jnp.isfinite(m))
  _, e = jnp.frexp(jnp.where(ok, m, 1.0))      # m = f 2^e, f in [0.5, 1): exact
  return exact_pow2(jnp.clip(e - 1, -126, 127))


def exact_pow2(k: Array) -> Array:
  """``2^k`` in float32, exactly, for integers ``k`` in ``[-126, 127]``."""
  k = jnp.asarray(k, jnp.int32)
  return jax.lax.bitcast_convert_type(
      jax.lax.shift_left(k + 127, jnp.int32(23)), jnp.float32)


def scaled_damping(damping: Array, *scales: Array) -> Array:
  """``damping / prod(scales)^2`` in log space (over- and underflow safe)."""
  log = jnp.log(damping) - 2.0 * sum(jnp.log(s) for s in scales)
  return jnp.exp(log)
