"""Blocked Shampoo against a float64 NumPy reference, plus its state contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eva_optax._src.optimizers import shampoo as shampoo_lib


from conftest import float32_tol
from conftest import inverse_root_apply_bound

# Relative ridge of the roots in the reference comparisons. One or a few
# observations give rank-deficient statistics, whose float32 eigenvalues are
# off by ~eps32 lambda_max: the ridge bounds the roots' condition number by
# (1 + 1 / EPS) / 4 (see _shampoo_tol); the default 1e-6 would allow 100x more
# error where a gradient meets the statistics' null space.
EPS = 1e-4
TINY32 = float(np.finfo(np.float32).tiny)


def _grads(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal(shape) + 0.3).astype(np.float32)
          for _ in range(steps)]


def _run(tx, grads, params=None):
  """Applies ``tx`` to each gradient tree in turn; returns updates and states.

  Eagerly: the compiled primitives are shared by all the tests, which is much
  cheaper than compiling one update per test (tests/test_contract.py jits).
  """
  state = tx.init(grads[0] if params is None else params)
  update = tx.update
  outs, states = [], []
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    for g in grads:
      u, state = update(g, state, params, stats={"ignored": 1.0})
      outs.append(u)
      states.append(state)
  return outs, states


def _true(blocks, key):
  """The statistic ``key`` at its true scale: ``exp(log tr) * (M / tr)``."""
  return (np.exp(np.asarray(blocks["log_scale"], np.float64))[:, None, None]
          * np.asarray(blocks[key], np.float64))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def _np_inverse_root(m, eps):
  """``(m + eps * lambda_max I)^{-1/4}`` by float64 eigh (eigenvalues floored at 0)."""
  d, q = np.linalg.eigh(0.5 * (m + m.T))
  d = np.maximum(d, 0.0)
  ridge = eps * max(d.max(), TINY32)
  return (q * (d + ridge) ** -0.25) @ q.T


def _np_stats(blocks_history, stat_decay):
  """Summed (or running-average) ``G G^T`` and ``G^T G`` of one block."""
  left = right = None
  for gb in blocks_history:
    nl, nr = gb @ gb.T, gb.T @ gb
    if left is None:
      left, right = nl, nr
    elif stat_decay is None:
      left, right = left + nl, right + nr
    else:
      left = (1 - stat_decay) * left + stat_decay * nl
      right = (1 - stat_decay) * right + stat_decay * nr
  return left, right


def _stat_bound(stat_grads, stat_decay=None):
  """Entrywise float32 error bound of a statistic against :func:`_np_stats`.

  Each entry is a (weighted) sum of products: its error is at most
  ``(k + steps) eps32`` times the same sum of absolute values (k = the dot
  products' length), plus the stored form's: the trace (n terms), its log and
  exp (``|log tr|`` roundings of the exponent) and two divisions.
  """
  hist = [np.abs(np.asarray(h, np.float64)) for h in stat_grads]
  out = []
  for absolute, (m, n) in zip(_np_stats(hist, stat_decay), [(1, 0), (0, 1)]):
    k, size = hist[0].shape[n], hist[0].shape[m]
    log_tr = abs(np.log(np.trace(absolute)))
    out.append(float32_tol(1.0, k + len(hist) + size + log_tr + 2) * absolute)
  return out


def _np_shampoo(grad, stat_grads, block_size, eps, stat_decay=None):
  """Per-block ``L^{-1/4} G R^{-1/4}`` of ``grad`` (viewed 2-D), roots from
  ``stat_grads``, then grafted to ``|grad|_F`` over the whole tensor."""
  g = np.asarray(grad, np.float64).reshape(-1, grad.shape[-1])
  hist = [np.asarray(s, np.float64).reshape(g.shape) for s in stat_grads]
  out = np.zeros_like(g)
  m, n = g.shape
  for r0 in range(0, m, block_size):
    for c0 in range(0, n, block_size):
      sl = (slice(r0, min(r0 + block_size, m)), slice(c0, min(c0 + block_size, n)))
      left, right = _np_stats([h[sl] for h in hist], stat_decay)
      out[sl] = (_np_inverse_root(left, eps) @ g[sl]
                 @ _np_inverse_root(right, eps))
  out *= np.linalg.norm(g) / np.linalg.norm(out)
  return out.reshape(grad.shape)


def _shampoo_tol(grad, stat_grads, block_size, eps, stat_decay=None):
  """The float32 error bound of :func:`_np_shampoo`'s result, from its conditioning.

  Per block, ``P = L^{-1/4} G R^{-1/4}``. Each root is computed by a float32
  eigh of a float32 statistic, exact for the statistic plus E with ``||E|| <=
  ops eps32 lambda_max``: ops = n for eigh, plus (k + steps + n + 1) tr /
  lambda_max for the statistic (its Gram sums of k products over the steps,
  and its division by the trace; normwise, as tr >= ||M||_F). What E does to
  the root applied to the rest of the product is
  :func:`~oracles.inverse_root_apply_bound`: it grows with the eigenvalue
  spread over the ridge where the product has weight on small eigenvalues (a
  gradient the roots never saw). The two products add (n_L + n_R) eps32
  |L^{-1/4}| |G| |R^{-1/4}|, the blocks' scale factors exp(-log tr / 4)
  ``|log tr| / 4`` roundings each. Blocks are disjoint, so their bounds add in
  squares; the graft only rescales the relative error.
  """
  g = np.asarray(grad, np.float64).reshape(-1, grad.shape[-1])
  hist = [np.asarray(h, np.float64).reshape(g.shape) for h in stat_grads]
  m, n = g.shape
  total, norm = 0.0, 0.0
  for r0 in range(0, m, block_size):
    for c0 in range(0, n, block_size):
      sl = (slice(r0, min(r0 + block_size, m)), slice(c0, min(c0 + block_size, n)))
      left, right = _np_stats([h[sl] for h in hist], stat_decay)
      left_root, right_root = _np_inverse_root(left, eps), _np_inverse_root(right, eps)
      gb = g[sl]
      p = left_root @ gb @ right_root
      bound = float32_tol(1.0, len(left) + len(right)) * np.linalg.norm(
          np.abs(left_root) @ np.abs(gb) @ np.abs(right_root))
      for stat, other, y in ((left, right, gb @ right_root),
                             (right, left, (left_root @ gb).T)):
        size, lam_max = len(stat), max(np.linalg.eigvalsh(stat).max(), TINY32)
        spread = np.trace(stat) / lam_max
        ops = size + (len(other) + len(hist) + size + 1) * spread
        bound += inverse_root_apply_bound(stat, 4, eps, y, ops)
        bound += float32_tol(1.0, abs(np.log(np.trace(stat))) / 4) * np.linalg.norm(p)
      total += bound ** 2
      norm += np.linalg.norm(p) ** 2
  return float(np.sqrt(total / norm))


@pytest.mark.parametrize("shape", [(6, 4), (2, 2, 3, 4)], ids=["dense", "conv"])
@pytest.mark.parametrize("stat_decay", [None, 0.9], ids=["sum", "ema"])
def test_single_block_matches_reference(shape, stat_decay):
  grads = _grads(shape, 3)
  tx = shampoo_lib.scale_by_shampoo(stat_decay=stat_decay,
                                    start_preconditioning_step=0,
                                    matrix_eps=EPS)
  outs, states = _run(tx, [jnp.asarray(g) for g in grads])
  for steps in (1, 3):
    ref = _np_shampoo(grads[steps - 1], grads[:steps], 128, EPS, stat_decay)
    assert _rel(outs[steps - 1], ref) < _shampoo_tol(
        grads[steps - 1], grads[:steps], 128, EPS, stat_decay)
  # One block; the statistics are the plain sums / averages of the 2-D view.
  views = [g.reshape(-1, shape[-1]).astype(np.float64) for g in grads]
  left, right = _np_stats(views, stat_decay)
  left_bound, right_bound = _stat_bound(views, stat_decay)
  assert np.all(np.abs(_true(states[-1].blocks, "L")[0] - left) <= left_bound)
  assert np.all(np.abs(_true(states[-1].blocks, "R")[0] - right) <= right_bound)


@pytest.mark.parametrize("shape", [(10, 6), (9, 4)])
def test_blocked_matches_per_block_reference(shape):
  grads = _grads(shape, 3, seed=1)
  tx = shampoo_lib.scale_by_shampoo(block_size=4, start_preconditioning_step=0,
                                    matrix_eps=EPS)
  outs, states = _run(tx, [jnp.asarray(g) for g in grads])
  for steps in (1, 3):
    ref = _np_shampoo(grads[steps - 1], grads[:steps], 4, EPS)
    assert _rel(outs[steps - 1], ref) < _shampoo_tol(
        grads[steps - 1], grads[:steps], 4, EPS)
  # Padding (10 -> 12 rows, 6 -> 8 columns) stays out of the statistics.
  lay = shampoo_lib.block_layout(shape, 4)
  left = np.asarray(states[-1].blocks["L"]).reshape(lay.nr, lay.nc, 4, 4)
  pad_rows = lay.nr * 4 - shape[0]
  if pad_rows:
    assert np.all(left[-1, :, 4 - pad_rows:, :] == 0)


def test_roots_refresh_every_k_steps():
  k = 3
  grads = _grads((6, 4), 5, seed=2)
  tx = shampoo_lib.scale_by_shampoo(inverse_every=k, start_preconditioning_step=0,
                                    matrix_eps=EPS)
  outs, states = _run(tx, [jnp.asarray(g) for g in grads])
  roots = [(np.asarray(s.blocks["L_root"]), np.asarray(s.blocks["R_root"]))
           for s in states]
  # Computed at step 0, kept bit-identical at steps 1 and 2, recomputed at step 3.
  for step in (1, 2):
    np.testing.assert_array_equal(roots[step][0], roots[0][0])
    np.testing.assert_array_equal(roots[step][1], roots[0][1])
  assert not np.array_equal(roots[3][0], roots[0][0])
  assert not np.array_equal(roots[3][1], roots[0][1])
  np.testing.assert_array_equal(roots[4][0], roots[3][0])
  # Step 2 preconditions with the stale roots of the step-0 statistics (while
  # the statistics themselves went on accumulating), step 3 with fresh ones.
  stale = _np_shampoo(grads[2], grads[:1], 128, EPS)
  fresh = _np_shampoo(grads[2], grads[:3], 128, EPS)
  tol = _shampoo_tol(grads[2], grads[:1], 128, EPS)
  assert _rel(outs[2], stale) < tol
  assert _rel(fresh, stale) > 10 * tol   # the check tells stale roots from fresh ones
  assert _rel(outs[3], _np_shampoo(grads[3], grads[:4], 128, EPS)) < _shampoo_tol(
      grads[3], grads[:4], 128, EPS)
  views = [g.astype(np.float64) for g in grads[:3]]
  left, _ = _np_stats(views, None)
  assert np.all(np.abs(_true(states[2].blocks, "L")[0] - left) <= _stat_bound(views)[0])


def test_start_preconditioning_and_stats_every():
  grads = _grads((6, 4), 3, seed=3)
  tx = shampoo_lib.scale_by_shampoo(start_preconditioning_step=2, stats_every=2,
                                    matrix_eps=EPS)
  outs, states = _run(tx, [jnp.asarray(g) for g in grads])
  np.testing.assert_array_equal(outs[0], grads[0])
  np.testing.assert_array_equal(outs[1], grads[1])
  # Statistics at steps 0 and 2; roots refreshed every step from them.
  stat_grads = [grads[0], grads[2]]
  assert _rel(outs[2], _np_shampoo(grads[2], stat_grads, 128, EPS)) < _shampoo_tol(
      grads[2], stat_grads, 128, EPS)
  assert int(states[-1].stats_count) == 2


def test_pass_through_and_state_bytes():
  params = {"dense": {"kernel": jnp.zeros((10, 6)), "bias": jnp.zeros((6,))},
            "conv": {"kernel": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros((4,))},
            "scale": jnp.zeros(())}
  tx = shampoo_lib.scale_by_shampoo(block_size=4)
  grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)
                       + 0.5, params)
  (u,), (state,) = _run(tx, [grads], params)
  for path in (("dense", "bias"), ("conv", "bias"), ("scale",)):
    got, want = u, grads
    for k in path:
      got, want = got[k], want[k]
    np.testing.assert_array_equal(got, want)
  # Per block: 2 statistics + 2 roots + 2 log-traces, float32. dense (10, 6):
  # 3 x 2 blocks of 4 x 4; conv viewed (18, 4): 5 x 1 blocks of 4 x 4; plus
  # five int32 counters.
  dense = 3 * 2 * (2 * (4 * 4 + 4 * 4) + 2)
  conv = 5 * 1 * (2 * (4 * 4 + 4 * 4) + 2)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  assert nbytes == 4 * (dense + conv) + 5 * 4
  # Without blocking a side is its own length: (10, 6) -> 2 (10^2 + 6^2).
  state = shampoo_lib.scale_by_shampoo().init({"w": jnp.zeros((10, 6))})
  assert sum(x.nbytes for x in jax.tree.leaves(state)) == 4 * (
      2 * (100 + 36) + 2) + 20


def test_nonfinite_gradient_keeps_state_finite():
  grads = [jnp.asarray(g) for g in _grads((6, 4), 3, seed=4)]
  bad = grads[1].at[2, 1].set(jnp.inf)
  tx = shampoo_lib.scale_by_shampoo(block_size=3, start_preconditioning_step=0,
                                    matrix_eps=EPS)
  outs, states = _run(tx, [grads[0], bad, grads[2]])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(states[-1]))
  np.testing.assert_array_equal(outs[1], 0.0)   # the bad step is skipped
  assert int(states[-1].skipped_count) == 1
  assert int(states[-1].nonfinite_count) == 1
  assert int(states[-1].stats_count) == 2
  stat_grads = [np.asarray(grads[0]), np.asarray(grads[2])]
  ref = _np_shampoo(stat_grads[1], stat_grads, 3, EPS)
  assert _rel(outs[2], ref) < _shampoo_tol(stat_grads[1], stat_grads, 3, EPS)


def test_zero_gradient_block_stays_finite():
  g = np.zeros((6, 4), np.float32)
  g[:3] = _grads((3, 4), 1, seed=5)[0]   # rows 3..5 (the second block) are zero
  outs, states = _run(shampoo_lib.scale_by_shampoo(
      block_size=3, start_preconditioning_step=0), [jnp.asarray(g)])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(states[-1]))
  assert bool(jnp.all(jnp.isfinite(outs[0])))
  np.testing.assert_array_equal(outs[0][3:], 0.0)


def test_bf16_updates_float32_state():
  params = {"kernel": jnp.zeros((6, 4), jnp.bfloat16),
            "bias": jnp.zeros((4,), jnp.bfloat16)}
  grads = {"kernel": jnp.asarray(_grads((6, 4), 1)[0], jnp.bfloat16),
           "bias": jnp.ones((4,), jnp.bfloat16)}
  (u,), (state,) = _run(shampoo_lib.shampoo(0.1, weight_decay=1e-4,
                                            start_preconditioning_step=0),
                        [grads], params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0].blocks))


def test_alias_is_single_heavy_ball():
  grads = [{"w": jnp.asarray(g)} for g in _grads((6, 4), 2)]
  pre, _ = _run(shampoo_lib.scale_by_shampoo(), grads)
  full, _ = _run(shampoo_lib.shampoo(0.1, momentum=0.9), grads)
  # The same preconditioner (the same eager operations), then the trace and
  # the learning rate: one product in the alias and one in the test; then
  # 0.9 m + u and the product (three roundings, plus the float32 constants 0.9
  # and 0.1, half an eps32 each) against float64, relative to 0.9 |m| + |u|
  # where the two cancel.
  np.testing.assert_allclose(full[0]["w"], -0.1 * pre[0]["w"], rtol=float32_tol(1.0, 2))
  p0, p1 = np.asarray(pre[0]["w"], np.float64), np.asarray(pre[1]["w"], np.float64)
  assert np.all(np.abs(full[1]["w"] - (-0.1 * (0.9 * p0 + p1)))
                <= float32_tol(1.0, 4) * 0.1 * (0.9 * np.abs(p0) + np.abs(p1)))


def test_adagrad_graft_matches_reference():
  eps = 1e-3
  params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros((4,))}
  raw = [{"w": g, "b": g[0]} for g in _grads((6, 4), 3, seed=6)]
  tx = shampoo_lib.scale_by_shampoo(EPS, start_preconditioning_step=0,
                                    graft="adagrad", graft_eps=eps)
  outs, _ = _run(tx, [jax.tree.map(jnp.asarray, g) for g in raw], params)
  acc = {"w": 0.0, "b": 0.0}
  for step, g in enumerate(raw):
    size = {}
    for k in ("w", "b"):
      x = g[k].astype(np.float64)
      acc[k] = acc[k] + x * x
      size[k] = x / (np.sqrt(acc[k]) + eps)
    # x / (sqrt(sum of step + 1 squares) + eps): same-sign terms, cond 1.
    np.testing.assert_allclose(outs[step]["b"], size["b"], rtol=float32_tol(1.0, step + 4))
    stat_grads = [r["w"] for r in raw[:step + 1]]
    ref = _np_shampoo(raw[step]["w"], stat_grads, 128, EPS)
    ref *= np.linalg.norm(size["w"]) / np.linalg.norm(ref)
    # + the AdaGrad norm: a sum over the tensor and steps of squares.
    tol = (_shampoo_tol(raw[step]["w"], stat_grads, 128, EPS)
           + float32_tol(1.0, raw[step]["w"].size + step + 1))
    assert _rel(outs[step]["w"], ref) < tol


def test_positional_order():
  grads = [{"w": jnp.asarray(g)} for g in _grads((6, 4), 2, seed=7)]
  by_name, _ = _run(shampoo_lib.shampoo(0.1, 0.5, 0.0, matrix_eps=1e-3,
                                        stat_decay=0.9), grads)
  by_position, _ = _run(shampoo_lib.shampoo(0.1, 0.5, 0.0, 1e-3, 0.9), grads)
  np.testing.assert_array_equal(by_name[1]["w"], by_position[1]["w"])
  with pytest.raises(TypeError):
    shampoo_lib.shampoo(0.1, 0.5, 0.0, 1e-3, 0.9, 128)   # block_size: keyword


@pytest.mark.parametrize("kwargs", [
    {"stat_decay": 1.5}, {"block_size": 0}, {"matrix_eps": 0.0},
    {"matrix_eps": -1e-6}, {"matrix_eps": float("nan")}, {"inverse_every": 0},
    {"stats_every": 0}, {"start_preconditioning_step": -1}, {"graft": "adam"},
    {"graft_decay": 2.0}])
def test_bad_hyperparameters(kwargs):
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    shampoo_lib.scale_by_shampoo(**kwargs)
  with pytest.raises(ValueError, match=next(iter(kwargs))):
    shampoo_lib.shampoo(0.1, **kwargs)


def test_bad_types_and_alias_hyperparameters():
  with pytest.raises(TypeError, match="block_size"):
    shampoo_lib.scale_by_shampoo(block_size=4.0)
  with pytest.raises(ValueError, match="momentum"):
    shampoo_lib.shampoo(0.1, momentum=-0.5)
