"""Times to a target and the markdown table printed after a comparison.

Wall-clock times on a shared machine depend on its load; every run records,
after each epoch, the time of a few SGD steps of the same model
(``ref_step_s``), and :func:`adjusted_times` rescales each epoch to a common
reference so that runs taken under different loads compare.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from . import optimizers


def adjusted_times(rec: dict[str, Any], ref: float | None) -> list[float]:
  """Cumulative training time per epoch, rescaled epoch by epoch to a common
  SGD reference step time ``ref`` (``epoch_time * ref / ref_step_s``): the
  time the run would have taken at the machine load of the reference."""
  out, total = [], 0.0
  for e in rec["epochs"]:
    scale = ref / e["ref_step_s"] if ref and e.get("ref_step_s") else 1.0
    total += e["epoch_time_s"] * scale
    out.append(total)
  return out


def common_reference(runs: dict[str, dict[str, Any]]) -> float | None:
  """The median of the runs' SGD reference step times (None if none has one)."""
  refs = [r["ref_step_s"] for r in runs.values() if r.get("ref_step_s")]
  return statistics.median(refs) if refs else None


def time_to_reach(rec: dict[str, Any], target: float,
                  times: Sequence[float] | None = None) -> float | None:
  """Training time at the end of the first epoch whose test loss <= target
  (``times``: per-epoch cumulative times to use instead of the raw ones)."""
  if times is None:
    times = [e["train_time_s"] for e in rec["epochs"]]
  for e, t in zip(rec["epochs"], times):
    if e.get("test_loss", math.inf) <= target:
      return t
  return None


def final_loss(rec: dict[str, Any] | None) -> float | None:
  """The last epoch's test loss of a run (None if absent or not evaluated)."""
  if not rec or not rec["epochs"]:
    return None
  return rec["epochs"][-1].get("test_loss")


NOTE = (
    "Times exclude compilation and evaluation. step / SGD step: the run's "
    "median step time over the median time of SGD steps timed alongside it "
    "(after every epoch), which cancels the load of a shared machine; "
    "load-adjusted: each epoch's time rescaled to the common SGD reference "
    "step; the epoch count does not depend on the load. step peak: the "
    "compiled step's peak memory as XLA accounts it (memory_analysis(): "
    "parameters, state, batch, outputs and temporaries). cosine: mean over "
    "steps of cos(P(g), g) over all parameters (P(g) read off the momentum "
    "buffer: before momentum and lr); * = cos(update, g) for optimizers "
    "without a momentum trace (Adam).")


def markdown_table(runs: dict[str, dict[str, Any]],
                   reference: str = "sgd") -> str:
  """Optimizer, final test loss (and accuracy), time per epoch, step time
  against SGD's measured alongside, time to reach the reference's final test
  loss (raw and load-adjusted) and the epoch that reaches it, state size,
  mean cosine."""
  has_acc = any("test_accuracy" in e for r in runs.values()
                for e in r["epochs"])
  target = final_loss(runs.get(reference))
  ref_step = common_reference(runs)
  ref_label = optimizers.LABELS.get(reference, reference)
  head = ["optimizer", "final test loss"]
  if has_acc:
    head.append("test acc.")
  head += ["time/epoch (s)", "step / SGD step",
           f"time to {ref_label}'s final loss (s)", "same, load-adjusted (s)",
           "epoch reaching it", "state (MB)"]
  has_mem = any(r.get("step_memory_bytes") for r in runs.values())
  if has_mem:
    head.append("step peak (MB)")
  head.append("cosine")
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---" for _ in head) + "|"]
  for name, rec in runs.items():
    last = rec["epochs"][-1] if rec["epochs"] else {}
    loss = last.get("test_loss")
    row = [rec["label"], "diverged" if rec["diverged"] else
           (f"{loss:.5f}" if loss is not None else "-")]
    if has_acc:
      acc = last.get("test_accuracy")
      row.append(f"{100 * acc:.2f}%" if acc is not None else "-")
    row.append(f"{rec['time_per_epoch_s']:.1f}")
    ratio = rec.get("step_ratio_vs_sgd")
    row.append(f"{ratio:.2f}" if ratio else "-")

    def reach(times, fmt):
      if target is None or times is None:
        return "-"
      t = time_to_reach(rec, target, times)
      return "not reached" if t is None else fmt.format(t)

    row += [reach([e["train_time_s"] for e in rec["epochs"]], "{:.1f}"),
            reach(adjusted_times(rec, ref_step) if ref_step else None, "{:.1f}"),
            reach([e["epoch"] for e in rec["epochs"]], "{:d}")]
    row.append(f"{rec['state_bytes'] / 2**20:.2f}")
    if has_mem:
      mem = rec.get("step_memory_bytes")
      row.append(f"{mem['peak'] / 2**20:.1f}" if mem else "-")
    cos = rec.get("cosine_mean")
    row.append("-" if name == "sgd" or cos is None else
               f"{cos:.3f}" + ("" if rec["cosine_of"].startswith("precond")
                               else "*"))
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  lines.append(NOTE)
  return "\n".join(lines)
