"""K-FAC and FOOF against float64 NumPy dense references, refresh timing, state size."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from eva_optax._src.vocabulary.statistics import LayerStatistics
from conftest import float32_tol
from conftest import inverse_root_apply_bound
from conftest import propagated_tol
from conftest import rel_err
from conftest import spectral_apply_bound


class _ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="SAME")(x))
    h = h.reshape(h.shape[0], -1)
    return nn.Dense(4)(h)


def _setup(batch=16, seed=0):
  model = _ConvNet()
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, 6, 6, 2)) + 0.5
  params = model.init(jax.random.PRNGKey(seed), x)["params"]
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  return params, loss, x


def _gmat(tree, layer):
  k = np.asarray(tree[layer]["kernel"], np.float64)
  b = np.asarray(tree[layer]["bias"], np.float64)
  return np.concatenate([k.reshape(-1, k.shape[-1]), b[None]])


def _kfac_reference(gm, a_fac, g_fac, gamma):
  pi = np.sqrt((np.trace(a_fac) / len(a_fac)) / (np.trace(g_fac) / len(g_fac)))
  big = np.kron(a_fac + np.sqrt(gamma) * pi * np.eye(len(a_fac)),
                g_fac + np.sqrt(gamma) / pi * np.eye(len(g_fac)))
  return np.linalg.solve(big, gm.reshape(-1)).reshape(gm.shape)


def _foof_reference(gm, a_fac, gamma, top_k=None):
  if top_k is None:
    return np.linalg.solve(a_fac + gamma * np.eye(len(a_fac)), gm)
  d, q = np.linalg.eigh(a_fac)
  qk, dk = q[:, -top_k:], d[-top_k:]
  return qk @ np.diag(1 / (dk + gamma) - 1 / gamma) @ qk.T @ gm + gm / gamma


def _rel(got, ref):
  return rel_err(got, ref)


def _product_bound(*factors):
  """Float32 bound of a chain of matrix products, relative to the result: the
  inner dimensions' roundings on | factor_1 | ... | factor_k |."""
  ops = sum(f.shape[0] for f in factors[1:])
  absolute = functools.reduce(np.matmul, [np.abs(f) for f in factors])
  return float32_tol(1.0, ops) * np.linalg.norm(absolute)


def _kfac_tol(gm, a_fac, g_fac, gamma):
  """The float32 bound of scale_by_kfac's ``(A + dA I)^{-1} G_hat (G + dG I)^{-1}``.

  Each damped factor is inverted by Cholesky (factor and two triangular
  solves: 3 n roundings, normwise on the damped factor, + 1 for adding the
  damping and n_A + n_G + 6 for pi's traces, roots and products, relative to
  the damping <= lambda_max): :func:`~oracles.inverse_root_apply_bound` (p = 1)
  of each inverse on the rest of the product; then the two products.
  """
  n_a, n_g = len(a_fac), len(g_fac)
  pi = np.sqrt((np.trace(a_fac) / n_a) / (np.trace(g_fac) / n_g))
  a_d = a_fac + np.sqrt(gamma) * pi * np.eye(n_a)
  g_d = g_fac + np.sqrt(gamma) / pi * np.eye(n_g)
  a_inv, g_inv = np.linalg.inv(a_d), np.linalg.inv(g_d)
  u = a_inv @ gm @ g_inv
  ops = lambda n: 3 * n + 1 + n_a + n_g + 6
  bound = (inverse_root_apply_bound(a_d, 1, 0.0, gm @ g_inv, ops(n_a))
           + inverse_root_apply_bound(g_d, 1, 0.0, (a_inv @ gm).T, ops(n_g))
           + _product_bound(a_inv, gm, g_inv))
  return bound / np.linalg.norm(u)


