"""A small training harness shared by the examples: one optimizer per run, same data.

For each optimizer (``sgd``, ``adam``, ``eva``, ``eva_f``, ``eva_s``, ``kfac``,
``foof``, ``shampoo``) it builds the optax transformation and the gradient
function it needs (``eva_optax.value_and_grad`` with ``statistics="vectors"``
for Eva and Eva-f, ``"factors"`` for K-FAC and FOOF; plain ``jax.value_and_grad``
for the gradient-only ones), trains with one jitted step
(gradients -> ``tx.update`` -> ``optax.apply_updates``), and records:

* per epoch: train loss (the mean of the step losses of the epoch), test loss,
  accuracies where the task has labels, cumulative training time;
* wall time (training only: evaluation and compilation excluded), compile
  time, median step time, and, after every epoch, the median time of a few
  SGD steps of the same model timed alongside (:func:`make_reference`): on a
  shared machine the load changes from run to run, and the ratio to this
  reference (``step_ratio_vs_sgd``) and the load-adjusted times cancel it;
* optimizer-state bytes (the sum of ``nbytes`` over the ``opt_state`` leaves);
* the mean cosine between the *preconditioned gradient* and the raw gradient,
  over all parameters flattened together. The preconditioned gradient
  ``d_t = P(g_t) (+ wd w)`` is read off the momentum buffer
  (``d_t = m_t - mu m_{t-1}`` of ``optax.trace``), so it is the direction
  before momentum and the learning rate; with zero weight decay (as in these
  examples) it is the preconditioner's output. Optimizers without an
  ``optax.trace`` (Adam) get the cosine of the whole update instead; the
  record says which (``cosine_of``).

:func:`lr_sweep` runs a short learning-rate sweep (a few values per optimizer,
a training subset, a fixed seed, a held-out validation slice of the training
set) and :func:`write_json`, :func:`plot` and :func:`markdown_table` write and
summarise the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import eva_optax

OPTIMIZERS = ("sgd", "adam", "eva", "eva_f", "eva_s", "kfac", "foof",
              "shampoo")
LABELS = {"sgd": "SGD", "adam": "Adam", "eva": "Eva", "eva_f": "Eva-f",
          "eva_s": "Eva-s", "kfac": "K-FAC", "foof": "FOOF",
          "shampoo": "Shampoo"}
# What each optimizer needs from the gradient function.
STATISTICS = {"sgd": None, "adam": None, "eva": "vectors", "eva_f": "vectors",
              "eva_s": None, "kfac": "factors", "foof": "factors",
              "shampoo": None}
PRECONDITIONED = ("eva", "eva_f", "eva_s", "kfac", "foof", "shampoo")


def available(name: str) -> bool:
  """Whether this build of eva_optax (or optax) provides ``name``."""
  if name in ("sgd", "adam"):
    return True
  return hasattr(eva_optax, name)


def make_optimizer(name: str, learning_rate: Any, momentum: float = 0.9,
                   **options: Any) -> optax.GradientTransformation:
  """The optax transformation of optimizer ``name``.

  Args:
    name: one of :data:`OPTIMIZERS`.
    learning_rate: float or optax schedule.
    momentum: heavy-ball momentum (all but Adam).
    **options: passed on to the constructor (``damping``, ``inverse_every``,
      ``kl_clip``, ``block_size``, ...).
  """
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=momentum, **options)
  if name == "adam":
    return optax.adam(learning_rate, **options)
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")
  if not available(name):
    raise ValueError(f"eva_optax {eva_optax.__version__} has no {name!r}.")
  return getattr(eva_optax, name)(learning_rate, momentum=momentum, **options)


@dataclasses.dataclass
class Task:
  """A model, its loss and its data.

  ``loss_and_metrics(outputs, x, y)`` returns the mean loss over the batch and a
  dict of per-batch *mean* metrics (e.g. ``{"accuracy": ...}``; empty for the
  autoencoder).
  """

  name: str
  model: nn.Module
  loss_and_metrics: Callable[[Any, Any, Any], tuple[Any, dict[str, Any]]]
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  batch_size: int
  eval_batch_size: int = 1000
  log_scale: bool = False  # plot losses on a log axis

  def subset(self, n: int | None) -> "Task":
    """The same task with only the first ``n`` training examples."""
    if not n or n >= len(self.x_train):
      return self
    return dataclasses.replace(self, x_train=self.x_train[:n],
                               y_train=self.y_train[:n])


def _loss_fn(task: Task):
  def loss_fn(params, x, y):
    outputs = task.model.apply({"params": params}, x)
    return task.loss_and_metrics(outputs, x, y)
  return loss_fn


def _tree_vdot(a, b):
  return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _unit_max(tree):
  """``tree / max|tree|`` as float32 leaves."""
  leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(tree)]
  m = jnp.max(jnp.asarray([jnp.max(jnp.abs(x)) for x in leaves]))
  m = jnp.where(jnp.isfinite(m) & (m > 0), m, 1.0)
  return [x / m for x in leaves]


def _cosine(a, b):
  """cos(a, b) over whole trees, in one pass over the data. Only when a
  squared norm leaves [1e-15, 1e15], where ``aa * bb`` or the squares
  themselves could under- or overflow float32 (late in training, or a run
  that blows up), are both trees rescaled to unit max first, inside
  :func:`jax.lax.cond` so that the usual step pays nothing."""
  def cos(ab, aa, bb):
    return ab / jnp.sqrt(aa * bb + 1e-30)

  def rescaled(a, b):
    a, b = _unit_max(a), _unit_max(b)
    return cos(_tree_vdot(a, b), _tree_vdot(a, a), _tree_vdot(b, b))

  ab, aa, bb = _tree_vdot(a, b), _tree_vdot(a, a), _tree_vdot(b, b)
  in_range = (aa > 1e-15) & (aa < 1e15) & (bb > 1e-15) & (bb < 1e15)
  return jax.lax.cond(in_range, lambda a, b: cos(ab, aa, bb), rescaled, a, b)


def _traces(opt_state) -> list[optax.TraceState]:
  is_trace = lambda s: isinstance(s, optax.TraceState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_trace)
          if is_trace(s)]


def make_train_step(task: Task, tx: optax.GradientTransformation,
                    statistics_mode: str | None, momentum: float | None):
  """A jitted ``step(params, opt_state, x, y) -> (params, opt_state, loss,
  metrics, cosine)``; see the module docstring for the cosine."""
  loss_fn = _loss_fn(task)
  if statistics_mode is None:
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    grad_fn = lambda p, x, y: (*vg(p, x, y), None)
  else:
    grad_fn = eva_optax.value_and_grad(loss_fn, has_aux=True,
                                       statistics=statistics_mode)

  def step(params, opt_state, x, y):
    (loss, metrics), grads, stats = grad_fn(params, x, y)
    extra = {} if statistics_mode is None else {"stats": stats}
    updates, new_state = tx.update(grads, opt_state, params, **extra)
    old_tr, new_tr = _traces(opt_state), _traces(new_state)
    if momentum is not None and len(new_tr) == 1:
      direction = jax.tree.map(lambda n, o: n - momentum * o,
                               new_tr[0].trace, old_tr[0].trace)
    else:
      direction = jax.tree.map(jnp.negative, updates)
    cos = _cosine(direction, grads)
    params = optax.apply_updates(params, updates)
    return params, new_state, loss, metrics, cos

  return jax.jit(step, donate_argnums=(0, 1))


def cosine_of(tx: optax.GradientTransformation, params) -> str:
  n = len(_traces(jax.eval_shape(tx.init, params)))
  return ("preconditioned gradient (before momentum) vs gradient" if n == 1
          else "update vs gradient")


def make_eval(task: Task):
  loss_fn = _loss_fn(task)

  @jax.jit
  def eval_batch(params, x, y):
    loss, metrics = loss_fn(params, x, y)
    return loss, metrics

  def evaluate(params, x_all, y_all) -> dict[str, float]:
    n = len(x_all)
    sums: dict[str, float] = {}
    for i in range(0, n, task.eval_batch_size):
      x, y = x_all[i:i + task.eval_batch_size], y_all[i:i + task.eval_batch_size]
      loss, metrics = eval_batch(params, x, y)
      for k, v in {"loss": loss, **metrics}.items():
        sums[k] = sums.get(k, 0.0) + float(v) * len(x)
    return {k: v / n for k, v in sums.items()}

  return evaluate


def tree_bytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def train(task: Task, name: str, learning_rate: float, epochs: int, seed: int,
          *, momentum: float = 0.9, schedule: str = "constant",
          options: dict[str, Any] | None = None, eval_sets=None,
          progress: bool = True, desc: str | None = None,
          reference: Callable[[], float] | None = None) -> dict[str, Any]:
  """Trains ``task`` with optimizer ``name`` and returns the run's record.

  Args:
    task: model, loss and data.
    name: optimizer name (:data:`OPTIMIZERS`).
    learning_rate: peak learning rate.
    epochs: passes over ``task.x_train`` (the last partial batch is dropped).
    seed: parameter initialisation and data order.
    momentum: heavy-ball momentum (ignored by Adam).
    schedule: ``"constant"`` or ``"linear"`` (linear decay to 0 over the run,
      the authors' autoencoder schedule).
    options: extra optimizer arguments.
    eval_sets: ``{"test": (x, y), ...}`` evaluated after every epoch; default
      the task's test set.
    progress: show a tqdm bar.
    desc: the bar's label.
    reference: from :func:`make_reference`; called after every epoch to time
      a few SGD steps alongside, so that times taken under different machine
      loads can be compared (``ref_step_s``, ``step_ratio_vs_sgd``).
  """
  options = dict(options or {})
  eval_sets = eval_sets or {"test": (task.x_test, task.y_test)}
  n_train = len(task.x_train)
  steps_per_epoch = n_train // task.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{n_train} training examples < batch {task.batch_size}.")
  total_steps = steps_per_epoch * epochs
  if schedule == "linear":
    lr = optax.linear_schedule(learning_rate, 0.0, total_steps)
  elif schedule == "constant":
    lr = learning_rate
  else:
    raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
  mom = None if name == "adam" else momentum
  tx = make_optimizer(name, lr, **({} if mom is None else {"momentum": mom}),
                      **options)
  key = jax.random.PRNGKey(seed)
  params = task.model.init(key, task.x_train[:1])["params"]
  # Fresh buffers for every leaf: an init may hand out one array twice,
  # which the donating step below cannot take.
  opt_state = jax.tree.map(jnp.copy, tx.init(params))
  record: dict[str, Any] = {
      "optimizer": name, "label": LABELS[name],
      "statistics": STATISTICS[name],
      "hyperparameters": {"learning_rate": learning_rate, "schedule": schedule,
                          "momentum": mom, **options},
      "epochs_requested": epochs, "steps_per_epoch": steps_per_epoch,
      "train_examples": n_train, "batch_size": task.batch_size, "seed": seed,
      "param_bytes": tree_bytes(params), "state_bytes": tree_bytes(opt_state),
      "cosine_of": cosine_of(tx, params),
      # Other processes on the machine skew times: the 1-minute load average.
      "loadavg_start": os.getloadavg()[0],
  }
  step = make_train_step(task, tx, STATISTICS[name], mom)
  evaluate = make_eval(task)
  x0, y0 = task.x_train[:task.batch_size], task.y_train[:task.batch_size]
  t0 = time.perf_counter()
  step = step.lower(params, opt_state, x0, y0).compile()
  record["compile_time_s"] = time.perf_counter() - t0

  rng = np.random.default_rng(seed)
  epochs_log, step_times, train_time = [], [], 0.0
  diverged = False
  bar = tqdm(total=total_steps, desc=desc or LABELS[name], disable=not progress,
             leave=True, dynamic_ncols=True, mininterval=1.0,
             file=sys.stderr)
  for epoch in range(1, epochs + 1):
    order = rng.permutation(n_train)
    losses, metric_sums, coss = [], {}, []
    t_epoch = time.perf_counter()
    for i in range(steps_per_epoch):
      idx = order[i * task.batch_size:(i + 1) * task.batch_size]
      x, y = task.x_train[idx], task.y_train[idx]
      ts = time.perf_counter()
      params, opt_state, loss, metrics, cos = step(params, opt_state, x, y)
      loss = float(loss)  # waits for the step
      step_times.append(time.perf_counter() - ts)
      losses.append(loss)
      coss.append(float(cos))
      for k, v in metrics.items():
        metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
      bar.update(1)
      if i % 10 == 0:
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
      if not math.isfinite(loss):
        diverged = True
        break
    epoch_time = time.perf_counter() - t_epoch
    train_time += epoch_time
    entry = {"epoch": epoch, "epoch_time_s": epoch_time,
             "train_time_s": train_time,
             "train_loss": float(np.mean(losses)),
             "cosine": float(np.mean(coss)) if coss else None}
    for k, v in metric_sums.items():
      entry[f"train_{k}"] = v / len(losses)
    if reference is not None:
      entry["ref_step_s"] = reference()
    if diverged:
      entry["diverged"] = True
      epochs_log.append(entry)
      break
    for split, (xs, ys) in eval_sets.items():
      for k, v in evaluate(params, xs, ys).items():
        entry[f"{split}_{k}"] = v
    bar.set_postfix({f"{s}_loss": f"{entry[f'{s}_loss']:.4g}"
                     for s in eval_sets}, refresh=True)
    epochs_log.append(entry)
  bar.close()
  all_cos = [e["cosine"] for e in epochs_log if e["cosine"] is not None
             and math.isfinite(e["cosine"])]
  refs = [e["ref_step_s"] for e in epochs_log if "ref_step_s" in e]
  if refs and step_times:
    record["ref_step_s"] = statistics.median(refs)
    record["step_ratio_vs_sgd"] = (statistics.median(step_times) /
                                   record["ref_step_s"])
  record.update({
      "epochs": epochs_log, "diverged": diverged, "wall_time_s": train_time,
      # The first step after compilation can be slower (allocation): median.
      "median_step_s": statistics.median(step_times) if step_times else None,
      "time_per_epoch_s": train_time / max(len(epochs_log), 1),
      "cosine_mean": float(np.mean(all_cos)) if all_cos else None,
      "loadavg_end": os.getloadavg()[0],
  })
  return record


def make_reference(task: Task, seed: int = 0, steps: int = 5):
  """A timer of ``steps`` SGD-with-momentum steps of ``task``'s model.

  Returns ``measure() -> median seconds per step``. The reference trains with
  learning rate 0 on one fixed batch (its parameters never change), through
  the same jitted step as every run, so its time tracks the machine's load.
  """
  tx = optax.sgd(0.0, momentum=0.9)
  params = task.model.init(jax.random.PRNGKey(seed), task.x_train[:1])["params"]
  state = {"params": params, "opt": jax.tree.map(jnp.copy, tx.init(params))}
  x, y = task.x_train[:task.batch_size], task.y_train[:task.batch_size]
  step = make_train_step(task, tx, None, 0.9).lower(
      state["params"], state["opt"], x, y).compile()

  def measure() -> float:
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state["params"], state["opt"], loss, _, _ = step(state["params"],
                                                       state["opt"], x, y)
      float(loss)
      times.append(time.perf_counter() - t)
    return statistics.median(times)

  measure()  # warm-up
  return measure


def adjusted_times(rec: dict[str, Any], ref: float | None) -> list[float]:
  """Cumulative training time per epoch, rescaled epoch by epoch to a common
  SGD reference step time ``ref`` (``epoch_time * ref / ref_step_s``): the
  time the run would have taken at the machine load of the reference."""
  out, total = [], 0.0
  for e in rec["epochs"]:
    scale = ref / e["ref_step_s"] if ref and e.get("ref_step_s") else 1.0
    total += e["epoch_time_s"] * scale
    out.append(total)
  return out


def common_reference(runs: dict[str, dict[str, Any]]) -> float | None:
  refs = [r["ref_step_s"] for r in runs.values() if r.get("ref_step_s")]
  return statistics.median(refs) if refs else None


def sweep_grid(center: float, factors: Sequence[float] = (1 / 3, 1.0, 3.0)):
  return [float(f"{center * f:.3g}") for f in factors]


def lr_sweep(task: Task, names: Sequence[str], centers: dict[str, float], *,
             epochs: int, subset: int, validation: int, seed: int,
             options: dict[str, dict[str, Any]] | None = None,
             factors: Sequence[float] = (1 / 3, 1.0, 3.0), extend: int = 2,
             schedule: str = "linear", momentum: float = 0.9,
             progress: bool = True) -> dict[str, Any]:
  """A short learning-rate sweep: ``centers[name] * factors`` for each name.

  Each value trains ``epochs`` epochs (with ``schedule`` over those epochs: a
  linear decay to 0 by default, like the full runs, so that a short sweep
  ranks the values the way a long run does) on the first
  ``subset`` training examples and is scored by the loss on the last
  ``validation`` training examples (disjoint from the subset; the test set is
  never used). The value with the lowest final validation loss is chosen; a
  run that diverges scores +inf. When the best value is at an end of the grid,
  the grid is extended by one more factor-of-``factors[1]/factors[0]`` step in
  that direction, at most ``extend`` times.
  """
  options = options or {}
  if subset + validation > len(task.x_train):
    raise ValueError("subset + validation exceed the training set.")
  val = (task.x_train[-validation:], task.y_train[-validation:])
  sub = task.subset(subset)
  ratio = factors[1] / factors[0]
  out = {"epochs": epochs, "subset": subset, "validation": validation,
         "seed": seed, "factors": list(factors), "extend": extend,
         "schedule": schedule,
         "selected_by": "lowest validation loss (last `validation` training "
         "examples) after the sweep epochs", "optimizers": {}}

  def score(name, lr):
    rec = train(sub, name, lr, epochs, seed, momentum=momentum,
                schedule=schedule, options=options.get(name),
                eval_sets={"val": val},
                progress=progress, desc=f"sweep {LABELS[name]} lr={lr:g}")
    last = rec["epochs"][-1]
    val_loss = last.get("val_loss", math.inf)
    if rec["diverged"] or not math.isfinite(val_loss):
      val_loss = math.inf
    return {"learning_rate": lr, "val_loss": val_loss,
            "train_loss": last["train_loss"], "diverged": rec["diverged"],
            "time_per_epoch_s": rec["time_per_epoch_s"]}

  for name in names:
    results = [score(name, lr) for lr in sweep_grid(centers[name], factors)]
    for _ in range(extend):
      results.sort(key=lambda r: r["learning_rate"])
      best = min(range(len(results)), key=lambda i: results[i]["val_loss"])
      if not math.isfinite(results[best]["val_loss"]):
        break
      if best == 0:
        lr = results[0]["learning_rate"] / ratio
      elif best == len(results) - 1:
        lr = results[-1]["learning_rate"] * ratio
      else:
        break
      results.append(score(name, float(f"{lr:.3g}")))
    results.sort(key=lambda r: r["learning_rate"])
    chosen = min(results, key=lambda r: r["val_loss"])
    out["optimizers"][name] = {"center": centers[name], "results": results,
                               "chosen": chosen["learning_rate"]}
  return out


def environment() -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
                   else None,
                   "flax": flax.__version__, "optax": optax.__version__,
                   "eva_optax": eva_optax.__version__,
                   "numpy": np.__version__},
      "device": {"platform": dev.platform, "kind": dev.device_kind,
                 "count": jax.device_count(), "cpu_count": os.cpu_count(),
                 "machine": platform.machine(), "processor": platform.processor()},
  }


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def write_json(path: str, record: dict[str, Any]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1, default=_json_default, allow_nan=True)
  return path


def plot(path: str, runs: dict[str, dict[str, Any]], title: str,
         log_scale: bool = False) -> str:
  """Two panels: test loss against epoch and against training wall-clock time."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  ref = common_reference(runs)
  for name, rec in runs.items():
    times = adjusted_times(rec, ref)
    ep = [(e, t) for e, t in zip(rec["epochs"], times) if "test_loss" in e]
    if not ep:
      continue
    style = "-" if name in ("eva", "eva_f", "eva_s") else "--"
    kw = dict(label=rec["label"], linestyle=style, marker="o", markersize=3)
    axes[0].plot([e["epoch"] for e, _ in ep], [e["test_loss"] for e, _ in ep],
                 **kw)
    axes[1].plot([t for _, t in ep], [e["test_loss"] for e, _ in ep], **kw)
  axes[0].set_xlabel("epoch")
  axes[1].set_xlabel("training wall-clock time (s)" + (
      ", load-adjusted" if ref else ""))
  for ax in axes:
    ax.set_ylabel("test loss")
    if log_scale:
      ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
  if any(ax.get_lines() for ax in axes):
    axes[1].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def time_to_reach(rec: dict[str, Any], target: float,
                  times: Sequence[float] | None = None) -> float | None:
  """Training time at the end of the first epoch whose test loss <= target
  (``times``: per-epoch cumulative times to use instead of the raw ones)."""
  if times is None:
    times = [e["train_time_s"] for e in rec["epochs"]]
  for e, t in zip(rec["epochs"], times):
    if e.get("test_loss", math.inf) <= target:
      return t
  return None


def markdown_table(runs: dict[str, dict[str, Any]],
                   reference: str = "sgd") -> str:
  """Optimizer, final test loss (and accuracy), time per epoch, step time
  against SGD's measured alongside, time to reach the reference's final test
  loss (raw and load-adjusted) and the epoch that reaches it, state size,
  mean cosine."""
  has_acc = any("test_accuracy" in e for r in runs.values()
                for e in r["epochs"])
  ref = runs.get(reference)
  target = None
  if ref and ref["epochs"] and "test_loss" in ref["epochs"][-1]:
    target = ref["epochs"][-1]["test_loss"]
  ref_step = common_reference(runs)
  ref_label = LABELS.get(reference, reference)
  head = ["optimizer", "final test loss"]
  if has_acc:
    head.append("test acc.")
  head += ["time/epoch (s)", "step / SGD step",
           f"time to {ref_label}'s final loss (s)", "same, load-adjusted (s)",
           "epoch reaching it", "state (MB)", "cosine"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---" for _ in head) + "|"]
  for name, rec in runs.items():
    last = rec["epochs"][-1] if rec["epochs"] else {}
    loss = last.get("test_loss")
    row = [rec["label"], "diverged" if rec["diverged"] else
           (f"{loss:.5f}" if loss is not None else "-")]
    if has_acc:
      acc = last.get("test_accuracy")
      row.append(f"{100 * acc:.2f}%" if acc is not None else "-")
    row.append(f"{rec['time_per_epoch_s']:.1f}")
    ratio = rec.get("step_ratio_vs_sgd")
    row.append(f"{ratio:.2f}" if ratio else "-")

    def reach(times, fmt):
      if target is None or times is None:
        return "-"
      t = time_to_reach(rec, target, times)
      return "not reached" if t is None else fmt.format(t)

    row += [reach([e["train_time_s"] for e in rec["epochs"]], "{:.1f}"),
            reach(adjusted_times(rec, ref_step) if ref_step else None, "{:.1f}"),
            reach([e["epoch"] for e in rec["epochs"]], "{:d}")]
    row.append(f"{rec['state_bytes'] / 2**20:.2f}")
    cos = rec.get("cosine_mean")
    row.append("-" if name == "sgd" or cos is None else
               f"{cos:.3f}" + ("" if rec["cosine_of"].startswith("precond")
                               else "*"))
    lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  lines.append(
      "Times exclude compilation and evaluation. step / SGD step: the run's "
      "median step time over the median time of SGD steps timed alongside it "
      "(after every epoch), which cancels the load of a shared machine; "
      "load-adjusted: each epoch's time rescaled to the common SGD reference "
      "step; the epoch count does not depend on the load. cosine: mean over steps of cos(P(g), g) over all parameters "
      "(P(g) read off the momentum buffer: before momentum and lr); * = "
      "cos(update, g) for optimizers without a momentum trace (Adam).")
  return "\n".join(lines)


def add_common_args(parser, name: str, default_lrs: dict[str, float]):
  """The command-line flags shared by the examples."""
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                      help="comma-separated list from " + ",".join(OPTIMIZERS))
  parser.add_argument("--epochs", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join("results", name),
                      help="directory for the JSON and PNG")
  parser.add_argument("--train-subset", type=int, default=None,
                      help="train on the first N training examples only")
  parser.add_argument("--sweep", action=argparse.BooleanOptionalAction,
                      default=False,
                      help="run the short learning-rate sweep first and "
                      "train with the chosen values")
  parser.add_argument("--sweep-epochs", type=int, default=2)
  parser.add_argument("--sweep-subset", type=int, default=20000)
  parser.add_argument("--sweep-validation", type=int, default=5000)
  parser.add_argument("--schedule", choices=("constant", "linear"),
                      default="linear",
                      help="learning-rate schedule (default: linear decay to "
                      "0 over the run, as the authors)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--append", action="store_true",
                      help="add these runs to the JSON already in --out "
                      "(replacing runs of the same optimizers) and redraw")
  for opt in OPTIMIZERS:
    parser.add_argument(f"--lr-{opt.replace('_', '-')}", type=float,
                        dest=f"lr_{opt}", default=default_lrs[opt],
                        help=f"{LABELS[opt]} learning rate "
                        f"(default {default_lrs[opt]})")


def add_data_args(parser, batch_size: int):
  """``--data-dir``, ``--download`` and ``--batch-size`` (the Fashion-MNIST
  examples; see ``datasets.load_fashion_mnist``)."""
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--download", action="store_true")
  parser.add_argument("--batch-size", type=int, default=batch_size)


def parse_optimizers(text: str) -> list[str]:
  names = [s.strip() for s in text.split(",") if s.strip()]
  bad = [n for n in names if n not in OPTIMIZERS]
  if bad:
    raise SystemExit(f"unknown optimizer(s) {bad}; choose from {OPTIMIZERS}")
  return names


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
  """``new``'s runs added to (or replacing) those of the ``old`` record.

  The earlier record's configuration is kept under ``config`` and the new
  one is listed in ``appended``; each run keeps its own hyperparameters,
  ``finished_at`` and load averages, and the sweep results are merged per
  optimizer.
  """
  runs = {**old.get("runs", {}), **new["runs"]}
  runs = {n: runs[n] for n in OPTIMIZERS if n in runs}
  merged = dict(old)
  merged["runs"] = runs
  for key in ("learning_rates", "options"):
    merged[key] = {n: {**old.get(key, {}), **new[key]}[n] for n in runs}
  if new.get("sweep"):
    sweep = old.get("sweep") or {k: v for k, v in new["sweep"].items()
                                 if k != "optimizers"}
    sweep = dict(sweep)
    sweep["optimizers"] = {**sweep.get("optimizers", {}),
                           **new["sweep"]["optimizers"]}
    merged["sweep"] = sweep
  merged["appended"] = old.get("appended", []) + [
      {"optimizers": list(new["runs"]), "config": new["config"],
       "versions": new["versions"], "device": new["device"]}]
  return merged


def run_comparison(task: Task, args, *, title: str,
                   options: dict[str, dict[str, Any]],
                   notes: dict[str, Any] | None = None,
                   file_stem: str | None = None,
                   sweep_centers: dict[str, float] | None = None
                   ) -> dict[str, Any]:
  """Sweep (optional), train every optimizer, write JSON and PNG, print table.

  ``args`` are the flags of :func:`add_common_args`. The learning rates are
  the ``--lr-*`` flags, or with ``--sweep`` the values the sweep chooses
  around ``sweep_centers`` (default: the ``--lr-*`` flags). The JSON and PNG
  are rewritten after every run.
  """
  names = parse_optimizers(args.optimizers)
  missing = [n for n in names if not available(n)]
  if missing:
    print(f"Skipping {missing}: not in eva_optax {eva_optax.__version__}.")
    names = [n for n in names if n not in missing]
  lrs = {n: getattr(args, f"lr_{n}") for n in OPTIMIZERS}
  full_task = task
  task = task.subset(args.train_subset)
  sweep = None
  if args.sweep:
    centers = {**lrs, **(sweep_centers or {})}
    sweep = lr_sweep(full_task, names, centers, epochs=args.sweep_epochs,
                     subset=args.sweep_subset,
                     validation=args.sweep_validation, seed=args.seed,
                     schedule=args.schedule, options=options,
                     progress=not args.no_progress)
    for n, s in sweep["optimizers"].items():
      lrs[n] = s["chosen"]
    print("Sweep (validation loss per learning rate):")
    for n, s in sweep["optimizers"].items():
      vals = ", ".join(f"{r['learning_rate']:g}: {r['val_loss']:.5g}"
                       for r in s["results"])
      print(f"  {LABELS[n]:8s} {vals}  -> {s['chosen']:g}")
  stem = file_stem or task.name
  json_file = os.path.join(args.out, f"{stem}.json")
  png_file = os.path.join(args.out, f"{stem}.png")
  previous = None
  if getattr(args, "append", False) and os.path.exists(json_file):
    with open(json_file) as f:
      previous = json.load(f)

  def save(runs):
    record = {"task": task.name, "title": title, "notes": notes or {},
              "config": {k: v for k, v in vars(args).items()},
              "learning_rates": {n: lrs[n] for n in runs},
              "options": {n: options.get(n, {}) for n in runs},
              "sweep": sweep, **environment(), "runs": runs}
    if previous is not None:
      record = _merge(previous, record)
    record["table"] = markdown_table(record["runs"])
    write_json(json_file, record)
    plot(png_file, record["runs"], title, log_scale=task.log_scale)
    return record

  # The JSON and the PNG are rewritten after every run, so that an
  # interrupted comparison keeps what it has finished.
  runs = {}
  if sweep is not None:
    save(runs)
  reference = make_reference(task, args.seed)
  for n in names:
    runs[n] = train(task, n, lrs[n], args.epochs, args.seed,
                    schedule=args.schedule, options=options.get(n),
                    progress=not args.no_progress, reference=reference)
    runs[n]["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    record = save(runs)
  if not runs:
    record = save(runs)
  table, json_path, png_path = record["table"], json_file, png_file
  print()
  print(table)
  print()
  print(f"JSON: {json_path}")
  print(f"PNG:  {png_path}")
  record["paths"] = {"json": json_path, "png": png_path}
  return record
