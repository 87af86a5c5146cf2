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

import chex
import jax
import jax.numpy as jnp
import optax

from eva_optax._src.preconditioner import layerwise
from eva_optax._src.linalg import dense
from eva_optax._src.preconditioner import training_chain
from eva_optax._src.preconditioner import validation


def _refresh(s, gamma, view):
  del gamma
  if view.diagonal:   # an embedding: the eigenvectors are the unit vectors
    return {**s, "d": jnp.where(s["A"] > 1e-10, s["A"], 0.0)}
  d, q = dense.symmetric_eig(s["A"])
  return {**s, "Q": q, "d": d}


def _solve(top_k):
  def solve(s, gm, gamma, view):
    d = s["d"]
    if view.diagonal:
      inv = 1.0 / (d + gamma)
      if top_k is not None:   # the top_k largest entries; the rest get 1/gamma
        kth = jnp.sort(d)[max(d.shape[0] - top_k, 0)]
        inv = jnp.where(d >= kth, inv, 1.0 / gamma)
      return inv[:, None] * gm
    q = s["Q"]
    coeffs = q.T @ gm
    if top_k is None:   # all eigenpairs: Q diag(1 / (d + gamma)) Q^T G_hat
      return q @ (coeffs / (d + gamma)[:, None])
    # Eigenvalues ascend: keep the last top_k; the rest of G_hat gets 1/gamma.
    keep = (jnp.arange(d.shape[0]) >= d.shape[0] - top_k)[:, None]
    kept = jnp.where(keep, coeffs, 0.0)
    return q @ (kept / (d + gamma)[:, None]) + (gm - q @ kept) / gamma
  return solve


def method(top_k):
  def init_extra(view):
    extra = {"d": jnp.zeros((view.d_a,), jnp.float32)}
    if not view.diagonal:
      extra["Q"] = jnp.zeros((view.d_a, view.d_a), jnp.float32)
    return extra
  return layerwise.Method(
      name="foof", statistics="factors", stat_keys=("A",),
      solve=layerwise.on_stacked_view(_solve(top_k)),
      init_extra=init_extra, refresh=_refresh,
      # A symmetric eigendecomposition: about 9 d^3 flops.
      refresh_cost=lambda view: float(view.d_a if view.diagonal
                                      else 9 * view.d_a ** 3),
      damping_fix="FOOF inverts A + damping * I; the paper uses 0.03.",
      stat_decay_fix="It is the weight of the NEW factor (0.95; the journal runs used 1).")


