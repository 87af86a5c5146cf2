"""Flax layers (linen and NNX) as captured calls: which call, which view.

Each function takes a layer's attributes and its input and output shapes and
returns ``(kind, call, view)``: the static description of the call
(:mod:`eva_optax._src.layer_ops`) and the per-slice :class:`LayerView` of its
weight, or raises :class:`NotCaptured` with the reason. The linen and NNX
backends only read their modules' attributes and call these; everything else
about the capture is shared between the two APIs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eva_optax._src.capture import calls
from eva_optax._src.vocabulary.views import LayerView


class NotCaptured(Exception):
  """A layer call whose statistics cannot be captured exactly (with the reason)."""


def _tuple(x: Any, n: int) -> tuple[int, ...]:
  if x is None:
    x = 1
  if isinstance(x, int):
    return (x,) * n
  return tuple(int(v) for v in x)


def _normalize(axes: Any, ndim: int) -> tuple[int, ...]:
  axes = axes if isinstance(axes, (tuple, list)) else (axes,)
  return tuple(sorted(a if a >= 0 else ndim + a for a in axes))


def dense(x, y, use_bias: bool) -> tuple[str, Any, LayerView]:
  d_in, d_out = x.shape[-1], y.shape[-1]
  call = calls.LinearCall(
      x_batch=tuple(range(x.ndim - 1)), x_in=(x.ndim - 1,),
      y_batch=tuple(range(y.ndim - 1)), y_out=(y.ndim - 1,), has_bias=use_bias)
  view = LayerView(kind="Dense", param="kernel", stack=(), shape=(d_in, d_out),
                   in_axes=(0,), out_axes=(1,), has_bias=use_bias)
  return "Dense", call, view


def registered_dense(x, y, spec: Any, has_bias: bool,
                     kind: str) -> tuple[str, Any, LayerView]:
  """A layer declared with :func:`eva_optax.register_dense` (``x @ W + b``
  over the last axis; ``W`` stored ``(d_out, d_in)`` when transposed)."""
  _, call, view = dense(x, y, has_bias)
  if spec.transposed:
    view = LayerView(kind=kind, param=spec.kernel, stack=(),
                     shape=(view.d_out, view.d_in), in_axes=(1,), out_axes=(0,),
                     has_bias=has_bias, bias_param=spec.bias)
  else:
    view = LayerView(kind=kind, param=spec.kernel, stack=(), shape=view.shape,
                     in_axes=(0,), out_axes=(1,), has_bias=has_bias,
                     bias_param=spec.bias)
  return kind, call, view


def dense_general(x, y, axis, features, use_bias: bool,
                  kind: str = "DenseGeneral") -> tuple[str, Any, LayerView]:
  axis = _normalize(axis, x.ndim)
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  batch = tuple(a for a in range(x.ndim) if a not in axis)
  nb, na, nf = len(batch), len(axis), len(features)
  call = calls.LinearCall(
      x_batch=batch, x_in=axis, y_batch=tuple(range(nb)),
      y_out=tuple(range(nb, nb + nf)), has_bias=use_bias)
  shape = tuple(x.shape[a] for a in axis) + tuple(int(f) for f in features)
  view = LayerView(kind=kind, param="kernel", stack=(), shape=shape,
                   in_axes=tuple(range(na)), out_axes=tuple(range(na, na + nf)),
                   has_bias=use_bias)
  return kind, call, view


def conv(x, *, kernel_size, strides, padding, input_dilation, kernel_dilation,
         use_bias, features, feature_group_count, mask,
         canonicalize_padding) -> tuple[str, Any, LayerView]:
  if feature_group_count != 1:
    raise NotCaptured(f"feature_group_count={feature_group_count} (grouped or "
                      "depthwise convolution) is not supported")
  if mask is not None:
    raise NotCaptured("masked convolution (mask=...) is not supported")
  ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  nd = len(ks)
  if nd > 3:
    raise NotCaptured(f"{nd}-dimensional convolution is not supported")
  strides, dil = _tuple(strides, nd), _tuple(kernel_dilation, nd)
  in_dil = _tuple(input_dilation, nd)
  pad = canonicalize_padding(padding, nd)
  pre_pad, mode = None, "constant"
  if pad in ("CIRCULAR", "REFLECT"):
    kd = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
    pre_pad = tuple(((k - 1) // 2, k // 2) for k in kd)
    mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad]
    pad = "VALID"
  elif pad == "CAUSAL":
    if nd != 1:
      raise NotCaptured("CAUSAL padding needs a 1-D convolution")
    pre_pad, pad = ((dil[0] * (ks[0] - 1), 0),), "VALID"
  if not isinstance(pad, str):
    pad = tuple((int(lo), int(hi)) for lo, hi in pad)
  call = calls.ConvCall(
      kernel_size=ks, strides=strides, padding=pad, input_dilation=in_dil,
      kernel_dilation=dil, pre_pad=pre_pad, pad_mode=mode, has_bias=use_bias)
  c_in = x.shape[-1]
  view = LayerView(kind="Conv", param="kernel", stack=(),
                   shape=ks + (int(c_in), int(features)),
                   in_axes=tuple(range(nd + 1)), out_axes=(nd + 1,),
                   has_bias=use_bias)
  return "Conv", call, view


def embed(method: str, vocab: int, features: int) -> tuple[str, Any, LayerView]:
  view = LayerView(kind="Embed", param="embedding", stack=(),
                   shape=(int(vocab), int(features)), in_axes=(0,),
                   out_axes=(1,), has_bias=False, diagonal=True)
  if method == "attend":
    return "Embed.attend", calls.AttendCall(), view
  return "Embed", calls.LookupCall(vocab=int(vocab)), view


def einsum(equation: str, x, kernel_shape, use_bias: bool
           ) -> tuple[str, Any, LayerView]:
  """An ``nn.Einsum`` call, if its equation is a linear map of its input.

  Each kernel index must be either contracted with the input (and absent from
  the output) or an output feature (absent from the input), and every other
  input index must reach the output (a row index).
  """
  import opt_einsum  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  eq = equation.replace(" ", "")
  operands, out, _ = opt_einsum.parser.parse_einsum_input(
      (eq, x, jax.ShapeDtypeStruct(tuple(kernel_shape), np.float32)))
  lhs, rhs = operands.split(",")
  if len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs):
    raise NotCaptured(f"einsum {eq!r} repeats an index within an operand")
  contracted = [c for c in rhs if c in lhs and c not in out]
  outputs = [c for c in rhs if c not in lhs and c in out]
  if len(contracted) + len(outputs) != len(rhs):
    raise NotCaptured(f"einsum {eq!r} is not a linear map of its input with a "
                      "shared kernel (a kernel index is both in the input and "
                      "the output, or in neither)")
  batch = [c for c in lhs if c not in rhs]
  if any(c not in out for c in batch):
    raise NotCaptured(f"einsum {eq!r} sums over an input index that is not in "
                      "the kernel")
  call = calls.LinearCall(
      x_batch=tuple(lhs.index(c) for c in batch),
      x_in=tuple(lhs.index(c) for c in contracted),
      y_batch=tuple(out.index(c) for c in batch),
      y_out=tuple(out.index(c) for c in outputs), has_bias=use_bias)
  bias_letters = [c for c in out if c in rhs]
  bias_axes = tuple(bias_letters.index(c) for c in outputs)
  if bias_axes == tuple(range(len(bias_axes))):
    bias_axes = None
  view = LayerView(kind="Einsum", param="kernel", stack=(),
                   shape=tuple(int(d) for d in kernel_shape),
                   in_axes=tuple(rhs.index(c) for c in contracted),
                   out_axes=tuple(rhs.index(c) for c in outputs),
                   has_bias=use_bias, bias_axes=bias_axes if use_bias else None)
  return "Einsum", call, view


def rows_of(call: Any, x) -> int:
  """Rows one call contributes (for the diagnostic ``"rows"`` mode)."""
  if isinstance(call, calls.LinearCall):
    return int(np.prod([x.shape[a] for a in call.x_batch]))
  if isinstance(call, calls.ConvCall):
    import jax  # pylint: disable=g-import-not-at-top
    xb = jax.eval_shape(call._examples, x)   # pylint: disable=protected-access
    k = jax.ShapeDtypeStruct(call.kernel_size + (xb.shape[-1], 1), np.float32)
    out = jax.eval_shape(call._conv, xb, k)  # pylint: disable=protected-access
    return int(np.prod(out.shape[:-1]))
  return int(np.prod(x.shape[:-1])) if isinstance(call, calls.AttendCall) \
      else int(np.prod(x.shape))
