"""jax.jit data parallelism on 8 (virtual CPU) devices equals one device.

The work runs in one subprocess (tests/multidevice/jit_data_parallel.py, whose
docstring says what it measures); XLA's compile time dominates, so everything
is checked from that one run, in ONE test (pytest-xdist would otherwise run the
subprocess once per worker that gets a test of this module), and every
discrepancy is reported together.

Tolerances (all relative to the parameter change of the 5-step reference,
``|p - p_ref| / |p_ref - p0|``):

* float32, batch sharded (parameters replicated or FSDP-sharded): at most
  ``min(1e-5, max(2e-6, 10 * floor))``, where ``floor`` is the same method's error
  when the 1-device program runs on batches with permuted rows (pure float32
  re-association, measured 4e-7 to 3.5e-6 here). A data-parallel bug that changes
  the statistics by 8x changes the result by 1e-2 to 1 (checked too).
* statistics of step 1: ``|s - s_ref| / |s_ref| <= 1e-6`` per layer and field
  (float32 sums of 64 rows in another order: measured <= 1.6e-7).
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

from multidevice_util import FAST_COMPILE
from multidevice_util import REPO_ROOT
from multidevice_util import run_script
from multidevice_util import script_env

OPTIMIZERS = ("eva", "eva_f", "eva_s", "kfac", "foof", "shampoo")
BF16_OPTIMIZERS = ("eva", "kfac")
WITH_STATS = {"eva": ("a", "g"), "eva_f": ("a", "g"), "kfac": ("a", "g", "A", "G"),
              "foof": ("a", "g", "A", "G")}
F32_CAP = 1e-5
STATS_TOL = 1e-6
BF16_CAP = 5e-2


def f32_tolerance(floor: float) -> float:
  return min(F32_CAP, max(2e-6, 10.0 * floor))


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


def test_explicit_sharding_equals_one_device():
  """Under jax.set_mesh with Explicit axes, every optimizer trains (statistics
  and updates computed with the axes in Auto mode) and equals one device: data
  parallel and FSDP-sharded kernels, within 10x the round-off floor of the same
  steps on row-permuted batches (or B * eps32 where that floor is smaller);
  updated parameters keep their shardings; step 1's statistics equal one
  device's within 2 B eps32 (a sum over B = 64 rows in another order)."""
  result = run_script("explicit_sharding.py", devices=8, timeout=600,
                      env=FAST_COMPILE)
  assert result["devices"] == 8
  eps32 = float(np.finfo(np.float32).eps)
  failures = []
  for name, r in result["optimizers"].items():
    tol = max(10 * r["floor"], 64 * eps32)
    for kind in ("data", "fsdp"):
      if not r[kind] <= tol:
        failures.append(f"{name} {kind}: {r[kind]:.3g} of the change (tol {tol:.3g})")
      if not r[f"{kind}_specs_kept"]:
        failures.append(f"{name} {kind}: parameter shardings changed")
      if f"{kind}_stats" in r and not r[f"{kind}_stats"] <= 2 * 64 * eps32:
        failures.append(f"{name} {kind}: statistics off by {r[kind + '_stats']:.3g}")
    assert r["change"] > 1e-3, (name, r["change"])
  assert set(result["optimizers"]) == {"eva", "eva_f", "eva_s", "kfac", "foof", "shampoo"}
  assert not failures, "\n".join(failures)


# LAPACK calls (Cholesky, eigh) per refresh unit: K-FAC two factors, FOOF one
# eigendecomposition, Shampoo two roots per block.
CALLS_PER_UNIT = {"kfac": 2, "foof": 1, "shampoo": 2}


def test_distributed_refresh_equals_replicated_and_splits_the_work():
  """distribute_over="data" on 8 devices (unequal layers, a stacked block,
  fewer K-FAC/FOOF units than devices): the parameters after 3 steps with the
  refresh every step equal the replicated run's, under jax.jit with
  jax.set_mesh and inside shard_map; the compiled split gives each device only
  its own units (the LAPACK calls of each device's branch are its units'), so
  every unit is computed once, not on every device."""
  result = run_script("distribute_refresh.py", devices=8, timeout=900,
                      env=FAST_COMPILE)
  assert result["devices"] == 8
  failures = []
  for name, r in result["optimizers"].items():
    assert r["change"] > 1e-3, (name, r["change"])
    # The same unit functions on the same inputs: equal to the replicated run
    # (0 here; a few ulps where XLA would fuse a unit differently).
    for kind in ("jit", "shard_map"):
      if not r[kind] <= 1e-5:
        failures.append(f"{name} {kind}: {r[kind]:.3g} of the change")
    if name == "eva_s":
      continue
    per_device = r["plan_units_per_device"]
    calls = {int(d): len(v) for d, v in r["lapack_by_branch"].items()}
    want = {d: n * CALLS_PER_UNIT[name] for d, n in enumerate(per_device) if n}
    if calls != want:
      failures.append(f"{name}: LAPACK calls per device {calls}, plan {want}")
    if r["lapack_calls"] != r["plan_units"] * CALLS_PER_UNIT[name]:
      failures.append(f"{name}: {r['lapack_calls']} LAPACK calls for "
                      f"{r['plan_units']} units")
  assert result["optimizers"]["kfac"]["plan_units_per_device"].count(0) == 2
  assert not failures, "\n".join(failures)
