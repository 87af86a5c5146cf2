"""A layer is captured only if the capture saw every use of its parameters.

The statistics of a layer describe the calls the capture taps. A parameter also
used elsewhere (a hand-written tie ``h @ embed.T``, another layer applied to
it) would get statistics that miss part of its gradient: such a layer must be
reported not captured, with the reason, and pass its gradient through. A loss
term in the parameters alone (an L2 penalty) keeps the layer captured, with a
note. Flax's transforms (``nn.scan``, ``nn.remat``, ``nn.cond``) must not be
mistaken for another use. For every layer reported captured, the rows of
``statistics="rows"`` reproduce its gradient (sum over rows of ``a g^T``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eva_optax
import eva_optax.nnx
from conftest import numpy_init
from conftest import preconditioner
from conftest import to64

V, D, B, T = 11, 6, 3, 5
EPS32 = float(np.finfo(np.float32).eps)


def _ids(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)))


def _xent(logits, ids):
  logz = jax.nn.logsumexp(logits, axis=-1)
  return jnp.mean(logz - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])


class LM(nn.Module):
  """Embedding, a hidden Dense, and a head tied to the embedding in ``tie`` ways."""

  tie: str = "attend"

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(V, D, name="embed")
    h = jnp.tanh(nn.Dense(D, name="hidden")(embed(ids)))
    if self.tie == "attend":          # captured: pooled with the lookup
      return embed.attend(h)
    if self.tie == "by_hand":         # another use the capture cannot see
      return h @ embed.embedding.T
    if self.tie == "dense_apply":     # transformers' FlaxBert / GPT-2 tie
      return nn.Dense(V, use_bias=False, name="decoder").apply(
          {"params": {"kernel": embed.embedding.T}}, h)
    return nn.Dense(V, name="head")(h)


def _lm(tie, statistics="rows", penalty=0.0):
  model = LM(tie)
  ids = _ids()
  params = numpy_init(LM("none"), ids) if tie == "none" else numpy_init(model, ids)

  def loss(p, ids):
    out = _xent(model.apply({"params": p}, ids), ids)
    if penalty:
      out = out + penalty * jnp.sum(p["hidden"]["kernel"] ** 2)
    return out

  fn = jax.jit(eva_optax.value_and_grad(loss, statistics=statistics))
  return params, ids, loss, fn(params, ids)


def rows_reproduce_gradient(st, node) -> None:
  """``sum_rows a g^T`` (float64, from float32 rows) equals the float32
  gradient of ``[W; b]`` read through the layer's view, within float32's
  summation bound: ``|err| <= 2 n eps32 sum_rows |a| |g|`` per entry (n rows)."""
  v = st.view
  kernel = v.kernel_matrices(np.asarray(node[v.param]))
  gm = to64(kernel).reshape((v.num_slices,) + kernel.shape[1:])[0]
  if v.has_bias:
    gm = np.concatenate([gm, to64(v.bias_vectors(np.asarray(node[v.bias_param])))])
  a, g = to64(st.a_rows), to64(st.g_rows)
  est = a.T @ g
  bound = 2 * a.shape[0] * EPS32 * (np.abs(a).T @ np.abs(g)) + 1e-30
  assert np.all(np.abs(est - gm) <= bound), float(np.max(np.abs(est - gm) / bound))


@pytest.mark.parametrize("tie", ["by_hand", "dense_apply"])
def test_other_use_of_the_embedding_is_not_captured_and_passes_through(tie):
  params, _, _, (_, grads, stats) = _lm(tie, "vectors")
  st = stats["embed"]
  assert not st.captured
  assert "outside its layer calls" in st.note and "attend" in st.note, st.note
  assert stats["hidden"].captured, stats["hidden"].note
  for name in ("eva", "eva_f", "kfac", "foof"):
    if name in ("kfac", "foof"):
      _, _, _, (_, grads, stats) = _lm(tie, "factors")
    tx = preconditioner(name)
    up, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
    np.testing.assert_array_equal(up["embed"]["embedding"],
                                  grads["embed"]["embedding"], err_msg=name)
    assert not np.allclose(up["hidden"]["kernel"], grads["hidden"]["kernel"])
  text = eva_optax.describe(stats, params)
  assert "embed | Embed | not captured" in text, text


@pytest.mark.parametrize("tie", ["attend", "none"])
def test_captured_layers_rows_reproduce_their_gradient(tie):
  _, _, _, (_, grads, stats) = _lm(tie)
  for name in ("embed", "hidden") + (("head",) if tie == "none" else ()):
    st = stats[name]
    assert st.captured and not st.note, (name, st.note)
    rows_reproduce_gradient(st, grads[name])


def test_the_check_guards_a_real_miss():
  """Under the hand-written tie, the lookup's rows (one-hot ids, dL/d lookup)
  reproduce only part of the embedding's gradient: calling the layer captured
  would precondition with statistics that miss the tie's share."""
  ids = _ids()
  model = LM("by_hand")
  params = numpy_init(model, ids)
  table = params["embed"]["embedding"]
  full = to64(jax.grad(lambda p: _xent(model.apply({"params": p}, ids), ids))(
      params)["embed"]["embedding"])

  def from_lookup(z):      # the loss as a function of the lookup's output
    h = jnp.tanh(nn.Dense(D).apply({"params": params["hidden"]}, z))
    return _xent(h @ table.T, ids)

  dz = to64(jax.grad(from_lookup)(table[ids])).reshape(-1, D)
  onehot = np.eye(V)[np.asarray(ids).reshape(-1)]
  lookup_rows = onehot.T @ dz
  miss = np.abs(lookup_rows - full).max() / np.abs(full).max()
  assert miss > 0.2, miss


