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

Columns: test MSE at each epoch, training seconds (compilation and evaluation
excluded), the step time relative to an SGD step (measured in this process,
right after the row's training, in rounds interleaved with SGD steps), and the time and epoch at which each row
first reaches 0.0107 (kfac-jax adaptive K-FAC after 3 epochs, issue 10) and
Adam's final test MSE. Writes ``time_to_quality.json`` (with the commit, the
command line and the versions) and ``time_to_quality.png``.

    python benchmarks/time_to_quality.py                       # 3 epochs, all rows
    python benchmarks/time_to_quality.py --rows sgd,foof+adaptive --epochs 1
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
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
# pylint: disable=g-import-not-at-top,wrong-import-position
import datasets
from harness import provenance
from harness import records
from harness import style
# pylint: enable=g-import-not-at-top,wrong-import-position

TARGET = 0.0107  # kfac-jax adaptive K-FAC, 3 epochs (issue 10)
KFAC_JAX_ADAPTIVE = (0.0244, 0.0139, 0.0107)  # its test MSE after epochs 1, 2, 3
PRECONDITIONERS = ("eva", "eva_f", "eva_s", "kfac", "foof", "shampoo")
FIXED = ("sgd", "adam") + PRECONDITIONERS
ADAPTIVE = ("gradient",) + PRECONDITIONERS
ALL_ROWS = FIXED + tuple(f"{n}+adaptive" for n in ADAPTIVE)
STATISTICS = {"eva": "vectors", "eva_f": "vectors", "kfac": "factors",
              "foof": "factors"}
# Sweep centres: what the 20-epoch sweep of examples/autoencoder.py chose.
LR_CENTERS = {"sgd": 0.6, "adam": 0.000557, "eva": 0.18, "eva_f": 0.54,
              "eva_s": 1.62, "kfac": 0.54, "foof": 1.62, "shampoo": 1.62}
REFRESH = {"kfac": 10, "foof": 10, "shampoo": 10}  # inverse_every
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


# ----------------------------------------------------------------------------
# The record: reach times, table, JSON (with provenance) and figure.

LABELS = {"sgd": "SGD", "adam": "Adam", "eva": "Eva", "eva_f": "Eva-f",
          "eva_s": "Eva-s", "kfac": "K-FAC", "foof": "FOOF",
          "shampoo": "Shampoo", "gradient": "gradient"}
def label(row: str) -> str:
  name, _, mode = row.partition("+")
  return LABELS[name] + (" + adaptive" if mode else "")


def reach(rec: dict[str, Any], target: float) -> dict[str, float] | None:
  """The first evaluation at or below ``target``: its epoch and training seconds."""
  for e in rec["evals"]:
    if e["test_mse"] <= target:
      return {"epoch": e["epoch"], "seconds": e["train_seconds"]}
  return None


def _fmt_reach(r):
  return "not reached" if r is None else f"{r['epoch']:g} ({r['seconds']:.0f} s)"


def markdown_table(record: dict[str, Any]) -> str:
  """The README table of a record (a pure function of the JSON)."""
  runs, adam_final = record["runs"], record["adam_final"]
  epochs = record["config"]["epochs"]
  cols = [f"epoch {k}" for k in range(1, epochs + 1)]
  head = (["optimizer", "lr"] + [f"test MSE, {c}" for c in cols]
          + ["train s", "step / SGD", f"reaches {TARGET}: epoch (s)"])
  if adam_final is not None:
    head.append(f"reaches Adam's {adam_final:.4f}: epoch (s)")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row, rec in runs.items():
    by_epoch = {e["epoch"]: e["test_mse"] for e in rec["evals"]}
    mses = [f"{by_epoch[k]:.4f}" if k in by_epoch else "-"
            for k in range(1, epochs + 1)]
    lr = "adaptive" if "+" in row else f"{rec['learning_rate']:.3g}"
    cells = ([label(row), lr] + mses
             + [f"{rec['train_seconds']:.0f}",
                "-" if rec["step_ratio_vs_sgd"] is None
                else f"{rec['step_ratio_vs_sgd']:.2f}x",
                _fmt_reach(rec["reach"]["target"])])
    if adam_final is not None:
      cells.append(_fmt_reach(rec["reach"]["adam"]))
    lines.append("| " + " | ".join(cells) + " |")
  ref = " / ".join(f"{v:.4f}" for v in KFAC_JAX_ADAPTIVE)
  lines.append("")
  lines.append(f"kfac-jax adaptive K-FAC (issue 10, for reference), test MSE "
               f"after epochs 1 / 2 / 3: {ref}, at 3.6-6x an SGD step.")
  return "\n".join(lines)


