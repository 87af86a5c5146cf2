"""Several processes (jax.distributed, gloo CPU collectives) equal one process.

tests/multidevice/multiprocess_train.py runs 5 jit data-parallel steps of eva
and kfac on one global mesh of 8 CPU devices: once as 2 processes with 4
devices each on a localhost coordinator (each process feeding only its half of
every batch), once as 1 process with 8 devices. The two runs execute the same
SPMD program over the same 8-device mesh, so the reductions group the same
partial sums; only the transport differs (gloo over TCP against in-process).
The all-reduce inside gloo may add the partial sums in another order, so the
results agree to float32 round-off, not bit for bit. Tolerances: 1e-5 of the
parameter change (the cap of tests/test_multidevice.py, whose 8-device runs
re-associate far more; printed under ``pytest -rP``), and per statistic of step
1 and per loss twice the rounding of the last 8-term sum (each side within
8 + 2 roundings, relative to the terms' magnitude as in multidevice_util).
"""

from __future__ import annotations

import numpy as np

from conftest import float32_tol
from multidevice_util import FAST_COMPILE
from multidevice_util import run_processes
from multidevice_util import run_script

OPTIMIZERS = ("eva", "kfac")
TOL = 1e-5         # of the parameter change
STATS_TOL = 2 * float32_tol(1.0, 8 + 2)   # relative, per statistic and loss


def _flat(tree) -> np.ndarray:
  if isinstance(tree, dict):
    return np.concatenate([_flat(tree[k]) for k in sorted(tree)])
  return np.asarray(tree, np.float64).reshape(-1)


def test_two_processes_equal_one_process():
  procs = run_processes("multiprocess_train.py", num_processes=2,
                        devices_per_process=4, timeout=300, env=FAST_COMPILE)
  ref = run_script("multiprocess_train.py", devices=8, timeout=300,
                   args=("--num-processes", "1"), env=FAST_COMPILE)
  assert ref["process_count"] == 1 and ref["devices"] == 8
  for i, r in enumerate(procs):
    assert (r["process_id"], r["process_count"]) == (i, 2)
    assert (r["devices"], r["local_devices"]) == (8, 4)
  # Each process fed its own half of every batch.
  assert [r["local_rows"] for r in procs] == [[0, 32], [32, 64]]

  failures, report = [], []
  p0 = _flat(ref["initial_params"])
  for name in OPTIMIZERS:
    want = ref["optimizers"][name]
    change = np.linalg.norm(_flat(want["params"]) - p0)
    if not change > 1e-2 * np.linalg.norm(p0):
      failures.append(f"{name}: the parameters barely moved")
    for r in procs:
      got = r["optimizers"][name]
      err = np.linalg.norm(_flat(got["params"]) - _flat(want["params"])) / change
      report.append(f"{name} process {r['process_id']}: {err:.3g} of the change")
      if not err <= TOL:
        failures.append(f"{name} process {r['process_id']}: parameters differ from "
                        f"the 1-process run by {err:.3g} of the change (> {TOL:g})")
      for layer, fields in want["stats"].items():
        for f, v in fields.items():
          ref_v = np.asarray(v, np.float64)
          e = np.linalg.norm(np.asarray(got["stats"][layer][f]) - ref_v) / np.linalg.norm(ref_v)
          if not e <= STATS_TOL:
            failures.append(f"{name} process {r['process_id']}: statistic "
                            f"{layer}.{f} differs by {e:.3g} (> {STATS_TOL:g})")
      if not np.allclose(got["losses"], want["losses"], rtol=STATS_TOL, atol=0):
        failures.append(f"{name} process {r['process_id']}: losses {got['losses']} "
                        f"vs {want['losses']}")
  print("\n".join(report))     # shown by pytest -rP
  assert not failures, "\n".join(failures + report)
