"""eva_optax.MultiSteps: k micro-steps equal one step on the k-times larger batch.

The reference is the same optimizer run without accumulation on the
concatenated batch (its mean loss), for every optimizer of the library, at a
damping small enough that the statistics steer the update. Both the emitted
updates and the wrapped optimizer's state (the running averages of the
statistics, so what reached it, with their scale) are compared. optax.MultiSteps
goes through the same comparison for Eva to show that the test can fail: only
the last micro-batch's statistics reach the optimizer there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from conftest import MLP, float32_tol, mse_loss, reference_tol, rel_err

K = 4            # micro-batches per update
MICRO = 8        # examples per micro-batch
SHIFTS = (-1.5, -0.5, 0.5, 2.0)   # micro-batch input means differ: wrong weights show

# name -> (optimizer factory at small damping, statistics mode, learning rate)
OPTIMIZERS = {
    "eva": (lambda lr: eva_optax.eva(lr, momentum=0.9, damping=1e-6,
                                     kl_normalize=False), "vectors", 1e-8),
    "eva_f": (lambda lr: eva_optax.eva_f(lr, momentum=0.9, damping=1e-6,
                                         kl_normalize=False), "vectors", 1e-8),
    "eva_s": (lambda lr: eva_optax.eva_s(lr, momentum=0.9, damping=1e-6),
              "vectors", 1e-2),
    "kfac": (lambda lr: eva_optax.kfac(lr, momentum=0.9, damping=1e-6, kl_clip=None,
                                       kl_normalize=False), "factors", 1e-5),
    "foof": (lambda lr: eva_optax.foof(lr, momentum=0.9, damping=1e-6, kl_clip=None,
                                       kl_normalize=False), "factors", 1e-8),
    "shampoo": (lambda lr: eva_optax.shampoo(lr, momentum=0.9, matrix_eps=1e-4),
                "vectors", 1e-2),
}
# The accumulated gradient and statistics are means of the 4 x 8 rows summed in
# another order than the 32-row batch's: each within MICRO + K + 3 roundings of
# the exact mean on either side, so the two runs' inputs differ by twice that.
# What that does to an update is the step's own conditioning (reference_tol,
# which also adds the step's roundings): large at damping 1e-6. Shampoo's
# inverse 4th roots of rank-deficient statistics: matrix_eps 1e-4 (its default
# 1e-6 would make the bound ~100x larger: the test is about MultiSteps).
INPUT_OPS = 2 * (MICRO + K + 3)


def _layerwise_state(state):
  """The LayerwiseState inside an optimizer state (None for Eva-s and Shampoo)."""
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "layers"))
           if hasattr(s, "layers")]
  return found[0] if found else None


def _step_tol(name, damping, grads, state):
  """The relative bound of one preconditioned step, worst layer and leaf:
  reference_tol at this step's gradient and the statistics the reference run
  used (its running averages, in ``state``), inputs off by INPUT_OPS. Eva-s and
  Shampoo: the one-step conditioning at this step's gradient."""
  layers = _layerwise_state(state)
  worst = 0.0
  for layer, node in grads.items():
    node = jax.tree.map(np.asarray, node)
    st = None if layers is None else {k: np.asarray(v) for k, v in layers.layers[layer].items()
                                      if k in ("a", "g", "A", "G")}
    worst = max(worst, *reference_tol(name, node, st, damping, input_ops=INPUT_OPS).values())
  return worst


def _micro_batches(seed: int):
  """K micro-batches ``(x, y)`` whose inputs have different means."""
  rng = np.random.default_rng(seed)
  w = np.random.default_rng(7).normal(size=(5, 3)) / np.sqrt(5)
  out = []
  for shift in SHIFTS:
    x = rng.normal(size=(MICRO, 5)) + shift + np.linspace(-0.3, 0.3, 5)
    y = np.tanh(x @ w) + 0.1
    out.append((jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  return out


def _concat(batches):
  return tuple(jnp.concatenate(parts) for parts in zip(*batches))


def _params(seed: int = 0):
  """Parameters of ``MLP(features=(6, 3))`` on 5 inputs, drawn in NumPy (eager
  ``model.init`` compiles its random initialisers: seconds per shape)."""
  rng = np.random.default_rng(seed)
  return {f"Dense_{i}": {
      "kernel": jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), jnp.float32),
      "bias": jnp.asarray(0.1 * rng.normal(size=(n,)), jnp.float32)}
          for i, (m, n) in enumerate([(5, 6), (6, 3)])}


@functools.lru_cache(maxsize=None)
def _problem():
  model = MLP(features=(6, 3))
  batches = [_micro_batches(seed) for seed in (1, 2)]   # two emitting steps
  return _params(), mse_loss(model), batches


