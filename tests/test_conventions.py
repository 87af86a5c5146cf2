"""optax's conventions on the six aliases (issue 11, part 3).

One positional order, optax's hyperparameter types, one state structure
whatever the hyperparameters' types, ``weight_decay_mask`` as
``optax.adamw(mask=...)``, ``momentum=None`` as ``optax.sgd``, ``mu_dtype``,
and errors that name the argument the user wrote. The chain's semantics are
checked against optax's own transformations (``add_decayed_weights``,
``trace``) on an identity preconditioner; each alias is checked to forward
its options to that chain.
"""

from __future__ import annotations

import inspect
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from conftest import MLP
from conftest import float32_tol
from conftest import regression_batch

ALIASES = ("eva", "eva_f", "kfac", "foof", "eva_s", "shampoo")
STATISTICS = {"eva": "vectors", "eva_f": "vectors", "kfac": "factors",
              "foof": "factors"}
POSITIONAL = ("learning_rate", "momentum", "weight_decay", "damping",
              "stat_decay")


def _signature(fn):
  return inspect.signature(fn, eval_str=True)


# ----------------------------------------------------------------------------
# Signatures.


@pytest.mark.parametrize("name", ALIASES)
def test_one_positional_order(name):
  params = list(_signature(getattr(eva_optax, name)).parameters.values())
  positional = [p.name for p in params
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
  want = list(POSITIONAL)
  if name == "shampoo":   # its ridge takes damping's place
    want[3] = "matrix_eps"
  assert positional == want
  assert all(p.kind is inspect.Parameter.KEYWORD_ONLY
             for p in params[len(want):])
  with pytest.raises(TypeError):
    getattr(eva_optax, name)(0.1, 0.9, 0.0, 0.03, 0.5, 1)


@pytest.mark.parametrize("name", ALIASES)
def test_hyperparameters_typed_like_optax(name):
  alias = _signature(getattr(eva_optax, name)).parameters
  assert alias["learning_rate"].annotation == optax.ScalarOrSchedule
  assert alias["weight_decay"].annotation == optax.ScalarOrSchedule
  assert alias["momentum"].annotation == (chex.Numeric | None)
  scale_by = _signature(getattr(eva_optax, f"scale_by_{name}")).parameters
  for params in (alias, scale_by):
    for p in params.values():
      # Not hyperparameters: a mask and a dtype (Any in optax too), and the
      # capture's layer views.
      if p.name not in ("weight_decay_mask", "mu_dtype", "layer_views"):
        assert p.annotation is not Any, (name, p.name)
      assert p.annotation is not inspect.Parameter.empty, (name, p.name)
  damping = "matrix_eps" if name == "shampoo" else "damping"
  want = chex.Numeric if name == "shampoo" else optax.ScalarOrSchedule
  assert scale_by[damping].annotation == want


@pytest.mark.parametrize("name", ALIASES)
def test_scale_by_docstring_relates_its_scale_to_the_alias(name):
  doc = getattr(eva_optax, f"scale_by_{name}").__doc__
  assert "How the scale relates to the alias" in doc
  assert f":func:`eva_optax.{name}`" in doc


@pytest.mark.parametrize("factory,kwargs,argument", [
    (eva_optax.kfac, {"inverse_every": 0}, "inverse_every"),
    (eva_optax.scale_by_kfac, {"inverse_every": 0}, "inverse_every"),
    (eva_optax.foof, {"inverse_every": 0}, "inverse_every"),
    (eva_optax.scale_by_foof, {"inverse_every": 0}, "inverse_every"),
    (eva_optax.eva, {"stats_every": 0}, "stats_every"),
    (eva_optax.eva_f, {"damping": float("inf")}, "damping"),
    (eva_optax.eva, {"momentum": 1.5}, "momentum"),
    (eva_optax.eva_s, {"mu_dtype": "int32"}, "mu_dtype"),
    (eva_optax.shampoo, {"weight_decay": -1.0}, "weight_decay"),
    (eva_optax.foof, {"weight_decay_mask": "kernel"}, "weight_decay_mask"),
    (eva_optax.kfac, {"momentum": optax.constant_schedule(0.9)}, "momentum"),
])
def test_errors_name_the_argument_the_user_wrote(factory, kwargs, argument):
  args = () if factory.__name__.startswith("scale_by") else (0.1,)
  with pytest.raises((ValueError, TypeError), match=argument) as info:
    factory(*args, **kwargs)
  assert "refresh_every" not in str(info.value)


# ----------------------------------------------------------------------------
# One state structure.


def _mlp_params():
  x, _ = regression_batch(batch=4)
  return jax.eval_shape(MLP().init, jax.random.PRNGKey(0), x)["params"]


@pytest.mark.parametrize("name", ALIASES)
def test_one_state_structure_whatever_the_hyperparameter_types(name):
  params = _mlp_params()   # shapes only: the structures are all that matter
  factory = getattr(eva_optax, name)
  schedule = optax.linear_schedule(0.1, 0.01, 10)
  variants = {
      "python numbers": factory(0.1, 0.9, 0.0),
      "nonzero decay": factory(0.1, 0.9, 1e-4),
      "arrays": factory(jnp.asarray(0.1), jnp.asarray(0.9), jnp.asarray(0.0)),
      "schedules": factory(schedule, 0.9, optax.constant_schedule(1e-4)),
      "zero momentum": factory(0.1, 0.0, 0.0),
  }
  init = lambda tx: jax.eval_shape(tx.init, params)
  structures = {k: jax.tree.structure(init(tx)) for k, tx in variants.items()}
  injected = init(optax.inject_hyperparams(factory)(0.1, 0.9, 0.0))
  structures["inject_hyperparams"] = jax.tree.structure(injected.inner_state)
  assert len(set(structures.values())) == 1, structures
  # momentum=None (optax.sgd's convention) legitimately drops the buffer.
  without = jax.tree.structure(init(factory(0.1, None)))
  assert without.num_leaves < structures["python numbers"].num_leaves


# ----------------------------------------------------------------------------
# The chain's semantics against optax's own transformations.


def _tree(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  make = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return {"layer": {"kernel": make(3, 2), "bias": make(2)},
          "norm": {"scale": make(2)}}


def _chain(**kwargs):
  return eva_optax.training_chain(optax.identity(), 0.1, **kwargs)


def _steps(tx, grads, params):
  state = tx.init(params)
  outs = []
  for g in grads:
    u, state = tx.update(g, state, params)
    outs.append(u)
  return outs, state


def _assert_trees_close(a, b, magnitude, ops, dtype=jnp.float32):
  """Two evaluations of the same elementwise chain (decay, trace, scale): each
  entry within ``ops`` roundings of ``dtype`` of the exact one, relative to
  ``magnitude`` (the same chain on absolute values), so the two differ by at
  most twice that (:func:`~oracles.assert_float32_twins`)."""
  chex.assert_trees_all_equal_structs(a, b)
  eps = float(jnp.finfo(dtype).eps)
  for x, y, m in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(magnitude)):
    err = np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))
    assert np.all(err <= 2 * ops * eps * np.asarray(m, np.float64)), np.max(err)


