"""Eva-s and Shampoo numerics and run-time safety (issue 8, point 8).

Each case has a float64 NumPy reference written here, independently of the
library: finite gradients at any scale give finite updates in the reference's
direction, a rank-one gradient does not cancel, non-finite gradients and
invalid run-time hyperparameters skip the step (zero update, nothing folded, a
counter says so), a state from another model raises a clear error, and the
state survives Flax NNX's ``nnx.Optimizer``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import eva_optax
from conftest import assert_propagated
from conftest import float32_tol
from conftest import reference_tol

GAMMA = 0.03
EPS = 1e-4    # Shampoo's relative ridge in the reference comparisons


def _cos(a, b):
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _cos_min(rel_tol):
  """The least cosine of a result within ``rel_tol`` (relative) of a reference:
  the angle's sine is at most rel_tol."""
  return float(np.sqrt(1.0 - min(rel_tol, 1.0) ** 2))


def _cos_bound(name, t):
  """:func:`_cos_min` of the float32 bound of the first step on ``t``
  (reference_tol: conditioning and roundings, the same direction as the
  references here), + the library's scaling of t by its max-abs and its
  log-space norms at extreme scales (4 roundings)."""
  damping = GAMMA if name == "eva_s" else EPS
  t = np.asarray(t, np.float64)
  return _cos_min(reference_tol(name, {"w": t}, None, damping)["w"] + float32_tol(1.0, 4))


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x, np.float64))))
             for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# float64 references (first step: the statistics are the gradient's own).


def _ref_eva_s(t, damping):
  """``(u u^T + gamma I)^{-1} vec(T)``, ``u`` from ``T``'s mean vectors, float64.

  Sherman-Morrison with the norms in log space, so that it holds at any scale.
  """
  t = np.asarray(t, np.float64)
  vs = [t.mean(axis=tuple(j for j in range(t.ndim) if j != i))
        for i in range(t.ndim)]
  units = [v / np.linalg.norm(v) for v in vs]
  u = units[0]
  for v in units[1:]:
    u = np.multiply.outer(u, v)
  log_mu = 2 * sum(np.log(np.linalg.norm(v)) for v in vs)
  keep = 1.0 / (1.0 + np.exp(log_mu - np.log(damping)))   # gamma / (gamma + mu)
  c = np.sum(t * u)
  return t - (1.0 - keep) * c * u


def _ref_shampoo(t, eps=EPS):
  """``L^{-1/4} G R^{-1/4}`` of one block, statistics of ``G / max|G|``."""
  g = np.asarray(t, np.float64).reshape(-1, t.shape[-1])
  g = g / np.abs(g).max()

  def root(m):
    d, q = np.linalg.eigh(m)
    d = np.maximum(d, 0.0)
    return (q * (d + eps * d.max()) ** -0.25) @ q.T

  return (root(g @ g.T) @ g @ root(g.T @ g)).reshape(t.shape)


OPTIMIZERS = {
    "eva_s": (lambda **kw: eva_optax.scale_by_eva_s(GAMMA, **kw),
              lambda t: _ref_eva_s(t, GAMMA)),
    "shampoo": (lambda **kw: eva_optax.scale_by_shampoo(
        EPS, start_preconditioning_step=0, **kw), _ref_shampoo),
}


# The kernel shape of each optimizer's tests, as in test_eva_s.py and
# test_shampoo.py: eager updates of one shape share their compiled primitives.
SHAPES = {"eva_s": (5, 3), "shampoo": (6, 4)}


def _first_update(tx, grads):
  # Eagerly, as the other tests here: compiled primitives are shared by all
  # the tests (one jit per test would cost seconds each); NNX's test jits.
  return tx.update(grads, tx.init(grads))


# ----------------------------------------------------------------------------
# Finite gradients of any scale.

@pytest.mark.parametrize("name,scale", [("eva_s", 1.0), ("eva_s", 1e15),
                                        ("shampoo", 1.0), ("shampoo", 1e19)])
def test_scaled_gradient_keeps_reference_direction(name, scale):
  make, ref = OPTIMIZERS[name]
  t = np.random.default_rng(0).standard_normal(SHAPES[name]) + 0.5
  t = t.astype(np.float32)
  g = jnp.asarray(t * np.float32(scale))
  u, state = _first_update(make(), {"w": g})
  assert _finite(u) and _finite(state)
  assert int(state.skipped_count) == 0
  cos_min = _cos_bound(name, np.asarray(g))
  assert _cos(u["w"], ref(np.asarray(g))) > cos_min    # before the fix: NaN
  if name == "shampoo":   # scale-invariant: the direction of the unscaled case
    assert _cos(u["w"], ref(t)) > cos_min


class _ReluMLP(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.features)(x))
    return nn.Dense(self.features)(x)


