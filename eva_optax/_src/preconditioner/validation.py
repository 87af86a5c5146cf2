"""Hyperparameters: eager checks (messages name the argument and the fix), run-time
validity, and values.

Two kinds of check. Python numbers are checked when the optimizer is built
(``check_*``), with a ``ValueError`` or ``TypeError`` that names the argument.
Arrays, schedules and values injected by :func:`optax.inject_hyperparams` are
only known at run time, often traced: ``valid_*`` returns a boolean scalar that
the update uses to skip an invalid step (see :mod:`eva_optax._src.counters`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_number(x: Any) -> bool:
  # Python and NumPy scalars are checked; arrays and tracers (inject_hyperparams)
  # and schedules (callables) are taken as given.
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_type(name: str, value: Any, what: str) -> None:
  if isinstance(value, bool) or (not _is_number(value)
                                 and not hasattr(value, "dtype")):
    raise TypeError(f"{name} must be {what}, got {name}={value!r}.")


def _check_finite(name: str, value: Any, fix: str) -> None:
  if _is_number(value) and not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {name}={value!r}. {fix}".rstrip())


def check_positive(name: str, value: Any, *, fix: str = "") -> None:
  """A finite number ``> 0`` (a schedule or an array is checked at run time)."""
  if callable(value):
    return
  _check_type(name, value, "a number or a schedule")
  _check_finite(name, value, fix)
  if _is_number(value) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {name}={value!r}. {fix}".rstrip())


def check_unit_interval(name: str, value: Any, *, fix: str = "") -> None:
  """A number in ``[0, 1]`` (a schedule or an array is checked at run time)."""
  if callable(value):
    return
  _check_type(name, value, "a number in [0, 1]")
  if _is_number(value) and not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {name}={value!r}. {fix}".rstrip())


def check_nonnegative(name: str, value: Any, *, fix: str = "") -> None:
  """A finite number ``>= 0`` (a schedule or an array is checked at run time)."""
  if callable(value):
    return
  _check_type(name, value, "a number")
  _check_finite(name, value, fix)
  if _is_number(value) and value < 0:
    raise ValueError(f"{name} must be >= 0, got {name}={value!r}. {fix}".rstrip())


def check_not_schedule(name: str, value: Any) -> None:
  """For hyperparameters that optax itself takes as a number or an array only."""
  if callable(value):
    raise TypeError(
        f"{name} must be a number or an array, not a schedule (got {value!r}); "
        f"to change {name} during training use optax.inject_hyperparams and set "
        f"state.hyperparams[{name!r}].")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}.")
  return value


def check_dtype(name: str, value: Any) -> jnp.dtype | None:
  """``None`` or a floating dtype (``jnp.bfloat16``, ``"float32"``, ...)."""
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    raise TypeError(f"{name} must be a dtype (e.g. 'bfloat16' or jnp.float32) or "
                    f"None, got {name}={value!r}.") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating dtype, got {name}={value!r}.")
  return dtype


def check_interval(name: str, value: Any, minimum: int = 1) -> None:
  """A whole number of steps ``>= minimum``.

  Integer arrays are accepted too (``optax.inject_hyperparams`` turns ints into
  arrays); a traced one cannot be checked and is taken as given.
  """
  if hasattr(value, "dtype") and not isinstance(value, numbers.Integral):
    if not np.issubdtype(value.dtype, np.integer) or np.ndim(value) != 0:
      raise TypeError(f"{name} must be an int (a number of steps), got {value!r}.")
    try:
      value = int(value)
    except jax.errors.ConcretizationTypeError:
      return
  elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int (a number of steps), got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {name}={value!r}.")


def static_int(name: str, value: Any, minimum: int = 1) -> int:
  """An int that sets array shapes, so it must be known when tracing."""
  if hasattr(value, "dtype") and not isinstance(value, numbers.Integral):
    try:
      value = int(value)
    except (jax.errors.ConcretizationTypeError, TypeError):
      raise TypeError(
          f"{name} sets array shapes and cannot be a traced value; with "
          f"optax.inject_hyperparams pass static_args=({name!r},).") from None
  check_interval(name, value, minimum)
  return int(value)


def is_zero(value: Any) -> bool:
  """True for a Python/NumPy zero (a term that can be left out of a chain)."""
  return _is_number(value) and value == 0


def value_at(hyperparameter: Any, count: Any) -> Any:
  """The value of a float-or-schedule hyperparameter at step ``count``."""
  return hyperparameter(count) if callable(hyperparameter) else hyperparameter


def valid_positive(value: Any) -> jax.Array:
  """Run time: ``value`` (a number or an array, maybe traced) is finite and > 0."""
  v = jnp.asarray(value, jnp.float32)
  return jnp.all(jnp.logical_and(jnp.isfinite(v), v > 0))


def valid_unit_interval(value: Any) -> jax.Array:
  """Run time: ``value`` is in ``[0, 1]`` (NaN is not)."""
  v = jnp.asarray(value, jnp.float32)
  return jnp.all(jnp.logical_and(v >= 0, v <= 1))
