"""benchmarks/time_to_quality.py's command line."""

from __future__ import annotations

import argparse
import os

from . import ttq_rows
from . import ttq_task

# The per-row settings' flags: what each means and its default in words.
SETTING_HELP = {
    "stats_batch": ("Eva, Eva-f, K-FAC, FOOF: curvature statistics from the "
                    "first M examples of each batch, the gradient from all "
                    "(eva_optax.value_and_grad(stats_batch=M))", "all"),
    "curvature_batch": ("adaptive rows: examples of the batch (the first ones) "
                        "the curvature products use", "all"),
    "adapt_every": ("adaptive rows: the Levenberg-Marquardt update every this "
                    "many steps ('none': lambda fixed)", "5"),
    "inverse_every": ("K-FAC, FOOF, Shampoo (fixed and adaptive rows): inverse "
                      "refresh interval", "10"),
    "stats_every": ("the preconditioners: statistics every this many steps "
                    "(plain gradients in between)", "1"),
}


def _coupling(text: str) -> float | str | None:
  """``--couple-damping``: a number, ``auto`` or ``none``."""
  low = text.lower()
  if low == "auto":
    return "auto"
  return None if low == "none" else float(text)


def parser(description: str) -> argparse.ArgumentParser:
  """The benchmark's flags."""
  rows = ",".join(ttq_rows.ALL_ROWS)
  p = argparse.ArgumentParser(
      description=description,
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--task", choices=ttq_task.TASKS, default="autoencoder",
                 help="the Fashion-MNIST deep autoencoder (Adam its baseline) "
                 "or the character-level GPT of examples/transformer_lm.py "
                 "(AdamW its baseline)")
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs per row (None: 3 for the autoencoder, the "
                 "example's 4 for the transformer)")
  p.add_argument("--rows", default=rows, help="comma-separated rows, from: "
                 + rows)
  p.add_argument("--quick", action="store_true",
                 help="smoke test: a small model on a little data (2,000 "
                 "images; the transformer example's --small), 1 epoch, rows "
                 "sgd,gradient+adaptive, no sweep, no waiting for the load")
  p.add_argument("--no-sweep", action="store_true",
                 help="use the sweep centres (or --lr) instead of sweeping")
  p.add_argument("--lr", action="append", default=[], metavar="ROW=LR",
                 help="fixed learning rate for a row (skips its sweep)")
  p.add_argument("--sweep-steps", type=int, default=None,
                 help="steps of each sweep run, the run's schedule from step "
                 "0 (None: 20 for the autoencoder, 100 for the transformer)")
  p.add_argument("--evals-per-epoch", type=int, default=None,
                 help="evaluations of the reported loss per epoch (None: 2)")
  for name, (text, default) in SETTING_HELP.items():
    p.add_argument("--" + name.replace("_", "-"), action="append", default=[],
                   metavar="[ROW=]N", help=f"{text}; N for every row that "
                   f"takes it, ROW=N for one row, repeatable (unset: {default})")
  p.add_argument("--initial-damping", type=float, default=1e-3,
                 help="adaptive: initial lambda of the quadratic model")
  p.add_argument("--couple-damping", type=_coupling, default="auto",
                 help="adaptive: exponent e of the direction's damping coupling, "
                 "gamma ~ lambda^e ('auto': 0.5; 'none': gamma stays at "
                 "--direction-damping)")
  p.add_argument("--direction-damping", type=float, default=0.03,
                 help="adaptive: the direction's own damping gamma")
  p.add_argument("--ratio-rounds", type=int, default=3,
                 help="interleaved rounds for the step-time ratios (fewer when "
                 "a row's period makes a round longer than --ratio-steps: "
                 "about rounds x steps steps are timed, at least one period)")
  p.add_argument("--ratio-steps", type=int, default=10,
                 help="steps per round for the step-time ratios (rounded up "
                 "to a multiple of the row's refresh, adaptation and capture "
                 "periods)")
  p.add_argument("--max-load", type=float, default=2.0,
                 help="a step ratio timed with the 1-minute load average above "
                 "this (before or after) is timed again")
  p.add_argument("--load-retries", type=int, default=3,
                 help="re-timings of a step ratio timed under load")
  p.add_argument("--load-wait", type=float, default=120.0,
                 help="seconds to wait, before each timing, for the 1-minute "
                 "load average to fall to --max-load")
  p.add_argument("--no-reference", action="store_true",
                 help="do not time an SGD step for the step-time ratios "
                 "(experiments; no ratios or costs then)")
  p.add_argument("--hang-timeout", type=float, default=900.0,
                 help="abort with every thread's stack (exit status 1) if a "
                 "compilation, an evaluation interval or a timing runs longer "
                 "than this many seconds; 0 disables")
  p.add_argument("--no-progress", dest="progress", action="store_false",
                 help="no progress bars")
  p.add_argument("--seed", type=int, default=0, help="init and data order")
  p.add_argument("--out", default=None,
                 help="directory for the JSON and PNG (default: "
                 "benchmarks/results, or results/time_to_quality_quick with "
                 "--quick)")
  p.add_argument("--data-dir", default=None,
                 help="Fashion-MNIST directory (default: the usual places)")
  p.add_argument("--text", default=None,
                 help="transformer: a UTF-8 text file instead of the King "
                 "James Bible")
  g = p.add_argument_group("exploration (--explore)")
  g.add_argument("--explore", action="store_true",
                 help="time a grid of cheaper settings for a fraction of the "
                 "run each and print each one's cost to reach the target "
                 "(benchlib/ttq_explore.py)")
  g.add_argument("--explore-rows",
                 default="foof+adaptive,eva_f,kfac,eva_f+adaptive",
                 help="the rows whose settings are explored")
  g.add_argument("--grid", action="append", default=[],
                 metavar="SETTING=V1,V2",
                 help="values of one setting to explore ('all': the whole "
                 "batch), repeatable; unset settings take the explore "
                 "defaults: stats_batch=all,250 curvature_batch=all,250 "
                 "adapt_every=5,20 inverse_every=10,50")
  g.add_argument("--explore-epochs", type=float, default=1.0,
                 help="epochs each setting trains (the full run's schedule)")
  g.add_argument("--explore-evals-per-epoch", type=int, default=6,
                 help="evaluations per epoch while exploring")
  g.add_argument("--target", type=float, default=None,
                 help="the loss to reach (None: the baseline's final loss in "
                 "the task's committed record)")
  g.add_argument("--baseline-epochs", type=float, default=None,
                 help="epochs the baseline (Adam, AdamW) takes to reach "
                 "--target (None: from the committed record)")
  return p


