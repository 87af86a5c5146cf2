"""Training a row, its learning-rate sweep, and its step time against SGD's.

* :func:`train`: one row from the task's initial parameters, the reported
  loss after every ``1 / evals_per_epoch`` epoch (training seconds exclude
  compilation and evaluation);
* :func:`sweep`: the short learning-rate sweep of a fixed-rate row;
* :func:`timed_ratio`: the row's step time over SGD's, in this process, right
  after the row's training, interleaved, on a quiet machine
  (:mod:`benchlib.loadavg`).
"""

from __future__ import annotations

import faulthandler
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import loadavg
from . import ttq_rows
from . import ttq_task


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


class HangGuard:
  """Aborts the process (every thread's stack, exit status 1) if the block
  runs longer than ``seconds`` (0: no guard): a hung XLA call cannot be
  interrupted, and an unattended run must not hang silently."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def __enter__(self):
    if self.seconds:
      faulthandler.dump_traceback_later(self.seconds, exit=True,
                                        file=sys.stderr)

  def __exit__(self, *exc):
    if self.seconds:
      faulthandler.cancel_dump_traceback_later()


_COMPILED: dict[ttq_rows.RowConfig, Any] = {}


def compiled(cfg: ttq_rows.RowConfig, task: ttq_task.Task, args):
  """``(tx, step_at, compile seconds)`` for ``cfg``, built once;
  ``step_at(k)`` is the compiled step for global step ``k`` (the capturing
  one, or with ``stats_every > 1`` the plain one between captures)."""
  if cfg not in _COMPILED:
    tx = ttq_rows.optimizer(cfg, task, args)
    every = cfg.stats_every if cfg.statistics and cfg.stats_every else 1
    t0 = time.perf_counter()
    with HangGuard(args.hang_timeout):
      steps = [ttq_rows.make_step(task, tx, cfg, capture).lower(
          task.params0, tx.init(task.params0), task.data, jnp.int32(0)
      ).compile() for capture in ((True, False) if every > 1 else (True,))]
    step_at = lambda k: steps[0] if k % every == 0 else steps[-1]
    _COMPILED[cfg] = (tx, step_at, time.perf_counter() - t0)
  return _COMPILED[cfg]


def clear_cache() -> None:
  _COMPILED.clear()


def _adaptive_record(state) -> dict[str, Any]:
  return {"final_damping": float(state.damping),
          "last_coefficients": [float(c) for c in state.coefficients],
          "last_rho": float(state.rho),
          "nonfinite_count": int(state.nonfinite_count),
          "curvature_count": int(state.curvature_count),
          "rejected_count": int(state.rejected_count)}


def train(cfg: ttq_rows.RowConfig, lr: float | None, task: ttq_task.Task,
          args, *, steps: int | None = None, sweep: bool = False,
          evals_per_epoch: int | None = None, log=print) -> dict[str, Any]:
  """Trains one row (``sweep``: on the sweep's data, scored on its held-out
  examples); returns its record, with ``_run`` (the compiled step, the final
  parameters and state, the step count) for :func:`timed_ratio`."""
  tx, step_at, compile_s = compiled(cfg, task, args)
  data = task.sweep_data if sweep else task.data
  evaluate = task.sweep_evaluate if sweep else task.evaluate
  params, state = copy(task.params0), copy(tx.init(task.params0))
  if not cfg.adaptive:
    state.hyperparams["peak"] = jnp.asarray(lr, state.hyperparams["peak"].dtype)
  initial = float(evaluate(params))    # also compiles the evaluation
  steps = task.total_steps if steps is None else steps
  per_epoch = evals_per_epoch or task.evals_per_epoch
  every = max(1, task.steps_per_epoch // per_epoch)
  evals, seconds, losses = [], 0.0, []
  load_start = loadavg.now()
  bar = tqdm(total=steps, desc=cfg.row if lr is None else f"{cfg.row} lr {lr:.3g}",
             disable=sweep or not args.progress, leave=False,
             dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
  for start in range(0, steps, every):
    t = time.perf_counter()
    with HangGuard(args.hang_timeout):
      for k in range(start, min(start + every, steps)):
        params, state, loss = step_at(k)(params, state, data,
                                         jnp.int32(task.batch_index(k)))
        losses.append(loss)
        bar.update(1)
      jax.block_until_ready(params)
    seconds += time.perf_counter() - t
    value = float(evaluate(params))
    evals.append({"epoch": round(min(start + every, steps)
                                 / task.steps_per_epoch, 6),
                  task.metric: value, "train_seconds": seconds})
    bar.set_postfix({task.metric: f"{value:.4g}"}, refresh=False)
    if not np.isfinite(value):
      break
  bar.close()
  rec = {"row": cfg.row, "learning_rate": lr, "settings": cfg.settings(),
         "initial_loss": initial, "evals": evals, "train_seconds": seconds,
         "compile_seconds": compile_s,
         "train_loss_last": float(np.mean([float(x) for x in losses[-10:]])),
         "train_load_average": {"start": load_start, "end": loadavg.now()},
         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  if cfg.adaptive:
    rec["adaptive"] = _adaptive_record(state)
  rec["_run"] = (step_at, params, state, steps)
  if log:
    lr_s = "-" if lr is None else f"{lr:.4g}"
    log(f"  {cfg.row:18s} lr {lr_s:<10} " + "  ".join(
        f"{e['epoch']:.3g}:{e[task.metric]:.4f}" for e in evals)
        + f"  ({seconds:.1f} s train, {compile_s:.1f} s compile)")
  return rec


def sweep(cfg: ttq_rows.RowConfig, task: ttq_task.Task, args,
          log=print) -> dict[str, Any]:
  """The short sweep: the run's schedule for its first ``--sweep-steps``
  steps at x1/3, x1 and x3 the task's centre (one more step of 3 when the
  best is at an edge), scored on the sweep's held-out examples."""
  results = {}
  steps = min(args.sweep_steps or task.sweep_steps, task.total_steps)

  def run(lr):
    rec = train(cfg, lr, task, args, steps=steps, sweep=True, log=None)
    val = rec["evals"][-1][task.metric]
    results[lr] = val if np.isfinite(val) else float("inf")

  grid = [task.lr_centers[cfg.name] * f for f in (1 / 3, 1.0, 3.0)]
  for lr in tqdm(grid, desc=f"sweep {cfg.row}", leave=False,
                 disable=not args.progress, file=sys.stderr):
    run(lr)
  best = min(results, key=results.get)
  if best in (grid[0], grid[-1]):
    run(best / 3 if best == grid[0] else best * 3)
    best = min(results, key=results.get)
  log(f"  sweep {cfg.row:8s} " + "  ".join(
      f"{lr:.3g}:{v:.4f}" for lr, v in sorted(results.items()))
      + f"  -> {best:.3g}")
  return {"steps": steps,
          "results": {f"{k:.6g}": v for k, v in sorted(results.items())},
          "chosen": best}