@pytest.mark.parametrize("name,scale", [("eva_s", 1e8), ("shampoo", 1e12),
                                        ("shampoo", 1e15)])
def test_relu_mlp_with_scaled_inputs(name, scale):
  d_in, d_out = SHAPES[name]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((16, d_in)) + 0.5, jnp.float32)
  y = jnp.asarray(rng.standard_normal((16, d_out)), jnp.float32)
  model = _ReluMLP(d_out)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda p, x: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  grads = jax.jit(jax.grad(loss))(params, x * jnp.float32(scale))
  assert _finite(grads)
  make, ref = OPTIMIZERS[name]
  u, state = _first_update(make(), grads)
  assert _finite(u) and int(state.skipped_count) == 0   # before: NaN updates
  for layer in ("Dense_0", "Dense_1"):
    kernel = np.asarray(grads[layer]["kernel"])
    assert _cos(u[layer]["kernel"], ref(kernel)) > _cos_bound(name, kernel), layer


@pytest.mark.parametrize("mu_over_gamma", [9e7, 7e9])
def test_eva_s_rank_one_gradient_does_not_cancel(mu_over_gamma):
  # A batch of one: T = x d^T in float64, then rounded to float32. The float64
  # answer is T's own direction, (gamma / (gamma + mu)) T; the plain float32
  # closed form returned rounding noise (cosine -0.84 and -0.81 here).
  rng = np.random.default_rng(2)
  x, d = rng.standard_normal(5) + 1.0, rng.standard_normal(3) + 1.0
  t64 = np.outer(x, d)
  mu = np.prod([np.sum(v ** 2) for v in (t64.mean(1), t64.mean(0))])
  gamma = float(mu / mu_over_gamma)
  tx = eva_optax.scale_by_eva_s(gamma)
  u, _ = _first_update(tx, {"w": jnp.asarray(t64, jnp.float32)})
  ref = _ref_eva_s(t64, gamma)
  assert _cos(ref, t64) > 1 - 1e-12           # the reference is T's direction (float64)
  # Here the closed form is ill-posed (a residual of rounding noise): the
  # library returns the exact direction of a gradient within 4 eps32 |T| of T
  # (T rounded to float32: half of one more), then scales it back (max-abs,
  # the graft's two norms of t.size terms).
  size = t64.size
  assert _cos(u["w"], ref) > _cos_min(float32_tol(1.0, 4.5 + 2 * size + 2))
  np.testing.assert_allclose(np.linalg.norm(u["w"]), np.linalg.norm(t64),   # SGD graft:
                             rtol=float32_tol(1.0, 2 * size + 2))   # the gradient's norm


# ----------------------------------------------------------------------------
# Steps that must be skipped.


def _params(name):
  shape = SHAPES[name]
  rng = np.random.default_rng(3)
  return {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal(shape), jnp.float32),
                      "bias": jnp.zeros(shape[-1:], jnp.float32)}}


def _grad_steps(name, n, seed=4):
  shape = SHAPES[name]
  rng = np.random.default_rng(seed)
  return [{"Dense_0": {"kernel": jnp.asarray(rng.standard_normal(shape) + 0.5,
                                             jnp.float32),
                       "bias": jnp.asarray(rng.standard_normal(shape[-1:]),
                                           jnp.float32)}}
          for _ in range(n)]


def _alias(name, **kwargs):
  """The alias without momentum, so that a skipped step moves nothing."""
  if name == "eva_s":
    return eva_optax.eva_s(0.1, None, damping=kwargs.pop("damping", GAMMA),
                           **kwargs)
  return eva_optax.shampoo(0.1, None, start_preconditioning_step=0, **kwargs)


def _train(tx, grads, params):
  state = tx.init(params)
  update = tx.update
  updates = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
  return params, state, updates


def _inner(state):
  """The preconditioner's state inside an alias (or an injected alias)."""
  state = getattr(state, "inner_state", state)
  return state[0]


@pytest.mark.parametrize("name", ["eva_s", "shampoo"])
@pytest.mark.parametrize("where", ["kernel", "bias"])
def test_nonfinite_gradient_skips_the_step(name, where):
  params, good = _params(name), _grad_steps(name, 3)
  bad = jax.tree.map(lambda x: x, good[1])
  bad["Dense_0"][where] = bad["Dense_0"][where].at[0].set(jnp.nan)
  p_bad, s_bad, u_bad = _train(_alias(name), [good[0], bad, good[2]], params)
  p_ref, s_ref, _ = _train(_alias(name), [good[0], good[2]], params)
  assert _finite(p_bad) and _finite(s_bad)
  for leaf in jax.tree.leaves(u_bad[1]):    # zero update
    np.testing.assert_array_equal(leaf, 0.0)
  pre = _inner(s_bad)
  assert int(pre.skipped_count) == 1 and int(pre.stats_count) == 2
  assert int(pre.nonfinite_count) == 1 and int(pre.count) == 3
  # Nothing of the bad step was folded: the statistics are the clean run's,
  # the same operations on the same gradients (bit for bit).
  stats = (lambda s: s.vectors) if name == "eva_s" else (lambda s: s.blocks)
  for a, b in zip(jax.tree.leaves(stats(pre)), jax.tree.leaves(stats(_inner(s_ref)))):
    np.testing.assert_array_equal(a, b)


