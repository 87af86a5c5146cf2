"""The time-to-quality task on the Fashion-MNIST deep autoencoder.

The deep autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU after every
hidden layer except the linear 30-unit code, linear output, Flax default
initialisation), MSE averaged over batch and pixels, batch 1000, the 60,000
training images in one fixed order (the same every epoch and for every row),
the test MSE on all 10,000 after every half epoch. The sweep trains on the
run's first batches and scores on the last 5,000 images of the order, which
it never trains on.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import ttq_task

SIZES = (1000, 500, 250, 30, 250, 500, 1000)
QUICK_SIZES = (64, 32, 8, 32, 64)   # --quick: a small model, fast to compile
BATCH = 1000
# Sweep centres: what the 20-epoch sweep of examples/autoencoder.py chose.
LR_CENTERS = {"sgd": 0.6, "adam": 0.000557, "eva": 0.18, "eva_f": 0.54,
              "eva_s": 1.62, "kfac": 0.54, "foof": 1.62, "shampoo": 1.62}
TARGET = 0.0107  # kfac-jax adaptive K-FAC, 3 epochs (issue 10)
KFAC_JAX_ADAPTIVE = (0.0244, 0.0139, 0.0107)  # its test MSE after epochs 1-3
SWEEP_STEPS = 20
EPOCHS = 3


class Autoencoder(nn.Module):
  """784-1000-500-250-30-250-500-1000-784, ReLU except after the code and output.

  The code is the narrowest (middle) layer; ``sizes`` lists the hidden widths.
  """

  sizes: tuple[int, ...] = SIZES

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    code = len(self.sizes) // 2
    for i, d in enumerate(self.sizes):
      x = nn.Dense(d)(x)
      if i != code:
        x = nn.relu(x)
    return nn.Dense(784)(x)


def _mean_over_chunks(loss_fn, chunk: int):
  """``(params, x) -> mean loss over x`` in chunks of ``chunk`` images, jitted
  with ``x`` an argument (a constant would be folded into the program)."""
  @jax.jit
  def evaluate(params, x):
    xs = x.reshape((-1, chunk) + x.shape[1:])
    return jnp.mean(jax.lax.map(lambda c: loss_fn(params, c), xs))
  return evaluate


def make(args) -> ttq_task.Task:
  """The task with ``args``' seed, epochs, sweep steps, --quick and data dir."""
  import datasets  # pylint: disable=g-import-not-at-top  (examples/)
  model = Autoencoder(QUICK_SIZES if args.quick else SIZES)
  epochs = args.epochs or EPOCHS

  def outputs_fn(params, x):
    return model.apply({"params": params}, x)

  def loss_fn(params, x):
    return jnp.mean((outputs_fn(params, x) - x.reshape(x.shape[0], -1)) ** 2)

  data = datasets.load_fashion_mnist(args.data_dir)
  order = np.random.default_rng(args.seed).permutation(len(data.x_train))
  x_train, x_test = data.x_train[order], data.x_test
  if args.quick:
    x_train, x_test = x_train[:2000], x_test[:2000]
  x_train, x_test = jnp.asarray(x_train), jnp.asarray(x_test)
  n = x_train.shape[0]
  sweep_steps = args.sweep_steps or SWEEP_STEPS
  held = max(BATCH, min(5000, n - sweep_steps * BATCH) // BATCH * BATCH)
  x_held = x_train[n - held:]
  evaluate = _mean_over_chunks(loss_fn, BATCH)
  params0 = model.init(jax.random.PRNGKey(args.seed), x_train[:1])["params"]
  widths = "784-" + "-".join(map(str, model.sizes)) + "-784"
  return ttq_task.Task(
      name="autoencoder",
      description=(f"Fashion-MNIST autoencoder {widths}: {n} training images "
                   f"in one fixed order, batch {BATCH}, {epochs} epochs, "
                   f"test MSE on {x_test.shape[0]} every half epoch"),
      title=(f"Fashion-MNIST deep autoencoder, {n} images, batch {BATCH}, "
             f"{epochs} epochs: time to quality"),
      loss_fn=loss_fn, outputs_fn=outputs_fn, adaptive_loss="mse",
      params0=params0, data=(x_train,), sweep_data=(x_train,), batch=BATCH,
      steps_per_epoch=n // BATCH, epochs=epochs,
      evaluate=lambda p: evaluate(p, x_test),
      sweep_evaluate=lambda p: evaluate(p, x_held),
      metric="test_mse", metric_label="test MSE",
      lr_centers=LR_CENTERS, sweep_steps=sweep_steps,
      config={"model": widths, "batch": BATCH, "train_images": n,
              "test_images": int(x_test.shape[0]),
              "steps_per_epoch": n // BATCH,
              "sweep_held_out_images": held,
              "loss": "MSE averaged over batch x 784, pixels in [0, 1]"},
      targets={TARGET: "kfac-jax adaptive K-FAC, 3 epochs"},
      reference_curve={"label": "kfac-jax adaptive K-FAC (issue 10)",
                       "losses": list(KFAC_JAX_ADAPTIVE),
                       "note": "at 3.6-6x an SGD step"})
