"""A whole comparison: optional sweep, one run per optimizer, JSON, PNG, table."""

from __future__ import annotations

import os
import time
from typing import Any

import eva_optax

from . import cli
from . import optimizers
from . import plots
from . import provenance
from . import records
from . import sweep as sweep_lib
from . import tables
from . import training


def run_comparison(task: training.Task, args, *, title: str,
                   options: dict[str, dict[str, Any]],
                   notes: dict[str, Any] | None = None,
                   file_stem: str | None = None,
                   sweep_centers: dict[str, float] | None = None
                   ) -> dict[str, Any]:
  """Sweep (optional), train every optimizer, write JSON and PNG, print table.

  Args:
    task: model, loss and data.
    args: the flags of :func:`harness.cli.add_common_args`. The learning
      rates are the ``--lr-*`` flags, or with ``--sweep`` the values the sweep
      chooses around ``sweep_centers`` (default: the ``--lr-*`` flags).
    title: the task, for the figure's title (the settings are added to it).
    options: per-optimizer constructor options.
    notes: free-form notes kept in the JSON.
    file_stem: the JSON's and PNG's name in ``args.out`` (default the task's).
    sweep_centers: the sweep grids' centres.

  Returns:
    The record written to the JSON, with ``paths`` added. The JSON and PNG
    are rewritten after every run, so that an interrupted comparison keeps
    what it has finished.
  """
  names = cli.parse_optimizers(args.optimizers)
  missing = [n for n in names if not optimizers.available(n)]
  if missing:
    print(f"Skipping {missing}: not in eva_optax {eva_optax.__version__}.")
    names = [n for n in names if n not in missing]
  lrs = {n: getattr(args, f"lr_{n}") for n in optimizers.OPTIMIZERS}
  full_task = task
  task = task.subset(args.train_subset)
  origin = provenance.collect()
  sweep = None
  if args.sweep:
    centers = {**lrs, **(sweep_centers or {})}
    sweep = sweep_lib.lr_sweep(
        full_task, names, centers, epochs=args.sweep_epochs,
        subset=args.sweep_subset, validation=args.sweep_validation,
        seed=args.seed, schedule=args.schedule, options=options,
        progress=not args.no_progress)
    for n, s in sweep["optimizers"].items():
      lrs[n] = s["chosen"]
    print("Sweep (validation loss per learning rate):")
    for n, s in sweep["optimizers"].items():
      vals = ", ".join(f"{r['learning_rate']:g}: {r['val_loss']:.5g}"
                       for r in s["results"])
      print(f"  {optimizers.LABELS[n]:8s} {vals}  -> {s['chosen']:g}")
  stem = file_stem or task.name
  json_file = os.path.join(args.out, f"{stem}.json")
  png_file = os.path.join(args.out, f"{stem}.png")
  previous = None
  if getattr(args, "append", False) and os.path.exists(json_file):
    previous = records.read_json(json_file)

  def save(runs):
    record = {"task": task.name, "title": title, "loss_name": task.loss_name,
              "log_scale": task.log_scale, "notes": notes or {},
              "config": dict(vars(args)),
              "learning_rates": {n: lrs[n] for n in runs},
              "options": {n: options.get(n, {}) for n in runs},
              "sweep": sweep, "provenance": origin, "runs": runs}
    if previous is not None:
      record = records.merge(previous, record)
    record["table"] = tables.markdown_table(record["runs"])
    records.write_json(json_file, record)
    plots.plot(png_file, record, log_scale=task.log_scale)
    return record

  runs = {}
  if sweep is not None:
    save(runs)
  reference = training.make_reference(task, args.seed)
  for n in names:
    runs[n] = training.train(
        task, n, lrs[n], args.epochs, args.seed, schedule=args.schedule,
        options=options.get(n), progress=not args.no_progress,
        reference=reference)
    runs[n]["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    record = save(runs)
  if not runs:
    record = save(runs)
  print()
  print(record["table"])
  print()
  print(f"JSON: {json_file}")
  print(f"PNG:  {png_file}")
  record["paths"] = {"json": json_file, "png": png_file}
  return record