@functools.lru_cache(maxsize=None)
def _grad_fn(mode: str):
  """One compiled ``value_and_grad`` per statistics mode, shared by the tests."""
  _, loss, _ = _problem()
  return jax.jit(eva_optax.value_and_grad(loss, statistics=mode))


def _run(tx, mode, accumulate):
  """Two updates: 2 x K micro-steps (accumulate) or 2 steps on the 4x batch.

  Returns the emitted updates, every micro-step's update, the final state, the
  final parameters and, per emitted update, the last (gradient, state).
  """
  params, _, batches = _problem()
  grad_fn, update = _grad_fn(mode), jax.jit(tx.update)
  state = tx.init(params)
  emitted, every, inputs = [], [], []
  for micro in batches:
    for x, y in (micro if accumulate else [_concat(micro)]):
      _, grads, stats = grad_fn(params, x, y)
      updates, state = update(grads, state, params, stats=stats)
      params = optax.apply_updates(params, updates)
      every.append(updates)
    emitted.append(updates)
    inputs.append((grads, state))
  return emitted, every, state, params, inputs


@functools.lru_cache(maxsize=None)
def _reference(name):
  make, mode, lr = OPTIMIZERS[name]
  return _run(make(lr), mode, accumulate=False)


def _max_rel_err(tree, ref):
  return max(rel_err(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)))


