"""K-FAC: Kronecker-factored curvature with full factors, in the Eva framework.

The Fisher block of a layer is approximated by ``A (x) G`` with
``A = E[a a^T]`` (layer inputs, bias entry 1) and ``G = E[g g^T]`` (output
gradients), captured by :func:`eva_optax.value_and_grad` with
``statistics="factors"``. Damping is split between the factors by the usual
trace-norm rule, so the preconditioned gradient is

.. math::
  U = (A + \\sqrt{\\gamma}\\pi I)^{-1}\\, \\hat G\\, (G + \\tfrac{\\sqrt{\\gamma}}{\\pi} I)^{-1},
  \\qquad \\pi = \\sqrt{\\frac{\\operatorname{tr}(A)/d_A}{\\operatorname{tr}(G)/d_G}}

(the paper's ``G^{-1} G_hat A^{-1}`` in its ``(d_out, d_in)`` view). The inverses
are recomputed every ``inverse_every`` steps (by Cholesky) and kept in the state;
unlike the authors' code the damping is added to a copy, never to the running
factors (their P10 leak). State per layer: ``2 (d_in + 1)^2 + 2 d_out^2`` floats.

References:
  Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored Approximate
  Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.
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


def damping_split(a_factor, g_factor, damping, a_diagonal=False):
  """``(sqrt(gamma) pi, sqrt(gamma) / pi)``, the trace-norm split of ``gamma``."""
  ta = jnp.mean(a_factor) if a_diagonal else jnp.trace(a_factor) / a_factor.shape[0]
  tg = jnp.trace(g_factor) / g_factor.shape[0]
  ok = jnp.logical_and(ta > 0, tg > 0)
  pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / jnp.where(ok, tg, 1.0), 1.0)), 1.0)
  pi = jnp.clip(pi, 1e-10, 1e10)
  root = jnp.sqrt(damping)
  return root * pi, root / pi


def _refresh(s, gamma, view):
  da, dg = damping_split(s["A"], s["G"], gamma, view.diagonal)
  a_inv = (1.0 / (s["A"] + da) if view.diagonal
           else dense.damped_inverse(s["A"], da))
  return {**s, "A_inv": a_inv, "G_inv": dense.damped_inverse(s["G"], dg)}


def _solve(s, gm, gamma, view):
  del gamma
  left = (s["A_inv"][:, None] * gm if view.diagonal else s["A_inv"] @ gm)
  return left @ s["G_inv"]


KFAC = layerwise.Method(
    name="kfac", statistics="factors", stat_keys=("A", "G"),
    solve=layerwise.on_stacked_view(_solve),
    init_extra=lambda view: {
        "A_inv": jnp.zeros((view.d_a,) if view.diagonal else (view.d_a, view.d_a),
                           jnp.float32),
        "G_inv": jnp.zeros((view.d_out, view.d_out), jnp.float32)},
    refresh=_refresh,
    # Cholesky factor and inverse of each factor: about d^3 flops each.
    refresh_cost=lambda view: float((view.d_a if view.diagonal else view.d_a ** 3)
                                    + view.d_out ** 3),
    damping_fix="It is split between the two factors; the paper uses 0.03.",
    stat_decay_fix="It is the weight of the NEW factor (the paper's 0.95).")


def scale_by_kfac(
    damping: optax.ScalarOrSchedule = 0.03,
    stat_decay: optax.ScalarOrSchedule = 0.95,
    *,
    kl_clip: float | None = None,
    kl_normalize: bool = False,
    learning_rate: optax.ScalarOrSchedule | None = None,
    stats_every: int = 1,
    layer_views: Any = None,
    inverse_every: int = 1,
    distribute_over: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC's preconditioning only (no momentum, weight decay or learning rate).

  For every captured layer, with running averages of the factors ``A`` (inputs,
  bias entry 1) and ``G`` (output gradients) and ``G_hat`` its gradient viewed
  as ``(d_in + 1, d_out)``:

  .. math::
    U = (A + \\sqrt{\\gamma}\\pi I)^{-1}\\, \\hat G\\, (G + \\tfrac{\\sqrt{\\gamma}}{\\pi} I)^{-1},
    \\qquad \\pi = \\sqrt{\\frac{\\operatorname{tr}(A)/d_A}{\\operatorname{tr}(G)/d_G}},

  with the damped inverses recomputed every ``inverse_every`` steps. Scalings
  as in :func:`eva_optax.scale_by_eva`: none by default, the ICLR KL-clip with
  ``kl_clip``, the journal KL-normalization with ``kl_normalize=True``.

  How the scale relates to the alias: the raw ``U`` is ``F^{-1} G_hat`` with
  the damping inside the inverses, so where the factors are small its size is
  of the order of ``G_hat / gamma``; :func:`eva_optax.kfac` applies the
  KL-clip (``kappa = 0.001``) by default, which bounds it.

  Args:
    damping: ``gamma > 0``, split between the factors by the trace-norm rule (a
      number, an array or a schedule).
    stat_decay: weight in ``[0, 1]`` of the NEW factor in the running averages
      (0.95); a number or a schedule.
    kl_clip: ``kappa > 0`` of the KL-clip (needs ``learning_rate``), or ``None``.
    kl_normalize: apply the journal KL-normalization instead.
    learning_rate: the optimizer's learning rate, for the KL-clip only.
    stats_every: fold factors into the averages every this many steps (>= 1).
    layer_views: how the capture reads each layer, from
      :func:`eva_optax.layer_views` (or a stats tree); needed only where the
      shapes alone are ambiguous at ``init`` (stacked layers, bias-free
      layers with several output axes, Einsum kernels).
    inverse_every: recompute the damped inverses every this many steps (>= 1).
    distribute_over: the name of a mesh axis over which the refresh is split
      (each device computes its share of the damped inverses, balanced by cost, and one
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
    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.
  """
  return layerwise.layerwise_preconditioner(
      KFAC, damping=damping, stat_decay=stat_decay, stats_every=stats_every,
      refresh_every=inverse_every, kl_clip=kl_clip, kl_normalize=kl_normalize,
      learning_rate=learning_rate, layer_views=layer_views,
      distribute_over=distribute_over, mesh=mesh)


