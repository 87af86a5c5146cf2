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

import chex
import jax
import jax.numpy as jnp
import optax

from eva_optax._src.preconditioner import per_tensor
from eva_optax._src.linalg import rank_one
from eva_optax._src.preconditioner import training_chain
from eva_optax._src.preconditioner import validation

Array = jax.Array


def _axis_key(i: int) -> str:
  return f"axis_{i}"


class ScaleByEvaSState(NamedTuple):
  """State of :func:`scale_by_eva_s`.

  Attributes:
    count: update calls so far (int32 scalar).
    stats_count: statistics folded into the running vectors.
    nonfinite_count: steps whose statistics were due but not folded because
      the gradient was not finite.
    skipped_count: steps whose update was replaced by zeros because the
      gradient (or, never expected, the result) was not finite.
    invalid_hparam_count: steps skipped (zero update, nothing folded) because
      ``damping``, ``stat_decay`` or a graft option given as an array, a
      schedule or through :func:`optax.inject_hyperparams` was out of range or
      not finite at that step.
    vectors: like the parameters (their boxes and NNX variables removed): for
      a leaf of rank >= 2 a dict ``{"axis_0": s_0, ..., "axis_{r-1}": s_{r-1}}``
      of float32 vectors (``len(s_i)`` = the tensor's ``shape[i]``; a stacked
      layer's leaf has the stack's axes in front); ``None`` for the leaves that
      are not preconditioned.
    graft: like the parameters: the graft's float32 accumulator per leaf (the
      AdaGrad root sum of squares or the RMSProp RMS), or ``None`` for every
      leaf with ``graft="sgd"``.
  """

  count: Array            # shape=(), dtype=jnp.int32.
  stats_count: Array      # shape=(), dtype=jnp.int32.
  nonfinite_count: Array  # shape=(), dtype=jnp.int32.
  skipped_count: Array    # shape=(), dtype=jnp.int32.
  invalid_hparam_count: Array  # shape=(), dtype=jnp.int32.
  vectors: Any
  graft: Any


def _vectors(state: dict[str, Array]) -> list[Array]:
  return [state[_axis_key(i)] for i in range(len(state))]


EVA_S = per_tensor.TensorMethod(
    name="eva_s",
    init=lambda shape: {_axis_key(i): jnp.zeros((d,), jnp.float32)
                        for i, d in enumerate(shape)},
    observe=lambda t: {_axis_key(i): s
                       for i, s in enumerate(rank_one.mean_vectors(t))},
    merge=lambda old, new, w_old, w_new: {
        k: w_old * old[k] + w_new * new[k] for k in old},
    direction=lambda t, s, gamma: rank_one.eva_s_direction(t, _vectors(s), gamma),
    describe=lambda s: "vectors of lengths " + str(
        tuple(int(v.shape[-1]) for v in _vectors(s))))


