"""Time to quality: fixed and adaptive optimizers, on the deep autoencoder or the character-level transformer.

What users pick an optimizer for is the time to reach a loss. Each row trains
from the same initial parameters on the same batches in the same order, the
reported loss is measured every half epoch, and the row's step time relative
to an SGD step is timed in this process, right after the row's training,
interleaved with SGD steps, on a quiet machine (the 1-minute load average at
most ``--max-load`` before and after; re-timed when not). The table gives the
loss per epoch, when each row first reaches the baseline's final loss (Adam on
the autoencoder, AdamW on the transformer) and its cost to get there relative
to the baseline's: epochs times step ratio, over the baseline's.

* ``--task autoencoder`` (default): the Fashion-MNIST deep autoencoder, 3
  epochs, test MSE (``benchlib/ttq_autoencoder.py``); writes
  ``results/time_to_quality.{json,png}``;
* ``--task transformer``: the character-level GPT of
  ``examples/transformer_lm.py`` at its defaults, 4 epochs, validation loss in
  nats per character (``benchlib/ttq_transformer.py``); writes
  ``results/time_to_quality_transformer.{json,png}``.

Rows (``benchlib/ttq_rows.py``): ``sgd``, ``adam`` and every preconditioner
(``eva``, ``eva_f``, ``eva_s``, ``kfac``, ``foof``, ``shampoo``) at a fixed
rate with momentum 0.9 and a linear decay to 0, the rate from a short sweep
around the task's centre; ``<direction>+adaptive``: ``eva_optax.adaptive``
around a preconditioner or the plain gradient, with no learning rate. The
settings that make a step cheaper (``--stats-batch``, ``--curvature-batch``,
``--adapt-every``, ``--inverse-every``, ``--stats-every``) are chosen per row;
``--explore`` times a grid of them (``benchlib/ttq_explore.py``).

    python benchmarks/time_to_quality.py                        # autoencoder
    python benchmarks/time_to_quality.py --task transformer
    python benchmarks/time_to_quality.py --explore              # settings grid
    python benchmarks/time_to_quality.py --quick                # smoke test
"""

from __future__ import annotations

import os

# LAPACK (K-FAC's Cholesky, FOOF's and Shampoo's eigh) through scipy's
# OpenBLAS: its own threads fight XLA's on a small machine (see
# benchmarks/README.md). Set before numpy loads; the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]
from benchlib import ttq_cli
from benchlib import ttq_explore
from benchlib import ttq_report
from benchlib import ttq_rows
from benchlib import ttq_task
from benchlib import ttq_train
from benchlib.ttq_report import markdown_table  # pylint: disable=unused-import
# pylint: enable=g-import-not-at-top,wrong-import-position

ALL_ROWS = ttq_rows.ALL_ROWS
RESULTS = os.path.join(HERE, "results")


def parser():
  """The command line (every flag with its help and default)."""
  return ttq_cli.parser(__doc__.split("\n")[0])


def parse_args(argv=None):
  return ttq_cli.parse_args(parser(), argv, RESULTS)


def run(args, argv=None) -> dict[str, Any]:
  """Every row of ``args.rows``: sweep, train, time; the record after each."""
  task = ttq_task.make(args.task, args)
  if args.evals_per_epoch:
    task.evals_per_epoch = args.evals_per_epoch
  print(f"{task.description}; rows: {','.join(args.rows)}")
  sweeps, runs = {}, {}
  reference = (None if args.no_reference
               else ttq_train.sgd_reference(task, args))
  record, paths = None, []
  for i, row in enumerate(args.rows):
    cfg = ttq_rows.config(row, args.settings, task)
    print(f"[{i + 1}/{len(args.rows)}] {row}" + (
        f" ({cfg.short()})" if cfg.short() else ""), flush=True)
    lr = None
    if not cfg.adaptive:
      if row in args.lr or args.no_sweep:
        lr = args.lr.get(row, task.lr_centers[row])
      else:
        sweeps[row] = ttq_train.sweep(cfg, task, args)
        lr = sweeps[row]["chosen"]
    rec = ttq_train.train(cfg, lr, task, args)
    ttq_train.timed_ratio(rec, cfg, reference, task, args)
    runs[row] = rec
    # Written after every row: a long run that is stopped keeps its rows.
    record = ttq_report.make_record(runs, sweeps, args, task, argv,
                                    script=__file__)
    paths = ttq_report.write(record, args.out)
  if record is not None:
    print(record["table"])
    print("Wrote " + ", ".join(paths))
  return record


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  ttq_train.clear_cache()
  if args.explore:
    return ttq_explore.run(args, argv, script=__file__, results_dir=RESULTS)
  return run(args, argv)


if __name__ == "__main__":
  main()
