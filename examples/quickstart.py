"""Quickstart: eva_optax in a Flax training loop, against tuned SGD and Adam.

A small MLP classifies scikit-learn's 8x8 digits (bundled, no download). Four
optimizers, same initialisation and data order:

* ``sgd`` and ``adam``: optax's, each at the best learning rate of a 3-point
  sweep on a validation split of the training images, extended once when the
  best is at an edge (fair tuning);
* ``eva``: the library's namesake at the paper's settings;
* ``foof+adaptive``: the best method of the library in our measurements
  (README, "Which optimizer should I use?"): FOOF's direction with the
  step size, momentum and damping chosen every step from the exact quadratic
  model (``eva_optax.adaptive``). It has no learning rate to tune.

Two changes turn an optax loop into an eva_optax loop:

1. the gradient function: ``eva_optax.value_and_grad(loss_fn, statistics=...)``
   also returns per-layer statistics (``"vectors"`` for Eva and Eva-f,
   ``"factors"`` for K-FAC and FOOF);
2. the optimizer's ``update`` takes them as ``stats=``; ``adaptive`` also takes
   the model's outputs and the loss on this batch as functions of the
   parameters (``outputs_fn``, ``value_fn``), for its curvature products.

What Eva's cosine of 1.000 means: at the paper's damping Eva's rank-one
curvature term is about 1e-10 of the damping, so its update points exactly
along the gradient; Eva is then SGD with a KL-normalized step size.

    python examples/quickstart.py                # about a minute on two CPU cores
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

OPTIMIZERS = ("sgd", "adam", "eva", "foof+adaptive")
SWEEPS = {"sgd": (0.03, 0.1, 0.3), "adam": (1e-3, 3e-3, 1e-2)}


class MLP(nn.Module):
  hidden: int = 128
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.classes)(x)


def make_optimizer(name: str, lr: float | None, momentum: float):
  """``(tx, statistics)``: the optimizer and what ``value_and_grad`` captures."""
  if name == "sgd":
    return optax.inject_hyperparams(optax.sgd)(lr, momentum=momentum), None
  if name == "adam":
    return optax.inject_hyperparams(optax.adam)(lr), None
  if name == "eva":
    return eva_optax.eva(lr, momentum=momentum), "vectors"
  if name == "foof+adaptive":
    direction = eva_optax.scale_by_foof(inverse_every=5)
    return eva_optax.adaptive(direction, loss="softmax_cross_entropy"), "factors"
  raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def train(optimizer: str, epochs: int = 10, lr: float | None = 0.1,
          momentum: float = 0.9, batch_size: int = 64, seed: int = 0,
          data=None, lrs=None) -> dict:
  """Trains the MLP; returns per-epoch losses and accuracy (the last of ``lrs``).

  ``lrs`` (SGD and Adam) runs the same compiled step at each learning rate in
  turn from the same start (``inject_hyperparams``: one compilation) and
  returns every run's history, keyed by the rate.
  """
  data = data or datasets.load_digits()
  model = MLP()
  params0 = model.init(jax.random.PRNGKey(seed), data.x_train[:1])["params"]

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx, statistics = make_optimizer(optimizer, lr if lrs is None else lrs[0],
                                  momentum)
  grad_fn = (eva_optax.value_and_grad(loss_fn, statistics=statistics)
             if statistics else jax.value_and_grad(loss_fn))

  @jax.jit
  def step(params, opt_state, x, y):
    extra = {}
    if statistics:                                     # change 1: statistics
      loss, grads, extra["stats"] = grad_fn(params, x, y)
    else:
      loss, grads = grad_fn(params, x, y)
    if optimizer.endswith("+adaptive"):                # the model on this batch
      extra.update(outputs_fn=lambda p: model.apply({"params": p}, x),
                   value_fn=lambda p: loss_fn(p, x, y), value=loss)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)  # change 2
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, x, y):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  runs = {}
  for rate in (lrs or [lr]):
    params, opt_state = params0, tx.init(params0)
    if lrs is not None:
      opt_state.hyperparams["learning_rate"] = jnp.asarray(rate, jnp.float32)
    rng = np.random.default_rng(seed)
    n = len(data.x_train)
    h = {"train_loss": [], "test_loss": [], "test_accuracy": [], "lr": rate}
    start = time.perf_counter()
    for _ in range(epochs):
      order = rng.permutation(n)
      losses = []
      for i in range(n // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        params, opt_state, loss = step(params, opt_state, data.x_train[idx],
                                       data.y_train[idx])
        losses.append(loss)
      test_loss, test_acc = evaluate(params, data.x_test, data.y_test)
      h["train_loss"].append(float(np.mean(jax.device_get(losses))))
      h["test_loss"].append(float(test_loss))
      h["test_accuracy"].append(float(test_acc))
    h["seconds"] = time.perf_counter() - start
    h["params"] = params
    runs[rate] = h
  return runs if lrs is not None else runs[lr]


def validation_split(data, fraction: float = 0.2):
  """The last ``fraction`` of the training images as a validation "test" set."""
  n = int(len(data.x_train) * (1 - fraction))
  return datasets.Split(data.x_train[:n], data.y_train[:n], data.x_train[n:],
                        data.y_train[n:])


def tune(name: str, epochs: int, momentum: float, batch_size: int, seed: int,
         data) -> tuple[float, dict]:
  """The sweep's best rate (lowest validation loss) and every rate's loss.

  A best rate at an edge of the grid is extended once by a factor ~3.
  """
  grid = list(SWEEPS[name])
  losses = {}
  while True:
    todo = [r for r in grid if r not in losses]
    runs = train(name, epochs, None, momentum, batch_size, seed,
                 validation_split(data), lrs=todo)
    losses.update({r: (h["test_loss"][-1] if np.isfinite(h["test_loss"][-1])
                       else np.inf) for r, h in runs.items()})
    best = min(losses, key=losses.get)
    if len(losses) > len(SWEEPS[name]) or best not in (min(grid), max(grid)):
      return best, dict(sorted(losses.items()))
    grid.append(best * 10 ** 0.5 if best == max(grid) else best / 10 ** 0.5)


def eva_cosine(params, data, batch: int = 256) -> float:
  """cos(Eva's preconditioned gradient, gradient) on one batch, all layers."""
  model = MLP()

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  pre = eva_optax.scale_by_eva()

  @jax.jit
  def cosine(params, x, y):
    _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, x, y)
    u, _ = pre.update(grads, pre.init(params), params, stats=stats)
    return optax.tree.vdot(u, grads) / (optax.tree.norm(u) * optax.tree.norm(grads))

  return float(cosine(params, data.x_train[:batch], data.y_train[:batch]))


