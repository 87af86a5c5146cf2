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
from conftest import EPS32
from conftest import float32_tol
from conftest import propagated_bound
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
    # float64 against float64: both sum the n parameters' and the outputs'
    # products (a few times n roundings of eps64 on |v|^T |GGN| |v'|).
    vs = (np.abs(u), np.abs(w))
    mag = np.array([[a @ np.abs(ggn) @ b for b in vs] for a in vs])
    eps64 = float(np.finfo(np.float64).eps)
    bound64 = 2 * 4 * n * eps64 * mag
    assert np.all(np.abs(np.asarray(gram) - ref) <= bound64)
    if loss == "mse":
      # A sum over the 4 features and a mean over the batch (or optax.l2_loss,
      # 0.5) is loss_scale times the mean: its GGN is 4 (0.5) times the dense one.
      for scale in (4.0, 0.5):
        scaled = quadratic_model.curvature_gram(
            lambda p: model.apply({"params": p}, x), params,
            [unravel(u), unravel(w)], "mse", loss_scale=scale)
        assert np.all(np.abs(np.asarray(scaled) - scale * ref) <= scale * bound64)
  # And in float32 (the library's working precision for float32 models).
  model, params32, x32, _ = tiny_problem(jnp.float32, out=4)
  t32 = jnp.asarray(np.asarray(t), jnp.float32)
  declared = (lambda o: OPTAX_LOSSES[name](o, t32)) if loss == "callable" else loss
  u32, w32 = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), unravel(v))
              for v in (u, w))
  gram32 = quadratic_model.curvature_gram(
      lambda p: model.apply({"params": p}, x32), params32, [u32, w32], declared)
  assert gram32.dtype == jnp.float32
  # float32: the tangents J v through the fan-ins (3 + 1, 4 + 1) and tanh (2),
  # the output Hessian (<= 4 + 4), the sum over the 5 x 4 outputs, and the
  # inputs' own rounding from float64 (1), on the same |v|^T |GGN| |v'|.
  ops32 = (4 + 5 + 2) + 8 + 5 * 4 + 1
  assert np.all(np.abs(np.asarray(gram32, np.float64) - ref) <= float32_tol(1.0, ops32) * mag)


# ----------------------------------------------------------------------------
# The 2x2 solve and the Levenberg-Marquardt rule on an exact quadratic.


def _minimizer(gv, dv, pv, lam, hess):
  """``argmin_u g^T u + 1/2 u^T (H + lam I) u`` over u in span(d, p) (float64):
  ``(u, c, q)``, the step, its coefficients and the model's change."""
  vmat = np.stack([dv, pv], axis=1) if np.any(pv) else dv[:, None]   # p = 0: 1-D
  curv = hess + lam * np.eye(len(gv))
  c = -np.linalg.solve(vmat.T @ curv @ vmat, vmat.T @ gv)
  u = vmat @ c
  return u, c, np.array([gv @ u + 0.5 * u @ curv @ u])


def _minimizer_bounds(gv, dv, pv, lam, hess):
  """Entrywise float32 bounds of the library's ``(u, c, q)`` against :func:`_minimizer`.

  The library forms the model from float32 vectors: d = P g (12 terms: d
  carries 12 + 1 roundings), the Gram entries (J v)^T H (J v) and v^T g as
  sums of 12 terms (+ 12 on d, p and g), the 2 x 2 solve and u = V c (4), and
  lam a float32 constant (1); :func:`~oracles.propagated_bound` turns these
  into each output's bound, with the 2 x 2 system's conditioning.
  """
  n = len(gv)
  pairs = [(gv, n + 4), (dv, 2 * n + 1 + 4), (pv, n + 4), (np.float64(lam), 1.0)]
  return [propagated_bound(lambda *a, k=k: _minimizer(*a, hess)[k], *pairs) for k in range(3)]


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
    args = [np.asarray(v["w"], np.float64).ravel() for v in (g, d, p)] + [lam]
    assert (step == 0) == (not np.any(args[2]))   # p = 0 at the first step only
    u_ref, c, q_ref = _minimizer(*args, hess)
    u_bound, c_bound, q_bound = _minimizer_bounds(*args, hess)
    assert np.all(np.abs(np.asarray(u["w"], np.float64).ravel() - u_ref) <= u_bound)
    assert np.all(np.abs(np.asarray(state.coefficients, np.float64)[:len(c)] - c) <= c_bound)
    assert abs(float(state.quad_change) - q_ref[0]) <= q_bound[0]
    params = optax.apply_updates(params, u)
  assert int(state.curvature_count) == 0 and int(state.nonfinite_count) == 0


