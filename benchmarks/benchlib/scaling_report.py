"""benchmarks/scaling.py's table and figure."""

from __future__ import annotations

import os
import sys
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mb(b: float) -> str:
  return f"{b / 1e6:.3f}"


def report(summary: dict[str, Any], names: list[str], label_of: dict[str, str]) -> str:
  labels = [label_of[n] for n in names]
  out = ["Step time / SGD's (wall; CPU time in brackets), virtual CPU devices:", "",
         "| devices | SGD step ms | " + " | ".join(labels) + " |",
         "|---:|---:|" + "---:|" * len(names)]
  for row in summary["rows"]:
    cells = [f"{o['ratio_vs_sgd']:.2f} ({o['cpu_ratio_vs_sgd']:.2f})"
             for o in (row["optimizers"][n] for n in names)]
    out.append(f"| {row['devices']} | {row['sgd_step_ms']:.1f} | " + " | ".join(cells) + " |")
  out += ["", "MB in collectives per step (operand bytes; SGD's total, the others' extra "
          "over SGD's):", "",
          "| devices | SGD | " + " | ".join(l for n, l in zip(names, labels) if n != "sgd") + " |",
          "|---:|---:|" + "---:|" * (len(names) - 1)]
  for row in summary["rows"]:
    cells = [("+" + _mb(row["optimizers"][n]["extra_bytes_vs_sgd"]))
             for n in names if n != "sgd"]
    out.append(f"| {row['devices']} | {_mb(row['sgd_bytes'])} | " + " | ".join(cells) + " |")
  fl = summary["analytic_floats"]
  out += ["", f"Analytic floats over the {fl['layers']} layers: gradient + loss "
          f"{fl['gradient'] + fl['loss']}; Eva sum(d_in + 1 + d_out) = {fl['eva']} "
          f"(without the constant bias entry of a: {fl['eva_without_bias_entry']}); "
          f"Eva-f sum(d_in + 1) = {fl['eva_f']} ({fl['eva_f_without_bias_entry']}); "
          f"K-FAC sum((d_in + 1)^2 + d_out^2) = {fl['kfac']}."]
  last = summary["rows"][-1]
  if last["devices"] > 1:
    measured = {n: o["extra_bytes_vs_sgd"] // 4 for n, o in last["optimizers"].items()}
    out.append(f"Measured extra floats at {last['devices']} devices: "
               + ", ".join(f"{label_of[n]} {v}" for n, v in measured.items()
                           if n != "sgd")
               + f"; SGD's total {last['sgd_bytes'] // 4}.")
  return "\n".join(out)


def plot(summary: dict[str, Any], names: list[str], label_of: dict[str, str],
         path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sys.path.insert(0, os.path.join(_ROOT, "examples"))
  from harness import style  # pylint: disable=g-import-not-at-top
  rows = summary["rows"]
  devs = [r["devices"] for r in rows]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  many = [r for r in rows if r["devices"] > 1]     # one device: no collectives
  for n in names:
    ax1.plot(devs, [r["optimizers"][n]["ratio_vs_sgd"] for r in rows],
             label=label_of[n], **style.of(n))
    extra = [r["optimizers"][n]["extra_bytes_vs_sgd"] / 1e6 for r in many]
    if n != "sgd" and extra and min(extra) > 0:
      ax2.plot([r["devices"] for r in many], extra, label=label_of[n],
               **style.of(n))
  if many:
    ax2.plot([r["devices"] for r in many], [r["sgd_bytes"] / 1e6 for r in many],
             label="SGD (total)", **style.of("sgd"))
  else:
    ax2.text(0.5, 0.5, "no collectives on one device", ha="center",
             transform=ax2.transAxes)
  for ax in (ax1, ax2):
    ax.set_xscale("log", base=2)
    ax.set_xticks(devs)
    ax.set_xticklabels([str(d) for d in devs])
    ax.set_xlabel("virtual CPU devices (batch sharded)")
  ax1.set_ylabel("step time / SGD's")
  if many:
    ax2.set_yscale("log")
  ax2.set_ylabel("MB all-reduced per step (extra over SGD)")
  ax1.legend(fontsize=8)
  ax2.legend(fontsize=8)
  fig.suptitle("Data parallel with jax.jit shardings: deep autoencoder, global batch "
               f"{summary['batch']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
