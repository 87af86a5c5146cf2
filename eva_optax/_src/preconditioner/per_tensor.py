"""The per-tensor preconditioner shared by Eva-s and Shampoo.

Eva-s and Shampoo need the gradient only (no layer statistics): every parameter
tensor of rank >= 2 is preconditioned on its own, every other one (biases,
norms) gets the graft's step. What distinguishes the two is a
:class:`TensorMethod`, all of it per *slice* (a tensor, or one slice of a stack
of layers): its state, the statistics it observes, how an observation is merged
into the state, an optional periodic refresh (Shampoo's inverse roots) and the
direction it gives. One update:

1. folds the statistics of the gradient into the state every ``stats_every``
   steps: a running sum (``stat_decay=None``, the authors' setting), or a
   running average whose new statistic gets weight ``stat_decay`` and whose
   first observation initialises it;
2. every ``refresh_every`` steps, refreshes the method's expensive state (all
   tensors together, inside :func:`jax.lax.cond`);
3. gives each slice the method's direction, rescaled to the Frobenius norm of
   the graft's step on that slice (:mod:`eva_optax._src.preconditioner.grafting`);
   before ``start_step`` updates, the graft's step itself.

Stacked layers (``nn.scan``, ``nn.vmap``) are read as the layer-wise optimizers
read them: from the capture's views when ``layer_views`` is given, else from
the shapes (a kernel whose bias reveals a stack), and each slice is a tensor of
its own (vectorized over the slices). The state is keyed by the leaves' paths
(``"a/b/kernel"``), so it has one structure whatever container the parameters
come in (a dict, a ``FrozenDict``, an ``nnx.State`` with or without its
Variables). Everything is computed in float32; updates come back in the
gradient dtype. A step whose gradient (or result) is not finite, or whose
run-time hyperparameters are out of range, returns zeros and is counted
(:mod:`eva_optax._src.preconditioner.counters`), so the parameters stay finite.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from eva_optax._src.preconditioner import counters
from eva_optax._src.preconditioner import distribute
from eva_optax._src.preconditioner import grafting
from eva_optax._src.preconditioner import matching
from eva_optax._src.preconditioner import validation
from eva_optax._src.vocabulary import tree_utils
from eva_optax._src.vocabulary import sharding
from eva_optax._src.vocabulary import views as views_lib

Array = jax.Array
SliceState = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class TensorMethod:
  """What distinguishes Eva-s and Shampoo (everything per slice).

  Attributes:
    name: the optimizer's name, for messages.
    init: ``shape -> state`` of one slice (float32 arrays).
    observe: ``t -> statistics`` of one float32 slice ``t``.
    merge: ``(state, statistics, w_old, w_new) -> the merged fields`` of one
      slice, ``w_old * old + w_new * new`` in the method's representation.
    direction: ``(t, state, damping) -> direction`` of one slice, of any
      scale (grafting sets it).
    refresh: ``(states, damping) -> states`` over every preconditioned tensor
      (each field with one leading axis of slices), or ``None``.
    unit_refresh: the refresh of units (blocks of slices: every field with
      one leading axis of units instead of its axes of slices and blocks),
      giving the fields it renews; used to split the refresh over devices.
    unit_cost: ``unit state -> estimated flops`` of :attr:`unit_refresh`.
    describe: ``state -> words`` for a state's layout, in messages.
  """

  name: str
  init: Callable[[tuple[int, ...]], SliceState]
  observe: Callable[[Array], SliceState]
  merge: Callable[[SliceState, SliceState, Array, Array], SliceState]
  direction: Callable[[Array, SliceState, Array], Array]
  refresh: Callable[[list[SliceState], Array], list[SliceState]] | None = None
  unit_refresh: Callable[[SliceState, Array], SliceState] | None = None
  unit_cost: Callable[[SliceState], float] = lambda s: 0.0
  describe: Callable[[SliceState], str] = lambda s: str(
      {k: tuple(v.shape) for k, v in s.items()})


def is_preconditioned(shape: tuple[int, ...], depth: int = 0) -> bool:
  """Tensors of rank >= 2 (kernels, conv kernels) are preconditioned; the rest
  get the graft's step. ``depth`` leading axes are a stack of layers, not part
  of the tensor."""
  return len(shape) - depth >= 2 and math.prod(shape) > 0


def _name(path) -> str:
  keys = [tree_utils.key_name(k) for k in path
          if not isinstance(k, jax.tree_util.GetAttrKey)]
  return "/".join(keys) if keys else "<root>"


def unboxed(tree: Any) -> Any:
  """``tree`` with its Flax metadata boxes and NNX variables replaced by their
  arrays: the structure of the state, the same for the ``nnx.State`` of
  Variables that ``nnx.Optimizer`` gives ``init`` and the pure one it gives
  ``update``, and for boxed parameters and their gradients."""
  return jax.tree.map(views_lib.unbox, tree, is_leaf=views_lib.is_box)


def named_leaves(tree: Any) -> dict[str, Any]:
  """``{path: leaf}`` in flattening order (paths skip the boxes' fields)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=views_lib.is_box)[0]
  return {_name(path): leaf for path, leaf in leaves}


def stack_depths(tree: Any, layer_views: Any) -> dict[str, int]:
  """Per leaf path of ``tree``, how many leading axes are a stack of layers.

  The views are the capture's (``layer_views``: :func:`eva_optax.layer_views`
  or the statistics), else those the shapes give (:func:`views.infer`: a
  kernel whose bias reveals its stack). A leaf of a layer has its layer's
  ``len(view.stack)``. Any other leaf (a LayerNorm's scale inside an
  ``nn.scan`` block) takes the stack of the nearest enclosing module that holds
  layers, when all of them share one stack and the leaf's leading axes match
  it; otherwise 0.
  """
  given = matching.views_from(layer_views)
  if not given:
    for path, node in tree_utils.find_layers(tree).items():
      try:
        given[path] = views_lib.infer(node)
      except ValueError:
        pass
  depths = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=views_lib.is_box)[0]:
    names = tuple(tree_utils.key_name(k) for k in path
                  if not isinstance(k, jax.tree_util.GetAttrKey))
    shape = tuple(getattr(views_lib.unbox(leaf), "shape", ()))
    view = next((given[names[:n]] for n in range(len(names), -1, -1)
                 if names[:n] in given), None)
    depth = 0
    if view is not None:
      depth = len(view.stack)
    else:
      for n in range(len(names) - 1, -1, -1):
        inside = {v.stack for p, v in given.items() if p[:n] == names[:n]}
        if inside:
          stack = next(iter(inside))
          if len(inside) == 1 and stack and shape[:len(stack)] == stack:
            depth = len(stack)
          break
    depths[_name(path)] = depth
  return depths


