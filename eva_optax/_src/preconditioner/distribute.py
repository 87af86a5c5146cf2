"""The expensive refresh split over a mesh axis (``distribute_over=``).

Under data parallelism every device holds the same statistics, so without a
split every device computes every inverse, eigendecomposition or inverse root
itself: the work is replicated. With ``distribute_over=axis`` the refresh's
*units* (one slice of one layer for K-FAC and FOOF, its two factors together;
one block of one tensor for Shampoo) are assigned to the devices along
``axis``, greedily, largest estimated cost first, each to the least-loaded
device (KAISA's and Meta's distributed Shampoo's rule). Inside the refresh's
:func:`jax.lax.cond` (so only on refresh steps) each device computes its own
units (a :func:`jax.lax.switch` on its index along the axis), packs their
results into one buffer, and one collective gives every device every result:

* under :func:`jax.jit` with a mesh (``jax.set_mesh``, or ``mesh=``), the split
  runs in a :func:`jax.shard_map` over ``axis`` and the buffers are
  all-gathered: ``(D - 1)`` buffers received per device and refresh;
* inside :func:`jax.shard_map` or :func:`jax.pmap` over ``axis`` (the axis is
  bound), each device places its buffer in its row of a zero ``(D, L)`` array
  and the rows are summed (``psum``), which keeps the result typed invariant
  across the axis (``check_vma``); adding zeros is exact.

Every unit is computed by the same function on the same input as in the
replicated run, so the results are those of the replicated run (bit for bit
where XLA compiles the unit alike in both programs; to round-off otherwise).
The per-step collectives do not change.

References:
  Pauloski et al., `KAISA: An Adaptive Second-Order Optimizer Framework for
  Deep Neural Networks <https://arxiv.org/abs/2107.01739>`_, SC 2021 (greedy
  assignment of layers by cost); Shi et al., `Accelerating Distributed K-FAC
  with Smart Parallelism of Computing and Communication Tasks
  <https://arxiv.org/abs/2107.06533>`_, ICDCS 2021.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Unit:
  """One independent piece of a refresh: a name, its estimated cost (flops)
  and the number of float32 values its result holds."""

  name: str
  cost: float
  size: int


def assign(costs: Sequence[float], devices: int) -> list[int]:
  """The owner of each unit: largest cost first, to the least-loaded device
  (ties: lower unit index first, then lower device index), deterministic."""
  order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
  loads = [(0.0, d) for d in range(devices)]
  owner = [0] * len(costs)
  for i in order:
    load, d = heapq.heappop(loads)
    owner[i] = d
    heapq.heappush(loads, (load + costs[i], d))
  return owner


@dataclasses.dataclass(frozen=True)
class RefreshPlan:
  """How a refresh is split over ``devices`` devices.

  Attributes:
    units: the units, in the order the optimizer computes them.
    owner: for each unit, the device (index along the axis) that computes it.
    devices: the number of devices along the axis.
  """

  units: tuple[Unit, ...]
  owner: tuple[int, ...]
  devices: int

  @property
  def loads(self) -> list[float]:
    """The estimated cost (flops) each device computes per refresh."""
    out = [0.0] * self.devices
    for unit, d in zip(self.units, self.owner):
      out[d] += unit.cost
    return out

  @property
  def buffer_floats(self) -> int:
    """The length of one device's packed buffer (the largest share)."""
    sizes = [0] * self.devices
    for unit, d in zip(self.units, self.owner):
      sizes[d] += unit.size
    return max(sizes) if sizes else 0

  @property
  def bytes_per_refresh(self) -> int:
    """Bytes each device receives per refresh (all-gather of the buffers)."""
    return 4 * self.buffer_floats * (self.devices - 1)

  @property
  def balance(self) -> float:
    """Largest load over the mean load (1 is perfect; the replicated run
    computes ``devices`` times the mean on every device)."""
    loads = self.loads
    mean = sum(loads) / max(len(loads), 1)
    return max(loads) / mean if mean > 0 else 1.0

  def __str__(self) -> str:
    total = sum(u.cost for u in self.units)
    lines = [f"{len(self.units)} units over {self.devices} devices; "
             f"replicated: {total:.3g} flops per device and refresh, split: "
             f"{max(self.loads):.3g} on the busiest (x{self.balance:.2f} the "
             f"mean); {self.bytes_per_refresh:,} bytes received per device "
             "and refresh",
             "device | units | estimated flops | floats computed"]
    for d in range(self.devices):
      mine = [u for u, o in zip(self.units, self.owner) if o == d]
      lines.append(f"{d} | {len(mine)} | {sum(u.cost for u in mine):.3g} | "
                   f"{sum(u.size for u in mine):,}")
    return "\n".join(lines)


def plan(units: Sequence[Unit], devices: int) -> RefreshPlan:
  return RefreshPlan(tuple(units), tuple(assign([u.cost for u in units],
                                                devices)), devices)


# ----------------------------------------------------------------------------
# Where the axis is.


def check_axis_name(distribute_over: Any) -> None:
  """Eager check of the argument's type."""
  if distribute_over is not None and not isinstance(distribute_over, str):
    raise TypeError(
        "distribute_over must be the name of a mesh axis (a str, e.g. "
        f"'data') or None, got distribute_over={distribute_over!r}.")


