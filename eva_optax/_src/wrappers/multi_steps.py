"""Gradient accumulation that keeps the layer statistics of every micro-batch.

``optax.MultiSteps`` averages the gradients of ``k`` micro-batches, but the
``stats=`` passed to ``update`` reach the wrapped optimizer only on the emitting
step, so Eva, Eva-f, K-FAC and FOOF would see the last micro-batch's statistics
alone (and with the wrong loss scale). :class:`MultiSteps` is a drop-in
replacement that also averages the statistics and hands the wrapped optimizer
exactly what one step on the concatenated batch would have given it.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax._src.vocabulary import statistics
from eva_optax._src.vocabulary import tree_utils
from eva_optax._src.vocabulary import views
from eva_optax._src.preconditioner.layerwise import LayerwiseState
from eva_optax._src.vocabulary.statistics import LayerStatistics

Array = jax.Array

# Every array field of LayerStatistics (static fields such as ``kind`` excluded),
# read from the dataclass so that fields added later are covered too.
_ARRAY_FIELDS = tuple(
    f.name for f in dataclasses.fields(LayerStatistics)
    if f.metadata.get("pytree_node", True))
# Per-row fields have as many rows as the micro-batch: they cannot be averaged.
_ROW_FIELDS = tuple(f for f in _ARRAY_FIELDS if f.endswith("_rows"))
# The Kronecker vector that goes with a factor: a full factor's leading axes
# (stack axes, then d) are its shape; a diagonal one (an embedding's A) has it.
_VECTOR_OF_FACTOR = {"A": "a", "G": "g"}


class MultiStepsState(NamedTuple):
  """State of :class:`MultiSteps`: :class:`optax.MultiStepsState` plus ``acc_stats``."""

  mini_step: Array        # shape=(), int32: micro-steps accumulated (0 after emitting).
  gradient_step: Array    # shape=(), int32: updates emitted so far.
  inner_opt_state: Any    # the wrapped optimizer's state.
  acc_grads: Any          # like params: running mean (or sum) of the gradients.
  skip_state: Any = ()    # what ``should_skip_update_fn`` returned last.
  # {layer path "a/b": {field: float32 running mean}}, for the statistics the
  # wrapped optimizer averages (empty for gradient-only optimizers).
  acc_stats: Any = ()


def _statistics_slots(inner_state: Any, params: Any
                      ) -> dict[str, dict[str, tuple[int, ...]]]:
  """Which statistics the wrapped optimizer keeps, per layer, with their shapes.

  Read from every :class:`LayerwiseState` in the inner state (also inside
  ``chain``, ``inject_hyperparams`` or ``partition``): a running average named
  like a :class:`LayerStatistics` field is a statistic to accumulate, and a
  factor brings its Kronecker vector along (``A`` -> ``a``), so that an
  accumulated layer still counts as captured.
  """
  nodes = {tree_utils.path_str(p): n
           for p, n in tree_utils.find_layers(params).items()}
  slots: dict[str, dict[str, tuple[int, ...]]] = {}
  is_state = lambda x: isinstance(x, LayerwiseState)
  for node in jax.tree.leaves(inner_state, is_leaf=is_state):
    if not is_state(node):
      continue
    for name, entries in node.layers.items():
      layer = slots.setdefault(name, {})
      diagonal = views.weight_name(nodes.get(name, {})) == "embedding"
      for key, value in entries.items():
        if key in _ARRAY_FIELDS and key not in _ROW_FIELDS:
          layer[key] = tuple(value.shape)
        if key in _VECTOR_OF_FACTOR:
          shape = tuple(value.shape)
          layer.setdefault(_VECTOR_OF_FACTOR[key],
                           shape if diagonal and key == "A" else shape[:-1])
  return slots


def _observations(stats: Any, acc_stats: dict) -> dict[str, dict[str, Array]]:
  """This micro-batch's statistics for every accumulator slot, in float32."""
  by_path = tree_utils.flatten_stats(stats)
  for path, st in by_path.items():
    rows = [f for f in _ROW_FIELDS if getattr(st, f) is not None]
    if rows:
      raise ValueError(
          f"MultiSteps: the statistics of layer {tree_utils.path_str(path)!r} "
          f"carry per-row fields {rows} (statistics='rows'), whose number of "
          "rows is the micro-batch's: they cannot be accumulated. Compute them "
          "with eva_optax.value_and_grad(..., statistics='vectors' or 'factors').")
  by_name = {tree_utils.path_str(p): st for p, st in by_path.items()}
  missing = sorted(set(acc_stats) - set(by_name))
  if missing:
    raise ValueError(
        f"MultiSteps: no statistics for layers {missing}, which the wrapped "
        "optimizer preconditions. Pass the stats that eva_optax.value_and_grad "
        "computed for these params on every micro-step.")
  out = {}
  for name, slots in acc_stats.items():
    st, obs = by_name[name], {}
    for key, acc in slots.items():
      value = getattr(st, key)
      if value is None:
        continue  # not captured, or not in this statistics mode: the inner says.
      if tuple(value.shape) != tuple(acc.shape):
        raise ValueError(
            f"MultiSteps: statistic {key!r} of layer {name!r} has shape "
            f"{tuple(value.shape)}, but the wrapped optimizer keeps "
            f"{tuple(acc.shape)}. The stats do not belong to the params the "
            "optimizer was initialised with.")
      obs[key] = value.astype(jnp.float32)
    out[name] = obs
  return out


