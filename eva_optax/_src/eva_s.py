"""Eva-s: vectorized Shampoo, a per-tensor rank-one preconditioner in closed form.

Shampoo keeps one ``d_i x d_i`` statistic per axis of a gradient tensor ``T``
and applies their inverse roots. Eva-s keeps one *vector* per axis instead,
``s_i`` = the mean of ``T`` over all other axes, and inverts the rank-one
Kronecker product ``u u^T + gamma I`` with ``u = s_1 (x) ... (x) s_r`` by
Sherman-Morrison, so no matrix is formed or inverted. The state per tensor is
``sum_i d_i`` floats. It needs the gradient only (no layer statistics).

References:
  Zhang et al., "Eva: A General Vectorized Approximation Framework for
  Second-order Optimization" (the journal version of `Eva: Practical
  Second-order Optimization with Kronecker-vectorized Approximation
  <https://openreview.net/forum?id=_Mic8V96Voy>`_, ICLR 2023), and the
  authors' ``shampoo/vshampoo.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax._src import counters
from eva_optax._src import tree_utils
from eva_optax._src import validation
from eva_optax._src.training_chain import training_chain

Array = jax.Array

# Added to the norm of the preconditioned tensor before the rescale (as the authors).
_GRAFT_EPS = 1e-16



def _is_preconditioned(leaf: Any) -> bool:
  """Tensors of rank >= 2 (kernels, conv kernels) get Eva-s; the rest pass."""
  return hasattr(leaf, "ndim") and leaf.ndim >= 2 and leaf.size > 0


def rank_one_tensor(vectors: list[Array]) -> Array:
  """``s_1 o s_2 o ... o s_r`` as a tensor of shape ``(len(s_1), ..., len(s_r))``."""
  out = vectors[0]
  for v in vectors[1:]:
    out = out[..., None] * v.reshape((1,) * out.ndim + v.shape)
  return out


def eva_s_solve(t: Array, vectors: list[Array], damping: Array) -> Array:
  """``(u u^T + damping I)^{-1} vec(T)`` with ``u = s_1 (x) ... (x) s_r`` (per tensor).

  .. math::
    P = \\frac{1}{\\gamma}\\Big[T - \\frac{\\langle T, s_1\\circ\\cdots\\circ s_r\\rangle}
        {\\gamma + \\prod_i \\|s_i\\|^2}\\, s_1\\circ\\cdots\\circ s_r\\Big]
  """
  c = t
  for v in vectors:   # contract the leading axis with each s_i in turn
    c = jnp.tensordot(v, c, axes=(0, 0))
  mu = 1.0
  for v in vectors:
    mu = mu * jnp.vdot(v, v)
  return (t - (c / (damping + mu)) * rank_one_tensor(vectors)) / damping


def mean_vectors(t: Array) -> tuple[Array, ...]:
  """``s_i`` = mean of ``t`` over every axis but ``i``, one vector per axis."""
  axes = range(t.ndim)
  return tuple(jnp.mean(t, axis=tuple(j for j in axes if j != i)) for i in axes)



class ScaleByEvaSState(NamedTuple):
  """State of :func:`scale_by_eva_s`: one running vector per tensor axis."""

  count: Array            # shape=(), dtype=jnp.int32: update calls so far.
  stats_count: Array      # shape=(), dtype=jnp.int32: statistics accumulated.
  nonfinite_count: Array  # shape=(), dtype=jnp.int32: statistics skipped as non-finite.
  skipped_count: Array    # shape=(), int32: updates replaced by zeros (non-finite).
  invalid_hparam_count: Array  # shape=(), int32: steps skipped for a bad run-time hyperparameter.
  # Like params: a tuple (s_1, ..., s_r) of float32 vectors per leaf of rank
  # r >= 2, an empty tuple for the leaves that pass through.
  vectors: Any


def scale_by_eva_s(
    damping: Any = 0.03,
    stat_decay: Any = None,
    *,
    stats_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Eva-s preconditioning only (no momentum, weight decay or learning rate).

  For every parameter tensor ``T`` of rank ``r >= 2`` (a Dense kernel, or a
  conv kernel kept 4-D in Flax layout ``(kh, kw, C_in, C_out)``), Eva-s keeps one
  float32 vector per axis, accumulated from ``mean_{axes != i}(T)``, and applies
  the inverse of ``u u^T + gamma I``, ``u = s_1 (x) ... (x) s_r``, in closed form:

  .. math::
    P = (u u^T + \\gamma I)^{-1}\\mathrm{vec}(T)
      = \\frac{1}{\\gamma}\\Big[T - \\frac{\\langle T, s_1\\circ\\cdots\\circ s_r\\rangle}
        {\\gamma + \\prod_i \\|s_i\\|^2}\\, s_1\\circ\\cdots\\circ s_r\\Big],
    \\qquad P \\leftarrow P\\,\\frac{\\|T\\|_F}{\\|P\\|_F + 10^{-16}}.

  The second step is the authors' layer-wise rescale ("grafting" to the
  gradient norm): each tensor's update has the norm of its gradient, so the
  ``1/gamma`` factor cancels and ``gamma`` only sets how much of the component
  along ``s_1 o ... o s_r`` is removed (the fraction ``mu / (gamma + mu)``,
  ``mu = prod_i |s_i|^2``). The update is the same for any axis order, so the
  Flax and PyTorch kernel layouts give the same preconditioner.

  Statistics: with ``stat_decay=None`` (the default, the authors' ``beta2 = 1``)
  ``s_i`` is a running *sum* of the per-step mean vectors, starting from zero,
  so the first step uses the current gradient's own means. With a float,
  ``s_i <- (1 - stat_decay) s_i + stat_decay * mean_i(T)`` (``stat_decay`` is
  the weight of the NEW statistic, as everywhere in this library, which is
  ``1 - beta2`` of the authors' Google convention) and the first observation
  initialises ``s_i``. Statistics are folded in when ``count % stats_every == 0``
  (so at step 0 too), before preconditioning; non-finite statistics are skipped
  (the whole step's) and counted in ``nonfinite_count``.

  Tensors of rank <= 1 (biases, norms) pass through unchanged. Everything is
  computed in float32; updates come back in the gradient dtype. ``update``
  ignores extra keyword arguments (``stats=`` may be passed as to every other
  optimizer of the library). See :func:`eva_optax.eva_s` for the full optimizer.

  Args:
    damping: ``gamma > 0`` (the paper's 0.03), a float or a schedule.
    stat_decay: ``None`` for a running sum (the authors' setting), or the
      weight in ``[0, 1]`` of the new statistic of a running average (float or
      schedule).
    stats_every: accumulate statistics every this many steps (>= 1).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Zhang et al., "Eva: A General Vectorized Approximation Framework for
    Second-order Optimization" (journal version of the ICLR 2023 paper),
    section "Eva-s"; the authors' ``dev:shampoo/vshampoo.py``.
  """
  validation.check_positive(
      "damping", damping,
      fix="Eva-s inverts u u^T + damping * I; the paper uses 0.03.")
  if stat_decay is not None:
    validation.check_unit_interval(
        "stat_decay", stat_decay,
        fix="It is the weight of the NEW statistic; None keeps a running sum "
        "(the authors' setting).")
  validation.check_interval("stats_every", stats_every)

  def init_fn(params):
    def init_leaf(p):
      if not _is_preconditioned(p):
        return ()
      return tuple(jnp.zeros((d,), jnp.float32) for d in p.shape)
    return ScaleByEvaSState(
        **counters.zero_counters(),
        vectors=jax.tree.map(init_leaf, params))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    old = tree_utils.leaves_like(treedef, state.vectors, "eva_s")
    count = state.count
    gamma = jnp.asarray(validation.value_at(damping, count), jnp.float32)

    with jax.default_matmul_precision("highest"):
      tensors = [g.astype(jnp.float32) if _is_preconditioned(g) else None
                 for g in leaves]
      obs = [mean_vectors(t) if t is not None else () for t in tensors]
      vectors, due, finite = counters.fold_statistics(
          state, old, obs, stat_decay, stats_every)

      out = []
      for g, t, vs in zip(leaves, tensors, vectors):
        if t is None:
          out.append(g)
          continue
        p = eva_s_solve(t, list(vs), gamma)
        scale = jnp.sqrt(jnp.sum(t * t)) / (jnp.sqrt(jnp.sum(p * p)) + _GRAFT_EPS)
        out.append((p * scale).astype(g.dtype))

    new_state = ScaleByEvaSState(
        **counters.advance_counters(state, due, finite),
        vectors=jax.tree.unflatten(treedef, vectors))
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def eva_s(
    learning_rate: Any,
    momentum: Any = 0.9,
    weight_decay: Any = 0.0,
    damping: Any = 0.03,
    stat_decay: Any = None,
    *,
    stats_every: int = 1,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Eva-s (vectorized Shampoo), trained the way the paper trains it.

  ``chain(scale_by_eva_s, add_decayed_weights(weight_decay), trace(momentum),
  scale_by_learning_rate(learning_rate))``: the preconditioned (and rescaled)
  gradient of every tensor of rank >= 2, the plain gradient for the rest, then
  weight decay (never preconditioned), heavy-ball momentum and the learning rate.

  .. math::
    d_t = P(T_t) + \\lambda w_t, \\quad m_t = \\mu m_{t-1} + d_t, \\quad
    w_{t+1} = w_t - \\eta_t m_t.

  Unlike the authors' code, the momentum buffer is updated once per step: their
  Google-reference ``momentum_update`` aliases the buffer, so with their default
  ``nesterov=True`` it computes ``m_t = mu^2 m_{t-1} + (1 + mu) d_t``. Eva-s needs
  no layer statistics; passing ``stats=`` to ``update`` is harmless.

  Args:
    learning_rate: float or optax schedule.
    momentum: heavy-ball momentum (0.9 in the paper); 0 for none.
    weight_decay: added after preconditioning (5e-4 on CIFAR in the paper).
    damping: ``gamma`` (0.03 in the paper).
    stat_decay: ``None`` for the authors' running sum of the mean vectors, or
      the weight of the new statistic of a running average.
    stats_every: statistics interval in steps (1 in the paper).
    nesterov: Nesterov momentum instead of heavy ball.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, eva_optax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16, 2))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
    >>> tx = eva_optax.eva_s(learning_rate=0.1)
    >>> opt_state = tx.init(params)
    >>> loss, grads = jax.value_and_grad(loss_fn)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Zhang et al., "Eva: A General Vectorized Approximation Framework for
    Second-order Optimization" (journal version of `Eva: Practical Second-order
    Optimization with Kronecker-vectorized Approximation
    <https://openreview.net/forum?id=_Mic8V96Voy>`_, ICLR 2023).
  """
  pre = scale_by_eva_s(damping, stat_decay, stats_every=stats_every)
  return training_chain(pre, learning_rate, momentum, weight_decay, nesterov)