def _abs(tree):
  return jax.tree.map(jnp.abs, tree)


def _magnitude(tx, grads, params):
  """``tx``'s outputs on absolute gradients and parameters, absolute: the
  magnitude of the terms of each entry (the chains combine them linearly)."""
  outs, _ = _steps(tx, [_abs(g) for g in grads], _abs(params))
  return [_abs(u) for u in outs]


_MASKS = {
    "pytree": {"layer": {"kernel": True, "bias": False}, "norm": {"scale": False}},
    "prefix": {"layer": True, "norm": False},
    "callable": lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    "array leaves": {"layer": {"kernel": jnp.asarray(True), "bias": jnp.asarray(False)},
                     "norm": {"scale": jnp.asarray(False)}},
}


@pytest.mark.parametrize("mask", list(_MASKS))
def test_weight_decay_mask_matches_optax(mask):
  params, grads = _tree(0), [_tree(1), _tree(2)]
  got, _ = _steps(_chain(momentum=0.5, weight_decay=0.1,
                         weight_decay_mask=_MASKS[mask]), grads, params)
  optax_mask = _MASKS["pytree" if mask == "array leaves" else mask]
  reference = optax.chain(optax.add_decayed_weights(0.1, optax_mask),
                          optax.trace(0.5), optax.scale(-0.1))
  want, _ = _steps(reference, grads, params)
  # Per step: decay (2 roundings), trace (2), scale (1).
  _assert_trees_close(got, want, _magnitude(reference, grads, params), 5 * len(grads))
  # The mask decides: a leaf it leaves out is not decayed at all.
  plain, _ = _steps(_chain(momentum=0.5), grads, params)
  np.testing.assert_array_equal(got[1]["norm"]["scale"], plain[1]["norm"]["scale"])
  assert not np.allclose(got[1]["layer"]["kernel"], plain[1]["layer"]["kernel"])


