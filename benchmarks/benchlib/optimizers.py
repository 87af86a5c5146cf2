"""The optimizers the benchmark times, and the gradient function each needs."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax
import optax

import eva_optax


@dataclasses.dataclass(frozen=True)
class OptSpec:
  name: str
  label: str
  factory: Callable[..., Any]          # (learning_rate, momentum, **options) -> tx
  statistics: str | None               # None: plain jax.value_and_grad
  period: int = 1                      # refresh period (inverse_every)
  eva_family: bool = True              # chain built by eva_optax.training_chain
  lr: float = 0.01
  requires: str = ""                   # eva_optax attribute it needs


def sgd(lr, momentum=0.9, **options):
  del options    # the preconditioners' options (layer views)
  return optax.sgd(lr, momentum=momentum or None)


def adam(lr, momentum=None, **options):
  del momentum, options
  return optax.adam(lr)


def _eo(name, **kw):
  def factory(lr, momentum=0.9, **options):
    fn = getattr(eva_optax, name)
    accepted = inspect.signature(fn).parameters
    return fn(lr, momentum=momentum, **kw,
              **{k: v for k, v in options.items() if k in accepted})
  return factory


OPTIMIZERS: tuple[OptSpec, ...] = (
    OptSpec("sgd", "SGD-momentum", sgd, None, eva_family=False),
    OptSpec("adam", "Adam", adam, None, eva_family=False, lr=1e-3),
    OptSpec("eva", "Eva", _eo("eva"), "vectors", requires="eva"),
    OptSpec("eva_f", "Eva-f", _eo("eva_f"), "vectors", requires="eva_f"),
    OptSpec("eva_s", "Eva-s", _eo("eva_s"), None, requires="eva_s"),
    OptSpec("kfac_1", "K-FAC (k=1)", _eo("kfac", inverse_every=1), "factors",
            requires="kfac"),
    OptSpec("kfac_10", "K-FAC (k=10)", _eo("kfac", inverse_every=10), "factors",
            period=10, requires="kfac"),
    OptSpec("foof_1", "FOOF (k=1)", _eo("foof", inverse_every=1), "factors",
            requires="foof"),
    OptSpec("foof_10", "FOOF (k=10)", _eo("foof", inverse_every=10), "factors",
            period=10, requires="foof"),
    OptSpec("shampoo_1", "Shampoo (k=1)", _eo("shampoo", inverse_every=1), None,
            requires="shampoo"),
    OptSpec("shampoo_10", "Shampoo (k=10)", _eo("shampoo", inverse_every=10),
            None, period=10, requires="shampoo"),
)
BY_NAME = {o.name: o for o in OPTIMIZERS}


def available(spec: OptSpec) -> bool:
  return not spec.requires or hasattr(eva_optax, spec.requires)


def stats_batch_supported() -> bool:
  """Whether this eva_optax's ``value_and_grad`` takes ``stats_batch=``."""
  return "stats_batch" in inspect.signature(
      eva_optax.value_and_grad).parameters


def gradient_fn(loss_fn, statistics_mode, stats_batch: int | None = None):
  """(params, x, y) -> (loss, grads, stats or None); ``stats_batch``: the
  statistics from the first ``stats_batch`` examples of the batch."""
  if statistics_mode is None:
    vg = jax.value_and_grad(loss_fn)

    def fn(params, x, y):
      loss, grads = vg(params, x, y)
      return loss, grads, None
    return fn
  kw = {} if stats_batch is None else {"stats_batch": stats_batch}
  return eva_optax.value_and_grad(loss_fn, statistics=statistics_mode, **kw)


def make_step(tx, loss_fn, statistics_mode, stats_batch: int | None = None):
  """The jitted full step; params and opt_state are donated."""
  grad_fn = gradient_fn(loss_fn, statistics_mode, stats_batch)

  def step(params, opt_state, x, y):
    loss, grads, stats = grad_fn(params, x, y)
    if stats is None:
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))
