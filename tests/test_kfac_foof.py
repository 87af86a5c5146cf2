"""K-FAC and FOOF against float64 NumPy dense references, refresh timing, state size."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from eva_optax._src.vocabulary.statistics import LayerStatistics


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
  return np.abs(got - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("gamma", [0.03, 1e-3])
@pytest.mark.parametrize("layer", ["Conv_0", "Dense_0"])
def test_kfac_matches_dense_kronecker_solve(gamma, layer):
  params, loss, x = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss, statistics="factors")(params, x)
  tx = eva_optax.scale_by_kfac(gamma)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  ref = _kfac_reference(_gmat(grads, layer), np.asarray(stats[layer].A, np.float64),
                        np.asarray(stats[layer].G, np.float64), gamma)
  assert _rel(_gmat(updates, layer), ref) < 1e-4


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("layer", ["Conv_0", "Dense_0"])
def test_foof_matches_dense_solve(top_k, layer):
  gamma = 0.03
  params, loss, x = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss, statistics="factors")(params, x)
  tx = eva_optax.scale_by_foof(gamma, top_k=top_k)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  ref = _foof_reference(_gmat(grads, layer), np.asarray(stats[layer].A, np.float64),
                        gamma, top_k)
  assert _rel(_gmat(updates, layer), ref) < 1e-4


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
      if name == "kfac":
        ref = ls["A_inv"] @ gm @ ls["G_inv"]
      else:
        ref = ls["Q"] @ np.diag(1 / (ls["d"] + gamma)) @ ls["Q"].T @ gm
      assert _rel(_gmat(updates, "Dense_0"), ref) < 1e-4
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
    assert _rel(_gmat(u2, layer), _gmat(u1, layer)) < 1e-4


def test_factor_optimizers_reject_vector_statistics():
  params, loss, x = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss)(params, x)
  tx = eva_optax.kfac(0.1)
  with pytest.raises(ValueError, match="statistics='factors'"):
    tx.update(grads, tx.init(params), params, stats=stats)


def test_foof_rejects_bad_top_k():
  with pytest.raises(ValueError, match="top_k"):
    eva_optax.foof(0.1, top_k=0)
