"""Per-layer-type views: how a Flax layer's input and output gradient become statistics.

Every captured layer is seen as a matrix product ``y = [x, 1] W_hat`` with
``W_hat = [kernel_2d; bias]`` of shape ``(d_in + 1, d_out)``: the kernel flattened
to ``(d_in, d_out)`` in its own memory order, the bias as the last row. One *row* is
one example at one position (a token, or a conv output pixel whose input is the
image patch). The statistics are sums over rows (or examples) that the capture
divides by the counts at the end, so a module called several times pools all its
rows, exactly as if its calls had been one call on the concatenated rows.

* ``a`` = sum over rows of ``[x_row, 1]``, ``n`` = number of rows;
* ``g`` = sum over rows of ``dL/dy_row`` (the loss is the user's, usually a batch mean);
* ``A`` = sum over examples of ``[x_e, 1][x_e, 1]^T`` and ``G`` = sum over examples of
  ``g_e g_e^T``, where ``x_e`` and ``g_e`` are the *means over the example's
  positions* (the authors' "reduce" approximation), ``m`` = number of examples;
* ``a_rows`` / ``g_rows``: every row itself (a diagnostic mode for tests).

Conv patches are never materialised for the vectors: conv is linear in both its
input and its kernel, so the sum of all patches is the kernel-gradient (a linear
transpose) of a one-output-channel copy of the layer applied to the batch-summed
input. That reuses Flax's own padding, stride and dilation logic, and gives the
patch entries in the kernel's own flattening order (kh, kw, C_in).
"""

from __future__ import annotations