def test_a_penalty_keeps_the_layer_captured_with_a_note():
  _, _, _, (_, _, plain) = _lm("attend", "factors")
  _, _, _, (_, _, pen) = _lm("attend", "factors", penalty=1e-2)
  st = pen["hidden"]
  assert st.captured and "penalty" in st.note, st.note
  assert "penalty" in eva_optax.describe(pen, numpy_init(LM("attend"), _ids()))
  for key in ("a", "g", "A", "G"):    # the data term's statistics, exactly
    np.testing.assert_array_equal(getattr(st, key), getattr(plain["hidden"], key))
  assert pen["embed"].captured and not pen["embed"].note


def test_a_data_dependent_extra_term_is_another_use():
  """``sum(x * W)`` mixes the data with the parameter: not a penalty."""
  model = nn.Dense(3)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
  params = numpy_init(model, x)
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2) + jnp.sum(
      x[:3] * p["kernel"])
  _, _, st = eva_optax.value_and_grad(loss)(params, x)
  assert not st.captured and "outside its layer calls" in st.note, st.note


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(D)(h)), None


class Transformed(nn.Module):
  """Every captured use goes through a Flax transform: none is another use."""

  @nn.compact
  def __call__(self, x):
    h = nn.remat(nn.Dense)(D, name="remat")(x)
    h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="scan")(h, None)
    branch = nn.Dense(D, name="branch")
    h = nn.cond(h.sum() > 0, lambda mdl, h: branch(h), lambda mdl, h: -branch(h),
                self, h)
    return nn.Dense(2, name="out")(h)


def test_transforms_are_not_mistaken_for_another_use():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, D)), jnp.float32)
  model = Transformed()
  params = numpy_init(model, x)
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  _, grads, stats = jax.jit(eva_optax.value_and_grad(loss, statistics="rows"))(
      params, x)
  for name in ("remat", "branch", "out"):
    assert stats[name].captured, (name, stats[name].note)
    rows_reproduce_gradient(stats[name], grads[name])
  # ("rows" cannot tell a scanned layer's calls apart; "factors" can.)
  _, _, stats = jax.jit(eva_optax.value_and_grad(loss, statistics="factors"))(
      params, x)
  st = stats["scan"]["Dense_0"]
  assert st.captured and st.view.stack == (3,) and not st.note, st.note


# ----------------------------------------------------------------------------
# NNX: the same rule through the NNX capture.


class NNXLM(nnx.Module):
  def __init__(self, tie: str, rngs: nnx.Rngs):
    self.tie = tie
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.hidden = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, ids):
    h = jnp.tanh(self.hidden(self.embed(ids)))
    if self.tie == "attend":
      return self.embed.attend(h)
    return h @ self.embed.embedding[...].T


@pytest.mark.parametrize("tie", ["attend", "by_hand"])
def test_nnx_other_use_is_not_captured(tie):
  model = NNXLM(tie, nnx.Rngs(0))
  ids = _ids()
  loss = lambda m, ids: _xent(m(ids), ids)
  _, grads, stats = eva_optax.nnx.value_and_grad(loss, statistics="rows")(model, ids)
  assert stats["hidden"].captured, stats["hidden"].note
  rows_reproduce_gradient(stats["hidden"], {k: v[...] for k, v in grads["hidden"].items()})
  st = stats["embed"]
  if tie == "attend":
    assert st.captured, st.note
    rows_reproduce_gradient(st, {"embedding": grads["embed"]["embedding"][...]})
  else:
    assert not st.captured and "outside its layer calls" in st.note, st.note
