"""eva_optax for Flax NNX: gradients plus per-layer statistics of NNX models.

``import eva_optax.nnx`` and use :func:`value_and_grad` where you would use
:func:`flax.nnx.value_and_grad`; every optimizer of :mod:`eva_optax` then works
through ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads,
stats=stats)``.
"""

from eva_optax._src.capture.nnx import value_and_grad
from eva_optax._src.capture.nnx import layer_views

__all__ = ("layer_views", "value_and_grad")
