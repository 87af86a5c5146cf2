"""How the paper trains every preconditioner: the torch ``SGD`` step after it.

``d = P(grad) + wd * w;  buf = momentum * buf + d;  w = w - lr * buf``: weight
decay is added after preconditioning (never preconditioned), then heavy-ball
momentum, then the learning rate.
"""

from __future__ import annotations

from typing import Any

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