def test_weight_decay_mask_that_does_not_match_params():
  tx = _chain(weight_decay=0.1, weight_decay_mask={"other": True})
  params = _tree()
  with pytest.raises(ValueError, match="weight_decay_mask"):
    tx.update(params, tx.init(params), params)


def test_zero_weight_decay_needs_no_params():
  grads = _tree(1)
  tx = _chain(weight_decay=0.0)
  u, _ = tx.update(grads, tx.init(grads))        # no params: as today
  _assert_trees_close(u, jax.tree.map(lambda g: -0.1 * g, grads),   # one product each
                      jax.tree.map(lambda g: 0.1 * jnp.abs(g), grads), 1)
  tx = _chain(weight_decay=jnp.asarray(0.0))     # an array needs params
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(grads))


def test_weight_decay_schedule():
  params, grads = _tree(0), [_tree(1), _tree(2), _tree(3)]
  schedule = optax.linear_schedule(0.1, 0.0, 2)
  got, _ = _steps(_chain(momentum=None, weight_decay=schedule), grads, params)
  for step, (u, g) in enumerate(zip(got, grads)):
    want = jax.tree.map(lambda g, p: -0.1 * (g + schedule(step) * p), g, params)
    # g + s p and the product: 3 roundings each, + the schedule's value.
    magnitude = jax.tree.map(lambda g, p: 0.1 * (jnp.abs(g) + schedule(step) * jnp.abs(p)),
                             g, params)
    _assert_trees_close(u, want, magnitude, 4)


def test_momentum_none_is_optax_sgd():
  params, grads = _tree(0), [_tree(1), _tree(2)]
  got, state = _steps(_chain(momentum=None), grads, params)
  want, _ = _steps(optax.sgd(0.1, momentum=None), grads, params)
  magnitude = [jax.tree.map(lambda g: 0.1 * jnp.abs(g), g) for g in grads]
  _assert_trees_close(got, want, magnitude, 1)         # one product each
  assert not any(isinstance(s, optax.TraceState) for s in state)
  zero, state0 = _steps(_chain(momentum=0.0), grads, params)
  _assert_trees_close(zero, got, magnitude, 1)         # 0: same updates (0 m + g is exact) ...
  assert any(isinstance(s, optax.TraceState) for s in state0)  # ... a buffer


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_matches_optax_sgd(nesterov):
  params, grads = _tree(0), [_tree(1), _tree(2), _tree(3)]
  got, _ = _steps(_chain(momentum=0.9, nesterov=nesterov), grads, params)
  reference = optax.sgd(0.1, momentum=0.9, nesterov=nesterov)
  want, _ = _steps(reference, grads, params)
  # Per step: the trace (2 roundings; Nesterov 2 more) and the scale (1).
  _assert_trees_close(got, want, _magnitude(reference, grads, params), 5 * len(grads))