def over_stack(fn: Callable[..., Any], depth: int, **vmap_kwargs: Any
               ) -> Callable[..., Any]:
  """``fn`` of one slice, mapped over ``depth`` leading stack axes."""
  for _ in range(depth):
    fn = jax.vmap(fn, **vmap_kwargs)
  return fn


def _check_state(method: TensorMethod, name: str, shape: tuple[int, ...],
                 depth: int, state: Any, acc: Any, graft: str) -> None:
  """The state of one leaf matches its gradient, or a ValueError naming both."""
  def raise_mismatch(initialised: str) -> None:
    raise ValueError(
        f"{method.name}: the gradient of leaf {name} has shape {shape}, but the "
        f"optimizer state was initialised for {initialised}. The optimizer was "
        "initialised with other parameters than these gradients belong to (or "
        "with other layer_views): call tx.init(params) with this model's "
        "params and the same layer_views.")
  if is_preconditioned(shape, depth):
    want = jax.eval_shape(lambda: method.init(shape[depth:]))
    stack = shape[:depth]
    if state is None or set(state) != set(want) or any(
        tuple(state[k].shape) != stack + tuple(want[k].shape) for k in want):
      raise_mismatch("a tensor of rank <= 1 (not preconditioned)"
                     if state is None else method.describe(state))
  elif state is not None:
    raise_mismatch(method.describe(state))
  if graft != "sgd" and (acc is None or tuple(acc.shape) != shape):
    raise_mismatch(f"a graft accumulator of shape "
                   f"{None if acc is None else tuple(acc.shape)}")


