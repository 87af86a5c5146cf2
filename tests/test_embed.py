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
from conftest import assert_float32_twins
from conftest import assert_propagated
from conftest import float32_tol
from conftest import layerwise_reference
from conftest import preconditioner
from conftest import propagated_bound
from conftest import reference_tol
from conftest import rel_err
from conftest import to64

V, F, B, T = 7, 3, 4, 5


def _within(x, ref, bound, msg=""):
  """``|x - ref| <= bound`` entrywise (float64)."""
  err = np.abs(to64(x) - to64(ref))
  assert np.all(err <= bound), f"{msg}: worst {np.max(err - bound):.3g} over the bound"


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
  return ids, params, grads, stats, dy, target


def _dy_ops(dy, target):
  """The library's dL/dy = (y - t) / B in float32: the target rounded to
  float32 (half a rounding of |t|), the difference and the scale: relative to
  |dy|, ``2 + |t| / |y - t|`` roundings (B = 4: the division is exact)."""
  return 2 + np.abs(target) / np.abs(dy * B)


def test_lookup_rows_are_one_hot_and_reproduce_the_gradient():
  ids, _, grads, stats, dy, target = _lookup()
  st = stats["embed"]
  assert st.captured, st.note
  np.testing.assert_array_equal(st.a_rows, np.eye(V)[ids.reshape(-1)])
  ops = _dy_ops(dy, target)
  assert_propagated(st.g_rows, lambda d: d.reshape(-1, F), (dy, ops))
  grad = to64(grads["embed"]["embedding"])
  # Sums over the B T = 20 rows.
  assert_propagated(grad, lambda a, g: a.T @ g, (st.a_rows, 0.0), (st.g_rows, B * T + 1),
                    err_msg="sum of a g^T")

  def scatter(d):
    ref = np.zeros((V, F))
    np.add.at(ref, ids.reshape(-1), d.reshape(-1, F))
    return ref

  assert_propagated(grad, scatter, (dy, ops + B * T + 1), err_msg="the gradient itself")


def test_lookup_a_is_token_frequencies_and_A_their_diagonal():
  ids, _, _, stats, dy, target = _lookup()
  st = stats["embed"]
  onehot = np.eye(V)[ids.reshape(-1)]
  n = len(onehot)
  # Means of the n = 20 rows (n + 1 roundings); G: the T positions' and B
  # examples' means and products (T + B + 3).
  assert_propagated(st.a, lambda o: o.mean(axis=0), (onehot, n + 1))
  assert np.asarray(st.A).shape == (V,)       # the diagonal, never a V x V matrix
  assert_propagated(st.A, lambda o: np.diag(o.T @ o / len(o)), (onehot, n + 2))
  assert np.asarray(st.a)[V - 1] == 0.0 and np.asarray(st.A)[V - 2] == 0.0
  ops = _dy_ops(dy, target)
  assert_propagated(st.g, lambda d: d.reshape(-1, F).mean(axis=0), (dy, ops + n + 1))
  assert_propagated(st.G, _example_factor, (dy, ops + T + B + 3))


def test_lookup_statistics_are_the_same_in_every_mode():
  ids, params, _, rows, _, _ = _lookup()

  def loss(p, ids):
    return jnp.mean(Lookup().apply({"params": p}, ids) ** 3)   # any loss

  fns = {m: jax.jit(eva_optax.value_and_grad(loss, statistics=m))
         for m in ("vectors", "factors")}
  vec = fns["vectors"](params, jnp.asarray(ids))[2]["embed"]
  fac = fns["factors"](params, jnp.asarray(ids))[2]["embed"]
  # Twins: a and A are the token counts over 20 rows (21 roundings); g is the
  # mean of 3 y^2 / (B T F) over the rows (+ 3).
  assert_float32_twins(vec.a, rows["embed"].a, B * T + 1)   # a does not depend on the loss
  assert_float32_twins(fac.A, rows["embed"].A, B * T + 2)
  assert_float32_twins(vec.g, fac.g, B * T + 4)
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
  dlogits = _dlogits(q64, t64, labels)
  # The library's float32 dlogits: logits are dot products of F terms (F + 1
  # roundings, on q and the table), the softmax's max, exp, sum of V and
  # division (V + 4 on every probability), the label's subtraction and the
  # scale (2 on |dlogits|).
  bound = (propagated_bound(lambda q, t: _dlogits(q, t, labels), (q64, F + 1), (t64, F + 1))
           + float32_tol(1.0, V + 4) * _softmax(q64 @ t64.T) / (B * T)
           + float32_tol(1.0, 2) * np.abs(dlogits))
  return q64, grads, stats, dlogits, bound


def _dlogits(q, table, labels):
  return (_softmax(q @ table.T) - np.eye(V)[labels]) / (B * T)   # (B, T, V)


def test_attend_rows_are_dlogits_and_query_in_table_orientation():
  q, grads, stats, dlogits, bound = _attend()
  st = stats["embed"]
  assert st.captured, st.note
  assert "attend" in st.kind, st.kind
  d, b, qs = dlogits.reshape(-1, V), bound.reshape(-1, V), q.reshape(-1, F)
  _within(st.a_rows, d, b)
  np.testing.assert_array_equal(st.g_rows, qs)    # the queries themselves
  grad = to64(grads["embed"]["embedding"])
  # The gradient: dlogits' bound through the sum over the rows, + its roundings.
  _within(grad, d.T @ qs, b.T @ np.abs(qs) + float32_tol(1.0, len(d) + 1)
          * np.abs(d).T @ np.abs(qs), "the gradient")
  assert_propagated(grad, lambda a, g: a.T @ g, (st.a_rows, 0.0), (st.g_rows, len(d) + 1),
                    err_msg="sum of a g^T")


