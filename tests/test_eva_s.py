"""Eva-s against a dense float64 NumPy reference, plus its state contract.

Numerics and run-time safety shared with Shampoo are in test_per_tensor_safety.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eva_optax._src.optimizers import eva_s as eva_s_lib
from eva_optax._src.linalg import rank_one

from conftest import float32_tol
from conftest import relative_condition

DAMPING = 0.05


def _grads(shape, steps, seed=0):
  """Gradients with non-zero axis means, so the rank-one term matters."""
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal(shape) + 0.7).astype(np.float32)
          for _ in range(steps)]


def _run(tx, grads, params=None):
  """Applies ``tx`` to each gradient tree in turn (strict promotion).

  Eagerly: the compiled primitives are shared by all the tests, which is much
  cheaper than compiling one update per test (tests/test_contract.py jits).
  """
  state = tx.init(grads[0] if params is None else params)
  update = tx.update
  outs = []
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    for g in grads:
      u, state = update(g, state, params, stats={"ignored": 1.0})
      outs.append(u)
  return outs, state


def _vectors(leaf_state):
  """``[s_0, ..., s_{r-1}]`` of one leaf's state (a dict keyed by axis)."""
  return [leaf_state[f"axis_{i}"] for i in range(len(leaf_state))]


def _np_means(t):
  return [t.mean(axis=tuple(j for j in range(t.ndim) if j != i))
          for i in range(t.ndim)]


def _np_vectors(grads, stat_decay, stats_every=1):
  """Sum from zero, or running average initialised by the first observation."""
  vs = None
  for step, g in enumerate(grads):
    if step % stats_every:
      continue
    new = _np_means(g.astype(np.float64))
    if vs is None:
      vs = new
    elif stat_decay is None:
      vs = [o + n for o, n in zip(vs, new)]
    else:
      vs = [(1 - stat_decay) * o + stat_decay * n for o, n in zip(vs, new)]
  return vs


def _np_eva_s(t, vectors, damping, size=None):
  """Dense ``(u u^T + damping I)^{-1} vec(T)`` with ``u = kron(s_i)``, rescaled
  to ``size`` (default ``|T|``, SGD grafting)."""
  t = t.astype(np.float64)
  u = vectors[0]
  for v in vectors[1:]:
    u = np.kron(u, v)
  f = np.outer(u, u) + damping * np.eye(u.size)
  p = np.linalg.solve(f, t.ravel()).reshape(t.shape)
  size = np.linalg.norm(t) if size is None else size
  return p * size / np.linalg.norm(p)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _eva_s_tol(t, vectors, damping, steps, size=None):
  """The float32 error bound of :func:`_np_eva_s`'s result, from its conditioning.

  The library computes the same closed form in float32: axis means of
  t.size / d_i terms folded into the vectors over the steps (3 roundings per
  step), then inner products and norms of t.size terms and a few scalar
  operations. Each is a relative perturbation of t, the vectors or the damping
  of at most ``ops`` eps32, ops = 2 t.size + 3 steps + 4, which moves the result
  by at most cond * ops * eps32, cond the componentwise relative condition number
  of the closed form at these inputs (large where u u^T dominates the damping
  and t is nearly parallel to u).
  """
  t = np.asarray(t, np.float64)
  fn = lambda t, d, *vs: _np_eva_s(t, list(vs), d, size)
  cond = relative_condition(fn, t, np.float64(damping), *vectors)
  return float32_tol(cond, 2 * t.size + 3 * steps + 4)


def _vectors_close(got_vectors, grads, stat_decay, stats_every=1):
  """The stored vectors against float64: means of t.size / d_i terms of t
  scaled by its max-abs (2 roundings more), then (1 - xi) o + xi n or o + n
  over the steps: at most ``(t.size / d_i + 2 + 3 steps) eps32`` relative to
  the same sums of |t|."""
  want = _np_vectors(grads, stat_decay, stats_every)
  bound = _np_vectors([np.abs(g) for g in grads], stat_decay, stats_every)
  size = grads[0].size
  for got, w, b in zip(got_vectors, want, bound):
    ops = size // len(w) + 2 + 3 * len(grads)
    assert np.all(np.abs(np.asarray(got, np.float64) - w) <= float32_tol(1.0, ops) * b)


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 2, 4)], ids=["dense", "conv"])
@pytest.mark.parametrize("stat_decay", [None, 0.9], ids=["sum", "ema"])
def test_matches_dense_solve(shape, stat_decay):
  grads = _grads(shape, 3)
  tx = eva_s_lib.scale_by_eva_s(DAMPING, stat_decay)
  outs, state = _run(tx, [jnp.asarray(g) for g in grads])
  for steps in (1, 3):
    vectors = _np_vectors(grads[:steps], stat_decay)
    ref = _np_eva_s(grads[steps - 1], vectors, DAMPING)
    assert _rel(outs[steps - 1], ref) < _eva_s_tol(grads[steps - 1], vectors, DAMPING, steps)
  _vectors_close(_vectors(state.vectors), grads, stat_decay)
  assert int(state.count) == 3 and int(state.stats_count) == 3


