"""Every flag of every example and benchmark script has help text, and
``--help`` shows every default (the parsers are built, nothing is run)."""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRS = {"examples": os.path.join(ROOT, "examples"),
        "benchmarks": os.path.join(ROOT, "benchmarks")}
for d in DIRS.values():
  if d not in sys.path:
    sys.path.insert(0, d)

# Scripts whose flags are owned elsewhere and not yet behind a `parser()`
# function (path relative to the repository root -> why).
PENDING = {
    "examples/quickstart.py": "owned by the quickstart/notebook work: its "
                              "flags have help, but the parser is built under "
                              "__main__ (expose parser() to check it here)",
}


def _cli_scripts() -> list[str]:
  """Every script in examples/ and benchmarks/ that parses a command line."""
  out = []
  for d in DIRS:
    for path in sorted(glob.glob(os.path.join(ROOT, d, "*.py"))):
      with open(path) as f:
        text = f.read()
      if "__main__" in text and ("argparse" in text or "parse_args" in text):
        out.append(os.path.relpath(path, ROOT))
  return out


SCRIPTS = [s for s in _cli_scripts() if s not in PENDING]


def test_the_scripts_are_found():
  # The discovery itself: these must be among the checked scripts.
  for s in ("examples/autoencoder.py", "examples/classifier.py",
            "examples/demo.py", "examples/eva_damping.py",
            "examples/readme_tables.py", "examples/replot.py",
            "benchmarks/step_time.py"):
    assert s in SCRIPTS, s
  assert set(PENDING) <= set(_cli_scripts())


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_default(script):
  module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
  assert hasattr(module, "parser"), (
      f"{script}: expose `parser() -> argparse.ArgumentParser` so that its "
      "flags can be checked without running it")
  p = module.parser()
  assert issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
  formatter = p.formatter_class(prog=script)
  text = " ".join(p.format_help().split())
  actions = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]  # pylint: disable=protected-access
  assert actions
  for a in actions:
    name = a.option_strings[-1] if a.option_strings else a.dest
    assert a.help and a.help != argparse.SUPPRESS, f"{script} {name}: no help"
    for s in a.option_strings:
      assert s in text, f"{script}: {s} missing from --help"
    if a.option_strings and a.default is not argparse.SUPPRESS:
      shown = formatter._get_help_string(a)  # pylint: disable=protected-access
      assert "%(default)" in shown, f"{script} {name}: default not shown"
