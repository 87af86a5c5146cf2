"""The layer-wise preconditioner shared by Eva, Eva-f, K-FAC and FOOF.

For every layer of the gradients (a node with a ``kernel`` or an ``embedding``)
the gradient is read through the layer's view (:mod:`eva_optax._src.views`, as
the capture saw the layer: stacked layers are a stack of independent layers)
as ``G_hat = [kernel_2d; bias]`` of shape ``(d_in + 1, d_out)`` per slice. One
update:

1. folds the statistics passed as ``stats=`` into running averages (every
   ``stats_every`` steps; the first observation initialises them; the new
   statistic gets weight ``stat_decay``; statistics that are not all finite are
   skipped and counted);
2. every ``refresh_every`` steps, recomputes the method's expensive state
   (inverses, eigendecompositions) inside :func:`jax.lax.cond`;
3. preconditions every slice of every captured layer with the method's solve
   (vectorized over the slices), on the gradient divided by a global power of
   two (exact; so huge but finite gradients cannot overflow the inner products);
4. applies one global scaling over the captured layers (none, KL-clip or
   KL-normalization, see :mod:`eva_optax._src.kl`);
5. writes the result back into ``{kernel, bias}`` (boxes kept) in the gradient
   dtype.

Parameters outside captured layers, and layers the capture reported as not
captured, keep their gradient. Statistics of layers that are not in the
gradients (another part of an ``optax.partition``) are ignored. A step whose
gradient is not finite, or whose damping (or ``stat_decay``) is out of range at
run time, returns zeros and is counted (``skipped_count``,
``invalid_hparam_count``), so the parameters stay finite.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax._src.preconditioner import counters
from eva_optax._src.preconditioner import distribute
from eva_optax._src.preconditioner import kl
from eva_optax._src.linalg import pow2
from eva_optax._src.linalg import rank_one
from eva_optax._src.preconditioner import matching
from eva_optax._src.preconditioner import validation
from eva_optax._src.vocabulary import sharding
from eva_optax._src.vocabulary import tree_utils
from eva_optax._src.vocabulary import views as views_lib

Array = jax.Array
LayerState = dict[str, Array]


class LayerwiseState(NamedTuple):
  """State of a layer-wise (Kronecker) preconditioner: Eva, Eva-f, K-FAC, FOOF.

  Attributes:
    count: update calls so far.
    stats_count: statistics folded into the running averages.
    nonfinite_count: statistics skipped because they were not finite.
    skipped_count: updates replaced by zeros (non-finite gradient or result).
    invalid_hparam_count: steps skipped because a run-time hyperparameter
      (damping, stat_decay) was out of range.
    layers: per layer path (``"a/b"``), the running averages of its statistics
      (stack axes in front for stacked layers) and the method's extras
      (inverses, eigendecompositions).

  References:
    See :func:`eva_optax.eva` and :func:`eva_optax.kfac`.
  """

  count: Array            # shape=(), int32: update calls so far.
  stats_count: Array      # shape=(), int32: statistics folded into the averages.
  nonfinite_count: Array  # shape=(), int32: statistics skipped as non-finite.
  skipped_count: Array    # shape=(), int32: updates replaced by zeros (non-finite).
  invalid_hparam_count: Array  # shape=(), int32: steps skipped for a bad run-time hyperparameter.
  layers: dict[str, LayerState]  # per layer path "a/b": running averages (+ extras).


@dataclasses.dataclass(frozen=True)
class Method:
  """What distinguishes Eva, Eva-f, K-FAC and FOOF (everything per slice)."""

  name: str
  statistics: str                   # value_and_grad(statistics=...) it needs
  stat_keys: tuple[str, ...]        # LayerStatistics fields it averages
  # (state, kernel_2d, bias or None, damping, view) -> (U_kernel, U_bias, <U, G_hat>)
  solve: Callable[..., tuple[Array, Array | None, Array]] | None = None
  # A rank-one closed form instead (Eva, Eva-f): U = (G_hat - u w^T) / damping
  # with G_hat the gradient over a power of two ``scale``, (state, kernel_2d,
  # bias or None, damping, view, scale) -> (u_kernel, u_bias, w, <U, G_hat>);
  # the core forms U fused with what follows.
  coefficients: Callable[..., tuple[Array, Array | None, Array, Array]] | None = None
  init_extra: Callable[[views_lib.LayerView], LayerState] = lambda view: {}
  # (state, damping, view) -> state
  refresh: Callable[..., LayerState] | None = None
  # view -> estimated flops of one slice's refresh (to split it over devices)
  refresh_cost: Callable[[views_lib.LayerView], float] = lambda view: 0.0
  # The messages of the eager checks: what damping is to this method, and
  # what its stat_decay weighs.
  damping_fix: str = "the paper uses 0.03."
  stat_decay_fix: str = "It is the weight of the NEW statistic (the paper's 0.95)."


def on_stacked_view(solve: Callable[..., Array]):
  """Adapts a solve on the stacked ``(d_in + 1, d_out)`` matrix ``[kernel; bias]``
  (K-FAC, FOOF) to :attr:`Method.solve`'s split form; ``<U, G_hat>`` explicitly."""
  def split_solve(s, kernel, bias, gamma, view):
    gm = kernel if bias is None else jnp.concatenate([kernel, bias[None]])
    u = solve(s, gm, gamma, view)
    d_in = kernel.shape[0]
    return u[:d_in], (None if bias is None else u[d_in]), jnp.vdot(u, gm)
  return split_solve


