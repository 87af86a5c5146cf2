"""Time to quality on the Fashion-MNIST deep autoencoder, fixed and adaptive.

The deep autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU after every
hidden layer except the linear 30-unit code, linear output, Flax default
initialisation), MSE averaged over batch and pixels, batch 1000, the full
60,000 training images in one fixed order for every optimizer, test MSE on all
10,000 after every half epoch. Rows:

* ``sgd``, ``adam`` and every preconditioner's alias (``eva``, ``eva_f``,
  ``eva_s``, ``kfac``, ``foof``, ``shampoo``) at a fixed learning rate with
  linear decay to 0 and momentum 0.9 (K-FAC, FOOF, Shampoo: inverses every 10
  steps), the rate taken from a short sweep (the run's first 20 steps at
  x1/3, x1, x3 the rate our 20-epoch sweep chose, extended once at an edge,
  scored on the last 5,000 training images of the order, not trained on);
* ``<name>+adaptive``: ``eva_optax.adaptive`` around ``scale_by_<name>`` and
  around the plain gradient (``gradient+adaptive``): step size, momentum and
  damping from the exact quadratic model; no learning rate to tune.

Columns: test MSE per epoch, training seconds (no compilation or evaluation),
the step time relative to an SGD step (this process, right after the row's
training, interleaved), and when each row first reaches 0.0107 (kfac-jax
adaptive K-FAC, 3 epochs) and Adam's final MSE. Writes ``time_to_quality.json``
(with provenance) and ``time_to_quality.png``.

    python benchmarks/time_to_quality.py                       # 3 epochs, all rows
    python benchmarks/time_to_quality.py --quick                # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eva_optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "examples")]
# pylint: disable=g-import-not-at-top,wrong-import-position
import datasets
from benchlib import ttq_cli
from benchlib.ttq_report import REFRESH, make_record, markdown_table, write  # pylint: disable=unused-import
# pylint: enable=g-import-not-at-top,wrong-import-position

PRECONDITIONERS = ("eva", "eva_f", "eva_s", "kfac", "foof", "shampoo")
FIXED = ("sgd", "adam") + PRECONDITIONERS
ADAPTIVE = ("gradient",) + PRECONDITIONERS
ALL_ROWS = FIXED + tuple(f"{n}+adaptive" for n in ADAPTIVE)
STATISTICS = {"eva": "vectors", "eva_f": "vectors", "kfac": "factors",
              "foof": "factors"}
# Sweep centres: what the 20-epoch sweep of examples/autoencoder.py chose.
LR_CENTERS = {"sgd": 0.6, "adam": 0.000557, "eva": 0.18, "eva_f": 0.54,
              "eva_s": 1.62, "kfac": 0.54, "foof": 1.62, "shampoo": 1.62}
SIZES = (1000, 500, 250, 30, 250, 500, 1000)
QUICK_SIZES = (64, 32, 8, 32, 64)  # --quick: a small model, fast to compile


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


MODEL = Autoencoder()  # replaced by the small model under --quick (main)


def loss_fn(params, x):
  out = MODEL.apply({"params": params}, x)
  return jnp.mean((out - x.reshape(x.shape[0], -1)) ** 2)


@dataclasses.dataclass
class Setup:
  """Data (on the device, in the fixed order) and the run's sizes."""

  x_train: jax.Array
  x_test: jax.Array
  batch: int
  steps_per_epoch: int
  epochs: int
  evals_per_epoch: int = 2

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.epochs


def direction(name: str, args) -> optax.GradientTransformation:
  """The adaptive rows' direction ``d``: a preconditioner alone, or the gradient.

  Built with ``optax.inject_hyperparams`` so that ``adaptive`` can move its
  damping with ``lambda`` (``--couple-damping``).
  """
  if name == "gradient":
    return optax.identity()
  factory = getattr(eva_optax, f"scale_by_{name}")
  if name == "shampoo":
    return factory(inverse_every=args.inverse_every)
  kw = {"damping": args.direction_damping}
  if name in REFRESH:
    kw["inverse_every"] = args.inverse_every
  if STATISTICS.get(name) == "factors" and args.stats_every > 1:
    kw["stats_every"] = args.stats_every
  static = tuple(k for k in kw if k != "damping")
  return optax.inject_hyperparams(factory, static_args=static)(**kw)