def _foof_tol(gm, a_fac, gamma, top_k=None):
  """The float32 bound of scale_by_foof's ``Q f(D) Q^T G_hat`` (float32 eigh).

  eigh is exact for A + E, ``||E|| <= n eps32 lambda_max`` (+ 1 for the floor
  and the exact power-of-2 scaling): :func:`~oracles.spectral_apply_bound` of
  f = 1 / (lambda + gamma), or, with top_k, that on the k largest eigenvalues
  and 1 / gamma on the rest (then also 1 / gap between the k-th and the next);
  then Q^T G_hat, the scaling (2 roundings) and Q (.).
  """
  n = len(a_fac)
  lam, q = np.linalg.eigh(a_fac)
  top = np.arange(n) >= n - (top_k or n)
  f = lambda x: np.where(top, 1.0 / (x + gamma), 1.0 / gamma)
  df = lambda x: np.where(top, -1.0 / (x + gamma) ** 2, 0.0)
  u = _foof_reference(gm, a_fac, gamma, top_k)
  bound = (spectral_apply_bound(a_fac, f, df, gm, n + 1)
           + _product_bound(q, np.diag(f(lam)), q.T, gm)
           + float32_tol(1.0, 2) * np.linalg.norm(np.abs(q) @ np.abs(np.diag(f(lam)) @ q.T @ gm)))
  return bound / np.linalg.norm(u)


@pytest.mark.parametrize("gamma", [0.03, 1e-3])
@pytest.mark.parametrize("layer", ["Conv_0", "Dense_0"])
def test_kfac_matches_dense_kronecker_solve(gamma, layer):
  params, loss, x = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss, statistics="factors")(params, x)
  tx = eva_optax.scale_by_kfac(gamma)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  gm = _gmat(grads, layer)
  a_fac = np.asarray(stats[layer].A, np.float64)
  g_fac = np.asarray(stats[layer].G, np.float64)
  ref = _kfac_reference(gm, a_fac, g_fac, gamma)
  assert _rel(_gmat(updates, layer), ref) < _kfac_tol(gm, a_fac, g_fac, gamma)


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("layer", ["Conv_0", "Dense_0"])
def test_foof_matches_dense_solve(top_k, layer):
  gamma = 0.03
  params, loss, x = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss, statistics="factors")(params, x)
  tx = eva_optax.scale_by_foof(gamma, top_k=top_k)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  gm, a_fac = _gmat(grads, layer), np.asarray(stats[layer].A, np.float64)
  ref = _foof_reference(gm, a_fac, gamma, top_k)
  assert _rel(_gmat(updates, layer), ref) < _foof_tol(gm, a_fac, gamma, top_k)


def test_kfac_damping_does_not_leak_into_factors():
  params, loss, x = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss, statistics="factors")(params, x)
  tx = eva_optax.scale_by_kfac(0.03, stat_decay=1.0)
  _, state = tx.update(grads, tx.init(params), params, stats=stats)
  np.testing.assert_array_equal(state.layers["Dense_0"]["A"], stats["Dense_0"].A)
  np.testing.assert_array_equal(state.layers["Dense_0"]["G"], stats["Dense_0"].G)


@pytest.mark.parametrize("name", ["kfac", "foof"])
def test_refresh_happens_exactly_every_k_steps(name):
  k, gamma = 3, 0.03
  params, loss, _ = _setup()
  grad_fn = jax.jit(eva_optax.value_and_grad(loss, statistics="factors"))
  scale_by = getattr(eva_optax, f"scale_by_{name}")
  tx = scale_by(gamma, stat_decay=0.95, inverse_every=k)
  update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
  state = tx.init(params)
  keys = ("A_inv", "G_inv") if name == "kfac" else ("Q", "d")
  previous = None
  for step in range(7):
    x = jax.random.normal(jax.random.PRNGKey(100 + step), (16, 6, 6, 2)) + 0.5
    _, grads, stats = grad_fn(params, x)
    updates, state = update(grads, state, params, stats)
    stored = {kk: np.asarray(state.layers["Dense_0"][kk]) for kk in keys}
    if previous is not None:
      same = all(np.array_equal(stored[kk], previous[kk]) for kk in keys)
      assert same == (step % k != 0), f"step {step}"
    if step % k != 0:  # between refreshes the update uses the stored (stale) inverses
      gm = _gmat(grads, "Dense_0")
      ls = {kk: np.asarray(v, np.float64) for kk, v in state.layers["Dense_0"].items()}
      # The stored inverses are exact inputs: only the products round.
      if name == "kfac":
        factors = (ls["A_inv"], gm, ls["G_inv"])
        extra = 0.0
      else:
        scale = np.diag(1 / (ls["d"] + gamma))   # + two roundings
        factors = (ls["Q"], scale, ls["Q"].T, gm)
        extra = float32_tol(1.0, 2) * np.linalg.norm(
            np.abs(ls["Q"]) @ np.abs(scale @ ls["Q"].T @ gm))
      ref = functools.reduce(np.matmul, factors)
      tol = (_product_bound(*factors) + extra) / np.linalg.norm(ref)
      assert _rel(_gmat(updates, "Dense_0"), ref) < tol
    previous = stored


