"""Bad values that only appear at run time, for the layer-wise optimizers.

A damping that is <= 0 or not finite at a step (an array, a schedule, through
optax.inject_hyperparams), a non-finite gradient, huge but finite inputs or
gradients: the parameters stay finite, the state stays usable, and a counter
in the state says what happened. Eva-s and Shampoo have their own tests.
"""

from __future__ import annotations

import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from conftest import MLP
from conftest import mse_loss
from conftest import float32_tol
from conftest import reference_tol
from conftest import regression_batch

METHODS = {"eva": "vectors", "eva_f": "vectors", "kfac": "factors", "foof": "factors"}


def _problem(scale=1.0):
  model = MLP(features=(8, 6, 3))
  x, y = regression_batch()

  class Relu(nn.Module):   # a ReLU MLP: homogeneous, so inputs scale through
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(8)(x))
      x = nn.relu(nn.Dense(6)(x))
      return nn.Dense(3)(x)

  model = Relu()
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  return model, params, mse_loss(model), x * scale, y * scale


def _finite(tree):
  return all(bool(np.all(np.isfinite(v))) for v in jax.tree.leaves(tree))


def _step(tx, params, state, grad_fn, x, y):
  _, grads, stats = grad_fn(params, x, y)
  updates, state = tx.update(grads, state, params, stats=stats)
  return optax.apply_updates(params, updates), state, updates


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("bad", [0.0, -0.03, np.inf, np.nan])
def test_bad_damping_array_skips_the_step_and_counts_it(name, bad):
  _, params, loss_fn, x, y = _problem()
  grad_fn = jax.jit(eva_optax.value_and_grad(loss_fn, statistics=METHODS[name]))
  tx = optax.inject_hyperparams(getattr(eva_optax, name))(
      learning_rate=0.1, damping=0.03)
  state = tx.init(params)
  params, state, _ = _step(tx, params, state, grad_fn, x, y)
  state.hyperparams["damping"] = jnp.asarray(bad, jnp.float32)
  params, state, updates = _step(tx, params, state, grad_fn, x, y)
  inner = state.inner_state[0]
  assert int(inner.invalid_hparam_count) == 1
  assert int(inner.skipped_count) == 0
  assert _finite(params) and _finite(updates)
  # The skipped step folded no statistics and left the averages finite.
  assert int(inner.stats_count) == 1 and _finite(inner.layers)
  # Usable afterwards: a good damping gives a normal step again.
  state.hyperparams["damping"] = jnp.asarray(0.03, jnp.float32)
  params, state, updates = _step(tx, params, state, grad_fn, x, y)
  inner = state.inner_state[0]
  assert int(inner.invalid_hparam_count) == 1 and int(inner.stats_count) == 2
  assert _finite(params) and np.any(np.abs(jax.tree.leaves(updates)[0]) > 0)


@pytest.mark.parametrize("name", ["eva", "kfac"])
def test_schedule_that_reaches_zero(name):
  _, params, loss_fn, x, y = _problem()
  grad_fn = jax.jit(eva_optax.value_and_grad(loss_fn, statistics=METHODS[name]))
  damping = optax.linear_schedule(0.03, 0.0, 2)   # 0 from step 2 on
  tx = getattr(eva_optax, f"scale_by_{name}")(damping)
  state = tx.init(params)
  for _ in range(4):
    _, grads, stats = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    assert _finite(updates)
  assert int(state.invalid_hparam_count) == 2 and int(state.stats_count) == 2


@pytest.mark.parametrize("name", sorted(METHODS))
def test_nonfinite_gradient_with_finite_statistics_is_skipped(name):
  _, params, loss_fn, x, y = _problem()
  _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics=METHODS[name])(
      params, x, y)
  tx = getattr(eva_optax, f"scale_by_{name}")()
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g, grads)
  bad["Dense_2"]["bias"] = bad["Dense_2"]["bias"].at[0].set(jnp.nan)
  updates, state = tx.update(bad, state, params, stats=stats)
  assert int(state.skipped_count) == 1 and int(state.nonfinite_count) == 0
  assert int(state.stats_count) == 0
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  updates, state = tx.update(grads, state, params, stats=stats)
  assert int(state.stats_count) == 1 and _finite(updates)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("scale", [1e12, 1e15])
