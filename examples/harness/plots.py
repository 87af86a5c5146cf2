"""The comparison figure: test loss against epoch and against training time.

Every optimizer keeps its colour and marker (:mod:`harness.style`), the title
names the task and its settings (so no two figures share one), the y axis
names the loss, the epoch axis has integer ticks, and SGD's final test loss is
drawn as the target line. :func:`replot` redraws a figure from its JSON.
"""

from __future__ import annotations

import os
from typing import Any

from . import optimizers
from . import records
from . import style
from . import tables

# Loss names of the records written before the task carried one.
LOSS_NAMES = {"autoencoder": "MSE (mean over batch x 784 pixels)",
              "classifier": "cross-entropy (nats, mean over batch)"}


def loss_name(record: dict[str, Any]) -> str:
  """What the loss is, for the y axis (``record["loss_name"]``, or by task)."""
  return (record.get("loss_name") or LOSS_NAMES.get(record.get("task"))
          or "loss")


def _fmt_lr(lr: Any) -> str:
  return f"{lr:g}" if isinstance(lr, (int, float)) else str(lr)


def settings(record: dict[str, Any]) -> list[str]:
  """Two lines that name a comparison's settings: data, epochs, batch,
  schedule, seed, where the learning rates come from, and their values."""
  config = record.get("config", {})
  runs = record.get("runs", {})
  n = next((r["train_examples"] for r in runs.values()
            if "train_examples" in r), None)
  batch = config.get("batch_size") or next(
      (r["batch_size"] for r in runs.values() if "batch_size" in r), None)
  parts = [f"{config.get('epochs', '?')} epochs"]
  if n is not None:
    parts[0] += f" on {n:,} training examples"
  if batch:
    parts.append(f"batch {batch}")
  schedule = config.get("schedule")
  if schedule:
    parts.append("lr decayed linearly to 0" if schedule == "linear"
                 else f"{schedule} lr")
  parts.append(f"seed {config.get('seed', '?')}")
  parts.append("lr chosen by the sweep" if config.get("sweep")
               else "lr set by the flags")
  lrs = record.get("learning_rates", {})
  lr_line = "lr: " + ", ".join(
      f"{optimizers.LABELS.get(n, n)} {_fmt_lr(lrs[n])}" for n in runs
      if n in lrs)
  return [", ".join(parts), lr_line]


def figure_title(record: dict[str, Any]) -> str:
  """The task (``record["title"]``) and :func:`settings`, one per line."""
  return "\n".join([record.get("title") or record.get("task", "")]
                   + settings(record))


def figure(record: dict[str, Any], log_scale: bool = False):
  """The matplotlib figure of a comparison record: test loss against epoch
  and against training wall-clock time (load-adjusted where the runs carry an
  SGD reference step)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = record["runs"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
  ref = tables.common_reference(runs)
  for name, rec in runs.items():
    times = tables.adjusted_times(rec, ref)
    ep = [(e, t) for e, t in zip(rec["epochs"], times) if "test_loss" in e]
    if not ep:
      continue
    kw = dict(label=rec["label"], markersize=4, **style.of(name))
    axes[0].plot([e["epoch"] for e, _ in ep], [e["test_loss"] for e, _ in ep],
                 **kw)
    axes[1].plot([t for _, t in ep], [e["test_loss"] for e, _ in ep], **kw)
  target = tables.final_loss(runs.get("sgd"))
  if target is not None and len(runs) > 1:
    for ax in axes:
      style.target_line(ax, target, f"SGD's final test loss ({target:.4g})")
  axes[0].set_xlabel("epoch")
  style.integer_ticks(axes[0].xaxis)
  axes[1].set_xlabel("training wall-clock time (s)" + (
      ", load-adjusted" if ref else ""))
  for ax in axes:
    ax.set_ylabel(f"test {loss_name(record)}")
    if log_scale:
      ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
  if any(ax.get_lines() for ax in axes):
    axes[1].legend(fontsize=8)
  fig.suptitle(figure_title(record), fontsize=10)
  fig.tight_layout()
  return fig


def plot(path: str, record: dict[str, Any], log_scale: bool = False) -> str:
  """Writes :func:`figure` of ``record`` to ``path`` (a PNG)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = figure(record, log_scale)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def replot(json_path: str, png_path: str | None = None) -> str:
  """Redraws the figure of a comparison record (default: next to the JSON)."""
  record = records.read_json(json_path)
  png_path = png_path or os.path.splitext(json_path)[0] + ".png"
  log_scale = record.get("log_scale", record.get("task") == "autoencoder")
  return plot(png_path, record, log_scale=log_scale)
