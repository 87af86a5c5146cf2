"""How the paper trains every preconditioner: the torch ``SGD`` step after it.

``d = P(grad) + wd * w;  buf = momentum * buf + d;  w = w - lr * buf``: weight
decay is added after preconditioning (never preconditioned), then heavy-ball
momentum, then the learning rate.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from eva_optax._src import validation


def training_chain(preconditioner: optax.GradientTransformation,
                   learning_rate: Any, momentum: Any, weight_decay: Any,
                   nesterov: bool) -> optax.GradientTransformationExtraArgs:
  """``chain(preconditioner, add_decayed_weights, trace, scale_by_learning_rate)``.

  Zero (Python) weight decay or momentum leave their transformation out, so a
  run without weight decay needs no ``params`` and a run without momentum keeps
  no buffer.
  """
  validation.check_nonnegative("weight_decay", weight_decay)
  validation.check_unit_interval("momentum", momentum)
  parts = [preconditioner]
  if not validation.is_zero(weight_decay):
    parts.append(optax.add_decayed_weights(weight_decay))
  if not validation.is_zero(momentum):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def resolve_scaling(kl_clip: float | None, kl_normalize: bool | None,
                    default: str) -> str:
  """Maps the user-facing ``kl_clip`` / ``kl_normalize`` pair to a scaling name."""
  if kl_clip is not None and kl_normalize:
    raise ValueError("Pass either kl_clip (ICLR KL-clip) or kl_normalize=True "
                     "(journal KL-normalization), not both.")
  if kl_clip is not None:
    return "kl_clip"
  if kl_normalize is None:
    return default
  return "kl_normalize" if kl_normalize else "none"


def alias(scale_by: Callable[..., optax.GradientTransformationExtraArgs],
          learning_rate: Any, momentum: Any, weight_decay: Any, damping: Any,
          stat_decay: Any, *, kl_clip: float | None, kl_normalize: bool | None,
          default_scaling: str, nesterov: bool,
          **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """``training_chain(scale_by(...))`` with the alias' scaling resolved."""
  scaling = resolve_scaling(kl_clip, kl_normalize, default_scaling)
  pre = scale_by(damping, stat_decay, kl_clip=kl_clip,
                 kl_normalize=scaling == "kl_normalize",
                 learning_rate=learning_rate if kl_clip is not None else None,
                 **kwargs)
  return training_chain(pre, learning_rate, momentum, weight_decay, nesterov)
