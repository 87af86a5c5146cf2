"""Quickstart: Eva in a Flax training loop, against SGD, on scikit-learn's digits.

Two changes turn an optax SGD loop into an Eva loop:

1. the gradient function: ``eva_optax.value_and_grad(loss_fn)`` returns the
   per-layer statistics (the Kronecker vectors) along with loss and gradients;
2. the optimizer: ``eva_optax.eva(learning_rate, momentum=...)``, whose
   ``update`` takes them as ``stats=``.

Runs in well under a minute on two CPU cores:

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eva_optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position


class MLP(nn.Module):
  hidden: int = 128
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.classes)(x)


def train(optimizer: str, epochs: int = 10, lr: float = 0.1,
          momentum: float = 0.9, batch_size: int = 64, seed: int = 0,
          data=None) -> dict:
  """Trains the MLP with ``"sgd"`` or ``"eva"``; returns losses and accuracy."""
  data = data or datasets.load_digits()
  model = MLP()
  params = model.init(jax.random.PRNGKey(seed), data.x_train[:1])["params"]

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  if optimizer == "eva":
    tx = eva_optax.eva(lr, momentum=momentum)         # change 1: optimizer
    grad_fn = eva_optax.value_and_grad(loss_fn)       # change 2: gradients
  elif optimizer == "sgd":                            #   + statistics
    tx = optax.sgd(lr, momentum=momentum)
    grad_fn = jax.value_and_grad(loss_fn)
  else:
    raise ValueError(f"optimizer must be 'sgd' or 'eva', got {optimizer!r}")
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    if optimizer == "eva":
      loss, grads, stats = grad_fn(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    else:
      loss, grads = grad_fn(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  rng = np.random.default_rng(seed)
  n = len(data.x_train)
  history = {"train_loss": [], "test_loss": [], "test_accuracy": []}
  start = time.perf_counter()
  for _ in range(epochs):
    order = rng.permutation(n)
    losses = []
    for i in range(n // batch_size):
      idx = order[i * batch_size:(i + 1) * batch_size]
      params, opt_state, loss = step(params, opt_state, data.x_train[idx],
                                     data.y_train[idx])
      losses.append(float(loss))
    test_loss, test_acc = evaluate(params, data.x_test, data.y_test)
    history["train_loss"].append(float(np.mean(losses)))
    history["test_loss"].append(float(test_loss))
    history["test_accuracy"].append(float(test_acc))
  history["seconds"] = time.perf_counter() - start
  return history


def main(epochs: int = 10, lr: float = 0.1, momentum: float = 0.9,
         seed: int = 0, batch_size: int = 64) -> dict:
  """Trains SGD and Eva with the same learning rate and momentum; prints a
  line per optimizer and returns both histories."""
  data = datasets.load_digits()
  print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, "
        f"{epochs} epochs, lr {lr}, momentum {momentum}, batch {batch_size}")
  results = {}
  for name in ("sgd", "eva"):
    h = train(name, epochs, lr, momentum, batch_size, seed, data)
    results[name] = h
    print(f"{name:4s} test accuracy {100 * h['test_accuracy'][-1]:.2f}%  "
          f"test loss {h['test_loss'][-1]:.4f}  ({h['seconds']:.1f} s, "
          "compilation included)")
  return results


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=64)
  a = p.parse_args()
  main(a.epochs, a.lr, a.momentum, a.seed, a.batch_size)
