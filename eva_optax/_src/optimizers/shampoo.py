"""Shampoo: the full-matrix baseline Eva-s vectorizes (blocked, two-sided).

For a gradient matrix ``G`` Shampoo keeps ``L = sum G G^T`` and
``R = sum G^T G`` and preconditions with ``L^{-1/4} G R^{-1/4}``. Large matrices
are split into blocks of at most ``block_size x block_size`` with one ``(L, R)``
pair per block, as in the scalable Shampoo of Anil et al. The state per block is
the two statistics and their two inverse roots, ``2 (b_r^2 + b_c^2)`` floats for
a ``b_r x b_c`` block, plus two scalars.

Numerics: a gradient tensor is viewed as the matrix ``G = T.reshape(
prod(shape[:-1]), shape[-1])`` and cut into blocks of at most ``block_size`` rows
and columns. Per block the statistics ``L = sum G G^T`` and ``R = sum G^T G`` are
kept as ``(L / tr L, R / tr R, log tr L)`` (``tr L = tr R = sum |G|_F^2``),
built from the gradient scaled by its max-abs, so that no gradient of float32's
range overflows them; the inverse fourth roots are of the normalized statistics.

References:
  Gupta, Koren and Singer, `Shampoo <https://arxiv.org/abs/1802.09568>`_, ICML
  2018. Anil et al., `Scalable Second Order Optimization for Deep Learning
  <https://arxiv.org/abs/2002.09018>`_, 2020 (blocking, grafting, epsilon).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from eva_optax._src.linalg import dense
from eva_optax._src.preconditioner import per_tensor
from eva_optax._src.preconditioner import training_chain
from eva_optax._src.preconditioner import validation

Array = jax.Array

DEFAULT_BLOCK_SIZE = 128  # the authors' block size


class ScaleByShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`.

  Attributes:
    count: update calls so far (int32 scalar).
    stats_count: statistics folded into the running statistics.
    nonfinite_count: steps whose statistics were due but not folded because
      the gradient was not finite.
    skipped_count: steps whose update was replaced by zeros because the
      gradient (or, never expected, the result) was not finite.
    invalid_hparam_count: steps skipped (zero update, nothing folded, no root
      refresh) because ``stat_decay``, ``matrix_eps`` or a graft option given
      as an array, a schedule or through :func:`optax.inject_hyperparams` was
      out of range or not finite at that step.
    blocks: like the parameters (their boxes and NNX variables removed): for a
      leaf of rank >= 2 a dict of float32 arrays,
      ``"L"`` and ``"L_root"`` of shape ``(blocks, br, br)``, ``"R"`` and
      ``"R_root"`` of shape ``(blocks, bc, bc)``, ``"log_scale"`` and
      ``"root_log_scale"`` of shape ``(blocks,)``: the statistics divided by
      their trace, the log of that trace, the inverse fourth roots of the
      normalized statistics and the log trace they were computed at (the true
      ``L`` is ``exp(log_scale) * L``); ``None`` for the leaves that are not
      preconditioned. A stacked layer's leaf has the stack's axes in front.
    graft: like the parameters: the graft's float32 accumulator per leaf, or
      ``None`` for every leaf with ``graft="sgd"``.
  """

  count: Array            # shape=(), dtype=jnp.int32.
  stats_count: Array      # shape=(), dtype=jnp.int32.
  nonfinite_count: Array  # shape=(), dtype=jnp.int32.
  skipped_count: Array    # shape=(), dtype=jnp.int32.
  invalid_hparam_count: Array  # shape=(), dtype=jnp.int32.
  blocks: Any
  graft: Any


ROOT = 4          # L^{-1/4} G R^{-1/4}: the 2-D Shampoo exponent -1/(2 r), r = 2.
# log tr of an all-zero statistic: far below any real one (>= log(tiny^2) ~ -200),
# finite so that differences of two of them are 0, not NaN.
LOG_ZERO = -1e4


class Layout(NamedTuple):
  """How a tensor's ``(m, n)`` view is cut into ``nr x nc`` blocks of ``br x bc``."""

  m: int
  n: int
  br: int
  bc: int
  nr: int
  nc: int

  @property
  def num_blocks(self) -> int:
    return self.nr * self.nc


