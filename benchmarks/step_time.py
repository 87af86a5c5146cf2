"""Step time and optimizer-state memory of the Eva family against SGD and Adam.

Measures, in one process and on whatever device JAX picks, the jitted *full*
training step (forward, backward, statistics, optimizer update, apply) of

  SGD-momentum, Adam, Eva, Eva-f, Eva-s, K-FAC, FOOF and Shampoo
  (K-FAC, FOOF and Shampoo with ``inverse_every`` 1 and 10)

on two models:

  * ``autoencoder``: the deep autoencoder 784-1000-500-250-30-250-500-1000-784
    (ReLU, MSE reconstruction loss), batch 1000;
  * ``cnn``: Conv(32, 3x3) - ReLU - maxpool 2 - Conv(64, 3x3) - ReLU - maxpool 2 -
    Dense(128) - ReLU - Dense(10), softmax cross-entropy, 28x28x1 inputs, batch 128.

Data is random (timings do not depend on it); the steps cycle through 8 fixed
batches. Every number is reported as a ratio against SGD-momentum (and Adam)
measured in the same process, because the machines this runs on are shared and
noisy; absolute milliseconds are printed too but are not comparable across runs.

How it is measured
------------------
* Each optimizer gets its own copy of the parameters; the step is
  ``jax.jit(step, donate_argnums=(0, 1))`` (params and optimizer state are donated,
  so XLA may update them in place), and every call is followed by
  ``jax.block_until_ready`` on its outputs. SGD, Adam, Eva-s and Shampoo use plain
  ``jax.value_and_grad``; Eva and Eva-f ``eva_optax.value_and_grad(...,
  statistics="vectors")``; K-FAC and FOOF ``statistics="factors"``. Defaults of
  every optimizer are the library's (learning rates: SGD and the Eva family 0.01,
  Adam 1e-3; they do not change the cost).
* Warm-up: compile, then run one full refresh period (at least 2 steps).
* The optimizers are interleaved: ``--rounds`` rounds, each running every optimizer
  for a window of ``--steps`` consecutive steps (the order rotates per round). The
  per-round figure is the **median** step time of the window for methods that do
  the same work every step, and the **mean per step over whole refresh periods**
  for ``inverse_every=k > 1`` (the window is rounded up to a multiple of ``k``, at
  least ``k`` steps): a median would hide the one expensive refresh step per
  period, the mean amortizes it as a training run pays it.
* ``step ms`` is the median over rounds of the per-round figures. The ratios are
  *paired*: the median over rounds of (this optimizer's per-round figure / the
  reference's figure in the same round), which cancels slow drifts of the load.
* ``CPU-time ratio vs SGD``: the same paired ratio on the process CPU time
  (``time.process_time``, all threads) instead of wall time. Time slices taken
  by other processes do not count in it, so on a loaded shared machine it is the
  steadier measure of the work a step does (XLA's idle workers sleep rather than
  spin for long, so waiting adds little to it). ``round spread`` is
  (max - min) / median of the per-round wall figures: a quick noise gauge.
* State memory is the sum of ``nbytes`` over the leaves of ``opt_state``; the
  ratio column divides by SGD-momentum's state (its momentum buffer, one copy of
  the parameters). For Eva and Eva-f the extra state beyond that buffer is
  checked against the analytic ``sum over layers of (d_in + 1 + d_out)``
  (``d_in + 1`` for Eva-f) plus the state's int32 counters. Next to it,
  ``step peak MB`` is the compiled step's own footprint as XLA accounts it
  (``jax.stages.Compiled.memory_analysis()``: parameters, state, batch,
  outputs and temporaries, donated buffers counted once).
* Diagnostic ``cos(dir, g)``: after the timed steps, the cosine (over all
  parameters together) between the optimizer's *direction before momentum and
  learning rate* and the raw gradient, at the final parameters. It is computed
  with the same optimizer built with ``momentum=0`` and ``learning_rate=1``,
  starting from the timed run's preconditioner state (the first element of the
  chain); for SGD it is 1 by construction. Near 1 means the curvature only
  rescaled the step; lower means it turned the direction (see docs/choosing.md,
  "Why Eva behaves like SGD here").
* A breakdown times the pieces of the SGD and Eva steps separately (gradient
  alone, gradient plus statistics, update plus apply alone, full steps), to
  locate any extra time Eva spends.
* ``OPENBLAS_NUM_THREADS`` defaults to 1 (see below), and
  ``faulthandler.dump_traceback_later`` aborts with exit status 1 and every
  thread's stack if one call runs longer than ``--hang-timeout`` seconds (a
  deadlocked XLA call cannot be interrupted).
* The JSON records where the numbers came from (``provenance``: git commit and
  whether the tree was dirty, command line, versions, device, date).

The pieces live in ``benchmarks/benchlib/`` (models, optimizers, timing,
diagnostics, tables); this file is the command line and the order of work.

Usage::

  python benchmarks/step_time.py                    # full run, both models
  python benchmarks/step_time.py --quick            # smoke test (tiny, ~2 min)
  python benchmarks/step_time.py --models cnn --optimizers sgd,adam,eva \\
      --rounds 7 --steps 20 --out results/cnn.json
"""

