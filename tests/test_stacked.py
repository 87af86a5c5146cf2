"""Stacked layers (``nn.scan``, ``nn.vmap`` with per-member parameters) against
the same layers unrolled with the same weights.

A scanned block holds every layer type the capture reads through a view: a
Conv, a Dense with a bias, a bias-free ``DenseGeneral(features=(2, 2))`` and a
bias-free Dense. Its stacked statistics must equal, slice by slice, those of
the unrolled model (each block its own module), and every optimizer must give
the same update to every slice as to the unrolled layer: each slice is its own
layer. The single-layer statistics themselves are checked against NumPy in
tests/test_capture.py, so equality with the unrolled model proves the stacked
ones right.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from conftest import LAYERWISE
from conftest import OPTIMIZERS
from conftest import assert_float32_twins
from conftest import cosine
from conftest import float32_tol
from conftest import numpy_init
from conftest import preconditioner
from conftest import reference_tol
from conftest import reference_update
from conftest import rel_err

LAYERS = 3
C = 4
# Float32 roundings on the longest paths of the twins (scanned and unrolled
# programs re-associate differently): a block's forward is the conv's fan-in
# 9 C + 1, the Dense's C + 1, the heads' and projection's C, four tanh (2
# each) and the residual; the loss averages 3 x 4 x 4 x C outputs.
BLOCK_OPS = (9 * C + 1) + (C + 1) + 2 * C + 4 * 2 + 1
FORWARD_OPS = LAYERS * BLOCK_OPS + 3 * 4 * 4 * C + 1
# Gradients and statistics: the backward as long again, then the sums over
# the 3 x 4 x 4 rows (A and G: positions, examples, + 3).
TWIN_OPS = 2 * FORWARD_OPS + 3 * 4 * 4 + 4 * 4 + 3 + 3


class Block(nn.Module):
  """Conv -> Dense(bias) -> bias-free DenseGeneral(2 heads) -> bias-free Dense, residual.

  Called as ``(x, _) -> (x, None)`` so that it is its own ``nn.scan`` body.
  """

  @nn.compact
  def __call__(self, x, _=None):
    h = jnp.tanh(nn.Conv(C, (3, 3), padding="SAME", name="conv")(x))
    h = jnp.tanh(nn.Dense(C, name="dense")(h))
    h = nn.DenseGeneral((2, C // 2), use_bias=False, name="heads")(h)
    h = jnp.tanh(h.reshape(h.shape[:-2] + (C,)))
    h = nn.Dense(C, use_bias=False, name="proj")(h)
    return x + jnp.tanh(h), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(Block, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=LAYERS)
    x, _ = blocks(name="blocks")(x, None)
    return x


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(LAYERS):
      x, _ = Block(name=f"block_{i}")(x)
    return x


def _loss(model):
  def loss(params, x, t):
    return jnp.mean((model.apply({"params": params}, x) - t) ** 2)
  return loss


@functools.lru_cache(maxsize=None)
def _problem():
  """Both models with the same weights, one batch, grads and factor statistics."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 4, 4, C)) + 0.5, jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 4, 4, C)), jnp.float32)
  scanned = numpy_init(Scanned(), x)
  unrolled = {f"block_{i}": jax.tree.map(lambda w, i=i: w[i], scanned["blocks"])
              for i in range(LAYERS)}
  out = {}
  for name, model, params in (("scanned", Scanned(), scanned),
                              ("unrolled", Unrolled(), unrolled)):
    fn = jax.jit(eva_optax.value_and_grad(_loss(model), statistics="factors"))
    loss, grads, stats = fn(params, x, t)
    out[name] = (_loss(model), params, loss, grads, stats)
  assert_float32_twins(out["scanned"][2], out["unrolled"][2], FORWARD_OPS)
  return out, x, t


def _slices(tree, layer):
  return {f"block_{i}": jax.tree.map(lambda w, i=i: w[i], tree["blocks"][layer])
          for i in range(LAYERS)}


@pytest.mark.parametrize("layer", ["conv", "dense", "heads", "proj"])
def test_scanned_statistics_equal_unrolled_per_slice(layer):
  out, _, _ = _problem()
  _, _, _, s_grads, s_stats = out["scanned"]
  _, _, _, u_grads, u_stats = out["unrolled"]
  st = s_stats["blocks"][layer]
  assert st.captured, st.note
  assert st.view.stack == (LAYERS,)
  for key in ("a", "g", "A", "G"):
    stacked = np.asarray(getattr(st, key))
    assert stacked.shape[0] == LAYERS, (key, stacked.shape)
    for i in range(LAYERS):
      ref = np.asarray(getattr(u_stats[f"block_{i}"][layer], key))
      assert_float32_twins(stacked[i], ref, TWIN_OPS, err_msg=f"{layer}.{key} slice {i}")
  for i, node in _slices(s_grads, layer).items():
    for leaf, value in node.items():
      assert_float32_twins(value, u_grads[i][layer][leaf], TWIN_OPS,
                           err_msg=f"grad {layer}/{leaf} {i}")


