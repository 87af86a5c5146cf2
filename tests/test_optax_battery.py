"""optax's own contrib test battery, run against every eva_optax optimizer.

The battery is ``optax/contrib/_common_test.py`` of the installed optax (it
ships in the optax wheel). It is imported, not copied: each of its parameterized
tests is called through the undecorated function that absl keeps as
``__wrapped__``, with this library's optimizers in place of optax's through its
one lookup function, ``_get_opt_factory``.

What the battery checks, per optimizer (15 cases, as for an optax contrib
optimizer that is not a wrapper): extra keyword arguments to ``update`` and no
recompilation on the second call (optax also runs it with ``wrap=True``, the
same test for an optimizer that is not a wrapper), convergence on four targets
(parabola, Rosenbrock, 2-D matrix parabola, mixed 1-D and 2-D), ``inject_hyperparams``
gives the same updates and state, updates keep the parameter dtype (bf16,
f32), ``optax.MultiSteps`` emits zeros on a micro-step (bf16, f32), a stable
state under ``lax.cond`` for four dtypes (f16, bf16, f32, f64), and a learning
rate schedule gives the same run as the constant.

Eva-s and Shampoo take the battery as they are. The layer-wise optimizers (Eva,
Eva-f, K-FAC, FOOF) need ``stats=`` from :func:`eva_optax.value_and_grad`; for
the battery's objectives (plain arrays, no Flax layer) that is the empty tree
``{}``, so a small adapter passes ``stats={}`` when the battery passes none.
On such parameters these optimizers pass the gradient through to their SGD
chain, so for them the battery checks the optax plumbing (extra arguments,
recompilation, ``inject_hyperparams``, ``MultiSteps``, dtypes, schedules), not
the preconditioner; tests/test_contract.py covers that on real layers.

Which cases run for which optimizer: all 15 for Eva, Eva-s and Shampoo. On
the battery's parameters Eva-f, K-FAC and FOOF compute exactly what Eva
computes (no layer, so no state but the counters, and the same chain), which
``test_layerwise_family_is_eva_on_battery_parameters`` checks step by step;
for them the battery runs the cases that depend on the factory itself, not
only on the computation: extra arguments and recompilation,
``inject_hyperparams`` (their own hyperparameters, such as ``inverse_every``,
are injected), and the learning-rate annotation and schedule. The 11 others
(convergence x4, dtype x2, ``MultiSteps`` x2, state stability x4) would repeat
Eva's computation, and the time budget of this file (60 s) does not allow
running them three more times.

Two adaptations besides that, both about names: optax's table refers to
optimizers by name, so ours are registered under ``"eva_optax.<name>"``; and
the battery's schedule test reads the ``learning_rate`` annotation with
``inspect.signature`` (no ``eval_str``), which under this library's
``from __future__ import annotations`` is a string, so the factories are given
their evaluated signature (otherwise that test would skip itself).
"""

from __future__ import annotations

import functools
import inspect
import unittest
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import _common_test as battery

import eva_optax

# ----------------------------------------------------------------------------
# The optimizers, as optax's table spells them.


def _signature_evaluated(factory: Callable[..., Any],
                         wrapped: Callable[..., Any]) -> Callable[..., Any]:
  wrapped.__signature__ = inspect.signature(factory, eval_str=True)
  wrapped.__doc__ = factory.__doc__
  return wrapped


def _gradient_only(factory):
  @functools.wraps(factory)
  def make(*args, **kwargs):
    return factory(*args, **kwargs)
  return _signature_evaluated(factory, make)


def _with_empty_stats(factory):
  """The layer-wise optimizers with ``stats={}`` (what value_and_grad gives here)."""
  @functools.wraps(factory)
  def make(*args, **kwargs):
    tx = factory(*args, **kwargs)

    def update_fn(updates, state, params=None, *, stats=None, **extra_args):
      stats = {} if stats is None else stats
      return tx.update(updates, state, params, stats=stats, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)
  return _signature_evaluated(factory, make)


