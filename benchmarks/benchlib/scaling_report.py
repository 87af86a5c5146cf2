"""benchmarks/scaling.py's tables and figure, rendered from the record's summary.

:func:`markdown` is what examples/readme_tables.py puts in docs/devices.md: the
tables of a record written by this version of the benchmark (``summary["schema"]
== SCHEMA``), or, for a record of the earlier benchmark (one table, K-FAC and
Shampoo replicated only), the table stored in it.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA = 2
FIRST_ORDER = ("sgd", "adam", "eva", "eva_f")
SECOND_ORDER = ("kfac", "foof", "shampoo")


def _mb(b: float) -> str:
  return f"{b / 1e6:.3f}"


def _ratio(x: float | None, fmt: str = "{:.2f}") -> str:
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def order(summary: dict[str, Any]) -> list[str]:
  """The methods of the summary: first-order ones, then each second-order base by
  refresh period, replicated before split."""
  present = {n for row in summary["rows"] for n in row["optimizers"]}
  out = [n for n in FIRST_ORDER if n in present]
  for base in SECOND_ORDER:
    for k in summary.get("inverse_every", []):
      for suffix in ("", "_split"):
        name = f"{base}_{k}{suffix}"
        if name in present:
          out.append(name)
  return out + sorted(present - set(out))


def _cells(summary, name, fn) -> list[str]:
  out = []
  for row in summary["rows"]:
    o = row["optimizers"].get(name)
    out.append("-" if o is None else fn(o, row))
  return out


def report(summary: dict[str, Any]) -> str:
  """Markdown: time per device count, the refresh's work per device count, and
  traffic, compile and agreement at the largest device count."""
  rows = summary["rows"]
  labels = summary["labels"]
  names = order(summary)
  devs = [r["devices"] for r in rows]
  head = "| method | " + " | ".join(
      f"{d} device" + ("s" if d > 1 else "") for d in devs) + " |"
  rule = "|---|" + "---:|" * len(devs)
  out = ["Step time / SGD's on process CPU time (wall time in brackets). The virtual "
         "devices share the machine's cores, so CPU time counts the work of all of "
         "them; a method with k > 1 reports the mean step over whole refresh periods:",
         "", head, rule,
         "| SGD step, ms CPU (wall) | " + " | ".join(
             f"{r['sgd_cpu_ms']:.1f} ({r['sgd_step_ms']:.1f})" for r in rows) + " |"]
  for n in names:
    cells = _cells(summary, n, lambda o, row: (
        f"{o['cpu_ratio_vs_sgd']:.2f} ({o['ratio_vs_sgd']:.2f})"))
    out.append(f"| {labels[n]} | " + " | ".join(cells) + " |")

  # The refresh's work: the same for every k, so one row per base and mode.
  work_rows = []
  for base in SECOND_ORDER:
    for split in (False, True):
      cands = [n for n in names if rows and any(
          (o := r["optimizers"].get(n)) and o["base"] == base and o["split"] == split
          for r in rows)]
      if cands:
        work_rows.append(cands[0])
  if work_rows:
    out += ["", "The refresh's LAPACK work on the busiest device, GFLOP per refresh "
            "(max over mean across the devices in brackets), counted from the compiled "
            "program: each call's operand shape times the trip counts of the loops "
            "around it, each device's own branch of the switch on the device index "
            "(flop models: Cholesky n^3/3, eigh 9 n^3, triangular solve n^2 per "
            "right-hand side):", "", head, rule]
    for n in work_rows:
      cells = _cells(summary, n, lambda o, row: (
          f"{o['refresh_flops_max'] / 1e9:.3f} ({o['refresh_imbalance']:.2f})"))
      out.append(f"| {_base_label(labels[n], n)} | " + " | ".join(cells) + " |")

  last = rows[-1]
  d = last["devices"]
  sgd_step = last["optimizers"]["sgd"]["step_bytes"]
  out += ["", f"At {d} device" + ("s" if d > 1 else "") + ": MB in collectives per "
          "step (SGD's total, the others' extra over SGD's) and per refresh (inside the "
          "refresh's conditional, as gathered), the refresh's balance (max over mean "
          "of the busiest device's flops; the library's refresh_plan estimate in "
          "brackets), the step's compile time (lower + compile, CPU seconds) and "
          "compiled HLO instructions against Adam's, and a split method's largest parameter "
          "difference from the replicated run after the same steps, relative to the "
          "replicated run's change:", "",
          "| method | MB per step | MB per refresh | refresh max/mean | compile s "
          "| / Adam's | HLO instructions | / Adam's | split vs replicated |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for n in names:
    o = last["optimizers"].get(n)
    if o is None:
      continue
    step = _mb(sgd_step) if n == "sgd" else "+" + _mb(o["step_bytes"] - sgd_step)
    balance = "-"
    if o["base"] in SECOND_ORDER:
      balance = f"{o['refresh_imbalance']:.2f}"
      if o.get("plan_imbalance") is not None:
        balance += f" ({o['plan_imbalance']:.2f})"
    vs = o.get("vs_replicated")
    out.append(
        f"| {labels[n]} | {step} | {_mb(o['refresh_gathered_bytes'])} | {balance} | "
        f"{o['compile_cpu_s']:.1f} | {_ratio(o['compile_cpu_vs_adam'])} | "
        f"{o['hlo_instructions']} | {_ratio(o['hlo_instructions_vs_adam'])} | "
        + ("-" if not vs else "0 (bit for bit)" if vs["relative"] == 0
           else f"{vs['relative']:.1e}") + " |")

  fl = summary["analytic_floats"]
  out += ["", f"Analytic floats over the {fl['layers']} layers: gradient + loss "
          f"{fl['gradient'] + fl['loss']}; Eva sum(d_in + 1 + d_out) = {fl['eva']} "
          f"(without the constant bias entry of a: {fl['eva_without_bias_entry']}); "
          f"Eva-f sum(d_in + 1) = {fl['eva_f']} ({fl['eva_f_without_bias_entry']}); "
          f"K-FAC sum((d_in + 1)^2 + d_out^2) = {fl['kfac']}."]
  if d > 1:
    measured = {n: int(o["step_bytes"] - sgd_step) // 4
                for n, o in last["optimizers"].items()
                if n in ("eva", "eva_f") or (o["base"] == "kfac" and not o["split"])}
    if measured:
      out.append(f"Measured extra floats per step at {d} devices: "
                 + ", ".join(f"{labels[n]} {v}" for n, v in measured.items())
                 + f"; SGD's total {int(sgd_step) // 4}.")
  notes = sorted({note for r in rows for o in r["optimizers"].values()
                  for note in o.get("work_notes", [])})
  if notes:
    out.append("Counting notes: " + "; ".join(notes) + ".")
  if summary.get("skipped"):
    out.append("Not run: " + ", ".join(summary["skipped"])
               + " (this eva_optax has no distribute_over).")
  for f in summary.get("failed", []):
    out.append(f"The {f['devices']}-device run failed ({f['why']}); its column is missing.")
  return "\n".join(out)


def _base_label(label: str, name: str) -> str:
  """``"K-FAC k=10, split"`` -> ``"K-FAC, split"``."""
  head, _, rest = label.partition(" k=")
  return head + (", split" if name.endswith("_split") else "") if rest else label


def markdown(record: dict[str, Any]) -> str:
  """The tables of a scaling record (see the module docstring)."""
  summary = record.get("summary", {})
  if summary.get("schema") == SCHEMA:
    return report(summary)
  return record["table"]


def plot(summary: dict[str, Any], path: str) -> None:
  """Four panels against the device count: CPU-time ratio at the longest and at
  the shortest refresh period, the busiest device's refresh GFLOP, and the
  extra MB per step."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sys.path.insert(0, os.path.join(_ROOT, "examples"))
  from harness import style  # pylint: disable=g-import-not-at-top
  rows = summary["rows"]
  labels = summary["labels"]
  names = order(summary)
  devs = [r["devices"] for r in rows]
  ks = summary.get("inverse_every") or [1]
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  (a_long, a_short), (a_work, a_bytes) = axes

  def series(name, key, scale=1.0):
    xs, ys = [], []
    for r in rows:
      o = r["optimizers"].get(name)
      if o is not None:
        xs.append(r["devices"])
        ys.append(o[key] * scale)
    return xs, ys

  def style_of(name):
    o = next(r["optimizers"][name] for r in rows if name in r["optimizers"])
    return style.of(o["base"] + ("+split" if o["split"] else ""))

  for ax, k in ((a_long, max(ks)), (a_short, min(ks))):
    if ax is a_short and len(ks) == 1:
      ax.text(0.5, 0.5, "one refresh period only", ha="center", transform=ax.transAxes)
      continue
    for n in names:
      o = next(r["optimizers"][n] for r in rows if n in r["optimizers"])
      if o["base"] in SECOND_ORDER and o["k"] != k:
        continue
      ax.plot(*series(n, "cpu_ratio_vs_sgd"), label=labels[n], **style_of(n))
    ax.set_ylabel("step CPU time / SGD's")
    ax.set_title(f"refresh every {k} step" + ("s" if k > 1 else ""))
  seen = set()
  for n in names:
    o = next(r["optimizers"][n] for r in rows if n in r["optimizers"])
    if o["base"] not in SECOND_ORDER or (o["base"], o["split"]) in seen:
      continue
    seen.add((o["base"], o["split"]))
    a_work.plot(*series(n, "refresh_flops_max", 1e-9), label=_base_label(labels[n], n),
                **style_of(n))
  a_work.set_ylabel("refresh GFLOP on the busiest device")
  a_work.set_yscale("log")
  many = [r for r in rows if r["devices"] > 1]
  if many:
    for n in names:
      o = next(r["optimizers"][n] for r in rows if n in r["optimizers"])
      if n == "sgd" or (o["base"] in SECOND_ORDER and o["k"] != max(ks)):
        continue
      xs, ys = [], []
      for r in many:
        if n in r["optimizers"]:
          o = r["optimizers"][n]
          # Split: what the refresh gathers (its per-step traffic is the
          # replicated twin's); the others: their extra per step over SGD's.
          b = (o["refresh_gathered_bytes"] if o["split"]
               else o["step_bytes"] - r["optimizers"]["sgd"]["step_bytes"])
          if b > 0:
            xs.append(r["devices"])
            ys.append(b / 1e6)
      if xs:
        a_bytes.plot(xs, ys, label=labels[n] + (" (per refresh)" if o["split"] else ""),
                     **style_of(n))
    a_bytes.plot([r["devices"] for r in many],
                 [r["optimizers"]["sgd"]["step_bytes"] / 1e6 for r in many],
                 label="SGD (total)", **style.of("sgd"))
    a_bytes.set_yscale("log")
  else:
    a_bytes.text(0.5, 0.5, "no collectives on one device", ha="center",
                 transform=a_bytes.transAxes)
  a_bytes.set_ylabel(f"MB in collectives: per step, extra over SGD's\n"
                     f"(split, dashed: per refresh, gathered; k={max(ks)})")
  for ax in axes.flat:
    ax.set_xscale("log", base=2)
    ax.set_xticks(devs)
    ax.set_xticklabels([str(d) for d in devs])
    ax.set_xlabel("virtual CPU devices (batch sharded)")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.suptitle("Data parallel with jax.jit shardings, refresh replicated (solid) or split "
               f"(dashed): deep autoencoder, global batch {summary['batch']}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
