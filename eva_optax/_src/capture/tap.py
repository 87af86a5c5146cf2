"""The statistics tap and its probes, shared by the linen and NNX backends.

Every captured layer node gets a zero *probe* (a small dict of float32 arrays)
that travels next to its weight (in the linen ``params`` collection, or as an
NNX variable on the module), so every Flax transform that slices or broadcasts
the weight (``nn.scan``, ``nn.vmap``, ``nnx.scan``, ``nnx.vmap``, remat) does
the same to the probe. Each captured call wraps its output ``y`` in
:func:`tap`, an identity with a custom VJP that takes the probe as an input and
hands it, as its cotangent, the call's statistics: the forward sums (from the
input) computed as residuals, the backward sums (from ``dL/dy``) as soon as
``dL/dy`` exists. So the statistics come out of :func:`jax.value_and_grad` as the
gradient with respect to the probes: summed over the calls of a layer, over
``jax.vmap`` members that share it, and over ``shard_map`` shards (the probe is
cast to vary like the data, whose transpose is a ``psum``), and stacked like
the weight for stacked layers.

A shape-only pass first records, per node, its calls (:class:`NodeRecord`), from
which the probe shapes and the layer's view follow.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from eva_optax._src.capture import audit
from eva_optax._src.capture import calls
from eva_optax._src.vocabulary import sharding
from eva_optax._src.vocabulary import views
from eva_optax._src.vocabulary.statistics import LayerStatistics

Array = jax.Array
_F32 = jnp.float32


@dataclasses.dataclass
class NodeRecord:
  """What the shape-only pass saw of one layer node."""

  path: tuple[str, ...]
  weight_shape: tuple[int, ...]          # the stored weight, stack included
  weight_name: str = "kernel"            # its name in the node
  weight_dtype: Any = _F32               # its stored dtype
  kind: str = ""
  view: views.LayerView | None = None    # per node, stack included
  rows: list[int] = dataclasses.field(default_factory=list)  # per call
  reasons: list[str] = dataclasses.field(default_factory=list)
  # Why a node that no captured call read is not captured, when a call of an
  # overriding subclass was seen (used only if no captured call follows).
  override: str = ""
  # The loss has a term in the node's parameters alone (see capture.audit).
  penalty: bool = False

  @property
  def captured(self) -> bool:
    return self.view is not None and not self.reasons

  def add_call(self, kind: str, view: views.LayerView, inner_shape, rows: int):
    """Records one call with its per-slice view; checks the stack and consistency."""
    n = len(inner_shape)
    if tuple(view.shape) != tuple(inner_shape):
      self.reject(f"its weight slice has shape {tuple(inner_shape)}, but its call "
                  f"reads it as {kind} {tuple(view.shape)} (a custom layer "
                  "declared with the wrong transposed=?)")
      return
    if tuple(self.weight_shape[len(self.weight_shape) - n:]) != tuple(inner_shape):
      self.reject(f"its weight {self.weight_shape} is stacked along a non-leading "
                  f"axis (one slice has shape {tuple(inner_shape)})")
      return
    view = dataclasses.replace(view, stack=tuple(self.weight_shape[:len(
        self.weight_shape) - n]))
    if self.view is not None and self.view != view:
      self.reject(f"its calls read the weight in two ways ({self.kind} "
                  f"{self.view.describe()} and {kind} {view.describe()})")
      return
    if self.kind and kind not in self.kind.split("+"):
      kind = f"{self.kind}+{kind}"   # e.g. a tied embedding: Embed+Embed.attend
    self.kind, self.view = kind, view
    self.rows.append(rows)

  def reject(self, reason: str, kind: str | None = None):
    if kind and not self.kind:
      self.kind = kind
    if reason not in self.reasons:
      self.reasons.append(reason)


def probe_shapes(view: views.LayerView, mode: str, rows: int) -> dict[str, tuple]:
  """Shapes of one node's probe fields (the stack in front)."""
  st, d_a, d_out = view.stack, view.d_a, view.d_out
  shapes = {"a": (d_a,), "n_a": (), "g": (d_out,), "n_g": ()}
  if mode in ("factors", "rows"):
    shapes.update(A=(d_a,) if view.diagonal else (d_a, d_a), m_a=(),
                  G=(d_out, d_out), m_g=())
  if mode == "rows":
    shapes.update(a_rows=(rows, d_a), g_rows=(rows, d_out))
  return {k: st + s for k, s in shapes.items()}


def zero_probe(record: NodeRecord, mode: str) -> dict[str, Array]:
  shapes = probe_shapes(record.view, mode, sum(record.rows))
  return {k: jnp.zeros(s, _F32) for k, s in shapes.items()}


def vma(tree: Any) -> frozenset:
  """The mesh axes along which ``tree`` varies inside ``shard_map`` (else empty)."""
  out = frozenset()
  for leaf in jax.tree.leaves(tree):
    mat = getattr(jax.typeof(leaf), "mat", None)
    out = out | frozenset(getattr(mat, "varying", ()) or ())
  return out