def test_huge_inputs_give_finite_updates(name, scale):
  # A ReLU MLP is homogeneous: inputs (and targets) scaled by 1e15 scale the
  # activations, dL/dy and the gradients (1e30): squares overflow float32.
  _, params, loss_fn, x, y = _problem(scale)
  _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics=METHODS[name])(
      params, x, y)
  assert _finite(grads) and _finite(stats)
  tx = getattr(eva_optax, name)(0.1)
  updates, state = tx.update(grads, tx.init(params), params, stats=stats)
  inner = state[0]
  assert _finite(updates) and int(inner.skipped_count) == 0
  assert int(inner.stats_count) == 1


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("power", [60, 83, -60])   # 1e18, 1e25, 1e-18
def test_scaled_gradients_give_the_same_direction(name, power):
  _, params, loss_fn, x, y = _problem()
  _, grads, stats = eva_optax.value_and_grad(loss_fn, statistics=METHODS[name])(
      params, x, y)
  # KL-normalized (eva, eva_f) or raw (kfac, foof: scale_by_*, no clip) updates.
  tx = (getattr(eva_optax, name)(1.0, momentum=None) if name in ("eva", "eva_f")
        else getattr(eva_optax, f"scale_by_{name}")())
  ref, _ = tx.update(grads, tx.init(params), params, stats=stats)
  big = jax.tree.map(lambda g: g * np.float32(2.0 ** power), grads)
  out, _ = tx.update(big, tx.init(params), params, stats=stats)
  factor = 1.0 if name in ("eva", "eva_f") else 2.0 ** power
  # Both are float32 evaluations of the same step (a power of two scales it
  # exactly): each within its bound (reference_tol, relative, the same for
  # both), + for the KL-normalized ones the scale sqrt(c / S), S = sum of
  # <U, G> over the layers (positive terms: their bound plus the sum's N
  # roundings, halved by the root, + 3 scalar roundings).
  grads64 = jax.tree.map(np.asarray, grads)
  tols = {layer: reference_tol(name, grads64[layer], stats[layer], 0.03) for layer in grads}
  scale_tol = 0.0
  if name in ("eva", "eva_f"):
    n = sum(np.size(v) for v in jax.tree.leaves(grads))
    scale_tol = (0.5 * (max(max(t.values()) for t in tols.values()) + float32_tol(1.0, n))
                 + float32_tol(1.0, 3))
  for layer, node in ref.items():
    for leaf, r in node.items():
      o = np.asarray(out[layer][leaf], np.float64)
      assert np.all(np.isfinite(o))
      r, o = np.asarray(r, np.float64), o / factor
      bound = 2 * (tols[layer][leaf] + scale_tol)
      assert np.linalg.norm(o - r) <= bound * np.linalg.norm(r), (layer, leaf)


@contextlib.contextmanager
def _closed_over_arrays_as_constants():
  """Closed-over arrays embedded in the program as compile-time constants.

  jax 0.10 does this by default; jax 0.12 passes them as arguments
  (``jax_use_simplified_jaxpr_constants``), where XLA cannot fold them. The
  flag off restores the constants on every version, so the test below sees
  what a fold would do there.
  """
  old = jax.config.jax_use_simplified_jaxpr_constants
  jax.config.update("jax_use_simplified_jaxpr_constants", False)
  try:
    yield
  finally:
    jax.config.update("jax_use_simplified_jaxpr_constants", old)


def test_factors_of_a_constant_batch_are_not_folded_at_compile_time():
  # A jitted step that closes over its batch (common in notebooks): XLA would
  # fold x^T x into a constant at compile time (14 s at width 768, minutes at
  # 2048). The folded factor shows as a large constant in the compiled HLO.
  d = 256
  model = nn.Dense(d)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, d)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  grad_fn = eva_optax.value_and_grad(loss, statistics="factors")
  folded = re.compile(r"f32\[\d{3,},\d{3,}\]\{[^}]*\} constant")
  with _closed_over_arrays_as_constants():
    hlo = jax.jit(grad_fn).lower(params).compile().as_text()
    # The check sees a folded factor: XLA folds x^T x of a constant x.
    control = jax.jit(lambda p: p["kernel"] + x.T @ x).lower(params).compile()
  assert not folded.findall(hlo)
  assert folded.findall(control.as_text())
