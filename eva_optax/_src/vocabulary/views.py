"""Layer views: how a layer's parameters are seen as one matrix ``W_hat``.

Every layer the library preconditions is a linear map ``y = [x, 1] W_hat`` per
*row* (one example at one position), with ``W_hat = [W; b]`` of shape
``(d_in + 1, d_out)``: the kernel as a ``(d_in, d_out)`` matrix and the bias as
its last row. A :class:`LayerView` says which axes of the stored parameter are
the input side and which the output side, and which leading axes *stack*
independent layers (``nn.scan``, ``nn.vmap`` with per-member parameters, or
parameters stacked by hand): each slice of the stack is its own layer.

The view is static (hashable) and travels with the statistics
(:class:`eva_optax.LayerStatistics` ``.view``), so the optimizers read the layer
exactly as the capture saw it. :func:`infer` gives the view of a parameter node
from its shapes alone; it is what an optimizer falls back to at ``init`` (where
only the parameters are known), and it is right for Dense, Conv, Embed and
DenseGeneral layers whose output axes the bias reveals; stacked layers and
bias-free layers with several output axes need the views of the capture
(see :func:`eva_optax.layer_views`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerView:
  """How one parameter node is seen as a stack of ``(d_in, d_out)`` matrices.

  Attributes:
    kind: the layer type (``"Dense"``, ``"DenseGeneral"``, ``"Conv"``,
      ``"Embed"``, ``"Einsum"``; ``"inferred"`` when read from shapes alone).
    param: the name of the weight in the node (``"kernel"`` or ``"embedding"``).
    stack: the shape of the leading stack axes (``()`` for a plain layer).
    shape: the shape of one slice of the weight.
    in_axes: the axes of one slice that form ``d_in`` (in this order).
    out_axes: the axes of one slice that form ``d_out`` (in this order).
    has_bias: whether the node has a bias folded as the last input row.
    bias_axes: the order of the bias axes relative to ``out_axes`` (``None``:
      the bias is laid out as ``out_axes``).
    diagonal: the input factor is kept as its diagonal (embeddings, whose
      input rows are one-hot).
    bias_param: the name of the bias in the node (``"bias"`` unless a custom
      layer registered another, see :func:`eva_optax.register_dense`).
  """

  kind: str
  param: str
  stack: tuple[int, ...]
  shape: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  has_bias: bool
  bias_axes: tuple[int, ...] | None = None
  diagonal: bool = False
  bias_param: str = "bias"

  @property
  def d_in(self) -> int:
    return math.prod(self.shape[i] for i in self.in_axes)

  @property
  def d_out(self) -> int:
    return math.prod(self.shape[i] for i in self.out_axes)

  @property
  def d_a(self) -> int:
    """Length of the input-side vector ``a`` (``d_in``, plus 1 with a bias)."""
    return self.d_in + int(self.has_bias)

  @property
  def full_shape(self) -> tuple[int, ...]:
    return self.stack + self.shape

  @property
  def num_slices(self) -> int:
    return math.prod(self.stack)

  def describe(self) -> str:
    stack = f"{'x'.join(map(str, self.stack))} x " if self.stack else ""
    bias = " + 1" if self.has_bias else ""
    return f"{stack}({self.d_in}{bias}, {self.d_out})"

  # --------------------------------------------------------------------------
  # Parameter <-> matrices (leading axis: the flattened stack).

  def _perm(self) -> tuple[int, ...]:
    return self.in_axes + self.out_axes

  def kernel_matrices(self, w: Array) -> Array:
    """``(num_slices, d_in, d_out)`` view of the weight ``w`` (stack + shape)."""
    w = w.reshape((self.num_slices,) + self.shape)
    perm = self._perm()
    if perm != tuple(range(len(self.shape))):
      w = jnp.transpose(w, (0,) + tuple(p + 1 for p in perm))
    return w.reshape(self.num_slices, self.d_in, self.d_out)

  def kernel_from_matrices(self, m: Array) -> Array:
    """Inverse of :meth:`kernel_matrices`: back to ``stack + shape``."""
    perm = self._perm()
    permuted = tuple(self.shape[p] for p in perm)
    m = m.reshape((self.num_slices,) + permuted)
    if perm != tuple(range(len(self.shape))):
      inverse = tuple(perm.index(i) for i in range(len(self.shape)))
      m = jnp.transpose(m, (0,) + tuple(p + 1 for p in inverse))
    return m.reshape(self.full_shape)

  def bias_vectors(self, b: Array) -> Array:
    """``(num_slices, d_out)`` view of the bias."""
    b = b.reshape((self.num_slices,) + tuple(b.shape[len(self.stack):]))
    if self.bias_axes is not None:
      b = jnp.transpose(b, (0,) + tuple(a + 1 for a in self.bias_axes))
    return b.reshape(self.num_slices, self.d_out)

  def bias_from_vectors(self, v: Array, bias_shape: tuple[int, ...]) -> Array:
    """Inverse of :meth:`bias_vectors`, for a bias of shape ``bias_shape``."""
    per_slice = bias_shape[len(self.stack):]
    if self.bias_axes is None:
      return v.reshape(bias_shape)
    permuted = tuple(per_slice[a] for a in self.bias_axes)
    v = v.reshape((self.num_slices,) + permuted)
    inverse = tuple(self.bias_axes.index(i) for i in range(len(per_slice)))
    v = jnp.transpose(v, (0,) + tuple(a + 1 for a in inverse))
    return v.reshape(bias_shape)

  def without_bias(self) -> "LayerView":
    return dataclasses.replace(self, has_bias=False, bias_axes=None)


# ----------------------------------------------------------------------------
# Boxes: flax.linen metadata boxes (nn.Partitioned, LogicallyPartitioned) and
# NNX variables wrap arrays; the views see through them.


def unbox(x: Any) -> Any:
  """The array inside a Flax metadata box or NNX variable (else ``x``)."""
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  if isinstance(x, meta.AxisMetadata):
    return x.unbox()
  value = getattr(x, "get_value", None)
  if value is not None and type(x).__module__.startswith("flax.nnx"):
    return value()
  return x


def is_box(x: Any) -> bool:
  return unbox(x) is not x


def is_array(x: Any) -> bool:
  x = unbox(x)
  return hasattr(x, "shape") and hasattr(x, "dtype")


# The names under which a layer node holds its weight: Flax's, plus those of
# custom layers declared with eva_optax.register_dense (kept in order).
WEIGHT_NAMES: list[str] = ["kernel", "embedding"]


def add_weight_name(name: str) -> None:
  """Lets nodes whose weight is called ``name`` be found as layer nodes."""
  if name not in WEIGHT_NAMES:
    WEIGHT_NAMES.append(name)


def weight_name(node: Any) -> str | None:
  """The name of the weight (rank >= 2) if ``node`` is a layer node, else ``None``."""
  if not isinstance(node, Mapping):
    return None
  for name in WEIGHT_NAMES:
    if name in node and is_array(node[name]) and unbox(node[name]).ndim >= 2:
      return name
  return None


def bias_of(node: Mapping, name: str = "bias") -> Any:
  bias = node.get(name) if isinstance(node, Mapping) else None
  return unbox(bias) if bias is not None and is_array(bias) else None


def infer(node: Mapping) -> LayerView:
  """The view of a layer node from its shapes alone (no statistics).

  * ``embedding`` ``(V, F)``: an embedding, ``(V, F)``, diagonal input factor.
  * ``kernel`` with a bias: the output axes are the trailing kernel axes that
    match the bias shape; bias axes that only match after dropping leading
    axes of both mark those axes as a stack (a scanned layer with a bias). A
    2-D kernel ``(a, b)`` whose bias ``(a,)`` matches only its leading axis is
    stored transposed, ``(d_out, d_in)`` (GPT-2's ``Conv1D``).
  * ``kernel`` without a bias: ``(prod(shape[:-1]), shape[-1])``.
  """
  name = weight_name(node)
  if name is None:
    raise ValueError("not a layer node")
  w = unbox(node[name])
  shape = tuple(int(d) for d in w.shape)
  if name == "embedding":
    stack, per = shape[:-2], shape[-2:]
    return LayerView(kind="Embed", param=name, stack=stack, shape=per,
                     in_axes=(0,), out_axes=(1,), has_bias=False,
                     diagonal=True)
  bias = bias_of(node)
  if bias is None:
    return LayerView(kind="inferred", param=name, stack=(), shape=shape,
                     in_axes=tuple(range(len(shape) - 1)),
                     out_axes=(len(shape) - 1,), has_bias=False)
  b = tuple(int(d) for d in bias.shape)
  for s in range(0, len(b)):
    k = len(b) - s
    if (shape[:s] == b[:s] and k < len(shape) - s
        and shape[len(shape) - k:] == b[s:]):
      per = shape[s:]
      return LayerView(kind="inferred", param=name, stack=shape[:s], shape=per,
                       in_axes=tuple(range(len(per) - k)),
                       out_axes=tuple(range(len(per) - k, len(per))),
                       has_bias=True)
  if len(shape) == 2 and b == shape[:1] and shape[0] != shape[1]:
    return LayerView(kind="inferred", param=name, stack=(), shape=shape,
                     in_axes=(1,), out_axes=(0,), has_bias=True)
  raise ValueError(
      f"cannot read the {name} {shape} and bias {b} as one layer: the bias "
      "matches no trailing axes of the kernel.")


def check_view(view: LayerView, node: Mapping, where: str) -> None:
  """Raises a clear ValueError if ``node``'s shapes do not fit ``view``."""
  w = unbox(node[view.param])
  if tuple(w.shape) != view.full_shape:
    raise ValueError(
        f"{where}: the {view.param} has shape {tuple(w.shape)}, but its "
        f"statistics describe a {view.kind} layer of shape {view.full_shape}. "
        "The statistics do not belong to these parameters.")
