"""The rows of the time-to-quality table: their settings, optimizers and steps.

A row is an optimizer at a fixed learning rate (``sgd``, ``adam`` and every
preconditioner's alias: momentum 0.9 but for Adam, linear decay to 0, the rate
from a short sweep) or ``<direction>+adaptive``: ``eva_optax.adaptive`` around
``scale_by_<direction>`` or around the plain gradient (``gradient+adaptive``),
with no learning rate to tune.

The settings that make a row cheaper (:class:`RowConfig`) are chosen per row
on the command line (``--stats-batch 250`` for every row that takes it,
``--stats-batch foof+adaptive=250`` for one row):

* ``stats_batch``: the curvature statistics from the first ``m`` examples of
  the batch, the gradient from all of them
  (``eva_optax.value_and_grad(..., stats_batch=m)``; Eva, Eva-f, K-FAC, FOOF);
* ``curvature_batch``: the adaptive rows' curvature products on the first
  ``m`` examples;
* ``adapt_every``: the adaptive rows' Levenberg-Marquardt period;
* ``inverse_every``: K-FAC's, FOOF's and Shampoo's inverse refresh period;
* ``stats_every``: statistics every this many steps (the preconditioners).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

import eva_optax

from . import ttq_task

PRECONDITIONERS = ("eva", "eva_f", "eva_s", "kfac", "foof", "shampoo")
FIXED = ("sgd", "adam") + PRECONDITIONERS
ADAPTIVE = ("gradient",) + PRECONDITIONERS
ALL_ROWS = FIXED + tuple(f"{n}+adaptive" for n in ADAPTIVE)
# The statistics eva_optax.value_and_grad captures for each preconditioner
# (Eva-s and Shampoo read the gradient itself).
STATISTICS = {"eva": "vectors", "eva_f": "vectors", "kfac": "factors",
              "foof": "factors"}
REFRESH = ("kfac", "foof", "shampoo")   # take inverse_every
SETTINGS = ("stats_batch", "curvature_batch", "adapt_every", "inverse_every",
            "stats_every")
# What each setting is when the command line does not say (None for a batch:
# the whole batch; inverse_every: the task's own, 10).
DEFAULTS = {"stats_batch": None, "curvature_batch": None, "adapt_every": 5,
            "inverse_every": None, "stats_every": 1}


def stats_batch_supported() -> bool:
  """Whether this eva_optax's ``value_and_grad`` takes ``stats_batch=``."""
  return "stats_batch" in inspect.signature(
      eva_optax.value_and_grad).parameters


@dataclasses.dataclass(frozen=True)
class RowConfig:
  """One row and its settings; a setting a row does not use is None."""

  row: str
  stats_batch: int | None = None
  curvature_batch: int | None = None
  adapt_every: int | None = None
  inverse_every: int | None = None
  stats_every: int | None = None

  @property
  def name(self) -> str:
    """The optimizer or direction: ``"foof"`` for ``"foof+adaptive"``."""
    return self.row.partition("+")[0]

  @property
  def adaptive(self) -> bool:
    return self.row.endswith("+adaptive")

  @property
  def statistics(self) -> str | None:
    return STATISTICS.get(self.name)

  @property
  def period(self) -> int:
    """Steps after which the row's work repeats (refreshes, adaptations,
    captures): a timing window of a multiple of it holds its share of each."""
    every = [v for v in (self.inverse_every, self.adapt_every,
                         self.stats_every) if v]
    return math.lcm(*every) if every else 1

  def settings(self) -> dict[str, Any]:
    """The settings this row uses (for the record and the log)."""
    return {k: getattr(self, k) for k in SETTINGS
            if applies(self.row, k)}

  def short(self) -> str:
    """``stats_batch=all adapt_every=5``: the settings, for logs and tables."""
    return " ".join(f"{k}={show(k, v)}" for k, v in self.settings().items())


def show(setting: str, value: int | None) -> str:
  """A setting's value in words: None is the whole batch, or no adaptation."""
  if value is None:
    return "all" if setting.endswith("batch") else "none"
  return str(value)


def applies(row: str, setting: str) -> bool:
  """Whether ``row`` uses ``setting``."""
  name, _, mode = row.partition("+")
  if setting == "stats_batch":
    return name in STATISTICS
  if setting in ("curvature_batch", "adapt_every"):
    return mode == "adaptive"
  if setting == "inverse_every":
    return name in REFRESH
  return name in PRECONDITIONERS      # stats_every


