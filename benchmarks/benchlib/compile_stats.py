"""How long a jitted function takes to compile, and how big its program is.

:func:`measure` times ``jitted.lower(*args)`` (tracing and lowering to
StableHLO) and ``.compile()`` (XLA) separately, on the wall clock and on
process CPU time (every thread of the process: XLA compiles on several), and
counts the lines of both programs. Used by benchmarks/scaling.py (one compile
per step, next to Adam's) and benchmarks/compile_time.py (the median of fresh
compiles).

A compile is *fresh* when nothing of it is cached: :func:`fresh` clears JAX's
in-memory caches (traces, lowerings, compiled executables) first, and the
benchmarks leave the persistent compilation cache off (JAX's default; the
scripts refuse to run with ``JAX_COMPILATION_CACHE_DIR`` set).
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import hlo_work


def measure(jitted, *args, keep: bool = True, **kwargs) -> dict[str, Any]:
  """Lower and compile ``jitted`` for ``args``; times and program sizes.

  Returns ``lower_s``, ``lower_cpu_s``, ``compile_s``, ``compile_cpu_s``,
  ``total_s``, ``total_cpu_s``, ``stablehlo_lines`` (the lowered module),
  ``hlo_lines`` (the optimized HLO XLA compiled) and, with ``keep``, the
  ``compiled`` object and its ``hlo`` text (not JSON-serializable: pop them).
  """
  c0, t0 = time.process_time(), time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  c1, t1 = time.process_time(), time.perf_counter()
  compiled = lowered.compile()
  c2, t2 = time.process_time(), time.perf_counter()
  hlo = compiled.as_text()
  out = {"lower_s": t1 - t0, "lower_cpu_s": c1 - c0,
         "compile_s": t2 - t1, "compile_cpu_s": c2 - c1,
         "total_s": t2 - t0, "total_cpu_s": c2 - c0,
         "stablehlo_lines": hlo_work.hlo_lines(lowered.as_text()),
         "hlo_lines": hlo_work.hlo_lines(hlo)}
  if keep:
    out["compiled"] = compiled
    out["hlo"] = hlo
  return out


def fresh(jitted_factory, *args, **kwargs) -> dict[str, Any]:
  """:func:`measure` after clearing JAX's caches; ``jitted_factory()`` builds
  a new jitted function (a new trace) each time."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  return measure(jitted_factory(), *args, keep=False, **kwargs)


def check_no_persistent_cache() -> None:
  """Compile times mean nothing when XLA reads programs from a disk cache."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    raise SystemExit("unset JAX_COMPILATION_CACHE_DIR: the persistent compilation "
                     "cache would serve the compiles this benchmark times")


def warm_up_backend() -> None:
  """Compile and run one tiny program, so the first measured compile does not
  pay the backend's one-time start-up."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(jax.jit(lambda x: jnp.tanh(x @ x).sum())(jnp.ones((8, 8))))
