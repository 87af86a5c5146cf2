"""Eva and Eva-f against float64 NumPy oracles, and their state (errors: test_eva_errors.py)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from conftest import LAYER_CASES
from conftest import MLP
from conftest import ConvNet
from conftest import case_ids
from conftest import eva_closed_form
from conftest import eva_dense_solve
from conftest import eva_f_dense_solve
from conftest import layer_view
from conftest import mse_loss
from conftest import regression_batch
from conftest import rel_err
from conftest import single_layer_problem
from conftest import to64

DAMPINGS = (0.03, 1e-5)
LAYERS = ("Dense_0", "Dense_1", "Dense_2")


def _one_update(tx, grads, params, stats):
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params, stats=stats)
  return updates


def _check_against(update, grads, ref, damping):
  """The update matches ``ref``, and so does its statistics-dependent part."""
  gmat = layer_view(grads)
  u = layer_view(update)
  plain = gmat / damping
  # The test means something only if the statistics change the update.
  assert np.linalg.norm(ref - plain) > 1e-2 * np.linalg.norm(plain)
  assert rel_err(u, ref) < 1e-4
  assert rel_err(u - plain, ref - plain) < 1e-3


# ----------------------------------------------------------------------------
# The preconditioner against dense solves, per captured layer type.


@functools.lru_cache(maxsize=None)
def _captured(name):
  """``(problem, grads, stats)`` of a layer case (computed once per test session)."""
  (case,) = [c for c in LAYER_CASES if c.name == name]
  pb = single_layer_problem(case)
  _, grads, stats = eva_optax.value_and_grad(pb.loss)(pb.params)
  return pb, grads, stats


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_ids())
def test_scale_by_eva_matches_dense_solve(case, damping):
  pb, grads, stats = _captured(case.name)
  update = _one_update(eva_optax.scale_by_eva(damping), grads, pb.params, stats)
  # a_bar and g_bar come from the test's own im2col and dL/dy, not from stats.
  ref = eva_dense_solve(layer_view(grads), pb.a, pb.g, damping)
  _check_against(update, grads, ref, damping)


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_ids())
def test_scale_by_eva_f_matches_dense_solve(case, damping):
  pb, grads, stats = _captured(case.name)
  update = _one_update(eva_optax.scale_by_eva_f(damping), grads, pb.params, stats)
  ref = eva_f_dense_solve(layer_view(grads), pb.a, damping)
  _check_against(update, grads, ref, damping)


def test_update_keeps_param_structure_and_shapes():
  pb = single_layer_problem(LAYER_CASES[2])  # DenseGeneral, 4-D kernel, 2-D bias
  _, grads, stats = eva_optax.value_and_grad(pb.loss)(pb.params)
  update = _one_update(eva_optax.scale_by_eva(), grads, pb.params, stats)
  assert jax.tree.structure(update) == jax.tree.structure(grads)
  for u, g in zip(jax.tree.leaves(update), jax.tree.leaves(grads)):
    assert u.shape == g.shape and u.dtype == g.dtype


# ----------------------------------------------------------------------------
# Global scalings across several layers.


@pytest.fixture
def mlp_step():
  """``(params, grads, stats, raw)``: an MLP step and the float64 raw Eva updates."""
  model = MLP()
  x, y = regression_batch()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, grads, stats = eva_optax.value_and_grad(mse_loss(model))(params, x, y)
  raw = {n: eva_closed_form(layer_view(grads[n]), stats[n].a, stats[n].g, 0.03)
         for n in LAYERS}
  return params, grads, stats, raw


def _inner(raw, grads):
  return sum(float(np.vdot(raw[n], layer_view(grads[n]))) for n in LAYERS)


def _assert_scaled(update, raw, scale):
  for n in LAYERS:
    np.testing.assert_allclose(layer_view(update[n]), scale * raw[n], rtol=2e-4,
                               atol=1e-6 * np.abs(scale * raw[n]).max(), err_msg=n)


def test_raw_update_over_layers_matches_closed_form(mlp_step):
  params, grads, stats, raw = mlp_step
  update = _one_update(eva_optax.scale_by_eva(0.03), grads, params, stats)
  _assert_scaled(update, raw, 1.0)


def test_kl_normalize(mlp_step):
  params, grads, stats, raw = mlp_step
  s = _inner(raw, grads)
  assert s > 0
  tx = eva_optax.scale_by_eva(0.03, kl_normalize=True)
  update = _one_update(tx, grads, params, stats)
  _assert_scaled(update, raw, np.sqrt(0.03 / s))


@pytest.mark.parametrize("nu", (0.5, 1.0))
def test_kl_clip(mlp_step, nu):
  params, grads, stats, raw = mlp_step
  lr = 0.3
  s = _inner(raw, grads)
  # nu = min(1, sqrt(kappa / (lr^2 S))): kappa = nu^2 lr^2 S clips to nu; 4x that does not clip.
  kappa = nu**2 * lr**2 * s if nu < 1 else 4 * lr**2 * s
  tx = eva_optax.scale_by_eva(0.03, kl_clip=kappa, learning_rate=lr)
  update = _one_update(tx, grads, params, stats)
  _assert_scaled(update, raw, nu)


def test_eva_alias_is_normalized_then_decay_momentum_lr(mlp_step):
  params, grads, stats, raw = mlp_step
  lr, wd = 0.1, 1e-2
  scale = np.sqrt(0.03 / _inner(raw, grads))
  tx = eva_optax.eva(lr, momentum=0.9, weight_decay=wd)
  state = tx.init(params)
  upd1, state = tx.update(grads, state, params, stats=stats)
  d1 = {n: scale * raw[n] + wd * layer_view(params[n]) for n in LAYERS}
  for n in LAYERS:  # weight decay is added after preconditioning, not preconditioned
    np.testing.assert_allclose(layer_view(upd1[n]), -lr * d1[n], rtol=2e-4, atol=1e-7)
  # The same statistics again: the average stays, momentum accumulates.
  upd2, _ = tx.update(grads, state, params, stats=stats)
  for n in LAYERS:
    np.testing.assert_allclose(layer_view(upd2[n]), -lr * 1.9 * d1[n], rtol=2e-4, atol=1e-7)


def test_eva_kl_clip_uses_its_learning_rate(mlp_step):
  params, grads, stats, raw = mlp_step
  lr = 0.3
  s = _inner(raw, grads)
  kappa = 0.25 * lr**2 * s  # nu = 0.5
  tx = eva_optax.eva(lr, momentum=0.0, kl_clip=kappa)
  update = _one_update(tx, grads, params, stats)
  _assert_scaled(update, raw, -lr * 0.5)


def test_uncaptured_params_get_plain_gradient_without_kl_scaling():
  model = ConvNet()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 2)) + 0.5, jnp.float32)
  y = jnp.ones((4, 3), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, grads, stats = eva_optax.value_and_grad(mse_loss(model))(params, x, y)
  update = _one_update(eva_optax.eva(0.5, momentum=0.0), grads, params, stats)
  for leaf in ("scale", "bias"):
    np.testing.assert_allclose(update["LayerNorm_0"][leaf],
                               -0.5 * grads["LayerNorm_0"][leaf], rtol=1e-6)
  # ... while the captured layers are preconditioned.
  assert rel_err(update["Conv_0"]["kernel"], -0.5 * grads["Conv_0"]["kernel"]) > 1e-2


# ----------------------------------------------------------------------------
# Running averages of the statistics.


def _mlp_batches(n):
  model = MLP()
  x0, _ = regression_batch(seed=0)
  params = model.init(jax.random.PRNGKey(0), x0)["params"]
  grad_fn = eva_optax.value_and_grad(mse_loss(model))
  out = []
  for i in range(n):
    x, y = regression_batch(seed=10 + i)
    x = x * (1.0 + 0.5 * i)  # clearly different statistics per batch
    _, grads, stats = grad_fn(params, x, y)
    out.append((grads, stats))
  return params, out


def _avg(state, name, key):
  return to64(state.layers[name][key])


def test_running_average_three_steps():
  params, batches = _mlp_batches(3)
  xi = 0.95
  tx = eva_optax.scale_by_eva(0.03, stat_decay=xi)
  state = tx.init(params)
  expected = None
  for grads, stats in batches:
    update, state = tx.update(grads, state, params, stats=stats)
    new = {n: {k: to64(getattr(stats[n], k)) for k in "ag"} for n in LAYERS}
    if expected is None:  # the first observation initialises the average
      expected = new
    else:  # the NEW statistic gets weight stat_decay
      expected = {n: {k: (1 - xi) * expected[n][k] + xi * new[n][k] for k in "ag"}
                  for n in LAYERS}
    for n in LAYERS:
      for k in "ag":
        np.testing.assert_allclose(_avg(state, n, k), expected[n][k], rtol=1e-6, atol=1e-9)
  assert int(state.stats_count) == 3 and int(state.count) == 3
  # The third update preconditions with the averaged vectors.
  for n in LAYERS:
    ref = eva_closed_form(layer_view(grads[n]), expected[n]["a"], expected[n]["g"], 0.03)
    assert rel_err(layer_view(update[n]), ref) < 1e-4


def test_stats_every_skips_steps():
  params, batches = _mlp_batches(3)
  tx = eva_optax.scale_by_eva(0.03, stat_decay=0.95, stats_every=2)
  state = tx.init(params)
  (g0, s0), (g1, s1), (g2, s2) = batches
  _, state = tx.update(g0, state, params, stats=s0)
  after0 = {n: _avg(state, n, "a") for n in LAYERS}
  update1, state = tx.update(g1, state, params, stats=s1)  # skipped
  assert int(state.stats_count) == 1
  for n in LAYERS:
    np.testing.assert_allclose(_avg(state, n, "a"), after0[n], rtol=0, atol=0)
    # The skipped step still preconditions, with the old average.
    ref = eva_closed_form(layer_view(g1[n]), s0[n].a, s0[n].g, 0.03)
    assert rel_err(layer_view(update1[n]), ref) < 1e-4
  _, state = tx.update(g2, state, params, stats=s2)  # folded again
  assert int(state.stats_count) == 2
  for n in LAYERS:
    np.testing.assert_allclose(_avg(state, n, "a"),
                               0.05 * to64(s0[n].a) + 0.95 * to64(s2[n].a), rtol=1e-6)


def test_nonfinite_statistics_are_skipped_and_counted():
  model = MLP()
  x, y = regression_batch()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  grad_fn = eva_optax.value_and_grad(mse_loss(model))
  tx = eva_optax.scale_by_eva(0.03)
  state = tx.init(params)
  _, grads, stats = grad_fn(params, x, y)
  _, state = tx.update(grads, state, params, stats=stats)
  good = jax.tree.map(np.asarray, state.layers)
  bad_x = x.at[3, 1].set(jnp.nan)
  _, bad_grads, bad_stats = grad_fn(params, bad_x, y)
  assert not np.all(np.isfinite(bad_stats["Dense_0"].a))
  _, state = tx.update(bad_grads, state, params, stats=bad_stats)
  assert int(state.nonfinite_count) == 1
  assert int(state.stats_count) == 1
  for leaf, ref in zip(jax.tree.leaves(state.layers), jax.tree.leaves(good)):
    assert np.all(np.isfinite(leaf))
    np.testing.assert_array_equal(leaf, ref)
  # Training goes on with the next good batch.
  update, state = tx.update(grads, state, params, stats=stats)
  assert int(state.stats_count) == 2
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(update))


# ----------------------------------------------------------------------------
# End to end: Eva trains an MLP on the digits faster than SGD.


class _DigitsMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def _train_digits(tx, steps=200, batch=128, seed=0):
  from sklearn.datasets import load_digits
  x_all, y_all = load_digits(return_X_y=True)
  x_all = jnp.asarray(x_all / 16.0, jnp.float32)
  y_all = jnp.asarray(y_all)
  model = _DigitsMLP()

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = eva_optax.value_and_grad(loss_fn)
  params = model.init(jax.random.PRNGKey(seed), x_all[:1])["params"]
  state = tx.init(params)

  @jax.jit
  def step(params, state, idx):
    _, grads, stats = grad_fn(params, x_all[idx], y_all[idx])
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    params, state = step(params, state, rng.choice(x_all.shape[0], batch, replace=False))
  return float(loss_fn(params, x_all, y_all))


def test_eva_beats_sgd_on_digits():
  lr = 0.03
  eva_loss = _train_digits(eva_optax.eva(lr, momentum=0.9))
  sgd_loss = _train_digits(optax.sgd(lr, momentum=0.9))
  assert np.isfinite(eva_loss)
  # Measured: Eva ~0.07, SGD ~0.14 (full training set cross-entropy after 200 steps).
  assert eva_loss < 0.75 * sgd_loss, (eva_loss, sgd_loss)


# ----------------------------------------------------------------------------
# The closed forms take G_hat = [kernel; bias] in two pieces and return
# <U, G_hat> in closed form: both against a dense float64 solve.


@pytest.mark.parametrize("damping", [0.03, 1e-4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_split_closed_forms_and_inner_products(with_bias, damping):
  from eva_optax._src.linalg import rank_one  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  d_in, d_out = 7, 5
  kernel = rng.normal(size=(d_in, d_out)).astype(np.float32)
  bias = rng.normal(size=(d_out,)).astype(np.float32) if with_bias else None
  a = rng.normal(size=(d_in + with_bias,)).astype(np.float32) * 0.3
  g = rng.normal(size=(d_out,)).astype(np.float32) * 0.3
  gm = kernel if bias is None else np.concatenate([kernel, bias[None]])
  for got, ref in (
      (rank_one.eva_solve(jnp.asarray(kernel), None if bias is None else
                        jnp.asarray(bias), jnp.asarray(a), jnp.asarray(g),
                        damping),
       eva_dense_solve(gm, a, g, damping)),
      (rank_one.eva_f_solve(jnp.asarray(kernel), None if bias is None else
                          jnp.asarray(bias), jnp.asarray(a), damping),
       eva_f_dense_solve(gm, a, damping))):
    u_kernel, u_bias, inner = got
    assert rel_err(u_kernel, ref[:d_in]) < 1e-4
    if with_bias:
      assert rel_err(u_bias, ref[d_in]) < 1e-4
    else:
      assert u_bias is None
    # The curvature acts here: U is not G_hat / damping.
    assert rel_err(ref, to64(gm) / damping) > 1e-2
    assert abs(float(inner) - np.vdot(ref, to64(gm))) < 1e-4 * np.vdot(ref, to64(gm))


class _BiasFree(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(6, use_bias=False)(x))
    return nn.Dense(3)(x)


@pytest.mark.parametrize("factory,dense", [
    (eva_optax.scale_by_eva, lambda gm, st, d: eva_dense_solve(gm, st.a, st.g, d)),
    (eva_optax.scale_by_eva_f, lambda gm, st, d: eva_f_dense_solve(gm, st.a, d)),
])
def test_bias_free_layer_matches_dense_solve_with_kl_normalization(factory, dense):
  x, y = regression_batch(16, 4, 3)
  model = _BiasFree()
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  _, grads, stats = eva_optax.value_and_grad(mse_loss(model))(params, x, y)
  damping = 1e-5
  assert stats["Dense_0"].a.shape == (4,)   # no bias entry
  update = _one_update(factory(damping, kl_normalize=True), grads, params, stats)
  view = lambda node: (layer_view(node) if "bias" in node
                       else to64(node["kernel"]))
  us, gs = {}, {}
  for layer in ("Dense_0", "Dense_1"):
    gs[layer] = view(grads[layer])
    us[layer] = dense(gs[layer], stats[layer], damping)
  s = sum(np.vdot(us[l], gs[l]) for l in us)
  for layer in us:
    ref = np.sqrt(damping / s) * us[layer]
    assert rel_err(view(update[layer]), ref) < 1e-3, layer
  # The curvature acts at this damping: not the normalized gradient.
  g_norm = np.sqrt(sum(np.vdot(g, g) for g in gs.values()))
  assert rel_err(view(update["Dense_0"]), gs["Dense_0"] / g_norm) > 1e-2
  assert "bias" not in update["Dense_0"]
