"""``value_and_grad(..., stats_batch=m)``: statistics of the first m examples.

For a batch of B examples under the batch-mean loss, the statistics with
``stats_batch=m`` equal those of the first m examples alone under the loss
``(m / B) * mean over the m`` (each row keeps the ``1/B`` of the whole batch's
mean), for every captured layer type, while the gradient stays the whole
batch's, bit for bit; in "rows" mode there are m rows per example position.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import eva_optax
import eva_optax.nnx
from conftest import numpy_init

B, M = 12, 5


class Net(nn.Module):
  @nn.compact
  def __call__(self, img, ids):
    embed = nn.Embed(7, 6, name="embed")
    e = embed(ids)                                                # (B, T, 6)
    h = nn.Conv(4, (3, 3), strides=2, name="conv")(img)           # (B, 3, 3, 4)
    h = jnp.tanh(h.reshape(h.shape[0], 1, -1)).repeat(ids.shape[1], 1)
    h = jnp.tanh(nn.DenseGeneral(6, axis=-1, name="dense")(jnp.concatenate([h, e], -1)))
    return embed.attend(h)                                         # (B, T, 7)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  img = jnp.asarray(rng.normal(size=(B, 6, 6, 2)) + 0.3, jnp.float32)
  ids = jnp.asarray(rng.integers(0, 7, (B, 3)))
  return img, ids


def _loss(params, img, ids):
  logits = Net().apply({"params": params}, img, ids)
  logz = jax.nn.logsumexp(logits, -1)
  return jnp.mean(logz - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])


@pytest.mark.parametrize("statistics", ["factors", "rows"])
def test_statistics_of_the_first_examples_gradient_of_all(statistics):
  img, ids = _data()
  params = numpy_init(Net(), img, ids)
  _, grads, stats = jax.jit(eva_optax.value_and_grad(
      _loss, statistics=statistics, stats_batch=M))(params, img, ids)
  _, full_grads, _ = jax.jit(eva_optax.value_and_grad(
      _loss, statistics=statistics))(params, img, ids)
  sub = lambda p, img, ids: (M / B) * _loss(p, img, ids)
  _, _, ref = jax.jit(eva_optax.value_and_grad(sub, statistics=statistics))(
      params, img[:M], ids[:M])
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
    np.testing.assert_array_equal(a, b)
  keys = ("a", "g", "A", "G") + (("a_rows", "g_rows") if statistics == "rows" else ())
  for layer in ("embed", "conv", "dense"):
    st, want = stats[layer], ref[layer]
    assert st.captured, (layer, st.note)
    for key in keys:
      w = np.asarray(getattr(want, key))
      # The same float32 sums over the same rows (fewer rows than the full
      # batch's): equal up to the order of the sums, |err| <= 2 n eps32 |w|max.
      np.testing.assert_allclose(getattr(st, key), w, rtol=0,
                                 atol=2 * B * 3 * 1.2e-7 * np.abs(w).max(),
                                 err_msg=f"{layer}.{key}")


def test_statistics_differ_from_the_whole_batch():
  """A test that can fail: the first M examples are not the whole batch."""
  img, ids = _data()
  params = numpy_init(Net(), img, ids)
  _, _, sub = eva_optax.value_and_grad(_loss, stats_batch=M)(params, img, ids)
  _, _, full = eva_optax.value_and_grad(_loss)(params, img, ids)
  assert not np.allclose(sub["dense"].a, full["dense"].a, rtol=1e-3)


def test_nnx_stats_batch_equals_linen():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(B, 4)), jnp.float32)
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  loss = lambda m, x: jnp.mean(m(x) ** 2)
  _, _, st = eva_optax.nnx.value_and_grad(loss, statistics="factors",
                                          stats_batch=M)(model, x)
  params = {"kernel": model.kernel[...], "bias": model.bias[...]}
  lin = lambda p, x: jnp.mean(nn.Dense(3).apply({"params": p}, x) ** 2)
  _, _, ref = eva_optax.value_and_grad(lin, statistics="factors",
                                       stats_batch=M)(params, x)
  for key in ("a", "g", "A", "G"):
    np.testing.assert_allclose(getattr(st, key), getattr(ref, key), rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="stats_batch"):
    eva_optax.value_and_grad(_loss, stats_batch=0)
  with pytest.raises(ValueError, match="stats_batch"):
    eva_optax.value_and_grad(_loss, stats_batch=2.5)
  # Inside jax.vmap a Dense input (d_in,) has no example axis: not captured.
  model = nn.Dense(3)
  params = numpy_init(model, jnp.zeros((1, 4)))
  per_example = lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2)
  fn = eva_optax.value_and_grad(per_example, stats_batch=2)
  _, _, st = jax.vmap(fn, in_axes=(None, 0))(params, jnp.ones((6, 4)))
  assert not st.captured and "example axis" in st.note, st.note


def _layer_averages(state):
  """The running averages ``a, g`` per layer of the LayerwiseState inside ``state``."""
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "layers"))
           if hasattr(s, "layers")]
  return {layer: {k: np.asarray(v[k]) for k in ("a", "g")}
          for layer, v in found[0].layers.items()}


def test_composes_with_stats_every_and_multisteps():
  """``stats_batch`` statistics go through ``MultiSteps`` and ``stats_every`` as any do.

  Four micro-batches, two emitted updates of ``MultiSteps(eva(stats_every=2),
  2)``: fed the ``stats_batch=M`` statistics, the optimizer's running averages
  equal those of the run fed the reference statistics of each micro-batch's
  first M examples (the scaled sub-batch loss), with the whole batches'
  gradients in both.
  """
  img, ids = _data()
  params0 = numpy_init(Net(), img, ids)
  micro = [_data(seed) for seed in range(4)]
  sub_loss = lambda p, img, ids: (M / B) * _loss(p, img, ids)
  with_m = jax.jit(eva_optax.value_and_grad(_loss, stats_batch=M))
  whole, sub = (jax.jit(eva_optax.value_and_grad(f)) for f in (_loss, sub_loss))

  def reference(p, img, ids):
    loss, grads, _ = whole(p, img, ids)
    return loss, grads, sub(p, img[:M], ids[:M])[2]

  def run(grad_fn):
    tx = eva_optax.MultiSteps(eva_optax.eva(0.1, stats_every=2), every_k_schedule=2)
    params, state = params0, tx.init(params0)
    for batch in micro:
      _, grads, stats = grad_fn(params, *batch)
      updates, state = jax.jit(tx.update)(grads, state, params, stats=stats)
      params = optax.apply_updates(params, updates)
    return params, _layer_averages(state)

  got_params, got = run(with_m)
  ref_params, want = run(reference)
  assert jax.tree.all(jax.tree.map(lambda x: bool(np.isfinite(x).all()), got_params))
  assert set(got) == {"embed", "conv", "dense"}
  for layer, avg in want.items():
    for key, w in avg.items():
      # The statistics: as in the first test (2 B 3 roundings), averaged over
      # the 2 micro-steps and folded once into the decayed average (3 more).
      np.testing.assert_allclose(got[layer][key], w, rtol=0,
                                 atol=(2 * B * 3 + 6) * 1.2e-7 * np.abs(w).max(),
                                 err_msg=f"{layer}.{key}")
  # Not trivially equal: a run fed the whole batch's statistics differs.
  _, full = run(whole)
  assert not np.allclose(full["dense"]["a"], want["dense"]["a"], rtol=1e-3)
