"""Eva and Eva-f against float64 NumPy oracles, and their state (errors: test_eva_errors.py)."""

from __future__ import annotations

import functools
from typing import NamedTuple

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
from conftest import float32_tol
from conftest import mse_loss
from conftest import propagated_tol
from conftest import regression_batch
from conftest import rel_err
from conftest import single_layer_problem
from conftest import to64
from conftest import with_one

DAMPINGS = (0.03, 1e-5)
LAYERS = ("Dense_0", "Dense_1", "Dense_2")


def _one_update(tx, grads, params, stats):
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params, stats=stats)
  return updates


def _sm_tol(fn, gm, a, g, damping, ops_a=0.0, ops_g=0.0):
  """The float32 bound of the library's closed form against ``fn(gm, a, g, damping)``.

  The library evaluates Sherman-Morrison in float32: ``a^T G g`` and the norms
  (d_a + d_out terms on the longest path) and a few scalar operations, a
  backward error of ``d_a + d_out + 4`` roundings on every input; ``a`` and
  ``g`` carry ``ops_a`` / ``ops_g`` more where the library computed them and
  the reference did not, the damping one more (a float32 constant).
  :func:`~oracles.propagated_tol` turns these into the result's bound with this
  problem's own conditioning (large where G is nearly parallel to a g^T and
  the damping small).
  """
  gm, a, g = to64(gm), to64(a), to64(g)
  ops = gm.shape[0] + gm.shape[1] + 4
  return propagated_tol(fn, (gm, ops), (a, ops + np.asarray(ops_a)),
                        (g, ops + np.asarray(ops_g)), (np.float64(damping), ops + 1))


def _capture_ops(pb):
  """Per-entry roundings of the library's ``a`` and ``g`` against ``pb``'s float64 ones.

  ``a``: a mean of R rows, ``(R + 1) mean|x| / |a|``. ``g``: a mean of R rows
  of ``dy = (y - t) / B``, where ``y`` is a dot product of d_a terms: each dy
  is off by ``(d_a |x||W| / |y - t| + 2)`` roundings, the mean adds R + 1, all
  relative to the mean's own cancellation ``mean|dy| / |g|``.
  """
  d_a, d_out = len(pb.a), len(pb.g)
  rows = with_one(pb.rows).reshape(-1, d_a)
  dy = pb.dy.reshape(-1, d_out)
  big_r = rows.shape[0]
  ops_a = (big_r + 1) * np.abs(rows).mean(0) / np.abs(pb.a)
  y_abs = np.abs(rows) @ np.abs(layer_view(pb.params))
  ops_dy = d_a * y_abs / np.abs(dy * pb.x.shape[0]) + 2
  ops_g = ((big_r + 1) * np.abs(dy).mean(0) + (ops_dy * np.abs(dy)).mean(0)) / np.abs(pb.g)
  return ops_a, ops_g


def _check_against(update, grads, ref, damping, tol, tol_stats):
  """The update matches ``ref``, and so does its statistics-dependent part."""
  gmat = layer_view(grads)
  u = layer_view(update)
  plain = gmat / damping
  # The test means something only if the statistics change the update by far
  # more than the tolerance (a 1/10 error in them would show).
  assert np.linalg.norm(ref - plain) > 10 * tol * np.linalg.norm(ref)
  assert rel_err(u, ref) < tol
  assert rel_err(u - plain, ref - plain) < tol_stats


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
  gm = layer_view(grads)
  ref = eva_dense_solve(gm, pb.a, pb.g, damping)
  ops_a, ops_g = _capture_ops(pb)
  tol = _sm_tol(eva_closed_form, gm, pb.a, pb.g, damping, ops_a, ops_g)
  tol_stats = _sm_tol(lambda gm, a, g, d: eva_closed_form(gm, a, g, d) - gm / d,
                      gm, pb.a, pb.g, damping, ops_a, ops_g)
  _check_against(update, grads, ref, damping, tol, tol_stats)


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_ids())
def test_scale_by_eva_f_matches_dense_solve(case, damping):
  pb, grads, stats = _captured(case.name)
  update = _one_update(eva_optax.scale_by_eva_f(damping), grads, pb.params, stats)
  gm = layer_view(grads)
  ref = eva_f_dense_solve(gm, pb.a, damping)
  ops_a, _ = _capture_ops(pb)
  oracle = lambda gm, a, g, d: eva_f_dense_solve(gm, a, d)
  tol = _sm_tol(oracle, gm, pb.a, pb.g, damping, ops_a)
  tol_stats = _sm_tol(lambda gm, a, g, d: oracle(gm, a, g, d) - gm / d,
                      gm, pb.a, pb.g, damping, ops_a)
  _check_against(update, grads, ref, damping, tol, tol_stats)


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
  """``(params, grads, stats, raw, tol)``: an MLP step, the float64 raw Eva updates
  and their float32 bounds (:func:`_mlp_tols`)."""
  model = MLP()
  x, y = regression_batch()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, grads, stats = eva_optax.value_and_grad(mse_loss(model))(params, x, y)
  raw = {n: eva_closed_form(layer_view(grads[n]), stats[n].a, stats[n].g, 0.03)
         for n in LAYERS}
  return params, grads, stats, raw, _mlp_tols(grads, stats)


