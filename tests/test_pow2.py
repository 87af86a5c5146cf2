"""The power-of-two scale is exact: built from its bits, never with ``exp2``.

``linalg.pow2.pow2_scale(x)`` is the power of two ``s`` with ``max|x| / s`` in
``[1, 2)``. Every solve divides by it, so that the result of ``2^j x`` is the
result of ``x`` bit for bit; that holds only if ``s`` is exactly a power of two.
XLA's CPU ``exp2`` of an integer is not exact for most exponents (221 of the
254 normal ones on jaxlib 0.10.2), so a scale built with it fails the first
test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eva_optax._src.linalg import pow2

KS = np.arange(-126, 128)
WANT = np.ldexp(np.float32(1), KS).astype(np.float32)     # exact, by NumPy


def test_scale_is_exactly_the_power_of_two_for_every_exponent():
  x = jnp.asarray((1.5 * WANT).astype(np.float32))
  for fn in (jax.jit(jax.vmap(lambda v: pow2.pow2_scale(v[None]))),
             jax.vmap(lambda v: pow2.pow2_scale(v[None]))):
    s = np.asarray(fn(x))
    np.testing.assert_array_equal(s, WANT)
  q = jax.jit(lambda v: v / jax.vmap(lambda a: pow2.pow2_scale(a[None]))(v))(x)
  np.testing.assert_array_equal(np.asarray(q), np.float32(1.5))
  np.testing.assert_array_equal(np.asarray(pow2.exact_pow2(jnp.asarray(KS))), WANT)


def test_edges():
  assert float(pow2.pow2_scale(jnp.zeros((3,)))) == 1.0
  assert float(pow2.pow2_scale(jnp.asarray([jnp.inf, 1.0]))) == 1.0
  assert float(pow2.pow2_scale(jnp.asarray([-3.0e38]))) == 2.0 ** 127
  assert float(pow2.pow2_scale(jnp.asarray([0.75, -1.0]))) == 1.0
