"""eva_optax.adaptive: the exact quadratic model, its 2x2 solve, the
Levenberg-Marquardt rule, the safe steps, and the optax contract.

The references are independent of the library: a dense float64 GGN built from
the full Jacobian (``jax.jacrev``) and the Hessian of optax's own losses in the
outputs (``jax.hessian``), and NumPy solves of the exact quadratic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import eva_optax
from eva_optax._src.wrappers import adaptive as adaptive_lib
from eva_optax._src.wrappers import quadratic_model
from adaptive_problems import linear_problem
from adaptive_problems import tiny_problem


# Each declared loss, as the user writes it with optax, on outputs y and targets t.
OPTAX_LOSSES = {
    "mse": lambda y, t: jnp.mean(optax.squared_error(y, t)),
    "softmax_cross_entropy": lambda y, t: jnp.mean(
        optax.softmax_cross_entropy(y, t)),
    "sigmoid_cross_entropy": lambda y, t: jnp.mean(
        optax.sigmoid_binary_cross_entropy(y, t)),
}


def _targets(loss, shape, rng):
  if loss == "softmax_cross_entropy":
    return jax.nn.one_hot(rng.integers(0, shape[-1], size=shape[:-1]), shape[-1])
  if loss == "sigmoid_cross_entropy":
    return jnp.asarray(rng.integers(0, 2, size=shape), jnp.float64)
  return jnp.asarray(rng.normal(size=shape))


def _dense_ggn(model, params, x, loss_of_outputs):
  """``J^T H J`` in float64, from the full Jacobian and the dense output Hessian."""
  flat, unravel = ravel_pytree(params)
  f = lambda w: model.apply({"params": unravel(w)}, x).reshape(-1)
  jac = np.asarray(jax.jacrev(f)(flat))                       # (n_out, n_params)
  y = model.apply({"params": params}, x)
  hess = jax.hessian(lambda o: loss_of_outputs(o.reshape(y.shape)))(y.reshape(-1))
  return jac.T @ np.asarray(hess) @ jac, unravel


@pytest.mark.parametrize("loss", sorted(OPTAX_LOSSES) + ["callable"])
def test_gram_equals_dense_float64_ggn(loss):
  with jax.enable_x64(True):
    model, params, x, rng = tiny_problem(jnp.float64, out=4)
    y = model.apply({"params": params}, x)
    name = "softmax_cross_entropy" if loss == "callable" else loss
    t = _targets(name, y.shape, rng)
    user_loss = lambda o: OPTAX_LOSSES[name](o, t)
    ggn, unravel = _dense_ggn(model, params, x, user_loss)
    n = ggn.shape[0]
    u, w = rng.normal(size=n), rng.normal(size=n)
    declared = user_loss if loss == "callable" else loss
    gram = quadratic_model.curvature_gram(
        lambda p: model.apply({"params": p}, x), params, [unravel(u), unravel(w)],
        declared)
    ref = np.array([[u @ ggn @ u, u @ ggn @ w], [w @ ggn @ u, w @ ggn @ w]])
    np.testing.assert_allclose(np.asarray(gram), ref, rtol=1e-10, atol=1e-14)
    if loss == "mse":
      # A sum over the 4 features and a mean over the batch (or optax.l2_loss,
      # 0.5) is loss_scale times the mean: its GGN is 4 (0.5) times the dense one.
      for scale in (4.0, 0.5):
        scaled = quadratic_model.curvature_gram(
            lambda p: model.apply({"params": p}, x), params,
            [unravel(u), unravel(w)], "mse", loss_scale=scale)
        np.testing.assert_allclose(np.asarray(scaled), scale * ref, rtol=1e-10,
                                   atol=1e-14)
  # And in float32 (the library's working precision for float32 models).
  model, params32, x32, _ = tiny_problem(jnp.float32, out=4)
  t32 = jnp.asarray(np.asarray(t), jnp.float32)
  declared = (lambda o: OPTAX_LOSSES[name](o, t32)) if loss == "callable" else loss
  u32, w32 = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), unravel(v))
              for v in (u, w))
  gram32 = quadratic_model.curvature_gram(
      lambda p: model.apply({"params": p}, x32), params32, [u32, w32], declared)
  assert gram32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(gram32), ref, rtol=2e-4, atol=1e-7)


# ----------------------------------------------------------------------------
# The 2x2 solve and the Levenberg-Marquardt rule on an exact quadratic.


def _scale_by_matrix(p_mat):
  """A fixed preconditioner ``d = P vec(g)`` (an arbitrary positive definite P)."""
  def update(updates, state, params=None):
    del params
    g = updates["w"]
    return {"w": (jnp.asarray(p_mat, jnp.float32) @ g.reshape(-1)).reshape(g.shape)}, state
  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def test_step_is_the_exact_minimizer_in_span_of_d_and_p():
  outputs_fn, value_fn, hess, rng = linear_problem()
  r = rng.normal(size=(12, 12))
  tx = eva_optax.adaptive(_scale_by_matrix(r @ r.T + np.eye(12)), "mse",
                          initial_damping=0.05, adapt_every=None)
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, outputs_fn=outputs_fn))
  lam = 0.05
  for step in range(3):
    g = jax.grad(value_fn)(params)
    d = _scale_by_matrix(r @ r.T + np.eye(12)).update(g, None)[0]
    p = state.velocity
    u, state = update(g, state, params)
    # Reference: minimize g^T u + 1/2 u^T (H + lam I) u over u = V c, in float64.
    vmat = np.stack([np.asarray(d["w"], np.float64).ravel(),
                     np.asarray(p["w"], np.float64).ravel()], axis=1)
    gv = np.asarray(g["w"], np.float64).ravel()
    if step == 0:
      vmat = vmat[:, :1]   # p = 0: the model is 1-D
    m = vmat.T @ (hess + lam * np.eye(12)) @ vmat
    c = -np.linalg.solve(m, vmat.T @ gv)
    u_ref = vmat @ c
    np.testing.assert_allclose(np.asarray(u["w"]).ravel(), u_ref, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.coefficients)[:len(c)], c, rtol=2e-4)
    q_ref = gv @ u_ref + 0.5 * u_ref @ (hess + lam * np.eye(12)) @ u_ref
    np.testing.assert_allclose(float(state.quad_change), q_ref, rtol=1e-3)
    params = optax.apply_updates(params, u)
  assert int(state.curvature_count) == 0 and int(state.nonfinite_count) == 0


def test_sign_and_scale_of_the_direction_do_not_matter():
  outputs_fn, value_fn, _, rng = linear_problem()
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  results = []
  for direction in (optax.identity(), optax.scale(-3.0)):
    tx = eva_optax.adaptive(direction, "mse", adapt_every=None)
    p, s = params, tx.init(params)
    update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p,
                                                       outputs_fn=outputs_fn))
    for _ in range(3):
      u, s = update(jax.grad(value_fn)(p), s, p)
      p = optax.apply_updates(p, u)
    results.append(p["w"])
  np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rho,expected", [
    (-1.0, "up"), (0.1, "up"), (0.2499, "up"), (0.25, "same"), (0.5, "same"),
    (0.75, "same"), (0.7501, "down"), (3.0, "down"), (np.nan, "up"),
    (-np.inf, "up")])
def test_levenberg_marquardt_rule(rho, expected):
  omega = 0.95 ** 5
  lam = jnp.float32(1e-2)
  new = float(adaptive_lib.levenberg_marquardt(lam, jnp.float32(rho), omega, 0.25,
                                               0.75, 1e-8, 1e4))
  want = {"up": 1e-2 / omega, "same": 1e-2, "down": 1e-2 * omega}[expected]
  assert new == pytest.approx(want, rel=1e-6)


def test_levenberg_marquardt_bounds():
  lm = adaptive_lib.levenberg_marquardt
  assert float(lm(jnp.float32(1.0), jnp.float32(0.0), 0.5, 0.25, 0.75, 0.1, 1.5)) == 1.5
  assert float(lm(jnp.float32(0.15), jnp.float32(1.0), 0.5, 0.25, 0.75, 0.1, 1.5)) == \
      pytest.approx(0.1)


def test_damping_follows_rho_on_adaptation_steps():
  """Exact quadratic, exact model: rho = 1, so lambda falls by omega every
  ``adapt_every`` steps. An understated loss_scale makes the model promise too
  much: rho < 1/4 and lambda rises (or the step is rejected if the loss rose)."""
  outputs_fn, value_fn, _, rng = linear_problem()
  params0 = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  omega = 0.9 ** 3

  def run(loss_scale, steps):
    tx = eva_optax.adaptive(optax.identity(), "mse", loss_scale=loss_scale,
                            initial_damping=1e-2, adapt_every=3,
                            damping_decay=0.9)
    p, s = params0, tx.init(params0)
    update = jax.jit(lambda g, s, p, loss: tx.update(
        g, s, p, outputs_fn=outputs_fn, value_fn=value_fn, value=loss))
    lams, rhos = [], []
    for _ in range(steps):
      loss, g = jax.value_and_grad(value_fn)(p)
      u, s = update(g, s, p, loss)
      p = optax.apply_updates(p, u)
      lams.append(float(s.damping))
      rhos.append(float(s.rho))
    return lams, rhos, s

  lams, rhos, s = run(1.0, 4)   # adaptation steps 0 and 3
  np.testing.assert_allclose(lams, [1e-2 * omega] * 3 + [1e-2 * omega ** 2],
                             rtol=1e-5)
  assert rhos[0] == pytest.approx(1.0, abs=1e-3)
  assert int(s.rejected_count) == 0
  lams, rhos, s = run(0.02, 1)   # curvature understated 50x: overshoots
  assert rhos[0] < 0.25 and lams[0] == pytest.approx(1e-2 / omega, rel=1e-5)


# ----------------------------------------------------------------------------
# Safety: every bad case gives a finite step and is counted.


def _one_step(tx, params, grads, outputs_fn, value_fn):
  state = tx.init(params)
  u, state = jax.jit(lambda g, s, p: tx.update(
      g, s, p, outputs_fn=outputs_fn, value_fn=value_fn))(grads, state, params)
  new = optax.apply_updates(params, u)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
  return u, state


def test_safe_step_for_nonfinite_gradient():
  outputs_fn, value_fn, _, rng = linear_problem()
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  grads = {"w": jnp.full((4, 3), jnp.nan, jnp.float32)}
  u, s = _one_step(eva_optax.adaptive(optax.identity(), "mse"), params, grads,
                   outputs_fn, value_fn)
  assert float(jnp.abs(u["w"]).max()) == 0.0
  assert int(s.nonfinite_count) == 1 and int(s.curvature_count) == 0


def test_safe_step_for_nonfinite_curvature():
  _, value_fn, _, rng = linear_problem()
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  grads = jax.grad(value_fn)(params)
  bad_outputs = lambda p: jnp.sqrt(p["w"] - 100.0)   # NaN outputs and tangents
  u, s = _one_step(eva_optax.adaptive(optax.identity(), "mse"), params, grads,
                   bad_outputs, value_fn)
  assert float(jnp.abs(u["w"]).max()) == 0.0 and int(s.nonfinite_count) == 1


def test_safe_step_for_negative_curvature_and_zero_gradient():
  outputs_fn, value_fn, _, rng = linear_problem()
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  grads = jax.grad(value_fn)(params)
  concave = lambda o: -jnp.mean(o ** 2)   # H < 0: d^T C d < 0
  u, s = _one_step(eva_optax.adaptive(optax.identity(), concave), params, grads,
                   outputs_fn, value_fn)
  assert float(jnp.abs(u["w"]).max()) == 0.0 and int(s.curvature_count) == 1
  zero = jax.tree.map(jnp.zeros_like, grads)   # q = 0: nothing to gain
  u, s = _one_step(eva_optax.adaptive(optax.identity(), "mse"), params, zero,
                   outputs_fn, value_fn)
  assert float(jnp.abs(u["w"]).max()) == 0.0 and int(s.curvature_count) == 1


def test_rising_loss_is_rejected_and_counted():
  outputs_fn, value_fn, _, rng = linear_problem()
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  grads = jax.grad(value_fn)(params)
  # Curvature understated 100x: the step overshoots and the loss rises.
  tx = eva_optax.adaptive(optax.identity(), "mse", loss_scale=0.01,
                          initial_damping=1e-6)
  u, s = _one_step(tx, params, grads, outputs_fn, value_fn)
  assert float(jnp.abs(u["w"]).max()) == 0.0
  assert int(s.rejected_count) == 1 and float(s.rho) < 0
  assert float(s.damping) > 1e-6                  # raised
  assert float(jnp.abs(s.velocity["w"]).max()) == 0.0
  # reject_rising=False keeps the step (and still raises lambda).
  tx = eva_optax.adaptive(optax.identity(), "mse", loss_scale=0.01,
                          initial_damping=1e-6, reject_rising=False)
  u, s = _one_step(tx, params, grads, outputs_fn, value_fn)
  assert float(value_fn(optax.apply_updates(params, u))) > float(value_fn(params))
  assert int(s.rejected_count) == 0 and float(s.damping) > 1e-6


def test_parallel_directions_fall_back_to_the_1d_step():
  """One parameter: d and p are always parallel, the 2x2 system is singular."""
  x = jnp.linspace(-1.0, 1.0, 6)
  outputs_fn = lambda p: x * p["w"][0]
  value_fn = lambda p: jnp.mean((outputs_fn(p) - 2.0 * x) ** 2)
  tx = eva_optax.adaptive(optax.identity(), "mse", initial_damping=1e-8)
  params = {"w": jnp.zeros((1,), jnp.float32)}
  state = tx.init(params)
  update = jax.jit(lambda g, s, p, loss: tx.update(
      g, s, p, outputs_fn=outputs_fn, value_fn=value_fn, value=loss))
  for _ in range(3):
    loss, g = jax.value_and_grad(value_fn)(params)
    u, state = update(g, state, params, loss)
    params = optax.apply_updates(params, u)
  assert float(params["w"][0]) == pytest.approx(2.0, rel=1e-4)
  # Step 1 had p = 0 (not a failure); after the exact first step g = 0 (q = 0).
  assert int(state.curvature_count) >= 1 and np.isfinite(float(params["w"][0]))