from __future__ import annotations

import os

# LAPACK (K-FAC's Cholesky, FOOF's and Shampoo's eigh) runs through the
# OpenBLAS bundled with scipy. Its own threads busy-wait against XLA's threads
# and, on a small shared machine, make a 128x128 eigh ~150x slower (measured
# here on 2 cores: 116 ms vs 0.7 ms; 1000x1000: 8.4 s vs 72 ms). SGD, Adam and
# the Eva family never call LAPACK. Set before numpy loads; an explicit value in
# the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import sys
from typing import Any

import jax
import optax

import eva_optax

import benchlib
from benchlib import diagnostics
from benchlib import optimizers
from benchlib import problems
from benchlib import report
from benchlib import timing

benchlib.add_examples_to_path()
from harness import memory
from harness import provenance
# pylint: enable=g-import-not-at-top,wrong-import-position


def run_model(name: str, specs: list[optimizers.OptSpec], args,
              log=print) -> dict[str, Any]:
  """Times every optimizer of ``specs`` on model ``name``; the model's record."""
  problem = problems.make_problem(name, args.quick)
  n_params = int(optax.tree.size(problem.params))
  log(f"\n## {problem.description}")
  log(f"  parameters: {n_params:,}")
  runners = [timing.StepRunner(s, problem) for s in specs]
  timings = timing.time_interleaved(runners, args.rounds, args.steps, log=log)
  res: dict[str, Any] = {"description": problem.description,
                         "batch": problem.batch, "n_params": n_params,
                         "optimizers": {}}
  by = {r.name: r for r in runners}
  sgd_t = timings.get("sgd", {}).get("step_s")
  adam_t = timings.get("adam", {}).get("step_s")
  sgd_bytes = by["sgd"].state_bytes if "sgd" in by else None
  for r in runners:
    t = timings[r.name]
    entry = {"label": r.spec.label, "period": r.spec.period,
             "statistics": r.spec.statistics or "none (jax.value_and_grad)",
             **t,
             "state_bytes": r.state_bytes, "state_numbers": r.state_numbers,
             "step_memory_bytes": memory.memory_figures(r.compiled()),
             "final_loss": float(r.loss),
             "init_state_aliased_leaves": r.aliased_leaves}
    if sgd_t:
      ref = timings["sgd"]
      entry["ratio_vs_sgd"] = timing.paired_ratio(t, ref)
      entry["cpu_ratio_vs_sgd"] = timing.paired_ratio(t, ref, "per_round_cpu_s")
      entry["ratio_of_medians_vs_sgd"] = t["step_s"] / sgd_t
      entry["ratio_of_minima_vs_sgd"] = (min(t["per_round_s"])
                                         / min(ref["per_round_s"]))
    if adam_t:
      entry["ratio_vs_adam"] = timing.paired_ratio(t, timings["adam"])
    if sgd_bytes:
      entry["state_ratio_vs_sgd"] = r.state_bytes / sgd_bytes
    try:
      entry["cosine"] = diagnostics.direction_cosine(r.spec, r, problem)
    except Exception as e:  # pylint: disable=broad-except
      # A diagnostic must not kill the benchmark.
      entry["cosine"] = None
      entry["cosine_error"] = f"{type(e).__name__}: {e}"
    res["optimizers"][r.name] = entry
  if "sgd" in by:
    res["eva_state"] = diagnostics.eva_state_report(problem, by)
  if args.breakdown and hasattr(eva_optax, "eva"):
    log("  breakdown (SGD vs Eva pieces):")
    res["breakdown"] = diagnostics.breakdown(problem, args.rounds, args.steps,
                                             log=log)
  return res