def optimizer(row: str, setup: Setup, args):
  """``(tx, statistics mode, adaptive?)`` for one row.

  Fixed rows take their peak learning rate as an ``inject_hyperparams``
  hyperparameter (``peak``): the sweep and the run share one compiled step.
  """
  name, _, mode = row.partition("+")
  stats = STATISTICS.get(name)
  if mode == "adaptive":
    tx = eva_optax.adaptive(
        direction(name, args), loss="mse", initial_damping=args.initial_damping,
        adapt_every=args.adapt_every, couple_damping=args.couple_damping)
    return tx, stats, True
  total = setup.total_steps

  def make(peak):
    schedule = lambda count: peak * jnp.maximum(0.0, 1.0 - count / total)
    if name == "sgd":
      return optax.sgd(schedule, momentum=0.9)
    if name == "adam":
      return optax.adam(schedule)
    kw = {"inverse_every": REFRESH[name]} if name in REFRESH else {}
    return getattr(eva_optax, name)(schedule, momentum=0.9, **kw)

  return optax.inject_hyperparams(make)(peak=1.0), stats, False


def make_step(tx, stats_mode: str | None, adaptive: bool, setup: Setup,
              curvature_batch: int, capture: bool = True):
  """A jitted ``step(params, state, data, i) -> (params, state, loss)`` on
  batch ``i`` of ``data`` (an argument, not a constant baked into the
  program: XLA would fold it).

  ``capture=False`` (steps where the preconditioner folds no statistics,
  ``stats_every > 1``) takes plain gradients and passes zero statistics of the
  right structure, which the preconditioner ignores on those steps.
  """
  grad_fn = (eva_optax.value_and_grad(loss_fn, statistics=stats_mode)
             if stats_mode else jax.value_and_grad(loss_fn))
  b = setup.batch

  def step(params, state, data, i):
    x = jax.lax.dynamic_slice_in_dim(data, i * b, b)
    if stats_mode and capture:
      loss, grads, stats = grad_fn(params, x)
      extra = {"stats": stats}
    elif stats_mode:
      shapes = jax.eval_shape(grad_fn, params, x)[2]
      loss, grads = jax.value_and_grad(loss_fn)(params, x)
      extra = {"stats": jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                     shapes)}
    else:
      loss, grads = grad_fn(params, x)
      extra = {}
    if adaptive:
      xc = x[:curvature_batch]
      extra.update(outputs_fn=lambda p: MODEL.apply({"params": p}, xc),
                   value_fn=lambda p: loss_fn(p, x), value=loss)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step, donate_argnums=(0, 1))


@jax.jit
def _evaluate(params, x_test):
  xs = x_test.reshape((-1, 1000) + x_test.shape[1:])
  return jnp.mean(jax.lax.map(lambda x: loss_fn(params, x), xs))


def make_eval(x_test: jax.Array):
  """Mean MSE over ``x_test`` (a multiple of 1,000 images)."""
  return lambda params: _evaluate(params, x_test)


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


_COMPILED: dict[str, Any] = {}


def compiled_row(row: str, setup: Setup, args, params0):
  """``(tx, step_at, adaptive?, compile seconds)``, built once per row;
  ``step_at(k)`` is the compiled step for global step ``k``."""
  if row not in _COMPILED:
    tx, stats_mode, adaptive = optimizer(row, setup, args)
    every = (args.stats_every if adaptive and stats_mode == "factors" else 1)
    t0 = time.perf_counter()
    steps = [make_step(tx, stats_mode, adaptive, setup, args.curvature_batch,
                       capture).lower(params0, tx.init(params0), setup.x_train,
                                      jnp.int32(0)).compile()
             for capture in ((True, False) if every > 1 else (True,))]
    step_at = lambda k: steps[0] if k % every == 0 else steps[-1]
    _COMPILED[row] = (tx, step_at, adaptive, time.perf_counter() - t0)
  return _COMPILED[row]


