"""benchmarks/time_to_quality.py's record: reach times, the markdown table,
the JSON (with provenance) and the figure."""

from __future__ import annotations

import os
from typing import Any

from harness import provenance
from harness import records
from harness import style

TARGET = 0.0107  # kfac-jax adaptive K-FAC, 3 epochs (issue 10)
KFAC_JAX_ADAPTIVE = (0.0244, 0.0139, 0.0107)  # its test MSE after epochs 1, 2, 3
REFRESH = {"kfac": 10, "foof": 10, "shampoo": 10}  # inverse_every

LABELS = {"sgd": "SGD", "adam": "Adam", "eva": "Eva", "eva_f": "Eva-f",
          "eva_s": "Eva-s", "kfac": "K-FAC", "foof": "FOOF",
          "shampoo": "Shampoo", "gradient": "gradient"}
def label(row: str) -> str:
  name, _, mode = row.partition("+")
  return LABELS[name] + (" + adaptive" if mode else "")


def reach(rec: dict[str, Any], target: float) -> dict[str, float] | None:
  """The first evaluation at or below ``target``: its epoch and training seconds."""
  for e in rec["evals"]:
    if e["test_mse"] <= target:
      return {"epoch": e["epoch"], "seconds": e["train_seconds"]}
  return None


def _fmt_reach(r):
  return "not reached" if r is None else f"{r['epoch']:g} ({r['seconds']:.0f} s)"


def markdown_table(record: dict[str, Any]) -> str:
  """The table of a record in docs/results.md (a pure function of the JSON)."""
  runs, adam_final = record["runs"], record["adam_final"]
  epochs = record["config"]["epochs"]
  cols = [f"epoch {k}" for k in range(1, epochs + 1)]
  head = (["optimizer", "lr"] + [f"test MSE, {c}" for c in cols]
          + ["train s", "step / SGD", f"reaches {TARGET}: epoch (s)"])
  if adam_final is not None:
    head.append(f"reaches Adam's {adam_final:.4f}: epoch (s)")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row, rec in runs.items():
    by_epoch = {e["epoch"]: e["test_mse"] for e in rec["evals"]}
    mses = [f"{by_epoch[k]:.4f}" if k in by_epoch else "-"
            for k in range(1, epochs + 1)]
    lr = "adaptive" if "+" in row else f"{rec['learning_rate']:.3g}"
    cells = ([label(row), lr] + mses
             + [f"{rec['train_seconds']:.0f}",
                "-" if rec["step_ratio_vs_sgd"] is None
                else f"{rec['step_ratio_vs_sgd']:.2f}x",
                _fmt_reach(rec["reach"]["target"])])
    if adam_final is not None:
      cells.append(_fmt_reach(rec["reach"]["adam"]))
    lines.append("| " + " | ".join(cells) + " |")
  ref = " / ".join(f"{v:.4f}" for v in KFAC_JAX_ADAPTIVE)
  lines.append("")
  lines.append(f"kfac-jax adaptive K-FAC (issue 10, for reference), test MSE "
               f"after epochs 1 / 2 / 3: {ref}, at 3.6-6x an SGD step.")
  return "\n".join(lines)


def make_record(runs, sweeps, args, setup: Any, argv, *, model_sizes,
                script: str) -> dict[str, Any]:
  """The JSON record: runs, sweeps, config, reach times, table, provenance."""
  adam = runs.get("adam")
  adam_final = adam["evals"][-1]["test_mse"] if adam else None
  for rec in runs.values():
    rec["label"] = label(rec["row"])
    rec["reach"] = {"target": reach(rec, TARGET),
                    "adam": reach(rec, adam_final) if adam_final else None}
  config = {k: v for k, v in vars(args).items() if k not in ("out",)}
  config.update(model="784-" + "-".join(map(str, model_sizes)) + "-784",
                batch=setup.batch, train_images=int(setup.x_train.shape[0]),
                test_images=int(setup.x_test.shape[0]),
                steps_per_epoch=setup.steps_per_epoch,
                fixed_rows={"momentum": 0.9, "schedule": "linear decay to 0",
                            "inverse_every": REFRESH},
                loss="MSE averaged over batch x 784, pixels in [0, 1]")
  record = {"benchmark": "time_to_quality",
            "provenance": provenance.collect(
                None if argv is None else [script] + list(argv)),
            "config": config, "target": TARGET, "adam_final": adam_final,
            "kfac_jax_adaptive": {f"epoch {k + 1}": v
                                  for k, v in enumerate(KFAC_JAX_ADAPTIVE)},
            "sweeps": sweeps, "runs": runs}
  record["table"] = markdown_table(record)
  return record


def plot(record: dict[str, Any], path: str) -> str:
  """Test MSE against epoch and against training seconds (log scale)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  for row, rec in record["runs"].items():
    _, _, mode = row.partition("+")
    # The gradient direction + adaptive is drawn in SGD's colour, dashed.
    kw = dict(style.of(row.replace("gradient", "sgd")), markersize=4,
              label=rec["label"],
              linewidth=1.6 if mode else 1.0)
    ev = rec["evals"]
    axes[0].plot([e["epoch"] for e in ev], [e["test_mse"] for e in ev], **kw)
    axes[1].plot([e["train_seconds"] for e in ev], [e["test_mse"] for e in ev], **kw)
  ref = KFAC_JAX_ADAPTIVE[:record["config"]["epochs"]]
  axes[0].plot(range(1, len(ref) + 1), ref, "kx", markersize=8,
               label="kfac-jax adaptive K-FAC (issue 10)")
  sgd = record["runs"].get("sgd")
  for ax in axes:
    ax.axhline(TARGET, color="k", linewidth=0.8, linestyle="-.",
               label=f"{TARGET} (kfac-jax adaptive, 3 epochs)")
    if sgd:
      style.target_line(ax, sgd["evals"][-1]["test_mse"], "SGD's final MSE")
    ax.set_yscale("log")
    ax.set_ylabel("test MSE (10,000 images)")
    ax.grid(True, alpha=0.3)
  axes[0].set_xlabel("epoch")
  style.integer_ticks(axes[0].xaxis)
  axes[1].set_xlabel("training seconds (compilation and evaluation excluded)")
  axes[0].legend(fontsize=7, ncol=2)
  c = record["config"]
  fig.suptitle(f"Fashion-MNIST deep autoencoder, {c['train_images']} images, "
               f"batch {c['batch']}, {c['epochs']} epochs: time to quality "
               "(dashed: adaptive)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(record: dict[str, Any], out: str) -> list[str]:
  path = records.write_json(os.path.join(out, "time_to_quality.json"), record)
  return [path, plot(record, os.path.join(out, "time_to_quality.png"))]