def test_attend_means_and_factors():
  q, _, stats, dlogits, bound = _attend()
  st = stats["embed"]
  d, b = dlogits.reshape(-1, V), bound.reshape(-1, V)
  n = len(d)
  # Means of the n rows: their bounds' mean, + n + 1 roundings of the means.
  _within(st.a, d.mean(axis=0), b.mean(axis=0) + float32_tol(1.0, n + 1) * np.abs(d).mean(axis=0))
  _within(st.A, (d * d).mean(axis=0),                     # diagonal, per row
          (2 * np.abs(d) * b).mean(axis=0) + float32_tol(1.0, n + 2) * (d * d).mean(axis=0))
  assert np.asarray(st.A).shape == (V,)
  assert_propagated(st.g, lambda q: q.reshape(-1, F).mean(axis=0), (q, n + 1))
  assert_propagated(st.G, _example_factor, (q, T + B + 3))


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
  inputs = (to64(params["embed"]["embedding"]), to64(params["mix"]["kernel"]),
            to64(params["mix"]["bias"]))
  rows = lambda table, w, b: _tied_rows(ids, labels, table, w, b)
  return grads, stats, inputs, rows


# The longest path of the library's float32 rows: the mix (F + 1), tanh (2),
# the logits (F), the softmax (V + 4), dlogits @ table (V), (1 - h^2) (3) and
# @ w^T (F): as a backward error on the table and the mix's parameters.
TIED_OPS = (F + 1) + 2 + F + (V + 4) + V + 3 + F


def _tied_rows(ids, labels, table, w, b):
  """NumPy forward and backward: the embedding's (a_rows, g_rows), both uses."""
  y = table[ids]
  h = np.tanh(y @ w + b)
  dlogits = (_softmax(h @ table.T) - np.eye(V)[labels]) / (B * T)
  dy = ((dlogits @ table) * (1 - h ** 2)) @ w.T
  a_rows = np.concatenate([np.eye(V)[ids.reshape(-1)], dlogits.reshape(-1, V)])
  g_rows = np.concatenate([dy.reshape(-1, F), h.reshape(-1, F)])
  return a_rows, g_rows


def test_tied_embedding_pools_the_rows_of_both_uses():
  grads, stats, inputs, rows = _tied()
  st = stats["embed"]
  assert st.captured, st.note
  assert "Embed" in st.kind and "attend" in st.kind, st.kind
  assert np.asarray(st.a_rows).shape == (2 * B * T, V)
  n = 2 * B * T
  pairs = [(x, TIED_OPS) for x in inputs]
  assert_propagated(st.a_rows, lambda *x: rows(*x)[0], *pairs,
                    err_msg="lookup rows, then attend rows (call order)")
  assert_propagated(st.g_rows, lambda *x: rows(*x)[1], *pairs)
  grad = to64(grads["embed"]["embedding"])
  with_sum = [(x, TIED_OPS + n + 1) for x in inputs]   # + the sums over the n rows
  assert_propagated(grad, lambda *x: rows(*x)[0].T @ rows(*x)[1], *with_sum,
                    err_msg="NumPy rows vs the gradient")
  assert_propagated(grad, lambda a, g: a.T @ g, (st.a_rows, 0.0), (st.g_rows, n + 1),
                    err_msg="sum of a g^T")
  assert_propagated(st.g, lambda *x: rows(*x)[1].mean(axis=0), *with_sum)
  # a and A also sum the one-hot rows, which no input moves: their own n + 2
  # roundings on top.
  a_rows = rows(*inputs)[0]
  for got, fn, size in ((st.a, lambda *x: rows(*x)[0].mean(axis=0), np.abs(a_rows)),
                        (st.A, lambda *x: (rows(*x)[0] ** 2).mean(axis=0), a_rows ** 2)):
    _within(got, fn(*inputs), propagated_bound(fn, *with_sum)
            + float32_tol(1.0, n + 2) * size.mean(axis=0))
  assert stats["mix"].captured


# ----------------------------------------------------------------------------
# Updates: dense NumPy solves of the definitions (diagonal input factor).


@pytest.mark.parametrize("name", ["eva", "eva_f", "kfac", "foof"])
def test_embedding_updates_equal_dense_solves(name):
  ids, params, grads, stats, dy, target = _lookup()
  rows = np.eye(V)[ids.reshape(-1)]
  n = len(rows)
  definitions = {"a": rows.mean(axis=0), "g": dy.reshape(-1, F).mean(axis=0),
                 "A": np.diag(rows.T @ rows / len(rows)), "G": _example_factor(dy)}
  grad = to64(grads["embed"]["embedding"])
  damping = {"eva": 1e-4, "eva_f": 1e-3, "kfac": 1e-3, "foof": 1e-3}[name]
  ref = layerwise_reference(name, grad, definitions, damping)
  tx = preconditioner(name, damping)
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  # The library's statistics against these definitions (the test above): the
  # counts' means, and g and G from its own dy, relative to the entries.
  ops_dy = _dy_ops(dy, target)
  abs_dy = np.abs(dy).reshape(-1, F)
  input_ops = {
      "a": n + 1, "A": n + 2,
      "g": ((n + 1) * abs_dy.mean(axis=0) + (ops_dy.reshape(-1, F) * abs_dy).mean(axis=0))
           / np.abs(definitions["g"]),
      "G": (ops_dy.max() + T + B + 3) * _example_factor(np.abs(dy))
           / np.abs(definitions["G"])}
  tol = reference_tol(name, {"embedding": grad}, definitions, damping, input_ops)["embedding"]
  err = rel_err(up["embed"]["embedding"], ref)
  assert err < tol, (name, err, tol)
  # The statistics act: rows of frequent tokens are scaled differently.
  assert rel_err(ref, grad / damping) > 10 * tol, name
