"""The benchmark's markdown tables and notes."""

from __future__ import annotations

from typing import Any

from . import timing


def fmt_ratio(x):
  return "-" if x is None else f"{x:.3f}"


def _mb(nbytes: float | None, digits: int = 3) -> str:
  return "-" if nbytes is None else f"{nbytes / 2**20:.{digits}f}"


def model_table(res: dict[str, Any]) -> str:
  """One row per optimizer: time, paired ratios, state and step memory,
  cosine, CPU-time ratio, round spread."""
  rows = ["| optimizer | step ms | ratio vs SGD | ratio vs Adam | state MB | "
          "state / SGD momentum buffer | step peak MB | cos(dir, g) | "
          "CPU-time ratio vs SGD | round spread |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in res["optimizers"].values():
    star = " *" if r["period"] > 1 else ""
    cos = "-" if r["cosine"] is None else f"{r['cosine']:.4f}"
    peak = (r.get("step_memory_bytes") or {}).get("peak")
    rows.append(
        f"| {r['label']}{star} | {1e3 * r['step_s']:.2f} | "
        f"{fmt_ratio(r.get('ratio_vs_sgd'))} | {fmt_ratio(r.get('ratio_vs_adam'))} | "
        f"{_mb(r['state_bytes'])} | {fmt_ratio(r.get('state_ratio_vs_sgd'))} | "
        f"{_mb(peak, 2)} | {cos} | {fmt_ratio(r.get('cpu_ratio_vs_sgd'))} | "
        f"{100 * r['round_spread']:.0f}% |")
  return "\n".join(rows)


def breakdown_table(bd: dict[str, Any], ref: dict[str, Any],
                    adam_update: dict[str, Any] | None = None) -> str:
  """One row per piece; ``/ Adam's update+apply`` for the update pieces."""
  rows = ["| piece | ms (median over rounds) | / SGD full step | "
          "/ Adam's update+apply | CPU ms | round spread |",
          "|---|---:|---:|---:|---:|---:|"]
  for name, r in bd.items():
    vs_adam = ("-" if adam_update is None or not name.startswith("update")
               else f"{timing.paired_ratio(r, adam_update):.3f}")
    rows.append(f"| {name} | {1e3 * r['step_s']:.2f} | "
                f"{timing.paired_ratio(r, ref):.3f} | {vs_adam} | "
                f"{1e3 * r['cpu_s']:.2f} | {100 * r['round_spread']:.0f}% |")
  return "\n".join(rows)


def summary_table(all_res: dict[str, Any]) -> str:
  """Per model: Eva's and Eva-f's update+apply over Adam's, and their full
  steps over SGD's (paired ratios of this run)."""
  rows = ["| model | Eva update+apply / Adam's | Eva-f update+apply / Adam's "
          "| Eva step / SGD's | Eva-f step / SGD's |",
          "|---|---:|---:|---:|---:|"]
  for name, res in all_res["models"].items():
    upd = res.get("update_vs_adam") or {}
    opt = res["optimizers"]
    rows.append(
        f"| {name} (batch {res['batch']}) | {fmt_ratio(upd.get('eva'))} | "
        f"{fmt_ratio(upd.get('eva_f'))} | "
        f"{fmt_ratio(opt.get('eva', {}).get('ratio_vs_sgd'))} | "
        f"{fmt_ratio(opt.get('eva_f', {}).get('ratio_vs_sgd'))} |")
  return "\n".join(rows)


def _eva_state_notes(es: dict[str, Any]) -> list[str]:
  out = []
  if "eva_extra_numbers" in es:
    c = es["eva_counters"]
    out.append(
        f"Eva state beyond SGD's momentum buffer: {es['eva_extra_numbers']:,} "
        f"numbers (float32 averages + int32 counters); analytic "
        f"sum over {len(es['layers'])} layers of (d_in + 1 + d_out) = "
        f"{es['analytic_eva_extra']:,} (+ {c} counters = "
        f"{es['analytic_eva_extra'] + c:,}); that is "
        f"{100 * es['eva_extra_numbers'] / es['sgd_state_numbers']:.3f}% of "
        f"the momentum buffer ({es['sgd_state_numbers']:,}).")
  if "eva_f_extra_numbers" in es:
    out.append(
        f"Eva-f state beyond SGD's momentum buffer: {es['eva_f_extra_numbers']:,} "
        f"numbers; analytic sum of (d_in + 1) = {es['analytic_eva_f_extra']:,} "
        f"(+ {es['eva_f_counters']} counters).")
  return out


def print_report(all_res: dict[str, Any]) -> None:
  """Prints every model's table, Eva's state check and the breakdown."""
  for res in all_res["models"].values():
    print(f"\n### {res['description']}  ({res['n_params']:,} parameters)\n")
    print(model_table(res))
    if any(r["period"] > 1 for r in res["optimizers"].values()):
      print("\n\\* inverse_every=10: mean step time over whole periods of 10 "
            "(includes the refresh); the others: median step.")
    print("\nstep peak MB: the compiled step's peak memory as XLA accounts it "
          "(jax.stages.Compiled.memory_analysis(): parameters, state, batch, "
          "outputs and temporaries); state MB: the optimizer state alone.")
    notes = _eva_state_notes(res.get("eva_state") or {})
    if notes:
      print()
      print("\n".join(notes))
    if "breakdown" in res:
      bd = res["breakdown"]
      sgd_full = bd["full step: SGD-momentum"]
      print("\nBreakdown (same process, interleaved; update+apply alone on "
            "fixed gradients and statistics, donated):\n")
      print(breakdown_table(bd, sgd_full, bd.get("update+apply: Adam")))
      upd = res.get("update_vs_adam") or {}
      if upd:
        print("\nupdate+apply / Adam's update+apply (paired): " + ", ".join(
            f"{res['optimizers'][n]['label'] if n in res['optimizers'] else n}"
            f" {v:.3f}" for n, v in upd.items() if n != "adam"))
  if any("breakdown" in r for r in all_res["models"].values()):
    print("\n### Eva's and Eva-f's cost against Adam's and SGD's\n")
    print(summary_table(all_res))
  aliased = sorted({n for res in all_res["models"].values()
                    for n, r in res["optimizers"].items()
                    if r["init_state_aliased_leaves"]})
  if aliased:
    print(f"\nNote: tx.init of {', '.join(aliased)} returns a state whose leaves "
          "share buffers, which jax.jit(..., donate_argnums=...) rejects "
          "('donate the same buffer twice'); the benchmark donates a copy.")
  missing = all_res["missing_optimizers"]
  if missing:
    print(f"\nNot in this eva_optax (skipped): {', '.join(missing)}")
