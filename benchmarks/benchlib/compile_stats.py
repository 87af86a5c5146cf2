"""How long a jitted function takes to compile, and how big its program is.

:func:`measure` times ``jitted.lower(*args)`` (tracing and lowering to
StableHLO) and ``.compile()`` (XLA) separately, on the wall clock and on
process CPU time (every thread of the process: XLA compiles on several), and
counts the instructions of both programs (the lines that define a value).
Used by benchmarks/scaling.py (one compile per step, next to Adam's) and
benchmarks/compile_time.py (the median of fresh compiles), which also charges
the StableHLO operations to the library's source lines
(:func:`stablehlo_by_source`).

A compile is *fresh* when nothing of it is cached: :func:`fresh` clears JAX's
in-memory caches (traces, lowerings, compiled executables) first, and the
benchmarks leave the persistent compilation cache off (JAX's default; the
scripts refuse to run with ``JAX_COMPILATION_CACHE_DIR`` set).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from . import hlo_text


def measure(jitted, *args, keep: bool = True, **kwargs) -> dict[str, Any]:
  """Lower and compile ``jitted`` for ``args``; times and program sizes.

  Returns ``lower_s``, ``lower_cpu_s``, ``compile_s``, ``compile_cpu_s``,
  ``total_s``, ``total_cpu_s``, ``stablehlo_ops`` (the lowered module),
  ``hlo_instructions`` (the optimized HLO XLA compiled) and, with ``keep``, the
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
         "stablehlo_ops": hlo_text.instructions(lowered.as_text()),
         "hlo_instructions": hlo_text.instructions(hlo)}
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


# ----------------------------------------------------------------------------
# Where a program's size comes from.

_LOC_DEF = re.compile(r"^#(loc\d*) = loc\((.*)\)\s*$")
_OP_LOC = re.compile(r"loc\(#(loc\d*)\)\s*$")
_FILE_LOC = re.compile(r'^"([^"]+\.py)":(\d+):')
_CALLSITE = re.compile(r"^callsite\(#(loc\d*) at #(loc\d*)\)$")
_NAMED = re.compile(r'^"[^"]*"\(#(loc\d*)\)$')
_ALIAS = re.compile(r"^#(loc\d*)$")


def stablehlo_by_source(text: str, marker: str = "/eva_optax/",
                        top: int = 15) -> dict[str, Any]:
  """StableHLO operations counted by the source line that emitted them.

  ``text`` is ``Lowered.as_text(debug_info=True)``. Each operation is charged
  to the innermost frame of its location (the source line that emitted it:
  JAX leaves its own frames out) when that frame's file path contains
  ``marker`` (the library), else to ``"(elsewhere)"`` (the model, Flax, optax;
  library code that calls the model does not take the model's operations). Returns ``{"ops": total,
  "by_file": {file: ops}, "by_line": [[file:line, ops], ...top]}``, files
  relative to the marker.
  """
  defs: dict[str, str] = {}
  for line in text.splitlines():
    m = _LOC_DEF.match(line)
    if m:
      defs[m.group(1)] = m.group(2)
  memo: dict[str, list[tuple[str, int]]] = {}

  def frames(ref: str, depth: int = 0) -> list[tuple[str, int]]:
    """File frames of a location, innermost first."""
    if ref in memo:
      return memo[ref]
    body = defs.get(ref, "")
    out: list[tuple[str, int]] = []
    if depth < 200:
      if (m := _FILE_LOC.match(body)):
        out = [(m.group(1), int(m.group(2)))]
      elif (m := _CALLSITE.match(body)):
        out = frames(m.group(1), depth + 1) + frames(m.group(2), depth + 1)
      elif (m := _NAMED.match(body)) or (m := _ALIAS.match(body)):
        out = frames(m.group(1), depth + 1)
    memo[ref] = out
    return out

  by_file: dict[str, int] = {}
  by_line: dict[str, int] = {}
  total = 0
  for line in text.splitlines():
    if line.startswith("#") or "=" not in line or not (m := _OP_LOC.search(line)):
      continue
    s = line.strip()
    if not (s.startswith("%") or s.startswith('"') or s.startswith("stablehlo.")
            or s.startswith("func.return") or s.startswith("return")):
      continue
    total += 1
    fr = frames(m.group(1))
    hit = fr[0] if fr and marker in fr[0][0] else None
    if hit is None:
      key_f, key_l = "(elsewhere)", "(elsewhere)"
    else:
      rel = hit[0].split(marker, 1)[1]
      key_f, key_l = rel, f"{rel}:{hit[1]}"
    by_file[key_f] = by_file.get(key_f, 0) + 1
    by_line[key_l] = by_line.get(key_l, 0) + 1
  lines = sorted(by_line.items(), key=lambda kv: -kv[1])[:top]
  return {"ops": total, "by_file": dict(sorted(by_file.items(), key=lambda kv: -kv[1])),
          "by_line": [list(kv) for kv in lines]}