def _flat_stack(tree: Any, stack: tuple[int, ...]) -> Any:
  """Every leaf with its stack axes flattened into one leading axis."""
  n, k = math.prod(stack), len(stack)
  return jax.tree.map(lambda x: x.reshape((n,) + x.shape[k:]), tree)


def _unflat_stack(tree: Any, stack: tuple[int, ...]) -> Any:
  return jax.tree.map(lambda x: x.reshape(stack + x.shape[1:]), tree)


def _leaves_by_path(tree: Any) -> dict[tuple[str, ...], Array]:
  """``{("a", "b", "kernel"): leaf}`` of ``tree`` (boxes' fields left out)."""
  return {tuple(tree_utils.key_name(k) for k in path
                if not isinstance(k, jax.tree_util.GetAttrKey)): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _groups(captured: list) -> list[list]:
  """The captured layers by per-slice shape (``d_in``, ``d_out``, bias,
  diagonal): each group is computed as one batch of slices."""
  by_shape: dict[tuple, list] = {}
  for m in captured:
    v = m.view
    by_shape.setdefault((v.d_in, v.d_out, v.has_bias, v.diagonal), []).append(m)
  return list(by_shape.values())


def _gather(members: list, part: Callable[[Any], Any]) -> Any:
  """``part(m)`` of every member (each with a leading axis of slices),
  concatenated along that axis (a single member as it is)."""
  trees = [part(m) for m in members]
  if len(trees) == 1:
    return trees[0]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def _scatter(tree: Any, members: list) -> list:
  """The inverse of :func:`_gather`: each member's slices."""
  if len(members) == 1:
    return [tree]
  sizes = [m.view.num_slices for m in members]
  starts = [sum(sizes[:i]) for i in range(len(sizes))]
  return [jax.tree.map(lambda x, a=a, n=n: x[a:a + n], tree)
          for a, n in zip(starts, sizes)]


def _over_slices(fn: Callable[..., Any], per: Any) -> Any:
  """``fn`` on every slice of a stack: vmapped, except on CPU, where one slice
  at a time (a compiled loop): jaxlib's batched CPU Cholesky and eigh can
  deadlock when several run at once on few cores."""
  if jax.default_backend() == "cpu":
    return jax.lax.map(fn, per)
  return jax.vmap(fn)(per)


def _refresh_split(method: Method, captured: list, ls: dict, gamma: Array,
                   axis: str, mesh: Any) -> dict:
  """The refresh of every slice of every captured layer, split over ``axis``:
  each slice is a unit (its factors together), its result the method's extra
  state (inverses, eigendecompositions); a device computes the slices it owns
  of one shape together, as the replicated refresh does."""
  fns, inputs, costs, keys, where = [], [], [], [], []
  for members in _groups(captured):
    view = members[0].view
    keys_of = tuple(method.init_extra(view))
    fn = lambda per, view=view, k=keys_of: _over_slices(lambda s: {
        key: v for key, v in method.refresh(s, gamma, view).items()
        if key in k}, per)
    for m in members:
      per = _flat_stack(ls[m.name], m.view.stack)
      for j in range(m.view.num_slices):
        fns.append(fn)
        inputs.append(jax.tree.map(lambda a, j=j: a[j], per))
        costs.append(method.refresh_cost(m.view))
        keys.append(id(fn))
        where.append(m)
  results = distribute.split(axis, mesh, fns, inputs, costs, keys)
  out = dict(ls)
  for m in captured:
    mine = [r for r, w in zip(results, where) if w is m]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *mine)
    out[m.name] = {**ls[m.name], **_unflat_stack(stacked, m.view.stack)}
  return out


