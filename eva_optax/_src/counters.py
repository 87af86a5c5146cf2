"""The three step counters every preconditioner state of this library carries,
and the folding of new statistics into running averages that they count.

``count`` (update calls), ``stats_count`` (statistics folded into the running
averages; 0 means the next observation initialises them) and
``nonfinite_count`` (statistics skipped because they were not all finite).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from eva_optax._src import validation


def zero_counters() -> dict[str, jax.Array]:
  """Three distinct int32 zeros (distinct buffers, so a state can be donated)."""
  return {name: jnp.zeros([], jnp.int32)
          for name in ("count", "stats_count", "nonfinite_count")}


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
  finite = jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)] or [True]))
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


def advance_counters(state: Any, due: jax.Array,
                     finite: jax.Array) -> dict[str, jax.Array]:
  """The counters after one update whose statistics were ``due`` and ``finite``."""
  return {
      "count": optax.safe_increment(state.count),
      "stats_count": state.stats_count
                     + jnp.logical_and(due, finite).astype(jnp.int32),
      "nonfinite_count": state.nonfinite_count
                         + jnp.logical_and(due, jnp.logical_not(finite)).astype(jnp.int32),
  }
