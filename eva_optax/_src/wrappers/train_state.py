"""A Flax ``TrainState`` whose ``apply_gradients`` passes the layer statistics on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optax
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state


class TrainState(train_state.TrainState):
  """:class:`flax.training.train_state.TrainState` that forwards ``stats`` to ``tx.update``.

  Flax's ``apply_gradients(grads=..., **kwargs)`` treats every extra keyword as
  a field to ``replace``, so ``state.apply_gradients(grads=grads, stats=stats)``
  never hands the statistics to the optimizer and Eva, Eva-f, K-FAC and FOOF
  raise "needs layer statistics". Here ``stats`` goes to the optimizer:

  .. math::
    (u, s_{t+1}) = \\mathrm{tx.update}(\\nabla L, s_t, w_t, \\mathrm{stats}),
    \\qquad w_{t+1} = w_t + u,

  and everything else is Flax's ``TrainState``: the same fields, ``create``
  unchanged, ``step`` incremented, other keywords replaced, Flax's fp8
  ``OVERWRITE_WITH_GRADIENT`` collection honoured (its statistics are not
  preconditioned: stats nested under ``"params"`` are passed as
  ``stats["params"]``, like the gradients). ``stats=None`` (or omitted) calls
  ``tx.update`` without them, as Flax does, for optimizers that need none
  (Eva-s, Shampoo, optax's own); a plain ``optax.GradientTransformation``
  given ``stats`` ignores them. ``tx`` may also be a
  :class:`eva_optax.MultiSteps` object (or its ``gradient_transformation()``).
  It is a pytree like Flax's, so it can be jitted, donated and checkpointed
  with orbax as usual.

  Attributes:
    step: ``apply_gradients`` calls so far (0 after ``create``).
    apply_fn: usually ``model.apply`` (static, not a pytree leaf).
    params: the parameters that ``tx`` updates.
    tx: the optimizer, e.g. ``eva_optax.eva(0.1)`` (static).
    opt_state: ``tx``'s state.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, eva_optax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16, 2))
    >>> state = eva_optax.TrainState.create(
    ...     apply_fn=model.apply,
    ...     params=model.init(jax.random.PRNGKey(0), x)["params"],
    ...     tx=eva_optax.eva(learning_rate=0.1))
    >>> def loss_fn(params, x, y):
    ...   return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    >>> grad_fn = eva_optax.value_and_grad(loss_fn)
    >>> @jax.jit
    ... def train_step(state, x, y):
    ...   loss, grads, stats = grad_fn(state.params, x, y)
    ...   return state.apply_gradients(grads=grads, stats=stats), loss
    >>> for _ in range(3):
    ...   state, loss = train_step(state, x, y)
    >>> int(state.step)
    3

  References:
    Flax, `flax.training.train_state
    <https://flax.readthedocs.io/en/latest/api_reference/flax.training.html>`_;
    Zhang et al., "Eva: A General Vectorized Approximation Framework for
    Second-order Optimization" (the statistics that ``stats`` carries).
  """

  def apply_gradients(self, *, grads: Any, stats: Any = None, **kwargs: Any
                      ) -> TrainState:
    """One optimizer step: ``tx.update(grads, opt_state, params, stats=stats)``.

    Args:
      grads: gradients with the structure of ``params``.
      stats: the layer statistics from :func:`eva_optax.value_and_grad` (or
        ``None`` for optimizers that need none).
      **kwargs: other fields to ``replace``, as in Flax.

    Returns:
      The state with ``step + 1``, new ``params`` and ``opt_state``.
    """
    owg = OVERWRITE_WITH_GRADIENT in grads
    grads_with_opt = grads["params"] if owg else grads
    params_with_opt = self.params["params"] if owg else self.params
    extra = {}
    if stats is not None:
      if owg and isinstance(stats, Mapping) and "params" in stats:
        stats = stats["params"]
      extra["stats"] = stats
    tx = self.tx
    if isinstance(tx, optax.GradientTransformation):  # a plain one drops stats
      tx = optax.with_extra_args_support(tx)           # (else: MultiSteps objects)
    updates, new_opt_state = tx.update(
        grads_with_opt, self.opt_state, params_with_opt, **extra)
    new_params_with_opt = optax.apply_updates(params_with_opt, updates)
    if owg:
      new_params = {"params": new_params_with_opt,
                    OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT]}
    else:
      new_params = new_params_with_opt
    return self.replace(step=self.step + 1, params=new_params,
                        opt_state=new_opt_state, **kwargs)
