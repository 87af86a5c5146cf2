"""`make demo`: the Eva paper's Fashion-MNIST autoencoder, eight optimizers, minutes.

SGD, Adam, Eva, Eva-f, Eva-s, K-FAC, FOOF and Shampoo train the deep
autoencoder of ``examples/autoencoder.py`` (784-1000-500-250-30-250-500-1000-784,
ReLU, MSE, batch 1000) with the same data order and initialisation, on a
training subset and for a few epochs so that the whole comparison takes
about two minutes on two CPU cores, then prints a markdown table (final test
loss on the full 10,000-image test set, time per epoch, time to reach SGD's
final test loss, optimizer-state size, cosine between the preconditioned and the
raw gradient) and writes a JSON record and a PNG plot under ``results/demo``.

The learning rates are ``autoencoder.DEFAULT_LRS`` (tuned by the sweep of
``examples/autoencoder.py --sweep``); everything else as there. For the full
60,000-image, 20-epoch comparison run ``python examples/autoencoder.py``.

Then (``--adaptive``, on by default) it trains the library's best method for
this task, FOOF + adaptive (``eva_optax.adaptive``: step size, momentum and
damping from the exact quadratic model, no learning rate), on the same
training subset and epochs (its own fixed order, ``benchmarks/time_to_quality.py``'s
step) and prints its test loss next to SGD's and Adam's from the table. It
roughly doubles the demo's time (about 4 SGD steps per step on a CPU, plus
its compilation) and writes ``demo_adaptive.json``.

What Eva's cosine of 1.000 in the table means: at the paper's damping Eva's
rank-one curvature term is about 1e-10 of the damping, so its update is the
gradient, KL-normalized: SGD with another step size.

    python examples/demo.py                       # what `make demo` runs
    python examples/demo.py --optimizers sgd,eva --epochs 2 --no-adaptive
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import autoencoder  # pylint: disable=g-import-not-at-top,wrong-import-position
import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from harness import provenance  # pylint: disable=g-import-not-at-top,wrong-import-position
from harness import records  # pylint: disable=g-import-not-at-top,wrong-import-position

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "benchmarks")

EPOCHS = 6
TRAIN_SUBSET = 20000


def parser():
  """``autoencoder.py``'s flags with the demo's defaults."""
  p = autoencoder.parser(default_epochs=EPOCHS)
  p.description = __doc__.split("\n")[0]
  p.set_defaults(train_subset=TRAIN_SUBSET, out=os.path.join("results", "demo"))
  p.add_argument("--adaptive", action=argparse.BooleanOptionalAction,
                 default=True,
                 help="also train FOOF + adaptive (eva_optax.adaptive) on the "
                 "same subset and epochs, and print it against SGD and Adam")
  return p


def adaptive_row(args, record) -> dict:
  """FOOF + adaptive on the demo's subset and epochs; prints it against the
  table's SGD and Adam and writes ``demo_adaptive.json``."""
  sys.path.insert(0, BENCHMARKS)
  import time_to_quality as ttq  # pylint: disable=g-import-not-at-top
  targs = ttq.parse_args(["--rows", "foof+adaptive", "--curvature-batch",
                          "250", "--seed", str(args.seed)])
  data = datasets.load_fashion_mnist(args.data_dir)
  order = np.random.default_rng(args.seed).permutation(len(data.x_train))
  x_train = data.x_train[order][:args.train_subset or len(order)]
  setup = ttq.Setup(x_train=jax.numpy.asarray(x_train),
                    x_test=jax.numpy.asarray(data.x_test),
                    batch=args.batch_size,
                    steps_per_epoch=len(x_train) // args.batch_size,
                    epochs=args.epochs)
  params0 = ttq.MODEL.init(jax.random.PRNGKey(args.seed),
                           setup.x_train[:1])["params"]
  rec = ttq.train("foof+adaptive", None, setup, targs, params0)
  rec.pop("_run")
  final = rec["evals"][-1]["test_mse"]
  line = f"FOOF + adaptive: final test loss {final:.5f}"
  for name in ("sgd", "adam"):
    run = record.get("runs", {}).get(name)
    if run and run["epochs"]:
      line += (f", {harness.optimizers.LABELS.get(name, name)} "
               f"{run['epochs'][-1]['test_loss']:.5f}")
  print(line + f" ({rec['train_seconds']:.0f} s training, "
        f"{rec['compile_seconds']:.0f} s compilation).")
  out = {"provenance": provenance.collect(), "config": {
      "epochs": args.epochs, "train_images": len(x_train),
      "batch": args.batch_size, "curvature_batch": 250, "seed": args.seed},
         "run": rec}
  records.write_json(os.path.join(args.out, "demo_adaptive.json"), out)
  return rec


def main(argv=None):
  args = parser().parse_args(argv)
  start = time.perf_counter()
  print(f"Fashion-MNIST autoencoder: {args.epochs} epochs on "
        f"{args.train_subset or 60000} training images, batch "
        f"{args.batch_size}, test on all 10,000; optimizers: {args.optimizers}")
  task = autoencoder.make_task(args.data_dir, args.download, args.batch_size)
  record = harness.run_comparison(
      task, args, options=autoencoder.options_from(args), file_stem="demo",
      title=(f"Fashion-MNIST autoencoder, {args.train_subset or 60000} "
             f"training images, batch {args.batch_size}"),
      notes={"demo": True, "model": "784-1000-500-250-30-250-500-1000-784"})
  if args.adaptive:
    record["foof+adaptive"] = adaptive_row(args, record)
  print(f"Total time {time.perf_counter() - start:.0f} s (compilation and "
        "evaluation included).")
  return record


if __name__ == "__main__":
  main()
