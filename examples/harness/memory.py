"""A compiled step's memory as XLA accounts it
(:meth:`jax.stages.Compiled.memory_analysis`).

The optimizer state's bytes (the sum of ``nbytes`` over its leaves) say what a
method keeps between steps; the compiled step's figures say what one step
really holds at once: its arguments (parameters, state, batch), its outputs,
the part of the outputs that reuses donated arguments (``alias``), its
temporaries, and XLA's peak. Used by the examples' records and by
``benchmarks/step_time.py``.
"""

from __future__ import annotations

from typing import Any

FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def memory_figures(compiled: Any) -> dict[str, int] | None:
  """Bytes of ``compiled`` (a :class:`jax.stages.Compiled`), per
  :data:`FIELDS` and ``peak``; None if the backend does not say.

  ``peak`` is XLA's ``peak_memory_in_bytes`` where the backend reports it,
  else ``argument + output - alias + temp``.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {n: int(getattr(stats, f"{n}_size_in_bytes")) for n in FIELDS}
  out["peak"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0) or (
      out["argument"] + out["output"] - out["alias"] + out["temp"])
  return out