import dataclasses
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one captured layer call (hashable)."""

  kind: str                 # "Dense" | "DenseGeneral" | "Conv"
  d_in: int                 # input features per row, without the bias entry
  d_out: int                # output features per row
  has_bias: bool
  out_example_axes: int     # leading axes of the output that index examples
  out_rows: int             # rows in this call's output


def unsupported_reason(module: nn.Module) -> str | None:
  """Why a module with a ``kernel`` is not captured (``None`` if it is)."""
  kind = type(module)
  if kind is nn.Conv:
    if module.feature_group_count != 1:
      return (f"feature_group_count={module.feature_group_count} (grouped or "
              "depthwise convolution) is not supported")
    if module.mask is not None:
      return "masked convolution (mask=...) is not supported"
    return None
  if kind is nn.DenseGeneral:
    if tuple(np.atleast_1d(module.batch_dims)):
      return "DenseGeneral with batch_dims is not supported"
    return None
  if kind is nn.Dense:
    return None
  return f"layer type {kind.__name__} is not supported"


def is_supported(module: nn.Module) -> bool:
  return type(module) in (nn.Dense, nn.DenseGeneral, nn.Conv) and (
      unsupported_reason(module) is None)


# ----------------------------------------------------------------------------
# Input side: rows of [x, 1] as (examples, positions, d_in).


def _dense_general_axes(module: nn.Module, ndim: int) -> tuple[int, ...]:
  axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
  return tuple(sorted(a if a >= 0 else ndim + a for a in axis))


def _linear_rows(module: nn.Module, x: Array) -> Array:
  """Dense / DenseGeneral input as (examples, positions, d_in), float32."""
  x = x.astype(_F32)
  if type(module) is nn.DenseGeneral:
    axes = _dense_general_axes(module, x.ndim)
    k = len(axes)
    x = jnp.moveaxis(x, axes, tuple(range(x.ndim - k, x.ndim)))
    d_in = int(np.prod(x.shape[x.ndim - k:]))
    x = x.reshape(x.shape[:x.ndim - k] + (d_in,))
  if x.ndim == 1:
    return x.reshape(1, 1, -1)
  return x.reshape(x.shape[0], -1, x.shape[-1])


def _conv_one_channel(module: nn.Module) -> nn.Module:
  """A single-output-channel, bias-free float32 copy of a conv layer."""
  return module.clone(parent=None, features=1, use_bias=False,
                      dtype=_F32, param_dtype=_F32)


def _conv_examples(module: nn.Module, x: Array) -> Array:
  """Conv input with all batch axes flattened into one leading axis."""
  n_spatial = len(module.kernel_size)
  n_batch = x.ndim - (n_spatial + 1)
  x = x.astype(_F32)
  if n_batch == 0:
    return x[None]
  return x.reshape((-1,) + x.shape[n_batch:])


def _conv_patch_sum(module: nn.Module, x: Array) -> Array:
  """Sum over the rows of ``x``'s batch and output positions of its patches.

  Returns a vector of length ``prod(kernel_size) * C_in``, in the kernel's order.
  ``x`` has one leading batch axis.
  """
  clone = _conv_one_channel(module)
  c_in = x.shape[-1]
  k0 = jnp.zeros(tuple(module.kernel_size) + (c_in, 1), _F32)
  fn = lambda k: clone.apply({"params": {"kernel": k}}, x)
  out_shape = jax.eval_shape(fn, k0).shape
  (k_sum,) = jax.linear_transpose(fn, k0)(jnp.ones(out_shape, _F32))
  return k_sum.reshape(-1)


def _conv_patch_rows(module: nn.Module, x: Array) -> Array:
  """All patches of ``x`` as (examples, positions, d_in) (diagnostic mode)."""
  clone = _conv_one_channel(module)
  c_in = x.shape[-1]
  k0 = jnp.zeros(tuple(module.kernel_size) + (c_in, 1), _F32)
  fn = lambda k: clone.apply({"params": {"kernel": k}}, x)[..., 0]
  jac = jax.jacfwd(fn)(k0)  # (B, *out_spatial, *kernel_size, C_in, 1)
  b = x.shape[0]
  d_in = int(np.prod(k0.shape))
  return jac.reshape(b, -1, d_in)


def _append_one(v: Array) -> Array:
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def input_statistics(module: nn.Module, x: Array, spec: LayerSpec,
                     mode: str) -> dict[str, Array]:
  """Forward-side sums: ``a``, ``n`` (+ ``A``, ``m``; + ``a_rows``)."""
  x = jax.lax.stop_gradient(x)
  rows = spec.out_rows
  out: dict[str, Array] = {}
  if spec.kind == "Conv":
    xb = _conv_examples(module, x)
    a_sum = _conv_patch_sum(module, xb.sum(axis=0, keepdims=True))
    if mode in ("factors", "rows"):
      positions = rows // xb.shape[0]
      per_example = jax.vmap(lambda xe: _conv_patch_sum(module, xe[None]))(xb)
      examples = per_example / positions
    if mode == "rows":
      row_view = _conv_patch_rows(module, xb)
  else:
    row_view = _linear_rows(module, x)
    a_sum = row_view.sum(axis=(0, 1))
    examples = row_view.mean(axis=1)
  out["a"] = jnp.concatenate([a_sum, jnp.full((1,), rows, _F32)]) \
      if spec.has_bias else a_sum
  out["n"] = jnp.asarray(rows, _F32)
  if mode in ("factors", "rows"):
    e = _append_one(examples) if spec.has_bias else examples
    out["A"] = e.T @ e
    out["m"] = jnp.asarray(e.shape[0], _F32)
  if mode == "rows":
    r = row_view.reshape(-1, spec.d_in)
    out["a_rows"] = _append_one(r) if spec.has_bias else r
  return out


def output_statistics(spec: LayerSpec, ct: Array, mode: str) -> dict[str, Array]:
  """Backward-side sums from ``ct = dL/dy``: ``g`` (+ ``G``; + ``g_rows``)."""
  ct = ct.astype(_F32)
  n_ex = int(np.prod(ct.shape[:spec.out_example_axes]))
  rows = ct.reshape(n_ex, -1, spec.d_out)
  out = {"g": rows.sum(axis=(0, 1))}
  if mode in ("factors", "rows"):
    ge = rows.mean(axis=1)
    out["G"] = ge.T @ ge
  if mode == "rows":
    out["g_rows"] = rows.reshape(-1, spec.d_out)
  return out


def make_spec(module: nn.Module, x: Array, y: Array) -> LayerSpec:
  """Builds the static spec of one call from the module and its input/output."""
  kind = type(module).__name__
  if type(module) is nn.Conv:
    d_out = module.features
    d_in = int(np.prod(module.kernel_size)) * x.shape[-1]
    n_batch = x.ndim - (len(module.kernel_size) + 1)
    out_example_axes = max(n_batch, 0)
  else:
    feats = module.features
    feats = tuple(feats) if isinstance(feats, (tuple, list)) else (feats,)
    d_out = int(np.prod(feats))
    if type(module) is nn.DenseGeneral:
      axes = _dense_general_axes(module, x.ndim)
      d_in = int(np.prod([x.shape[a] for a in axes]))
      lead = x.ndim - len(axes)
    else:
      d_in = x.shape[-1]
      lead = x.ndim - 1
    out_example_axes = 1 if lead >= 1 else 0
  out_rows = int(np.prod(y.shape)) // d_out
  return LayerSpec(kind=kind, d_in=int(d_in), d_out=int(d_out),
                   has_bias=bool(module.use_bias),
                   out_example_axes=out_example_axes, out_rows=out_rows)


def probe_shapes(spec: LayerSpec, mode: str) -> dict[str, tuple[int, ...]]:
  """Shapes of the zero probes whose cotangents carry the statistics."""
  d_a = spec.d_in + int(spec.has_bias)
  shapes = {"a": (d_a,), "n": (), "g": (spec.d_out,)}
  if mode in ("factors", "rows"):
    shapes.update({"A": (d_a, d_a), "G": (spec.d_out, spec.d_out), "m": ()})
  if mode == "rows":
    shapes.update({"a_rows": (spec.out_rows, d_a),
                   "g_rows": (spec.out_rows, spec.d_out)})
  return shapes

