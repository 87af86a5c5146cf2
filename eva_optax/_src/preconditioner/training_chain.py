"""How the paper trains every preconditioner: the torch ``SGD`` step after it.

``d = P(grad) + wd * w;  buf = momentum * buf + d;  w = w - lr * buf``: weight
decay is added after preconditioning (never preconditioned), then heavy-ball
momentum, then the learning rate. This module builds that chain for the six
aliases (:func:`training_chain`, :func:`alias`) with optax's conventions:

* one state structure whatever the hyperparameters' types: a Python number, an
  array, a schedule or a value injected by :func:`optax.inject_hyperparams`
  give the same state, so checkpoints carry over (only ``momentum=None``, no
  momentum buffer, and ``mu_dtype`` change it, as in optax);
* ``weight_decay_mask`` as ``optax.adamw(mask=...)``: a pytree of booleans (or a
  prefix of one) or a callable of the params returning one;
* ``momentum=None`` means no momentum (``optax.sgd``'s convention);
* ``mu_dtype``: the dtype of the momentum buffer (``None``: the parameters').
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eva_optax._src.preconditioner import validation

Array = jax.Array
MaskOrFn = Any | Callable[[optax.Params], Any] | None

_NO_PARAMS = (
    "weight decay needs params: call tx.update(grads, opt_state, params). Only "
    "a Python zero weight_decay (the default) works without them; a "
    "weight_decay given as an array, a schedule or through "
    "optax.inject_hyperparams needs params even when its value is 0.")


class AddDecayedWeightsState(NamedTuple):
  """State of :func:`add_decayed_weights`.

  Attributes:
    count: update calls so far (the step at which a schedule is evaluated);
      kept whatever the type of ``weight_decay``, so the state has one
      structure.
  """

  count: Array  # shape=(), dtype=jnp.int32.


def _full_mask(mask: Any, params: Any) -> Any:
  """``mask`` (a tree of booleans, or a prefix of one) broadcast to ``params``."""
  try:
    return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "weight_decay_mask does not match params: give a tree of booleans with "
        "the structure of params (or a prefix of it), or a callable that returns "
        f"one from params: {e}") from e


def add_decayed_weights(
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """``u + lambda_t w`` on the leaves that ``mask`` selects (all by default).

  Like :func:`optax.add_decayed_weights`, but with ONE state structure for a
  number, an array and a schedule (optax's is ``EmptyState`` for a number and
  a count for a schedule, and its mask adds a ``MaskedState``), and, for a
  Python zero, no ``params`` needed.

  Args:
    weight_decay: ``lambda >= 0``, a number, an array or a schedule of the step.
    mask: a tree of booleans with the structure of the params (or a prefix of
      it), or a callable returning one from the params; ``True`` leaves are
      decayed. ``None`` decays every leaf.

  Returns:
    An :class:`optax.GradientTransformation` whose state is
    :class:`AddDecayedWeightsState`.

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """

  def init_fn(params):
    del params
    return AddDecayedWeightsState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    new_state = AddDecayedWeightsState(count=optax.safe_increment(state.count))
    if validation.is_zero(weight_decay):   # nothing to add: params not needed
      return updates, new_state
    if params is None:
      raise ValueError(_NO_PARAMS)
    wd = validation.value_at(weight_decay, state.count)
    selected = None
    if mask is not None:
      selected = _full_mask(mask(params) if callable(mask) else mask, params)

    def decay(g, p, m=True):
      if g is None:
        return None
      step = g + jnp.asarray(wd, g.dtype) * p.astype(g.dtype)
      if isinstance(m, (bool, np.bool_)):
        return step if m else g
      return jnp.where(m, step, g)

    if selected is None:
      out = jax.tree.map(decay, updates, params, is_leaf=lambda x: x is None)
    else:
      out = jax.tree.map(decay, updates, params, selected,
                         is_leaf=lambda x: x is None)
    return out, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _trace(momentum: chex.Numeric, nesterov: bool,
           mu_dtype: Any) -> optax.GradientTransformation:
  """:func:`optax.trace` whose updates keep the incoming dtype (``mu_dtype`` is
  the buffer's only; a float32 buffer does not turn bf16 updates into float32)."""
  inner = optax.trace(decay=momentum, nesterov=nesterov,
                      accumulator_dtype=mu_dtype)

  def update_fn(updates, state, params=None):
    new, state = inner.update(updates, state, params)
    new = jax.tree.map(lambda n, u: n.astype(u.dtype), new, updates)
    return new, state

  return optax.GradientTransformation(inner.init, update_fn)


def _scale_by_learning_rate(
    learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """``-lr_t u`` with a step count in the state for a number and a schedule alike."""
  return optax.scale_by_schedule(
      lambda count: -validation.value_at(learning_rate, count))


def training_chain(
    preconditioner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    momentum: chex.Numeric | None = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    nesterov: bool = False,
    *,
    weight_decay_mask: MaskOrFn = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """The paper's SGD step after a preconditioner.

  .. math::
    d_t = P(g_t) + \\lambda_t\\, m \\odot w_t, \\qquad
    b_t = \\mu\\, b_{t-1} + d_t, \\qquad
    w_{t+1} = w_t - \\eta_t\\, b_t

  (``b_t`` is returned as ``mu b_t + d_t`` with ``nesterov``; ``m`` is the
  weight-decay mask). The chain is ``(preconditioner, add_decayed_weights,
  trace, scale_by_schedule(-lr))`` and its state has that structure whatever
  the hyperparameters' types; ``momentum=None`` leaves the ``trace`` out.

  Args:
    preconditioner: the transformation whose output ``P(g)`` is decayed,
      accumulated and scaled (any optax transformation; extra arguments of
      ``update`` such as ``stats=`` reach it).
    learning_rate: ``eta``, a number, an array or an optax schedule.
    momentum: heavy-ball ``mu`` in ``[0, 1]`` (0.9 in the paper), or ``None``
      for no momentum and no buffer (``optax.sgd``'s convention); 0 keeps a
      buffer, so that it has the structure of an injected momentum.
    weight_decay: ``lambda >= 0`` added after preconditioning (never
      preconditioned), a number, an array or a schedule. A Python zero needs
      no ``params`` in ``update``.
    nesterov: Nesterov momentum instead of heavy ball.
    weight_decay_mask: as ``optax.adamw(mask=...)``: a tree of booleans with
      the params' structure (or a prefix of it), or a callable returning one
      from the params; ``True`` leaves are decayed. ``None``: all of them.
      With :func:`optax.inject_hyperparams`, pass a callable mask in
      ``static_args``.
    mu_dtype: dtype of the momentum buffer (``None``: the parameters' dtype);
      updates keep the gradient dtype. With :func:`optax.inject_hyperparams`
      give it as a string or pass it in ``static_args`` (a dtype class such as
      ``jnp.bfloat16`` is callable, so optax would take it for a schedule).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  References:
    Zhang et al., `Eva: Practical Second-order Optimization with
    Kronecker-vectorized Approximation <https://openreview.net/forum?id=_Mic8V96Voy>`_,
    ICLR 2023 (the training step of its experiments: torch SGD after the
    preconditioner).
  """
  check_training_hyperparameters(learning_rate, momentum, weight_decay,
                                 weight_decay_mask, mu_dtype)
  parts = [preconditioner,
           add_decayed_weights(weight_decay, weight_decay_mask)]
  if momentum is not None:
    parts.append(_trace(momentum, nesterov,
                        validation.check_dtype("mu_dtype", mu_dtype)))
  parts.append(_scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def check_training_hyperparameters(learning_rate: Any, momentum: Any,
                                   weight_decay: Any, weight_decay_mask: Any,
                                   mu_dtype: Any) -> None:
  """The eager checks of :func:`training_chain`'s own arguments."""
  validation.check_nonnegative(
      "learning_rate", learning_rate,
      fix="It is the step size eta (a number or an optax schedule).")
  validation.check_nonnegative(
      "weight_decay", weight_decay,
      fix="It is added as weight_decay * params after preconditioning.")
  if momentum is not None:
    validation.check_not_schedule("momentum", momentum)
    validation.check_unit_interval(
        "momentum", momentum, fix="Use None (or 0) for no momentum.")
  if weight_decay_mask is not None and isinstance(weight_decay_mask,
                                                  (str, bytes, int, float)):
    raise TypeError(
        "weight_decay_mask must be a tree of booleans like params, a callable "
        f"returning one, or None; got weight_decay_mask={weight_decay_mask!r}.")
  validation.check_dtype("mu_dtype", mu_dtype)


def alias(scale_by: Callable[..., optax.GradientTransformationExtraArgs],
          learning_rate: Any, momentum: Any, weight_decay: Any, damping: Any,
          stat_decay: Any, *, kl_clip: float | None, kl_normalize: bool | None,
          default_scaling: str, nesterov: bool, weight_decay_mask: Any = None,
          mu_dtype: Any = None,
          **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """``training_chain(scale_by(...))`` with the alias' scaling resolved.

  The chain's own arguments are checked first, so that a bad one is reported
  before the preconditioner's.
  """
  check_training_hyperparameters(learning_rate, momentum, weight_decay,
                                 weight_decay_mask, mu_dtype)
  if kl_clip is not None and kl_normalize:
    raise ValueError("Pass either kl_clip (ICLR KL-clip) or kl_normalize=True "
                     "(journal KL-normalization), not both.")
  if kl_normalize is None:
    kl_normalize = kl_clip is None and default_scaling == "kl_normalize"
  pre = scale_by(damping, stat_decay, kl_clip=kl_clip, kl_normalize=kl_normalize,
                 learning_rate=learning_rate if kl_clip is not None else None,
                 **kwargs)
  return training_chain(pre, learning_rate, momentum, weight_decay, nesterov,
                        weight_decay_mask=weight_decay_mask, mu_dtype=mu_dtype)