KEYS = ("L", "R", "L_root", "R_root", "log_scale", "root_log_scale")


def block_shapes(lay: "Layout") -> dict[str, tuple[int, ...]]:
  """The state's shapes for one tensor."""
  nb = lay.num_blocks
  return {k: v for k, v in {
      "L": (nb, lay.br, lay.br), "R": (nb, lay.bc, lay.bc),
      "L_root": (nb, lay.br, lay.br), "R_root": (nb, lay.bc, lay.bc),
      "log_scale": (nb,), "root_log_scale": (nb,)}.items()}


def block_layout(shape: tuple[int, ...], block_size: int) -> Layout:
  """The blocking of a tensor viewed as ``(prod(shape[:-1]), shape[-1])``.

  A side no longer than ``block_size`` is one block of its own length (no
  padding); a longer side is cut into ``ceil(side / block_size)`` blocks of
  ``block_size``, the last one padded with zeros.
  """
  m, n = math.prod(shape[:-1]), shape[-1]
  br, bc = min(m, block_size), min(n, block_size)
  return Layout(m, n, br, bc, -(-m // br), -(-n // bc))


def to_blocks(t: Array, lay: Layout) -> Array:
  """``(m, n)`` (or any shape of that size) -> ``(nr * nc, br, bc)``, zero padded."""
  t = t.reshape(lay.m, lay.n)
  t = jnp.pad(t, ((0, lay.nr * lay.br - lay.m), (0, lay.nc * lay.bc - lay.n)))
  t = t.reshape(lay.nr, lay.br, lay.nc, lay.bc).transpose(0, 2, 1, 3)
  return t.reshape(lay.num_blocks, lay.br, lay.bc)


def from_blocks(b: Array, lay: Layout) -> Array:
  """Inverse of :func:`to_blocks`: back to ``(m, n)``, padding dropped."""
  t = b.reshape(lay.nr, lay.nc, lay.br, lay.bc).transpose(0, 2, 1, 3)
  return t.reshape(lay.nr * lay.br, lay.nc * lay.bc)[:lay.m, :lay.n]


def block_statistics(t: Array, lay: Layout) -> dict[str, Array]:
  """One observation: per block ``G G^T / tr``, ``G^T G / tr`` and ``log tr``.

  ``tr = |G|_F^2`` of the block, computed on ``t`` scaled by its max-abs, so
  that nothing overflows for any finite ``t``.
  """
  m = jnp.max(jnp.abs(t))
  safe = jnp.where(m > 0, m, 1.0)
  gb = to_blocks(t / safe, lay)
  tr = jnp.sum(gb * gb, axis=(1, 2))
  ok = tr > 0
  inv = jnp.where(ok, 1.0 / jnp.where(ok, tr, 1.0), 0.0)[:, None, None]
  return {"L": jnp.einsum("bij,bkj->bik", gb, gb) * inv,
          "R": jnp.einsum("bji,bjk->bik", gb, gb) * inv,
          "log_scale": jnp.where(ok, jnp.log(jnp.where(ok, tr, 1.0))
                                 + 2.0 * jnp.log(safe), LOG_ZERO)}


def merge_statistics(old: dict[str, Array], new: dict[str, Array],
                     w_old: Array, w_new: Array) -> dict[str, Array]:
  """``w_old * old + w_new * new`` of the scaled statistics, renormalized."""
  c = jnp.maximum(old["log_scale"], new["log_scale"])
  a = (w_old * jnp.exp(old["log_scale"] - c))[:, None, None]
  b = (w_new * jnp.exp(new["log_scale"] - c))[:, None, None]
  left = a * old["L"] + b * new["L"]
  right = a * old["R"] + b * new["R"]
  tr = jnp.trace(left, axis1=1, axis2=2)
  ok = tr > 0
  inv = jnp.where(ok, 1.0 / jnp.where(ok, tr, 1.0), 0.0)[:, None, None]
  return {"L": left * inv, "R": right * inv,
          "log_scale": jnp.where(ok, c + jnp.log(jnp.where(ok, tr, 1.0)),
                                 LOG_ZERO)}


def precondition(t: Array, b: dict[str, Array], lay: Layout) -> Array:
  """The preconditioned direction ``L^{-1/4} G R^{-1/4}`` of one tensor ``t``,
  block by block, at any overall scale (the caller grafts), as ``(m, n)``."""
  m = jnp.max(jnp.abs(t))
  gb = to_blocks(t / jnp.where(m > 0, m, 1.0), lay)
  p = b["L_root"] @ gb @ b["R_root"]
  # Block b's true roots carry exp(-log tr / 4) each: the factor below, up to
  # a constant for the tensor (which grafting removes).
  e = -0.5 * b["root_log_scale"]
  p = p * jnp.exp(e - jnp.max(e))[:, None, None]
  return from_blocks(p, lay)


def _roots(b: dict[str, Array], eps: Array) -> dict[str, Array]:
  """The renewed roots of blocks ``b`` (fields with one leading block axis).

  A root of an all-zero block, or one that comes out non-finite, keeps its
  previous value."""
  usable = (b["log_scale"] > LOG_ZERO / 2)[:, None, None]
  left = dense.inverse_root(b["L"], ROOT, eps)
  right = dense.inverse_root(b["R"], ROOT, eps)
  ok = (usable & jnp.all(jnp.isfinite(left), axis=(1, 2), keepdims=True)
        & jnp.all(jnp.isfinite(right), axis=(1, 2), keepdims=True))
  return {"L_root": jnp.where(ok, left, b["L_root"]),
          "R_root": jnp.where(ok, right, b["R_root"]),
          "root_log_scale": jnp.where(ok[:, 0, 0], b["log_scale"],
                                      b["root_log_scale"])}


def refresh_roots(blocks: list[dict[str, Array]], eps: Array
                  ) -> list[dict[str, Array]]:
  """The roots of every block of every tensor from its statistics (each field
  with a leading axis of slices, then the blocks; computed as one flat list of
  blocks per tensor)."""
  out = []
  for old in blocks:
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in old.items()}
    renewed = _roots(flat, eps)
    out.append({**old, **{k: v.reshape(old[k].shape) for k, v in renewed.items()}})
  return out


def method(block_size: int) -> per_tensor.TensorMethod:
  """Shampoo's blocks as the per-tensor core's method, for one block size."""
  def init(shape):
    shapes = block_shapes(block_layout(shape, block_size))
    eye = lambda s: jnp.broadcast_to(jnp.eye(s[-1], dtype=jnp.float32), s)
    return {"L": jnp.zeros(shapes["L"], jnp.float32),
            "R": jnp.zeros(shapes["R"], jnp.float32),
            "L_root": eye(shapes["L_root"]), "R_root": eye(shapes["R_root"]),
            "log_scale": jnp.full(shapes["log_scale"], LOG_ZERO, jnp.float32),
            "root_log_scale": jnp.zeros(shapes["root_log_scale"], jnp.float32)}

  def describe(b):
    left, right = tuple(b["L"].shape), tuple(b["R"].shape)
    if left[-3] == 1:
      return (f"a ({left[-2]}, {right[-2]}) matrix view (statistics L {left}, "
              f"R {right})")
    return f"blocks with statistics L {left} and R {right}"

  return per_tensor.TensorMethod(
      name="shampoo", init=init,
      observe=lambda t: block_statistics(t, block_layout(t.shape, block_size)),
      merge=merge_statistics,
      direction=lambda t, b, eps: precondition(
          t, b, block_layout(t.shape, block_size)).reshape(t.shape),
      refresh=refresh_roots, unit_refresh=_roots,
      # Two symmetric eigendecompositions, about 9 n^3 flops each.
      unit_cost=lambda b: 9.0 * (b["L"].shape[-1] ** 3 + b["R"].shape[-1] ** 3),
      describe=describe)


def scale_by_shampoo(
    matrix_eps: chex.Numeric = 1e-6,
    stat_decay: optax.ScalarOrSchedule | None = None,
    *,
    block_size: int | None = None,
    inverse_every: int = 1,
    stats_every: int = 1,
    start_preconditioning_step: int = 1,
    graft: str = "sgd",
    graft_decay: chex.Numeric = 0.999,
    graft_eps: chex.Numeric = 1e-8,
    layer_views: Any = None,
    distribute_over: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Blocked two-sided Shampoo preconditioning only (no momentum, weight decay or lr).

  Every parameter tensor of rank >= 2 is viewed as the matrix
  ``G = T.reshape(prod(shape[:-1]), shape[-1])``: a Dense kernel as it is, a
  Flax conv kernel ``(kh, kw, C_in, C_out)`` flattened to ``(kh kw C_in, C_out)``
  like the K-FAC layer view (the authors' Shampoo instead keeps a conv kernel as
  a tensor with one root per merged axis). ``G`` is cut into blocks of at most
  ``block_size`` rows and columns (the last ones zero padded; padding does not
  change the result) and, per block,

  .. math::
    L \\leftarrow L + G G^T, \\quad R \\leftarrow R + G^T G, \\qquad
    P = L^{-1/4}\\, G\\, R^{-1/4}, \\qquad
    U = \\frac{P}{\\|P\\|_F}\\,\\|S(G)\\|_F,

  with the graft ``S`` over the whole tensor (``graft="sgd"``: ``S(G) = G``, the
  authors' setting). How the scale relates to the alias: grafting sets the size
  of each tensor's update, so the scale of ``L^{-1/4} G R^{-1/4}`` (and of
  ``matrix_eps``) cancels; :func:`eva_optax.shampoo` applies momentum and the
  learning rate to ``U``. The roots are ``(M + matrix_eps * lambda_max(M)
  I)^{-1/4}`` by eigendecomposition (relative epsilon, as scalable Shampoo),
  computed inside :func:`jax.lax.cond` when ``count % inverse_every == 0`` and
  kept in the state in between. Statistics (zeros at init) are folded in first
  when ``count % stats_every == 0``, so a refresh uses them: ``stat_decay=None``
  sums them (the authors' ``beta2 = 1``); a number gives the running average
  ``M <- (1 - stat_decay) M + stat_decay * new`` (``stat_decay`` is the weight
  of the NEW statistic, as everywhere in this library) whose first observation
  initialises it. Stacked layers (``nn.scan``, ``nn.vmap``; from
  ``layer_views``, else from the shapes where a bias reveals the stack): each
  slice along the stack's axes is a tensor of its own,
  with its own blocks and graft norm (vectorized over the slices). A root of
  an all-zero block, or one that comes out
  non-finite, keeps its previous value (the identity at init).

  Numerics and safety: the statistics are stored divided by their trace with
  the log of the trace beside them (see :class:`ScaleByShampooState`), so any
  finite gradient (1e19, or the gradients of a ReLU network whose inputs are
  scaled by 1e15) gives finite statistics, roots and updates, in the direction
  of the float64 computation; a non-finite gradient gives a zero update, folds
  nothing and counts in ``skipped_count`` (and ``nonfinite_count`` when
  statistics were due); ``stat_decay``, ``matrix_eps`` or a graft option given
  as an array, a schedule or injected that is out of range at a step gives a
  zero update, no folding and no refresh, counted in ``invalid_hparam_count``;
  a state initialised for other parameters raises a ``ValueError`` naming the
  leaf and both shapes.

  The first ``start_preconditioning_step`` updates (``count < start``) return
  the graft's step (the gradient for ``"sgd"``), while statistics and roots are
  already accumulated. Tensors of rank <= 1 get the graft's step. Everything
  runs in float32 with full float32 matmuls (``precision="highest"``, no TF32);
  updates come back in the gradient dtype. ``update`` ignores extra keyword
  arguments (``stats=``). See :func:`eva_optax.shampoo` for the full optimizer.

  Args:
    matrix_eps: relative ridge ``epsilon > 0`` of the inverse roots (a number,
      or an array under :func:`optax.inject_hyperparams`); Shampoo's
      counterpart of damping, so it is the first positional argument.
    stat_decay: ``None`` for running sums (the authors' setting), or the weight
      in ``[0, 1]`` of the new statistic (a number, an array or a schedule).
    block_size: largest block side; ``None`` means the authors' 128 (a
      ``None`` default also keeps it static under ``optax.inject_hyperparams``).
    inverse_every: recompute the roots every this many steps (>= 1).
    stats_every: accumulate statistics every this many steps (>= 1).
    start_preconditioning_step: steps of the graft's step before
      preconditioning (>= 0; 0 preconditions from the first update, as the
      authors' 1-indexed ``start_preconditioning_step=1``).
    graft: whose step size each tensor gets: ``"sgd"`` (the paper's setting),
      ``"adagrad"`` or ``"rmsprop"`` (Adam's bias-corrected second moment);
      see :mod:`eva_optax._src.preconditioner.grafting`. Pick ``"adagrad"`` or ``"rmsprop"``
      for Adam-like learning rates.
    graft_decay: RMSProp's ``beta`` (weight of the old second moment).
    graft_eps: added to the root of the graft's second moment.
    layer_views: the capture's views (:func:`eva_optax.layer_views`, or the
      statistics), for stacked layers: a leaf of a layer with a stack of
      ``k`` axes is ``k`` axes of slices, each preconditioned alone. ``None``:
      the stacks the shapes reveal (a stacked kernel with its stacked bias);
      a bias-free stacked kernel then reads as one tensor, so give the views
      for scanned bias-free layers.

    distribute_over: the name of a mesh axis over which the root refresh is
      split, one unit per block (each device computes its share of the
      inverse roots, balanced by cost; one collective on refresh steps gives
      every device all of them; the updates equal the replicated run's).
      Inside ``jax.shard_map`` or ``jax.pmap`` over that axis, or under
      ``jax.jit`` with ``jax.set_mesh``; see :func:`eva_optax.refresh_plan`.
    mesh: the mesh ``distribute_over`` refers to, where no ``jax.set_mesh``
      sets it.
  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`ScaleByShampooState`.

  References:
    Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor
    Optimization <https://arxiv.org/abs/1802.09568>`_, ICML 2018;
    Anil et al., `Scalable Second Order Optimization for Deep Learning
    <https://arxiv.org/abs/2002.09018>`_, 2020.
  """
  if stat_decay is not None:
    validation.check_unit_interval(
        "stat_decay", stat_decay,
        fix="It is the weight of the NEW statistic; None keeps a running sum "
        "(the authors' setting).")
  block_size = validation.static_int(
      "block_size", DEFAULT_BLOCK_SIZE if block_size is None else block_size)
  validation.check_not_schedule("matrix_eps", matrix_eps)
  validation.check_positive(
      "matrix_eps", matrix_eps,
      fix="It is the relative ridge of the inverse roots; 1e-6 is typical.")
  validation.check_interval("inverse_every", inverse_every)
  validation.check_interval("stats_every", stats_every)
  validation.check_interval("start_preconditioning_step",
                            start_preconditioning_step, minimum=0)
  return per_tensor.per_tensor_preconditioner(
      method(block_size), damping=matrix_eps, stat_decay=stat_decay,
      stats_every=stats_every, state_class=ScaleByShampooState,
      refresh_every=inverse_every, start_step=start_preconditioning_step,
      graft=graft, graft_decay=graft_decay, graft_eps=graft_eps,
      layer_views=layer_views, distribute_over=distribute_over, mesh=mesh)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    momentum: chex.Numeric | None = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    matrix_eps: chex.Numeric = 1e-6,
    stat_decay: optax.ScalarOrSchedule | None = None,
    *,
    block_size: int | None = None,
    inverse_every: int = 1,
    stats_every: int = 1,
    start_preconditioning_step: int = 1,
    graft: str = "sgd",
    graft_decay: chex.Numeric = 0.999,
    graft_eps: chex.Numeric = 1e-8,
    nesterov: bool = False,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    layer_views: Any = None,
    distribute_over: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Blocked Shampoo with grafting, trained the way the Eva paper trains it.

  ``chain(scale_by_shampoo, add_decayed_weights(weight_decay), trace(momentum),
  scale_by_learning_rate(learning_rate))``: the preconditioned and grafted
  gradient of every tensor of rank >= 2, the graft's step for the rest (the
  gradient for ``graft="sgd"``), then weight decay (added once, never
  preconditioned), heavy-ball momentum and the learning rate.

  .. math::
    d_t = \\mathrm{graft}(L^{-1/4} G_t R^{-1/4}) + \\lambda_t w_t, \\quad
    m_t = \\mu m_{t-1} + d_t, \\quad w_{t+1} = w_t - \\eta_t m_t.

  Unlike the authors' port of the Google reference, momentum updates its
  buffer once per step (theirs aliases it: ``m_t = mu^2 m_{t-1} + (1 + mu) d_t``)
  and 1-D parameters get weight decay once. The authors' example ignores
  ``damping`` and ``stat_decay`` for Shampoo: they run ``beta2 = 1`` (our
  ``stat_decay=None``), ``block_size=128``, graft SGD. Needs no layer
  statistics; passing ``stats=`` to ``update`` is harmless. The positional
  order is the other aliases' ``(learning_rate, momentum, weight_decay,
  damping, stat_decay)`` with Shampoo's ridge ``matrix_eps`` for ``damping``.

  Which graft: the paper's ``"sgd"`` gives each tensor the gradient's norm, so
  the learning rate must be one at which heavy-ball SGD is stable on the
  problem (on Rosenbrock, curvature ~1000, ``lr < 3.8e-3``: at 1e-2 it diverges
  like SGD); ``"adagrad"`` or ``"rmsprop"`` give steps of about ``lr`` per
  coordinate, for Adam-like learning rates (distributed Shampoo's usual
  setting).

  Args:
    learning_rate: ``eta``, a number, an array or an optax schedule.
    momentum: heavy-ball ``mu`` (0.9 in the paper); ``None`` for no momentum
      and no buffer, as ``optax.sgd``.
    weight_decay: ``lambda`` added after preconditioning (5e-4 on CIFAR in the
      paper); a number, an array or a schedule.
    matrix_eps: relative ridge of the inverse roots.
    stat_decay: ``None`` for running sums, or the weight of the new statistic.
    block_size: largest block side (``None``: 128).
    inverse_every: root refresh interval in steps.
    stats_every: statistics interval in steps.
    start_preconditioning_step: steps of the graft's step first.
    graft: ``"sgd"`` (the paper), ``"adagrad"`` or ``"rmsprop"``; see
      :func:`scale_by_shampoo`.
    graft_decay: RMSProp's ``beta`` for ``graft="rmsprop"``.
    graft_eps: added to the root of the graft's second moment.
    nesterov: Nesterov momentum instead of heavy ball.
    weight_decay_mask: which leaves are decayed, as ``optax.adamw(mask=...)``:
      a tree of booleans like the params (or a prefix), or a callable of the
      params returning one; ``None`` decays all.
    mu_dtype: dtype of the momentum buffer (``None``: the parameters').
    layer_views: for stacked layers (``nn.scan``), the capture's views; see
      :func:`scale_by_shampoo`.

    distribute_over: split the root refresh over this mesh axis; see
      :func:`scale_by_shampoo`.
    mesh: the mesh of ``distribute_over`` where ``jax.set_mesh`` does not set it.
  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, eva_optax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16, 2))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
    >>> tx = eva_optax.shampoo(learning_rate=0.1, inverse_every=10)
    >>> opt_state = tx.init(params)
    >>> loss, grads = jax.value_and_grad(loss_fn)(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor
    Optimization <https://arxiv.org/abs/1802.09568>`_, ICML 2018;
    Anil et al., `Scalable Second Order Optimization for Deep Learning
    <https://arxiv.org/abs/2002.09018>`_, 2020.
  """
  training_chain.check_training_hyperparameters(
      learning_rate, momentum, weight_decay, weight_decay_mask, mu_dtype)
  pre = scale_by_shampoo(
      matrix_eps, stat_decay, block_size=block_size,
      inverse_every=inverse_every, stats_every=stats_every,
      start_preconditioning_step=start_preconditioning_step, graft=graft,
      graft_decay=graft_decay, graft_eps=graft_eps, layer_views=layer_views,
      distribute_over=distribute_over, mesh=mesh)
  return training_chain.training_chain(
      pre, learning_rate, momentum, weight_decay, nesterov,
      weight_decay_mask=weight_decay_mask, mu_dtype=mu_dtype)