def train(row: str, lr: float | None, setup: Setup, args, params0,
          steps: int | None = None, x_eval=None, log=print) -> dict[str, Any]:
  """Trains one row; test MSE every half epoch. Returns its record."""
  tx, step_at, adaptive, compile_s = compiled_row(row, setup, args, params0)
  evaluate = make_eval(setup.x_test if x_eval is None else x_eval)
  params, state = copy(params0), copy(tx.init(params0))
  if not adaptive:
    state.hyperparams["peak"] = jnp.asarray(lr, state.hyperparams["peak"].dtype)
  evaluate(params).block_until_ready()
  steps = setup.total_steps if steps is None else steps
  every = setup.steps_per_epoch // setup.evals_per_epoch
  evals, seconds, losses = [], 0.0, []
  for start in range(0, steps, every):
    t = time.perf_counter()
    for k in range(start, min(start + every, steps)):
      params, state, loss = step_at(k)(params, state, setup.x_train,
                                       jnp.int32(k % setup.steps_per_epoch))
      losses.append(loss)
    jax.block_until_ready(params)
    seconds += time.perf_counter() - t
    mse = float(evaluate(params))
    evals.append({"epoch": min(start + every, steps) / setup.steps_per_epoch,
                  "test_mse": mse, "train_seconds": seconds})
    if not np.isfinite(mse):
      break
  rec = {"row": row, "learning_rate": lr, "evals": evals,
         "train_seconds": seconds, "compile_seconds": compile_s,
         "train_loss_last": float(np.mean([float(x) for x in losses[-10:]]))}
  if adaptive:
    rec["adaptive"] = {
        "final_damping": float(state.damping),
        "last_coefficients": [float(c) for c in state.coefficients],
        "last_rho": float(state.rho),
        "nonfinite_count": int(state.nonfinite_count),
        "curvature_count": int(state.curvature_count),
        "rejected_count": int(state.rejected_count)}
  rec["load_average"] = [round(x, 2) for x in os.getloadavg()]
  rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  rec["_run"] = (step_at, params, state, steps)
  if log:
    log(f"  {row:18s} lr {lr if lr is not None else '-':<10} " + "  ".join(
        f"{e['epoch']:.1f}:{e['test_mse']:.4f}" for e in evals)
        + f"  ({seconds:.1f} s train, {compile_s:.1f} s compile)")
  return rec


def sweep(row: str, setup: Setup, args, params0, log=print) -> dict[str, Any]:
  """The short sweep: the run's first ``--sweep-steps`` steps at each rate,
  scored on the last 5,000 training images of the order (not trained on)."""
  n = setup.steps_per_epoch * setup.batch
  held = min(5000, n - args.sweep_steps * setup.batch)
  x_val = setup.x_train[n - held:n]
  fit_steps = args.sweep_steps
  results = {}

  def run(lr):
    rec = train(row, lr, setup, args, params0, steps=fit_steps, x_eval=x_val,
                log=None)
    val = rec["evals"][-1]["test_mse"]
    results[lr] = val if np.isfinite(val) else float("inf")
    del rec["_run"]

  grid = [LR_CENTERS[row] * f for f in (1 / 3, 1.0, 3.0)]
  for lr in grid:
    run(lr)
  best = min(results, key=results.get)
  if best in (grid[0], grid[-1]):
    nxt = best / 3 if best == grid[0] else best * 3
    run(nxt)
    best = min(results, key=results.get)
  log(f"  sweep {row:8s} " + "  ".join(f"{lr:.3g}:{v:.4f}" for lr, v in
                                         sorted(results.items()))
      + f"  -> {best:.3g}")
  return {"results": {f"{k:.6g}": v for k, v in sorted(results.items())},
          "chosen": best}