def _mlp_tols(grads, stats, damping=0.03):
  """Float32 bounds of the raw updates (the library's own statistics as inputs):
  ``tol[n]`` per layer (:func:`_sm_tol`), ``tol["scale"]`` for a scale
  ``sqrt(c / S)``, ``S = sum_n <U_n, G_n>``: S's inputs carry the closed form's
  roundings plus the inner products' (every entry of every layer on one sum),
  and the square root halves S's relative error; c / S (c, the learning rate
  float32 constants) and the root add three roundings."""
  ins = [(layer_view(grads[n]), to64(stats[n].a), to64(stats[n].g)) for n in LAYERS]
  tol = {n: _sm_tol(eva_closed_form, *i, damping) for n, i in zip(LAYERS, ins)}
  total = sum(i[0].size for i in ins)

  def inner(*flat):
    return sum(np.vdot(eva_closed_form(*flat[3 * k:3 * k + 3], damping), flat[3 * k])
               for k in range(len(LAYERS)))

  pairs = [(x, total + gm.shape[0] + gm.shape[1] + 4) for gm, a, g in ins for x in (gm, a, g)]
  tol["scale"] = 0.5 * propagated_tol(inner, *pairs) + float32_tol(1.0, 3)
  return tol


def _inner(raw, grads):
  return sum(float(np.vdot(raw[n], layer_view(grads[n]))) for n in LAYERS)


def _assert_scaled(update, raw, scale, tol, scale_tol=0.0):
  """Each layer's update is ``scale * raw`` within the raw update's bound plus
  the scale's (one more rounding for the product)."""
  for n in LAYERS:
    err = rel_err(layer_view(update[n]), scale * raw[n])
    assert err < tol[n] + scale_tol + float32_tol(1.0, 1), (n, err)


def test_raw_update_over_layers_matches_closed_form(mlp_step):
  params, grads, stats, raw, tol = mlp_step
  update = _one_update(eva_optax.scale_by_eva(0.03), grads, params, stats)
  _assert_scaled(update, raw, 1.0, tol)


def test_kl_normalize(mlp_step):
  params, grads, stats, raw, tol = mlp_step
  s = _inner(raw, grads)
  assert s > 0
  tx = eva_optax.scale_by_eva(0.03, kl_normalize=True)
  update = _one_update(tx, grads, params, stats)
  _assert_scaled(update, raw, np.sqrt(0.03 / s), tol, tol["scale"])


@pytest.mark.parametrize("nu", (0.5, 1.0))
def test_kl_clip(mlp_step, nu):
  params, grads, stats, raw, tol = mlp_step
  lr = 0.3
  s = _inner(raw, grads)
  # nu = min(1, sqrt(kappa / (lr^2 S))): kappa = nu^2 lr^2 S clips to nu; 4x that does not clip.
  kappa = nu**2 * lr**2 * s if nu < 1 else 4 * lr**2 * s
  tx = eva_optax.scale_by_eva(0.03, kl_clip=kappa, learning_rate=lr)
  update = _one_update(tx, grads, params, stats)
  _assert_scaled(update, raw, nu, tol, tol["scale"] if nu < 1 else 0.0)