def _layer_dims(params):
  dims = []
  for layer in params.values():
    d_in = int(np.prod(layer["kernel"].shape[:-1]))
    dims.append((d_in + 1, layer["kernel"].shape[-1]))
  return dims


def _nbytes(tree):
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["eva", "eva_f", "kfac", "foof"])
def test_state_bytes_match_analytic_count(name):
  params, _, _ = _setup()
  per_layer = {
      "eva": lambda da, do: da + do,
      "eva_f": lambda da, do: da,
      "kfac": lambda da, do: 2 * da * da + 2 * do * do,
      "foof": lambda da, do: 2 * da * da + da,
  }[name]
  floats = sum(per_layer(da, do) for da, do in _layer_dims(params))
  state = getattr(eva_optax, f"scale_by_{name}")().init(params)
  assert _nbytes(state) == 4 * floats + 5 * 4  # + five int32 counters
  # The alias adds exactly SGD's momentum buffer (and the int32 step counts of
  # its weight-decay and learning-rate steps, there whatever their types).
  alias = getattr(eva_optax, name)(0.1, momentum=0.9)
  assert _nbytes(alias.init(params)) == _nbytes(state) + _nbytes(params) + 2 * 4


def test_eva_f_equals_foof_with_rank_one_factor():
  params, loss, x = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss)(params, x)
  rank_one = jax.tree.map(
      lambda st: LayerStatistics(a=st.a, g=st.g, A=jnp.outer(st.a, st.a),
                                 G=jnp.outer(st.g, st.g), kind=st.kind),
      stats, is_leaf=lambda s: isinstance(s, LayerStatistics))
  eva_f = eva_optax.scale_by_eva_f(0.03)
  foof = eva_optax.scale_by_foof(0.03)
  u1, _ = eva_f.update(grads, eva_f.init(params), params, stats=stats)
  u2, _ = foof.update(grads, foof.init(params), params, stats=rank_one)
  for layer in params:
    # Both approximate (a a^T + gamma I)^{-1} G_hat: Eva-f's closed form (as in
    # test_eva.py: d_a + d_out + 4 roundings on its inputs) and FOOF's eigh of
    # a a^T (one more rounding, the outer product).
    gm, a = _gmat(grads, layer), np.asarray(stats[layer].a, np.float64)
    closed = lambda gm, a, d: np.linalg.solve(np.outer(a, a) + d * np.eye(len(a)), gm)
    ops = gm.shape[0] + gm.shape[1] + 4
    tol = (propagated_tol(closed, (gm, ops), (a, ops), (np.float64(0.03), ops + 1))
           + _foof_tol(gm, np.outer(a, a), 0.03))
    assert _rel(_gmat(u2, layer), _gmat(u1, layer)) < tol


def test_factor_optimizers_reject_vector_statistics():
  params, loss, x = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss)(params, x)
  tx = eva_optax.kfac(0.1)
  with pytest.raises(ValueError, match="statistics='factors'"):
    tx.update(grads, tx.init(params), params, stats=stats)


def test_foof_rejects_bad_top_k():
  with pytest.raises(ValueError, match="top_k"):
    eva_optax.foof(0.1, top_k=0)
