"""The library's computations under JAX's explicit sharding.

Under ``jax.set_mesh`` with ``Explicit`` axes (JAX's recommended mode), every
array carries its sharding in its type, and an operation whose output sharding
is ambiguous (a contraction over a sharded batch axis, a convolution's
transpose, a slice of a sharded axis) is an error unless told. The statistics
and the preconditioners are such computations: they reduce over the batch and
read whole layers. They run with the explicit axes switched to ``Auto``
(:func:`jax.sharding.auto_axes`), where XLA's partitioner places the work and
the collectives, as it does under plain ``jax.jit``; their outputs get the
shardings the caller expects (the statistics replicated, updates and state as
they came in). Outside a mesh with explicit axes (no mesh, ``Auto`` axes, or
inside ``shard_map`` where the axes are manual) nothing changes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec


def explicit_axes() -> tuple[str, ...]:
  """The axes of the current mesh that are ``Explicit`` (empty outside one)."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(name for name, kind in zip(mesh.axis_names,
                                         getattr(mesh, "axis_types", ()))
               if kind == AxisType.Explicit)


def spec_of(x: Any) -> PartitionSpec:
  """The partition spec that ``x``'s type carries (``P()`` if none)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  return spec if spec is not None else PartitionSpec()


def replicated(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` run with the explicit axes in ``Auto`` mode, every output replicated
  (statistics: sums over the whole batch)."""
  def wrapped(*args):
    axes = explicit_axes()
    if not axes:
      return fn(*args)
    return jax.sharding.auto_axes(fn, axes=axes,
                                  out_sharding=PartitionSpec())(*args)
  return wrapped


def like_inputs(update_fn: Callable[..., Any]) -> Callable[..., Any]:
  """An optax ``update_fn`` run with the explicit axes in ``Auto`` mode, its
  updates sharded like the gradients and its state like the state it got."""
  def wrapped(updates, state, params=None, **extra_args):
    axes = explicit_axes()
    if not axes:
      return update_fn(updates, state, params, **extra_args)
    out = (jax.tree.map(spec_of, updates), jax.tree.map(spec_of, state))
    fn = lambda u, s, p, kw: update_fn(u, s, p, **kw)
    return jax.sharding.auto_axes(fn, axes=axes, out_sharding=out)(
        updates, state, params, extra_args)
  return wrapped