def test_eva_alias_is_normalized_then_decay_momentum_lr(mlp_step):
  params, grads, stats, raw, tol = mlp_step
  lr, wd = 0.1, 1e-2
  scale = np.sqrt(0.03 / _inner(raw, grads))
  tx = eva_optax.eva(lr, momentum=0.9, weight_decay=wd)
  state = tx.init(params)
  upd1, state = tx.update(grads, state, params, stats=stats)
  d1 = {n: scale * raw[n] + wd * layer_view(params[n]) for n in LAYERS}

  def bound(n, ops):
    """The scaled raw update's bound where it is in d1, plus ``ops`` roundings
    of the decay, momentum and learning-rate steps on |scale raw| + |wd w|."""
    part = np.linalg.norm(scale * raw[n]) / np.linalg.norm(d1[n])
    size = np.linalg.norm(np.abs(scale * raw[n]) + np.abs(wd * layer_view(params[n])))
    return ((tol[n] + tol["scale"]) * part
            + float32_tol(1.0, ops) * size / np.linalg.norm(d1[n]))

  for n in LAYERS:  # weight decay is added after preconditioning, not preconditioned
    # wd * w, + (2), momentum from zero (exact), * lr (1), three float32 constants.
    assert rel_err(layer_view(upd1[n]), -lr * d1[n]) < bound(n, 5), n
  # The same statistics again: the average stays, momentum accumulates.
  upd2, _ = tx.update(grads, state, params, stats=stats)
  for n in LAYERS:   # + 0.9 m + d (2)
    assert rel_err(layer_view(upd2[n]), -lr * 1.9 * d1[n]) < bound(n, 7), n


def test_eva_kl_clip_uses_its_learning_rate(mlp_step):
  params, grads, stats, raw, tol = mlp_step
  lr = 0.3
  s = _inner(raw, grads)
  kappa = 0.25 * lr**2 * s  # nu = 0.5
  tx = eva_optax.eva(lr, momentum=0.0, kl_clip=kappa)
  update = _one_update(tx, grads, params, stats)
  # + the learning rate's product (the momentum buffer starts at zero: exact).
  _assert_scaled(update, raw, -lr * 0.5, tol, tol["scale"] + float32_tol(1.0, 1))


