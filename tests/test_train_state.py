"""eva_optax.TrainState: Flax's TrainState whose apply_gradients passes ``stats`` on."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state as flax_train_state

import eva_optax
from conftest import MLP, mse_loss, regression_batch

CASES = {
    "eva": (lambda: eva_optax.eva(0.1, weight_decay=1e-3), "vectors"),
    "kfac": (lambda: eva_optax.kfac(0.1, inverse_every=2), "factors"),
}


def _setup():
  model = MLP()
  x, y = regression_batch()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  return model, params, x, y


@pytest.mark.parametrize("name", sorted(CASES))
def test_three_steps_equal_the_plain_optax_loop(name):
  make, mode = CASES[name]
  model, params, x, y = _setup()
  grad_fn = eva_optax.value_and_grad(mse_loss(model), statistics=mode)
  tx = make()

  @jax.jit
  def plain_step(params, opt_state, x, y):
    _, grads, stats = grad_fn(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def state_step(state, x, y):
    _, grads, stats = grad_fn(state.params, x, y)
    return state.apply_gradients(grads=grads, stats=stats)

  opt_state = tx.init(params)
  state = eva_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  p = params
  for i in range(3):
    xi = x + 0.5 * i
    p, opt_state = plain_step(p, opt_state, xi, y)
    state = state_step(state, xi, y)
  assert int(state.step) == 3
  jax.tree.map(np.testing.assert_array_equal, state.params, p)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, opt_state)
  # The parameters moved (the comparison is not between two no-ops).
  assert not np.allclose(state.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


def test_flax_train_state_drops_the_statistics():
  """What the subclass fixes: Flax's apply_gradients never passes stats to tx."""
  model, params, x, y = _setup()
  _, grads, stats = eva_optax.value_and_grad(mse_loss(model))(params, x, y)
  flax_state = flax_train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=eva_optax.eva(0.1))
  with pytest.raises(ValueError, match="needs layer statistics"):
    flax_state.apply_gradients(grads=grads, stats=stats)
  ours = eva_optax.TrainState.create(
      apply_fn=model.apply, params=params, tx=eva_optax.eva(0.1))
  assert int(ours.apply_gradients(grads=grads, stats=stats).step) == 1


def test_create_is_flax_create():
  model, params, _, _ = _setup()
  tx = eva_optax.eva(0.1)
  state = eva_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  assert isinstance(state, flax_train_state.TrainState)
  assert state.step == 0 and state.tx is tx and state.apply_fn == model.apply
  jax.tree.map(np.testing.assert_array_equal, state.params, params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, tx.init(params))
  assert ([f for f in state.__dataclass_fields__]
          == [f for f in flax_train_state.TrainState.__dataclass_fields__])


class _WithBatchStats(eva_optax.TrainState):
  batch_stats: dict


def test_without_stats_and_extra_fields():
  """Gradient-only optimizers need no stats; other keywords are replaced as in Flax."""
  model, params, x, y = _setup()
  grads = jax.grad(mse_loss(model))(params, x, y)
  for tx in (eva_optax.shampoo(0.1), optax.sgd(0.1)):
    state = _WithBatchStats.create(apply_fn=model.apply, params=params, tx=tx,
                                   batch_stats={"n": jnp.zeros(())})
    new = state.apply_gradients(grads=grads, batch_stats={"n": jnp.ones(())})
    assert int(new.step) == 1 and float(new.batch_stats["n"]) == 1.0
    # optax.sgd is a plain GradientTransformation: stats are dropped, not an error.
    again = state.apply_gradients(grads=grads, stats={"unused": 1})
    jax.tree.map(np.testing.assert_array_equal, again.params, new.params)
