"""A small CNN on Fashion-MNIST, eight optimizers compared.

Model: Conv(16, 3x3) - ReLU - max-pool 2 - Conv(32, 3x3) - ReLU - max-pool 2 -
Dense(128) - ReLU - Dense(10); cross-entropy averaged over the batch; batch
128, pixels in [0, 1]. Every Conv and Dense layer is captured (Eva's conv
statistics: mean im2col patch and mean output gradient). Heavy-ball momentum
0.9, weight decay 0, linear learning-rate decay to 0 over the run.

Learning rates: see ``DEFAULT_LRS`` (from our short sweep, ``--sweep``; the
sweep results are in ``examples/results/classifier.json``).

    python examples/classifier.py --epochs 5
    python examples/classifier.py --optimizers sgd,eva --epochs 1 --train-subset 5000
"""

from __future__ import annotations

import os

# K-FAC's Cholesky and FOOF's and Shampoo's eigh run in the OpenBLAS bundled
# with scipy, whose results change with its thread count (and whose threads
# slow a small shared machine down): one thread, as `make` sets, unless the
# environment says otherwise. Set before numpy loads, so that running this
# file directly prints what `make demo` prints.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import sys

import flax.linen as nn
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

# Starting points (the paper's CIFAR per-GPU lr 0.1 for SGD and the
# preconditioners, Adam 1e-3) before our sweep.
START_LRS = {"sgd": 0.1, "adam": 0.001, "eva": 0.1, "eva_f": 0.1,
             "eva_s": 0.1, "kfac": 0.1, "foof": 0.1, "shampoo": 0.1}
# Defaults: what our sweep chose (`--sweep`: 2 epochs on 10,000 images with
# the linear schedule, validation loss on 5,000 held-out training images, grid
# x1/3, x1, x3 around START_LRS, extended twice at an edge; all values and
# losses in examples/results/classifier.json).
DEFAULT_LRS = {"sgd": 0.1, "adam": 0.009, "eva": 0.3, "eva_f": 0.3,
               "eva_s": 0.1, "kfac": 0.0333, "foof": 0.3, "shampoo": 0.1}

# K-FAC and Shampoo refresh their inverses every 10 steps (the authors'
# CIFAR K-FAC setting), FOOF its eigendecompositions every 50 (the authors'
# journal FOOF setting; an eigh of the 1569 x 1569 factor of the first dense
# layer every 10 steps would make FOOF's epoch several times K-FAC's on a
# two-core CPU); Eva's statistics are refreshed every step.
OPTIONS = {"kfac": {"inverse_every": 10}, "foof": {"inverse_every": 50},
           "shampoo": {"inverse_every": 10}}


class CNN(nn.Module):
  """Two 3x3 conv layers and two dense layers."""

  channels: tuple[int, int] = (16, 32)
  hidden: int = 128
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    if x.ndim == 3:
      x = x[..., None]
    for c in self.channels:
      x = nn.Conv(c, (3, 3), padding="SAME")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.classes)(x)


def loss_and_metrics(logits, x, y):
  del x
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
  return loss, {"accuracy": accuracy}


def make_task(data_dir: str | None = None, download: bool = False,
              batch_size: int = 128) -> harness.Task:
  d = datasets.load_fashion_mnist(data_dir, download=download)
  return harness.Task(
      name="classifier", model=CNN(), loss_and_metrics=loss_and_metrics,
      x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test,
      batch_size=batch_size, eval_batch_size=2000,
      loss_name="cross-entropy (nats, mean over batch)")


def parser(default_epochs: int = 5) -> argparse.ArgumentParser:
  p = harness.cli.parser(__doc__)
  harness.add_common_args(p, "classifier", DEFAULT_LRS)
  # The sweep: 2 epochs on 10,000 images (156 steps), validation on 5,000.
  p.set_defaults(epochs=default_epochs, sweep_epochs=2, sweep_subset=10000)
  harness.add_data_args(p, batch_size=128)
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  task = make_task(args.data_dir, args.download, args.batch_size)
  return harness.run_comparison(
      task, args, options=OPTIONS,
      sweep_centers=START_LRS,
      title="Fashion-MNIST CNN Conv16-pool-Conv32-pool-Dense128-Dense10",
      notes={"model": "Conv16-pool-Conv32-pool-Dense128-Dense10, ReLU",
             "loss": "softmax cross-entropy, mean over batch",
             "start_learning_rates": START_LRS})


if __name__ == "__main__":
  main()