def test_uncaptured_params_get_plain_gradient_without_kl_scaling():
  model = ConvNet()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 2)) + 0.5, jnp.float32)
  y = jnp.ones((4, 3), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, grads, stats = eva_optax.value_and_grad(mse_loss(model))(params, x, y)
  update = _one_update(eva_optax.eva(0.5, momentum=0.0), grads, params, stats)
  for leaf in ("scale", "bias"):   # g times -0.5 (exact in binary): one rounding at most
    np.testing.assert_allclose(update["LayerNorm_0"][leaf],
                               -0.5 * grads["LayerNorm_0"][leaf], rtol=float32_tol(1.0, 1))
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
  expected = magnitude = None
  for step, (grads, stats) in enumerate(batches):
    update, state = tx.update(grads, state, params, stats=stats)
    new = {n: {k: to64(getattr(stats[n], k)) for k in "ag"} for n in LAYERS}
    if expected is None:  # the first observation initialises the average
      expected = new
      magnitude = jax.tree.map(np.abs, new)
    else:  # the NEW statistic gets weight stat_decay
      expected = {n: {k: (1 - xi) * expected[n][k] + xi * new[n][k] for k in "ag"}
                  for n in LAYERS}
      magnitude = {n: {k: (1 - xi) * magnitude[n][k] + xi * np.abs(new[n][k]) for k in "ag"}
                   for n in LAYERS}
    # (1 - xi) o + xi n: three roundings per step (1 - xi, two products and a
    # sum: the float32 1 - xi is exact), relative to the same average of |n|.
    ops = 3 * step
    for n in LAYERS:
      for k in "ag":
        err = np.abs(_avg(state, n, k) - expected[n][k])
        assert np.all(err <= float32_tol(1.0, ops) * magnitude[n][k]), (n, k)
  assert int(state.stats_count) == 3 and int(state.count) == 3
  # The third update preconditions with the averaged vectors.
  for n in LAYERS:
    gm, a, g = layer_view(grads[n]), expected[n]["a"], expected[n]["g"]
    ref = eva_closed_form(gm, a, g, 0.03)
    tol = _sm_tol(eva_closed_form, gm, a, g, 0.03, ops * magnitude[n]["a"] / np.abs(a),
                  ops * magnitude[n]["g"] / np.abs(g))
    assert rel_err(layer_view(update[n]), ref) < tol, n


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
    args = (layer_view(g1[n]), to64(s0[n].a), to64(s0[n].g), 0.03)
    assert rel_err(layer_view(update1[n]), eva_closed_form(*args)) < _sm_tol(
        eva_closed_form, *args)
  _, state = tx.update(g2, state, params, stats=s2)  # folded again
  assert int(state.stats_count) == 2
  for n in LAYERS:   # one step of the average: three roundings (above)
    a0, a2 = to64(s0[n].a), to64(s2[n].a)
    err = np.abs(_avg(state, n, "a") - (0.05 * a0 + 0.95 * a2))
    assert np.all(err <= float32_tol(1.0, 3) * (0.05 * np.abs(a0) + 0.95 * np.abs(a2)))


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
  eva_oracle = eva_closed_form
  eva_f_oracle = lambda gm, a, g, d: eva_f_dense_solve(gm, a, d)
  for got, oracle in (
      (rank_one.eva_solve(jnp.asarray(kernel), None if bias is None else
                        jnp.asarray(bias), jnp.asarray(a), jnp.asarray(g),
                        damping), eva_oracle),
      (rank_one.eva_f_solve(jnp.asarray(kernel), None if bias is None else
                          jnp.asarray(bias), jnp.asarray(a), damping), eva_f_oracle)):
    u_kernel, u_bias, inner = got
    ref = oracle(gm, a, g, damping)
    # Each piece within the closed form's bound (_sm_tol) for that piece.
    piece_tol = lambda rows: _sm_tol(lambda *x: oracle(*x)[rows], gm, a, g, damping)
    assert rel_err(u_kernel, ref[:d_in]) < piece_tol(slice(0, d_in))
    if with_bias:
      assert rel_err(u_bias, ref[d_in]) < piece_tol(d_in)
    else:
      assert u_bias is None
    # The curvature acts here: U is not G_hat / damping.
    assert rel_err(ref, to64(gm) / damping) > 10 * piece_tol(slice(None))
    # <U, G_hat>: the same inputs, + one inner product of d_a d_out terms.
    inner_ref = np.vdot(ref, to64(gm))
    inner_tol = _sm_tol(lambda *x: np.vdot(oracle(*x), x[0]), gm, a, g, damping)
    assert abs(float(inner) - inner_ref) < (inner_tol + float32_tol(1.0, gm.size)) * inner_ref


class StatsView(NamedTuple):
  """The ``a`` and ``g`` of a layer's statistics, as the dense oracles read them."""
  a: np.ndarray
  g: np.ndarray


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
  layers = list(us)
  inputs = [(gs[l], to64(stats[l].a), to64(stats[l].g)) for l in layers]

  def normalized(k, *flat):
    """Layer k's update sqrt(damping / S) U_k from every layer's (G, a, g)."""
    u = [dense(flat[3 * i], StatsView(*flat[3 * i + 1:3 * i + 3]), damping)
         for i in range(len(layers))]
    total = sum(np.vdot(ui, flat[3 * i]) for i, ui in enumerate(u))
    return np.sqrt(damping / total) * u[k]

  # Each input: the closed form's roundings (d_a + d_out + 4) and S's inner
  # products (every entry of both layers); + the scale's c / S and root (3).
  total_size = sum(g.size for g in gs.values())
  pairs = [(x, total_size + gm.shape[0] + gm.shape[1] + 4) for gm, a, g in inputs
           for x in (gm, a, g)]
  for k, layer in enumerate(layers):
    ref = np.sqrt(damping / s) * us[layer]
    tol = propagated_tol(functools.partial(normalized, k), *pairs) + float32_tol(1.0, 4)
    assert rel_err(view(update[layer]), ref) < tol, layer
  # The curvature acts at this damping: not the normalized gradient.
  g_norm = np.sqrt(sum(np.vdot(g, g) for g in gs.values()))
  assert rel_err(view(update["Dense_0"]), gs["Dense_0"] / g_norm) > 1e-2
  assert "bias" not in update["Dense_0"]