def scale_by_eva_s(
    damping: optax.ScalarOrSchedule = 0.03,
    stat_decay: optax.ScalarOrSchedule | None = None,
    *,
    stats_every: int = 1,
    graft: str = "sgd",
    graft_decay: chex.Numeric = 0.999,
    graft_eps: chex.Numeric = 1e-8,
    layer_views: Any = None,
    distribute_over: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva-s preconditioning only (no momentum, weight decay or learning rate).

  For every parameter tensor ``T`` of rank ``r >= 2`` (a Dense kernel, or a
  conv kernel kept 4-D in Flax layout ``(kh, kw, C_in, C_out)``), Eva-s keeps one
  float32 vector per axis, accumulated from ``mean_{axes != i}(T)``, and applies
  the inverse of ``u u^T + gamma I``, ``u = s_1 (x) ... (x) s_r``, in closed form,
  then grafts:

  .. math::
    P = (u u^T + \\gamma I)^{-1}\\mathrm{vec}(T)
      = \\frac{1}{\\gamma}\\Big[T - \\frac{\\langle T, s_1\\circ\\cdots\\circ s_r\\rangle}
        {\\gamma + \\prod_i \\|s_i\\|^2}\\, s_1\\circ\\cdots\\circ s_r\\Big],
    \\qquad U = \\frac{P}{\\|P\\|_F}\\, \\|S(T)\\|_F,

  with ``S`` the graft's step (``graft="sgd"``: ``S(T) = T``, the authors'
  layer-wise rescale to the gradient norm). How the scale relates to the alias:
  grafting sets the size of each tensor's update, so the ``1/gamma`` of the raw
  ``F^{-1} T`` cancels and ``gamma`` only sets how much of the component along
  ``s_1 o ... o s_r`` is removed (the fraction ``mu / (gamma + mu)``,
  ``mu = prod_i |s_i|^2``); :func:`eva_optax.eva_s` then applies momentum and
  the learning rate to ``U``. The update is the same for any axis order, so the
  Flax and PyTorch kernel layouts give the same preconditioner.

  Statistics: with ``stat_decay=None`` (the default, the authors' ``beta2 = 1``)
  ``s_i`` is a running *sum* of the per-step mean vectors, starting from zero,
  so the first step uses the current gradient's own means. With a number,
  ``s_i <- (1 - stat_decay) s_i + stat_decay * mean_i(T)`` (``stat_decay`` is
  the weight of the NEW statistic, as everywhere in this library, which is
  ``1 - beta2`` of the authors' Google convention) and the first observation
  initialises ``s_i``. Statistics are folded in when ``count % stats_every == 0``
  (so at step 0 too), before preconditioning.

  Numerics and safety: any finite gradient gives a finite update with the
  direction of the float64 closed form (no overflow of ``mu`` or of
  ``<T, u>``, no cancellation for a rank-one gradient: see
  :func:`eva_optax._src.rank_one.eva_s_direction`);
  a non-finite gradient gives a zero update, folds nothing and counts in
  ``skipped_count`` (and ``nonfinite_count`` when statistics were due); a
  ``damping``, ``stat_decay`` or graft option given as an array or a schedule
  (or injected) that is out of range at a step gives a zero update, folds
  nothing and counts in ``invalid_hparam_count``; a state initialised for
  other parameters raises a ``ValueError`` naming the leaf and both shapes.

  Tensors of rank <= 1 (biases, norms) get the graft's step (their gradient for
  ``"sgd"``). Stacked layers (``nn.scan``, ``nn.vmap``; from ``layer_views``,
  else from the shapes where a bias reveals the stack, as the layer-wise
  optimizers read them): each slice along the stack's axes is a tensor of its own,
  with its own vectors and its own graft norm (vectorized over the slices).
  Everything is computed in float32; updates come back in the
  gradient dtype. ``update`` ignores extra keyword arguments (``stats=`` may be
  passed as to every other optimizer of the library). See
  :func:`eva_optax.eva_s` for the full optimizer.

  Args:
    damping: ``gamma > 0`` (the paper's 0.03), a number, an array or a schedule.
    stat_decay: ``None`` for a running sum (the authors' setting), or the
      weight in ``[0, 1]`` of the new statistic of a running average (a number,
      an array or a schedule).
    stats_every: accumulate statistics every this many steps (>= 1).
    graft: whose step size each tensor gets: ``"sgd"`` (the gradient's norm,
      the paper's setting), ``"adagrad"`` or ``"rmsprop"`` (Adam's
      bias-corrected second moment); see :mod:`eva_optax._src.preconditioner.grafting`. Pick
      ``"adagrad"`` or ``"rmsprop"`` for Adam-like learning rates: with
      ``"sgd"`` the learning rate must be one at which SGD itself is stable.
    graft_decay: RMSProp's ``beta`` (weight of the old second moment).
    graft_eps: added to the root of the graft's second moment.
    layer_views: the capture's views (:func:`eva_optax.layer_views`, or the
      statistics), for stacked layers: a leaf of a layer with a stack of
      ``k`` axes is ``k`` axes of slices, each preconditioned alone. ``None``:
      the stacks the shapes reveal (a stacked kernel with its stacked bias);
      a bias-free stacked kernel then reads as one tensor, so give the views
      for scanned bias-free layers.

    distribute_over: accepted for symmetry with Shampoo (a mesh axis name):
      Eva-s has no refresh to split (its closed form is a few vector
      operations per tensor, cheaper than any collective), so every device
      computes it; the axis is checked like Shampoo's.
    mesh: the mesh ``distribute_over`` refers to, where no ``jax.set_mesh``
      sets it.
  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScaleByEvaSState`.

  References:
    Zhang et al., "Eva: A General Vectorized Approximation Framework for
    Second-order Optimization" (journal version of the ICLR 2023 paper),
    section "Eva-s"; the authors' ``dev:shampoo/vshampoo.py``. Agarwal et al.,
    `Disentangling Adaptive Gradient Methods from Learning Rates
    <https://arxiv.org/abs/2002.11803>`_, 2020 (grafting).
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
  return per_tensor.per_tensor_preconditioner(
      EVA_S, damping=damping, stat_decay=stat_decay, stats_every=stats_every,
      state_class=ScaleByEvaSState, graft=graft, graft_decay=graft_decay,
      graft_eps=graft_eps, layer_views=layer_views,
      distribute_over=distribute_over, mesh=mesh)


def eva_s(
    learning_rate: optax.ScalarOrSchedule,
    momentum: chex.Numeric | None = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    damping: optax.ScalarOrSchedule = 0.03,
    stat_decay: optax.ScalarOrSchedule | None = None,
    *,
    stats_every: int = 1,
    graft: str = "sgd",
    graft_decay: chex.Numeric = 0.999,
    graft_eps: chex.Numeric = 1e-8,
    nesterov: bool = False,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    layer_views: Any = None,
    distribute_over: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva-s (vectorized Shampoo), trained the way the paper trains it.

  ``chain(scale_by_eva_s, add_decayed_weights(weight_decay), trace(momentum),
  scale_by_learning_rate(learning_rate))``: the preconditioned and grafted
  gradient of every tensor of rank >= 2, the graft's step for the rest (the
  gradient with ``graft="sgd"``), then weight decay (never preconditioned),
  heavy-ball momentum and the learning rate.

  .. math::
    d_t = U(T_t) + \\lambda_t w_t, \\quad m_t = \\mu m_{t-1} + d_t, \\quad
    w_{t+1} = w_t - \\eta_t m_t.

  Unlike the authors' code, the momentum buffer is updated once per step: their
  Google-reference ``momentum_update`` aliases the buffer, so with their default
  ``nesterov=True`` it computes ``m_t = mu^2 m_{t-1} + (1 + mu) d_t``. Eva-s needs
  no layer statistics; passing ``stats=`` to ``update`` is harmless.

  Which graft: the paper's ``"sgd"`` gives each tensor the gradient's norm, so
  the learning rate must be one at which heavy-ball SGD is stable on the
  problem (on Rosenbrock, curvature ~1000, that is ``lr < 3.8e-3``: at 1e-2
  Eva-s diverges like SGD); ``"adagrad"`` or ``"rmsprop"`` give steps of about
  ``lr`` per coordinate, for Adam-like learning rates.

  Which statistics: with the paper's running sum (``stat_decay=None``) the
  vectors grow like ``t``, so ``mu = prod_i |s_i|^2`` grows like ``t^(2r)`` and
  Eva-s soon stops moving along ``s_1 o ... o s_r`` (it keeps the fraction
  ``gamma / (gamma + mu)`` of that component). On a problem whose remaining
  error lies along that direction (optax's 2x2 "matrix parabola") it stalls,
  and with SGD grafting, whose step keeps the gradient's norm, it oscillates
  across it. A running average (``stat_decay=0.05``, the authors' earlier
  ``beta2 = 0.95``) keeps ``mu`` at the scale of the current gradient.

  Args:
    learning_rate: ``eta``, a number, an array or an optax schedule.
    momentum: heavy-ball ``mu`` (0.9 in the paper); ``None`` for no momentum
      and no buffer, as ``optax.sgd``.
    weight_decay: ``lambda`` added after preconditioning (5e-4 on CIFAR in the
      paper); a number, an array or a schedule.
    damping: ``gamma`` (0.03 in the paper); a number, an array or a schedule.
    stat_decay: ``None`` for the authors' running sum of the mean vectors, or
      the weight of the new statistic of a running average.
    stats_every: statistics interval in steps (1 in the paper).
    graft: ``"sgd"`` (the paper), ``"adagrad"`` or ``"rmsprop"``; see
      :func:`scale_by_eva_s`.
    graft_decay: RMSProp's ``beta`` for ``graft="rmsprop"``.
    graft_eps: added to the root of the graft's second moment.
    nesterov: Nesterov momentum instead of heavy ball.
    weight_decay_mask: which leaves are decayed, as ``optax.adamw(mask=...)``:
      a tree of booleans like the params (or a prefix), or a callable of the
      params returning one; ``None`` decays all.
    mu_dtype: dtype of the momentum buffer (``None``: the parameters').
    layer_views: for stacked layers (``nn.scan``), the capture's views; see
      :func:`scale_by_eva_s`.

    distribute_over: accepted for symmetry with Shampoo; see
      :func:`scale_by_eva_s` (Eva-s has no refresh to split).
    mesh: the mesh of ``distribute_over`` where ``jax.set_mesh`` does not set it.
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
  training_chain.check_training_hyperparameters(
      learning_rate, momentum, weight_decay, weight_decay_mask, mu_dtype)
  pre = scale_by_eva_s(damping, stat_decay, stats_every=stats_every,
                       graft=graft, graft_decay=graft_decay,
                       graft_eps=graft_eps, layer_views=layer_views,
                       distribute_over=distribute_over, mesh=mesh)
  return training_chain.training_chain(
      pre, learning_rate, momentum, weight_decay, nesterov,
      weight_decay_mask=weight_decay_mask, mu_dtype=mu_dtype)