def _assert_states_close(state, ref, tol):
  """Same structure; integer leaves (counters) equal, float leaves within
  ``tol`` (the running averages are the inputs, within INPUT_OPS; inverses,
  roots and momentum carry the step's conditioning, bounded by ``tol``)."""
  assert jax.tree.structure(state) == jax.tree.structure(ref)
  for leaf, r in zip(jax.tree.leaves(state), jax.tree.leaves(ref)):
    if jnp.issubdtype(r.dtype, jnp.integer):
      np.testing.assert_array_equal(leaf, r)
    elif np.any(np.asarray(r) != 0):
      assert rel_err(leaf, r) < tol
    else:
      np.testing.assert_array_equal(leaf, 0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_k_micro_steps_equal_one_step_on_the_concatenated_batch(name):
  make, mode, lr = OPTIMIZERS[name]
  ref_updates, _, ref_state, ref_params, ref_inputs = _reference(name)
  ms = eva_optax.MultiSteps(make(lr), every_k_schedule=K)
  updates, every, state, params, _ = _run(ms, mode, accumulate=True)

  # The emitted updates (both steps: running averages, momentum and counters
  # carry over) and the parameters. u1 = -lr P1, u2 = -lr (0.9 P1 + P2): each
  # P within its step's bound, + the trace's and scale's roundings (3).
  damping = 1e-4 if name == "shampoo" else 1e-6
  step_tols = [_step_tol(name, damping, g, st) for g, st in ref_inputs]
  leaves = lambda t: [np.asarray(v, np.float64) for v in jax.tree.leaves(t)]
  u1, u2 = leaves(ref_updates[0]), leaves(ref_updates[1])
  for i, (got, want) in enumerate(zip(updates, ref_updates)):
    for k, (a, b) in enumerate(zip(leaves(got), leaves(want))):
      p1, p2 = np.linalg.norm(u1[k]), np.linalg.norm(u2[k] - 0.9 * u1[k])
      bound = (step_tols[0] * p1 if i == 0 else 0.9 * step_tols[0] * p1 + step_tols[1] * p2)
      assert rel_err(a, b) < bound / np.linalg.norm(b) + float32_tol(1.0, 3), (name, i, k)
  tol = max(step_tols)
  # The parameters: p0 + u1 + u2 (each update within the above; 2 roundings).
  for a, b, d1, d2 in zip(leaves(params), leaves(ref_params), u1, u2):
    bound = tol * (np.linalg.norm(d1) + 2 * np.linalg.norm(d2)) + float32_tol(1.0, 2) * np.linalg.norm(b)
    assert np.linalg.norm(a - b) <= bound, name
  for i, u in enumerate(every):   # zeros in between
    if i % K != K - 1:
      for leaf in jax.tree.leaves(u):
        np.testing.assert_array_equal(leaf, 0.0)
  assert int(state.gradient_step) == 2 and int(state.mini_step) == 0
  assert bool(ms.has_updated(state))
  # The wrapped optimizer's state: the running averages of the statistics
  # (what reached it, scale included), inverses, momentum, every counter.
  _assert_states_close(state.inner_opt_state, ref_state, tol)
  # The comparison can fail: optax.MultiSteps (next test) is off by > 0.1.
  assert tol < 0.01, (name, tol)


def test_optax_multisteps_gets_eva_wrong():
  """The same comparison fails for optax.MultiSteps: it loses the statistics."""
  make, mode, lr = OPTIMIZERS["eva"]
  ref_updates, _, ref_state, _, _ = _reference("eva")
  updates, _, state, _, _ = _run(optax.MultiSteps(make(lr), K), mode, accumulate=True)
  assert _max_rel_err(updates[0], ref_updates[0]) > 0.1
  # Its running average of a is the last micro-batch's a (at the 2nd update:
  # 0.05 * the first update's last micro-batch + 0.95 * this one's).
  params, _, batches = _problem()
  a = [_grad_fn("vectors")(params, x, y)[2]["Dense_0"].a for x, y in
       (batches[0][-1], batches[1][-1])]
  lost = state.inner_opt_state[0].layers["Dense_0"]["a"]
  expected = ref_state[0].layers["Dense_0"]["a"]
  assert rel_err(lost, 0.05 * a[0] + 0.95 * a[1]) < 0.05
  assert rel_err(lost, expected) > 0.1


def _counting(tx, calls):
  """``tx`` whose update reports each run (not each trace) to ``calls``."""
  tx = optax.with_extra_args_support(tx)

  def update(updates, state, params=None, **extra):
    jax.debug.callback(lambda: calls.append(1))
    return tx.update(updates, state, params, **extra)
  return optax.GradientTransformationExtraArgs(tx.init, update)


def test_inner_update_runs_only_on_emitting_steps():
  """The preconditioner runs under lax.cond on 2 of 8 micro-steps (optax: all 8,
  which shows that the counter counts runs, not traces)."""
  params, _, batches = _problem()
  grad_fn = _grad_fn("vectors")
  for wrapper, inner, expected in ((eva_optax.MultiSteps, eva_optax.scale_by_eva(), 2),
                                   (optax.MultiSteps, optax.identity(), 2 * K)):
    calls = []
    ms = wrapper(_counting(inner, calls), K)
    update = jax.jit(ms.update)
    state = ms.init(params)
    for micro in batches:
      for x, y in micro:
        _, grads, stats = grad_fn(params, x, y)
        _, state = update(grads, state, params, stats=stats)
    jax.effects_barrier()
    assert len(calls) == expected, wrapper


@functools.lru_cache(maxsize=None)
def _eva():
  """``(tx, jitted update)`` of plain ``scale_by_eva`` at damping 1e-6, compiled once."""
  tx = eva_optax.scale_by_eva(damping=1e-6)
  return tx, jax.jit(tx.update)


def _accumulate(ms, micro, mode="vectors"):
  params, _, _ = _problem()
  grad_fn, update = _grad_fn(mode), jax.jit(ms.update)
  state = ms.init(params)
  for x, y in micro:
    _, grads, stats = grad_fn(params, x, y)
    updates, state = update(grads, state, params, stats=stats)
  return updates, state


def test_schedule_and_statistics_factor():
  """every_k_schedule as a function: 4, then 1 micro-step, each one big step."""
  params, _, batches = _problem()
  ms = eva_optax.MultiSteps(_eva()[0], lambda step: jnp.where(step == 0, 4, 1))
  update = jax.jit(ms.update)
  state = ms.init(params)
  ref, ref_update = _eva()
  ref_state = ref.init(params)
  grad_fn = _grad_fn("vectors")
  for group in (batches[0], batches[1][:1]):
    for x, y in group:
      _, grads, stats = grad_fn(params, x, y)
      updates, state = update(grads, state, params, stats=stats)
    assert bool(ms.has_updated(state))
    _, grads, stats = grad_fn(params, *_concat(group))
    ref_updates, ref_state = ref_update(grads, ref_state, params, stats=stats)
    tol = _step_tol("eva", 1e-6, grads, ref_state)
    assert _max_rel_err(updates, ref_updates) < tol
    _assert_states_close(state.inner_opt_state, ref_state, tol)


def test_summed_gradients_get_the_statistics_of_the_summed_loss():
  """use_grad_mean=False: the gradient of sum_i L_i = K * (mean loss), and its statistics.

  Under the loss ``K L`` every dL/dy is K times larger: the gradient is K times
  the 4x batch's, ``g`` too, ``a`` is unchanged.
  """
  params, _, batches = _problem()
  ref, ref_update = _eva()
  updates, state = _accumulate(
      eva_optax.MultiSteps(ref, K, use_grad_mean=False), batches[0])
  _, grads, stats = _grad_fn("vectors")(params, *_concat(batches[0]))
  grads = jax.tree.map(lambda g: K * g, grads)
  stats = {n: st.replace(g=K * st.g) for n, st in stats.items()}
  ref_updates, ref_state = ref_update(grads, ref.init(params), params, stats=stats)
  tol = _step_tol("eva", 1e-6, grads, ref_state)   # (K g: exact, a power of two)
  assert _max_rel_err(updates, ref_updates) < tol
  _assert_states_close(state.inner_opt_state, ref_state, tol)


def test_skipped_micro_step_changes_nothing():
  """A non-finite micro-step under skip_not_finite is as if it never happened."""
  params, _, batches = _problem()
  micro = batches[0]
  grad_fn = _grad_fn("vectors")
  ms = eva_optax.MultiSteps(eva_optax.scale_by_eva(damping=1e-6), K,
                            should_skip_update_fn=optax.skip_not_finite)
  update = jax.jit(ms.update)
  outs = []
  for poison in (False, True):
    state = ms.init(params)
    for i, (x, y) in enumerate(micro):
      _, grads, stats = grad_fn(params, x, y)
      if poison and i == 1:
        bad = jax.tree.map(lambda g: g * jnp.nan, grads)
        zeros, state = update(bad, state, params, stats=stats)
        assert int(state.mini_step) == 1 and bool(state.skip_state["should_skip"])
        for leaf in jax.tree.leaves(zeros):
          np.testing.assert_array_equal(leaf, 0.0)
      updates, state = update(grads, state, params, stats=stats)
    outs.append((updates, state))
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    if a.dtype != jnp.bool_:
      np.testing.assert_array_equal(a, b)


def test_gradient_only_optimizers_are_optax_multisteps():
  """Around optax's own optimizers it is optax.MultiSteps (stats are not passed on)."""
  params, _, batches = _problem()
  grad_fn = _grad_fn("vectors")
  ours, theirs = eva_optax.MultiSteps(optax.adam(1e-2), 3), optax.MultiSteps(optax.adam(1e-2), 3)
  s1, s2 = ours.init(params), theirs.init(params)
  assert s1.acc_stats == {}
  assert s1._fields[:5] == s2._fields       # optax's fields, in optax's order
  up1, up2 = jax.jit(ours.update), jax.jit(theirs.update)
  p1 = p2 = params
  moved = jax.tree.map(jnp.zeros_like, params)     # sum of |update| over the steps
  steps = 0
  for x, y in batches[0] + batches[1]:
    _, g1, stats = grad_fn(p1, x, y)
    u1, s1 = up1(g1, s1, p1, stats=stats)
    _, g2, _ = grad_fn(p2, x, y)
    u2, s2 = up2(g2, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    moved = jax.tree.map(lambda m, u: m + jnp.abs(u), moved, u2)
    steps += 1
    assert bool(ours.has_updated(s1)) == bool(theirs.has_updated(s2))
  # Each emitted Adam step: the 3 micro-gradients' mean (4 roundings), m and
  # v (5), the bias corrections, root, eps, division and learning rate (6);
  # m / sqrt(v) has relative condition 2 in g: 2 (4 + 5 + 6) each side, on
  # the step's size. p + u rounds once per micro-step on each side.
  for a, b, m in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), jax.tree.leaves(moved)):
    a, b, m = (np.asarray(v, np.float64) for v in (a, b, m))
    bound = 2 * float32_tol(2.0, 4 + 5 + 6) * m + 2 * steps * float32_tol(1.0, 1) * np.abs(b)
    assert np.all(np.abs(a - b) <= bound)
  assert isinstance(ours.gradient_transformation(), optax.GradientTransformationExtraArgs)


