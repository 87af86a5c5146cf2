"""XLA flags that cut CPU compile time, limited to those the installed jaxlib knows.

The tests, the benchmarks' smoke runs and their subprocesses compile many small
programs, and XLA's CPU compiler dominates their time. :data:`FAST_COMPILE`
cuts it 3-5x: no LLVM optimisation, the older elemental emitters instead of
the fusion emitters, one codegen split. They change no result beyond float32
rounding (both sides of every comparison are compiled with the same flags).

XLA aborts the whole process on an XLA_FLAGS entry it does not know, and flags
come and go between jaxlib releases (jaxlib 0.11.1 dropped
``--xla_cpu_use_fusion_emitters``). :func:`fast_compile_flags` therefore probes
the installed jaxlib in a subprocess (the CPU backend started with the
candidate flags, then flag by flag where that fails) and returns only the flags
it accepts. The answer is cached in the environment variable
:data:`CACHE_VARIABLE` (``<jaxlib version>:<flags>``), so processes started from
this one with the same jaxlib do not probe again.

This module uses the standard library only and imports nothing from
``harness``, so code that must set XLA_FLAGS before anything imports jax (the
tests' conftest) can load it from its file without the package::

  spec = importlib.util.spec_from_file_location("xla_flags", PATH_OF_THIS_FILE)
  xla_flags = importlib.util.module_from_spec(spec); spec.loader.exec_module(xla_flags)
  os.environ["XLA_FLAGS"] = xla_flags.with_fast_compile(os.environ.get("XLA_FLAGS", ""))

Elsewhere (benchmarks, examples) ``from harness import xla_flags``.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from typing import Sequence

FAST_COMPILE: tuple[str, ...] = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)

CACHE_VARIABLE = "EVA_OPTAX_FAST_COMPILE_XLA_FLAGS"

# Starts the CPU backend (XLA parses XLA_FLAGS then, and aborts on an unknown
# flag) and compiles one small program.
_PROBE = ("import jax, jax.numpy as jnp; "
          "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((4, 4))).block_until_ready()")


def jaxlib_version() -> str:
  """The installed jaxlib's version, read without importing jax."""
  try:
    return importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return "none"


def accepts(flags: Sequence[str], python: str | None = None, timeout: float = 120) -> bool:
  """Whether a fresh ``python`` (this one by default) runs jax on CPU with ``flags``.

  The flags replace the inherited XLA_FLAGS in the probe, so a flag of the
  caller's own cannot make a candidate look rejected.
  """
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  env.pop(CACHE_VARIABLE, None)
  try:
    proc = subprocess.run([python or sys.executable, "-c", _PROBE], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return False
  return proc.returncode == 0


def probe(candidates: Sequence[str]) -> list[str]:
  """The candidates the installed jaxlib accepts, in their order.

  One probe when all are accepted; otherwise one per flag, then one for the
  accepted ones together (none are returned if that fails).
  """
  candidates = list(candidates)
  if not candidates or accepts(candidates):
    return candidates
  kept = [f for f in candidates if accepts([f])]
  return kept if kept and accepts(kept) else []


def fast_compile_flags(candidates: Sequence[str] = FAST_COMPILE) -> list[str]:
  """The flags of ``candidates`` that the installed jaxlib accepts (cached).

  The cache (:data:`CACHE_VARIABLE` in ``os.environ``, inherited by
  subprocesses) holds the answer for :data:`FAST_COMPILE` only, keyed by the
  jaxlib version; other candidates are probed every time.
  """
  candidates = list(candidates)
  cacheable = candidates == list(FAST_COMPILE)
  version = jaxlib_version()
  if cacheable:
    cached = os.environ.get(CACHE_VARIABLE, "")
    cached_version, sep, cached_flags = cached.partition(":")
    if sep and cached_version == version:
      return [f for f in cached_flags.split() if f in candidates]
  flags = probe(candidates)
  if cacheable:
    os.environ[CACHE_VARIABLE] = f"{version}:{' '.join(flags)}"
  return flags


def with_fast_compile(xla_flags: str = "") -> str:
  """``xla_flags`` (an XLA_FLAGS value) with the accepted fast-compile flags in front.

  The given flags come last, so a flag set there wins over a fast-compile one.
  """
  return " ".join(fast_compile_flags() + xla_flags.split())