FACTORIES = {
    "eva_optax.eva": _with_empty_stats(eva_optax.eva),
    "eva_optax.eva_f": _with_empty_stats(eva_optax.eva_f),
    "eva_optax.kfac": _with_empty_stats(eva_optax.kfac),
    "eva_optax.foof": _with_empty_stats(eva_optax.foof),
    "eva_optax.eva_s": _gradient_only(eva_optax.eva_s),
    "eva_optax.shampoo": _gradient_only(eva_optax.shampoo),
}

# Settings as optax's table chooses them per optimizer. On the battery's
# vectors (Rosenbrock's and the parabola's parameters) every optimizer here
# passes the gradient through to heavy-ball SGD (momentum 0.9), stable on
# Rosenbrock (curvature ~1000) only for lr < 2 (1 + 0.9) / 1000 = 3.8e-3: hence
# 1e-3 for the layer-wise ones. Eva-s and Shampoo run at 1e-2 with AdaGrad
# grafting, the setting their docstrings recommend for such learning rates
# (with the paper's SGD grafting the vectors get SGD's step and diverge at
# 1e-2, see test_sgd_grafting_is_sgd_on_vectors); Eva-s with a running average
# of its statistics: with the paper's running sum, mu grows like t^4 and Eva-s
# stops moving along s_1 o s_2, where the matrix parabola's remaining error
# lies (see eva_optax.eva_s).
OPTIMIZERS = (
    {"opt_name": "eva_optax.eva", "opt_kwargs": {"learning_rate": 1e-3}},
    {"opt_name": "eva_optax.eva_f", "opt_kwargs": {"learning_rate": 1e-3}},
    {"opt_name": "eva_optax.kfac", "opt_kwargs": {"learning_rate": 1e-3}},
    {"opt_name": "eva_optax.foof", "opt_kwargs": {"learning_rate": 1e-3}},
    {"opt_name": "eva_optax.eva_s",
     "opt_kwargs": {"learning_rate": 1e-2, "graft": "adagrad",
                    "stat_decay": 0.05}},
    {"opt_name": "eva_optax.shampoo",
     "opt_kwargs": {"learning_rate": 1e-2, "graft": "adagrad"}},
)
for _opt in OPTIMIZERS:
  _opt.update(wrapper_name=None, wrapper_kwargs=None)

# ----------------------------------------------------------------------------
# The battery's tests and the parameters optax runs each with.

TARGETS = {
    "parabola": battery._setup_parabola,
    "rosenbrock": battery._setup_rosenbrock,
    "matrix_parabola": battery._setup_matrix_parabola,
    "mixed_tensor_target": battery._setup_mixed_tensor_target,
}
CASES = (
    [("test_optimizers_accept_extra_args", "", {"wrap": False})]
    + [("test_optimizers", name, {"target": t, "dtype": "float32"})
       for name, t in TARGETS.items()]
    + [("test_optimizers_can_be_wrapped_in_inject_hyperparams", "", {})]
    + [("test_preserve_dtype", d, {"dtype": d}) for d in ("bfloat16", "float32")]
    + [("test_gradient_accumulation", d, {"dtype": d})
       for d in ("bfloat16", "float32")]
    + [("test_state_shape_dtype_shard_stability", d.__name__, {"dtype": d})
       for d in (battery.jnp.float16, battery.jnp.bfloat16, battery.jnp.float32,
                 battery.jnp.float64)]
    + [("test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such",
        "", {})]
)


def _battery_test(name: str) -> Callable[..., None]:
  """The undecorated test function (absl keeps it as ``__wrapped__``)."""
  return getattr(battery.ContribTest, name + "0").__wrapped__


def test_battery_is_the_installed_optax_file():
  assert battery.__file__.startswith(optax.__path__[0])
  names = {c[0] for c in CASES}
  generated = {n.rstrip("0123456789") for n in dir(battery.ContribTest)
               if n.startswith("test_")}
  assert names == generated, "optax's battery has tests this file does not run"


