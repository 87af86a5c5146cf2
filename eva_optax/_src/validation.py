"""Hyperparameters: eager checks (messages name the argument and the fix) and values."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np


def _is_number(x: Any) -> bool:
  # Python and NumPy scalars are checked; arrays and tracers (inject_hyperparams)
  # and schedules (callables) are taken as given.
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_positive(name: str, value: Any, *, fix: str = "") -> None:
  if callable(value):
    return
  if isinstance(value, bool) or (not _is_number(value) and not hasattr(value, "dtype")):
    raise TypeError(f"{name} must be a number or a schedule, got {value!r}.")
  if _is_number(value) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {name}={value!r}. {fix}".rstrip())


def check_unit_interval(name: str, value: Any, *, fix: str = "") -> None:
  if callable(value):
    return
  if isinstance(value, bool) or (not _is_number(value) and not hasattr(value, "dtype")):
    raise TypeError(f"{name} must be a number in [0, 1], got {value!r}.")
  if _is_number(value) and not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {name}={value!r}. {fix}".rstrip())


def check_nonnegative(name: str, value: Any) -> None:
  if callable(value):
    return
  if isinstance(value, bool) or (not _is_number(value) and not hasattr(value, "dtype")):
    raise TypeError(f"{name} must be a number, got {value!r}.")
  if _is_number(value) and value < 0:
    raise ValueError(f"{name} must be >= 0, got {name}={value!r}.")


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