def _check_stacks(method: TensorMethod, updates: Any, depths: dict[str, int],
                  stats: Any) -> None:
  """Where statistics are passed (harmless to these optimizers), a layer they
  say is stacked must not be read as one tensor: that would mix its layers."""
  try:
    captured = {"/".join(path) for path in matching.views_from(stats)}
  except TypeError:      # not statistics: nothing to learn from them
    return
  known = stack_depths(updates, stats)
  for name, depth in depths.items():
    layer = name.rsplit("/", 1)[0] if "/" in name else ""
    if layer in captured and known[name] != depth:
      raise ValueError(
          f"{method.name}: leaf {name} belongs to a stacked layer "
          f"({known[name]} stack axes, from the statistics), but the optimizer "
          f"reads it with {depth} (from the shapes alone: a bias-free stacked "
          "kernel looks like one tensor), which would mix its layers. "
          + matching.views_call(updates) + ".")


def _unit_rows(state: SliceState) -> tuple[int, SliceState]:
  """A tensor's state (fields ``(slices, blocks, ...)``) as rows of units."""
  first = next(iter(state.values()))
  n = first.shape[0] * first.shape[1]
  return n, {k: v.reshape((n,) + v.shape[2:]) for k, v in state.items()}


def _refresh_split(method: TensorMethod, flat: list[SliceState], gamma: Array,
                   axis: str, mesh: Any) -> list[SliceState]:
  """The refresh of every block of every tensor, split over ``axis``."""
  fns, inputs, costs, owners = [], [], [], []
  fn = lambda units: method.unit_refresh(units, gamma)
  for t, state in enumerate(flat):
    n, rows = _unit_rows(state)
    for r in range(n):
      unit = {k: v[r] for k, v in rows.items()}
      fns.append(fn)
      inputs.append(unit)
      costs.append(method.unit_cost(unit))
      owners.append(t)
  results = distribute.split(axis, mesh, fns, inputs, costs,
                             keys=[0] * len(inputs))
  out = []
  for t, state in enumerate(flat):
    mine = [r for r, o in zip(results, owners) if o == t]
    renewed = jax.tree.map(lambda *xs: jnp.stack(xs), *mine)
    first = next(iter(state.values()))
    lead = first.shape[:2]
    out.append({**state, **{k: v.reshape(lead + v.shape[1:])
                            for k, v in renewed.items()}})
  return out


def units(method: TensorMethod, params: Any, layer_views: Any = None
          ) -> list[distribute.Unit]:
  """The refresh units of ``method`` for ``params``: one per block of every
  preconditioned slice (see :func:`eva_optax.refresh_plan`)."""
  plain = unboxed(params)
  depths = stack_depths(params, layer_views)
  out = []
  for name, leaf in named_leaves(plain).items():
    shape, depth = tuple(leaf.shape), depths[name]
    if not is_preconditioned(shape, depth):
      continue
    one = jax.eval_shape(lambda: method.init(shape[depth:]))
    first = next(iter(one.values()))
    block = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in one.items()}
    batch = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype)
             for k, v in one.items()}
    renewed = jax.eval_shape(lambda u: method.unit_refresh(u, 1.0), batch)
    size = sum(math.prod(v.shape) for v in jax.tree.leaves(renewed))
    for s in range(math.prod(shape[:depth])):
      for b in range(first.shape[0]):
        out.append(distribute.Unit(f"{name}[{s}, block {b}]" if depth
                                   else f"{name}[block {b}]",
                                   float(method.unit_cost(block)), size))
  return out