def test_scanned_bias_entry_is_one_and_views_read_per_slice():
  out, _, _ = _problem()
  stats = out["scanned"][4]["blocks"]
  np.testing.assert_array_equal(np.asarray(stats["dense"].a)[:, -1], 1.0)
  np.testing.assert_array_equal(np.asarray(stats["conv"].a)[:, -1], 1.0)
  # The bias-free DenseGeneral with two feature axes is (d_in, heads * head_dim).
  assert stats["heads"].view.d_in == C and stats["heads"].view.d_out == C
  assert np.asarray(stats["heads"].a).shape == (LAYERS, C)
  assert np.asarray(stats["heads"].G).shape == (LAYERS, C, C)
  assert stats["conv"].view.d_in == 9 * C


def test_describe_shows_the_stack():
  out, _, _ = _problem()
  _, params, _, _, stats = out["scanned"]
  text = eva_optax.describe(stats, params)
  lines = {line.split(" | ")[0]: line for line in text.splitlines()}
  assert f"{LAYERS} x ({C} + 1, {C})" in lines["blocks/dense"], text
  assert f"{LAYERS} x ({C}, {C})" in lines["blocks/heads"], text
  assert f"{LAYERS} x ({C}, {C})" in lines["blocks/proj"], text
  assert f"{LAYERS} x ({9 * C} + 1, {C})" in lines["blocks/conv"], text
  assert "not captured" not in text


@pytest.mark.parametrize("name", LAYERWISE)
def test_layerwise_optimizer_without_views_raises_a_clear_error(name):
  out, _, _ = _problem()
  _, params, _, grads, stats = out["scanned"]
  tx = preconditioner(name)
  state = tx.init(params)
  with pytest.raises(ValueError, match="layer_views"):
    tx.update(grads, state, params, stats=stats)


def _slice_stats(st, i):
  """Slice ``i`` of stacked statistics, as a dict of float64 arrays."""
  return {k: np.asarray(getattr(st, k))[i] for k in ("a", "g", "A", "G")
          if getattr(st, k, None) is not None}


def _assert_update(name, got, grad_node, st, where):
  """``got`` (one slice's update) equals the NumPy step on that slice alone:
  its own gradient and statistics (which equal the unrolled layer's, see the
  statistics tests above), within the step's float32 bound."""
  ref = reference_update(name, grad_node, st)
  tol = reference_tol(name, grad_node, st)
  for leaf, value in ref.items():
    err = rel_err(got[leaf], value)
    assert err < tol[leaf], (name, where, leaf, err, tol[leaf])
  return cosine(ref[next(iter(ref))], grad_node[next(iter(ref))])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_scanned_updates_equal_unrolled(name):
  """Every slice's update equals that optimizer's NumPy step on that slice's
  gradient and statistics alone (which equal the unrolled model's, above)."""
  out, x, t = _problem()
  loss_s, s_params, _, s_grads, s_stats = out["scanned"]
  views = eva_optax.layer_views(loss_s, s_params, x, t)
  tx = preconditioner(name, layer_views=views)
  up, _ = jax.jit(tx.update)(s_grads, tx.init(s_params), s_params, stats=s_stats)
  cosines = []
  for layer in ("conv", "dense", "heads", "proj"):
    s_slices = _slices(s_grads, layer)
    for k, (i, node) in enumerate(_slices(up, layer).items()):
      st = _slice_stats(s_stats["blocks"][layer], k)
      cosines.append(_assert_update(name, node, s_slices[i], st, f"{layer} {i}"))
  # The curvature acts at this damping: some updates turn away from the gradient.
  assert min(cosines) < 0.99, (name, cosines)


# ----------------------------------------------------------------------------
# nn.vmap with per-member parameters: an ensemble.

MEMBERS = 3
# As above for the ensemble: conv fan-in 2 x 2 x 2 + 1, tanh, the Dense's
# 4 x 3 + 1, the loss over 2 outputs and 5 examples; the backward as long,
# the sums over 5 x 4 rows (A and G: + positions, examples, 3).
MEMBER_FORWARD = 9 + 2 + 13 + 2 + 6
MEMBER_OPS = 2 * MEMBER_FORWARD + 5 * 4 + 4 + 5 + 3


class Member(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(3, (2, 2), strides=2, name="conv")(x))
    return nn.Dense(2, name="dense")(h.reshape(h.shape[0], -1))


