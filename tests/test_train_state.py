"""eva_optax.TrainState: Flax's TrainState whose apply_gradients passes ``stats`` on."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state as flax_train_state

import eva_optax
from conftest import MLP, float32_tol, mse_loss, regression_batch

CASES = {
    "eva": (lambda: eva_optax.eva(0.1, weight_decay=1e-3), "vectors"),
    "kfac": (lambda: eva_optax.kfac(0.1, inverse_every=2), "factors"),
}


def _params(seed: int = 0):
  """Parameters of ``MLP(features=(3,))`` on 5 inputs, drawn in NumPy (eager
  ``model.init`` compiles its random initialisers: seconds per shape)."""
  rng = np.random.default_rng(seed)
  return {f"Dense_{i}": {
      "kernel": jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), jnp.float32),
      "bias": jnp.asarray(0.1 * rng.normal(size=(n,)), jnp.float32)}
          for i, (m, n) in enumerate([(5, 3)])}


@functools.lru_cache(maxsize=None)
def _setup():
  model = MLP(features=(3,))   # one layer: compile time is what these tests cost
  x, y = regression_batch()
  return model, _params(), x, y


@functools.lru_cache(maxsize=None)
def _grad_fn(mode):
  model = _setup()[0]
  return jax.jit(eva_optax.value_and_grad(mse_loss(model), statistics=mode))


@pytest.mark.parametrize("name", sorted(CASES))
def test_three_steps_equal_the_plain_optax_loop(name):
  make, mode = CASES[name]
  model, params, x, y = _setup()
  tx = make()

  @jax.jit
  def plain_step(params, opt_state, grads, stats):
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state

  state_step = jax.jit(lambda state, grads, stats:
                       state.apply_gradients(grads=grads, stats=stats))

  opt_state = tx.init(params)
  state = eva_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  p = params
  for i in range(3):
    _, grads, stats = _grad_fn(mode)(p, x + 0.5 * i, y)
    p, opt_state = plain_step(p, opt_state, grads, stats)
    _, grads, stats = _grad_fn(mode)(state.params, x + 0.5 * i, y)
    state = state_step(state, grads, stats)
  assert int(state.step) == 3
  jax.tree.map(np.testing.assert_array_equal, state.params, p)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, opt_state)
  # The parameters moved (the comparison is not between two no-ops).
  assert not np.allclose(state.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


def test_flax_train_state_drops_the_statistics():
  """What the subclass fixes: Flax's apply_gradients never passes stats to tx."""
  model, params, x, y = _setup()
  _, grads, stats = _grad_fn("vectors")(params, x, y)
  flax_state = flax_train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=eva_optax.eva(0.1))
  with pytest.raises(ValueError, match="needs layer statistics"):
    flax_state.apply_gradients(grads=grads, stats=stats)
  ours = eva_optax.TrainState.create(
      apply_fn=model.apply, params=params, tx=eva_optax.eva(0.1))
  new = jax.eval_shape(lambda s: s.apply_gradients(grads=grads, stats=stats), ours)
  assert jax.tree.structure(new) == jax.tree.structure(ours)


def test_create_is_flax_create():
  model, params, _, _ = _setup()
  tx = eva_optax.eva(0.1)
  state = eva_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  assert isinstance(state, flax_train_state.TrainState)
  assert state.step == 0 and state.tx is tx and state.apply_fn == model.apply
  jax.tree.map(np.testing.assert_array_equal, state.params, params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, tx.init(params))
  assert (list(state.__dataclass_fields__)
          == list(flax_train_state.TrainState.__dataclass_fields__))


class _WithBatchStats(eva_optax.TrainState):
  batch_stats: dict


def test_without_stats_and_extra_fields():
  """Optimizers that need no stats get none; other keywords are replaced as in Flax."""
  model, params, x, y = _setup()
  _, grads, _ = _grad_fn("vectors")(params, x, y)
  state = _WithBatchStats.create(apply_fn=model.apply, params=params,
                                 tx=optax.sgd(0.1), batch_stats={"n": jnp.zeros(())})
  new = state.apply_gradients(grads=grads, batch_stats={"n": jnp.ones(())})
  assert int(new.step) == 1 and float(new.batch_stats["n"]) == 1.0
  for key in ("kernel", "bias"):
    # p - 0.1 g: a product and a difference, here and in optax.sgd (two
    # roundings each side, relative to |p| + 0.1 |g|).
    p, g = params["Dense_0"][key], grads["Dense_0"][key]
    err = np.abs(np.asarray(new.params["Dense_0"][key], np.float64)
                 - np.asarray(p - 0.1 * g, np.float64))
    assert np.all(err <= 2 * float32_tol(1.0, 2) * (np.abs(p) + 0.1 * np.abs(g)))
  # optax.sgd is a plain GradientTransformation: stats are dropped, not an error.
  again = state.apply_gradients(grads=grads, stats={"unused": 1})
  jax.tree.map(np.testing.assert_array_equal, again.params, new.params)


def test_multisteps_object_as_tx_gets_the_statistics():
  """tx=eva_optax.MultiSteps(...) (an object, not a GradientTransformation) gets stats."""
  model, params, x, y = _setup()
  _, grads, stats = _grad_fn("vectors")(params, x, y)
  tx = eva_optax.MultiSteps(eva_optax.eva(0.1), every_k_schedule=2)
  state = eva_optax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  new = jax.eval_shape(lambda s: s.apply_gradients(grads=grads, stats=stats), state)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  with pytest.raises(ValueError, match="needs layer statistics"):  # what stats avoid
    jax.eval_shape(lambda s: s.apply_gradients(grads=grads), state)
