"""Redraws the comparison figures from their JSON records (no training).

    python examples/replot.py examples/results/autoencoder.json
    python examples/replot.py examples/results/*.json

Each PNG is written next to its JSON (same name), in the style of
``harness.plots``: one colour and marker per optimizer, the task and its
settings in the title, the loss on the y axis, integer epochs, SGD's final
loss as the target line. Records that are not comparisons (no ``runs``) are
skipped with a message.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
from harness import cli
from harness import plots
from harness import records
# pylint: enable=g-import-not-at-top,wrong-import-position


def parser():
  p = cli.parser(__doc__)
  p.add_argument("json", nargs="+",
                 help="comparison records written by harness.run_comparison")
  return p


def main(argv=None) -> list[str]:
  args = parser().parse_args(argv)
  out = []
  for path in args.json:
    if "runs" not in records.read_json(path):
      print(f"{path}: not a comparison record (no 'runs'), skipped")
      continue
    out.append(plots.replot(path))
    print(f"{path} -> {out[-1]}")
  return out


if __name__ == "__main__":
  main()
