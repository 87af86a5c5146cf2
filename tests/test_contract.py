"""The optax contract that every eva_optax optimizer keeps, driven by one table."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from conftest import MLP
from conftest import float32_tol
from conftest import mse_loss
from conftest import regression_batch


# Float32 roundings on the longest path of one training step of the MLP
# (5 -> 8 -> 6 -> 3, batch 16): the forward's fan-ins 6 + 9 + 7 and the loss's
# 3 + 16, the backward as long, the batch sums of gradients and statistics
# (16 + 3), the preconditioner's closed form or solve (<= 2 (9 + 8)) and the
# decay, momentum and learning-rate steps (5).
STEP_OPS = 2 * (6 + 9 + 7 + 3 + 16) + 16 + 3 + 2 * (9 + 8) + 5


@dataclasses.dataclass(frozen=True)
class Spec:
  """One optimizer under test."""

  name: str
  statistics: str | None     # the value_and_grad mode it needs; None: gradient only
  hyper: dict[str, Any]      # hyperparameters besides the learning rate (injectable)
  lr: float                  # learning rate of the convergence test

  def make(self, learning_rate: Any = None, **kwargs) -> optax.GradientTransformation:
    lr = self.lr if learning_rate is None else learning_rate
    return getattr(eva_optax, self.name)(lr, **{**self.hyper, **kwargs})

  @property
  def mode(self) -> str:
    return self.statistics or "vectors"  # gradient-only: stats are passed anyway


OPTIMIZERS = (
    Spec("eva", "vectors", {"damping": 0.03}, lr=0.05),
    Spec("eva_f", "vectors", {"damping": 0.03}, lr=0.05),
    Spec("kfac", "factors", {"damping": 0.03}, lr=0.1),
    Spec("foof", "factors", {"damping": 0.03}, lr=0.1),
    Spec("eva_s", None, {"damping": 0.03}, lr=0.05),
    Spec("shampoo", None, {}, lr=0.05),
)
IDS = [s.name for s in OPTIMIZERS]
each_optimizer = pytest.mark.parametrize("spec", OPTIMIZERS, ids=IDS)


def _problem(dtype=jnp.float32, batch=16, seed=0):
  model = MLP(param_dtype=dtype)
  x, y = regression_batch(batch=batch, seed=seed)
  params = model.init(jax.random.PRNGKey(0), x.astype(dtype))["params"]
  return params, mse_loss(model), x.astype(dtype), y


def _step_fn(spec, tx, loss_fn):
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=spec.mode)

  def step(params, state, x, y):
    loss, grads, stats = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state, loss

  return step


def _finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x, np.float32))))
             for x in jax.tree.leaves(tree))


def _assert_trees_equal(x, y):
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_table_lists_every_optimizer():
  assert {s.name for s in OPTIMIZERS} == {"eva", "eva_f", "kfac", "foof", "eva_s", "shampoo"}
  for spec in OPTIMIZERS:
    assert spec.name in eva_optax.__all__
    assert f"scale_by_{spec.name}" in eva_optax.__all__
    assert callable(getattr(eva_optax, f"scale_by_{spec.name}"))


@each_optimizer
def test_inside_chain(spec):
  params, loss_fn, x, y = _problem()
  tx = optax.chain(optax.clip_by_global_norm(1.0), spec.make())
  step = jax.jit(_step_fn(spec, tx, loss_fn))
  state = tx.init(params)
  new_params = params
  for _ in range(3):
    new_params, state, loss = step(new_params, state, x, y)
  assert _finite(new_params) and np.isfinite(loss)
  assert not np.allclose(new_params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


@each_optimizer
def test_inject_hyperparams(spec):
  params, loss_fn, x, y = _problem()
  schedule = optax.linear_schedule(spec.lr, spec.lr / 10, transition_steps=10)
  factory = getattr(eva_optax, spec.name)
  tx = optax.inject_hyperparams(factory)(learning_rate=schedule, **spec.hyper)
  state = tx.init(params)
  step = jax.jit(_step_fn(spec, tx, loss_fn))
  p1, state, _ = step(params, state, x, y)
  # The first step equals the plain optimizer at the schedule's first value:
  # the same float32 step, its hyperparameters run-time values instead of
  # constants (XLA may fuse and fold differently): each update within
  # STEP_OPS roundings of its largest entry, and p + u rounded once each side.
  plain = spec.make(spec.lr)
  p1_ref, _, _ = jax.jit(_step_fn(spec, plain, loss_fn))(params, plain.init(params), x, y)
  assert jax.tree.structure(p1) == jax.tree.structure(p1_ref)
  for a, b, p in zip(jax.tree.leaves(p1), jax.tree.leaves(p1_ref), jax.tree.leaves(params)):
    a, b, p = (np.asarray(v, np.float64) for v in (a, b, p))
    bound = 2 * float32_tol(1.0, STEP_OPS) * np.abs(b - p).max() + float32_tol(1.0, 1) * np.abs(b)
    assert np.all(np.abs(a - b) <= bound), spec.name
  p2, state, _ = step(p1, state, x, y)
  # float32 values of the schedule (a few roundings) and of Python numbers (half of one).
  np.testing.assert_allclose(state.hyperparams["learning_rate"], schedule(1),
                             rtol=float32_tol(1.0, 4))
  for name, value in spec.hyper.items():
    np.testing.assert_allclose(state.hyperparams[name], value, rtol=float32_tol(1.0, 1))
  assert _finite(p2)


@each_optimizer
def test_inject_hyperparams_changes_take_effect(spec):
  params, loss_fn, x, y = _problem()
  tx = optax.inject_hyperparams(getattr(eva_optax, spec.name))(
      learning_rate=spec.lr, **spec.hyper)
  state = tx.init(params)
  step = jax.jit(_step_fn(spec, tx, loss_fn))
  p_ref, _, _ = step(params, state, x, y)
  if "damping" in spec.hyper:
    state.hyperparams["damping"] = jnp.asarray(3.0)
    p_damped, _, _ = step(params, state, x, y)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(p_damped), jax.tree.leaves(p_ref)))
    # The same compiled step on the same inputs: only the damping can change it
    # (by far more than rounding: 0.03 -> 3 rescales the preconditioned step).
    assert diff > 0, "the injected damping is ignored"
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  p1, _, _ = step(params, state, x, y)
  _assert_trees_equal(p1, params)  # learning rate 0: no move


@each_optimizer
def test_ignores_unknown_extra_args(spec):
  params, loss_fn, x, y = _problem()
  tx = spec.make()
  _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics=spec.mode)(params, x, y)
  state = tx.init(params)
  ref, _ = tx.update(grads, state, params, stats=stats)
  got, _ = tx.update(grads, state, params, stats=stats, unknown_arg=1.0, other="x")
  _assert_trees_equal(got, ref)


@pytest.mark.parametrize("spec", [s for s in OPTIMIZERS if s.statistics is None],
                         ids=[s.name for s in OPTIMIZERS if s.statistics is None])
def test_gradient_only_optimizers_need_no_stats(spec):
  params, loss_fn, x, y = _problem()
  tx = spec.make()
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, x, y)
  state = tx.init(params)
  without, _ = tx.update(grads, state, params)
  with_stats, _ = tx.update(grads, state, params, stats=stats)
  _assert_trees_equal(with_stats, without)


@pytest.mark.parametrize("spec", [s for s in OPTIMIZERS if s.statistics == "factors"],
                         ids=[s.name for s in OPTIMIZERS if s.statistics == "factors"])
def test_factor_optimizers_reject_vector_stats(spec):
  params, loss_fn, x, y = _problem()
  tx = spec.make()
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, x, y)
  with pytest.raises(ValueError, match="statistics='factors'"):
    tx.update(grads, tx.init(params), params, stats=stats)


@each_optimizer
def test_no_recompilation_on_second_step(spec):
  params, loss_fn, x, y = _problem()
  tx = spec.make()
  step = jax.jit(_step_fn(spec, tx, loss_fn))
  state = tx.init(params)
  params, state, _ = step(params, state, x, y)
  x2, y2 = regression_batch(seed=1)
  params, state, _ = step(params, state, x2, y2)
  params, state, _ = step(params, state, x, y)
  assert step._cache_size() == 1, "the optimizer recompiles on the second update"


@each_optimizer
def test_bf16_params_get_bf16_updates_and_float32_state(spec):
  params, loss_fn, x, y = _problem(dtype=jnp.bfloat16)
  tx = spec.make()
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=spec.mode)
  state = tx.init(params)
  for _ in range(2):
    _, grads, stats = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    for u in jax.tree.leaves(updates):
      assert u.dtype == jnp.bfloat16
    params = optax.apply_updates(params, updates)
  assert _finite(updates)
  # The aliases chain the preconditioner first; its state stays float32.
  pre_state = state[0]
  floats = [leaf for leaf in jax.tree.leaves(pre_state)
            if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)]
  assert floats, "the preconditioner keeps no floating-point state?"
  for leaf in floats:
    assert leaf.dtype == jnp.float32
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))


@each_optimizer
def test_second_batch_size_with_same_state(spec):
  params, loss_fn, x, y = _problem(batch=8)
  tx = spec.make()
  step = jax.jit(_step_fn(spec, tx, loss_fn))
  state = tx.init(params)
  params, state, _ = step(params, state, x, y)
  shapes = jax.tree.map(jnp.shape, state)
  x12, y12 = regression_batch(batch=12, seed=5)
  params, state, loss = step(params, state, x12, y12)
  assert jax.tree.map(jnp.shape, state) == shapes
  assert _finite(params) and np.isfinite(loss)


@each_optimizer
def test_converges_on_tiny_regression(spec):
  params, loss_fn, x, y = _problem(batch=32)
  tx = spec.make()
  step = jax.jit(_step_fn(spec, tx, loss_fn))
  state = tx.init(params)
  first = float(loss_fn(params, x, y))
  for _ in range(60):
    params, state, _ = step(params, state, x, y)
  last = float(loss_fn(params, x, y))
  assert last < 0.05 * first, (first, last)  # measured 0.003 to 0.014


@pytest.mark.parametrize("name", ["eva", "eva_f", "kfac", "foof", "eva_s", "shampoo"])
def test_fresh_state_can_be_donated(name):
  params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}}
  state = getattr(eva_optax, f"scale_by_{name}")().init(params)
  ids = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)]
  assert len(ids) == len(set(ids)), "state leaves share buffers"