def test_sign_and_scale_of_the_direction_do_not_matter():
  outputs_fn, value_fn, hess, rng = linear_problem()
  params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
  results, bound = [], 0.0
  for direction, factor in ((optax.identity(), 1.0), (optax.scale(-3.0), -3.0)):
    tx = eva_optax.adaptive(direction, "mse", adapt_every=None)
    lam = float(tx.init(params).damping)
    p, s = params, tx.init(params)
    update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p,
                                                       outputs_fn=outputs_fn))
    for _ in range(3):
      g = jax.grad(value_fn)(p)
      args = [np.asarray(v["w"], np.float64).ravel() for v in (g, g, s.velocity)]
      args[1] = factor * args[1]           # d = -3 g: one rounding more, below
      u, s = update(g, s, p)
      u_bound = _minimizer_bounds(*args, lam, hess)[0]
      bound += np.linalg.norm(u_bound) + float32_tol(1.0, 1) * np.linalg.norm(args[1])
      p = optax.apply_updates(p, u)
      bound += float32_tol(1.0, 1) * np.linalg.norm(np.asarray(p["w"], np.float64))
    results.append(np.asarray(p["w"], np.float64))
  # Both runs take exact minimizing steps of a convex quadratic over span(d, p):
  # non-expansive in the (H + lam I)-norm, so their differences add up over the
  # steps, times sqrt(cond(H + lam I)) back in the Euclidean norm.
  curv = np.linalg.eigvalsh(hess + lam * np.eye(len(hess)))
  assert np.linalg.norm(results[0] - results[1]) <= np.sqrt(curv[-1] / curv[0]) * bound


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
  # float32 lambda and omega (half a rounding each) and one product.
  assert new == pytest.approx(want, rel=float32_tol(1.0, 2))


def test_levenberg_marquardt_bounds():
  lm = adaptive_lib.levenberg_marquardt
  assert float(lm(jnp.float32(1.0), jnp.float32(0.0), 0.5, 0.25, 0.75, 0.1, 1.5)) == 1.5
  assert float(lm(jnp.float32(0.15), jnp.float32(1.0), 0.5, 0.25, 0.75, 0.1, 1.5)) == \
      pytest.approx(0.1, rel=float32_tol(1.0, 1))   # the float32 bound 0.1


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
    lams, rhos, first = [], [], None
    for _ in range(steps):
      loss, g = jax.value_and_grad(value_fn)(p)
      u, s = update(g, s, p, loss)
      p = optax.apply_updates(p, u)
      lams.append(float(s.damping))
      rhos.append(float(s.rho))
      first = first or (float(loss), float(s.quad_change))
    return lams, rhos, s, first

  lams, rhos, s, (loss, q) = run(1.0, 4)   # adaptation steps 0 and 3
  # lambda omega^k: float32 constants (half a rounding each) and a product per
  # adaptation (here k <= 2).
  np.testing.assert_allclose(lams, [1e-2 * omega] * 3 + [1e-2 * omega ** 2],
                             rtol=float32_tol(1.0, 1 + 2 * 2))
  # rho = (f(p + u) - f(p)) / q on an exact quadratic: 1 but for the float32
  # losses (means of 36 squares, 38 roundings each on ~|f|) cancelling in the
  # difference, and q's own roundings (_minimizer_bounds: ~40 on |q|).
  assert rhos[0] == pytest.approx(1.0, abs=float32_tol(1.0, 2 * 38) * loss / abs(q)
                                  + float32_tol(1.0, 40))
  assert int(s.rejected_count) == 0
  lams, rhos, s, _ = run(0.02, 1)   # curvature understated 50x: overshoots
  assert rhos[0] < 0.25 and lams[0] == pytest.approx(1e-2 / omega, rel=float32_tol(1.0, 3))


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
  # The least-squares answer 2, from 1-D models: sums of 6 terms (g, d^T H d;
  # 2 x (6 + 2) roundings), and a damping of 1e-8 against the curvature
  # 2 mean(x^2) ~ 0.93: a relative bias of 1e-8 / 0.93.
  assert float(params["w"][0]) == pytest.approx(2.0, rel=float32_tol(1.0, 16) + 1.1e-8)
  # Step 1 had p = 0 (not a failure); after the exact first step g = 0 (q = 0).
  assert int(state.curvature_count) >= 1 and np.isfinite(float(params["w"][0]))