def parser() -> argparse.ArgumentParser:
  names = [o.name for o in optimizers.OPTIMIZERS]
  ap = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--models", default=",".join(problems.MODELS),
                  help=f"comma-separated subset of {problems.MODELS}")
  ap.add_argument("--optimizers", default=",".join(names),
                  help="comma-separated subset of " + ", ".join(names)
                  + " (sgd is always added: everything is a ratio against it)")
  ap.add_argument("--rounds", type=int, default=5,
                  help="interleaved rounds (median over rounds is reported)")
  ap.add_argument("--steps", type=int, default=10,
                  help="consecutive steps per optimizer per round (rounded up to "
                  "whole refresh periods for inverse_every > 1)")
  ap.add_argument("--quick", action="store_true",
                  help="smoke test: tiny models and batches, 1 round of 2 steps "
                  "(numbers are meaningless)")
  ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                  help="skip the SGD-vs-Eva piece-by-piece timing")
  ap.add_argument("--out", default="results/step_time.json",
                  help="JSON output path")
  ap.add_argument("--hang-timeout", type=float, default=None,
                  help="abort (exit status 1, every thread's stack) if one call "
                  "runs longer than this many seconds, compilation included "
                  "(None: 600, 120 with --quick); 0 disables")
  return ap


def parse_args(argv=None):
  ap = parser()
  args = ap.parse_args(argv)
  if args.hang_timeout is None:
    args.hang_timeout = 120.0 if args.quick else 600.0
  if args.quick:
    args.rounds, args.steps = 1, 2
  if args.rounds < 1 or args.steps < 1:
    ap.error("--rounds and --steps must be >= 1")
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  timing.set_hang_timeout(args.hang_timeout)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  for m in models:
    if m not in problems.MODELS:
      raise SystemExit(f"unknown model {m!r}; choose from {problems.MODELS}")
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  for n in names:
    if n not in optimizers.BY_NAME:
      raise SystemExit(f"unknown optimizer {n!r}; choose from "
                       f"{list(optimizers.BY_NAME)}")
  if "sgd" not in names:
    names = ["sgd"] + names
  specs = [s for n, s in optimizers.BY_NAME.items() if n in names]  # canonical
  missing = [s.name for s in specs if not optimizers.available(s)]
  specs = [s for s in specs if optimizers.available(s)]
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  log(f"jax {jax.__version__} on {jax.devices()}; rounds={args.rounds}, "
      f"steps={args.steps}{' (quick)' if args.quick else ''}")
  if missing:
    log(f"not in this eva_optax, skipped: {missing}")
  all_res = {
      "provenance": provenance.collect(),
      "meta": {"rounds": args.rounds, "steps": args.steps, "quick": args.quick,
               "config": vars(args), "loadavg_start": os.getloadavg()},
      "missing_optimizers": missing,
      "models": {m: run_model(m, specs, args, log=log) for m in models},
  }
  all_res["meta"]["loadavg_end"] = os.getloadavg()
  timing.set_hang_timeout(0)
  report.print_report(all_res)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(all_res, f, indent=1)
  log(f"\nwrote {args.out}")
  return all_res


if __name__ == "__main__":
  main()