FULL = ("eva", "eva_s", "shampoo")
FACTORY_CASES = ("test_optimizers_accept_extra_args",
                 "test_optimizers_can_be_wrapped_in_inject_hyperparams",
                 "test_optimizers_accept_learning_rate_schedule_if_type_"
                 "annotated_as_such")
RUNS = [(opt, case) for opt in OPTIMIZERS for case in CASES
        if opt["opt_name"].split(".")[1] in FULL or case[0] in FACTORY_CASES]


@pytest.mark.parametrize(
    "opt,test_name,params", [(o, c[0], c[2]) for o, c in RUNS],
    ids=[f"{o['opt_name'].split('.')[1]}-{c[0].removeprefix('test_')[:40]}"
         f"-{c[1]}".rstrip("-") for o, c in RUNS])
def test_contrib_battery(opt, test_name, params, monkeypatch):
  monkeypatch.setattr(battery, "_get_opt_factory", FACTORIES.__getitem__)
  case = battery.ContribTest(methodName="runTest")
  try:
    _battery_test(test_name)(case, **opt, **params)
  except unittest.SkipTest as e:  # a skip would hide a failure: none is expected
    pytest.fail(f"optax's battery skipped itself: {e}")


@pytest.mark.parametrize("name", ["eva_f", "kfac", "foof"])
def test_layerwise_family_is_eva_on_battery_parameters(name):
  # On parameters without layers, every layer-wise optimizer is Eva's chain:
  # the same state structure and, step by step, the same updates.
  params, _, objective = battery._setup_mixed_tensor_target(jnp.float32)
  txs = [FACTORIES[f"eva_optax.{n}"](learning_rate=1e-2, weight_decay=1e-3)
         for n in ("eva", name)]
  states = [tx.init(params) for tx in txs]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  p = params
  for _ in range(3):
    grads = jax.grad(objective)(p)
    outs = [tx.update(grads, st, p) for tx, st in zip(txs, states)]
    (u, states[0]), (v, states[1]) = outs
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
      np.testing.assert_array_equal(a, b)
    p = optax.apply_updates(p, u)


def _trajectory(tx, objective, params, steps):
  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      u, state = tx.update(jax.grad(objective)(params), state, params)
      params = optax.apply_updates(params, u)
      return (params, state), params
    return jax.lax.scan(step, (params, tx.init(params)), length=steps)[1]
  return np.asarray(run(params))


@pytest.mark.parametrize("name", ["eva_s", "shampoo"])
def test_sgd_grafting_is_sgd_on_vectors(name):
  # Why the battery runs Eva-s and Shampoo with AdaGrad grafting at lr 1e-2:
  # Rosenbrock's parameters are a vector, which they do not precondition, so
  # with the paper's SGD grafting it gets heavy-ball SGD's step, unstable at
  # lr 1e-2 (curvature ~1000); AdaGrad grafting's steps are ~lr per coordinate.
  params, _, objective = battery._setup_rosenbrock(jnp.float32)
  factory = getattr(eva_optax, name)
  sgd = _trajectory(optax.sgd(1e-2, momentum=0.9), objective, params, 100)
  grafted_sgd = _trajectory(factory(1e-2), objective, params, 100)
  # A vector is not preconditioned, and grafting it to its own norm multiplies
  # it by |g| / |g| = 1 exactly: bit for bit SGD (which the unstable steps
  # would amplify any rounding difference of, so no tolerance).
  np.testing.assert_array_equal(grafted_sgd[:20], sgd[:20])
  assert np.max(np.abs(grafted_sgd[-1])) > 1e6      # diverged (then skipped)
  adagrad = _trajectory(factory(1e-2, graft="adagrad"), objective, params, 100)
  assert np.all(np.abs(adagrad) < 1.5)
  assert np.linalg.norm(adagrad[-1] - 1.0) < 0.5 * np.linalg.norm(params - 1.0)
