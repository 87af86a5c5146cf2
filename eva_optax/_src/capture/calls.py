"""The statistics of one layer call, shared by every Flax backend.

A captured call is seen in its layer's *table orientation*
``y_row = [u_row, 1] W_hat`` (see :mod:`eva_optax._src.views`): ``u`` is the
input side (``d_in``, plus the bias entry) and ``w`` the output side (``d_out``).
For Dense, DenseGeneral, Einsum and Conv ``u`` is the layer input (a conv
patch) and ``w`` the gradient ``dL/dy``; an embedding lookup is a Dense layer on
one-hot rows; ``Embed.attend`` uses the table transposed, so there ``u`` is the
gradient ``dL/dlogits`` and ``w`` the query. Each side gives sums that the
capture later divides by counts:

* ``s`` = sum over rows, ``n`` = number of rows;
* ``F`` = sum over examples of ``e e^T`` where ``e`` is the example's mean over
  its positions (the authors' "reduce" approximation), ``m`` = number of
  examples; for a diagonal side (the one-hot side of an embedding) ``F`` is the
  diagonal of the per-row second moment, summed over rows, and ``m = n``;
* ``r`` = every row (the diagnostic ``"rows"`` mode).

Counts are computed from the data (not from shapes), so that under
:func:`jax.vmap` they are batched exactly like the sums and every ratio stays
a mean over the rows the computation really has.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
_F32 = jnp.float32


def data_ones(x: Array) -> Array:
  """Float32 ones shaped like ``x`` that depend on ``x`` (batched under vmap)."""
  return jnp.where(jnp.isnan(x), 1.0, 1.0).astype(_F32)


def _vary_like_data(zeros: Array, x: Array) -> Array:
  """``zeros`` cast to vary (inside ``shard_map``) along the axes ``x`` varies."""
  mat = getattr(jax.typeof(x), "mat", None)
  axes = tuple(sorted(getattr(mat, "varying", ()) or ()))
  return jax.lax.pcast(zeros, axes, to="varying") if axes else zeros


def side_from_rows(r: Array, mode: str, *, bias: bool = False,
                   diagonal: bool = False) -> dict[str, Array]:
  """Sums of one side from its rows ``r`` of shape (examples, positions, d)."""
  r = r.astype(_F32)
  ones = data_ones(r[..., 0])                       # (E, P)
  n = ones.sum()
  s = r.sum(axis=(0, 1))
  out = {"s": jnp.concatenate([s, n[None]]) if bias else s, "n": n}
  if mode in ("factors", "rows"):
    if diagonal:
      out["F"], out["m"] = jnp.sum(r * r, axis=(0, 1)), n
    else:
      e = r.mean(axis=1)
      if bias:
        e = jnp.concatenate([e, ones.mean(axis=1)[:, None]], axis=1)
      out["F"], out["m"] = e.T @ e, ones[:, 0].sum()
  if mode == "rows":
    flat = r.reshape(-1, r.shape[-1])
    out["r"] = (jnp.concatenate([flat, ones.reshape(-1, 1)], axis=1)
                if bias else flat)
  return out


# ----------------------------------------------------------------------------
# Calls: static descriptions of one captured call, built by the backends.


@dataclasses.dataclass(frozen=True)
class LinearCall:
  """``y = x W (+ b)`` contracting some axes of ``x`` (Dense, DenseGeneral, Einsum).

  ``x_batch`` / ``x_in``: the axes of ``x`` that index rows (in order) and the
  contracted axes (in the kernel's input order); ``y_batch`` / ``y_out``: the
  axes of ``y`` for the same rows (same order) and the kernel's output axes (in
  the kernel's order).
  """

  x_batch: tuple[int, ...]
  x_in: tuple[int, ...]
  y_batch: tuple[int, ...]
  y_out: tuple[int, ...]
  has_bias: bool

  u_from_output = False

  @staticmethod
  def _rows(t: Array, batch: tuple[int, ...], feat: tuple[int, ...]) -> Array:
    t = jnp.transpose(t, batch + feat)
    d = math.prod(t.shape[len(batch):])
    if not batch:
      return t.reshape(1, 1, d)
    return t.reshape(t.shape[0], -1, d)

  def u_side(self, x: Array, mode: str) -> dict[str, Array]:
    return side_from_rows(self._rows(x, self.x_batch, self.x_in), mode,
                          bias=self.has_bias)

  def w_side(self, ct: Array, mode: str) -> dict[str, Array]:
    return side_from_rows(self._rows(ct, self.y_batch, self.y_out), mode)


@dataclasses.dataclass(frozen=True)
class ConvCall:
  """A shared-kernel convolution, channels last (``nn.Conv``, ``nnx.Conv``).

  ``padding`` is already canonical (``"SAME"``, ``"VALID"`` or pairs);
  ``pre_pad`` and ``pad_mode`` describe the explicit padding Flax applies
  first for ``CIRCULAR``, ``REFLECT`` and ``CAUSAL``.
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Any
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  pre_pad: tuple[tuple[int, int], ...] | None
  pad_mode: str
  has_bias: bool

  u_from_output = False

  def _examples(self, x: Array) -> Array:
    """Input with all batch axes flattened into one leading axis, float32."""
    n_batch = x.ndim - (len(self.kernel_size) + 1)
    x = x.astype(_F32)
    x = x[None] if n_batch == 0 else x.reshape((-1,) + x.shape[n_batch:])
    if self.pre_pad is not None:
      x = jnp.pad(x, ((0, 0),) + self.pre_pad + ((0, 0),), mode=self.pad_mode)
    return x

  def _conv(self, x: Array, k: Array) -> Array:
    nd = len(self.kernel_size)
    spatial = "DHW"[3 - nd:]
    dn = jax.lax.conv_dimension_numbers(
        x.shape, k.shape, ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"))
    return jax.lax.conv_general_dilated(
        x, k, self.strides, self.padding, lhs_dilation=self.input_dilation,
        rhs_dilation=self.kernel_dilation, dimension_numbers=dn,
        precision=jax.lax.Precision.HIGHEST)

  def _patch_sum(self, x: Array) -> Array:
    """Sum of every patch of ``x`` (one leading batch axis), kernel order."""
    k0 = jnp.zeros(self.kernel_size + (x.shape[-1], 1), _F32)
    # Inside shard_map the kernel must vary like x, or the transpose would
    # already sum the patches over the shards (the capture sums them later).
    k0 = _vary_like_data(k0, x)
    out, transpose = jax.vjp(lambda k: self._conv(x, k), k0)  # linear in k
    (k_sum,) = transpose(jnp.ones_like(out))   # ones_like: same shard_map type
    return k_sum.reshape(-1)

  def _patch_rows(self, x: Array) -> Array:
    k0 = jnp.zeros(self.kernel_size + (x.shape[-1], 1), _F32)
    jac = jax.jacfwd(lambda k: self._conv(x, k)[..., 0])(k0)
    return jac.reshape(x.shape[0], -1, k0.size)

  def u_side(self, x: Array, mode: str) -> dict[str, Array]:
    xb = self._examples(x)
    k0 = jax.ShapeDtypeStruct(self.kernel_size + (xb.shape[-1], 1), _F32)
    out_shape = jax.eval_shape(self._conv, xb[:1], k0).shape
    positions = math.prod(out_shape[1:-1])
    ex_ones = data_ones(xb.reshape(xb.shape[0], -1)[:, 0])      # (E,)
    n = ex_ones.sum() * positions
    s = self._patch_sum(xb.sum(axis=0, keepdims=True))
    out = {"s": jnp.concatenate([s, n[None]]) if self.has_bias else s, "n": n}
    if mode in ("factors", "rows"):
      e = jax.vmap(lambda xe: self._patch_sum(xe[None]))(xb) / positions
      if self.has_bias:
        e = jnp.concatenate([e, ex_ones[:, None]], axis=1)
      out["F"], out["m"] = e.T @ e, ex_ones.sum()
    if mode == "rows":
      flat = self._patch_rows(xb).reshape(-1, math.prod(self.kernel_size)
                                          * xb.shape[-1])
      if self.has_bias:
        flat = jnp.concatenate([flat, data_ones(flat[:, 0])[:, None]], axis=1)
      out["r"] = flat
    return out

  def w_side(self, ct: Array, mode: str) -> dict[str, Array]:
    n_batch = max(ct.ndim - (len(self.kernel_size) + 1), 0)
    lead = ct.shape[:n_batch]
    rows = ct.reshape((math.prod(lead) if lead else 1, -1, ct.shape[-1]))
    return side_from_rows(rows, mode)


@dataclasses.dataclass(frozen=True)
class LookupCall:
  """``y = table[ids]``: a Dense layer on one-hot rows (``nn.Embed``).

  The one-hot rows are never built: their sum is the token counts, and their
  per-row second moment is diagonal (the same counts).
  """

  vocab: int

  u_from_output = False

  def u_side(self, ids: Array, mode: str) -> dict[str, Array]:
    flat = ids.reshape(-1)
    ones = data_ones(flat.astype(_F32))
    counts = jnp.zeros((self.vocab,), _F32).at[flat].add(ones, mode="drop")
    n = ones.sum()
    out = {"s": counts, "n": n}
    if mode in ("factors", "rows"):
      out["F"], out["m"] = counts, n
    if mode == "rows":
      out["r"] = jax.nn.one_hot(flat, self.vocab, dtype=_F32)
    return out

  def w_side(self, ct: Array, mode: str) -> dict[str, Array]:
    return side_from_rows(LinearCall._rows(
        ct, tuple(range(ct.ndim - 1)), (ct.ndim - 1,)), mode)


@dataclasses.dataclass(frozen=True)
class AttendCall:
  """``logits = query table^T`` (``nn.Embed.attend``), in the table's orientation.

  The input side (vocabulary) is the gradient ``dL/dlogits``, kept diagonal for
  the factors like a lookup's; the output side (features) is the query.
  """

  u_from_output = True

  def u_side(self, ct: Array, mode: str) -> dict[str, Array]:
    return side_from_rows(LinearCall._rows(
        ct, tuple(range(ct.ndim - 1)), (ct.ndim - 1,)), mode, diagonal=True)

  def w_side(self, query: Array, mode: str) -> dict[str, Array]:
    return side_from_rows(LinearCall._rows(
        query, tuple(range(query.ndim - 1)), (query.ndim - 1,)), mode)


_U_KEYS = {"s": "a", "n": "n_a", "F": "A", "m": "m_a", "r": "a_rows"}
_W_KEYS = {"s": "g", "n": "n_g", "F": "G", "m": "m_g", "r": "g_rows"}


def forward_sums(call: Any, x: Array, mode: str) -> dict[str, Array]:
  """The probe fields a call computes from its input ``x`` (the forward pass).

  ``x`` goes through an optimization barrier: when it is a compile-time
  constant (a batch closed over by a jitted step), XLA would otherwise fold
  the factors ``x^T x`` at compile time, which takes minutes for wide layers.
  """
  x = jax.lax.optimization_barrier(jax.lax.stop_gradient(x))
  if call.u_from_output:
    return {_W_KEYS[k]: v for k, v in call.w_side(x, mode).items()}
  return {_U_KEYS[k]: v for k, v in call.u_side(x, mode).items()}


def backward_sums(call: Any, ct: Array, mode: str) -> dict[str, Array]:
  """The probe fields a call computes from ``ct = dL/dy`` (the backward pass)."""
  if call.u_from_output:
    return {_U_KEYS[k]: v for k, v in call.u_side(ct, mode).items()}
  return {_W_KEYS[k]: v for k, v in call.w_side(ct, mode).items()}
