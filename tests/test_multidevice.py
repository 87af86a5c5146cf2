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

import numpy as np
import pytest

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
  """benchmarks/scaling.py --quick on 2 devices: the bytes in collectives per step,
  the refresh's work per device, and the split refresh against the replicated one.

  SGD all-reduces the gradient and the loss; Eva adds its Kronecker vectors, the
  paper's ``d_in + 1 + d_out`` floats per layer (up to the row count per layer that
  the capture reduces with them); K-FAC adds its full factors. Replicated, every
  device computes the whole refresh and nothing is communicated inside it; split
  (where the library has ``distribute_over``), the busiest device does less than
  all of it, the results travel inside the refresh's conditional only, the
  per-step traffic is the replicated run's, and the parameters match it.
  """
  out = tmp_path / "scaling.json"
  cmd = [sys.executable, "benchmarks/scaling.py", "--quick", "--devices", "2",
         "--optimizers", "eva,kfac", "--inverse-every", "10", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=script_env(None), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert "| SGD step, ms CPU (wall) |" in proc.stdout, proc.stdout
  record = json.loads(out.read_text())
  assert (tmp_path / "scaling.png").stat().st_size > 0
  assert record["provenance"]["versions"]["jax"]
  # docs/devices.md's renderer gives the tables the script printed.
  sys.path.insert(0, str(REPO_ROOT / "examples"))
  import readme_tables  # pylint: disable=g-import-not-at-top
  assert readme_tables.render_scaling(record) == record["table"]
  summary = record["summary"]
  (row,) = summary["rows"]
  floats = summary["analytic_floats"]
  layers = floats["layers"]
  assert row["devices"] == 2
  assert row["sgd_bytes"] == 4 * (floats["gradient"] + floats["loss"])
  eva = row["optimizers"]["eva"]["extra_bytes_vs_sgd"] // 4
  assert floats["eva_without_bias_entry"] <= eva <= floats["eva"] + 2 * layers, eva
  kfac = row["optimizers"]["kfac_10"]
  assert floats["kfac"] <= kfac["extra_bytes_vs_sgd"] // 4 <= floats["kfac"] + 2 * layers
  # Per layer, A ((d_in + 1)^2) and G (d_out^2): a Cholesky (n^3/3) and two
  # triangular solves against the identity (n^3 each), on both devices.
  widths = [64] + summary["widths"]
  cubes = sum((i + 1) ** 3 + o ** 3 for i, o in zip(widths, widths[1:]))
  full = cubes * (1 / 3 + 2)
  assert kfac["refresh_flops_per_device"] == [pytest.approx(full)] * 2
  for name, o in row["optimizers"].items():
    assert math.isfinite(o["ratio_vs_sgd"]) and o["ratio_vs_sgd"] > 0, name
    assert o["compile_s"] > 0 and o["hlo_instructions"] > 0, name
    assert o["step_bytes"] == o["bytes"], name       # no collective inside a loop
    if not o["split"]:
      assert o["nested_bytes"] == 0, name   # nothing communicated inside cond/while
  split = row["optimizers"].get("kfac_10_split")
  if split is None:
    assert summary["skipped"] == ["kfac_10_split"]
    return
  assert split["step_bytes"] == kfac["step_bytes"]
  assert 0 < split["refresh_bytes"]
  # refresh_plan's bytes received per device: (D - 1) of the D gathered buffers.
  assert split["plan_bytes_per_refresh"] == split["refresh_gathered_bytes"] / 2
  assert split["refresh_imbalance"] == pytest.approx(split["plan_imbalance"], rel=0.05)
  assert split["refresh_flops_max"] < full
  assert sum(split["refresh_flops_per_device"]) == pytest.approx(full)
  assert split["vs_replicated"]["relative"] < 1e-4, split["vs_replicated"]


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


def test_distributed_refresh_equals_replicated_and_splits_the_work():
  """distribute_over="data" on 8 devices (unequal layers, a stacked block,
  fewer K-FAC/FOOF units than devices): the parameters after 3 steps with the
  refresh every step equal the replicated run's, under jax.jit with
  jax.set_mesh and inside shard_map; in the compiled programs (LAPACK calls
  counted with loop trips, per device) each device computes only its own
  units: the devices' flops add up to what every device computes in the
  replicated program, the idle devices compute none, the busiest less than a
  replicated device."""
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
    split, rep = r["split_flops"], r["replicated_flops"]
    if len(set(rep)) != 1 or not rep[0] > 0:
      failures.append(f"{name}: replicated flops per device {rep}")
    if abs(sum(split) - rep[0]) > 1e-9 * rep[0]:
      failures.append(f"{name}: split flops {split} add to {sum(split)}, "
                      f"not the replicated {rep[0]}")
    idle = [d for d, n in enumerate(r["plan_units_per_device"]) if n == 0]
    if any(split[d] != 0 for d in idle) or any(
        split[d] == 0 for d in range(8) if d not in idle):
      failures.append(f"{name}: flops {split} for plan {r['plan_units_per_device']}")
    if not max(split) < rep[0]:
      failures.append(f"{name}: busiest device {max(split)} >= replicated {rep[0]}")
  assert result["optimizers"]["kfac"]["plan_units_per_device"].count(0) == 2
  assert not failures, "\n".join(failures)