def _flat_stack(state: SliceState, depth: int) -> SliceState:
  """Every field with its ``depth`` stack axes as one leading axis of slices."""
  return {k: v.reshape((-1,) + v.shape[depth:]) if depth
          else v[None] for k, v in state.items()}


def _unflat_stack(flat: SliceState, like: SliceState) -> SliceState:
  return {k: v.reshape(like[k].shape) for k, v in flat.items()}


def per_tensor_preconditioner(
    method: TensorMethod,
    *,
    damping: Any,
    stat_decay: Any,
    stats_every: int,
    state_class: type,
    refresh_every: int = 1,
    start_step: int = 0,
    graft: str = "sgd",
    graft_decay: Any = 0.999,
    graft_eps: Any = 1e-8,
    layer_views: Any = None,
    distribute_over: str | None = None,
    mesh: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds the optax transformation of one method (see the module docstring).

  ``distribute_over`` splits the refresh over a mesh axis, one unit per block
  (:mod:`eva_optax._src.preconditioner.distribute`); a method without a
  refresh (Eva-s) has nothing to split and computes as before.

  ``state_class`` is the method's public state: a NamedTuple of the counters
  (:data:`counters.COUNTERS`), one field for the per-tensor states (like the
  unboxed parameters: the method's state per preconditioned leaf, stack axes
  in front, ``None`` elsewhere) and ``graft`` (like the unboxed parameters:
  the graft's accumulators, ``None`` for ``graft="sgd"``). The
  hyperparameters are checked by the caller; here they are used: ``damping``
  (a number, an array or a schedule) is checked again at run time, like
  ``stat_decay`` and the graft's options.
  """
  grafting.check(graft, graft_decay, graft_eps)
  distribute.check_axis_name(distribute_over)
  field, = (f for f in state_class._fields
            if f not in counters.COUNTERS and f != "graft")
  refreshers = {}

  def make_state(tensors, graft_accs, **counts):
    return state_class(**counts, **{field: tensors}, graft=graft_accs)

  def refresher(order: tuple[str, ...], depths: tuple[int, ...]):
    """The refresh of these tensors, one function object per layout (so that
    :func:`jax.lax.cond` reuses its traced branch from one update to the next,
    also outside :func:`jax.jit`)."""
    key = (order, depths)
    if key not in refreshers:
      def refresh_all(operand):
        states, gamma = operand
        flat = [_flat_stack(states[n], d) for n, d in zip(order, depths)]
        if distribute_over is None:
          out = method.refresh(flat, gamma)
        else:
          out = _refresh_split(method, flat, gamma, distribute_over, mesh)
        return {n: _unflat_stack(f, states[n]) for n, f in zip(order, out)}
      refreshers[key] = refresh_all
    return refreshers[key]

  def init_fn(params):
    plain = unboxed(params)
    leaves, treedef = jax.tree.flatten(plain)
    depths = stack_depths(params, layer_views)
    tensors = []
    for name, leaf in zip(named_leaves(plain), leaves):
      shape, depth = tuple(leaf.shape), depths[name]
      if is_preconditioned(shape, depth):
        one = method.init(shape[depth:])
        tensors.append({k: jnp.broadcast_to(v, shape[:depth] + v.shape)
                        for k, v in one.items()})
      else:
        tensors.append(None)
    accs = [grafting.init(graft, leaf) for leaf in leaves]
    return make_state(jax.tree.unflatten(treedef, tensors),
                      jax.tree.unflatten(treedef, accs),
                      **counters.zero_counters())

  def update_fn(updates, state, params=None, *, stats=None, **extra_args):
    del params, extra_args
    plain = unboxed(updates)
    leaves, treedef = jax.tree.flatten(plain)
    names = list(named_leaves(plain))
    if len(names) != len(leaves):
      raise ValueError(f"{method.name}: two leaves of the updates have the "
                       "same path; give each parameter its own name.")
    depths = stack_depths(updates, layer_views)
    if stats is not None and layer_views is None:
      _check_stacks(method, updates, depths, stats)
    old = tree_utils.leaves_like(treedef, getattr(state, field), method.name)
    accs = tree_utils.leaves_like(treedef, state.graft, method.name)
    for name, g, o, a in zip(names, leaves, old, accs):
      _check_state(method, name, tuple(g.shape), depths[name], o, a, graft)

    count = state.count
    gamma = jnp.asarray(validation.value_at(damping, count), jnp.float32)
    ok_hp = validation.valid_positive(gamma) & grafting.valid(
        graft, graft_decay, graft_eps)
    if stat_decay is None:     # a running sum
      w_old, w_new = jnp.float32(1.0), jnp.float32(1.0)
    else:                      # a running average; the first observation sets it
      xi = jnp.asarray(validation.value_at(stat_decay, count), jnp.float32)
      ok_hp = ok_hp & validation.valid_unit_interval(xi)
      first = state.stats_count == 0
      w_old, w_new = jnp.where(first, 0.0, 1.0 - xi), jnp.where(first, 1.0, xi)
    safe_gamma = jnp.where(ok_hp, gamma, 1.0)
    grads_finite = counters.all_finite(leaves)

    old = {n: o for n, o in zip(names, old) if o is not None}
    accs = dict(zip(names, accs))
    with jax.default_matmul_precision("highest"):
      tensors = {n: g.astype(jnp.float32) for n, g in zip(names, leaves)}
      # 1. Statistics, folded in when due (never from a skipped step).
      obs = {n: over_stack(method.observe, depths[n])(tensors[n]) for n in old}
      due = (count % stats_every) == 0
      finite = counters.all_finite(obs) & grads_finite
      accept = due & finite & ok_hp
      merge = lambda o, n, k: over_stack(method.merge, k, in_axes=(0, 0, None, None))(
          o, n, w_old, w_new)
      new = {}
      for n, s in old.items():
        merged = merge(s, obs[n], depths[n])
        new[n] = {**s, **{k: jnp.where(accept, v, s[k]) for k, v in merged.items()}}

      # 2. The periodic refresh, from the statistics just folded in.
      if method.refresh is not None and new:
        order = tuple(new)
        due_refresh = ((count % refresh_every) == 0) & ok_hp
        new = jax.lax.cond(due_refresh,
                           refresher(order, tuple(depths[n] for n in order)),
                           _keep, (new, safe_gamma))

      # 3. Direction, grafted; the graft's step before the start.
      graft_count = count - state.skipped_count - state.invalid_hparam_count
      started = count >= start_step
      out, new_accs = [], {}
      def one(t, s, size):   # one slice
        return grafting.rescale(method.direction(t, s, safe_gamma),
                                grafting.norm(size))
      for n in names:
        t = tensors[n]
        size, new_accs[n] = grafting.step(graft, t, accs[n], graft_count,
                                          graft_decay, graft_eps)
        if n in new:
          p = over_stack(one, depths[n])(t, new[n], size)
          size = jnp.where(started, p, size)
        out.append(size)

    skipped = ~(grads_finite & counters.all_finite(out))
    apply = ok_hp & ~skipped
    out = counters.zeros_unless(apply, out)
    new_accs = [None if accs[n] is None else jnp.where(apply, new_accs[n], accs[n])
                for n in names]
    new_state = make_state(
        jax.tree.unflatten(treedef, [new.get(n) for n in names]),
        jax.tree.unflatten(treedef, new_accs),
        **counters.advance_counters(state, due, finite, skipped=skipped,
                                    invalid_hparam=~ok_hp))
    out = [o.astype(g.dtype) for o, g in zip(out, leaves)]
    return jax.tree.unflatten(jax.tree.structure(updates), out), new_state

  return optax.GradientTransformationExtraArgs(
      init_fn, sharding.like_inputs(update_fn))


def _keep(operand):
  return operand[0]
