"""The three step counters every preconditioner state of this library carries.

``count`` (update calls), ``stats_count`` (statistics folded into the running
averages; 0 means the next observation initialises them) and
``nonfinite_count`` (statistics skipped because they were not all finite).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def zero_counters() -> dict[str, jax.Array]:
  """Three distinct int32 zeros (distinct buffers, so a state can be donated)."""
  return {name: jnp.zeros([], jnp.int32)
          for name in ("count", "stats_count", "nonfinite_count")}


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