def units(method: Method, params: Any, layer_views: Any = None
          ) -> list[distribute.Unit]:
  """The refresh units of ``method`` for ``params``: one per slice of every
  layer node ``init`` gives state (see :func:`eva_optax.refresh_plan`)."""
  given = matching.views_from(layer_views)
  out = []
  for path, node in matching.layer_nodes(params).items():
    view = matching.initial_view(path, node, given)
    if view is None:
      continue
    size = sum(math.prod(v.shape) for v in method.init_extra(view).values())
    for j in range(view.num_slices):
      suffix = f"[{j}]" if view.stack else ""
      out.append(distribute.Unit(matching.name(path) + suffix,
                                 float(method.refresh_cost(view)), size))
  return out


def check_arguments(method: Method, *, damping: Any, stat_decay: Any,
                    stats_every: Any, refresh_every: Any, refresh_name: str,
                    kl_clip: Any, kl_normalize: Any, learning_rate: Any) -> str:
  """The eager checks of every layer-wise optimizer (``scale_by_*`` and its
  alias alike), under the names the user wrote; returns the scaling name."""
  validation.check_positive("damping", damping, fix=method.damping_fix)
  validation.check_unit_interval("stat_decay", stat_decay,
                                 fix=method.stat_decay_fix)
  validation.check_interval("stats_every", stats_every)
  validation.check_interval(refresh_name, refresh_every)
  if kl_clip is not None:
    validation.check_not_schedule("kl_clip", kl_clip)
    validation.check_positive("kl_clip", kl_clip,
                              fix="The paper's KL-clip uses kappa = 0.001.")
  if kl_normalize is not None and not isinstance(kl_normalize, bool):
    raise TypeError(f"kl_normalize must be True, False or None, got "
                    f"kl_normalize={kl_normalize!r}.")
  scaling = resolve_scaling(kl_clip, kl_normalize, "none")
  if scaling == "kl_clip":
    if learning_rate is None:
      raise ValueError("kl_clip needs learning_rate (a float or a schedule): the "
                       "clip bounds lr^2 <U, G>. Pass the optimizer's learning rate.")
    validation.check_positive("learning_rate", learning_rate)
  return scaling


def resolve_scaling(kl_clip: float | None, kl_normalize: bool | None,
                    default: str) -> str:
  """Maps the user-facing ``kl_clip`` / ``kl_normalize`` pair to a scaling name."""
  if kl_clip is not None and kl_normalize:
    raise ValueError("Pass either kl_clip (ICLR KL-clip) or kl_normalize=True "
                     "(journal KL-normalization), not both.")
  if kl_clip is not None:
    return "kl_clip"
  if kl_normalize is None:
    return default
  return "kl_normalize" if kl_normalize else "none"