def test_errors():
  params, _, batches = _problem()
  x, y = batches[0][0]
  with pytest.raises(ValueError, match="every_k_schedule must be >= 1"):
    eva_optax.MultiSteps(eva_optax.eva(0.1), 0)
  with pytest.raises(TypeError, match="every_k_schedule must be an int"):
    eva_optax.MultiSteps(eva_optax.eva(0.1), 2.5)
  with pytest.raises(TypeError, match="opt must be an optax GradientTransformation"):
    eva_optax.MultiSteps(lambda g: g, 2)
  ms = eva_optax.MultiSteps(eva_optax.eva(0.1), 2)
  state = ms.init(params)
  _, grads, stats = _grad_fn("vectors")(params, x, y)
  _, _, rows = jax.eval_shape(_grad_fn("rows"), params, x, y)
  with pytest.raises(ValueError, match="statistics='rows'.*cannot be accumulated"):
    jax.eval_shape(ms.update, grads, state, params, stats=rows)
  with pytest.raises(ValueError, match="needs layer statistics"):
    jax.eval_shape(ms.update, grads, state, params)
  del stats["Dense_1"]
  with pytest.raises(ValueError, match="no statistics for layers \\['Dense_1'\\]"):
    jax.eval_shape(ms.update, grads, state, params, stats=stats)