_BAD_DAMPING = {
    "array_zero": jnp.asarray(0.0),
    "array_inf": jnp.asarray(jnp.inf),
    "schedule_zero_at_step_1": lambda count: jnp.where(count == 1, 0.0, GAMMA),
}


@pytest.mark.parametrize("case", list(_BAD_DAMPING))
def test_eva_s_invalid_damping_skips_the_step(case):
  damping = _BAD_DAMPING[case]
  params, grads = _params("eva_s"), _grad_steps("eva_s", 3)
  p, s, u = _train(_alias("eva_s", damping=damping), grads, params)
  pre = _inner(s)
  assert _finite(p) and _finite(s)
  if case.startswith("array"):      # every step is invalid: nothing moves
    assert int(pre.invalid_hparam_count) == 3 and int(pre.stats_count) == 0
    for got, want in zip(jax.tree.leaves(p), jax.tree.leaves(params)):
      np.testing.assert_array_equal(got, want)
    return
  assert int(pre.invalid_hparam_count) == 1 and int(pre.stats_count) == 2
  assert int(pre.skipped_count) == 0
  for leaf in jax.tree.leaves(u[1]):
    np.testing.assert_array_equal(leaf, 0.0)
  # The state stays usable: the statistics are those of steps 0 and 2.
  # Means of 3 entries (scaled by the max-abs: + 2) summed over the two steps.
  kernels = [np.asarray(grads[i]["Dense_0"]["kernel"]) for i in (0, 2)]
  assert_propagated(pre.vectors["Dense_0"]["kernel"]["axis_0"],
                    lambda k0, k2: k0.mean(axis=1) + k2.mean(axis=1),
                    *[(k, k.shape[1] + 2 + 2) for k in kernels])


@pytest.mark.parametrize("name,hparam,bad_values", [
    ("eva_s", "damping", (-0.03, float("nan"), 0.0)),
    ("eva_s", "stat_decay", (1.5, float("nan"))),
    ("shampoo", "stat_decay", (-0.5,)),
    ("shampoo", "matrix_eps", (0.0, float("inf")))])
def test_injected_invalid_hyperparameter_skips_the_step(name, hparam, bad_values):
  factory = eva_optax.eva_s if name == "eva_s" else eva_optax.shampoo
  good = {"damping": GAMMA} if name == "eva_s" else {"matrix_eps": EPS}
  good["stat_decay"] = 0.9
  tx = optax.inject_hyperparams(factory)(learning_rate=0.1, momentum=None,
                                         **good)
  params = _params(name)
  grads = _grad_steps(name, len(bad_values) + 2)
  state = tx.init(params)
  update = tx.update
  values = [good[hparam], *bad_values, good[hparam]]
  updates = []
  for g, value in zip(grads, values):
    state.hyperparams[hparam] = jnp.asarray(value)
    u, state = update(g, state, params)
    updates.append(u)
  pre = _inner(state)
  n_bad = len(bad_values)
  assert int(pre.invalid_hparam_count) == n_bad and int(pre.stats_count) == 2
  for u in updates[1:-1]:
    for leaf in jax.tree.leaves(u):
      np.testing.assert_array_equal(leaf, 0.0)
  assert _finite(updates[-1]) and _finite(state)
  assert float(jnp.max(jnp.abs(updates[-1]["Dense_0"]["kernel"]))) > 0


# ----------------------------------------------------------------------------
# A state from another model, and Flax NNX.


@pytest.mark.parametrize("name", ["eva_s", "shampoo"])
def test_state_of_another_model_raises_naming_leaf_and_shapes(name):
  tx = _alias(name)
  state = tx.init({"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}})
  other = {"Dense_0": {"kernel": jnp.ones((5, 3)), "bias": jnp.ones(3)}}
  with pytest.raises(ValueError, match=r"Dense_0.*kernel.*\(5, 3\).*\(4, 3\)"):
    tx.update(other, state, other)


@pytest.mark.parametrize("name", ["eva_s", "shampoo"])
def test_survives_nnx_optimizer(name):
  # One layer: a kernel (preconditioned, its per-axis state) and a bias (not).
  model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, getattr(eva_optax, name)(0.05), wrt=nnx.Param)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((8, 4)), jnp.float32)
  y = jnp.sum(x, axis=1, keepdims=True) * jnp.ones((1, 2))

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(3)]  # before: fails at 2
  assert losses[-1] < losses[0]
  assert int(optimizer.step[...]) == 3