@pytest.mark.parametrize("param_dtype,mu_dtype", [
    (jnp.float32, "bfloat16"), (jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, "float32"), (jnp.bfloat16, None)])
def test_mu_dtype(param_dtype, mu_dtype):
  params = _tree(0, param_dtype)
  grads = [_tree(1, param_dtype), _tree(2, param_dtype)]
  got, state = _steps(_chain(momentum=0.9, mu_dtype=mu_dtype), grads, params)
  buffer = next(s for s in state if isinstance(s, optax.TraceState)).trace
  want = param_dtype if mu_dtype is None else jnp.dtype(mu_dtype)
  assert all(x.dtype == want for x in jax.tree.leaves(buffer))
  assert all(u.dtype == param_dtype for u in jax.tree.leaves(got[-1]))
  reference = optax.sgd(0.1, momentum=0.9, accumulator_dtype=mu_dtype)
  ref, _ = _steps(reference, grads, params)
  # The buffer is rounded to bfloat16 (or the parameters are bfloat16): per
  # step the trace, its storage and the scale, in bfloat16's epsilon.
  magnitude = _magnitude(optax.sgd(0.1, momentum=0.9), grads, params)
  _assert_trees_close(got, ref, magnitude, 4 * len(grads), dtype=jnp.bfloat16)


# ----------------------------------------------------------------------------
# Each alias forwards the options to that chain.


@pytest.mark.parametrize("name", ALIASES)
def test_alias_forwards_mask_momentum_and_mu_dtype(name):
  # Leaves named "w" and "b": Eva-s and Shampoo precondition "w" (rank 2); for
  # the layer-wise optimizers there is no layer (no "kernel"), so they pass the
  # gradient through with stats={} (what value_and_grad gives for such a
  # model). Either way the decay is added after preconditioning, so its effect
  # on the update is -lr * weight_decay * params where the mask says so.
  rng = np.random.default_rng(0)
  params = {"Dense_0": {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
                        "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}}
  grads = jax.tree.map(lambda p: p * 0.5 + 0.25, params)
  extra = {"stats": {}} if name in STATISTICS else {}
  factory = getattr(eva_optax, name)
  no_bias = lambda p: jax.tree.map(lambda leaf: leaf.ndim > 1, p)

  def first_update(tx):
    return tx.update(grads, tx.init(params), params, **extra)

  plain, _ = first_update(factory(0.1, None, 0.0))
  decayed, state = first_update(factory(0.1, None, 0.5,
                                        weight_decay_mask=no_bias))
  assert not any(isinstance(s, optax.TraceState) for s in state)
  # decayed = -0.1 (P + 0.5 w), plain = -0.1 P: two and three roundings of
  # their own, relative to 0.1 |P| + 0.05 |w|.
  w = np.asarray(params["Dense_0"]["w"], np.float64)
  size = np.abs(np.asarray(plain["Dense_0"]["w"], np.float64)) + 0.05 * np.abs(w)
  err = np.abs(np.asarray(decayed["Dense_0"]["w"], np.float64)
               - np.asarray(plain["Dense_0"]["w"], np.float64) - (-0.1 * 0.5 * w))
  assert np.all(err <= float32_tol(1.0, 5) * size)
  np.testing.assert_array_equal(decayed["Dense_0"]["b"], plain["Dense_0"]["b"])
  with_momentum, state = first_update(factory(0.1, 0.9, 0.0, mu_dtype="bfloat16"))
  buffer = next(s for s in state if isinstance(s, optax.TraceState)).trace
  assert all(b.dtype == jnp.bfloat16 for b in jax.tree.leaves(buffer))
  # First step: the buffer was zero (0.9 * 0 + u is exact): the same product.
  _assert_trees_close(with_momentum, plain, _abs(plain), 1)
