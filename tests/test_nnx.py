"""Flax NNX: ``eva_optax.nnx.value_and_grad`` against the same network in linen.

The NNX network uses every captured NNX layer (``nnx.Embed`` with ``attend``,
``nnx.Conv``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Linear``); its linen
twin the corresponding linen layers, with the same weights. Statistics and
gradients must be identical, and one step of every optimizer through
``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, stats=stats)``
must equal the NumPy step on the linen twin's gradients and statistics; three
steps run under ``nnx.jit``. A stacked NNX model (``nnx.vmap`` to create,
``nnx.scan`` to apply) gets the statistics of the unrolled model, slice by
slice; and Flax's bridges either work or say clearly why not.
"""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import eva_optax
import eva_optax.nnx
from conftest import OPTIMIZERS
from conftest import EPS32
from conftest import SMALL_DAMPING
from conftest import assert_float32_twins
from conftest import assert_propagated
from conftest import float32_tol
from conftest import preconditioner
from conftest import reference_tol
from conftest import reference_update
from conftest import rel_err
from conftest import to64

V, F, B, T = 7, 4, 3, 5
LAYERS = ("embed", "conv", "heads", "mix", "out")
# Float32 roundings on the longest paths of the NNX and linen twins (the same
# function, traced differently): the conv's fan-in 2 F + 1, the heads' F + 1,
# the einsum's F, the Dense's F + 1, the attend's F, three tanh (2 each), then
# the cross-entropy's softmax (V + 4) and mean over B T; the backward as long
# again, the statistics' sums over the B T rows (A and G: + T + B + 3).
LOGITS_OPS = (2 * F + 1) + (F + 1) + F + (F + 1) + F + 3 * 2
FORWARD_OPS = LOGITS_OPS + (V + 4) + B * T + 1
NET_OPS = 2 * FORWARD_OPS + B * T + 1 + T + B + 3


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(V, F, rngs=rngs)
    self.conv = nnx.Conv(F, F, kernel_size=(2,), padding="SAME", rngs=rngs)
    self.heads = nnx.LinearGeneral(F, (2, F // 2), rngs=rngs)
    self.mix = nnx.Einsum("btd,df->btf", (F, F), (F,), rngs=rngs)
    self.out = nnx.Linear(F, F, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids)
    h = jnp.tanh(self.conv(h))
    h = self.heads(h).reshape(h.shape)
    h = jnp.tanh(self.mix(h))
    h = jnp.tanh(self.out(h))
    return self.embed.attend(h)


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(V, F, name="embed")
    h = embed(ids)
    h = jnp.tanh(nn.Conv(F, (2,), padding="SAME", name="conv")(h))
    h = nn.DenseGeneral((2, F // 2), name="heads")(h).reshape(h.shape)
    h = jnp.tanh(nn.Einsum((F, F), "btd,df->btf", name="mix")(h))
    h = jnp.tanh(nn.Dense(F, name="out")(h))
    return embed.attend(h)


def nnx_loss(model, ids, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(ids), labels).mean()


def linen_loss(params, ids, labels):
  logits = LinenNet().apply({"params": params}, ids)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _copy(model):
  return nnx.clone(model)   # a deep copy: merge(*split(m)) shares the Variables


def _pure(state):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


@functools.lru_cache(maxsize=None)
def _problem():
  rng = np.random.default_rng(20)
  ids = jnp.asarray(rng.integers(0, V, size=(B, T)))
  labels = jnp.asarray(rng.integers(0, V, size=(B, T)))
  model = Net(nnx.Rngs(0))
  params = jax.tree.map(jnp.asarray, _pure(nnx.state(model, nnx.Param)))
  assert_float32_twins(model(ids), LinenNet().apply({"params": params}, ids), LOGITS_OPS,
                       err_msg="the twins differ")
  nnx_out = nnx.jit(eva_optax.nnx.value_and_grad(nnx_loss, statistics="factors"))(
      _copy(model), ids, labels)
  linen_out = jax.jit(eva_optax.value_and_grad(linen_loss, statistics="factors"))(
      params, ids, labels)
  plain = nnx.jit(nnx.value_and_grad(nnx_loss))(_copy(model), ids, labels)
  return model, ids, labels, params, nnx_out, linen_out, plain


def test_nnx_grads_equal_nnx_value_and_grad_and_linen():
  _, _, _, _, (loss, grads, _), (l_loss, l_grads, _), (p_loss, p_grads) = _problem()
  assert isinstance(grads, nnx.State)
  assert_float32_twins(loss, p_loss, FORWARD_OPS)
  assert_float32_twins(loss, l_loss, FORWARD_OPS)
  mine, plain = _pure(grads), _pure(p_grads)
  assert jax.tree.structure(mine) == jax.tree.structure(plain)
  jax.tree.map(lambda a, b: assert_float32_twins(a, b, NET_OPS), mine, plain)
  jax.tree.map(lambda a, b: assert_float32_twins(a, b, NET_OPS),
               mine, jax.tree.map(np.asarray, l_grads))


@pytest.mark.parametrize("layer", LAYERS)
def test_nnx_statistics_equal_linen(layer):
  _, _, _, _, (_, _, stats), (_, _, l_stats), _ = _problem()
  st, ref = stats[layer], l_stats[layer]
  assert st.captured, st.note
  assert ref.captured, ref.note
  assert st.view.d_in == ref.view.d_in and st.view.d_out == ref.view.d_out
  assert st.view.diagonal == ref.view.diagonal
  for key in ("a", "g", "A", "G"):
    assert_float32_twins(getattr(st, key), getattr(ref, key), NET_OPS, err_msg=key)


def test_nnx_stats_are_keyed_like_the_param_state():
  model, _, _, _, (_, _, stats), _, _ = _problem()
  assert set(stats) == set(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  text = eva_optax.describe(stats, nnx.state(model, nnx.Param))
  assert "not captured" not in text and "MISSING" not in text, text


def _lr(name):
  """A step of about a tenth of the gradient (the raw steps carry 1/damping)."""
  return 0.1 if name in ("eva_s", "shampoo") else 0.1 * SMALL_DAMPING[name]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nnx_optimizer_updates_equal_linen_and_run_three_steps(name):
  """``nnx.Optimizer(...).update(model, grads, stats=stats)`` under ``nnx.jit``:
  the first step equals ``-lr`` times the NumPy step on the gradients and
  statistics it was given (which equal the linen twin's, above); two more
  steps run and stay finite."""
  base, ids, labels, _, _, _, _ = _problem()
  model = _copy(base)
  lr = _lr(name)
  tx = optax.chain(preconditioner(name), optax.scale(-lr))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, ids, labels):
    loss, grads, stats = eva_optax.nnx.value_and_grad(
        nnx_loss, statistics="factors")(model, ids, labels)
    optimizer.update(model, grads, stats=stats)
    return loss, grads, stats

  before = _pure(nnx.state(model, nnx.Param))
  loss, grads, stats = step(model, optimizer, ids, labels)
  losses = [loss]
  after = _pure(nnx.state(model, nnx.Param))
  grads = _pure(grads)
  for layer in LAYERS:
    ref = reference_update(name, grads[layer], stats[layer])
    tol = reference_tol(name, grads[layer], stats[layer])
    for leaf, u in ref.items():
      delta = to64(after[layer][leaf]) - to64(before[layer][leaf])
      # + the learning rate's product and the parameters' own rounding in
      # p + update (half an eps32 of |p + update|, twice: before, after).
      apply = float32_tol(1.0, 1) + EPS32 * np.linalg.norm(to64(after[layer][leaf])) / (
          lr * np.linalg.norm(u))
      err = rel_err(delta, -lr * u)
      assert err < tol[leaf] + apply, (name, layer, leaf, err, tol[leaf] + apply)
  for _ in range(2):
    losses.append(step(model, optimizer, ids, labels)[0])
  assert int(optimizer.step[...]) == 3
  assert np.all(np.isfinite(losses)), losses
  for leaf in jax.tree.leaves(_pure(nnx.state(model, nnx.Param))):
    assert np.all(np.isfinite(leaf))
  assert losses[2] != losses[1]   # the third step still moved the model


# ----------------------------------------------------------------------------
# Stacked NNX layers: nnx.vmap to create, nnx.scan to apply.

STACK = 3
# A block: Linear's F + 1, LinearGeneral's F, two tanh and the residual; the
# loss averages 4 x 2 x F outputs. Gradients and statistics: the backward as
# long again and the sums over the 4 x 2 rows (A and G: + 2 + 4 + 3).
STACK_FORWARD = STACK * ((F + 1) + F + 2 * 2 + 1)
STACK_OPS = 2 * (STACK_FORWARD + 4 * 2 * F + 1) + 4 * 2 + 1 + 2 + 4 + 3


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(F, F, rngs=rngs)
    self.heads = nnx.LinearGeneral(F, (2, F // 2), use_bias=False, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.lin(x))
    return x + jnp.tanh(self.heads(h).reshape(x.shape))


class Stacked(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=STACK)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)
    self.blocks = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, x):
      return block(x)
    return body(self.blocks, x)


class Unrolled(nnx.Module):
  def __init__(self, stacked: Stacked):
    for i in range(STACK):
      block = Block(nnx.Rngs(i))
      for layer in ("lin", "heads"):
        for leaf in ("kernel", "bias"):
          var = getattr(getattr(block, layer), leaf, None)
          if var is not None:
            var[...] = getattr(getattr(stacked.blocks, layer), leaf)[...][i]
      setattr(self, f"block_{i}", block)

  def __call__(self, x):
    for i in range(STACK):
      x = getattr(self, f"block_{i}")(x)
    return x


def test_stacked_nnx_statistics_equal_the_unrolled_model():
  x = jnp.asarray(np.random.default_rng(21).normal(size=(4, 2, F)) + 0.5, jnp.float32)
  t = jnp.asarray(np.random.default_rng(22).normal(size=(4, 2, F)), jnp.float32)
  stacked = Stacked(nnx.Rngs(0))
  unrolled = Unrolled(stacked)
  loss = lambda m, x, t: jnp.mean((m(x) - t) ** 2)
  assert_float32_twins(stacked(x), unrolled(x), STACK_FORWARD)
  fn = nnx.jit(eva_optax.nnx.value_and_grad(loss, statistics="factors"))
  _, grads, stats = fn(stacked, x, t)
  _, u_grads, u_stats = fn(unrolled, x, t)
  for layer in ("lin", "heads"):
    st = stats["blocks"][layer]
    assert st.captured, st.note
    assert st.view.stack == (STACK,), st.view
    for i in range(STACK):
      ref = u_stats[f"block_{i}"][layer]
      for key in ("a", "g", "A", "G"):
        assert_float32_twins(np.asarray(getattr(st, key))[i], getattr(ref, key), STACK_OPS,
                             err_msg=f"{layer}.{key} slice {i}")
      assert_float32_twins(np.asarray(grads["blocks"][layer]["kernel"][...])[i],
                           u_grads[f"block_{i}"][layer]["kernel"][...], STACK_OPS)
  assert f"{STACK} x ({F}, {F})" in eva_optax.describe(stats, nnx.state(stacked, nnx.Param))


# ----------------------------------------------------------------------------
# Flax's bridges between linen and NNX.


class LinenInsideNNX(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.inner = nnx.bridge.ToNNX(nn.Dense(3), rngs=rngs)
    nnx.bridge.lazy_init(self.inner, jnp.ones((1, F)))
    self.out = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.inner(x)))


def test_bridge_to_nnx_works_or_raises_a_clear_error():
  """A linen layer inside NNX (``nnx.bridge.ToNNX``): captured like the same
  linen layer, or not captured with a note, or a clear error that names the
  bridge; never an internal error from Flax's variable registry."""
  x = jnp.asarray(np.random.default_rng(23).normal(size=(5, F)), jnp.float32)
  model = LinenInsideNNX(nnx.Rngs(0))
  loss = lambda m, x: jnp.mean(m(x) ** 2)
  try:
    _, grads, stats = eva_optax.nnx.value_and_grad(loss)(model, x)
  except (ValueError, TypeError) as e:
    assert "ToNNX" in str(e) or "bridge" in str(e), f"unclear error: {e}"
    return
  _, plain = nnx.value_and_grad(loss)(model, x)
  # Dense(3) on F inputs, tanh, Linear(3, 2), the mean of 5 x 2 squares; the
  # backward as long, the batch sum of 5 rows.
  bridge_ops = 2 * ((F + 1) + 2 + 4 + 11) + 5
  assert_float32_twins(grads["inner"]["kernel"][...], plain["inner"]["kernel"][...],
                       bridge_ops)
  assert stats["out"].captured
  st = stats["inner"]
  if not st.captured:
    assert st.note, "not captured without a reason"
    return
  assert_propagated(st.a, lambda h: np.concatenate([h.mean(axis=0), [1.0]]),
                    (x, len(x) + 1))   # a mean of the rows


class NNXInsideLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nnx.bridge.to_linen(nnx.Linear, F, 3)(x)
    return nn.Dense(2, name="head")(jnp.tanh(h))


@functools.lru_cache(maxsize=None)
def _to_linen():
  x = jnp.asarray(np.random.default_rng(24).normal(size=(5, F)), jnp.float32)
  model = NNXInsideLinen()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, grads, stats = eva_optax.value_and_grad(loss)(params, x)
  return params, x, loss, grads, stats, caught


def test_bridge_to_linen_is_reported_not_captured_and_passes_through():
  """An NNX layer inside linen (``nnx.bridge.ToLinen``) is not captured: it is
  reported with a note, its gradient is JAX's, the linen head is captured."""
  params, x, loss, grads, stats, _ = _to_linen()
  (name,) = [k for k in params if k != "head"]
  st = stats[name]
  if st.captured:   # if it ever becomes captured, it must be right
    assert_propagated(st.a, lambda h: np.concatenate([h.mean(axis=0), [1.0]]),
                      (x, len(x) + 1))
  else:
    assert "ToLinen" in st.note, st.note
  assert stats["head"].captured
  # As above: Linear(F, 3), tanh, Dense(2), the mean of 5 x 2 squares, both ways.
  ops = 2 * ((F + 1) + 2 + 4 + 11) + 5
  jax.tree.map(lambda a, b: assert_float32_twins(a, b, ops), grads, jax.grad(loss)(params, x))


def test_bridge_to_linen_gives_no_warning_about_the_probes():
  """The capture's probes must not leak into Flax's bridge as unknown state
  (Flax warns 'Found unknown module paths in incoming state: __eva_optax_probe__')."""
  *_, caught = _to_linen()
  leaked = [str(w.message) for w in caught if "eva_optax" in str(w.message)]
  assert not leaked, leaked
