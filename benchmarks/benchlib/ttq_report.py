"""benchmarks/time_to_quality.py's record: reach, cost, the markdown table, the
JSON (with provenance) and the figure.

The **cost** of reaching a loss is what a user pays for it: the epochs a row
takes to first reach the loss times its step time relative to SGD's (both
measured in one process), over the baseline's (Adam's, AdamW's) same product
for its own final loss. The epoch at which a row first reaches a loss is
interpolated linearly between the last evaluation above it and the first at or
below it (from the initial loss at epoch 0 when the first evaluation is
already below; a record without that initial loss, older than this column,
gives the first evaluation's epoch, an upper bound, marked ``<=``).

Everything in the table is a pure function of the record (``runs`` -> row ->
``evals`` with ``epoch`` and the loss, ``step_ratio_vs_sgd``), so
``examples/readme_tables.py`` renders committed records, older ones included.
"""

from __future__ import annotations

import os
from typing import Any

from harness import provenance
from harness import records
from harness import style

LABELS = {"sgd": "SGD", "adam": "Adam", "eva": "Eva", "eva_f": "Eva-f",
          "eva_s": "Eva-s", "kfac": "K-FAC", "foof": "FOOF",
          "shampoo": "Shampoo", "gradient": "gradient"}
BASELINE = "adam"
# Old autoencoder records (before the task field) name their target and
# outside reference at the top level.
_OLD_TARGET_WHAT = "kfac-jax adaptive K-FAC, 3 epochs"
_SHORT = {"stats_batch": "stats batch", "curvature_batch": "curvature batch",
          "adapt_every": "adapt every", "inverse_every": "inverse every",
          "stats_every": "stats every"}


def label(row: str, labels: dict[str, str] | None = None) -> str:
  name, _, mode = row.partition("+")
  return ({**LABELS, **(labels or {})}[name]
          + (" + adaptive" if mode else ""))


def metric(record: dict[str, Any]) -> dict[str, Any]:
  """``{"key", "label", "log_scale"}`` of the record's reported loss."""
  return record.get("metric") or {"key": "test_mse", "label": "test MSE",
                                  "log_scale": True}


def targets(record: dict[str, Any]) -> dict[float, str]:
  """The fixed losses the table reports a reach for."""
  if "targets" in record:
    return {float(k): v for k, v in record["targets"].items()}
  return {record["target"]: _OLD_TARGET_WHAT} if record.get("target") else {}


def reach(rec: dict[str, Any], target: float, key: str
          ) -> dict[str, Any] | None:
  """When ``rec`` first reaches ``target``: the first evaluation at or below
  it (``epoch``, ``seconds``) and the interpolated epoch (``epoch_interp``;
  ``bound``: True when it is the first evaluation's epoch, an upper bound)."""
  evals = rec["evals"]
  for i, e in enumerate(evals):
    if e[key] <= target:
      out = {"epoch": e["epoch"], "seconds": e["train_seconds"],
             "epoch_interp": e["epoch"], "bound": False}
      prev = ((evals[i - 1]["epoch"], evals[i - 1][key]) if i else
              (0.0, rec["initial_loss"]) if "initial_loss" in rec else None)
      if prev is None:
        out["bound"] = True
      elif prev[1] > target:   # finite and above: the crossing lies between
        out["epoch_interp"] = prev[0] + (e["epoch"] - prev[0]) * (
            (prev[1] - target) / (prev[1] - e[key]))
      elif i == 0:             # the initial loss is already at or below it
        out["epoch_interp"] = 0.0
      return out
  return None


def baseline_final(record: dict[str, Any]) -> float | None:
  base = record["runs"].get(BASELINE)
  return base["evals"][-1][metric(record)["key"]] if base else None


def cost(rec: dict[str, Any], record: dict[str, Any]
         ) -> dict[str, Any] | None:
  """The cost of reaching the baseline's final loss, relative to the
  baseline's (None: no baseline or no step ratios); ``value`` None: the row
  never reaches it."""
  base, final = record["runs"].get(BASELINE), baseline_final(record)
  if final is None or rec.get("step_ratio_vs_sgd") is None or (
      base.get("step_ratio_vs_sgd") is None):
    return None
  key = metric(record)["key"]
  mine, theirs = reach(rec, final, key), reach(base, final, key)
  if mine is None:
    return {"value": None}
  denominator = theirs["epoch_interp"] * base["step_ratio_vs_sgd"]
  return {"value": mine["epoch_interp"] * rec["step_ratio_vs_sgd"]
                   / denominator,
          "epochs": mine["epoch_interp"], "bound": mine["bound"],
          "baseline_epochs": theirs["epoch_interp"],
          "baseline_step_ratio": base["step_ratio_vs_sgd"]}


def _fmt_reach(r):
  return "not reached" if r is None else f"{r['epoch']:g} ({r['seconds']:.0f} s)"