def make_record(runs, sweeps, args, setup: Setup, argv) -> dict[str, Any]:
  adam = runs.get("adam")
  adam_final = adam["evals"][-1]["test_mse"] if adam else None
  for rec in runs.values():
    rec["label"] = label(rec["row"])
    rec["reach"] = {"target": reach(rec, TARGET),
                    "adam": reach(rec, adam_final) if adam_final else None}
  config = {k: v for k, v in vars(args).items() if k not in ("out",)}
  config.update(model="784-" + "-".join(map(str, MODEL.sizes)) + "-784",
                batch=setup.batch, train_images=int(setup.x_train.shape[0]),
                test_images=int(setup.x_test.shape[0]),
                steps_per_epoch=setup.steps_per_epoch,
                fixed_rows={"momentum": 0.9, "schedule": "linear decay to 0",
                            "inverse_every": REFRESH},
                loss="MSE averaged over batch x 784, pixels in [0, 1]")
  record = {"benchmark": "time_to_quality",
            "provenance": provenance.collect(
                None if argv is None else [__file__] + list(argv)),
            "config": config, "target": TARGET, "adam_final": adam_final,
            "kfac_jax_adaptive": {f"epoch {k + 1}": v
                                  for k, v in enumerate(KFAC_JAX_ADAPTIVE)},
            "sweeps": sweeps, "runs": runs}
  record["table"] = markdown_table(record)
  return record