def test_closed_forms_agree():
  # The plain Sherman-Morrison form and the rearranged direction agree where
  # both are accurate (moderate mu / gamma).
  t = jnp.asarray(_grads((5, 3), 1)[0])
  vs = [jnp.asarray(v, jnp.float32) for v in _np_means(np.asarray(t))]
  plain = rank_one.eva_s_solve(t, vs, jnp.float32(DAMPING))
  direction = rank_one.eva_s_direction(t, vs, jnp.float32(DAMPING))
  scale = float(jnp.vdot(plain, direction) / jnp.vdot(direction, direction))
  assert scale > 0
  # Two float32 evaluations of one closed form: each within its bound, the
  # fitted scale adds two inner products of t.size terms.
  t64, vs64 = np.asarray(t, np.float64), [np.asarray(v, np.float64) for v in vs]
  tol = 2 * _eva_s_tol(t64, vs64, DAMPING, 1) + float32_tol(1.0, 2 * t64.size)
  assert _rel(scale * np.asarray(direction), plain) < tol


def test_rank_one_term_acts():
  # Sanity of the setting above: the update is not just the gradient.
  g = _grads((5, 3), 1)[0]
  (u,), _ = _run(eva_s_lib.scale_by_eva_s(DAMPING), [jnp.asarray(g)])
  assert _rel(u, g) > 0.1


def test_stats_every():
  grads = _grads((5, 3), 3)
  tx = eva_s_lib.scale_by_eva_s(DAMPING, stats_every=2)
  outs, state = _run(tx, [jnp.asarray(g) for g in grads])
  # Statistics at steps 0 and 2 only; step 1 uses the step-0 vectors.
  vectors = _np_vectors(grads[:1], None)
  ref = _np_eva_s(grads[1], vectors, DAMPING)
  assert _rel(outs[1], ref) < _eva_s_tol(grads[1], vectors, DAMPING, 1)
  _vectors_close(_vectors(state.vectors), grads, None, stats_every=2)
  assert int(state.stats_count) == 2


def test_pass_through_and_state_bytes():
  params = {"dense": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros((3,))},
            "conv": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros((4,))},
            "scale": jnp.zeros(())}
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3 + jnp.arange(
      p.size, dtype=p.dtype).reshape(p.shape), params)
  (u,), state = _run(eva_s_lib.scale_by_eva_s(), [grads], params)
  for path in (("dense", "bias"), ("conv", "bias"), ("scale",)):
    got, want = u, grads
    for k in path:
      got, want = got[k], want[k]
    np.testing.assert_array_equal(got, want)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert nbytes == 4 * ((5 + 3) + (3 + 3 + 2 + 4)) + 5 * 4


