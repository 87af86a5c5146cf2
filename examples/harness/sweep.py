"""A short learning-rate sweep: a few values per optimizer, scored on held-out
training examples (the test set is never used)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from . import optimizers
from . import training


def sweep_grid(center: float, factors: Sequence[float] = (1 / 3, 1.0, 3.0)):
  """``center * factors``, each rounded to three significant digits."""
  return [float(f"{center * f:.3g}") for f in factors]


def lr_sweep(task: training.Task, names: Sequence[str],
             centers: dict[str, float], *, epochs: int, subset: int,
             validation: int, seed: int,
             options: dict[str, dict[str, Any]] | None = None,
             factors: Sequence[float] = (1 / 3, 1.0, 3.0), extend: int = 2,
             schedule: str = "linear", momentum: float = 0.9,
             progress: bool = True) -> dict[str, Any]:
  """A short learning-rate sweep: ``centers[name] * factors`` for each name.

  Each value trains ``epochs`` epochs (with ``schedule`` over those epochs: a
  linear decay to 0 by default, like the full runs, so that a short sweep
  ranks the values the way a long run does) on the first
  ``subset`` training examples and is scored by the loss on the last
  ``validation`` training examples (disjoint from the subset; the test set is
  never used). The value with the lowest final validation loss is chosen; a
  run that diverges scores +inf. When the best value is at an end of the grid,
  the grid is extended by one more factor-of-``factors[1]/factors[0]`` step in
  that direction, at most ``extend`` times.

  Returns:
    The sweep's settings and, per optimizer, every value tried with its
    validation loss, and the value chosen (``optimizers[name]["chosen"]``).
  """
  options = options or {}
  if subset + validation > len(task.x_train):
    raise ValueError("subset + validation exceed the training set.")
  val = (task.x_train[-validation:], task.y_train[-validation:])
  sub = task.subset(subset)
  ratio = factors[1] / factors[0]
  out = {"epochs": epochs, "subset": subset, "validation": validation,
         "seed": seed, "factors": list(factors), "extend": extend,
         "schedule": schedule,
         "selected_by": "lowest validation loss (last `validation` training "
         "examples) after the sweep epochs", "optimizers": {}}

  def score(name, lr):
    rec = training.train(
        sub, name, lr, epochs, seed, momentum=momentum, schedule=schedule,
        options=options.get(name), eval_sets={"val": val}, progress=progress,
        desc=f"sweep {optimizers.LABELS[name]} lr={lr:g}")
    last = rec["epochs"][-1]
    val_loss = last.get("val_loss", math.inf)
    if rec["diverged"] or not math.isfinite(val_loss):
      val_loss = math.inf
    return {"learning_rate": lr, "val_loss": val_loss,
            "train_loss": last["train_loss"], "diverged": rec["diverged"],
            "time_per_epoch_s": rec["time_per_epoch_s"]}

  for name in names:
    results = [score(name, lr) for lr in sweep_grid(centers[name], factors)]
    for _ in range(extend):
      results.sort(key=lambda r: r["learning_rate"])
      best = min(range(len(results)), key=lambda i: results[i]["val_loss"])
      if not math.isfinite(results[best]["val_loss"]):
        break
      if best == 0:
        lr = results[0]["learning_rate"] / ratio
      elif best == len(results) - 1:
        lr = results[-1]["learning_rate"] * ratio
      else:
        break
      results.append(score(name, float(f"{lr:.3g}")))
    results.sort(key=lambda r: r["learning_rate"])
    chosen = min(results, key=lambda r: r["val_loss"])
    out["optimizers"][name] = {"center": centers[name], "results": results,
                               "chosen": chosen["learning_rate"]}
  return out
