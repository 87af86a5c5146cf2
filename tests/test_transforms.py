"""Statistics under JAX and Flax transforms equal those of the plain computation.

``jax.vmap`` of a per-example loss and ``nn.vmap`` with shared parameters must
give the statistics of the unbatched computation (issue 8: they came back
multiplied by the mapped axis size, the bias entry of ``a`` 2.0 or 16.0), and
``nn.remat`` / ``jax.checkpoint`` must not change them. The reference is the
plain batched model (whose statistics tests/test_capture.py checks against
NumPy), and, for ``a``, a NumPy forward pass with an explicit im2col.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from conftest import assert_float32_twins
from conftest import assert_propagated
from conftest import im2col
from conftest import numpy_init
from conftest import to64
from conftest import with_one

B = 6
KEYS = ("a", "g", "A", "G")
# Float32 roundings on the longest paths (the transforms re-associate): the
# conv's fan-in 2 x 2 x 2 + 1, tanh (2), the Dense's 4 x 4 x 3 + 1, the loss
# over 2 outputs and B examples (+ 1); the backward as long again, the sums
# over the B x 16 conv rows (A and G: + 16 positions, B examples, 3).
FORWARD_OPS = 9 + 2 + 49 + 2 + B + 1
TWIN_OPS = 2 * FORWARD_OPS + B * 16 + 16 + B + 3


class Net(nn.Module):
  """Conv(3, 2x2, SAME) -> tanh -> flatten -> Dense(2); works with or
  without a batch axis (so that it can be vmapped per example)."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(3, (2, 2), name="conv")(x))
    h = h.reshape(h.shape[:-3] + (-1,))
    return nn.Dense(2, name="dense")(h)


class Wrapped(nn.Module):
  """``Net`` under a transform, with the same parameter paths as ``Plain``."""

  transform: str

  @nn.compact
  def __call__(self, x):
    if self.transform == "nn.vmap":
      net = nn.vmap(Net, in_axes=0, out_axes=0, variable_axes={"params": None},
                    split_rngs={"params": False})
    elif self.transform == "nn.remat":
      net = nn.remat(Net)
    else:
      net = Net
    return net(name="net")(x)


def _data():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(B, 4, 4, 2)) + 0.7, jnp.float32)
  t = jnp.asarray(rng.normal(size=(B, 2)), jnp.float32)
  return x, t


def _sq(y, t):
  return jnp.sum((y - t) ** 2, axis=-1)


def _losses():
  """The same mean loss written under each transform."""
  plain = Wrapped("none")
  vmapped = Wrapped("nn.vmap")
  remat = Wrapped("nn.remat")

  def batched(p, x, t):
    return jnp.mean(_sq(plain.apply({"params": p}, x), t))

  def per_example(p, x, t):   # jax.vmap of the loss of one example
    one = lambda xe, te: _sq(plain.apply({"params": p}, xe), te)
    return jnp.mean(jax.vmap(one)(x, t))

  def per_group(p, x, t):     # jax.vmap over groups of a batched mean loss
    xg, tg = x.reshape((2, B // 2) + x.shape[1:]), t.reshape(2, B // 2, -1)
    group = lambda xe, te: jnp.mean(_sq(plain.apply({"params": p}, xe), te))
    return jnp.mean(jax.vmap(group)(xg, tg))

  def nn_vmap(p, x, t):
    return jnp.mean(_sq(vmapped.apply({"params": p}, x), t))

  def nn_remat(p, x, t):
    return jnp.mean(_sq(remat.apply({"params": p}, x), t))

  def checkpoint_model(p, x, t):
    apply = jax.checkpoint(lambda p, x: plain.apply({"params": p}, x))
    return jnp.mean(_sq(apply(p, x), t))

  def checkpoint_loss(p, x, t):
    return jax.checkpoint(batched)(p, x, t)

  return {"batched": batched, "jax.vmap per example": per_example,
          "jax.vmap per group": per_group, "nn.vmap shared": nn_vmap,
          "nn.remat": nn_remat, "jax.checkpoint model": checkpoint_model,
          "jax.checkpoint loss": checkpoint_loss}


TRANSFORMS = tuple(k for k in _losses() if k != "batched")


@functools.lru_cache(maxsize=None)
def _captured(name):
  x, t = _data()
  params = numpy_init(Wrapped("none"), x)
  fn = jax.jit(eva_optax.value_and_grad(_losses()[name], statistics="factors"))
  loss, grads, stats = fn(params, x, t)
  return params, loss, grads, stats


def test_plain_a_matches_numpy_forward():
  """The reference itself: ``a`` of both layers from a NumPy forward pass."""
  x, _ = _data()
  params, _, _, stats = _captured("batched")
  net = params["net"]
  rows = im2col(x, (2, 2), padding="SAME")        # (B, 16, 8): Flax pads SAME
  # A mean of the B x 16 rows.
  assert_propagated(stats["net"]["conv"].a, lambda r: with_one(r).mean(axis=(0, 1)),
                    (rows, B * 16 + 1))
  w = np.concatenate([to64(net["conv"]["kernel"]).reshape(-1, 3),
                      to64(net["conv"]["bias"])[None]])
  # The conv's fan-in (9) and tanh (2) on the weights, then the mean of B rows.
  assert_propagated(stats["net"]["dense"].a,
                    lambda w: with_one(np.tanh(with_one(rows) @ w).reshape(B, -1)).mean(axis=0),
                    (w, 9 + 2 + B + 1))


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_statistics_equal_the_plain_computation(transform):
  _, ref_loss, ref_grads, ref = _captured("batched")
  _, loss, grads, stats = _captured(transform)
  assert_float32_twins(loss, ref_loss, FORWARD_OPS)
  for layer in ("conv", "dense"):
    st, want = stats["net"][layer], ref["net"][layer]
    assert st.captured, (transform, layer, st.note)
    # The bias entry is exactly 1 (not the vmapped axis size).
    np.testing.assert_array_equal(np.asarray(st.a)[-1], 1.0)
    for key in KEYS:
      value, expected = np.asarray(getattr(st, key)), np.asarray(getattr(want, key))
      assert value.shape == expected.shape, (transform, layer, key, value.shape)
      assert_float32_twins(value, expected, TWIN_OPS, err_msg=f"{transform}: {layer}.{key}")
    for leaf in ("kernel", "bias"):
      assert_float32_twins(grads["net"][layer][leaf], ref_grads["net"][layer][leaf], TWIN_OPS)


def test_vmap_of_a_vmap_with_an_inner_batch():
  """``jax.vmap`` over groups whose loss is itself a ``jax.vmap`` per example."""
  x, t = _data()
  params, _, _, ref = _captured("batched")
  plain = Wrapped("none")

  def loss(p, x, t):
    one = lambda xe, te: _sq(plain.apply({"params": p}, xe), te)
    group = lambda xg, tg: jnp.mean(jax.vmap(one)(xg, tg))
    return jnp.mean(jax.vmap(group)(x.reshape((3, 2) + x.shape[1:]), t.reshape(3, 2, -1)))

  _, _, stats = jax.jit(eva_optax.value_and_grad(loss, statistics="factors"))(params, x, t)
  for layer in ("conv", "dense"):
    np.testing.assert_array_equal(np.asarray(stats["net"][layer].a)[-1], 1.0)
    for key in KEYS:
      expected = np.asarray(getattr(ref["net"][layer], key))
      assert_float32_twins(getattr(stats["net"][layer], key), expected, TWIN_OPS,
                           err_msg=f"{layer}.{key}")
