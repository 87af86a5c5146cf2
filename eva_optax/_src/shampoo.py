"""Shampoo: the full-matrix baseline Eva-s vectorizes (blocked, two-sided).

For a gradient matrix ``G`` Shampoo keeps ``L = sum G G^T`` and
``R = sum G^T G`` and preconditions with ``L^{-1/4} G R^{-1/4}``. Large matrices
are split into blocks of at most ``block_size x block_size`` with one ``(L, R)``
pair per block, as in the scalable Shampoo of Anil et al. The state per block is
the two statistics and their two inverse roots: ``2 (b_r^2 + b_c^2)`` floats for a
``b_r x b_c`` block.

References:
  Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor
  Optimization <https://arxiv.org/abs/1802.09568>`_, ICML 2018.
  Anil et al., `Scalable Second Order Optimization for Deep Learning
  <https://arxiv.org/abs/2002.09018>`_, 2020 (blocking, grafting, relative
  epsilon).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax._src import counters
from eva_optax._src import linalg
from eva_optax._src import tree_utils
from eva_optax._src import validation
from eva_optax._src.training_chain import training_chain

Array = jax.Array

_ROOT = 4          # L^{-1/4} G R^{-1/4}: the 2-D Shampoo exponent -1/(2 r), r = 2.
_GRAFT_EPS = 1e-16



def _is_preconditioned(leaf: Any) -> bool:
  """Tensors of rank >= 2 (kernels, conv kernels) get Shampoo; the rest pass."""
  return hasattr(leaf, "ndim") and leaf.ndim >= 2 and leaf.size > 0


def inverse_root(m: Array, exponent: float, epsilon: float) -> Array:
  """``(m + epsilon * lambda_max I)^{-1/exponent}`` for a symmetric PSD ``m``.

  The ridge is relative to the largest eigenvalue, floored at 1e-30 so that an
  all-zero block maps to a finite matrix.
  """
  d, q = linalg.symmetric_eig(m, floor=0.0)
  lam_max = jnp.max(d, axis=-1, keepdims=True)
  ridge = jnp.maximum(epsilon * lam_max, 1e-30)
  scale = (d + ridge) ** (-1.0 / exponent)
  return (q * scale[..., None, :]) @ jnp.swapaxes(q, -1, -2)


class _Layout(NamedTuple):
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


def block_layout(shape: tuple[int, ...], block_size: int) -> _Layout:
  """The blocking of a tensor viewed as ``(prod(shape[:-1]), shape[-1])``.

  A side no longer than ``block_size`` is one block of its own length (no
  padding); a longer side is cut into ``ceil(side / block_size)`` blocks of
  ``block_size``, the last one padded with zeros.
  """
  m, n = math.prod(shape[:-1]), shape[-1]
  br, bc = min(m, block_size), min(n, block_size)
  return _Layout(m, n, br, bc, -(-m // br), -(-n // bc))


def to_blocks(t: Array, lay: _Layout) -> Array:
  """``(m, n)`` (or any shape of that size) -> ``(nr * nc, br, bc)``, zero padded."""
  t = t.reshape(lay.m, lay.n)
  t = jnp.pad(t, ((0, lay.nr * lay.br - lay.m), (0, lay.nc * lay.bc - lay.n)))
  t = t.reshape(lay.nr, lay.br, lay.nc, lay.bc).transpose(0, 2, 1, 3)
  return t.reshape(lay.num_blocks, lay.br, lay.bc)


def from_blocks(b: Array, lay: _Layout) -> Array:
  """Inverse of :func:`to_blocks`: back to ``(m, n)``, padding dropped."""
  t = b.reshape(lay.nr, lay.nc, lay.br, lay.bc).transpose(0, 2, 1, 3)
  return t.reshape(lay.nr * lay.br, lay.nc * lay.bc)[:lay.m, :lay.n]


_DEFAULT_BLOCK_SIZE = 128  # the authors' block size


class ScaleByShampooState(NamedTuple):
  """State of :func:`scale_by_shampoo`: per block, two statistics and their roots."""

  count: Array            # shape=(), dtype=jnp.int32: update calls so far.
  stats_count: Array      # shape=(), dtype=jnp.int32: statistics accumulated.
  nonfinite_count: Array  # shape=(), dtype=jnp.int32: statistics skipped as non-finite.
  skipped_count: Array    # shape=(), int32: updates replaced by zeros (non-finite).
  invalid_hparam_count: Array  # shape=(), int32: steps skipped for a bad run-time hyperparameter.
  # Like params: per leaf of rank >= 2 a dict of float32 arrays "L", "L_root"
  # (shape (blocks, br, br)) and "R", "R_root" (shape (blocks, bc, bc)); an
  # empty tuple for the leaves that pass through.
  blocks: Any


def scale_by_shampoo(
    *,
    stat_decay: Any = None,
    block_size: int | None = None,
    matrix_eps: float = 1e-6,
    inverse_every: int = 1,
    stats_every: int = 1,
    start_preconditioning_step: int = 1,
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
    P \\leftarrow P\\,\\frac{\\|G\\|_F}{\\|P\\|_F + 10^{-16}},

  with the rescale ("grafting" to SGD, as the authors) over the whole tensor.
  The roots are ``(M + matrix_eps * lambda_max(M) I)^{-1/4}`` by
  eigendecomposition (relative epsilon, as scalable Shampoo), computed inside
  :func:`jax.lax.cond` when ``count % inverse_every == 0`` and kept in the state
  in between. Statistics (zeros at init) are folded in first when
  ``count % stats_every == 0``, so a refresh uses them: ``stat_decay=None`` sums
  them (the authors' ``beta2 = 1``); a float gives the running average
  ``M <- (1 - stat_decay) M + stat_decay * new`` (``stat_decay`` is the weight
  of the NEW statistic, as everywhere in this library) whose first observation
  initialises it. Non-finite statistics are skipped (the whole step's) and
  counted in ``nonfinite_count``; a root that comes out non-finite (e.g. of an
  all-zero block) keeps its previous value (the identity at init).

  The first ``start_preconditioning_step`` updates (``count < start``) return
  the plain gradient, while statistics and roots are already accumulated.
  Tensors of rank <= 1 pass through. Everything runs in float32 with full
  float32 matmuls (``precision="highest"``, no TF32); updates come back in the
  gradient dtype. ``update`` ignores extra keyword arguments (``stats=``).
  See :func:`eva_optax.shampoo` for the full optimizer.

  Args:
    stat_decay: ``None`` for running sums (the authors' setting), or the weight
      in ``[0, 1]`` of the new statistic (float or schedule).
    block_size: largest block side; ``None`` means the authors' 128 (a
      ``None`` default also keeps it static under ``optax.inject_hyperparams``).
    matrix_eps: relative ridge ``epsilon > 0`` of the inverse roots.
    inverse_every: recompute the roots every this many steps (>= 1).
    stats_every: accumulate statistics every this many steps (>= 1).
    start_preconditioning_step: steps of plain gradient before preconditioning
      (>= 0; 0 preconditions from the first update, as the authors' 1-indexed
      ``start_preconditioning_step=1``).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

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
      "block_size", _DEFAULT_BLOCK_SIZE if block_size is None else block_size)
  validation.check_positive(
      "matrix_eps", matrix_eps,
      fix="It is the relative ridge of the inverse roots; 1e-6 is typical.")
  if callable(matrix_eps):
    raise TypeError("matrix_eps must be a number, not a schedule.")
  validation.check_interval("inverse_every", inverse_every)
  validation.check_interval("stats_every", stats_every)
  validation.check_interval("start_preconditioning_step",
                            start_preconditioning_step, minimum=0)

  def init_fn(params):
    def init_leaf(p):
      if not _is_preconditioned(p):
        return ()
      lay = block_layout(p.shape, block_size)
      eye = lambda d: jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32),
                                       (lay.num_blocks, d, d))
      zeros = lambda d: jnp.zeros((lay.num_blocks, d, d), jnp.float32)
      return {"L": zeros(lay.br), "R": zeros(lay.bc),
              "L_root": eye(lay.br), "R_root": eye(lay.bc)}
    return ScaleByShampooState(
        **counters.zero_counters(),
        blocks=jax.tree.map(init_leaf, params))

  def refresh(blocks):
    def root(m, old):
      new = inverse_root(m, _ROOT, matrix_eps)
      ok = jnp.all(jnp.isfinite(new), axis=(-2, -1), keepdims=True)
      return jnp.where(ok, new, old)
    return [b if not b else dict(b, L_root=root(b["L"], b["L_root"]),
                                 R_root=root(b["R"], b["R_root"]))
            for b in blocks]

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    leaves, treedef = jax.tree.flatten(updates)
    old = tree_utils.leaves_like(treedef, state.blocks, "shampoo")
    count = state.count

    with jax.default_matmul_precision("highest"):
      # Blocked gradients and this step's statistics.
      layouts = [block_layout(g.shape, block_size) if _is_preconditioned(g)
                 else None for g in leaves]
      gblocks = [to_blocks(g.astype(jnp.float32), lay) if lay else None
                 for g, lay in zip(leaves, layouts)]
      obs = [{"L": jnp.einsum("bij,bkj->bik", gb, gb),
              "R": jnp.einsum("bji,bjk->bik", gb, gb)} if gb is not None else {}
             for gb in gblocks]
      averages, due, finite = counters.fold_statistics(
          state, [{k: b[k] for k in o} for b, o in zip(old, obs)], obs,
          stat_decay, stats_every)
      blocks = [{**b, **avg} if b else b for b, avg in zip(old, averages)]

      # Periodic refresh of the inverse roots, from the statistics just folded in.
      if any(blocks):
        blocks = jax.lax.cond((count % inverse_every) == 0, refresh,
                              lambda bs: bs, blocks)

      # Precondition, graft to the gradient norm, fall back before the start.
      out = []
      for g, lay, gb, b in zip(leaves, layouts, gblocks, blocks):
        if lay is None:
          out.append(g)
          continue
        p = from_blocks(b["L_root"] @ gb @ b["R_root"], lay)
        t = g.astype(jnp.float32).reshape(lay.m, lay.n)
        scale = jnp.sqrt(jnp.sum(t * t)) / (jnp.sqrt(jnp.sum(p * p)) + _GRAFT_EPS)
        p = jnp.where(count >= start_preconditioning_step, p * scale, t)
        out.append(p.reshape(g.shape).astype(g.dtype))

    new_state = ScaleByShampooState(
        **counters.advance_counters(state, due, finite),
        blocks=jax.tree.unflatten(treedef, blocks))
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def shampoo(
    learning_rate: Any,
    momentum: Any = 0.9,
    weight_decay: Any = 0.0,
    *,
    stat_decay: Any = None,
    block_size: int | None = None,
    matrix_eps: float = 1e-6,
    inverse_every: int = 1,
    stats_every: int = 1,
    start_preconditioning_step: int = 1,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Blocked Shampoo with SGD grafting, trained the way the Eva paper trains it.

  ``chain(scale_by_shampoo, add_decayed_weights(weight_decay), trace(momentum),
  scale_by_learning_rate(learning_rate))``: the preconditioned (and grafted)
  gradient of every tensor of rank >= 2, the plain gradient for the rest, then
  weight decay (added once, never preconditioned), heavy-ball momentum and the
  learning rate.

  .. math::
    d_t = \\mathrm{graft}(L^{-1/4} G_t R^{-1/4}) + \\lambda w_t, \\quad
    m_t = \\mu m_{t-1} + d_t, \\quad w_{t+1} = w_t - \\eta_t m_t.

  Unlike the authors' port of the Google reference, momentum updates its
  buffer once per step (theirs aliases it: ``m_t = mu^2 m_{t-1} + (1 + mu) d_t``)
  and 1-D parameters get weight decay once. The authors' example ignores
  ``damping`` and ``stat_decay`` for Shampoo: they run ``beta2 = 1`` (our
  ``stat_decay=None``), ``block_size=128``, graft SGD. Needs no layer
  statistics; passing ``stats=`` to ``update`` is harmless.

  Args:
    learning_rate: float or optax schedule.
    momentum: heavy-ball momentum (0.9 in the paper); 0 for none.
    weight_decay: added after preconditioning (5e-4 on CIFAR in the paper).
    stat_decay: ``None`` for running sums, or the weight of the new statistic.
    block_size: largest block side (``None``: 128).
    matrix_eps: relative ridge of the inverse roots.
    inverse_every: root refresh interval in steps.
    stats_every: statistics interval in steps.
    start_preconditioning_step: steps of plain gradient first.
    nesterov: Nesterov momentum instead of heavy ball.

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
  pre = scale_by_shampoo(
      stat_decay=stat_decay, block_size=block_size, matrix_eps=matrix_eps,
      inverse_every=inverse_every, stats_every=stats_every,
      start_preconditioning_step=start_preconditioning_step)
  return training_chain(pre, learning_rate, momentum, weight_decay, nesterov)
