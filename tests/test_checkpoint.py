"""Orbax checkpoints: every optimizer's state round-trips, and a resumed run is bit-identical.

The checkpoint is written and read with the standard ``orbax.checkpoint`` API a
Flax user calls (``ocp.StandardCheckpointer``), restored into the abstract
structure of a fresh ``tx.init`` (shapes and dtypes only). The run is saved in
the middle (after an inverse refresh, and for MultiSteps in the middle of an
accumulation, so every part of the state matters), resumed in a fresh process
state, and compared leaf by leaf with the uninterrupted run: bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import eva_optax
from conftest import MLP, mse_loss

STEPS, SAVE_AT = 5, 3

CASES = {
    "eva": (lambda: eva_optax.eva(0.1, weight_decay=1e-3), "vectors"),
    "eva_f": (lambda: eva_optax.eva_f(0.1), "vectors"),
    "eva_s": (lambda: eva_optax.eva_s(0.1), "vectors"),
    "kfac": (lambda: eva_optax.kfac(0.1, inverse_every=2), "factors"),
    "foof": (lambda: eva_optax.foof(0.1, inverse_every=2), "factors"),
    "shampoo": (lambda: eva_optax.shampoo(0.1, inverse_every=2), "vectors"),
    "multisteps_kfac": (lambda: eva_optax.MultiSteps(
        eva_optax.kfac(0.1, inverse_every=2), every_k_schedule=2).gradient_transformation(),
                        "factors"),
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
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.normal(size=(8, 5)) + 0.3 * i, jnp.float32),
              jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)) for i in range(STEPS)]
  return model, _params(), batches


@functools.lru_cache(maxsize=None)
def _grad_fn(mode):
  return jax.jit(eva_optax.value_and_grad(mse_loss(_setup()[0]), statistics=mode))


@functools.lru_cache(maxsize=None)
def _optimizer(name):
  """``(tx, step)``: the optimizer and its jitted training step, compiled once."""
  make, mode = CASES[name]
  tx = make()

  @jax.jit
  def apply(params, opt_state, grads, stats):
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state

  def step(params, opt_state, x, y):
    _, grads, stats = _grad_fn(mode)(params, x, y)
    return apply(params, opt_state, grads, stats)

  return tx, step


def _train(name, params, opt_state, batches):
  step = _optimizer(name)[1]
  for x, y in batches:
    params, opt_state = step(params, opt_state, x, y)
  return {"params": params, "opt_state": opt_state}


@functools.lru_cache(maxsize=None)
def _first_part(name):
  tx = _optimizer(name)[0]
  _, params0, batches = _setup()
  return _train(name, params0, tx.init(params0), batches[:SAVE_AT])


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_from_orbax_checkpoint_is_bit_identical(name, tmp_path):
  tx = _optimizer(name)[0]
  _, params0, batches = _setup()
  whole = _train(name, params0, tx.init(params0), batches)

  # Interrupted: SAVE_AT steps, save, restore into tx.init's structure, the rest.
  first = _first_part(name)
  path = tmp_path / "checkpoint"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, first)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": params0, "opt_state": tx.init(params0)})
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, abstract)

  # The round trip: same structure (NamedTuple states and all), same bits.
  assert jax.tree.structure(restored) == jax.tree.structure(first)
  jax.tree.map(np.testing.assert_array_equal, restored, first)
  resumed = _train(name, restored["params"], restored["opt_state"], batches[SAVE_AT:])

  assert jax.tree.structure(resumed) == jax.tree.structure(whole)
  jax.tree.map(np.testing.assert_array_equal, resumed, whole)
  # Every part of the state took part: the statistics were folded in and the
  # parameters moved from their start.
  counts = [int(s.stats_count) for s in jax.tree.leaves(
      whole["opt_state"], is_leaf=lambda s: hasattr(s, "stats_count"))
            if hasattr(s, "stats_count")]
  assert counts and min(counts) >= 2
  assert not np.array_equal(whole["params"]["Dense_0"]["kernel"],
                            params0["Dense_0"]["kernel"])


def test_multisteps_checkpoint_mid_accumulation_keeps_the_accumulators():
  """Saved after 3 micro-steps of k=2: the accumulated gradients and statistics are in it."""
  opt_state = _first_part("multisteps_kfac")["opt_state"]
  assert int(opt_state.mini_step) == 1
  leaves = jax.tree.leaves((opt_state.acc_grads, opt_state.acc_stats))
  assert leaves and all(np.any(np.asarray(l) != 0) for l in leaves)
