"""``time_to_quality.py --explore``: which cheaper settings reach the target
soonest, in cost.

For each row of ``--explore-rows`` it trains every combination of the
settings of ``--grid`` that the row uses (the statistics' sub-batch, the
curvature sub-batch, the adaptation period, the inverse refresh period) for
``--explore-epochs`` epochs of the full run's schedule, evaluates the reported
loss ``--explore-evals-per-epoch`` times per epoch, times its step against
SGD's on a quiet machine, and prints its cost to reach the target: the
interpolated epochs to first reach it times the step ratio, also relative to
the baseline's (Adam's, AdamW's) cost. The target is by default the baseline's
final loss in the task's committed record, and the baseline's epochs to reach
it come from that record; the baseline's step ratio is timed here.

Fixed-rate rows train at ``--lr`` or at the rate the committed record chose
(else the sweep centre). Writes ``time_to_quality_explore[_TASK].json`` (with
provenance) and ``.png`` (epochs to the target against the step ratio, with
lines of equal cost).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax.numpy as jnp

from harness import provenance
from harness import records

from . import ttq_report
from . import ttq_rows
from . import ttq_task
from . import ttq_train

GRID = {"stats_batch": [None, 250], "curvature_batch": [None, 250],
        "adapt_every": [5, 20], "inverse_every": [10, 50]}


def grid(args) -> dict[str, list[int | None]]:
  """The explored values of each varied setting: ``--grid``'s, else
  :data:`GRID`'s for a setting the row flags (``--curvature-batch 250``) do
  not fix."""
  out = {k: v for k, v in GRID.items() if not args.settings.get(k)}
  for item in args.grid:
    name, _, values = item.partition("=")
    if name not in ttq_rows.SETTINGS:
      raise SystemExit(f"--grid {item}: no setting {name!r}; choose from "
                       f"{', '.join(ttq_rows.SETTINGS)}")
    out[name] = [None if v.lower() in ("all", "none") else int(v)
                 for v in values.split(",") if v]
  if not ttq_rows.stats_batch_supported():
    out["stats_batch"] = [None]     # this eva_optax has no stats_batch=
  return out


def configs(row: str, values: dict[str, list], settings: dict[str, dict],
            task: ttq_task.Task) -> list[ttq_rows.RowConfig]:
  """Every combination of ``values`` that ``row`` uses, its other settings
  from the row flags (``settings``); duplicates (a sub-batch of the whole
  batch) once."""
  used = [k for k in ttq_rows.SETTINGS
          if ttq_rows.applies(row, k) and k in values]
  out = []
  for combo in itertools.product(*(values[k] for k in used)):
    chosen = {**settings, **{k: {"*": v} for k, v in zip(used, combo)}}
    cfg = ttq_rows.config(row, chosen, task)
    if cfg not in out:
      out.append(cfg)
  return out


def committed(task: ttq_task.Task, results_dir: str) -> dict[str, Any] | None:
  path = os.path.join(results_dir, ttq_report.stem(task.name) + ".json")
  return records.read_json(path) if os.path.isfile(path) else None


def baseline(args, task, record) -> dict[str, Any]:
  """The target and the baseline's epochs to reach it."""
  key = task.metric
  base = (record or {}).get("runs", {}).get(ttq_report.BASELINE)
  target = args.target
  if target is None:
    if base is None:
      raise SystemExit("--explore: no committed record with a baseline row; "
                       "give --target and --baseline-epochs")
    target = base["evals"][-1][key]
  epochs = args.baseline_epochs
  if epochs is None and base is not None:
    r = ttq_report.reach(base, target, key)
    epochs = None if r is None else r["epoch_interp"]
  return {"target": target, "epochs": epochs,
          "source": "command line" if args.target is not None else
          "the committed record's baseline row"}


def _lr(row, args, task, record):
  if "+" in row:
    return None
  if row in args.lr:
    return args.lr[row]
  rec = (record or {}).get("runs", {}).get(row)
  return rec["learning_rate"] if rec else task.lr_centers[row]