def layerwise_preconditioner(
    method: Method,
    *,
    damping: Any,
    stat_decay: Any,
    stats_every: int,
    refresh_every: int = 1,
    refresh_name: str = "inverse_every",
    kl_clip: float | None = None,
    kl_normalize: bool | None = False,
    learning_rate: Any = None,
    layer_views: Any = None,
    distribute_over: str | None = None,
    mesh: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds the optax transformation of one method (see the module docstring).

  ``distribute_over``: a mesh axis over which the refresh is split
  (:mod:`eva_optax._src.preconditioner.distribute`), with ``mesh`` where no
  ``jax.set_mesh`` sets it.

  ``kl_clip`` / ``kl_normalize`` select the scaling (none by default);
  ``learning_rate`` is the KL-clip's. ``layer_views``: the views of layers
  whose shapes alone are ambiguous (stacked layers, bias-free layers with
  several output axes, Einsum kernels), as a stats tree (or its
  :func:`jax.eval_shape`) from :func:`eva_optax.value_and_grad`; see
  :func:`eva_optax.layer_views`.
  """
  scaling = check_arguments(
      method, damping=damping, stat_decay=stat_decay, stats_every=stats_every,
      refresh_every=refresh_every, refresh_name=refresh_name, kl_clip=kl_clip,
      kl_normalize=kl_normalize, learning_rate=learning_rate)
  distribute.check_axis_name(distribute_over)
  given_views = matching.views_from(layer_views)

  def init_fn(params):
    layers = {}
    for path, node in matching.layer_nodes(params).items():
      view = matching.initial_view(path, node, given_views)
      layers[matching.name(path)] = {} if view is None else matching.zero_state(
          method, view, node[view.param])
    return LayerwiseState(**counters.zero_counters(), layers=layers)

  def update_fn(updates, state, params=None, *, stats=None, **extra_args):
    del params, extra_args
    # The state of a layer whose weight is boxed (nn.Partitioned) is boxed too.
    state_layers = jax.tree.map(views_lib.unbox, state.layers,
                                is_leaf=views_lib.is_box)
    matched = matching.match(method, updates, state_layers, stats, given_views)
    count = state.count
    gamma = jnp.asarray(validation.value_at(damping, count), jnp.float32)
    hp_ok = jnp.logical_and(jnp.isfinite(gamma), gamma > 0)
    if callable(stat_decay) or hasattr(stat_decay, "dtype"):
      xi = jnp.asarray(validation.value_at(stat_decay, count), jnp.float32)
      hp_ok = hp_ok & (xi >= 0) & (xi <= 1)
    safe_gamma = jnp.where(hp_ok, gamma, 1.0)
    # Layers of one per-slice shape are computed together: one batched
    # computation per shape (a smaller program, faster to compile).
    captured = [m for m in matched if m.observation]
    groups = _groups(captured)
    kernels = [_gather(g, lambda m: m.pieces()[0]) for g in groups]
    biases = [None if not g[0].view.has_bias
              else _gather(g, lambda m: m.pieces()[1]) for g in groups]
    # One read of every captured gradient for its max-abs: the finiteness of
    # the layer (a NaN or inf makes it non-finite) and the global scale; the
    # other leaves (norms, uncaptured layers) are checked for finiteness.
    group_max = [jnp.max(jnp.abs(k)) if b is None else jnp.maximum(
        jnp.max(jnp.abs(k)), jnp.max(jnp.abs(b))) for k, b in zip(kernels, biases)]
    in_layers = {m.path + (leaf,) for m in captured for leaf in (
        (m.view.param, m.view.bias_param) if m.view.has_bias else (m.view.param,))}
    grads_ok = counters.all_finite(
        (group_max, [x for path, x in _leaves_by_path(updates).items()
                     if path not in in_layers]))

    # 1. Running averages of the statistics (not from a skipped step), per
    #    group.
    new_obs = [_gather(g, lambda m: _flat_stack(m.observation, m.view.stack))
               for g in groups]
    old_obs = [_gather(g, lambda m: _flat_stack(
        {k: state_layers[m.name][k] for k in m.observation}, m.view.stack))
               for g in groups]
    averages, due, finite = counters.fold_statistics(
        state, old_obs, new_obs, stat_decay, stats_every)
    keep = jnp.logical_and(hp_ok, grads_ok)
    folded = due & finite & keep
    averages = jax.tree.map(lambda n, o: jnp.where(keep, n, o), averages, old_obs)
    layer_states = dict(state_layers)
    for g, avg in zip(groups, averages):
      for m, a in zip(g, _scatter(avg, g)):
        layer_states[m.name] = {**state_layers[m.name],
                                **_unflat_stack(a, m.view.stack)}

    # 2. Periodic refresh (inverses / eigendecompositions), over the slices.
    if method.refresh is not None and captured:
      def refresh_all(ls):
        if distribute_over is not None:
          return _refresh_split(method, captured, ls, safe_gamma,
                                distribute_over, mesh)
        out = dict(ls)
        for members in groups:
          fn = lambda s, view=members[0].view: method.refresh(s, safe_gamma, view)
          renewed = _over_slices(fn, _gather(members, lambda m: _flat_stack(
              ls[m.name], m.view.stack)))
          for m, r in zip(members, _scatter(renewed, members)):
            out[m.name] = _unflat_stack(r, m.view.stack)
        return out
      due_refresh = jnp.logical_and((count % refresh_every) == 0, keep)
      layer_states = jax.lax.cond(due_refresh, refresh_all, lambda ls: ls,
                                  layer_states)

    # 3. Precondition, in float32, on the gradient divided by one global
    #    power of two (exact), per shape group, all slices at once.
    scale = pow2.pow2_scale(jnp.stack(group_max or [jnp.zeros(())]))
    parts, inner = {}, jnp.zeros((), jnp.float32)
    for members, kernel, bias in zip(groups, kernels, biases):
      per = _gather(members, lambda m: _flat_stack(layer_states[m.name],
                                                   m.view.stack))
      view = members[0].view
      if method.coefficients is not None:   # U = (G_hat - u w^T) / gamma
        fn = lambda s, k, b, view=view: method.coefficients(s, k, b, safe_gamma,
                                                            view, scale)
        *out, inn = jax.vmap(fn)(per, kernel, bias)
      else:                                 # U itself
        fn = lambda s, k, b, view=view: method.solve(s, k, b, safe_gamma, view)
        *out, inn = jax.vmap(fn)(per, kernel / scale,
                                 None if bias is None else bias / scale)
      inner = inner + jnp.sum(inn)
      for m, o in zip(members, _scatter(tuple(out), members)):
        parts[m.name] = o

    # 4. One global scaling over the captured layers (scale-free where it can).
    if scaling == "kl_normalize":
      factor = kl.kl_normalize_scale(inner, safe_gamma, scale)
    elif scaling == "kl_clip":
      lr = jnp.asarray(validation.value_at(learning_rate, count), jnp.float32)
      factor = kl.kl_clip_scale(inner, lr, kl_clip, scale)
    else:
      factor = scale
    if method.coefficients is not None:
      # The update is formed once, fused with what follows (no pass of its
      # own). It is finite wherever factor/gamma (2 + 2 |w|) is (each
      # |G_hat / scale| < 2 and each |u| < 2: u is a power-of-two-scaled a),
      # which a reduction over the small vectors w tells.
      mult = factor / safe_gamma
      results = {}
      for m in captured:
        uk, ub, w = parts[m.name]
        k, b = m.pieces()
        if not m.view.stack:     # one slice: its plain shape (fuses better)
          k, b, uk, w = k[0], None if b is None else b[0], uk[0], w[0]
          ub = None if ub is None else ub[0]
        uk_, ub_ = rank_one.apply_coefficients(
            k / scale, None if b is None else b / scale, uk, ub, w, mult)
        if not m.view.stack:
          uk_, ub_ = uk_[None], None if ub_ is None else ub_[None]
        results[m.name] = (uk_, ub_)
      result_ok = counters.all_finite(
          (mult, [parts[m.name][2] for m in captured]))
    else:
      results = {n: (uk * factor, None if ub is None else ub * factor)
                 for n, (uk, ub) in parts.items()}
      result_ok = counters.all_finite(results)

    # 5. Back into the updates tree, in the gradient dtype; the safe step.
    new_updates = matching.write_back(updates, matched, results)
    ok = jnp.logical_and(keep, result_ok)
    new_updates = counters.zeros_unless(ok, new_updates)
    new_state = LayerwiseState(
        **counters.advance_counters(
            state, due, finite, skipped=jnp.logical_and(hp_ok, ~ok),
            invalid_hparam=~hp_ok, folded=folded),
        layers=jax.tree.map(matching.rebox, state.layers, layer_states,
                            is_leaf=views_lib.is_box))
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(
      init_fn, sharding.like_inputs(update_fn))
