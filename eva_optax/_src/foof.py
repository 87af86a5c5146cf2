"""FOOF: input-side (one-factor) preconditioning by eigendecomposition.

The gradient of each layer is preconditioned by the damped input factor only,

.. math::
  U = (A + \\gamma I)^{-1} \\hat G
    = Q_k\\,\\mathrm{diag}\\Big(\\frac{1}{d_k + \\gamma} - \\frac{1}{\\gamma}\\Big) Q_k^T \\hat G
      + \\frac{\\hat G}{\\gamma},

with ``A = Q diag(d) Q^T`` recomputed every ``inverse_every`` steps (the authors'
"residual" form; ``top_k`` keeps only the largest ``k`` eigenpairs, ``None`` keeps
all and is exact). Eigenvalues below 1e-10 are set to zero. State per layer:
``2 (d_in + 1)^2 + (d_in + 1)`` floats. Eva-f is its rank-one (vectorized) form.

References:
  Benzing, `Gradient Descent on Neurons and its Link to Approximate Second-order
  Optimization <https://arxiv.org/abs/2201.12250>`_, ICML 2022.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from eva_optax._src import layerwise
from eva_optax._src import linalg
from eva_optax._src import training_chain
from eva_optax._src import validation


def _refresh(s, gamma):
  del gamma
  d, q = linalg.symmetric_eig(s["A"])
  return {**s, "Q": q, "d": d}


def _solve(top_k):
  def solve(s, gm, gamma):
    d, q = s["d"], s["Q"]
    coeffs = q.T @ gm
    if top_k is None:   # all eigenpairs: Q diag(1 / (d + gamma)) Q^T G_hat
      return q @ (coeffs / (d + gamma)[:, None])
    # Eigenvalues ascend: keep the last top_k; the rest of G_hat gets 1/gamma.
    keep = (jnp.arange(d.shape[0]) >= d.shape[0] - top_k)[:, None]
    kept = jnp.where(keep, coeffs, 0.0)
    return q @ (kept / (d + gamma)[:, None]) + (gm - q @ kept) / gamma
  return solve


def _method(top_k):
  return layerwise.Method(
      name="foof", statistics="factors", stat_keys=("A",),
      solve=layerwise.on_stacked_view(_solve(top_k)),
      init_extra=lambda d_a, d_out: {
          "Q": jnp.zeros((d_a, d_a), jnp.float32),
          "d": jnp.zeros((d_a,), jnp.float32)},
      refresh=_refresh)


def scale_by_foof(
    damping: Any = 0.03,
    stat_decay: Any = 0.95,
    *,
    kl_clip: float | None = None,
    kl_normalize: bool = False,
    learning_rate: Any = None,
    stats_every: int = 1,
    inverse_every: int = 1,
    top_k: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """FOOF's preconditioning only; see :func:`eva_optax.foof`.

  Args:
    damping: ``gamma > 0``.
    stat_decay: weight of the NEW factor in the running average (0.95; the
      journal runs used 1, i.e. the latest factor only, with ``inverse_every=50``).
    kl_clip: ``kappa`` of the KL-clip (needs ``learning_rate``), or ``None``.
    kl_normalize: apply the journal KL-normalization instead.
    learning_rate: the optimizer's learning rate, for the KL-clip.
    stats_every: fold factors into the average every this many steps.
    inverse_every: recompute the eigendecomposition every this many steps.
    top_k: keep the ``top_k`` largest eigenpairs (``None``: all, exact).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes
    ``stats=`` from ``value_and_grad(..., statistics="factors")``.
  """
  if top_k is not None:
    validation.check_interval("top_k", top_k)
  return layerwise.layerwise_preconditioner(
      _method(top_k), damping=damping, stat_decay=stat_decay,
      stats_every=stats_every, refresh_every=inverse_every,
      scaling=training_chain.resolve_scaling(kl_clip, kl_normalize, "none"),
      kl_clip=kl_clip, learning_rate=learning_rate)


def foof(
    learning_rate: Any,
    momentum: Any = 0.9,
    weight_decay: Any = 0.0,
    damping: Any = 0.03,
    stat_decay: Any = 0.95,
    *,
    kl_clip: float | None = 0.001,
    kl_normalize: bool | None = None,
    stats_every: int = 1,
    inverse_every: int = 1,
    top_k: int | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """FOOF, trained the way the Eva journal paper trains it.

  ``chain(scale_by_foof, add_decayed_weights, trace(momentum),
  scale_by_learning_rate)`` with the KL-clip ``kappa = 0.001`` of the authors'
  FOOF runs. Needs ``statistics="factors"``.

  References:
    Benzing, `Gradient Descent on Neurons and its Link to Approximate
    Second-order Optimization <https://arxiv.org/abs/2201.12250>`_, ICML 2022.
  """
  return training_chain.alias(
      scale_by_foof, learning_rate, momentum, weight_decay, damping, stat_decay,
      kl_clip=kl_clip, kl_normalize=kl_normalize, default_scaling="none",
      nesterov=nesterov, stats_every=stats_every, inverse_every=inverse_every,
      top_k=top_k)
