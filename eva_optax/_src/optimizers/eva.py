"""Eva: the Kronecker-vector preconditioner in closed form (no inverses).

Eva approximates a layer's Fisher block by ``F = v v^T + gamma I`` with
``v = a_bar (x) g_bar`` (the Kronecker vectors: the mean layer input, with a 1 for
the bias, and the mean output gradient) and applies ``F^{-1}`` by Sherman-Morrison
(:func:`eva_optax._src.linalg.rank_one.eva_solve`). The state per layer is the
running averages of the two vectors: ``d_in + 1 + d_out`` floats.

References:
  Zhang et al., `Eva: Practical Second-order Optimization with Kronecker-vectorized
  Approximation <https://openreview.net/forum?id=_Mic8V96Voy>`_, ICLR 2023; and the
  journal version, "Eva: A General Vectorized Approximation Framework for
  Second-order Optimization" (KL-normalization).
"""

from __future__ import annotations

from typing import Any

import chex
import optax

from eva_optax._src.preconditioner import layerwise
from eva_optax._src.linalg import rank_one
from eva_optax._src.preconditioner import training_chain

EVA = layerwise.Method(
    name="eva", statistics="vectors", stat_keys=("a", "g"),
    coefficients=lambda s, k, b, gamma, view, scale: rank_one.eva_coefficients(
        k, b, s["a"], s["g"], gamma, scale),
    damping_fix="Eva inverts v v^T + damping * I; the paper uses 0.03.")


