"""Shampoo's blocked statistics and inverse roots.

A gradient tensor is viewed as the matrix ``G = T.reshape(prod(shape[:-1]),
shape[-1])`` and cut into blocks of at most ``block_size`` rows and columns.
Per block the statistics ``L = sum G G^T`` and ``R = sum G^T G`` are kept as
``(L / tr L, R / tr R, log tr L)`` (``tr L = tr R = sum |G|_F^2``), built from
the gradient scaled by its max-abs, so that no gradient of float32's range
overflows them; the inverse fourth roots are of the normalized statistics.

References:
  Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor
  Optimization <https://arxiv.org/abs/1802.09568>`_, ICML 2018.
  Anil et al., `Scalable Second Order Optimization for Deep Learning
  <https://arxiv.org/abs/2002.09018>`_, 2020 (blocking, relative epsilon).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from eva_optax._src import linalg
from eva_optax._src import per_tensor

Array = jax.Array

ROOT = 4          # L^{-1/4} G R^{-1/4}: the 2-D Shampoo exponent -1/(2 r), r = 2.
# log tr of an all-zero statistic: far below any real one (>= log(tiny^2) ~ -200),
# finite so that differences of two of them are 0, not NaN.
LOG_ZERO = -1e4


def inverse_root(m: Array, exponent: float, epsilon: Any) -> Array:
  """``(m + epsilon * lambda_max I)^{-1/exponent}`` for a symmetric PSD ``m``.

  The ridge is relative to the largest eigenvalue, floored at 1e-30 so that an
  all-zero block maps to a finite matrix.
  """
  d, q = linalg.symmetric_eig(m, floor=0.0)
  lam_max = jnp.max(d, axis=-1, keepdims=True)
  ridge = jnp.maximum(epsilon * lam_max, 1e-30)
  scale = (d + ridge) ** (-1.0 / exponent)
  return (q * scale[..., None, :]) @ jnp.swapaxes(q, -1, -2)


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


def block_shapes(lay: "Layout", stack: tuple[int, ...] = ()
                 ) -> dict[str, tuple[int, ...]]:
  """The state's shapes for one tensor (``stack`` in front for stacked layers)."""
  nb = lay.num_blocks
  return {k: stack + v for k, v in {
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


def _describe(blocks: Any) -> str:
  if blocks is None:
    return "a tensor of rank <= 1 (not preconditioned)"
  left, right = tuple(blocks["L"].shape), tuple(blocks["R"].shape)
  if left[-3] == 1:
    return f"a ({left[-2]}, {right[-2]}) matrix view (statistics L {left}, R {right})"
  return f"blocks with statistics L {left} and R {right}"


def check_state(name: str, g: Any, blocks: Any, acc: Any, graft: str,
                block_size: int, depth: int) -> None:
  """The state of one leaf matches its gradient, or a ValueError naming both."""
  if per_tensor.is_preconditioned(g, depth):
    want = block_shapes(
        block_layout(g.shape[depth:], block_size),
        tuple(g.shape[:depth]))
    if blocks is None or any(tuple(blocks[k].shape) != want[k]
                             for k in KEYS):
      per_tensor.raise_mismatch(
          "shampoo", name, g.shape,
          f"{_describe(blocks)}; this gradient needs statistics L {want['L']} "
          f"and R {want['R']}")
  elif blocks is not None:
    per_tensor.raise_mismatch("shampoo", name, g.shape, _describe(blocks))
  if graft != "sgd" and tuple(acc.shape) != tuple(jnp.shape(g)):
    per_tensor.raise_mismatch("shampoo", name, jnp.shape(g), acc.shape)


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


def merge_stack(b: dict[str, Array], depth: int) -> dict[str, Array]:
  """A stacked leaf's blocks (``stack + (blocks, ...)``) as ``(slices * blocks, ...)``."""
  return {k: v.reshape((-1,) + v.shape[depth + 1:]) for k, v in b.items()}


def split_stack(flat: dict[str, Array], like: dict[str, Array]) -> dict[str, Array]:
  """Inverse of :func:`merge_stack`: back to the shapes of ``like``."""
  return {k: v.reshape(like[k].shape) for k, v in flat.items()}


def refresh_if(due: Array, blocks: list[Any], depths: list[int], eps: Array
               ) -> list[Any]:
  """The roots of every block refreshed from its statistics when ``due``
  (inside :func:`jax.lax.cond`); a stack's slices count as more blocks."""
  if all(b is None for b in blocks):
    return blocks
  flat = [None if b is None else merge_stack(b, k) for b, k in zip(blocks, depths)]
  flat = jax.lax.cond(due, refresh_roots, keep_roots, (flat, eps))
  return [None if b is None else split_stack(f, b) for f, b in zip(flat, blocks)]


def refresh_roots(operand):
  """The roots of every block from its statistics (``operand = (blocks, eps)``).

  Module-level (as :func:`keep_roots`), so that :func:`jax.lax.cond` reuses
  its traced branches from one call to the next, also outside :func:`jax.jit`.
  """
  blocks, eps = operand

  def one(b):
    if b is None:
      return None
    usable = (b["log_scale"] > LOG_ZERO / 2)[:, None, None]
    left = inverse_root(b["L"], ROOT, eps)
    right = inverse_root(b["R"], ROOT, eps)
    ok = (usable & jnp.all(jnp.isfinite(left), axis=(1, 2), keepdims=True)
          & jnp.all(jnp.isfinite(right), axis=(1, 2), keepdims=True))
    return dict(b, L_root=jnp.where(ok, left, b["L_root"]),
                R_root=jnp.where(ok, right, b["R_root"]),
                root_log_scale=jnp.where(ok[:, 0, 0], b["log_scale"],
                                         b["root_log_scale"]))
  return [one(b) for b in blocks]


def keep_roots(operand):
  return operand[0]