def _fmt_cost(c):
  if c is None:
    return "-"
  if c["value"] is None:
    return "not reached"
  return ("<=" if c["bound"] else "") + f"{c['value']:.2f}x"


def _under_load(rec) -> bool:
  return not rec.get("step_ratio_timing", {}).get("quiet", True)


def show(setting: str, value) -> str:
  """As ``ttq_rows.show`` (this module reads records without the library)."""
  if value is None:
    return "all" if setting.endswith("batch") else "none"
  return str(value)


# The settings a row shows only when it differs from these.
DEFAULT_SETTINGS = {"stats_batch": None, "curvature_batch": None,
                    "adapt_every": 5, "inverse_every": 10, "stats_every": 1}


def _settings(rec) -> str:
  s = rec.get("settings") or {}
  return ", ".join(f"{_SHORT[k]} {show(k, v)}" for k, v in s.items()
                   if v != DEFAULT_SETTINGS[k]) or "-"


def _digits(record) -> int:
  return 4 if metric(record)["key"] == "test_mse" else 3


def markdown_table(record: dict[str, Any]) -> str:
  """The table of a record in docs/results.md (a pure function of the JSON)."""
  runs, m = record["runs"], metric(record)
  labels = record.get("labels", {})
  base_label = label(BASELINE, labels)
  final = baseline_final(record)
  epochs = record["config"]["epochs"]
  d = _digits(record)
  new = any("settings" in r for r in runs.values())
  head = (["optimizer", "lr"] + (["settings"] if new else [])
          + [f"{m['label'].split(' (')[0]}, epoch {k}"
             for k in range(1, epochs + 1)]
          + ["train s", "step / SGD"]
          + [f"reaches {t:g}: epoch (s)" for t in targets(record)])
  if final is not None:
    head += [f"reaches {base_label}'s {final:.{d}f}: epoch (s)",
             f"cost to reach {base_label}'s {final:.{d}f}, relative to "
             f"{base_label}'s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row, rec in runs.items():
    by_epoch = {e["epoch"]: e[m["key"]] for e in rec["evals"]}
    values = [f"{by_epoch[k]:.{d}f}" if k in by_epoch else "-"
              for k in range(1, epochs + 1)]
    ratio = rec.get("step_ratio_vs_sgd")
    cells = ([label(row, labels),
              "adaptive" if "+" in row else f"{rec['learning_rate']:.3g}"]
             + ([_settings(rec)] if new else []) + values
             + [f"{rec['train_seconds']:.0f}",
                "-" if ratio is None else
                f"{ratio:.2f}x" + ("†" if _under_load(rec) else "")]
             + [_fmt_reach(reach(rec, t, m["key"])) for t in targets(record)])
    if final is not None:
      cells += [_fmt_reach(reach(rec, final, m["key"])),
                _fmt_cost(cost(rec, record))]
    lines.append("| " + " | ".join(cells) + " |")
  text = "\n\n".join(notes(record))
  return "\n".join(lines) + ("\n\n" + text if text else "")


def reference_curve(record: dict[str, Any]) -> dict[str, Any] | None:
  """The outside method's reported losses per epoch, if the record has one."""
  return record.get("reference_curve") or (
      {"label": "kfac-jax adaptive K-FAC (issue 10)",
       "losses": list(record["kfac_jax_adaptive"].values()),
       "note": "at 3.6-6x an SGD step"}
      if record.get("kfac_jax_adaptive") else None)


def notes(record: dict[str, Any]) -> list[str]:
  """The sentences under the table: the cost's definition, the load, the
  outside reference."""
  runs, labels = record["runs"], record.get("labels", {})
  b = label(BASELINE, labels)
  out = []
  if baseline_final(record) is not None:
    bound = any((cost(r, record) or {}).get("bound") for r in runs.values())
    out.append(
        f"Cost: the epochs to first reach {b}'s final loss (interpolated "
        "linearly between the evaluations around it) times the step time "
        f"relative to SGD's, over {b}'s same product."
        + (" `<=`: reached at the first evaluation, and this record has no "
           "epoch-0 loss to interpolate from: at most this." if bound else ""))
  if any("settings" in r for r in runs.values()):
    out.append("Settings: where the column shows none, the statistics and the "
               "curvature products use the whole batch, the "
               "Levenberg-Marquardt rule runs every 5 steps, inverses are "
               "refreshed every 10 steps and statistics taken every step.")
  timed = [r for r in runs.values() if "step_ratio_timing" in r]
  if timed:
    t = timed[0]["step_ratio_timing"]["max_load"]
    loud = [label(r["row"], labels) for r in timed if _under_load(r)]
    out.append(
        f"Step ratios timed with the 1-minute load average at most {t:g} "
        "before and after, re-timed when it was not"
        + (f"; † {', '.join(loud)}: never below it, the least loaded timing "
           "kept." if loud else "."))
  elif runs and all("step_ratio_timing" not in r for r in runs.values()):
    loads = [r["load_average"][0] for r in runs.values()
             if isinstance(r.get("load_average"), list)]
    if loads:
      out.append("This record predates the per-row load check: its step "
                 "ratios were timed whatever the load (1-minute load average "
                 f"{min(loads):.1f} to {max(loads):.1f} at the rows' ends, on "
                 f"{provenance.summary(record)['device'].get('cpu_count', '?')}"
                 " cores).")
  ref = reference_curve(record)
  if ref:
    out.append(f"{ref['label']}, for reference, "
               f"{metric(record)['label']} after epochs "
               f"{' / '.join(str(k + 1) for k in range(len(ref['losses'])))}: "
               f"{' / '.join(f'{v:.4f}' for v in ref['losses'])}, "
               f"{ref['note']}.")
  return out


def make_record(runs, sweeps, args, task, argv, *, script: str
                ) -> dict[str, Any]:
  """The JSON record: runs, sweeps, config, reach and cost, table,
  provenance."""
  record = {"benchmark": "time_to_quality", "task": task.name,
            "title": task.title,
            "provenance": provenance.collect(
                None if argv is None else [script] + list(argv)),
            "metric": {"key": task.metric, "label": task.metric_label,
                       "log_scale": task.name == "autoencoder"},
            "labels": task.labels,
            "baseline": {"row": BASELINE, "label": label(BASELINE, task.labels)},
            "targets": {f"{t:g}": w for t, w in task.targets.items()},
            "reference_curve": task.reference_curve}
  config = {k: v for k, v in vars(args).items()
            if k not in ("out", "settings", "grid", "target", "baseline_epochs")
            and not k.startswith("explore")}
  config.update(epochs=task.epochs, task=task.name, description=task.description,
                row_settings=args.settings, **task.config,
                fixed_rows={"momentum": "0.9 (Adam: none)",
                            "schedule": "linear decay to 0"},
                adaptive_rows={"loss": task.adaptive_loss})
  record.update(config=config, sweeps=sweeps, runs=runs)
  final = baseline_final(record)
  record["adam_final"] = final
  for rec in runs.values():
    rec["label"] = label(rec["row"], task.labels)
    rec["reach"] = {f"{t:g}": reach(rec, t, task.metric)
                    for t in task.targets}
    if final is not None:
      rec["reach"]["baseline_final"] = reach(rec, final, task.metric)
      rec["cost_vs_baseline"] = cost(rec, record)
  record["table"] = markdown_table(record)
  return record


def plot(record: dict[str, Any], path: str) -> str:
  """The loss against epochs and against the cost (epochs x step / SGD)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  m = metric(record)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  for row, rec in record["runs"].items():
    kw = dict(style.of(row.replace("gradient", "sgd")), markersize=4,
              label=rec["label"], linewidth=1.6 if "+" in row else 1.0)
    start = [(0.0, rec["initial_loss"])] if "initial_loss" in rec else []
    xs, ys = zip(*(start + [(e["epoch"], e[m["key"]]) for e in rec["evals"]]))
    axes[0].plot(xs, ys, **kw)
    if rec.get("step_ratio_vs_sgd"):   # log axis: from the first evaluation
      axes[1].plot([x * rec["step_ratio_vs_sgd"] for x in xs[len(start):]],
                   ys[len(start):], **kw)
  ref = reference_curve(record)
  if ref:
    axes[0].plot(range(1, len(ref["losses"]) + 1), ref["losses"], "kx",
                 markersize=8, label=ref["label"])
  final = baseline_final(record)
  b = record.get("baseline", {}).get("label", "Adam")
  for ax in axes:
    for t, what in targets(record).items():
      ax.axhline(t, color="k", linewidth=0.8, linestyle="-.",
                 label=f"{t:g} ({what})")
    if final is not None:
      style.target_line(ax, final, f"{b}'s final loss")
    if m.get("log_scale"):
      ax.set_yscale("log")
    ax.set_ylabel(m["label"])
    ax.grid(True, alpha=0.3)
  axes[0].set_xlabel("epoch")
  style.integer_ticks(axes[0].xaxis)
  axes[1].set_xscale("log")
  axes[1].set_xlabel("cost: epochs x step time / SGD's (SGD-epochs, log)")
  axes[0].legend(fontsize=7, ncol=2, loc="best")
  fig.suptitle(record.get("title", "Fashion-MNIST deep autoencoder: time to "
                                  "quality") + " (dashed: adaptive)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def stem(task: str) -> str:
  return "time_to_quality" + ("" if task == "autoencoder" else f"_{task}")


def write(record: dict[str, Any], out: str) -> list[str]:
  name = stem(record.get("task", "autoencoder"))
  path = records.write_json(os.path.join(out, name + ".json"), record)
  return [path, plot(record, os.path.join(out, name + ".png"))]
