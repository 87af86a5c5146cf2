"""Command-line flags shared by the examples.

Every script's parser is built by :func:`parser` (or uses
:class:`argparse.ArgumentDefaultsHelpFormatter` itself), so that ``--help``
shows each flag's default, and every flag carries a help string
(``tests/test_cli_help.py`` checks both for every script).
"""

from __future__ import annotations

import argparse
import os

from . import optimizers


def parser(doc: str | None) -> argparse.ArgumentParser:
  """An argument parser described by the first line of ``doc`` whose
  ``--help`` shows every default."""
  return argparse.ArgumentParser(
      description=(doc or "").split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_common_args(p: argparse.ArgumentParser, name: str,
                    default_lrs: dict[str, float]) -> None:
  """The flags of a comparison (:func:`harness.run_comparison`)."""
  names = optimizers.OPTIMIZERS
  p.add_argument("--optimizers", default=",".join(names),
                 help="comma-separated list from " + ",".join(names))
  p.add_argument("--epochs", type=int, default=None,
                 help="training epochs (passes over the training examples)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the initialisation and of the data order")
  p.add_argument("--out", default=os.path.join("results", name),
                 help="directory for the JSON and PNG")
  p.add_argument("--train-subset", type=int, default=None,
                 help="train on the first N training examples only "
                 "(None: all)")
  p.add_argument("--sweep", action=argparse.BooleanOptionalAction,
                 default=False,
                 help="run the short learning-rate sweep first and train "
                 "with the chosen values")
  p.add_argument("--sweep-epochs", type=int, default=2,
                 help="epochs of each sweep run")
  p.add_argument("--sweep-subset", type=int, default=20000,
                 help="the sweep trains on the first N training examples")
  p.add_argument("--sweep-validation", type=int, default=5000,
                 help="the sweep scores on the last N training examples "
                 "(never the test set)")
  p.add_argument("--schedule", choices=("constant", "linear"),
                 default="linear",
                 help="learning-rate schedule (linear: decay to 0 over the "
                 "run, as the authors)")
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bars")
  p.add_argument("--append", action="store_true",
                 help="add these runs to the JSON already in --out "
                 "(replacing runs of the same optimizers) and redraw")
  for opt in names:
    p.add_argument(f"--lr-{opt.replace('_', '-')}", type=float,
                   dest=f"lr_{opt}", default=default_lrs[opt],
                   help=f"{optimizers.LABELS[opt]} learning rate (with "
                   "--sweep: the centre of its grid, unless the script "
                   "gives its own)")


def add_data_args(p: argparse.ArgumentParser, batch_size: int) -> None:
  """``--data-dir``, ``--download`` and ``--batch-size`` (the Fashion-MNIST
  examples; see ``datasets.load_fashion_mnist``)."""
  p.add_argument("--data-dir", default=None,
                 help="directory holding the four Fashion-MNIST idx .gz "
                 "files (None: $EVA_OPTAX_FMNIST_DIR, then "
                 "/usr/share/datasets/fashion-mnist)")
  p.add_argument("--download", action="store_true",
                 help="download Fashion-MNIST if it is not found "
                 "(checksum-verified)")
  p.add_argument("--batch-size", type=int, default=batch_size,
                 help="training batch size")


def parse_optimizers(text: str) -> list[str]:
  """``"sgd,eva"`` -> ``["sgd", "eva"]``; exits naming the unknown ones."""
  names = [s.strip() for s in text.split(",") if s.strip()]
  bad = [n for n in names if n not in optimizers.OPTIMIZERS]
  if bad:
    raise SystemExit(f"unknown optimizer(s) {bad}; choose from "
                     f"{optimizers.OPTIMIZERS}")
  return names