def _inner_stats(stats: Any, acc_stats: dict, factor: Any) -> Any:
  """``stats`` with every accumulated field replaced by its mean, others None.

  The result goes through :func:`statistics.scale_loss` with ``factor``, so its
  output side (``g``, ``G``) belongs to the loss whose gradient is passed on.
  """
  def rebuild(key_path, st):
    if not statistics.is_layer_statistics(st):
      return st
    name = tree_utils.path_str(tuple(tree_utils.key_name(k) for k in key_path))
    layer = acc_stats.get(name, {})
    return st.replace(**{
        f: (layer[f] if f in layer and getattr(st, f) is not None else None)
        for f in _ARRAY_FIELDS})
  out = jax.tree_util.tree_map_with_path(
      rebuild, stats, is_leaf=statistics.is_layer_statistics)
  return statistics.scale_loss(out, factor)


def _zeros_like(shapes: Any) -> Any:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


class MultiSteps:
  """Gradient accumulation for every optimizer of this library (drop-in for ``optax.MultiSteps``).

  Over ``k`` consecutive micro-steps (``k = every_k_schedule(gradient_step)``)
  the gradients *and the layer statistics* passed as ``stats=`` are averaged;
  on the ``k``-th micro-step the wrapped optimizer runs once, on

  .. math::
    \\bar\\nabla = \\frac1k\\sum_{i=1}^k \\nabla L_i, \\qquad
    \\bar a = \\frac1k\\sum_i a_i, \\quad \\bar A = \\frac1k\\sum_i A_i, \\qquad
    \\bar g = \\frac1{k^2}\\sum_i g_i, \\quad \\bar G = \\frac1{k^3}\\sum_i G_i,

  which are exactly the gradient and statistics of one step on the
  concatenation of the ``k`` (equally sized) micro-batches under its mean loss
  ``(1/k) sum_i L_i``: each micro-batch's ``g`` carries the ``1/B`` of its own
  mean loss and the concatenation's carries ``1/(k B)``, hence the extra
  ``1/k`` on ``g`` and ``1/k^2`` on ``G`` (:func:`scale_loss`). So ``k``
  micro-steps of Eva, Eva-f, Eva-s, K-FAC, FOOF or Shampoo equal one step on the
  ``k``-times larger batch. In between, ``update`` returns zeros and leaves the
  wrapped optimizer's state alone.

  The wrapped optimizer's ``update`` (the preconditioner's work: solves,
  inverses, roots) runs under :func:`jax.lax.cond` on the emitting micro-step
  only; ``optax.MultiSteps`` runs it on every micro-step and discards the
  result. Statistics are accumulated in float32 as running means (Welford, as
  ``optax.MultiSteps`` averages gradients); which statistics, and their shapes,
  are read from the wrapped optimizer's initial state, so the accumulator holds
  only what it averages (Eva: ``a`` and ``g``, ``d_in + 1 + d_out`` floats per
  layer; Eva-f: ``a``; K-FAC: ``A``, ``G`` and their vectors ``a``, ``g``; FOOF:
  ``A`` and ``a``; Eva-s, Shampoo and optax's own optimizers: nothing, and
  ``stats`` are not passed on). Fields it does not average reach it as
  ``None``.

  Semantics shared with ``optax.MultiSteps`` (same arguments, state fields
  ``mini_step``, ``gradient_step``, ``inner_opt_state``, ``acc_grads`` and
  ``skip_state`` in the same order, :meth:`has_updated`,
  :meth:`gradient_transformation`): a micro-step rejected by
  ``should_skip_update_fn`` changes nothing (neither gradients nor statistics
  are accumulated, the mini-step does not advance). Where it differs: the
  statistics (above); the inner ``update`` is not run on the other micro-steps;
  the other extra keyword arguments reach it from the emitting micro-step only;
  with ``use_grad_mean=False`` (a gradient *sum*, the gradient of
  ``sum_i L_i``) the statistics are passed as their plain mean, which is what
  the loss ``sum_i L_i = k * mean loss`` gives (consistent with the gradient);
  ``every_k_schedule`` is checked (an int must be ``>= 1``); the state is a
  :class:`MultiStepsState` with one more field, ``acc_stats``, last.

  Args:
    opt: the wrapped optimizer, e.g. ``eva_optax.eva(0.1)``.
    every_k_schedule: ``k``, an int ``>= 1``, or a function of the gradient step
      (the number of emitted updates so far) that returns it.
    use_grad_mean: average the gradients (``True``, the default) or sum them.
    should_skip_update_fn: as in ``optax.MultiSteps``: ``(updates,
      gradient_step, params) -> (should_skip, skip_state)``, e.g.
      ``optax.skip_not_finite``.
    accumulator_dtype: dtype of the gradient accumulator (``float32``); the
      statistics are always accumulated in float32.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, eva_optax
    >>> model = nn.Dense(2)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
    >>> grad_fn = eva_optax.value_and_grad(loss_fn)
    >>> tx = eva_optax.MultiSteps(eva_optax.eva(0.1), every_k_schedule=2)
    >>> opt_state = tx.init(params)
    >>> for i in range(4):   # 4 micro-batches, 2 updates
    ...   loss, grads, stats = grad_fn(params, x + i, y)
    ...   updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    ...   params = optax.apply_updates(params, updates)
    >>> int(opt_state.gradient_step), bool(tx.has_updated(opt_state))
    (2, True)

  References:
    ``optax.MultiSteps`` (whose semantics this follows); Zhang et al., "Eva: A
    General Vectorized Approximation Framework for Second-order Optimization"
    (journal version of the ICLR 2023 paper) for the statistics' scale.
  """

  def __init__(
      self,
      opt: optax.GradientTransformation,
      every_k_schedule: int | Callable[[Any], Any],
      use_grad_mean: bool = True,
      should_skip_update_fn: Callable[..., tuple[Any, Any]] | None = None,
      accumulator_dtype: Any = jnp.float32,
  ):
    if not (callable(getattr(opt, "init", None))
            and callable(getattr(opt, "update", None))):
      raise TypeError("MultiSteps: opt must be an optax GradientTransformation "
                      f"(e.g. eva_optax.eva(0.1)), got {type(opt).__name__}.")
    if isinstance(every_k_schedule, bool) or not (
        isinstance(every_k_schedule, numbers.Integral) or callable(every_k_schedule)):
      raise TypeError("MultiSteps: every_k_schedule must be an int (micro-steps "
                      "per update) or a function of the gradient step, got "
                      f"every_k_schedule={every_k_schedule!r}.")
    if isinstance(every_k_schedule, numbers.Integral):
      if every_k_schedule < 1:
        raise ValueError("MultiSteps: every_k_schedule must be >= 1 (1: an "
                         f"update on every micro-step), got every_k_schedule={every_k_schedule}.")
      k = int(every_k_schedule)
      self._every_k_schedule = lambda step: k
    else:
      self._every_k_schedule = every_k_schedule
    # A plain GradientTransformation ignores extra args (stats); any other
    # object with init/update (a MultiSteps) gets them.
    self._opt = (optax.with_extra_args_support(opt)
                 if isinstance(opt, optax.GradientTransformation) else opt)
    self._use_grad_mean = use_grad_mean
    self._accumulator_dtype = (None if accumulator_dtype is None
                               else jax.dtypes.canonicalize_dtype(accumulator_dtype))
    self._should_skip_update_fn = should_skip_update_fn

  @property
  def inner_opt(self) -> Any:
    """The wrapped optimizer."""
    return self._opt

  def _acc_dtype(self, leaf: Any) -> Any:
    return leaf.dtype if self._accumulator_dtype is None else self._accumulator_dtype

  def _skip(self, updates, gradient_step, params):
    if self._should_skip_update_fn is None:
      return jnp.array(False), ()
    return self._should_skip_update_fn(updates, gradient_step, params)

  def init(self, params: Any) -> MultiStepsState:
    """The initial state: zero accumulators and the wrapped optimizer's state."""
    inner = self._opt.init(params)
    gradient_step = jnp.zeros([], jnp.int32)
    _, skip_state = self._skip(optax.tree.zeros_like(params), gradient_step, params)
    acc_stats = {name: {k: jnp.zeros(shape, jnp.float32) for k, shape in slots.items()}
                 for name, slots in _statistics_slots(inner, params).items()}
    return MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=gradient_step,
        inner_opt_state=inner,
        acc_grads=jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), self._acc_dtype(p)), params),
        skip_state=skip_state,
        acc_stats=acc_stats)

  def update(self, updates: Any, state: MultiStepsState, params: Any = None,
             **extra_args: Any) -> tuple[Any, MultiStepsState]:
    """Accumulates one micro-step; every ``k``-th runs the wrapped optimizer.

    Args:
      updates: this micro-batch's gradients (of its mean loss).
      state: the state from :meth:`init` or the previous call.
      params: the current parameters (passed on to the wrapped optimizer).
      **extra_args: ``stats=`` from :func:`eva_optax.value_and_grad` for the
        layer-wise optimizers (accumulated); any other extra argument is passed
        to the wrapped optimizer on the emitting micro-step.

    Returns:
      ``(updates, state)``: the wrapped optimizer's updates on the emitting
      micro-step, zeros on the others.
    """
    stats = extra_args.pop("stats", None)
    acc_stats = state.acc_stats if isinstance(state.acc_stats, dict) else {}
    observed = None if stats is None else _observations(stats, acc_stats)
    pass_stats = stats is not None and bool(acc_stats)
    k_steps = self._every_k_schedule(state.gradient_step)
    should_skip, skip_state = self._skip(updates, state.gradient_step, params)
    should_skip = jnp.asarray(should_skip)
    if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
      raise ValueError(
          "The `should_skip_update_fn` function should return a boolean scalar "
          f"array, but it returned an array of dtype {should_skip.dtype} and "
          f"shape {should_skip.shape}")

    if self._use_grad_mean:
      merge = lambda new, acc, n: acc + (new - acc) / (n + 1)
      factor = 1.0 / jnp.asarray(k_steps, jnp.float32)
    else:
      merge = lambda new, acc, n: acc + new
      factor = None   # the statistics of sum_i L_i are the plain mean.

    def inner_update(acc_grads, acc_stats, inner_state, params):
      kwargs = dict(extra_args)
      if pass_stats:
        kwargs["stats"] = _inner_stats(
            stats, acc_stats, 1.0 if factor is None else factor)
      new_updates, new_inner = self._opt.update(
          optax.tree.cast_like(acc_grads, updates), inner_state, params, **kwargs)
      new_inner = jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)),
                               new_inner, inner_state)
      return new_updates, new_inner

    def do_update(updates, state, params):
      n = state.mini_step.astype(jnp.float32)
      acc_grads = jax.tree.map(
          lambda g, acc: merge(g.astype(acc.dtype), acc, n.astype(acc.dtype)),
          updates, state.acc_grads)
      new_acc_stats = {   # always a running mean (Welford), in float32
          name: {k: (acc + (observed[name][k] - acc) / (n + 1)
                     if k in observed[name] else acc) for k, acc in slots.items()}
          for name, slots in acc_stats.items()} if observed else acc_stats
      emit = state.mini_step == (k_steps - 1)
      shapes = jax.eval_shape(inner_update, acc_grads, new_acc_stats,
                              state.inner_opt_state, params)[0]
      final_updates, inner_state = jax.lax.cond(
          emit, inner_update,
          lambda g, s, inner, p: (_zeros_like(shapes), inner),
          acc_grads, new_acc_stats, state.inner_opt_state, params)
      new_state = MultiStepsState(
          mini_step=optax.safe_increment(state.mini_step) % k_steps,
          gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step),
                                  state.gradient_step),
          inner_opt_state=inner_state,
          acc_grads=jax.tree.map(
              lambda acc: jnp.where(emit, jnp.zeros_like(acc), acc), acc_grads),
          skip_state=skip_state,
          acc_stats=jax.tree.map(
              lambda acc: jnp.where(emit, jnp.zeros_like(acc), acc), new_acc_stats))
      return final_updates, new_state

    if self._should_skip_update_fn is None:
      return do_update(updates, state, params)

    def skip_update(updates, state, params):
      shapes = jax.eval_shape(inner_update, state.acc_grads, acc_stats,
                              state.inner_opt_state, params)[0]
      return _zeros_like(shapes), state._replace(skip_state=skip_state)

    return jax.lax.cond(should_skip, skip_update, do_update, updates, state, params)

  def has_updated(self, state: MultiStepsState) -> Array:
    """Whether the last ``update`` emitted (ran the wrapped optimizer)."""
    return jnp.logical_and(state.mini_step == 0, state.gradient_step > 0)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """``init`` and ``update`` as an optax ``GradientTransformationExtraArgs``."""
    return optax.GradientTransformationExtraArgs(init=self.init, update=self.update)
