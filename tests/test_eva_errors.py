"""Eva's and Eva-f's errors: bad arguments and statistics that do not belong to
the gradients raise ValueError or TypeError naming the argument or the layer."""

from __future__ import annotations

import jax
import pytest

import eva_optax
from conftest import MLP
from conftest import mse_loss


@pytest.fixture
def mlp_grads(mlp_problem):
  model, params, loss, x, y = mlp_problem
  _, grads, stats = eva_optax.value_and_grad(loss)(params, x, y)
  return model, params, grads, stats, x, y


@pytest.mark.parametrize("factory", (eva_optax.scale_by_eva, eva_optax.scale_by_eva_f,
                                     lambda: eva_optax.eva(0.1)))
def test_missing_stats_raises(mlp_grads, factory):
  _, params, grads, _, _, _ = mlp_grads
  tx = factory()
  state = tx.init(params)
  with pytest.raises(ValueError, match="value_and_grad"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="value_and_grad"):
    tx.update(grads, state, params, stats=None)


def test_stats_of_another_model_raises(mlp_grads):
  _, params, grads, _, x, y = mlp_grads
  bigger = MLP(features=(8, 6, 3, 3))
  big_params = bigger.init(jax.random.PRNGKey(0), x)["params"]
  _, _, big_stats = eva_optax.value_and_grad(mse_loss(bigger))(big_params, x, y)
  tx = eva_optax.scale_by_eva()
  with pytest.raises(ValueError, match="Dense_3"):
    tx.update(grads, tx.init(params), params, stats=big_stats)


def test_missing_layer_stats_raises(mlp_grads):
  _, params, grads, stats, _, _ = mlp_grads
  partial = {k: v for k, v in stats.items() if k != "Dense_1"}
  tx = eva_optax.scale_by_eva()
  with pytest.raises(ValueError, match="Dense_1"):
    tx.update(grads, tx.init(params), params, stats=partial)


def test_stats_with_wrong_shapes_raises(mlp_grads):
  _, params, grads, stats, _, _ = mlp_grads
  swapped = dict(stats, Dense_1=stats["Dense_2"])
  tx = eva_optax.scale_by_eva()
  with pytest.raises(ValueError, match="Dense_1"):
    tx.update(grads, tx.init(params), params, stats=swapped)


@pytest.mark.parametrize("damping", (0.0, -0.1))
@pytest.mark.parametrize("factory", (eva_optax.scale_by_eva, eva_optax.scale_by_eva_f,
                                     lambda damping: eva_optax.eva(0.1, damping=damping),
                                     lambda damping: eva_optax.eva_f(0.1, damping=damping)))
def test_nonpositive_damping_raises(factory, damping):
  with pytest.raises(ValueError, match="damping"):
    factory(damping=damping)


@pytest.mark.parametrize("stat_decay", (-0.1, 1.5))
@pytest.mark.parametrize("factory", (eva_optax.scale_by_eva, eva_optax.scale_by_eva_f,
                                     lambda stat_decay: eva_optax.eva(0.1, stat_decay=stat_decay)))
def test_stat_decay_outside_unit_interval_raises(factory, stat_decay):
  with pytest.raises(ValueError, match="stat_decay"):
    factory(stat_decay=stat_decay)


@pytest.mark.parametrize("stat_decay", (0.0, 1.0))
def test_stat_decay_bounds_are_allowed(stat_decay):
  eva_optax.scale_by_eva(stat_decay=stat_decay)


@pytest.mark.parametrize("factory", (eva_optax.scale_by_eva, eva_optax.scale_by_eva_f))
def test_kl_clip_without_learning_rate_raises(factory):
  with pytest.raises(ValueError, match="learning_rate"):
    factory(kl_clip=0.001)


def test_factors_optimizer_with_vector_stats_raises(mlp_grads):
  _, params, grads, stats, _, _ = mlp_grads
  tx = eva_optax.kfac(0.1)
  with pytest.raises(ValueError, match="statistics='factors'"):
    tx.update(grads, tx.init(params), params, stats=stats)
