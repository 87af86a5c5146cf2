"""Eva-f: vectorized FOOF, the input-side Kronecker vector in closed form.

Eva-f keeps only the mean layer input ``a_bar`` (with a 1 for the bias) and
preconditions a layer's gradient by ``G_hat (a_bar a_bar^T + gamma I)^{-1}``,
by Sherman-Morrison (:func:`eva_optax._src.linalg.rank_one.eva_f_solve`): the
rank-one form of FOOF's ``G_hat (A + gamma I)^{-1}``. The state per layer is the
running average of ``a_bar``: ``d_in + 1`` floats.

References:
  Zhang et al., "Eva: A General Vectorized Approximation Framework for
  Second-order Optimization" (the journal version of `Eva: Practical
  Second-order Optimization with Kronecker-vectorized Approximation
  <https://openreview.net/forum?id=_Mic8V96Voy>`_, ICLR 2023), section "Eva-f";
  Benzing, `Gradient Descent on Neurons and its Link to Approximate Second-order
  Optimization <https://arxiv.org/abs/2201.12250>`_, ICML 2022 (FOOF).
"""

from __future__ import annotations

from typing import Any

import chex
import optax

from eva_optax._src.preconditioner import layerwise
from eva_optax._src.linalg import rank_one
from eva_optax._src.preconditioner import training_chain

EVA_F = layerwise.Method(
    name="eva_f", statistics="vectors", stat_keys=("a",),
    coefficients=lambda s, k, b, gamma, view, scale: rank_one.eva_f_coefficients(
        k, b, s["a"], gamma, scale),
    damping_fix="Eva-f inverts a a^T + damping * I; the paper uses 0.03.")


def scale_by_eva_f(
    damping: optax.ScalarOrSchedule = 0.03,
    stat_decay: optax.ScalarOrSchedule = 0.95,
    *,
    kl_clip: float | None = None,
    kl_normalize: bool = False,
    learning_rate: optax.ScalarOrSchedule | None = None,
    stats_every: int = 1,
    layer_views: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva-f's preconditioning only: ``U = (a a^T + gamma I)^{-1} G_hat``.

  .. math::
    U = \\frac{1}{\\gamma}\\Big[\\hat G - \\frac{a (a^T \\hat G)}{\\gamma + \\|a\\|^2}\\Big]

  (the paper's ``G_hat (a a^T + gamma I)^{-1}`` in its ``(d_out, d_in)`` view,
  with ``a`` the running average of the layer's mean input, bias entry 1).
  Only ``a`` is averaged. Scalings as in :func:`scale_by_eva`: none by default,
  the ICLR KL-clip with ``kl_clip``, the journal KL-normalization with
  ``kl_normalize=True``.

  How the scale relates to the alias: the raw ``U`` includes ``1/gamma``;
  :func:`eva_optax.eva_f` uses the KL-normalization by default, which removes
  it.

  Args:
    damping: ``gamma > 0`` (a number, an array or a schedule).
    stat_decay: weight in ``[0, 1]`` of the NEW statistic in the running
      average of ``a`` (the paper's 0.95); a number or a schedule.
    kl_clip: ``kappa > 0`` of the ICLR KL-clip, or ``None``.
    kl_normalize: apply the journal KL-normalization.
    learning_rate: the optimizer's learning rate, for the KL-clip only.
    stats_every: fold statistics into the average every this many steps.
    layer_views: how the capture reads each layer, from
      :func:`eva_optax.layer_views` (or a stats tree); needed only where the
      shapes alone are ambiguous at ``init`` (stacked layers, bias-free
      layers with several output axes, Einsum kernels).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes
    ``stats=`` from :func:`eva_optax.value_and_grad`.

  References:
    Zhang et al., "Eva: A General Vectorized Approximation Framework for
    Second-order Optimization" (the journal version of `Eva: Practical
    Second-order Optimization with Kronecker-vectorized Approximation
    <https://openreview.net/forum?id=_Mic8V96Voy>`_, ICLR 2023), section
    "Eva-f".
  """
  return layerwise.layerwise_preconditioner(
      EVA_F, damping=damping, stat_decay=stat_decay, stats_every=stats_every,
      kl_clip=kl_clip, kl_normalize=kl_normalize, learning_rate=learning_rate,
      layer_views=layer_views)


def eva_f(
    learning_rate: optax.ScalarOrSchedule,
    momentum: chex.Numeric | None = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    damping: optax.ScalarOrSchedule = 0.03,
    stat_decay: optax.ScalarOrSchedule = 0.95,
    *,
    kl_clip: float | None = None,
    kl_normalize: bool | None = None,
    stats_every: int = 1,
    layer_views: Any = None,
    nesterov: bool = False,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva-f (vectorized FOOF), trained the way the paper trains it.

  ``chain(scale_by_eva_f, add_decayed_weights, trace(momentum),
  scale_by_learning_rate)``:

  .. math::
    d_t = s_t\\,\\hat G_t (a a^T + \\gamma I)^{-1} + \\lambda_t w_t, \\quad
    m_t = \\mu m_{t-1} + d_t, \\quad w_{t+1} = w_t - \\eta_t m_t.

  The default scaling ``s_t`` is the journal KL-normalization, the only one the
  authors ran Eva-f with (``semi-eva``, ``kl_clip=1``); ``kl_clip`` selects the
  ICLR KL-clip, ``kl_normalize=False`` the raw solve (with its ``1/gamma``).

  Args:
    learning_rate: ``eta``, a number, an array or an optax schedule.
    momentum: heavy-ball ``mu`` (0.9 in the paper); ``None`` for no momentum
      and no buffer, as ``optax.sgd``.
    weight_decay: ``lambda`` added after preconditioning; a number, an array or
      a schedule.
    damping: ``gamma`` (0.03 in the paper).
    stat_decay: weight of the new statistic (0.95 in the paper).
    kl_clip: ``kappa`` of the ICLR KL-clip, or ``None``.
    kl_normalize: journal KL-normalization; ``None`` means "unless kl_clip".
    stats_every: statistics refresh interval in steps.
    layer_views: how the capture reads each layer, from
      :func:`eva_optax.layer_views` (or a stats tree); needed only where the
      shapes alone are ambiguous at ``init`` (stacked layers, bias-free
      layers with several output axes, Einsum kernels).
    nesterov: Nesterov momentum instead of heavy ball.
    weight_decay_mask: which leaves are decayed, as ``optax.adamw(mask=...)``.
    mu_dtype: dtype of the momentum buffer (``None``: the parameters').

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes
    ``stats=`` from :func:`eva_optax.value_and_grad`.

  References:
    Zhang et al., "Eva: A General Vectorized Approximation Framework for
    Second-order Optimization" (the journal version of `Eva: Practical
    Second-order Optimization with Kronecker-vectorized Approximation
    <https://openreview.net/forum?id=_Mic8V96Voy>`_, ICLR 2023); Benzing,
    `Gradient Descent on Neurons and its Link to Approximate Second-order
    Optimization <https://arxiv.org/abs/2201.12250>`_, ICML 2022 (FOOF).
  """
  return training_chain.alias(
      scale_by_eva_f, learning_rate, momentum, weight_decay, damping, stat_decay,
      kl_clip=kl_clip, kl_normalize=kl_normalize, default_scaling="kl_normalize",
      nesterov=nesterov, weight_decay_mask=weight_decay_mask,
      mu_dtype=mu_dtype, stats_every=stats_every,
      layer_views=layer_views)