class Ensemble(nn.Module):
  @nn.compact
  def __call__(self, x):
    members = nn.vmap(Member, variable_axes={"params": 0},
                      split_rngs={"params": True}, in_axes=0, out_axes=0,
                      axis_size=MEMBERS)
    return members(name="members")(x)


@functools.lru_cache(maxsize=None)
def _ensemble():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(MEMBERS, 5, 4, 4, 2)) + 0.3, jnp.float32)
  t = jnp.asarray(rng.normal(size=(MEMBERS, 5, 2)), jnp.float32)
  params = numpy_init(Ensemble(), x, seed=1)

  def loss(p, x, t):   # the members' mean losses, summed
    y = Ensemble().apply({"params": p}, x)
    return jnp.sum(jnp.mean(jnp.sum((y - t) ** 2, -1), -1))

  def member_loss(p, x, t):
    return jnp.mean(jnp.sum((Member().apply({"params": p}, x) - t) ** 2, -1))

  fn = jax.jit(eva_optax.value_and_grad(loss, statistics="factors"))
  _, grads, stats = fn(params, x, t)
  member_fn = jax.jit(eva_optax.value_and_grad(member_loss, statistics="factors"))
  members = []
  for m in range(MEMBERS):
    p_m = jax.tree.map(lambda w, m=m: w[m], params["members"])
    members.append((p_m,) + member_fn(p_m, x[m], t[m])[1:])
  return loss, params, x, t, grads, stats, members


@pytest.mark.parametrize("layer", ["conv", "dense"])
def test_vmap_members_statistics_equal_each_member_alone(layer):
  _, _, _, _, grads, stats, members = _ensemble()
  st = stats["members"][layer]
  assert st.captured, st.note
  assert st.view.stack == (MEMBERS,)
  for m, (_, m_grads, m_stats) in enumerate(members):
    for key in ("a", "g", "A", "G"):
      assert_float32_twins(np.asarray(getattr(st, key))[m], getattr(m_stats[layer], key),
                           MEMBER_OPS, err_msg=f"{layer}.{key} member {m}")
    assert_float32_twins(grads["members"][layer]["kernel"][m], m_grads[layer]["kernel"],
                         MEMBER_OPS)


@pytest.mark.parametrize("name", ["eva", "kfac"])   # one vector, one factor method
def test_vmap_members_updates_equal_each_member_alone(name):
  loss, params, x, t, grads, stats, _ = _ensemble()
  views = eva_optax.layer_views(loss, params, x, t)
  tx = preconditioner(name, layer_views=views)
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  for m in range(MEMBERS):
    for layer in ("conv", "dense"):
      got = jax.tree.map(lambda w, m=m: w[m], up["members"][layer])
      own = jax.tree.map(lambda w, m=m: np.asarray(w)[m], grads["members"][layer])
      _assert_update(name, got, own, _slice_stats(stats["members"][layer], m),
                     f"{layer} member {m}")


# ----------------------------------------------------------------------------
# Leaves of a scanned block that no captured layer holds (LayerNorm).


class _NormBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(4, name="dense")(nn.LayerNorm(name="norm")(x)), None


class _NormModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + self.param("pos", nn.initializers.normal(1.0), (2, 4))   # (2, 4) like a stack
    x, _ = nn.scan(_NormBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="blocks")(x, None)
    return nn.Dense(3, name="head")(x)


@pytest.mark.parametrize("name", ["eva_s", "shampoo"])
def test_per_tensor_optimizers_keep_a_scanned_norm_per_slice(name):
  """A scanned LayerNorm's (layers, width) scale is one vector per block: with
  SGD grafting each slice's update is its gradient, never a (layers, width)
  matrix preconditioned across blocks; a root (2, 4) parameter is a matrix."""
  x = jnp.asarray(np.random.default_rng(5).normal(size=(5, 2, 4)), jnp.float32)
  params = numpy_init(_NormModel(), x, seed=5)
  loss = lambda p, x: jnp.mean(_NormModel().apply({"params": p}, x) ** 2)
  grads = jax.grad(loss)(params, x)
  views = eva_optax.layer_views(loss, params, x)
  tx = preconditioner(name, layer_views=views)
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for leaf in ("scale", "bias"):   # the SGD graft: g |g| / |g|, a norm of 4 terms + 2
    np.testing.assert_allclose(up["blocks"]["norm"][leaf], grads["blocks"]["norm"][leaf],
                               rtol=float32_tol(1.0, 2 * (4 + 2)), err_msg=leaf)
  pos = np.asarray(up["pos"])
  assert cosine(pos, grads["pos"]) < 0.9999, "the root (2, 4) parameter is preconditioned"