def vary_like(tree: Any, axes: frozenset) -> Any:
  """``tree`` cast to vary along ``axes`` (a no-op outside ``shard_map``)."""
  def one(leaf):
    missing = tuple(sorted(axes - vma(leaf)))
    return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf
  return jax.tree.map(one, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def tap(call, mode, rows_slot, target, y, probe, forward):
  del call, mode, rows_slot, target, probe, forward
  return y


def _tap_fwd(call, mode, rows_slot, target, y, probe, forward):
  del call, mode, rows_slot, target, probe
  return y, forward


def _tap_bwd(call, mode, rows_slot, target, forward, ct):
  out = {**forward, **sharding.replicated(
      lambda ct: calls.backward_sums(call, ct, mode))(ct)}
  if rows_slot is not None:   # place this call's rows among the node's rows
    offset, total = rows_slot
    for k in ("a_rows", "g_rows"):
      r = out[k]
      out[k] = jnp.pad(r, ((offset, total - offset - r.shape[0]), (0, 0)))
  out = vary_like(out, target)
  return ct, out, jax.tree.map(jnp.zeros_like, forward)


tap.defvjp(_tap_fwd, _tap_bwd)


def tapped(call, mode: str, x: Array, y: Array, probe: dict[str, Array],
           rows_slot: tuple[int, int] | None) -> Array:
  """``y``, wrapped so that ``probe``'s cotangent receives the call's statistics."""
  forward = sharding.replicated(lambda x: calls.forward_sums(call, x, mode))(x)
  probe = vary_like(probe, vma(x) | vma(y))
  return tap(call, mode, rows_slot, vma(probe), y, probe, forward)


def _ratio(total: Array, count: Array, extra_dims: int) -> Array:
  count = count.reshape(count.shape + (1,) * extra_dims)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def finalize(record: NodeRecord, probe_grad: dict[str, Array] | None,
             mode: str) -> LayerStatistics:
  """The :class:`LayerStatistics` of a node from its probe's cotangent."""
  if not record.captured or probe_grad is None:
    reasons = record.reasons or ["it did not run inside the loss function, or "
                                 "its parameters did not come from the "
                                 "differentiated argument"]
    return LayerStatistics(kind=record.kind or "?", note="; ".join(reasons))
  pg = probe_grad
  fields = {"a": _ratio(pg["a"], pg["n_a"], 1), "g": _ratio(pg["g"], pg["n_g"], 1)}
  if mode in ("factors", "rows"):
    fields["A"] = _ratio(pg["A"], pg["m_a"], 1 if record.view.diagonal else 2)
    fields["G"] = _ratio(pg["G"], pg["m_g"], 2)
  if mode == "rows":
    fields.update(a_rows=pg["a_rows"], g_rows=pg["g_rows"])
  return LayerStatistics(kind=record.kind, view=record.view,
                         note=audit.PENALTY_NOTE if record.penalty else "",
                         **fields)


# ----------------------------------------------------------------------------
# One capture pass (shape-only discovery, or the real pass with taps).


class Session:
  """The state of one pass over ``fun``, shared by the backends' interceptors."""

  def __init__(self, records: dict[int, NodeRecord], mode: str, discovery: bool,
               stats_batch: int | None = None):
    self.records = records
    self.mode = mode
    self.discovery = discovery
    self.stats_batch = stats_batch
    self.active: set[int] = set()     # ids of modules inside a captured call
    self.calls: dict[int, int] = {}   # real pass: calls seen per node (rows mode)
    self.substituting = False         # discovery: inside a call on the copies

  def subsample(self, call: Any) -> Any:
    """``call``, its statistics from the first ``stats_batch`` examples."""
    return call if self.stats_batch is None else calls.FirstExamples(
        call, self.stats_batch)


def node_probe(node_id: int, fields: dict[str, Array]) -> dict[str, Any]:
  return {f"id{node_id}": fields}


def handle_call(session: Session, record: NodeRecord, value: Any, describe,
                x: Array, y: Array, type_name: str) -> Array:
  """Records (discovery) or taps (real pass) one call of a layer node.

  Args:
    session: the current pass.
    record: the node's record.
    value: what the node's probe slot holds: in discovery, the copies of the
      node's parameters that the call used (one slice of each for a stacked
      layer); in the real pass, the probe fields.
    describe: ``() -> (kind, call, view)`` or raises ``NotCaptured``.
    x, y: the call's input and output.
    type_name: the module's class name (for messages).
  """
  from eva_optax._src.capture import flax_layers  # pylint: disable=g-import-not-at-top
  if session.discovery:
    weight = views.unbox(value[record.weight_name])
    if weight.dtype != record.weight_dtype:
      record.reject("the loss function changes the parameters' dtype before the "
                    f"model ({record.weight_dtype} to {weight.dtype}); let the "
                    "layers cast (dtype=...)", type_name)
      return y
    try:
      kind, call, view = describe()
      call = session.subsample(call)
      if isinstance(call, calls.FirstExamples):
        call.check(x, y)
      record.add_call(kind, view, weight.shape, flax_layers.rows_of(call, x))
    except flax_layers.NotCaptured as e:
      record.reject(str(e), type_name)
    except ValueError as e:       # stats_batch without an example axis
      record.reject(str(e), type_name)
    return y
  if not record.captured:
    return y
  _, call, _ = describe()
  call = session.subsample(call)
  slot = None
  if session.mode == "rows":
    k = session.calls.get(id(record), 0)
    session.calls[id(record)] = k + 1
    slot = (sum(record.rows[:k]), sum(record.rows))
  return tapped(call, session.mode, x, y, value, slot)


def record_of(session: Session, probe: Any) -> tuple[NodeRecord, Any]:
  """``(record, value)`` of the node whose probe slot holds ``probe``
  (``{"id<k>": value}``)."""
  (key, value), = probe.items()
  return session.records[int(key[2:])], value


def close_discovery(records: dict[int, NodeRecord], mode: str) -> None:
  """Rejects what the real pass could not tap exactly."""
  for rec in records.values():
    if not rec.rows and not rec.reasons and rec.override:
      rec.reject(rec.override)
    if mode == "rows" and rec.captured and len(rec.rows) > 1 and rec.view.stack:
      rec.reject("statistics='rows' cannot tell the calls of a stacked layer "
                 "apart; use 'vectors' or 'factors'")