def kfac(
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
    nesterov: bool = False,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    distribute_over: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC, trained the way the Eva paper trains it.

  ``chain(scale_by_kfac, add_decayed_weights, trace(momentum),
  scale_by_learning_rate)`` with the KL-clip ``kappa = 0.001`` of the paper's
  K-FAC runs (which used ``inverse_every=10`` on CIFAR and 50 on ImageNet):

  .. math::
    d_t = s_t\\,(A + \\sqrt{\\gamma}\\pi I)^{-1} \\hat G_t
          (G + \\tfrac{\\sqrt{\\gamma}}{\\pi} I)^{-1} + \\lambda_t w_t, \\quad
    m_t = \\mu m_{t-1} + d_t, \\quad w_{t+1} = w_t - \\eta_t m_t,

  ``s_t = min(1, sqrt(kappa / (eta_t^2 sum <U, G_hat>)))`` the KL-clip over all
  captured layers. Needs ``statistics="factors"``.

  Args:
    learning_rate: ``eta``, a number, an array or an optax schedule.
    momentum: heavy-ball ``mu`` (0.9 in the paper); ``None`` for no momentum
      and no buffer, as ``optax.sgd``.
    weight_decay: ``lambda`` added after preconditioning; a number, an array or
      a schedule.
    damping: ``gamma`` (0.03 in the paper).
    stat_decay: weight of the new factor (0.95 in the paper).
    kl_clip: ``kappa`` of the KL-clip (0.001, the paper's), or ``None``.
    kl_normalize: journal KL-normalization instead (with ``kl_clip=None``).
    stats_every: factor interval in steps.
    layer_views: how the capture reads each layer, from
      :func:`eva_optax.layer_views` (or a stats tree); needed only where the
      shapes alone are ambiguous at ``init`` (stacked layers, bias-free
      layers with several output axes, Einsum kernels).
    inverse_every: inverse refresh interval in steps (10 on CIFAR in the paper).
    nesterov: Nesterov momentum instead of heavy ball.
    weight_decay_mask: which leaves are decayed, as ``optax.adamw(mask=...)``.
    mu_dtype: dtype of the momentum buffer (``None``: the parameters').
    distribute_over: split the inverses over this mesh axis; see
      :func:`scale_by_kfac`.
    mesh: the mesh of ``distribute_over`` where ``jax.set_mesh`` does not set it.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes
    ``stats=`` from ``value_and_grad(..., statistics="factors")``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, eva_optax
    >>> model = nn.Dense(2)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
    >>> grad_fn = eva_optax.value_and_grad(loss_fn, statistics="factors")
    >>> tx = eva_optax.kfac(learning_rate=0.1, inverse_every=10)
    >>> opt_state = tx.init(params)
    >>> loss, grads, stats = grad_fn(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)

  References:
    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015.
  """
  return training_chain.alias(
      scale_by_kfac, learning_rate, momentum, weight_decay, damping, stat_decay,
      kl_clip=kl_clip, kl_normalize=kl_normalize, default_scaling="none",
      nesterov=nesterov, weight_decay_mask=weight_decay_mask,
      mu_dtype=mu_dtype, stats_every=stats_every, inverse_every=inverse_every,
      layer_views=layer_views, distribute_over=distribute_over, mesh=mesh)