def config(row: str, settings: dict[str, dict[str, Any]],
           task: ttq_task.Task) -> RowConfig:
  """``row``'s :class:`RowConfig` from the per-row ``settings`` of the command
  line (``{setting: {"*": all rows, row: this row}}``)."""
  values = {}
  for k in SETTINGS:
    if not applies(row, k):
      continue
    given = settings.get(k, {})
    default = task.inverse_every if k == "inverse_every" else DEFAULTS[k]
    v = given.get(row, given.get("*", default))
    if k in ("stats_batch", "curvature_batch") and v is not None:
      v = None if v >= task.batch else v   # the whole batch
    values[k] = v
  return RowConfig(row, **values)


def _accepted(fn, options: dict[str, Any]) -> dict[str, Any]:
  params = inspect.signature(fn).parameters
  return {k: v for k, v in options.items() if k in params}


def direction(cfg: RowConfig, task: ttq_task.Task,
              damping: float) -> optax.GradientTransformation:
  """The adaptive row's direction: a preconditioner alone, or the gradient.

  Built with ``optax.inject_hyperparams`` (every argument but ``damping``
  static) so that ``adaptive`` can move its damping with ``lambda``.
  """
  if cfg.name == "gradient":
    return optax.identity()
  factory = getattr(eva_optax, f"scale_by_{cfg.name}")
  kw: dict[str, Any] = {} if cfg.name == "shampoo" else {"damping": damping}
  if cfg.inverse_every:
    kw["inverse_every"] = cfg.inverse_every
  if cfg.stats_every and cfg.stats_every > 1:
    kw["stats_every"] = cfg.stats_every
  kw.update(_accepted(factory, task.options))
  static = tuple(k for k in kw if k != "damping")
  return optax.inject_hyperparams(factory, static_args=static)(**kw)


def optimizer(cfg: RowConfig, task: ttq_task.Task, args
              ) -> optax.GradientTransformation:
  """The row's transformation.

  Fixed rows take their peak learning rate as an ``inject_hyperparams``
  hyperparameter (``peak``): the sweep and the run share one compiled step.
  """
  if cfg.adaptive:
    return eva_optax.adaptive(
        direction(cfg, task, args.direction_damping), loss=task.adaptive_loss,
        initial_damping=args.initial_damping, adapt_every=cfg.adapt_every,
        couple_damping=args.couple_damping)
  total = task.total_steps
  name = cfg.name

  def make(peak):
    schedule = lambda count: peak * jnp.maximum(0.0, 1.0 - count / total)
    if name == "sgd":
      return optax.sgd(schedule, momentum=0.9)
    if name == "adam":
      return optax.adam(schedule)
    factory = getattr(eva_optax, name)
    kw = {"inverse_every": cfg.inverse_every} if cfg.inverse_every else {}
    if cfg.stats_every and cfg.stats_every > 1:
      kw["stats_every"] = cfg.stats_every
    kw.update(_accepted(factory, task.options))
    return factory(schedule, momentum=0.9, **kw)

  return optax.inject_hyperparams(make)(peak=1.0)


def gradient_fn(task: ttq_task.Task, cfg: RowConfig):
  """``(params, *batch) -> (loss, grads[, stats])`` for the row."""
  if not cfg.statistics:
    return jax.value_and_grad(task.loss_fn)
  kw = {} if cfg.stats_batch is None else {"stats_batch": cfg.stats_batch}
  return eva_optax.value_and_grad(task.loss_fn, statistics=cfg.statistics,
                                  **kw)


def make_step(task: ttq_task.Task, tx: optax.GradientTransformation,
              cfg: RowConfig, capture: bool = True):
  """A jitted ``step(params, state, data, i) -> (params, state, loss)`` on
  batch ``i`` of ``data`` (an argument, not a constant baked into the
  program: XLA would fold it); params and state are donated.

  ``capture=False`` (steps where the preconditioner folds no statistics,
  ``stats_every > 1``) takes plain gradients and passes zero statistics of the
  right structure, which the preconditioner ignores on those steps.
  """
  grad_fn = gradient_fn(task, cfg)
  plain = jax.value_and_grad(task.loss_fn)

  def step(params, state, data, i):
    batch = task.batch_at(data, i)
    extra: dict[str, Any] = {}
    if cfg.statistics and capture:
      loss, grads, extra["stats"] = grad_fn(params, *batch)
    elif cfg.statistics:
      shapes = jax.eval_shape(grad_fn, params, *batch)[2]
      loss, grads = plain(params, *batch)
      extra["stats"] = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                    shapes)
    else:
      loss, grads = grad_fn(params, *batch)
    if cfg.adaptive:
      m = cfg.curvature_batch
      sub = batch if m is None else tuple(a[:m] for a in batch)
      extra.update(outputs_fn=lambda p: task.outputs_fn(p, *sub),
                   value_fn=lambda p: task.loss_fn(p, *batch), value=loss)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  return jax.jit(step, donate_argnums=(0, 1))
