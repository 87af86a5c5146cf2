"""The optimizers the examples compare, and what each needs from the gradient.

``make_optimizer(name, learning_rate, momentum)`` builds the optax
transformation; :data:`STATISTICS` says which gradient function feeds it
(``eva_optax.value_and_grad(..., statistics=...)`` or, for ``None``, plain
``jax.value_and_grad``).
"""

from __future__ import annotations

from typing import Any

import optax

import eva_optax

OPTIMIZERS = ("sgd", "adam", "eva", "eva_f", "eva_s", "kfac", "foof",
              "shampoo")
LABELS = {"sgd": "SGD", "adam": "Adam", "eva": "Eva", "eva_f": "Eva-f",
          "eva_s": "Eva-s", "kfac": "K-FAC", "foof": "FOOF",
          "shampoo": "Shampoo"}
# What each optimizer needs from the gradient function.
STATISTICS = {"sgd": None, "adam": None, "eva": "vectors", "eva_f": "vectors",
              "eva_s": None, "kfac": "factors", "foof": "factors",
              "shampoo": None}
PRECONDITIONED = ("eva", "eva_f", "eva_s", "kfac", "foof", "shampoo")


def available(name: str) -> bool:
  """Whether this build of eva_optax (or optax) provides ``name``."""
  if name in ("sgd", "adam"):
    return True
  return hasattr(eva_optax, name)


def make_optimizer(name: str, learning_rate: Any, momentum: float = 0.9,
                   **options: Any) -> optax.GradientTransformation:
  """The optax transformation of optimizer ``name``.

  Args:
    name: one of :data:`OPTIMIZERS`.
    learning_rate: float or optax schedule.
    momentum: heavy-ball momentum (all but Adam).
    **options: passed on to the constructor (``damping``, ``inverse_every``,
      ``kl_clip``, ``block_size``, ...).

  Returns:
    The optax gradient transformation.
  """
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum, **options)
  if name == "adam":
    return optax.adam(learning_rate, **options)
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")
  if not available(name):
    raise ValueError(f"eva_optax {eva_optax.__version__} has no {name!r}.")
  return getattr(eva_optax, name)(learning_rate, momentum=momentum, **options)