def table(result: dict[str, Any]) -> str:
  """The exploration's table, cheapest first (then, among the settings that
  do not reach the target, the lowest final loss first)."""
  b = result["baseline"]
  head = ["row", "settings", "lr", f"loss at epoch {result['epochs']:g}",
          "step / SGD", f"reaches {b['target']:.4g}: epoch",
          "cost (SGD-epochs)", f"cost relative to {b['label']}'s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  last = lambda r: r["evals"][-1][result["metric"]] if r["evals"] else 1e30
  order = sorted(result["runs"], key=lambda r: (r["cost_sgd_epochs"] is None,
                                                r["cost_sgd_epochs"] or 0,
                                                last(r)))
  for r in order:
    ratio, c = r["step_ratio_vs_sgd"], r["cost_sgd_epochs"]
    rel = r["cost_vs_baseline"]
    lines.append("| " + " | ".join([
        r["label"], r["short"],
        "adaptive" if r["learning_rate"] is None else f"{r['learning_rate']:.3g}",
        f"{r['evals'][-1][result['metric']]:.4f}" if r["evals"] else "-",
        "-" if ratio is None else f"{ratio:.2f}x"
        + ("" if r.get("step_ratio_timing", {}).get("quiet", True) else "†"),
        "not reached" if r["reach"] is None else f"{r['reach']['epoch_interp']:.2f}",
        "-" if c is None else f"{c:.2f}",
        "-" if rel is None else f"{rel:.2f}x"]) + " |")
  epochs = ("does not reach it in the committed record" if b["epochs"] is None
            else f"{b['epochs']:.3g} epochs to reach it")
  ratio = ("-" if b["step_ratio_vs_sgd"] is None
           else f"{b['step_ratio_vs_sgd']:.2f}x")
  return "\n".join(lines) + (
      f"\n\nTarget {b['target']:.4g} ({b['source']}); {b['label']}: "
      f"{epochs}, at {ratio} SGD's step (timed here). Epochs interpolated "
      "between evaluations; † timed with the 1-minute load above the limit.")


def plot(result: dict[str, Any], path: str) -> str:
  """Epochs to the target against the step ratio; lines of equal cost."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from harness import style  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 5))
  seen = set()
  for r in result["runs"]:
    if r["reach"] is None or r["step_ratio_vs_sgd"] is None:
      continue
    s = style.of(r["row"])
    ax.plot(r["step_ratio_vs_sgd"], r["reach"]["epoch_interp"],
            marker=s["marker"], color=s["color"], linestyle="none",
            label=None if r["row"] in seen else r["label"])
    ax.annotate(r["short"], (r["step_ratio_vs_sgd"], r["reach"]["epoch_interp"]),
                fontsize=5, alpha=0.7)
    seen.add(r["row"])
  b = result["baseline"]
  if b["epochs"] and b["step_ratio_vs_sgd"]:
    base_cost = b["epochs"] * b["step_ratio_vs_sgd"]
    xs = np.linspace(0.8, max([2.0] + [r["step_ratio_vs_sgd"] or 0
                                      for r in result["runs"]]) * 1.1, 100)
    for f in (0.3, 0.5, 0.75, 1.0):
      ax.plot(xs, f * base_cost / xs, "k:", linewidth=0.7)
      ax.annotate(f"{f:g}x {b['label']}'s cost", (xs[-1], f * base_cost / xs[-1]),
                  fontsize=6)
  ax.set_xlabel("step time / SGD's")
  ax.set_ylabel(f"epochs to reach {b['target']:.4g}")
  ax.set_ylim(bottom=0)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(f"{result['description']}\nexploration, {result['epochs']:g} "
               "epochs per setting", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run(args, argv, *, script: str, results_dir: str) -> dict[str, Any]:
  """The exploration (see the module docstring); returns its record."""
  task = ttq_task.make(args.task, args)
  record = committed(task, results_dir)
  base = baseline(args, task, record)
  base["label"] = ttq_report.label(ttq_report.BASELINE, task.labels)
  values = grid(args)
  steps = max(1, round(args.explore_epochs * task.steps_per_epoch))
  todo = [c for row in args.explore_rows
          for c in configs(row, values, args.settings, task)]
  print(f"{task.description}\nexploring {len(todo)} settings of "
        f"{', '.join(args.explore_rows)} for {steps} steps each; target "
        f"{base['target']:.4g} ({base['source']})")
  reference = ttq_train.sgd_reference(task, args)
  adam = ttq_rows.config(ttq_report.BASELINE, {}, task)
  tx, step_at, _ = ttq_train.compiled(adam, task, args)
  state = ttq_train.copy(tx.init(task.params0))
  state.hyperparams["peak"] = jnp.asarray(
      _lr(ttq_report.BASELINE, args, task, record),
      state.hyperparams["peak"].dtype)
  rec = {"_run": (step_at, ttq_train.copy(task.params0), state, 0)}
  ttq_train.timed_ratio(rec, adam, reference, task, args)
  base["step_ratio_vs_sgd"] = rec["step_ratio_vs_sgd"]
  base["step_ratio_timing"] = rec.get("step_ratio_timing")
  result = {"benchmark": "time_to_quality_explore", "task": task.name,
            "description": task.description, "metric": task.metric,
            "epochs": steps / task.steps_per_epoch, "baseline": base,
            "grid": {k: v for k, v in values.items()},
            "provenance": provenance.collect(
                None if argv is None else [script] + list(argv)),
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "runs": []}
  name = ttq_report.stem(task.name).replace("time_to_quality",
                                            "time_to_quality_explore")
  result["table"] = table(result)
  path = records.write_json(os.path.join(args.out, name + ".json"), result)
  for i, cfg in enumerate(todo):
    print(f"[{i + 1}/{len(todo)}] {cfg.row}: {cfg.short()}")
    lr = _lr(cfg.row, args, task, record)
    r = ttq_train.train(cfg, lr, task, args, steps=steps,
                        evals_per_epoch=args.explore_evals_per_epoch)
    ttq_train.timed_ratio(r, cfg, reference, task, args)
    r.update(label=ttq_report.label(cfg.row, task.labels), short=cfg.short(),
             reach=ttq_report.reach(r, base["target"], task.metric))
    ratio = r["step_ratio_vs_sgd"]
    r["cost_sgd_epochs"] = (None if r["reach"] is None or ratio is None
                            else r["reach"]["epoch_interp"] * ratio)
    base_cost = (base["epochs"] * base["step_ratio_vs_sgd"]
                 if base["epochs"] and base["step_ratio_vs_sgd"] else None)
    r["cost_vs_baseline"] = (None if r["cost_sgd_epochs"] is None or not base_cost
                             else r["cost_sgd_epochs"] / base_cost)
    result["runs"].append(r)
    result["table"] = table(result)
    path = records.write_json(os.path.join(args.out, name + ".json"), result)
  png = plot(result, os.path.join(args.out, name + ".png"))
  print(result["table"])
  print(f"Wrote {path}, {png}")
  return result