@pytest.mark.parametrize("graft", ["adagrad", "rmsprop"])
def test_grafts_match_reference(graft):
  beta, eps = 0.9, 1e-3
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros((3,))}
  raw = [{"w": g, "b": g[0]} for g in _grads((5, 3), 3, seed=3)]
  tx = eva_s_lib.scale_by_eva_s(DAMPING, graft=graft, graft_decay=beta,
                                graft_eps=eps)
  outs, state = _run(tx, [jax.tree.map(jnp.asarray, g) for g in raw], params)
  acc = {"w": np.zeros((5, 3)), "b": np.zeros(3)}
  for step, g in enumerate(raw):
    graft_step = {}
    for k in ("w", "b"):
      x = g[k].astype(np.float64)
      if graft == "adagrad":
        acc[k] = acc[k] + x * x
        graft_step[k] = x / (np.sqrt(acc[k]) + eps)
      else:
        acc[k] = beta * acc[k] + (1 - beta) * x * x
        graft_step[k] = x / (np.sqrt(acc[k] / (1 - beta ** (step + 1))) + eps)
    # The bias gets the graft's step: x / (sqrt(acc) + eps), acc a same-sign
    # sum over the steps (2 roundings each) with its bias correction: cond 1,
    # 2 (step + 1) + 5 roundings. The kernel gets its direction at that norm
    # (+ the norm's t.size terms).
    graft_ops = 2 * (step + 1) + 5
    np.testing.assert_allclose(outs[step]["b"], graft_step["b"], rtol=float32_tol(1.0, graft_ops))
    vectors = _np_vectors([r["w"] for r in raw[:step + 1]], None)
    size = np.linalg.norm(graft_step["w"])
    ref = _np_eva_s(raw[step]["w"], vectors, DAMPING, size=size)
    tol = (_eva_s_tol(raw[step]["w"], vectors, DAMPING, step + 1, size)
           + float32_tol(1.0, graft_ops + raw[step]["w"].size))
    assert _rel(outs[step]["w"], ref) < tol
  # The state keeps the roots of the second moments (the sums above, one sqrt).
  np.testing.assert_allclose(state.graft["w"], np.sqrt(acc["w"]), rtol=float32_tol(1.0, 2 * 3 + 1))


def test_bf16_updates_float32_state():
  params = {"kernel": jnp.zeros((5, 3), jnp.bfloat16),
            "bias": jnp.zeros((3,), jnp.bfloat16)}
  grads = {"kernel": jnp.asarray(_grads((5, 3), 1)[0], jnp.bfloat16),
           "bias": jnp.ones((3,), jnp.bfloat16)}
  (u,), state = _run(eva_s_lib.eva_s(0.1, weight_decay=1e-4), [grads], params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  inner = state[0]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(inner.vectors))


def test_alias_is_single_heavy_ball():
  grads = [{"w": jnp.asarray(g)} for g in _grads((5, 3), 2)]
  pre, _ = _run(eva_s_lib.scale_by_eva_s(DAMPING), grads)
  full, _ = _run(eva_s_lib.eva_s(0.1, momentum=0.9, damping=DAMPING), grads)
  # As in test_shampoo.py: one product each side; then 0.9 m + u and the
  # product (three roundings, the float32 constants half an eps32 each)
  # against float64, relative to 0.9 |m| + |u| where the two cancel.
  np.testing.assert_allclose(full[0]["w"], -0.1 * pre[0]["w"], rtol=float32_tol(1.0, 2))
  p0, p1 = np.asarray(pre[0]["w"], np.float64), np.asarray(pre[1]["w"], np.float64)
  assert np.all(np.abs(full[1]["w"] - (-0.1 * (0.9 * p0 + p1)))
                <= float32_tol(1.0, 4) * 0.1 * (0.9 * np.abs(p0) + np.abs(p1)))


@pytest.mark.parametrize("kwargs", [
    {"damping": 0.0}, {"damping": -1.0}, {"damping": float("inf")},
    {"stat_decay": 1.5}, {"stat_decay": -0.1}, {"stats_every": 0},
    {"graft": "adam"}, {"graft_decay": 1.5}, {"graft_eps": -1.0}])
def test_bad_hyperparameters(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    eva_s_lib.scale_by_eva_s(**kwargs)
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    eva_s_lib.eva_s(0.1, **kwargs)


def test_bad_alias_hyperparameters():
  with pytest.raises(ValueError, match="momentum"):
    eva_s_lib.eva_s(0.1, momentum=1.5)
  with pytest.raises(ValueError, match="weight_decay"):
    eva_s_lib.eva_s(0.1, weight_decay=-1.0)
  with pytest.raises(TypeError, match="graft_eps"):
    eva_s_lib.eva_s(0.1, graft_eps=lambda c: 1e-8)


def test_works_inside_optax_chain_with_schedule():
  tx = optax.chain(eva_s_lib.scale_by_eva_s(damping=lambda c: 0.05,
                                            stat_decay=lambda c: 0.9),
                   optax.scale(-0.1))
  outs, _ = _run(tx, [{"w": jnp.asarray(g)} for g in _grads((5, 3), 2)])
  assert bool(jnp.all(jnp.isfinite(outs[1]["w"])))