def scale_by_eva(
    damping: optax.ScalarOrSchedule = 0.03,
    stat_decay: optax.ScalarOrSchedule = 0.95,
    *,
    kl_clip: float | None = None,
    kl_normalize: bool = False,
    learning_rate: optax.ScalarOrSchedule | None = None,
    stats_every: int = 1,
    layer_views: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Eva's preconditioning only (no momentum, weight decay or learning rate).

  For every captured layer, with running averages ``a`` and ``g`` of its
  Kronecker vectors and ``G_hat`` its gradient viewed as ``(d_in + 1, d_out)``:

  .. math::
    U = (v v^T + \\gamma I)^{-1}\\mathrm{vec}(\\hat G)
      = \\frac{1}{\\gamma}\\Big[\\hat G - \\frac{a^T\\hat G g}{\\gamma + \\|a\\|^2\\|g\\|^2} a g^T\\Big],
    \\qquad v = a \\otimes g.

  By default ``U`` is returned as is. ``kl_clip=kappa`` applies the ICLR
  KL-clip ``min(1, sqrt(kappa / (lr^2 sum <U, G_hat>)))`` (needs
  ``learning_rate``); ``kl_normalize=True`` the journal KL-normalization
  ``sqrt(gamma) U / sqrt(sum <U, G_hat>)``. Both sum over captured layers only.
  Parameters without statistics keep their gradient.

  How the scale relates to the alias: the raw ``U`` includes the factor
  ``1/gamma`` (about 33 times the gradient at the paper's ``gamma = 0.03``, when
  the rank-one term is small), so use it with a learning rate scaled to match;
  :func:`eva_optax.eva` uses the KL-normalization by default, which removes it
  (its step does not depend on ``gamma``'s size), or the KL-clip, which bounds
  it.

  Args:
    damping: ``gamma > 0``, on the whole Kronecker product (a number, an array
      or a schedule).
    stat_decay: weight in ``[0, 1]`` of the NEW statistic in the running
      averages, ``m <- (1 - stat_decay) m + stat_decay new`` (the paper's
      0.95); the first observation initialises them. A number or a schedule.
    kl_clip: ``kappa > 0`` of the ICLR KL-clip, or ``None``.
    kl_normalize: apply the journal KL-normalization.
    learning_rate: the optimizer's learning rate (a number or a schedule); only
      the KL-clip uses it.
    stats_every: fold statistics into the averages every this many steps.
    layer_views: how the capture reads each layer, from
      :func:`eva_optax.layer_views` (or a stats tree); needed only where the
      shapes alone are ambiguous at ``init`` (stacked layers, bias-free
      layers with several output axes, Einsum kernels).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; ``update`` takes
    ``stats=`` from :func:`eva_optax.value_and_grad`.

  References:
    Zhang et al., `Eva: Practical Second-order Optimization with
    Kronecker-vectorized Approximation <https://openreview.net/forum?id=_Mic8V96Voy>`_,
    ICLR 2023; its journal version, "Eva: A General Vectorized Approximation
    Framework for Second-order Optimization" (KL-normalization).
  """
  return layerwise.layerwise_preconditioner(
      EVA, damping=damping, stat_decay=stat_decay, stats_every=stats_every,
      kl_clip=kl_clip, kl_normalize=kl_normalize, learning_rate=learning_rate,
      layer_views=layer_views)


def eva(
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
  """Eva, trained the way the paper trains it.

  ``chain(scale_by_eva, add_decayed_weights(weight_decay), trace(momentum),
  scale_by_learning_rate(learning_rate))``: the preconditioned gradient, then
  weight decay (never preconditioned), heavy-ball momentum and the learning rate,
  as the authors' ``preconditioner.step(); torch.optim.SGD.step()``:

  .. math::
    d_t = s_t\\,(v v^T + \\gamma I)^{-1}\\hat G_t + \\lambda_t w_t, \\quad
    m_t = \\mu m_{t-1} + d_t, \\quad w_{t+1} = w_t - \\eta_t m_t,

  with ``s_t`` the scaling over all captured layers. By default it is the
  journal KL-normalization (the version of Eva this library implements, and the
  one whose scale does not depend on the learning rate, so it works unchanged
  with any schedule). ``kl_clip=0.001`` selects the ICLR 2023 KL-clip instead,
  the setting behind the ICLR tables (its ``lr`` is this optimizer's learning
  rate, schedule included); ``kl_normalize=False`` with no ``kl_clip`` gives the
  raw ``F^{-1} G_hat`` (with its ``1/gamma``).

  Args:
    learning_rate: ``eta``, a number, an array or an optax schedule.
    momentum: heavy-ball ``mu`` (0.9 in the paper); ``None`` for no momentum
      and no buffer, as ``optax.sgd`` (0 keeps a buffer that has no effect).
    weight_decay: ``lambda`` added after preconditioning (5e-4 on CIFAR in the
      paper); a number, an array or a schedule.
    damping: ``gamma`` (0.03 in the paper).
    stat_decay: weight of the new statistic (0.95 in the paper).
    kl_clip: ``kappa`` of the ICLR KL-clip (0.001 in the paper), or ``None``.
    kl_normalize: journal KL-normalization; ``None`` means "unless kl_clip".
    stats_every: statistics refresh interval in steps (1 in the paper).
    layer_views: how the capture reads each layer, from
      :func:`eva_optax.layer_views` (or a stats tree); needed only where the
      shapes alone are ambiguous at ``init`` (stacked layers, bias-free
      layers with several output axes, Einsum kernels).
    nesterov: Nesterov momentum instead of heavy ball.
    weight_decay_mask: which leaves are decayed, as ``optax.adamw(mask=...)``:
      a tree of booleans like the params (or a prefix), or a callable of the
      params returning one; ``None`` decays all.
    mu_dtype: dtype of the momentum buffer (``None``: the parameters').

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, eva_optax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16, 2))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
    >>> tx = eva_optax.eva(learning_rate=0.1)
    >>> opt_state = tx.init(params)
    >>> loss, grads, stats = eva_optax.value_and_grad(loss_fn)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    >>> params = optax.apply_updates(params, updates)

  References:
    Zhang et al., `Eva: Practical Second-order Optimization with
    Kronecker-vectorized Approximation <https://openreview.net/forum?id=_Mic8V96Voy>`_,
    ICLR 2023.
  """
  return training_chain.alias(
      scale_by_eva, learning_rate, momentum, weight_decay, damping, stat_decay,
      kl_clip=kl_clip, kl_normalize=kl_normalize, default_scaling="kl_normalize",
      nesterov=nesterov, weight_decay_mask=weight_decay_mask,
      mu_dtype=mu_dtype, stats_every=stats_every,
      layer_views=layer_views)
