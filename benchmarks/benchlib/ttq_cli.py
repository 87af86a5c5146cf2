"""benchmarks/time_to_quality.py's command line."""

from __future__ import annotations

import argparse
import os


def _coupling(text: str) -> float | str | None:
  """``--couple-damping``: a number, ``auto`` or ``none``."""
  low = text.lower()
  if low == "auto":
    return "auto"
  return None if low == "none" else float(text)


def parser(description: str, all_rows: tuple[str, ...]) -> argparse.ArgumentParser:
  """The benchmark's flags; ``all_rows`` are the rows it can run."""
  p = argparse.ArgumentParser(
      description=description,
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--epochs", type=int, default=3, help="epochs per row")
  p.add_argument("--rows", default=",".join(all_rows),
                 help="comma-separated rows, from: " + ",".join(all_rows))
  p.add_argument("--quick", action="store_true",
                 help="smoke test: 2,000 training and 2,000 test images, "
                 "a small autoencoder (784-64-32-8-32-64-784), 1 epoch, "
                 "rows sgd,gradient+adaptive, no sweep")
  p.add_argument("--no-sweep", action="store_true",
                 help="use the sweep centres (or --lr) instead of sweeping")
  p.add_argument("--lr", action="append", default=[], metavar="ROW=LR",
                 help="fixed learning rate for a row (skips its sweep)")
  p.add_argument("--initial-damping", type=float, default=1e-3,
                 help="adaptive: initial lambda of the quadratic model")
  p.add_argument("--adapt-every", type=int, default=5,
                 help="adaptive: Levenberg-Marquardt update every this many steps")
  p.add_argument("--couple-damping", type=_coupling, default="auto",
                 help="adaptive: exponent e of the direction's damping coupling, "
                 "gamma ~ lambda^e ('auto': 0.5; 'none': gamma stays at "
                 "--direction-damping)")
  p.add_argument("--direction-damping", type=float, default=0.03,
                 help="adaptive: the direction's own damping gamma")
  p.add_argument("--inverse-every", type=int, default=10,
                 help="adaptive K-FAC, FOOF, Shampoo: inverse refresh interval")
  p.add_argument("--curvature-batch", type=int, default=1000,
                 help="adaptive: examples of the batch the curvature products "
                 "use (the first ones)")
  p.add_argument("--sweep-steps", type=int, default=20,
                 help="steps of each sweep run (the run's schedule, from step 0)")
  p.add_argument("--stats-every", type=int, default=1,
                 help="adaptive K-FAC and FOOF: capture their factors every this "
                 "many steps (plain gradients in between)")
  p.add_argument("--ratio-rounds", type=int, default=3,
                 help="interleaved rounds for the step-time ratios")
  p.add_argument("--ratio-steps", type=int, default=10,
                 help="steps per round for the step-time ratios")
  p.add_argument("--no-reference", action="store_true",
                 help="do not time an SGD step for the step-time ratios "
                 "(experiments; no ratios then)")
  p.add_argument("--seed", type=int, default=0, help="init and data order")
  p.add_argument("--out", default=None,
                 help="directory for time_to_quality.{json,png} (default: "
                 "benchmarks/results, or results/time_to_quality_quick with "
                 "--quick)")
  p.add_argument("--data-dir", default=None,
                 help="Fashion-MNIST directory (default: the usual places)")
  return p


def parse_args(p: argparse.ArgumentParser, argv, all_rows: tuple[str, ...],
               results_dir: str):
  """Parsed flags with the --quick settings and the defaults filled in."""
  args = p.parse_args(argv)
  if args.quick:
    args.epochs = 1
    if args.rows == p.get_default("rows"):
      args.rows = "sgd,gradient+adaptive"
    args.no_sweep = True
    args.ratio_rounds, args.ratio_steps = 1, 2
  if args.out is None:
    args.out = (os.path.join("results", "time_to_quality_quick") if args.quick
                else results_dir)
  args.rows = [r for r in args.rows.split(",") if r]
  for r in args.rows:
    if r not in all_rows:
      p.error(f"unknown row {r!r}; choose from {','.join(all_rows)}")
  args.lr = {k: float(v) for k, v in (s.split("=") for s in args.lr)}
  return args
