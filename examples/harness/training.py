"""One training run: a jitted step, per-epoch evaluation and the run's record.

:func:`train` builds the optax transformation and the gradient function the
optimizer needs (``eva_optax.value_and_grad`` with ``statistics="vectors"`` for
Eva and Eva-f, ``"factors"`` for K-FAC and FOOF; plain ``jax.value_and_grad``
for the others), trains with one jitted step (gradients -> ``tx.update`` ->
``optax.apply_updates``) and records:

* per epoch: train loss (the mean of the step losses of the epoch), test loss,
  accuracies where the task has labels, cumulative training time;
* wall time (training only: evaluation and compilation excluded), compile
  time, median step time, and, after every epoch, the median time of a few
  SGD steps of the same model timed alongside (:func:`make_reference`): on a
  shared machine the load changes from run to run, and the ratio to this
  reference (``step_ratio_vs_sgd``) and the load-adjusted times cancel it;
* optimizer-state bytes (the sum of ``nbytes`` over the ``opt_state`` leaves)
  and the compiled step's own memory figures
  (``jax.stages.Compiled.memory_analysis()``: arguments, outputs, temporaries,
  peak);
* the mean cosine between the *preconditioned gradient* and the raw gradient,
  over all parameters flattened together. The preconditioned gradient
  ``d_t = P(g_t) (+ wd w)`` is read off the momentum buffer
  (``d_t = m_t - mu m_{t-1}`` of ``optax.trace``), so it is the direction
  before momentum and the learning rate; with zero weight decay (as in these
  examples) it is the preconditioner's output. Optimizers without an
  ``optax.trace`` (Adam) get the cosine of the whole update instead; the
  record says which (``cosine_of``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import eva_optax

from . import memory
from . import optimizers

LABELS = optimizers.LABELS
STATISTICS = optimizers.STATISTICS


@dataclasses.dataclass
class Task:
  """A model, its loss and its data.

  ``loss_and_metrics(outputs, x, y)`` returns the mean loss over the batch and a
  dict of per-batch *mean* metrics (e.g. ``{"accuracy": ...}``; empty for the
  autoencoder). ``loss_name`` names the loss on the figures' y axes (e.g.
  ``"MSE (mean over pixels)"``).
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
  loss_name: str = "loss"

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


def cosine(a, b) -> jax.Array:
  """cos(a, b) over whole trees: ``<a, b> / (|a| |b|)``.

  One pass over the data in the usual case. Only when a squared norm leaves
  [1e-15, 1e15], where ``|a|^2 |b|^2`` or the squares themselves could under-
  or overflow float32 (late in training, or a run that blows up), are both
  trees first divided by their largest magnitude, inside
  :func:`jax.lax.cond` so that the usual step pays nothing.
  """
  def cos(ab, aa, bb):
    return ab / jnp.sqrt(aa * bb + 1e-30)

  def unit_max(tree):
    m = optax.tree.norm(tree, ord="inf")
    m = jnp.where(jnp.isfinite(m) & (m > 0), m, 1.0)
    return jax.tree.map(lambda x: x / m, tree)

  def rescaled(a, b):
    a, b = unit_max(a), unit_max(b)
    return cos(optax.tree.vdot(a, b), optax.tree.norm(a, squared=True),
               optax.tree.norm(b, squared=True))

  a, b = optax.tree.cast(a, jnp.float32), optax.tree.cast(b, jnp.float32)
  ab = optax.tree.vdot(a, b)
  aa, bb = optax.tree.norm(a, squared=True), optax.tree.norm(b, squared=True)
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
    cos = cosine(direction, grads)
    params = optax.apply_updates(params, updates)
    return params, new_state, loss, metrics, cos

  return jax.jit(step, donate_argnums=(0, 1))


def cosine_of(tx: optax.GradientTransformation, params) -> str:
  """Which cosine the record holds for ``tx`` (see the module docstring)."""
  n = len(_traces(jax.eval_shape(tx.init, params)))
  return ("preconditioned gradient (before momentum) vs gradient" if n == 1
          else "update vs gradient")


def make_eval(task: Task):
  """``evaluate(params, x, y) -> {"loss": ..., metric: ...}``, means over x."""
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
  """Bytes of all leaves of ``tree``."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def _schedule(kind: str, learning_rate: float, total_steps: int):
  if kind == "linear":
    return optax.linear_schedule(learning_rate, 0.0, total_steps)
  if kind == "constant":
    return learning_rate
  raise ValueError(f"schedule must be 'constant' or 'linear', got {kind!r}")


def train(task: Task, name: str, learning_rate: float, epochs: int, seed: int,
          *, momentum: float = 0.9, schedule: str = "constant",
          options: dict[str, Any] | None = None, eval_sets=None,
          progress: bool = True, desc: str | None = None,
          reference: Callable[[], float] | None = None) -> dict[str, Any]:
  """Trains ``task`` with optimizer ``name`` and returns the run's record.

  Args:
    task: model, loss and data.
    name: optimizer name (:data:`harness.optimizers.OPTIMIZERS`).
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

  Returns:
    The run's record (a JSON-ready dict; see the module docstring).
  """
  options = dict(options or {})
  eval_sets = eval_sets or {"test": (task.x_test, task.y_test)}
  n_train = len(task.x_train)
  steps_per_epoch = n_train // task.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{n_train} training examples < batch {task.batch_size}.")
  total_steps = steps_per_epoch * epochs
  lr = _schedule(schedule, learning_rate, total_steps)
  mom = None if name == "adam" else momentum
  tx = optimizers.make_optimizer(
      name, lr, **({} if mom is None else {"momentum": mom}), **options)
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
  record["step_memory_bytes"] = memory.memory_figures(step)

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
