"""Eva-s against a dense float64 NumPy reference, plus its state contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eva_optax._src import eva_s as eva_s_lib

DAMPING = 0.05
RTOL = 1e-4


def _grads(shape, steps, seed=0):
  """Gradients with non-zero axis means, so the rank-one term matters."""
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal(shape) + 0.7).astype(np.float32)
          for _ in range(steps)]


def _run(tx, grads, params=None):
  """Applies ``tx`` to each gradient tree in turn (jitted, strict promotion)."""
  state = tx.init(grads[0] if params is None else params)
  update = jax.jit(tx.update)
  outs = []
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    for g in grads:
      u, state = update(g, state, params, stats={"ignored": 1.0})
      outs.append(u)
  return outs, state


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


def _np_eva_s(t, vectors, damping):
  """Dense ``(u u^T + damping I)^{-1} vec(T)`` with ``u = kron(s_i)``, rescaled."""
  t = t.astype(np.float64)
  u = vectors[0]
  for v in vectors[1:]:
    u = np.kron(u, v)
  f = np.outer(u, u) + damping * np.eye(u.size)
  p = np.linalg.solve(f, t.ravel()).reshape(t.shape)
  return p * np.linalg.norm(t) / np.linalg.norm(p)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 2, 4)], ids=["dense", "conv"])
@pytest.mark.parametrize("stat_decay", [None, 0.9], ids=["sum", "ema"])
def test_matches_dense_solve(shape, stat_decay):
  grads = _grads(shape, 3)
  tx = eva_s_lib.scale_by_eva_s(DAMPING, stat_decay)
  outs, state = _run(tx, [jnp.asarray(g) for g in grads])
  for steps in (1, 3):
    ref = _np_eva_s(grads[steps - 1], _np_vectors(grads[:steps], stat_decay),
                    DAMPING)
    assert _rel(outs[steps - 1], ref) < RTOL
  for got, want in zip(state.vectors, _np_vectors(grads, stat_decay)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert int(state.count) == 3 and int(state.stats_count) == 3


def test_rank_one_term_acts():
  # Sanity of the setting above: the update is not just the gradient.
  g = _grads((5, 3), 1)[0]
  (u,), _ = _run(eva_s_lib.scale_by_eva_s(DAMPING), [jnp.asarray(g)])
  assert _rel(u, g) > 0.1


def test_stats_every():
  grads = _grads((4, 3), 3)
  tx = eva_s_lib.scale_by_eva_s(DAMPING, stats_every=2)
  outs, state = _run(tx, [jnp.asarray(g) for g in grads])
  # Statistics at steps 0 and 2 only; step 1 uses the step-0 vectors.
  ref = _np_eva_s(grads[1], _np_vectors(grads[:1], None), DAMPING)
  assert _rel(outs[1], ref) < RTOL
  for got, want in zip(state.vectors, _np_vectors(grads, None, stats_every=2)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
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


def test_nonfinite_gradient_keeps_state_finite():
  grads = [jnp.asarray(g) for g in _grads((4, 3), 3)]
  bad = grads[1].at[0, 0].set(jnp.nan)
  tx = eva_s_lib.scale_by_eva_s(DAMPING)
  outs, state = _run(tx, [grads[0], bad, grads[2]])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
  assert int(state.nonfinite_count) == 1 and int(state.stats_count) == 2
  assert bool(jnp.all(jnp.isfinite(outs[2])))
  want = _np_vectors([np.asarray(grads[0]), np.asarray(grads[2])], None)
  for got, w in zip(state.vectors, want):
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_bf16_updates_float32_state():
  params = {"kernel": jnp.zeros((4, 3), jnp.bfloat16),
            "bias": jnp.zeros((3,), jnp.bfloat16)}
  grads = {"kernel": jnp.asarray(_grads((4, 3), 1)[0], jnp.bfloat16),
           "bias": jnp.ones((3,), jnp.bfloat16)}
  (u,), state = _run(eva_s_lib.eva_s(0.1, weight_decay=1e-4), [grads], params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  inner = state[0]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(inner.vectors))


def test_alias_is_single_heavy_ball():
  grads = [{"w": jnp.asarray(g)} for g in _grads((4, 3), 2)]
  pre, _ = _run(eva_s_lib.scale_by_eva_s(DAMPING), grads)
  full, _ = _run(eva_s_lib.eva_s(0.1, momentum=0.9, damping=DAMPING), grads)
  np.testing.assert_allclose(full[0]["w"], -0.1 * pre[0]["w"], rtol=1e-6)
  np.testing.assert_allclose(
      full[1]["w"], -0.1 * (0.9 * pre[0]["w"] + pre[1]["w"]), rtol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"damping": 0.0}, {"damping": -1.0}, {"stat_decay": 1.5},
    {"stat_decay": -0.1}, {"stats_every": 0}])
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


def test_works_inside_optax_chain_with_schedule():
  tx = optax.chain(eva_s_lib.scale_by_eva_s(damping=lambda c: 0.05,
                                            stat_decay=lambda c: 0.9),
                   optax.scale(-0.1))
  outs, _ = _run(tx, [{"w": jnp.asarray(g)} for g in _grads((4, 3), 2)])
  assert bool(jnp.all(jnp.isfinite(outs[1]["w"])))
