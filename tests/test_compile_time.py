"""benchmarks/compile_time.py: its summary and report (pure functions of the
measurements), the StableHLO source attribution, and a quick end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from multidevice_util import REPO_ROOT
from multidevice_util import script_env

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
import compile_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchlib import compile_stats  # pylint: disable=g-import-not-at-top,wrong-import-position


def _run(item, cpu, instr=100):
  m = {k: 1.0 for k in compile_time.KEYS}
  m.update(total_cpu_s=cpu, total_s=cpu, hlo_instructions=instr)
  return {"model": "autoencoder", "item": item, "description": "d",
          "runs": [dict(m, total_cpu_s=cpu * f) for f in (0.9, 1.0, 5.0)]}


def test_medians_ratios_targets_and_capture_share():
  results = [_run("adam", 2.0), _run("eva", 3.0, 250), _run("kfac", 6.0),
             _run("grad", 1.0), _run("capture_vectors", 1.5)]
  s = compile_time.summarize(results)["models"]["autoencoder"]
  items = s["items"]
  assert items["eva"]["total_cpu_s"] == 3.0              # the median, not the mean
  assert items["eva"]["cpu_ratio"] == pytest.approx(1.5)
  assert items["eva"]["hlo_ratio"] == pytest.approx(2.5)
  assert items["capture_vectors"]["vs"] == "grad"
  assert items["capture_vectors"]["cpu_ratio"] == pytest.approx(1.5)
  assert s["targets"]["eva"]["met"] and not s["targets"]["kfac"]["met"]
  # The capture adds 0.5 s of Eva's 1.0 s extra over Adam.
  assert s["capture_share"]["eva"]["share"] == pytest.approx(0.5)
  text = compile_time.report({"models": {"autoencoder": s}})
  assert "| Eva | 3.00 (3.00) |" in text and "NOT met" in text and "50%" in text


def test_stablehlo_ops_charged_to_library_lines():
  text = "\n".join([
      'func.func @main() {',
      '  %0 = stablehlo.add %a, %b : tensor<f32> loc(#loc3)',
      '  %1 = stablehlo.multiply %0, %0 : tensor<f32> loc(#loc4)',
      '  %2 = stablehlo.negate %1 : tensor<f32> loc(#loc5)',
      '}',
      '#loc1 = loc("/x/eva_optax/_src/a.py":10:2)',
      '#loc2 = loc("/x/user.py":3:1)',
      '#loc3 = loc("jit(f)/add"(#loc6))',
      '#loc4 = loc(callsite(#loc2 at #loc1))',   # the model, called by the library
      '#loc5 = loc("/x/user.py":4:1)',
      '#loc6 = loc(callsite(#loc1 at #loc2))',
  ])
  r = compile_stats.stablehlo_by_source(text)
  assert r["ops"] == 3
  # The innermost frame decides: the library's add; the model's multiply
  # (though the library called the model) and negate.
  assert r["by_file"] == {"(elsewhere)": 2, "_src/a.py": 1}
  assert r["by_line"] == [["(elsewhere)", 2], ["_src/a.py:10", 1]]


def test_quick_run(tmp_path):
  out = tmp_path / "compile_time.json"
  cmd = [sys.executable, "benchmarks/compile_time.py", "--quick", "--models",
         "autoencoder", "--optimizers", "eva", "--no-capture", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=script_env(None), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  record = json.loads(out.read_text())
  items = record["summary"]["models"]["autoencoder"]["items"]
  assert set(items) == {"adam", "eva"}
  assert items["eva"]["hlo_instructions"] > items["adam"]["hlo_instructions"] > 0
  assert 0 < items["eva"]["sources"]["ops"] <= items["eva"]["stablehlo_ops"]
  assert record["provenance"]["versions"]["jax"]
  assert "| Eva |" in proc.stdout