def sgd_reference(task: ttq_task.Task, args):
  """The SGD step the step-time ratios divide by: ``(step_at, params, state,
  0)``, compiled in this process, started from the initial parameters at the
  sweep centre's rate."""
  cfg = ttq_rows.config("sgd", {}, task)
  tx, step_at, _ = compiled(cfg, task, args)
  state = copy(tx.init(task.params0))
  state.hyperparams["peak"] = jnp.asarray(task.lr_centers["sgd"],
                                          state.hyperparams["peak"].dtype)
  return (step_at, copy(task.params0), state, 0)


def step_ratio(run, reference, rounds: int, steps: int,
               task: ttq_task.Task) -> dict[str, Any]:
  """Median over interleaved rounds of (row's time for ``steps`` steps) /
  SGD's. The row continues from where its training stopped, so a window of
  a multiple of its period holds its share of refreshes, adaptations and
  captures."""

  def timed(run, n=steps):
    step_at, p, s, k0 = run
    t = time.perf_counter()
    for k in range(k0, k0 + n):
      p, s, _ = step_at(k)(p, s, task.data, jnp.int32(task.batch_index(k)))
    jax.block_until_ready(p)
    return time.perf_counter() - t, (step_at, p, s, k0 + n)

  run = (run[0], copy(run[1]), copy(run[2]), run[3])
  ref = (reference[0], copy(reference[1]), copy(reference[2]), reference[3])
  _, ref = timed(ref, 2)   # its first calls after a while: not counted
  ratios, sgd_s = [], []
  for _ in range(rounds):
    t_sgd, ref = timed(ref)
    t_row, run = timed(run)
    ratios.append(t_row / t_sgd)
    sgd_s.append(t_sgd / steps)
  return {"ratio": float(np.median(ratios)), "per_round": ratios,
          "sgd_step_s": float(np.median(sgd_s)), "steps": steps}


def timed_ratio(rec: dict[str, Any], cfg: ttq_rows.RowConfig, reference,
                task: ttq_task.Task, args, log=print) -> None:
  """Adds the row's ``step_ratio_vs_sgd`` to ``rec``, timed on a quiet
  machine (:func:`loadavg.when_quiet`): ``load_average`` (before and after
  the kept timing) and ``step_ratio_timing`` (every attempt)."""
  run = rec.pop("_run")
  if reference is None:
    rec["step_ratio_vs_sgd"] = None
    return
  # Windows of whole periods; fewer rounds of a long period, so that about
  # --ratio-rounds x --ratio-steps steps are timed (at least one period).
  steps = -(-args.ratio_steps // cfg.period) * cfg.period
  rounds = max(1, -(-args.ratio_rounds * args.ratio_steps // steps))

  def measure():
    with HangGuard(args.hang_timeout):
      return step_ratio(run, reference, rounds, steps, task)

  result, timing = loadavg.when_quiet(measure, args.max_load,
                                      args.load_retries, args.load_wait,
                                      log=log)
  kept = timing["attempts"][timing["used"]]
  rec["step_ratio_vs_sgd"] = result["ratio"]
  rec["load_average"] = {"before": kept["load_before"],
                         "after": kept["load_after"]}
  rec["step_ratio_timing"] = timing