def main(epochs: int = 10, lr: float = 0.1, momentum: float = 0.9,
         seed: int = 0, batch_size: int = 64) -> dict:
  """Tunes SGD and Adam, trains the four optimizers, prints one line each.

  ``lr`` is Eva's learning rate (the paper's 0.1); SGD's and Adam's come from
  their sweeps; ``foof+adaptive`` has none.
  """
  data = datasets.load_digits()
  print(f"digits: {len(data.x_train)} train / {len(data.x_test)} test images, "
        f"{epochs} epochs, batch {batch_size}, momentum {momentum}")
  rates = {"eva": lr, "foof+adaptive": None}
  for name in ("sgd", "adam"):
    rates[name], losses = tune(name, epochs, momentum, batch_size, seed, data)
    print(f"  {name} sweep (validation loss): " + ", ".join(
        f"lr {r:g}: {v:.4f}" for r, v in losses.items()) + f" -> lr {rates[name]:g}")
  results = {}
  for name in OPTIMIZERS:
    h = train(name, epochs, rates[name], momentum, batch_size, seed, data)
    results[name] = h
    how = "no learning rate" if rates[name] is None else f"lr {rates[name]:g}"
    print(f"{name:4s} test accuracy {100 * h['test_accuracy'][-1]:.2f}%  "
          f"test loss {h['test_loss'][-1]:.4f}  ({how}, {h['seconds']:.1f} s, "
          "compilation included)")
  cos = eva_cosine(results["eva"]["params"], data)
  results["eva"]["cosine"] = cos
  print(f"Eva's update has cosine {cos:.3f} with the gradient: at the paper's "
        "damping its rank-one curvature is ~1e-10 of the damping, so Eva is SGD "
        "with a KL-normalized step size; the curvature that turns the direction "
        "comes from FOOF's full input factor, and the step from the quadratic model.")
  return results


if __name__ == "__main__":
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--epochs", type=int, default=10, help="passes over the data")
  p.add_argument("--lr", type=float, default=0.1, help="Eva's learning rate")
  p.add_argument("--momentum", type=float, default=0.9,
                 help="momentum of SGD and Eva")
  p.add_argument("--seed", type=int, default=0, help="init and data order")
  p.add_argument("--batch-size", type=int, default=64, help="batch size")
  a = p.parse_args()
  main(a.epochs, a.lr, a.momentum, a.seed, a.batch_size)
