"""Grafting: a preconditioned direction with another optimizer's step size.

Eva-s and Shampoo precondition each tensor, then *graft* (Agarwal et al.): the
update of a tensor is its preconditioned direction ``P / |P|_F`` scaled to the
Frobenius norm of the step that a simple first-order optimizer, the *graft*,
would take on that tensor. The tensors that are not preconditioned (biases,
norms) get the graft's step itself. The choices, as distributed Shampoo offers
them:

* ``"sgd"``: the gradient, ``|T|_F`` (the Eva paper's setting; no state);
* ``"adagrad"``: ``T / (sqrt(sum_t T_t^2) + eps)`` (an AdaGrad accumulator per
  parameter in the state);
* ``"rmsprop"``: ``T / (sqrt(nu_t / (1 - beta^t)) + eps)`` with
  ``nu_t = beta nu_{t-1} + (1 - beta) T_t^2``: Adam's bias-corrected second
  moment, without the first (an accumulator per parameter in the state).

The accumulators are kept as their square roots (the running root sum of
squares, the running RMS), updated by a max-abs-rescaled ``hypot``, so that
gradients up to float32's largest never overflow them.

Why it matters: SGD grafting gives each tensor the step size of SGD, so the
learning rate must suit SGD on the problem (on Rosenbrock, whose curvature is
about 1000, heavy-ball SGD with momentum 0.9 is only stable below
``lr = 2 (1 + 0.9) / 1000 = 3.8e-3``, and it diverges at 1e-2); AdaGrad and
RMSProp grafting give steps whose size is about ``lr`` per coordinate, whatever
the curvature, and are the usual choice for Shampoo at Adam-like learning
rates.

References:
  Agarwal, Anil, Hazan, Koren and Zhang, `Disentangling Adaptive Gradient
  Methods from Learning Rates <https://arxiv.org/abs/2002.11803>`_, 2020;
  Anil et al., `Scalable Second Order Optimization for Deep Learning
  <https://arxiv.org/abs/2002.09018>`_, 2020 (distributed Shampoo's grafting).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from eva_optax._src.preconditioner import validation

Array = jax.Array
GRAFTS = ("sgd", "adagrad", "rmsprop")


def check(graft: str, graft_decay: Any, graft_eps: Any) -> str:
  """Eager checks of the graft options (numbers only; arrays at run time)."""
  validation.check_choice("graft", graft, GRAFTS)
  validation.check_unit_interval(
      "graft_decay", graft_decay,
      fix="It is RMSProp's beta (the weight of the OLD second moment), e.g. 0.999.")
  validation.check_nonnegative(
      "graft_eps", graft_eps,
      fix="It is added to the root of the second moment, e.g. 1e-8.")
  validation.check_not_schedule("graft_decay", graft_decay)
  validation.check_not_schedule("graft_eps", graft_eps)
  return graft


def valid(graft: str, graft_decay: Any, graft_eps: Any) -> Array:
  """Run time: whether injected graft options are in range."""
  if graft == "sgd":
    return jnp.asarray(True)
  eps = jnp.asarray(graft_eps, jnp.float32)
  ok = jnp.logical_and(jnp.isfinite(eps), eps >= 0)
  if graft == "rmsprop":
    decay = jnp.asarray(graft_decay, jnp.float32)
    ok = ok & (decay >= 0) & (decay < 1)
  return ok


def init(graft: str, leaf: Any) -> Array | None:
  """The accumulator of one parameter (float32 zeros), or None for SGD."""
  if graft == "sgd":
    return None
  return jnp.zeros(jnp.shape(leaf), jnp.float32)


def _hypot(a: Array, b: Array, wa: Any, wb: Any) -> Array:
  """``sqrt(wa a^2 + wb b^2)`` elementwise, without overflow or underflow."""
  m = jnp.maximum(jnp.abs(a), jnp.abs(b))
  safe = jnp.where(m > 0, m, 1.0)
  return m * jnp.sqrt(wa * jnp.square(a / safe) + wb * jnp.square(b / safe))


def step(graft: str, t: Array, acc: Array | None, count: Array, graft_decay: Any,
         graft_eps: Any) -> tuple[Array, Array | None]:
  """The graft's step on the float32 gradient ``t`` and its new accumulator.

  ``count`` is the number of accumulated steps before this one (RMSProp's bias
  correction uses ``count + 1``).
  """
  if graft == "sgd":
    return t, acc
  eps = jnp.asarray(graft_eps, jnp.float32)
  if graft == "adagrad":
    rss = _hypot(acc, t, 1.0, 1.0)
    return t / (rss + eps), rss
  beta = jnp.asarray(graft_decay, jnp.float32)
  rms = _hypot(acc, t, beta, 1.0 - beta)
  correction = 1.0 - beta ** (count.astype(jnp.float32) + 1.0)
  return t / (rms / jnp.sqrt(correction) + eps), rms


def norm(x: Array) -> Array:
  """Frobenius norm by max-abs scaling (no overflow for any finite ``x``).

  The result overflows only if the norm itself exceeds float32's range.
  """
  m = jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)
  safe = jnp.where(m > 0, m, 1.0)
  return m * jnp.sqrt(jnp.sum(jnp.square(x / safe)))


def rescale(direction: Array, size: Array) -> Array:
  """``direction`` scaled to Frobenius norm ``size`` (zeros stay zeros).

  ``direction`` should already be of moderate scale (its max-abs near 1);
  the factor is applied in two steps so that neither overflows.
  """
  d = norm(direction)
  unit = direction / jnp.where(d > 0, d, 1.0)
  return unit * size
