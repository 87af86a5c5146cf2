"""The capture on transformed, unsupported and low-precision layers: nn.remat,
grouped convolutions (reported not captured, gradient passed through), bf16
parameters, the variables-dict calling form and describe's report."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import eva_optax
from conftest import MLP
from conftest import ConvNet
from conftest import mse_loss
from conftest import regression_batch
from conftest import assert_propagated
from conftest import to64


def _mean_a(x):
  """``a`` of a Dense layer on ``x``: a mean of len(x) rows (len(x) + 1 roundings)."""
  return np.append(x.mean(axis=0), 1.0)


def test_remat_dense_is_captured():

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.remat(nn.Dense)(3)(x)

  model = Net()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 5)) + 1.0, jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  (name,) = params
  loss_fn = lambda p: 0.5 * jnp.mean(jnp.sum((model.apply({"params": p}, x) - 2.0) ** 2, -1))
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params)
  assert set(stats) == {name} and stats[name].captured
  y = model.apply({"params": params}, x)
  assert_propagated(stats[name].a, _mean_a, (x, len(x) + 1))
  # dy = (y - 2) / 4 from the library's own float32 y (this y: 6 + 1 roundings
  # of the dot products each side), then the mean of 4 rows.
  assert_propagated(stats[name].g, lambda y: (y - 2.0).mean(axis=0) / 4,
                    (y, 2 * 7 + 4 + 2))


class _GroupedNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=2)(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def _grouped_problem():
  model = _GroupedNet()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 2)) + 0.5, jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - 1.0) ** 2)
  return params, loss_fn


def test_grouped_conv_is_reported_not_captured():
  params, loss_fn = _grouped_problem()
  _, _, stats = eva_optax.value_and_grad(loss_fn)(params)
  st = stats["Conv_0"]
  assert not st.captured
  assert st.a is None and st.g is None and st.A is None
  assert "feature_group_count" in st.note
  assert stats["Dense_0"].captured


def test_grouped_conv_gradient_passes_through_eva():
  params, loss_fn = _grouped_problem()
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params)
  tx = eva_optax.scale_by_eva(0.03)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(updates["Conv_0"][leaf], grads["Conv_0"][leaf])
  assert not np.allclose(updates["Dense_0"]["kernel"], grads["Dense_0"]["kernel"])


def test_bf16_params_give_float32_stats():
  model = MLP(param_dtype=jnp.bfloat16)
  x, y = regression_batch()
  x = x.astype(jnp.bfloat16)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, grads, stats = eva_optax.value_and_grad(mse_loss(model), statistics="factors")(
      params, x, y)
  assert grads["Dense_0"]["kernel"].dtype == jnp.bfloat16
  for name in ("Dense_0", "Dense_1", "Dense_2"):
    for key in ("a", "g", "A", "G"):
      value = getattr(stats[name], key)
      assert value.dtype == jnp.float32, (name, key)
      assert np.all(np.isfinite(value))
  # a mean of the (bfloat16, exactly representable) rows, in float32.
  assert_propagated(stats["Dense_0"].a, _mean_a, (x, len(x) + 1))


def test_variables_dict_nests_stats_under_params(mlp_problem):
  model, params, _, x, y = mlp_problem
  variables = {"params": params}

  def loss_fn(v, x, y):
    return jnp.mean(jnp.sum((model.apply(v, x) - y) ** 2, axis=-1))

  _, grads, stats = eva_optax.value_and_grad(loss_fn)(variables, x, y)
  assert set(stats) == {"params"}
  assert set(stats["params"]) == {"Dense_0", "Dense_1", "Dense_2"}
  assert_propagated(stats["params"]["Dense_0"].a, _mean_a, (x, len(x) + 1))
  # And the optimizer pairs them with the nested gradients.
  tx = eva_optax.scale_by_eva()
  updates, _ = tx.update(grads, tx.init(variables), variables, stats=stats)
  assert not np.allclose(updates["params"]["Dense_0"]["kernel"],
                         grads["params"]["Dense_0"]["kernel"])


def test_describe_mentions_every_module_and_not_captured():
  params, loss_fn = _grouped_problem()
  _, _, stats = eva_optax.value_and_grad(loss_fn)(params)
  text = eva_optax.describe(stats, params)
  for name in params:
    assert name in text
  assert "not captured" in text
  assert "feature_group_count" in text

  model = ConvNet()
  x = jnp.ones((2, 8, 8, 2))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, _, stats = eva_optax.value_and_grad(mse_loss(model))(params, x, jnp.ones((2, 3)))
  text = eva_optax.describe(stats, params)
  for name in params:  # LayerNorm_0 too (as plain gradient)
    assert name in text
