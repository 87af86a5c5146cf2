"""Embeddings: ``nn.Embed`` lookups, ``Embed.attend`` and a tied embedding used
both ways, against NumPy forward and backward passes written out by hand.

An embedding is a Dense layer on one-hot rows without a bias, in the table's
``(vocab, features)`` orientation: a lookup's rows are ``(one_hot(id),
dL/dy)``, ``attend``'s rows are ``(dL/dlogits, query)``. So for every use the
sum over rows of ``a g^T`` is the table's gradient, ``a`` is the mean row and
``A`` (a vector) the diagonal of the mean outer product of the input rows.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from conftest import layerwise_reference
from conftest import preconditioner
from conftest import rel_err
from conftest import to64

V, F, B, T = 7, 3, 4, 5


def _close(x, ref, rtol=2e-5, msg=""):
  ref = to64(ref)
  np.testing.assert_allclose(to64(x), ref, rtol=rtol,
                             atol=1e-6 * max(np.abs(ref).max(), 1e-30), err_msg=msg)


def _ids():
  ids = np.random.default_rng(5).integers(0, V - 2, size=(B, T))   # V-2, V-1 unused
  ids[0, :3] = 2                                                    # repeats
  return ids


def _table(seed=6):
  return np.random.default_rng(seed).normal(size=(V, F))


def _softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def _example_factor(rows):
  """(B, T, d) -> mean over examples of (mean over positions)(...)^T."""
  e = to64(rows).mean(axis=1)
  return e.T @ e / e.shape[0]


# ----------------------------------------------------------------------------
# Lookup: y = table[ids], loss = 0.5 * sum((y - target)^2) / B.


class Lookup(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.Embed(V, F, name="embed")(ids)


@functools.lru_cache(maxsize=None)
def _lookup():
  ids = _ids()
  table = _table()
  target = np.random.default_rng(7).normal(size=(B, T, F))
  params = {"embed": {"embedding": jnp.asarray(table, jnp.float32)}}

  def loss(p, ids):
    y = Lookup().apply({"params": p}, ids)
    return 0.5 * jnp.sum((y - target) ** 2) / B

  fn = jax.jit(eva_optax.value_and_grad(loss, statistics="rows"))
  _, grads, stats = fn(params, jnp.asarray(ids))
  dy = (to64(jnp.asarray(table, jnp.float32))[ids] - target) / B   # (B, T, F)
  return ids, params, grads, stats, dy


def test_lookup_rows_are_one_hot_and_reproduce_the_gradient():
  ids, _, grads, stats, dy = _lookup()
  st = stats["embed"]
  assert st.captured, st.note
  np.testing.assert_array_equal(st.a_rows, np.eye(V)[ids.reshape(-1)])
  _close(st.g_rows, dy.reshape(-1, F))
  grad = to64(grads["embed"]["embedding"])
  _close(to64(st.a_rows).T @ to64(st.g_rows), grad, msg="sum of a g^T")
  ref = np.zeros((V, F))
  np.add.at(ref, ids.reshape(-1), dy.reshape(-1, F))
  _close(grad, ref, msg="the gradient itself")


def test_lookup_a_is_token_frequencies_and_A_their_diagonal():
  ids, _, _, stats, dy = _lookup()
  st = stats["embed"]
  counts = np.bincount(ids.reshape(-1), minlength=V) / ids.size
  _close(st.a, counts)
  assert np.asarray(st.A).shape == (V,)       # the diagonal, never a V x V matrix
  onehot = np.eye(V)[ids.reshape(-1)]
  _close(st.A, np.diag(onehot.T @ onehot / len(onehot)))
  assert np.asarray(st.a)[V - 1] == 0.0 and np.asarray(st.A)[V - 2] == 0.0
  _close(st.g, dy.reshape(-1, F).mean(axis=0))
  _close(st.G, _example_factor(dy))


def test_lookup_statistics_are_the_same_in_every_mode():
  ids, params, _, rows, _ = _lookup()

  def loss(p, ids):
    return jnp.mean(Lookup().apply({"params": p}, ids) ** 3)   # any loss

  fns = {m: jax.jit(eva_optax.value_and_grad(loss, statistics=m))
         for m in ("vectors", "factors")}
  vec = fns["vectors"](params, jnp.asarray(ids))[2]["embed"]
  fac = fns["factors"](params, jnp.asarray(ids))[2]["embed"]
  _close(vec.a, rows["embed"].a)            # a does not depend on the loss
  _close(fac.A, rows["embed"].A)
  _close(vec.g, fac.g)
  assert vec.A is None and fac.a_rows is None


# ----------------------------------------------------------------------------
# attend: logits = query table^T, mean cross-entropy.


class Attend(nn.Module):
  @nn.compact
  def __call__(self, q):
    return nn.Embed(V, F, name="embed").attend(q)


@functools.lru_cache(maxsize=None)
def _attend():
  rng = np.random.default_rng(8)
  q = rng.normal(size=(B, T, F)) + 0.3
  labels = rng.integers(0, V, size=(B, T))
  table = _table()
  params = {"embed": {"embedding": jnp.asarray(table, jnp.float32)}}

  def loss(p, q, labels):
    logits = Attend().apply({"params": p}, q)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

  fn = jax.jit(eva_optax.value_and_grad(loss, statistics="rows"))
  q32 = jnp.asarray(q, jnp.float32)
  _, grads, stats = fn(params, q32, jnp.asarray(labels))
  q64, t64 = to64(q32), to64(params["embed"]["embedding"])
  dlogits = (_softmax(q64 @ t64.T) - np.eye(V)[labels]) / (B * T)   # (B, T, V)
  return q64, grads, stats, dlogits


def test_attend_rows_are_dlogits_and_query_in_table_orientation():
  q, grads, stats, dlogits = _attend()
  st = stats["embed"]
  assert st.captured, st.note
  assert "attend" in st.kind, st.kind
  _close(st.a_rows, dlogits.reshape(-1, V))
  _close(st.g_rows, q.reshape(-1, F))
  grad = to64(grads["embed"]["embedding"])
  _close(grad, dlogits.reshape(-1, V).T @ q.reshape(-1, F), msg="the gradient")
  _close(to64(st.a_rows).T @ to64(st.g_rows), grad, msg="sum of a g^T")


def test_attend_means_and_factors():
  q, _, stats, dlogits = _attend()
  st = stats["embed"]
  d = dlogits.reshape(-1, V)
  _close(st.a, d.mean(axis=0))
  _close(st.A, (d * d).mean(axis=0))           # diagonal, per row
  assert np.asarray(st.A).shape == (V,)
  _close(st.g, q.reshape(-1, F).mean(axis=0))
  _close(st.G, _example_factor(q))


# ----------------------------------------------------------------------------
# A tied embedding: lookup -> Dense -> tanh -> attend with the same table.


class Tied(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(V, F, name="embed")
    h = jnp.tanh(nn.Dense(F, name="mix")(embed(ids)))
    return embed.attend(h)


@functools.lru_cache(maxsize=None)
def _tied():
  ids = _ids()
  labels = np.random.default_rng(9).integers(0, V, size=(B, T))
  rng = np.random.default_rng(10)
  params = {"embed": {"embedding": jnp.asarray(_table(), jnp.float32)},
            "mix": {"kernel": jnp.asarray(rng.normal(size=(F, F)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=F) * 0.1, jnp.float32)}}

  def loss(p, ids, labels):
    logp = jax.nn.log_softmax(Tied().apply({"params": p}, ids))
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

  fn = jax.jit(eva_optax.value_and_grad(loss, statistics="rows"))
  _, grads, stats = fn(params, jnp.asarray(ids), jnp.asarray(labels))
  # NumPy forward and backward.
  table = to64(params["embed"]["embedding"])
  w, b = to64(params["mix"]["kernel"]), to64(params["mix"]["bias"])
  y = table[ids]
  h = np.tanh(y @ w + b)
  dlogits = (_softmax(h @ table.T) - np.eye(V)[labels]) / (B * T)
  dy = ((dlogits @ table) * (1 - h ** 2)) @ w.T
  a_rows = np.concatenate([np.eye(V)[ids.reshape(-1)], dlogits.reshape(-1, V)])
  g_rows = np.concatenate([dy.reshape(-1, F), h.reshape(-1, F)])
  return grads, stats, a_rows, g_rows


def test_tied_embedding_pools_the_rows_of_both_uses():
  grads, stats, a_rows, g_rows = _tied()
  st = stats["embed"]
  assert st.captured, st.note
  assert "Embed" in st.kind and "attend" in st.kind, st.kind
  assert np.asarray(st.a_rows).shape == (2 * B * T, V)
  _close(st.a_rows, a_rows, msg="lookup rows, then attend rows (call order)")
  _close(st.g_rows, g_rows, rtol=1e-4)
  grad = to64(grads["embed"]["embedding"])
  _close(a_rows.T @ g_rows, grad, rtol=1e-4, msg="NumPy rows vs the gradient")
  _close(to64(st.a_rows).T @ to64(st.g_rows), grad, rtol=1e-4, msg="sum of a g^T")
  _close(st.a, a_rows.mean(axis=0), rtol=1e-4)
  _close(st.g, g_rows.mean(axis=0), rtol=1e-4)
  _close(st.A, (a_rows * a_rows).mean(axis=0), rtol=1e-4)
  assert stats["mix"].captured


# ----------------------------------------------------------------------------
# Updates: dense NumPy solves of the definitions (diagonal input factor).


@pytest.mark.parametrize("name", ["eva", "eva_f", "kfac", "foof"])
def test_embedding_updates_equal_dense_solves(name):
  ids, params, grads, stats, dy = _lookup()
  rows = np.eye(V)[ids.reshape(-1)]
  definitions = {"a": rows.mean(axis=0), "g": dy.reshape(-1, F).mean(axis=0),
                 "A": np.diag(rows.T @ rows / len(rows)), "G": _example_factor(dy)}
  grad = to64(grads["embed"]["embedding"])
  damping = {"eva": 1e-4, "eva_f": 1e-3, "kfac": 1e-3, "foof": 1e-3}[name]
  ref = layerwise_reference(name, grad, definitions, damping)
  tx = preconditioner(name, damping)
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  err = rel_err(up["embed"]["embedding"], ref)
  assert err < 1e-4, (name, err)
  # The statistics act: rows of frequent tokens are scaled differently.
  assert rel_err(ref, grad / damping) > 0.05, name
