"""The step counters every preconditioner state of this library carries, the
folding of new statistics into running averages that they count, and the safe
step that replaces an unusable update.

* ``count``: update calls;
* ``stats_count``: statistics folded into the running averages (0 means the
  next observation initialises them);
* ``nonfinite_count``: statistics skipped because they were not all finite;
* ``skipped_count``: steps whose update was replaced by zeros because the
  incoming gradient, or the preconditioned result, was not finite;
* ``invalid_hparam_count``: steps skipped (zero update, no statistics folded)
  because a hyperparameter given as an array or a schedule was out of range or
  not finite at that step (``damping <= 0``, ``stat_decay`` outside ``[0, 1]``).

A skipped step returns zeros, so a following ``optax.trace`` still applies the
momentum of the earlier steps and the parameters stay finite.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from eva_optax._src.preconditioner import validation


def zero_counters() -> dict[str, jax.Array]:
  """Three distinct int32 zeros (distinct buffers, so a state can be donated)."""
  return {name: jnp.zeros([], jnp.int32) for name in COUNTERS}


COUNTERS = ("count", "stats_count", "nonfinite_count", "skipped_count",
            "invalid_hparam_count")


# Leaves up to this size are checked together, in one reduction over their
# concatenation (a copy of a few small vectors costs less than one more
# reduction to compile); larger ones each in their own.
_SMALL = 1 << 14


def all_finite(tree: Any) -> jax.Array:
  """Whether every leaf of ``tree`` is finite (a boolean scalar; True if empty)."""
  leaves = jax.tree.leaves(tree)
  small = [jnp.ravel(x).astype(jnp.float32) for x in leaves if x.size <= _SMALL]
  checks = [jnp.all(jnp.isfinite(x)) for x in leaves if x.size > _SMALL]
  if small:
    checks.append(jnp.all(jnp.isfinite(jnp.concatenate(small))))
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def zeros_unless(ok: jax.Array, tree: Any) -> Any:
  """``tree`` where ``ok``, else zeros of the same shapes and dtypes (the safe step)."""
  return jax.tree.map(lambda x: jnp.where(ok, x, jnp.zeros_like(x)), tree)


def fold_statistics(state: Any, old: Any, new: Any, stat_decay: Any,
                    stats_every: int) -> tuple[Any, jax.Array, jax.Array]:
  """Folds the observations ``new`` into the running averages ``old``.

  Every ``stats_every`` update calls (``due``), and only when every leaf of
  ``new`` is finite, each leaf becomes ``(1 - xi) old + xi new`` with ``xi`` the
  ``stat_decay`` at ``state.count`` (the weight of the NEW statistic; the first
  observation, ``state.stats_count == 0``, replaces ``old``), or ``old + new``
  when ``stat_decay`` is None (a running sum). Otherwise ``old`` is kept.

  Returns:
    ``(averages, due, finite)``; pass ``due`` and ``finite`` on to
    :func:`advance_counters`.
  """
  count = state.count
  finite = all_finite(new)
  due = (count % stats_every) == 0
  accept = jnp.logical_and(due, finite)
  if stat_decay is None:
    merge = lambda o, n: o + n
  else:
    xi = jnp.asarray(validation.value_at(stat_decay, count), jnp.float32)
    first = state.stats_count == 0
    merge = lambda o, n: jnp.where(first, n, (1.0 - xi) * o + xi * n)
  averages = jax.tree.map(lambda o, n: jnp.where(accept, merge(o, n), o),
                          old, new)
  return averages, due, finite


def advance_counters(state: Any, due: jax.Array, finite: jax.Array, *,
                     skipped: Any = False,
                     invalid_hparam: Any = False,
                     folded: Any = None) -> dict[str, jax.Array]:
  """The counters after one update.

  Args:
    state: the state before the update (its counters are read).
    due: whether statistics were due this step.
    finite: whether they were finite (so folded in when due).
    skipped: whether the update was replaced by zeros (non-finite gradient or
      result).
    invalid_hparam: whether a run-time hyperparameter was invalid (the step
      was skipped and no statistics were folded in).
    folded: whether statistics were folded in, where that is not simply
      ``due and finite`` (a step skipped for its gradient folds nothing).
  """
  i32 = lambda b: jnp.asarray(b).astype(jnp.int32)
  ok_hp = jnp.logical_not(invalid_hparam)
  return {
      "count": optax.safe_increment(state.count),
      "stats_count": state.stats_count + i32(
          (due & finite if folded is None else folded) & ok_hp),
      "nonfinite_count": state.nonfinite_count + i32(due & ~finite & ok_hp),
      "skipped_count": state.skipped_count + i32(jnp.logical_and(skipped, ok_hp)),
      "invalid_hparam_count": state.invalid_hparam_count + i32(invalid_hparam),
  }