def _setting(name: str, items: list[str], p) -> dict[str, int | None]:
  """``["250", "foof+adaptive=100"]`` -> ``{"*": 250, "foof+adaptive": 100}``."""
  out: dict[str, int | None] = {}
  for item in items:
    row, _, value = item.rpartition("=")
    if row and row not in ttq_rows.ALL_ROWS:
      p.error(f"--{name.replace('_', '-')} {item}: unknown row {row!r}")
    if row and not ttq_rows.applies(row, name):
      p.error(f"--{name.replace('_', '-')} {item}: row {row} has no {name}")
    low = value.lower()
    if low in ("all", "none"):
      if name in ("inverse_every", "stats_every"):
        p.error(f"--{name.replace('_', '-')} takes a number, not {value!r}")
      out[row or "*"] = None
    else:
      out[row or "*"] = int(value)
  return out


def parse_args(p: argparse.ArgumentParser, argv, results_dir: str):
  """Parsed flags with the --quick settings and the defaults filled in;
  ``args.settings`` holds the per-row settings."""
  args = p.parse_args(argv)
  if args.quick:
    args.epochs = 1
    if args.rows == p.get_default("rows"):
      args.rows = "sgd,gradient+adaptive"
    args.no_sweep = True
    args.ratio_rounds, args.ratio_steps = 1, 2
    args.load_retries, args.load_wait = 0, 0.0
  if args.out is None:
    args.out = (os.path.join("results", "time_to_quality_quick") if args.quick
                else results_dir)
  args.rows = [r for r in args.rows.split(",") if r]
  args.explore_rows = [r for r in args.explore_rows.split(",") if r]
  for r in args.rows + args.explore_rows:
    if r not in ttq_rows.ALL_ROWS:
      p.error(f"unknown row {r!r}; choose from {','.join(ttq_rows.ALL_ROWS)}")
  args.lr = {k: float(v) for k, v in (s.split("=") for s in args.lr)}
  args.settings = {k: _setting(k, getattr(args, k), p)
                   for k in ttq_rows.SETTINGS}
  if (args.settings["stats_batch"] and not ttq_rows.stats_batch_supported()
      and any(v is not None for v in args.settings["stats_batch"].values())):
    p.error("--stats-batch: this eva_optax's value_and_grad has no "
            "stats_batch= argument")
  return args
