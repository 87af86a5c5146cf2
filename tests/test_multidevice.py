"""jax.jit data parallelism on 8 (virtual CPU) devices equals one device.

The work runs in one subprocess (tests/multidevice/jit_data_parallel.py, whose
docstring says what it measures); XLA's compile time dominates, so everything
is checked from that one run, in ONE test (pytest-xdist would otherwise run the
subprocess once per worker that gets a test of this module), and every
discrepancy is reported together.

Tolerances (all relative to the parameter change of the 5-step reference,
``|p - p_ref| / |p_ref - p0|``):

* float32, batch sharded (parameters replicated or FSDP-sharded): at most
  ``min(1e-5, max(2 x 8 eps32, 10 * floor))``, where ``floor`` is the same method's error
  when the 1-device program runs on batches with permuted rows (pure float32
  re-association, measured 4e-7 to 3.5e-6 here). A data-parallel bug that changes
  the statistics by 8x changes the result by 1e-2 to 1 (checked too).
* statistics of step 1: ``|s - s_ref| / |s_ref| <= STATS_TOL`` per layer and
  field: float32 sums of the batch's rows in another order, derived in
  multidevice_util (``SHARDED_STATS_TOL``, 2.5e-4).
* bf16: the 8-device bf16 run may differ from the 1-device bf16 run by no more
  than the 1-device bf16 run differs from float32, and by at most 5e-2.

The smoke test of benchmarks/scaling.py (``--quick``, 2 devices) checks its
traffic figures against the analytic counts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import float32_tol
from multidevice_util import FAST_COMPILE
from multidevice_util import SHARDED_STATS_TOL
from multidevice_util import REPO_ROOT
from multidevice_util import run_script
from multidevice_util import script_env

OPTIMIZERS = ("eva", "eva_f", "eva_s", "kfac", "foof", "shampoo")
BF16_OPTIMIZERS = ("eva", "kfac")
WITH_STATS = {"eva": ("a", "g"), "eva_f": ("a", "g"), "kfac": ("a", "g", "A", "G"),
              "foof": ("a", "g", "A", "G")}
F32_CAP = 1e-5
STATS_TOL = SHARDED_STATS_TOL
BF16_CAP = 5e-2


def f32_tolerance(floor: float) -> float:
  """The 8-device run re-associates the same float32 sums as the permuted-rows
  run does (``floor``: this method's own round-off, amplified by its
  conditioning, measured in the same run on the same CPU): 10 such samples'
  worth, at least the rounding of the 8-way all-reduce itself on the step
  (2 x 8 roundings), at most F32_CAP, which keeps the test able to see an 8x
  wrong statistic (>= 100 F32_CAP, checked)."""
  return min(F32_CAP, max(2 * float32_tol(1.0, 8), 10.0 * floor))


def _check_stats(errors: dict, fields, where: str, failures: list[str]) -> None:
  if not errors:
    failures.append(f"{where}: no statistics compared")
  for layer, per_field in errors.items():
    missing = set(fields) - set(per_field)
    if missing:
      failures.append(f"{where} {layer}: statistics {sorted(missing)} missing")
    for field, err in per_field.items():
      if not err <= STATS_TOL:
        failures.append(f"{where} {layer}.{field}: relative error {err:.3g} "
                        f"> {STATS_TOL:g} against one device")


def _check_float32(result: dict, failures: list[str]) -> None:
  for name in OPTIMIZERS:
    r = result["optimizers"][name]
    floor = r["permuted_rows"]
    tol = f32_tolerance(floor)
    if not r["change"] > 1e-2:
      failures.append(f"{name}: the parameters barely moved ({r['change']:.3g}); "
                      "the comparison would say nothing")
    if not floor <= F32_CAP:
      failures.append(f"{name}: round-off floor {floor:.3g} > {F32_CAP:g}: the "
                      "settings amplify float32 round-off too much to test")
    for mode in ("replicated", "fsdp"):
      if not r[mode] <= tol:
        failures.append(
            f"{name} {mode}: 8 devices differ from 1 by {r[mode]:.3g} of the "
            f"parameter change (tolerance {tol:.3g}; reordering the batch rows "
            f"on 1 device gives {floor:.3g})")
    if name in WITH_STATS:
      for mode in ("replicated", "fsdp"):
        _check_stats(r[f"stats_{mode}"], WITH_STATS[name], f"{name} {mode}", failures)
      if not r["wrong_stats_x8"] >= 100 * F32_CAP:
        failures.append(
            f"{name}: statistics 8x off change the result by only "
            f"{r['wrong_stats_x8']:.3g}: the test could not see a wrong statistic")


def _check_fsdp_shardings(result: dict, failures: list[str]) -> None:
  want = {"Conv_0/kernel": [None, None, None, "data"], "Conv_0/bias": ["data"],
          "Dense_0/kernel": ["data", None], "Dense_0/bias": []}
  for name in OPTIMIZERS:
    r = result["optimizers"][name]
    if r["fsdp_param_specs"] != want:
      failures.append(f"{name} fsdp: parameter shardings {r['fsdp_param_specs']} "
                      f"after 5 steps, expected {want}")
    rep = r["replicated_param_specs"]
    if set(rep) != set(want) or any(rep.values()):
      failures.append(f"{name} replicated: parameter shardings {rep}")
    # The momentum buffer stays sharded like the parameters (ZeRO / FSDP).
    trace = {k: v for k, v in r["fsdp_state_specs"].items() if "/trace/" in k}
    expected = {k: want[k.split("/trace/")[1]] for k in trace}
    if not trace or trace != expected:
      failures.append(f"{name} fsdp: momentum shardings {trace}, expected {expected}")


def _check_bf16(result: dict, failures: list[str]) -> None:
  for name in BF16_OPTIMIZERS:
    r = result["bf16"][name]
    dtypes = {k: r[k] for k in ("param_dtypes", "stats_dtypes", "precond_state_dtypes")}
    want = {"param_dtypes": ["bfloat16"], "stats_dtypes": ["float32"],
            "precond_state_dtypes": ["float32"]}
    if dtypes != want:
      failures.append(f"bf16 {name}: dtypes {dtypes}, expected {want}")
    if not r["change"] > 1e-2:
      failures.append(f"bf16 {name}: the parameters barely moved ({r['change']:.3g})")
    if not r["replicated"] <= min(r["bf16_vs_f32"], BF16_CAP):
      failures.append(
          f"bf16 {name}: 8 devices differ from 1 device by {r['replicated']:.3g} of "
          f"the change; bf16 itself moves the 1-device result by "
          f"{r['bf16_vs_f32']:.3g} (cap {BF16_CAP:g})")
    _check_stats(r["stats_replicated"], WITH_STATS[name], f"bf16 {name}", failures)


def test_jit_shardings_equal_one_device():
  result = run_script("jit_data_parallel.py", devices=8, timeout=900,
                      env=FAST_COMPILE)
  assert result["devices"] == 8
  assert set(result["optimizers"]) == set(OPTIMIZERS)
  assert set(result["bf16"]) == set(BF16_OPTIMIZERS)
  failures: list[str] = []
  _check_float32(result, failures)
  _check_fsdp_shardings(result, failures)
  _check_bf16(result, failures)
  assert not failures, "\n".join(failures)


def test_scaling_benchmark_quick(tmp_path):
  """benchmarks/scaling.py --quick on 2 devices: the bytes in collectives per step.

  SGD all-reduces the gradient and the loss; Eva adds its Kronecker vectors, the
  paper's ``d_in + 1 + d_out`` floats per layer (up to the row count per layer that
  the capture reduces with them); K-FAC adds its full factors.
  """
  out = tmp_path / "scaling.json"
  cmd = [sys.executable, "benchmarks/scaling.py", "--quick", "--devices", "2",
         "--optimizers", "eva,kfac", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=script_env(None), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "| 2 |" in proc.stdout, proc.stdout
  record = json.loads(out.read_text())
  assert (tmp_path / "scaling.png").stat().st_size > 0
  assert record["provenance"]["versions"]["jax"]
  (row,) = record["summary"]["rows"]
  floats = record["summary"]["analytic_floats"]
  layers = floats["layers"]
  assert row["devices"] == 2
  assert row["sgd_bytes"] == 4 * (floats["gradient"] + floats["loss"])
  eva = row["optimizers"]["eva"]["extra_bytes_vs_sgd"] // 4
  assert floats["eva_without_bias_entry"] <= eva <= floats["eva"] + 2 * layers, eva
  kfac = row["optimizers"]["kfac"]["extra_bytes_vs_sgd"] // 4
  assert floats["kfac"] <= kfac <= floats["kfac"] + 2 * layers, kfac
  for name, o in row["optimizers"].items():
    assert math.isfinite(o["ratio_vs_sgd"]) and o["ratio_vs_sgd"] > 0, name
    assert o["nested_bytes"] == 0, name   # nothing communicated inside cond/while
