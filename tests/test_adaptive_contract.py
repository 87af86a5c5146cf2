"""eva_optax.adaptive under the optax contract (jit without recompilation,
optax.chain, inject_hyperparams, the direction's damping following lambda,
clear errors), and the time-to-quality benchmark's smoke test."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils

import eva_optax
from adaptive_problems import linear_problem
from adaptive_problems import tiny_problem
from conftest import float32_tol

# ----------------------------------------------------------------------------
# The optax contract: jit without recompilation, chain, inject_hyperparams,
# every preconditioner of the library as the direction.


def _mlp_setup(batch=16):
  model, params, x, _ = tiny_problem(batch=batch)
  teacher = model.init(jax.random.PRNGKey(7), x)["params"]
  t = 3.0 * model.apply({"params": teacher}, x)   # a learnable target
  loss_fn = lambda p, xb: jnp.mean((model.apply({"params": p}, xb) - t) ** 2)
  return model, params, x, loss_fn


def _make_step(tx, model, loss_fn, statistics=None):
  grad_fn = (eva_optax.value_and_grad(loss_fn, statistics=statistics)
             if statistics else jax.value_and_grad(loss_fn))

  @jax.jit
  def step(params, state, x):
    if statistics:
      loss, g, stats = grad_fn(params, x)
      extra = {"stats": stats}
    else:
      (loss, g), extra = grad_fn(params, x), {}
    u, state = tx.update(g, state, params,
                         outputs_fn=lambda p: model.apply({"params": p}, x),
                         value_fn=lambda p: loss_fn(p, x), value=loss, **extra)
    return optax.apply_updates(params, u), state, loss

  return step


def test_jit_without_recompilation_and_state_is_stable():
  model, params, x, loss_fn = _mlp_setup()
  tx = eva_optax.adaptive(optax.identity(), "mse")
  step = _make_step(tx, model, loss_fn)
  state = tx.init(params)
  params, state, _ = step(params, state, x)
  before = jax.tree.map(lambda a: (a.shape, a.dtype), state)
  with test_utils.log_compilations() as logs:
    for _ in range(6):   # through an adaptation step and back
      params, state, _ = step(params, state, x)
  assert not logs, "adaptive recompiles on later calls to update"
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == before


def test_inside_optax_chain_and_direction_chain():
  model, params, x, loss_fn = _mlp_setup()
  outs = []
  for tx in (eva_optax.adaptive(optax.identity(), "mse"),
             optax.chain(optax.clip_by_global_norm(1e6),
                         eva_optax.adaptive(optax.chain(optax.identity(),
                                                        optax.scale(-2.0)), "mse"))):
    step = _make_step(tx, model, loss_fn)
    p, s = params, tx.init(params)
    for _ in range(4):
      p, s, _ = step(p, s, x)
    outs.append(p)
  # The clip does not act (g * 1) and -2 is a power of two: every float32
  # operation of the step commutes with it (the coefficients absorb it
  # exactly), so the runs agree bit for bit.
  test_utils.assert_trees_all_equal(outs[0], outs[1])


def test_under_inject_hyperparams():
  model, params, x, loss_fn = _mlp_setup()
  tx = optax.inject_hyperparams(eva_optax.adaptive, static_args=("adapt_every",))(
      optax.identity(), "mse", initial_damping=1.0, max_damping=1.0,
      adapt_every=1)
  step = _make_step(tx, model, loss_fn)
  state = tx.init(params)
  assert float(state.inner_state.damping) == 1.0
  # Injected values are read at every step: pin lambda by its bounds.
  state.hyperparams["min_damping"] = jnp.asarray(3.0, jnp.float32)
  state.hyperparams["max_damping"] = jnp.asarray(3.0, jnp.float32)
  params, state, loss = step(params, state, x)
  assert np.isfinite(float(loss))
  assert float(state.inner_state.damping) == 3.0   # clipped to [3, 3]: exactly


def _injected_scale():
  """A direction with a ``damping`` hyperparameter: ``d = g / damping``."""
  return optax.inject_hyperparams(lambda damping: optax.scale(1.0 / damping))(
      damping=0.03)


def test_direction_damping_follows_lambda():
  outputs_fn, value_fn, _, rng = linear_problem()
  params0 = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  # ("auto" = 0.5 with an injected damping: test_preconditioner_as_direction.)
  for couple, exponent in ((0.5, 0.5), (1.0, 1.0), (None, 0.0)):
    tx = eva_optax.adaptive(_injected_scale(), "mse", initial_damping=1e-2,
                            adapt_every=1, couple_damping=couple)
    p, s = params0, tx.init(params0)
    update = jax.jit(lambda g, s, p, loss, tx=tx: tx.update(
        g, s, p, outputs_fn=outputs_fn, value_fn=value_fn, value=loss))
    for _ in range(3):
      loss, g = jax.value_and_grad(value_fn)(p)
      u, s = update(g, s, p, loss)
      p = optax.apply_updates(p, u)
    lam = float(s.damping)
    # rho = 1: three products by omega (float32 constants: half a rounding each).
    assert lam == pytest.approx(1e-2 * (0.95 ** 1) ** 3, rel=float32_tol(1.0, 5))   # rho = 1
    gamma = float(s.inner_state.hyperparams["damping"])
    # gamma0 (lam / lam0)^e: a division, a power and a product of float32 numbers.
    assert gamma == pytest.approx(0.03 * (lam / 1e-2) ** exponent, rel=float32_tol(1.0, 5))
  with pytest.raises(ValueError, match="inject_hyperparams"):
    eva_optax.adaptive(optax.scale(2.0), "mse", couple_damping=1.0).init(params0)
  eva_optax.adaptive(optax.scale(2.0), "mse").init(params0)   # "auto": none


def test_preconditioner_as_direction():
  """A layer-wise preconditioner (FOOF: statistics, inverse refresh) as the
  direction, its damping injected so that it follows lambda ("auto": e = 0.5).
  The other preconditioners go through the same code path (a direction is any
  optax transformation); benchmarks/time_to_quality.py runs all six."""
  model, params, x, loss_fn = _mlp_setup(batch=32)
  direction = optax.inject_hyperparams(
      eva_optax.scale_by_foof, static_args=("inverse_every",))(
          damping=0.03, inverse_every=2)
  tx = eva_optax.adaptive(direction, "mse")
  step = _make_step(tx, model, loss_fn, statistics="factors")
  state = tx.init(params)
  first = float(loss_fn(params, x))
  for _ in range(6):
    params, state, _ = step(params, state, x)
  assert float(loss_fn(params, x)) < 0.3 * first
  assert int(state.nonfinite_count) == 0 and int(state.rejected_count) == 0
  gamma = float(state.inner_state.hyperparams["damping"])
  # gamma0 sqrt(lam / lam0): a division, a root and a product of float32 numbers.
  assert gamma == pytest.approx(0.03 * np.sqrt(float(state.damping) / 1e-3),
                                rel=float32_tol(1.0, 5))


def test_errors_name_the_argument():
  model, params, x, loss_fn = _mlp_setup()
  tx = eva_optax.adaptive(optax.identity(), "mse")
  state = tx.init(params)
  g = jax.grad(loss_fn)(params, x)
  with pytest.raises(ValueError, match="outputs_fn"):
    tx.update(g, state, params, value_fn=lambda p: loss_fn(p, x))
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(g, state, params, outputs_fn=lambda p: model.apply({"params": p}, x))
  with pytest.raises(ValueError, match="params"):
    tx.update(g, state, None)
  with pytest.raises(ValueError, match="loss must be one of"):
    eva_optax.adaptive(optax.identity(), "cross_entropy")
  with pytest.raises(ValueError, match="initial_damping"):
    eva_optax.adaptive(optax.identity(), "mse", initial_damping=0.0)
  with pytest.raises(ValueError, match="lower_threshold < upper_threshold"):
    eva_optax.adaptive(optax.identity(), "mse", lower_threshold=0.8)
  with pytest.raises(TypeError, match="direction"):
    eva_optax.adaptive(eva_optax.scale_by_foof, "mse")


# ----------------------------------------------------------------------------
# The time-to-quality benchmark's smoke test (benchmarks/time_to_quality.py).


# XLA flags that cut the compile time of the smoke test ~2x (it checks the
# script's plumbing, not its speed); those the installed jaxlib accepts.
from conftest import FAST_COMPILE_FLAGS as FAST_COMPILE  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_time_to_quality_quick(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " "
                                    + FAST_COMPILE).strip())
  subprocess.run([sys.executable, os.path.join(root, "benchmarks",
                                               "time_to_quality.py"),
                  "--quick", "--out", str(tmp_path)],
                 check=True, env=env, cwd=root, capture_output=True)
  with open(tmp_path / "time_to_quality.json") as f:
    saved = json.load(f)
  assert list(saved["runs"]) == ["sgd", "gradient+adaptive"]
  for run in saved["runs"].values():
    assert [e["epoch"] for e in run["evals"]] == [0.5, 1.0]
    assert all(0.0 < e["test_mse"] < 1.0 for e in run["evals"])
    assert run["step_ratio_vs_sgd"] > 0 and run["train_seconds"] > 0
  adaptive = saved["runs"]["gradient+adaptive"]["adaptive"]
  assert adaptive["nonfinite_count"] == 0 and adaptive["final_damping"] > 0
  assert len(saved["provenance"]["git"]["commit"]) == 40
  assert "| gradient + adaptive | adaptive |" in saved["table"]
  sys.path.insert(0, os.path.join(root, "benchmarks"))
  import time_to_quality  # pylint: disable=g-import-not-at-top
  assert saved["table"] == time_to_quality.markdown_table(saved)
  assert os.path.getsize(tmp_path / "time_to_quality.png") > 1000