def plot(record: dict[str, Any], path: str) -> str:
  """Test MSE against epoch and against training seconds (log scale)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  for row, rec in record["runs"].items():
    _, _, mode = row.partition("+")
    # The gradient direction + adaptive is drawn in SGD's colour, dashed.
    kw = dict(style.of(row.replace("gradient", "sgd")), markersize=4,
              label=rec["label"],
              linewidth=1.6 if mode else 1.0)
    ev = rec["evals"]
    axes[0].plot([e["epoch"] for e in ev], [e["test_mse"] for e in ev], **kw)
    axes[1].plot([e["train_seconds"] for e in ev], [e["test_mse"] for e in ev], **kw)
  ref = KFAC_JAX_ADAPTIVE[:record["config"]["epochs"]]
  axes[0].plot(range(1, len(ref) + 1), ref, "kx", markersize=8,
               label="kfac-jax adaptive K-FAC (issue 10)")
  sgd = record["runs"].get("sgd")
  for ax in axes:
    ax.axhline(TARGET, color="k", linewidth=0.8, linestyle="-.",
               label=f"{TARGET} (kfac-jax adaptive, 3 epochs)")
    if sgd:
      style.target_line(ax, sgd["evals"][-1]["test_mse"], "SGD's final MSE")
    ax.set_yscale("log")
    ax.set_ylabel("test MSE (10,000 images)")
    ax.grid(True, alpha=0.3)
  axes[0].set_xlabel("epoch")
  style.integer_ticks(axes[0].xaxis)
  axes[1].set_xlabel("training seconds (compilation and evaluation excluded)")
  axes[0].legend(fontsize=7, ncol=2)
  c = record["config"]
  fig.suptitle(f"Fashion-MNIST deep autoencoder, {c['train_images']} images, "
               f"batch {c['batch']}, {c['epochs']} epochs: time to quality "
               "(dashed: adaptive)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write(record: dict[str, Any], out: str) -> list[str]:
  path = records.write_json(os.path.join(out, "time_to_quality.json"), record)
  return [path, plot(record, os.path.join(out, "time_to_quality.png"))]


def _coupling(text: str) -> float | str | None:
  """``--couple-damping``: a number, ``auto`` or ``none``."""
  low = text.lower()
  if low == "auto":
    return "auto"
  return None if low == "none" else float(text)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--epochs", type=int, default=3, help="epochs per row")
  p.add_argument("--rows", default=",".join(ALL_ROWS),
                 help="comma-separated rows, from: " + ",".join(ALL_ROWS))
  p.add_argument("--quick", action="store_true",
                 help="smoke test: 2,000 training and 2,000 test images, "
                 "a small autoencoder (784-64-32-8-32-64-784), 1 epoch, "
                 "rows sgd,gradient+adaptive, no sweep")
  p.add_argument("--no-sweep", action="store_true",
                 help="use the sweep centres (or --lr) instead of sweeping")
  p.add_argument("--lr", action="append", default=[], metavar="ROW=LR",
                 help="fixed learning rate for a row (skips its sweep)")
  p.add_argument("--initial-damping", type=float, default=1e-3,
                 help="adaptive: initial lambda of the quadratic model")
  p.add_argument("--adapt-every", type=int, default=5,
                 help="adaptive: Levenberg-Marquardt update every this many steps")
  p.add_argument("--couple-damping", type=_coupling, default="auto",
                 help="adaptive: exponent e of the direction's damping coupling, "
                 "gamma ~ lambda^e ('auto': 0.5; 'none': gamma stays at "
                 "--direction-damping)")
  p.add_argument("--direction-damping", type=float, default=0.03,
                 help="adaptive: the direction's own damping gamma")
  p.add_argument("--inverse-every", type=int, default=10,
                 help="adaptive K-FAC, FOOF, Shampoo: inverse refresh interval")
  p.add_argument("--curvature-batch", type=int, default=1000,
                 help="adaptive: examples of the batch the curvature products "
                 "use (the first ones)")
  p.add_argument("--sweep-steps", type=int, default=20,
                 help="steps of each sweep run (the run's schedule, from step 0)")
  p.add_argument("--stats-every", type=int, default=1,
                 help="adaptive K-FAC and FOOF: capture their factors every this "
                 "many steps (plain gradients in between)")
  p.add_argument("--ratio-rounds", type=int, default=3,
                 help="interleaved rounds for the step-time ratios")
  p.add_argument("--ratio-steps", type=int, default=10,
                 help="steps per round for the step-time ratios")
  p.add_argument("--no-reference", action="store_true",
                 help="do not time an SGD step for the step-time ratios "
                 "(experiments; no ratios then)")
  p.add_argument("--seed", type=int, default=0, help="init and data order")
  p.add_argument("--out", default=None,
                 help="directory for time_to_quality.{json,png} (default: "
                 "benchmarks/results, or results/time_to_quality_quick with "
                 "--quick)")
  p.add_argument("--data-dir", default=None,
                 help="Fashion-MNIST directory (default: the usual places)")
  return p


def parse_args(argv=None):
  p = parser()
  args = p.parse_args(argv)
  if args.quick:
    args.epochs = 1
    if args.rows == p.get_default("rows"):
      args.rows = "sgd,gradient+adaptive"
    args.no_sweep = True
    args.ratio_rounds, args.ratio_steps = 1, 2
  if args.out is None:
    args.out = (os.path.join("results", "time_to_quality_quick") if args.quick
                else os.path.join(HERE, "results"))
  args.rows = [r for r in args.rows.split(",") if r]
  for r in args.rows:
    if r not in ALL_ROWS:
      p.error(f"unknown row {r!r}; choose from {','.join(ALL_ROWS)}")
  args.lr = {k: float(v) for k, v in (s.split("=") for s in args.lr)}
  return args


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
    record = make_record(runs, sweeps, args, setup, argv)
    paths = write(record, args.out)
  print(record["table"])
  print("Wrote " + ", ".join(paths))
  return record


if __name__ == "__main__":
  main()