def scale_by_foof(
    damping: optax.ScalarOrSchedule = 0.03,
    stat_decay: optax.ScalarOrSchedule = 0.95,
    *,
    kl_clip: float | None = None,
    kl_normalize: bool = False,
    learning_rate: optax.ScalarOrSchedule | None = None,
    stats_every: int = 1,
    layer_views: Any = None,
    inverse_every: int = 1,
    top_k: int | None = None,
    distribute_over: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  """FOOF's preconditioning only (no momentum, weight decay or learning rate).

  For every captured layer, with ``A = Q diag(d) Q^T`` the running input
  factor (bias entry 1), recomputed every ``inverse_every`` steps:

  .. math::
    U = (A + \\gamma I)^{-1} \\hat G
      = Q_k\\,\\mathrm{diag}\\Big(\\frac{1}{d_k + \\gamma} - \\frac{1}{\\gamma}\\Big) Q_k^T \\hat G
        + \\frac{\\hat G}{\\gamma},

  with ``Q_k`` the ``top_k`` leading eigenvectors (all by default, exact).
  Scalings as in :func:`eva_optax.scale_by_eva`.

  How the scale relates to the alias: the raw ``U`` includes ``1/gamma`` on
  the part of ``G_hat`` outside ``A``'s range; :func:`eva_optax.foof` applies
  the KL-clip (``kappa = 0.001``) by default, which bounds it.

  Args:
    damping: ``gamma > 0`` (a number, an array or a schedule).
    stat_decay: weight in ``[0, 1]`` of the NEW factor in the running average
      (0.95; the journal runs used 1, i.e. the latest factor only, with
      ``inverse_every=50``).
    kl_clip: ``kappa > 0`` of the KL-clip (needs ``learning_rate``), or ``None``.
    kl_normalize: apply the journal KL-normalization instead.
    learning_rate: the optimizer's learning rate, for the KL-clip only.
    stats_every: fold factors into the average every this many steps (>= 1).
    layer_views: how the capture reads each layer, from
      :func:`eva_optax.layer_views` (or a stats tree); needed only where the
      shapes alone are ambiguous at ``init`` (stacked layers, bias-free
      layers with several output axes, Einsum kernels).
    inverse_every: recompute the eigendecomposition every this many steps.
    top_k: keep the ``top_k`` largest eigenpairs (``None``: all, exact).
    distribute_over: the name of a mesh axis over which the refresh is split
      (each device computes its share of the eigendecompositions, balanced by cost, and one
      collective on refresh steps gives every device all of them; the updates
      equal the replicated run's). Inside ``jax.shard_map`` or ``jax.pmap``
      over that axis, or under ``jax.jit`` with ``jax.set_mesh``; see
      :func:`eva_optax.refresh_plan`. ``None``: every device computes all.
    mesh: the mesh ``distribute_over`` refers to, where no ``jax.set_mesh``
      sets it (``jax.jit`` with explicit ``NamedSharding`` shardings).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes
    ``stats=`` from ``value_and_grad(..., statistics="factors")``.

  References:
    Benzing, `Gradient Descent on Neurons and its Link to Approximate
    Second-order Optimization <https://arxiv.org/abs/2201.12250>`_, ICML 2022.
  """
  if top_k is not None:
    validation.check_interval("top_k", top_k)
  return layerwise.layerwise_preconditioner(
      method(top_k), damping=damping, stat_decay=stat_decay,
      stats_every=stats_every, refresh_every=inverse_every, kl_clip=kl_clip,
      kl_normalize=kl_normalize, learning_rate=learning_rate,
      layer_views=layer_views, distribute_over=distribute_over, mesh=mesh)


def foof(
    learning_rate: optax.ScalarOrSchedule,
    momentum: chex.Numeric | None = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    damping: optax.ScalarOrSchedule = 0.03,
    stat_decay: optax.ScalarOrSchedule = 0.95,
    *,
    kl_clip: float | None = 0.001,
    kl_normalize: bool | None = None,
    stats_every: int = 1,
    layer_views: Any = None,
    inverse_every: int = 1,
    top_k: int | None = None,
    nesterov: bool = False,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    distribute_over: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  """FOOF, trained the way the Eva journal paper trains it.

  ``chain(scale_by_foof, add_decayed_weights, trace(momentum),
  scale_by_learning_rate)`` with the KL-clip ``kappa = 0.001`` of the authors'
  FOOF runs:

  .. math::
    d_t = s_t\\,(A + \\gamma I)^{-1} \\hat G_t + \\lambda_t w_t, \\quad
    m_t = \\mu m_{t-1} + d_t, \\quad w_{t+1} = w_t - \\eta_t m_t.

  Needs ``statistics="factors"``.

  Args:
    learning_rate: ``eta``, a number, an array or an optax schedule.
    momentum: heavy-ball ``mu`` (0.9 in the paper); ``None`` for no momentum
      and no buffer, as ``optax.sgd``.
    weight_decay: ``lambda`` added after preconditioning; a number, an array or
      a schedule.
    damping: ``gamma`` (0.03 in the paper).
    stat_decay: weight of the new factor (the journal runs used 1).
    kl_clip: ``kappa`` of the KL-clip (0.001, the paper's), or ``None``.
    kl_normalize: journal KL-normalization instead (with ``kl_clip=None``).
    stats_every: factor interval in steps.
    layer_views: how the capture reads each layer, from
      :func:`eva_optax.layer_views` (or a stats tree); needed only where the
      shapes alone are ambiguous at ``init`` (stacked layers, bias-free
      layers with several output axes, Einsum kernels).
    inverse_every: eigendecomposition interval in steps (50 in the journal runs).
    top_k: keep the ``top_k`` largest eigenpairs (``None``: all, exact).
    nesterov: Nesterov momentum instead of heavy ball.
    weight_decay_mask: which leaves are decayed, as ``optax.adamw(mask=...)``.
    mu_dtype: dtype of the momentum buffer (``None``: the parameters').
    distribute_over: split the eigendecompositions over this mesh axis; see
      :func:`scale_by_foof`.
    mesh: the mesh of ``distribute_over`` where ``jax.set_mesh`` does not set it.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes
    ``stats=`` from ``value_and_grad(..., statistics="factors")``.

  References:
    Benzing, `Gradient Descent on Neurons and its Link to Approximate
    Second-order Optimization <https://arxiv.org/abs/2201.12250>`_, ICML 2022.
  """
  return training_chain.alias(
      scale_by_foof, learning_rate, momentum, weight_decay, damping, stat_decay,
      kl_clip=kl_clip, kl_normalize=kl_normalize, default_scaling="none",
      nesterov=nesterov, weight_decay_mask=weight_decay_mask,
      mu_dtype=mu_dtype, stats_every=stats_every, inverse_every=inverse_every,
      top_k=top_k, layer_views=layer_views, distribute_over=distribute_over,
      mesh=mesh)
