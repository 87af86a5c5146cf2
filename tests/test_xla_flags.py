"""examples/harness/xla_flags.py: the fast-compile XLA flags the installed jaxlib accepts.

An unknown XLA flag aborts the process, so the helper must never return a flag
the running jaxlib rejects, must drop one it rejects while keeping the others,
and must not probe again where its cached answer for this jaxlib is inherited.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import FAST_COMPILE_FLAGS
from conftest import xla_flags

BOGUS = "--xla_eva_optax_no_such_flag=1"


def _runs_with(flags) -> bool:
  """A fresh interpreter starts the CPU backend and compiles with exactly ``flags``."""
  env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", "import jax; print(jax.jit(lambda x: 2 * x)(1.0))"],
      env=env, capture_output=True, text=True, timeout=120, check=False)
  return proc.returncode == 0 and proc.stdout.strip() == "2.0"


def test_returned_flags_are_accepted_and_a_bogus_one_aborts(monkeypatch):
  monkeypatch.delenv(xla_flags.CACHE_VARIABLE, raising=False)
  flags = xla_flags.fast_compile_flags()
  assert set(flags) <= set(xla_flags.FAST_COMPILE)
  assert _runs_with(flags)
  # The control: the check above can fail (an unknown flag kills the process).
  assert not _runs_with(flags + [BOGUS])
  # The suite itself runs with what the helper returned.
  assert FAST_COMPILE_FLAGS.split() == flags
  assert set(flags) <= set(os.environ["XLA_FLAGS"].split())


def test_a_rejected_flag_is_dropped_and_the_others_kept(monkeypatch):
  monkeypatch.delenv(xla_flags.CACHE_VARIABLE, raising=False)
  accepted = xla_flags.fast_compile_flags()
  assert accepted, "this jaxlib accepts none of the fast-compile flags"
  kept = accepted[:2]   # two flags around the bogus one: order kept, fewer probes
  assert xla_flags.fast_compile_flags([kept[0], BOGUS] + kept[1:]) == kept
  assert xla_flags.fast_compile_flags([BOGUS]) == []
  # Only the default candidates are cached, so the probes above changed nothing.
  assert os.environ[xla_flags.CACHE_VARIABLE].endswith(":" + " ".join(accepted))


def test_the_cache_is_keyed_by_the_jaxlib_version(monkeypatch):
  version = xla_flags.jaxlib_version()
  calls = []

  def fake_accepts(flags, *args, **kwargs):
    calls.append(list(flags))
    return BOGUS not in flags

  monkeypatch.setattr(xla_flags, "accepts", fake_accepts)
  # An inherited answer for this jaxlib: used as is, no probe.
  monkeypatch.setenv(xla_flags.CACHE_VARIABLE,
                     f"{version}:{xla_flags.FAST_COMPILE[0]}")
  assert xla_flags.fast_compile_flags() == [xla_flags.FAST_COMPILE[0]]
  assert not calls
  # An answer for another jaxlib: probed again and replaced.
  monkeypatch.setenv(xla_flags.CACHE_VARIABLE, "0.0.0:")
  assert xla_flags.fast_compile_flags() == list(xla_flags.FAST_COMPILE)
  assert calls == [list(xla_flags.FAST_COMPILE)]
  assert os.environ[xla_flags.CACHE_VARIABLE] == (
      f"{version}:{' '.join(xla_flags.FAST_COMPILE)}")


def test_with_fast_compile_puts_the_callers_flags_last(monkeypatch):
  monkeypatch.setattr(xla_flags, "fast_compile_flags", lambda: ["--a=1", "--b=2"])
  assert xla_flags.with_fast_compile("--a=3 --c") == "--a=1 --b=2 --a=3 --c"
  assert xla_flags.with_fast_compile() == "--a=1 --b=2"


@pytest.mark.parametrize("path", ["benchmarks/scaling.py", "tests/conftest.py",
                                  "tests/multidevice_util.py",
                                  "tests/test_adaptive_contract.py"])
def test_no_hard_coded_fast_compile_flags(path):
  """The flags live in one place: a copy elsewhere would abort on a jaxlib without them."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, path)) as f:
    text = f.read()
  for flag in xla_flags.FAST_COMPILE:
    assert flag.split("=")[0] not in text, f"{path} hard-codes {flag}"