def sgd_reference(setup: Setup, args, params0):
  """The SGD step the step-time ratios divide by: ``(step_at, params, state, 0)``.

  Compiled in this process (its own copy of the SGD row's program), started
  from the initial parameters at the sweep centre's rate.
  """
  tx, step_at, _, _ = compiled_row("sgd", setup, args, params0)
  state = copy(tx.init(params0))
  state.hyperparams["peak"] = jnp.asarray(LR_CENTERS["sgd"],
                                          state.hyperparams["peak"].dtype)
  return (step_at, copy(params0), state, 0)


def step_ratio(run, reference, rounds: int, steps: int, setup: Setup) -> float:
  """Median over interleaved rounds of (row's time for ``steps`` steps) / SGD's.

  Measured right after the row's training, in the same process as the SGD
  reference. The row continues from where its training stopped, so a round of
  10 steps holds its share of inverse refreshes, adaptations and statistics
  captures.
  """

  def timed(run):
    step_at, p, s, k0 = run
    t = time.perf_counter()
    for k in range(k0, k0 + steps):
      p, s, _ = step_at(k)(p, s, setup.x_train,
                           jnp.int32(k % setup.steps_per_epoch))
    jax.block_until_ready(p)
    return time.perf_counter() - t, (step_at, p, s, k0 + steps)

  run = (run[0], copy(run[1]), copy(run[2]), run[3])
  ref = (reference[0], copy(reference[1]), copy(reference[2]), reference[3])
  r = []
  for _ in range(rounds):
    t_sgd, ref = timed(ref)
    t_row, run = timed(run)
    r.append(t_row / t_sgd)
  return float(np.median(r))


def parser() -> argparse.ArgumentParser:
  """The command line (every flag with its help and default)."""
  return ttq_cli.parser(__doc__.split("\n")[0], ALL_ROWS)


def parse_args(argv=None):
  return ttq_cli.parse_args(parser(), argv, ALL_ROWS, os.path.join(HERE, "results"))


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  global MODEL
  MODEL = Autoencoder(QUICK_SIZES if args.quick else SIZES)
  _COMPILED.clear()
  data = datasets.load_fashion_mnist(args.data_dir)
  order = np.random.default_rng(args.seed).permutation(len(data.x_train))
  x_train, x_test = data.x_train[order], data.x_test
  if args.quick:
    x_train, x_test = x_train[:2000], x_test[:2000]
  batch = 1000
  setup = Setup(x_train=jnp.asarray(x_train), x_test=jnp.asarray(x_test),
                batch=batch, steps_per_epoch=len(x_train) // batch,
                epochs=args.epochs)
  params0 = MODEL.init(jax.random.PRNGKey(args.seed), setup.x_train[:1])["params"]
  print(f"Fashion-MNIST autoencoder: {len(x_train)} training images in one "
        f"fixed order, batch {batch}, {args.epochs} epochs, test MSE on "
        f"{len(x_test)} every half epoch; rows: {','.join(args.rows)}")
  sweeps, runs = {}, {}
  reference = None if args.no_reference else sgd_reference(setup, args, params0)
  for row in args.rows:
    lr = None
    if "+" not in row:
      if row in args.lr or args.no_sweep:
        lr = args.lr.get(row, LR_CENTERS[row])
      else:
        sweeps[row] = sweep(row, setup, args, params0)
        lr = sweeps[row]["chosen"]
    rec = train(row, lr, setup, args, params0)
    rec["step_ratio_vs_sgd"] = (
        None if reference is None else
        step_ratio(rec.pop("_run"), reference, args.ratio_rounds,
                   args.ratio_steps, setup))
    rec.pop("_run", None)
    runs[row] = rec
    # Written after every row: a long run that is stopped keeps its rows.
    record = make_record(runs, sweeps, args, setup, argv,
                         model_sizes=MODEL.sizes, script=__file__)
    paths = write(record, args.out)
  print(record["table"])
  print("Wrote " + ", ".join(paths))
  return record


if __name__ == "__main__":
  main()
