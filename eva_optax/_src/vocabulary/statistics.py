"""The per-layer statistics container returned by :func:`eva_optax.value_and_grad`."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class LayerStatistics:
  """Statistics of one captured layer (a pytree; ``kind`` and ``note`` are static).

  The layer is viewed as ``y = [x, 1] W_hat`` with ``W_hat`` of shape
  ``(d_in + 1, d_out)`` (the bias entry only when the layer has a bias):

  * ``a``: mean over rows (examples x positions) of ``[x, 1]``, shape ``(d_in + 1,)``;
    the bias entry is exactly 1.
  * ``g``: mean over rows of ``dL/dy``, shape ``(d_out,)``. With a batch-mean loss
    every row carries the ``1/B`` of the mean.
  * ``A``, ``G`` (``statistics="factors"``): means over examples of the outer
    products of the per-example position means of ``[x, 1]`` and ``dL/dy``.
  * ``a_rows``, ``g_rows`` (``statistics="rows"``): every row, for diagnostics.

  Stacked layers (``nn.scan``, ``nn.vmap`` with per-member parameters) carry the
  stack axes in front of every array. An embedding's ``A`` is the diagonal of
  its (one-hot) input factor, a vector. ``view`` says how the layer's
  parameters are read as ``(d_in + 1, d_out)`` matrices
  (:class:`eva_optax._src.views.LayerView`).

  A layer that has a kernel but is not captured (grouped convolution, an
  unsupported layer type) has every array ``None`` and says why in ``note``.

  Attributes:
    a: mean input-side vector, with the bias entry 1 last.
    g: mean output gradient.
    A: input factor (a vector for embeddings: its diagonal), or None.
    G: output factor, or None.
    a_rows: every input-side row (``statistics="rows"``), or None.
    g_rows: every output-gradient row (``statistics="rows"``), or None.
    kind: the layer type the capture saw (``"Dense"``, ``"Conv"``, ...).
    note: why the layer is not captured (empty when it is).
    view: how the optimizers read the layer's parameters as matrices.

  References:
    Zhang et al., `Eva: Practical Second-order Optimization with
    Kronecker-vectorized Approximation <https://openreview.net/forum?id=_Mic8V96Voy>`_,
    ICLR 2023 (the Kronecker vectors ``a`` and ``g``); Martens & Grosse,
    `Optimizing Neural Networks with Kronecker-factored Approximate Curvature
    <https://arxiv.org/abs/1503.05671>`_, ICML 2015 (the factors ``A`` and ``G``).
  """

  a: Array | None = None
  g: Array | None = None
  A: Array | None = None
  G: Array | None = None
  a_rows: Array | None = None
  g_rows: Array | None = None
  kind: str = struct.field(pytree_node=False, default="")
  note: str = struct.field(pytree_node=False, default="")
  view: Any = struct.field(pytree_node=False, default=None)

  @property
  def captured(self) -> bool:
    """Whether this layer has statistics (when ``False``, its gradient passes through)."""
    return self.a is not None

  def __getitem__(self, key: str) -> Any:
    value = getattr(self, key, None) if key in _FIELDS else None
    if value is None:
      raise KeyError(f"LayerStatistics of a {self.kind} layer has no {key!r}; "
                     f"it has {sorted(k for k in _FIELDS if getattr(self, k) is not None)}")
    return value


_FIELDS = ("a", "g", "A", "G", "a_rows", "g_rows")


def is_layer_statistics(x: Any) -> bool:
  return isinstance(x, LayerStatistics)


# Powers of the loss scale that each field carries: the output side (``g``,
# ``G``) is linear (quadratic) in dL/dy, the input side (``a``, ``A``) does not
# depend on the loss at all.
OUTPUT_POWER = {"a": 0, "A": 0, "a_rows": 0, "g": 1, "G": 2, "g_rows": 1}


def scale_loss(stats: Any, factor: Any) -> Any:
  """The statistics of the same batch under the loss ``factor * L``.

  ``g`` scales by ``factor``, ``G`` by ``factor ** 2``, ``a`` and ``A`` not at
  all. With ``factor = 1 / k`` this turns the mean over ``k`` equal
  micro-batches (or ``k`` data-parallel shards), each under its own mean loss,
  into the statistics of their concatenation under its mean loss. Works on a
  single :class:`LayerStatistics` or any tree of them.
  """
  def one(st):
    return st.replace(**{k: getattr(st, k) * factor ** p
                         for k, p in OUTPUT_POWER.items()
                         if p and getattr(st, k) is not None})
  return jax.tree.map(one, stats, is_leaf=is_layer_statistics)
