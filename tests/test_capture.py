"""eva_optax.value_and_grad: the captured statistics against NumPy references."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from conftest import LAYER_CASES
from conftest import ConvNet
from conftest import assert_float32_twins
from conftest import assert_propagated
from conftest import case_ids
from conftest import im2col
from conftest import layer_view
from conftest import mse_loss
from conftest import regression_batch
from conftest import single_layer_problem
from conftest import to64
from conftest import with_one

CONV_CASES = tuple(c for c in LAYER_CASES if c.conv is not None)


def _example_means(rows):
  """(examples, positions, d) -> mean over positions: (examples, d)."""
  return to64(rows).mean(axis=1)


def _outer_mean(e):
  return e.T @ e / e.shape[0]


# The statistics as float64 functions of the rows (examples, positions, d)
# and of dL/dy, for assert_propagated: each is exact for its inputs perturbed
# by the roundings of its sums (a mean of n terms: n + 1; A and G: the mean
# over P positions, then over E examples of products: P + E + 3).
def _mean_a(rows):
  return with_one(rows).reshape(-1, rows.shape[-1] + 1).mean(axis=0)


def _mean_g(dy):
  return dy.reshape(-1, dy.shape[-1]).mean(axis=0)


def _factor_a(rows):
  return _outer_mean(with_one(rows.mean(axis=1)))


def _factor_g(dy):
  return _outer_mean(dy.mean(axis=1))


# ----------------------------------------------------------------------------
# Per layer type: rows, means and factors.


def _captured(case, statistics):
  """``(problem, grads, stats)`` of a layer case (computed once per test session)."""
  return _captured_by_name(case.name, statistics)


@functools.lru_cache(maxsize=None)
def _captured_by_name(name, statistics):
  (case,) = [c for c in LAYER_CASES if c.name == name]
  pb = single_layer_problem(case)
  _, grads, stats = eva_optax.value_and_grad(pb.loss, statistics=statistics)(pb.params)
  return pb, grads, stats


@pytest.mark.parametrize("case", LAYER_CASES, ids=case_ids())
def test_rows_reproduce_kernel_and_bias_gradients(case):
  _, grads, stats = _captured(case, "rows")
  # The gradient: a sum over the R rows of a g^T (R + 1 roundings on g).
  rows = len(stats.a_rows)
  assert_propagated(layer_view(grads), lambda a, g: a.T @ g, (stats.a_rows, 0.0),
                    (stats.g_rows, rows + 1))


@pytest.mark.parametrize("case", LAYER_CASES, ids=case_ids())
def test_rows_match_reference_rows(case):
  pb, _, stats = _captured(case, "rows")
  d_in, d_out = pb.rows.shape[-1], pb.dy.shape[-1]
  # Rows of x are copies (patches: products by one): one rounding at most.
  assert_propagated(stats.a_rows, lambda r: with_one(r).reshape(-1, d_in + 1), (pb.rows, 1.0))
  assert_propagated(stats.g_rows, lambda dy: dy.reshape(-1, d_out), (pb.dy, pb.dy_ops()))


@pytest.mark.parametrize("case", LAYER_CASES, ids=case_ids())
def test_means_and_factors(case):
  pb, _, rows = _captured(case, "rows")
  _, _, factors = _captured(case, "factors")
  _, _, vectors = _captured(case, "vectors")
  # a and g: means over all rows (examples x positions).
  n_rows = len(rows.a_rows)
  mean = lambda r: r.mean(axis=0)
  assert_propagated(rows.a, mean, (rows.a_rows, n_rows + 1))
  assert_propagated(rows.g, mean, (rows.g_rows, n_rows + 1))
  # A and G: means over examples of outer products of per-example position means.
  examples, positions = pb.rows.shape[:2]
  dy_ops = pb.dy_ops()
  for st in (rows, factors, vectors):
    assert_propagated(st.a, _mean_a, (pb.rows, n_rows + 1), err_msg="a")
    assert_propagated(st.g, _mean_g, (pb.dy, dy_ops + n_rows + 1), err_msg="g")
  for st in (rows, factors):
    assert_propagated(st.A, _factor_a, (pb.rows, positions + examples + 3), err_msg="A")
    assert_propagated(st.G, _factor_g, (pb.dy, dy_ops + positions + examples + 3),
                      err_msg="G")
  assert vectors.A is None and vectors.a_rows is None and factors.a_rows is None
  assert rows.kind == type(pb.model).__name__ and rows.captured


@pytest.mark.parametrize("case", CONV_CASES, ids=case_ids(CONV_CASES))
def test_conv_a_is_the_im2col_mean(case):
  pb = single_layer_problem(case, seed=3)
  _, _, stats = eva_optax.value_and_grad(pb.loss)(pb.params)
  patches = im2col(pb.x, **case.conv)            # (batch, positions, kh*kw*C_in)
  # padding zeros count; a mean of batch x positions terms.
  assert_propagated(stats.a, lambda p: np.append(p.mean(axis=(0, 1)), 1.0),
                    (patches, patches.shape[0] * patches.shape[1] + 1))
  assert float(stats.a[-1]) == 1.0


def test_conv_a_counts_padding_zeros():
  # Constant input 1: with 'SAME' padding the border patches hold zeros, so a < 1.
  model = nn.Conv(2, (3, 3), padding="SAME")
  x = jnp.ones((2, 4, 4, 1))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x)) / 2
  _, _, stats = eva_optax.value_and_grad(loss)(params)
  corner, centre = to64(stats.a[0]), to64(stats.a[4])
  # Means of 0s and 1s over the 2 x 4 x 4 patches: exact sums, and 9 / 16 and
  # 1 are exact in binary: no rounding at all.
  assert corner == 9 / 16  # kernel tap (0, 0) sees 3 x 3 of the 4 x 4
  assert centre == 1.0


# ----------------------------------------------------------------------------
# How value_and_grad is called.


def test_grads_equal_jax_value_and_grad():
  model = ConvNet()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 2)), jnp.float32)
  y = jnp.ones((3, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss_fn = mse_loss(model)
  loss, grads, _ = eva_optax.value_and_grad(loss_fn)(params, x, y)
  ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params, x, y)
  # The same float32 program with the capture's taps: the forward path sums
  # conv fan-ins (19, 37), a 16-position pool, LayerNorm's 6 (twice), the
  # Dense fan-in 7 and the loss (6): ~100 roundings; the backward adds as many
  # plus the batch x positions sums of the kernels' gradients (3 x 64).
  forward = 19 + 37 + 16 + 2 * 6 + 7 + 6
  assert_float32_twins(loss, ref_loss, forward, err_msg="loss")
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert_float32_twins(g, r, 2 * forward + 3 * 64, err_msg="grads")


def test_stats_mirror_params_by_module_path():
  model = ConvNet()
  x = jnp.ones((2, 8, 8, 2))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, _, stats = eva_optax.value_and_grad(mse_loss(model))(params, x, jnp.ones((2, 3)))
  assert set(stats) == {"Conv_0", "Conv_1", "Dense_0"}  # LayerNorm has no kernel
  for name in stats:
    assert stats[name].captured
    assert stats[name].a.shape == (layer_view(params[name]).shape[0],)
    assert stats[name].g.shape == (params[name]["bias"].size,)


def test_nested_modules():

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Dense(4, name="inner")(x))
      return nn.Dense(3, name="outer")(h)

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(Block()(x))

  model = Net()
  x = jnp.ones((3, 5))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
  _, _, stats = eva_optax.value_and_grad(loss)(params)
  assert set(stats) == {"Block_0", "Dense_0"}
  assert set(stats["Block_0"]) == {"inner", "outer"}
  assert stats["Block_0"]["inner"].a.shape == (6,)
  assert stats["Block_0"]["outer"].a.shape == (5,)
  assert stats["Dense_0"].g.shape == (2,)


def test_under_jit_equals_eager(mlp_problem):
  _, params, loss_fn, x, y = mlp_problem
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics="factors")
  eager = grad_fn(params, x, y)
  jitted = jax.jit(grad_fn)(params, x, y)
  assert jax.tree.structure(eager) == jax.tree.structure(jitted)
  # XLA may fuse and re-associate under jit. The MLP (5 -> 8 -> 6 -> 3, batch
  # 16): forward fan-ins 6 + 9 + 7 and the loss's 3 + 16, the same backward,
  # and the batch sums of the gradients and statistics (16, A and G's 16 + 3).
  ops = 2 * (6 + 9 + 7 + 3 + 16) + 16 + 3
  for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    assert_float32_twins(j, e, ops)


def test_two_batch_sizes(mlp_problem):
  _, params, loss_fn, _, _ = mlp_problem
  grad_fn = jax.jit(eva_optax.value_and_grad(loss_fn))
  for batch in (4, 7):
    x, y = regression_batch(batch=batch, seed=batch)
    _, _, stats = grad_fn(params, x, y)
    assert_propagated(stats["Dense_0"].a, lambda x: np.append(x.mean(axis=0), 1.0),
                      (x, batch + 1))


def test_has_aux(mlp_problem):
  model, params, _, x, y = mlp_problem

  def loss_fn(p, x, y):
    out = model.apply({"params": p}, x)
    return jnp.mean(jnp.sum((out - y) ** 2, axis=-1)), {"out": out}

  (loss, aux), grads, stats = eva_optax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
  # As in test_under_jit_equals_eager: the MLP's forward and backward paths.
  forward = 6 + 9 + 7 + 3 + 16
  assert_float32_twins(aux["out"], model.apply({"params": params}, x), forward)
  ref_loss, ref_grads = jax.value_and_grad(lambda p: loss_fn(p, x, y)[0])(params)
  assert_float32_twins(loss, ref_loss, forward)
  assert_float32_twins(grads["Dense_2"]["kernel"], ref_grads["Dense_2"]["kernel"],
                       2 * forward + 16)
  assert stats["Dense_0"].captured


def test_has_aux_requires_a_pair(mlp_problem):
  _, params, loss_fn, x, y = mlp_problem
  with pytest.raises(TypeError, match="has_aux"):
    eva_optax.value_and_grad(loss_fn, has_aux=True)(params, x, y)


def test_several_inputs_and_keywords():

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x1, x2):
      return nn.Dense(3)(jnp.concatenate([x1, x2], axis=-1))

  model = Net()
  rng = np.random.default_rng(0)
  x1 = jnp.asarray(rng.normal(size=(4, 2)) + 1, jnp.float32)
  x2 = jnp.asarray(rng.normal(size=(4, 3)) - 1, jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x1, x2)["params"]

  def loss_fn(p, x1, x2, *, scale):
    return scale * jnp.mean(model.apply({"params": p}, x1, x2) ** 2)

  _, _, stats = eva_optax.value_and_grad(loss_fn)(params, x1, x2, scale=2.0)
  assert_propagated(stats["Dense_0"].a,
                    lambda x1, x2: np.append(np.concatenate([x1, x2], axis=-1).mean(axis=0), 1.0),
                    (x1, len(x1) + 1), (x2, len(x2) + 1))


# ----------------------------------------------------------------------------
# A module called twice in one forward pass.


class _Shared(nn.Module):

  @nn.compact
  def __call__(self, x1, x2):
    layer = nn.Dense(3)
    return layer(x1), layer(x2)


def _shared_problem():
  rng = np.random.default_rng(0)
  x1 = jnp.asarray(rng.normal(size=(3, 4)) + 1.0, jnp.float32)
  x2 = jnp.asarray(rng.normal(size=(5, 4)) - 0.5, jnp.float32)  # other size, other mean
  model = _Shared()
  params = model.init(jax.random.PRNGKey(0), x1, x2)["params"]

  def head(y1, y2):
    return 0.5 * jnp.mean(jnp.sum((y1 - 1.0) ** 2, -1)) + jnp.mean(jnp.sum(jnp.sin(y2), -1))

  def loss_fn(p):
    return head(*model.apply({"params": p}, x1, x2))

  dy1, dy2 = jax.grad(head, argnums=(0, 1))(*model.apply({"params": params}, x1, x2))
  return params, loss_fn, (x1, x2), (dy1, dy2)


def test_module_called_twice_pools_rows():
  params, loss_fn, (x1, x2), (dy1, dy2) = _shared_problem()
  loss, grads, stats = eva_optax.value_and_grad(loss_fn, statistics="factors")(params)
  st = stats["Dense_0"]
  xs = np.concatenate([to64(x1), to64(x2)])   # 8 rows, not 2 calls
  dys = np.concatenate([to64(dy1), to64(dy2)])
  # Sums of the 8 rows (9 roundings); the rows of dy are this test's own float32
  # jax.grad and the library's its own (the head's derivative: a cos or a
  # difference and the mean's scale, 4 roundings each side).
  ops_dy = 9 + 2 * 4
  assert_propagated(st.a, lambda x: with_one(x).mean(axis=0), (xs, 9))
  assert_propagated(st.g, lambda d: d.mean(axis=0), (dys, ops_dy))
  assert_propagated(st.A, lambda x: with_one(x).T @ with_one(x) / 8, (xs, 10))
  assert_propagated(st.G, lambda d: d.T @ d / 8, (dys, ops_dy + 1))
  assert_propagated(layer_view(grads["Dense_0"]), lambda x, d: with_one(x).T @ d,
                    (xs, 0.0), (dys, ops_dy))


def test_module_called_twice_rows_mode_concatenates_the_calls():
  params, loss_fn, (x1, x2), (dy1, dy2) = _shared_problem()
  _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics="rows")(params)
  st = stats["Dense_0"]
  np.testing.assert_array_equal(st.a_rows, with_one(np.concatenate([to64(x1), to64(x2)])))
  # dy: both float32 jax.grad of the head (4 roundings each side).
  assert_float32_twins(st.g_rows, np.concatenate([to64(dy1), to64(dy2)]), 4)
  assert_propagated(layer_view(grads["Dense_0"]), lambda a, g: a.T @ g, (st.a_rows, 0.0),
                    (st.g_rows, 9))


def test_unknown_statistics_mode_raises():
  with pytest.raises(ValueError, match="statistics"):
    eva_optax.value_and_grad(lambda p: 0.0, statistics="matrices")