def _context(axis: str, mesh: Any) -> tuple[str, int, Any]:
  """``("bound", size, None)`` inside shard_map / pmap over ``axis``, or
  ``("mesh", size, mesh_or_None)`` under jit with a mesh that has it."""
  abstract = jax.sharding.get_abstract_mesh()
  names = tuple(abstract.axis_names)
  if axis in names:
    kind = dict(zip(names, getattr(abstract, "axis_types", ())))[axis]
    size = dict(zip(names, abstract.axis_sizes))[axis]
    return ("bound" if kind == AxisType.Manual else "mesh"), size, None
  try:
    return "bound", int(jax.lax.axis_size(axis)), None   # pmap
  except (NameError, ValueError, KeyError, TypeError):
    pass
  if mesh is not None:
    if axis not in mesh.axis_names:
      raise ValueError(
          f"distribute_over={axis!r} is not an axis of the mesh given "
          f"(its axes: {tuple(mesh.axis_names)}).")
    return "mesh", int(mesh.shape[axis]), mesh
  where = (f"the current mesh has axes {names}" if names
           else "no mesh is set and no shard_map or pmap binds it")
  raise ValueError(
      f"distribute_over={axis!r} names no mesh axis here ({where}): call the "
      "update inside jax.shard_map or jax.pmap over that axis, or under "
      "jax.jit with jax.set_mesh(mesh) (or pass mesh= to the optimizer), "
      "where the mesh has an axis of that name.")


def _ravel(tree: Any) -> Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


def _unravel(flat: Array, like: Any) -> Any:
  leaves, treedef = jax.tree.flatten(like)
  out, start = [], 0
  for leaf in leaves:
    n = math.prod(leaf.shape)
    out.append(flat[start:start + n].reshape(leaf.shape).astype(leaf.dtype))
    start += n
  return jax.tree.unflatten(treedef, out)


def split(axis: str, mesh: Any, fns: Sequence[Callable[[Any], Any]],
          inputs: Sequence[Any], costs: Sequence[float],
          keys: Sequence[Any] | None = None) -> list[Any]:
  """``[fn(x) for fn, x in zip(fns, inputs)]``, each on one device of ``axis``
  (assigned by :func:`assign`), every result on every device.

  Args:
    axis: the mesh axis name.
    mesh: the mesh when it is not set by ``jax.set_mesh`` (else None).
    fns: one function per unit, *batched*: it maps inputs stacked along a new
      leading axis to results stacked the same way (a pytree of float arrays).
    inputs: one input per unit (the same on every device).
    costs: one estimated cost per unit.
    keys: units of one key (and one input shape) share their function: a
      device computes those it owns in one batched call, as the replicated
      refresh does (a smaller program, and the same computation). ``None``:
      every unit alone.
  """
  kind, devices, mesh = _context(axis, mesh)
  n_units = len(inputs)
  keys = list(range(n_units)) if keys is None else list(keys)
  one = lambda i: jax.tree.map(lambda a: a[None], inputs[i])
  shapes = [jax.tree.map(lambda l: jax.ShapeDtypeStruct(l.shape[1:], l.dtype),
                         jax.eval_shape(fns[i], one(i))) for i in range(n_units)]
  units = [Unit(str(i), float(c), sum(math.prod(l.shape) for l in
                                      jax.tree.leaves(s)))
           for i, (c, s) in enumerate(zip(costs, shapes))]
  the_plan = plan(units, devices)
  width = the_plan.buffer_floats

  def batches(d):
    """The units of device ``d`` in batches of one key, in a fixed order."""
    found: dict[Any, list[int]] = {}
    for i in range(n_units):
      if the_plan.owner[i] == d:
        sig = (keys[i], jax.tree.structure(inputs[i]),
               tuple((l.shape, l.dtype) for l in jax.tree.leaves(inputs[i])))
        found.setdefault(sig, []).append(i)
    return list(found.values())

  offsets = [0] * n_units
  for d in range(devices):
    used = 0
    for batch in batches(d):
      for i in batch:
        offsets[i], used = used, used + units[i].size

  def branch(d):
    def run(xs):
      parts = []
      for batch in batches(d):
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *[xs[i] for i in batch])
        out = fns[batch[0]](stacked)
        parts += [_ravel(jax.tree.map(lambda a, j=j: a[j], out))
                  for j in range(len(batch))]
      buf = jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)
      return jnp.pad(buf, (0, width - buf.shape[0]))
    return run

  def body(xs):
    index = jax.lax.axis_index(axis)
    buf = jax.lax.switch(index, [branch(d) for d in range(devices)], xs)
    if kind == "bound":
      rows = jnp.zeros((devices, width), jnp.float32).at[index].set(buf)
      return jax.lax.psum(rows, axis)
    return jax.lax.all_gather(buf, axis)

  xs = list(inputs)
  if kind == "bound":
    table = body(xs)
  else:
    table = jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec(),
                          out_specs=PartitionSpec(), axis_names={axis},
                          check_vma=False)(xs)
  return [_unravel(table[d, o:o + u.size], s)
          for u, d, o, s in zip(units, the_plan.owner, offsets, shapes)]
