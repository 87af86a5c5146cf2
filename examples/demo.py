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

    python examples/demo.py                       # what `make demo` runs
    python examples/demo.py --optimizers sgd,eva --epochs 2
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import autoencoder  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

EPOCHS = 6
TRAIN_SUBSET = 20000


def parser():
  """``autoencoder.py``'s flags with the demo's defaults."""
  p = autoencoder.parser(default_epochs=EPOCHS)
  p.description = __doc__.split("\n")[0]
  p.set_defaults(train_subset=TRAIN_SUBSET, out=os.path.join("results", "demo"))
  return p


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
  print(f"Total time {time.perf_counter() - start:.0f} s (compilation and "
        "evaluation included).")
  return record


if __name__ == "__main__":
  main()
