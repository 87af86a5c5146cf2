"""The layer-wise preconditioner shared by Eva, Eva-f, K-FAC and FOOF.

For every layer of ``params`` (a node with a ``kernel`` of rank >= 2) the
gradient is viewed as ``G_hat = [kernel_2d; bias]`` of shape ``(d_in + 1, d_out)``.
One update:

1. folds the layer statistics passed as ``stats=`` into running averages
   (every ``stats_every`` steps; the first observation initialises them; the
   new statistic gets weight ``stat_decay``; a batch whose statistics are not
   all finite is skipped and counted, so the state stays usable);
2. every ``refresh_every`` steps, recomputes the method's expensive state
   (inverses, eigendecompositions) inside :func:`jax.lax.cond`;
3. preconditions each layer's ``G_hat`` with the method's solve, which takes
   the two pieces ``(kernel_2d, bias)`` and also returns ``<U, G_hat>`` (Eva's
   closed forms never build the stacked matrix; K-FAC and FOOF go through
   :func:`on_stacked_view`);
4. applies one global scaling over the captured layers (none, KL-clip or
   KL-normalization, see :mod:`eva_optax._src.kl`);
5. writes the result back into ``{kernel, bias}`` in the gradient dtype.

Parameters outside captured layers, and layers the capture reported as not
captured, keep their gradient untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax._src import counters
from eva_optax._src import kl
from eva_optax._src import tree_utils
from eva_optax._src import validation

Array = jax.Array
LayerState = dict[str, Array]
SCALINGS = ("none", "kl_clip", "kl_normalize")


class LayerwiseState(NamedTuple):
  """State of a layer-wise (Kronecker) preconditioner."""

  count: Array            # shape=(), int32: update calls so far.
  stats_count: Array      # shape=(), int32: statistics folded into the averages.
  nonfinite_count: Array  # shape=(), int32: statistics skipped as non-finite.
  skipped_count: Array    # shape=(), int32: updates replaced by zeros (non-finite).
  invalid_hparam_count: Array  # shape=(), int32: steps skipped for a bad run-time hyperparameter.
  layers: dict[str, LayerState]  # per layer path "a/b": running averages (+ extras).


@dataclasses.dataclass(frozen=True)
class Method:
  """What distinguishes Eva, Eva-f, K-FAC and FOOF."""

  name: str
  statistics: str                   # value_and_grad(statistics=...) it needs
  stat_keys: tuple[str, ...]        # LayerStatistics fields it averages
  # (state, kernel_2d, bias or None, damping) -> (U_kernel, U_bias, <U, G_hat>)
  solve: Callable[[LayerState, Array, Array | None, Array],
                  tuple[Array, Array | None, Array]]
  init_extra: Callable[[int, int], LayerState] = lambda d_a, d_out: {}
  refresh: Callable[[LayerState, Array], LayerState] | None = None


def _stat_shape(key: str, d_a: int, d_out: int) -> tuple[int, ...]:
  return {"a": (d_a,), "g": (d_out,), "A": (d_a, d_a), "G": (d_out, d_out)}[key]


def on_stacked_view(solve: Callable[[LayerState, Array, Array], Array]):
  """Adapts a solve on the stacked ``(d_in + 1, d_out)`` matrix ``[kernel; bias]``
  (K-FAC, FOOF) to :attr:`Method.solve`'s split form; ``<U, G_hat>`` explicitly."""
  def split_solve(s, kernel, bias, gamma):
    gm = kernel if bias is None else jnp.concatenate([kernel, bias[None]])
    u = solve(s, gm, gamma)
    d_in = kernel.shape[0]
    return u[:d_in], (None if bias is None else u[d_in]), jnp.vdot(u, gm)
  return split_solve


def _check_stats(method: Method, stats: Any, layers: dict, state_keys) -> dict:
  """Matches stats to the layers; returns {path: LayerStatistics or None}."""
  if stats is None:
    raise ValueError(
        f"{method.name} needs layer statistics: compute them with "
        f"eva_optax.value_and_grad(loss_fn, statistics={method.statistics!r}) "
        "and call tx.update(grads, opt_state, params, stats=stats).")
  by_path = tree_utils.flatten_stats(stats)
  extra = sorted(set(by_path) - set(layers))
  if extra:
    raise ValueError(
        f"{method.name}: the stats tree does not match params: stats has layers "
        f"{[tree_utils.path_str(p) for p in extra]} that params has not. Pass the "
        "stats computed for the same model and params (and the same 'params' "
        "nesting) as the gradients.")
  out = {}
  for path, node in layers.items():
    name = tree_utils.path_str(path)
    if name not in state_keys:
      raise ValueError(
          f"{method.name}: layer {name!r} is in the gradients but was not in the "
          "params given to init; re-initialise the optimizer for this model.")
    st = by_path.get(path)
    if st is None:
      raise ValueError(
          f"{method.name}: no statistics for layer {name!r}, which has a kernel. "
          "Compute grads and stats together with eva_optax.value_and_grad, and "
          "make sure the layer runs inside the loss function (Dense, "
          "DenseGeneral and Conv are captured; others are reported as "
          "not captured and pass through).")
    if not st.captured:
      out[path] = None
      continue
    d_in, d_out, has_bias = tree_utils.layer_dims(node)
    d_a = d_in + int(has_bias)
    for key in method.stat_keys:
      value = getattr(st, key)
      if value is None:
        raise ValueError(
            f"{method.name}: the statistics of layer {name!r} have no {key!r}; "
            f"compute them with value_and_grad(..., statistics={method.statistics!r}).")
      if value.shape != _stat_shape(key, d_a, d_out):
        raise ValueError(
            f"{method.name}: statistic {key!r} of layer {name!r} has shape "
            f"{value.shape}, but the layer's gradient viewed as (d_in + bias, d_out) "
            f"= ({d_a}, {d_out}) needs {_stat_shape(key, d_a, d_out)}. The stats "
            "do not belong to these params (or, for a bias-free DenseGeneral "
            "with several feature axes, the kernel's last axis is not d_out).")
    out[path] = st
  missing = sorted(set(state_keys) - {tree_utils.path_str(p) for p in layers})
  if missing:
    raise ValueError(
        f"{method.name}: the gradients lack layers {missing} that were in the "
        "params given to init; the updates tree does not match the optimizer state.")
  return out


def layerwise_preconditioner(
    method: Method,
    *,
    damping: Any,
    stat_decay: Any,
    stats_every: int,
    refresh_every: int,
    scaling: str,
    kl_clip: float | None,
    learning_rate: Any,
) -> optax.GradientTransformationExtraArgs:
  """Builds the optax transformation of one method (see the module docstring)."""
  validation.check_positive(
      "damping", damping, fix="Eva's closed form divides by it; the paper uses 0.03.")
  validation.check_unit_interval(
      "stat_decay", stat_decay,
      fix="It is the weight of the NEW statistic (the paper's 0.95).")
  validation.check_interval("stats_every", stats_every)
  validation.check_interval("refresh_every", refresh_every)
  if scaling not in SCALINGS:
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}.")
  if scaling == "kl_clip":
    validation.check_positive("kl_clip", kl_clip)
    if learning_rate is None:
      raise ValueError("kl_clip needs learning_rate (a float or a schedule): the "
                       "clip bounds lr^2 <U, G>. Pass the optimizer's learning rate.")
    validation.check_positive("learning_rate", learning_rate)

  def init_fn(params):
    layers = {}
    for path, node in tree_utils.find_layers(params).items():
      d_in, d_out, has_bias = tree_utils.layer_dims(node)
      d_a = d_in + int(has_bias)
      st = {k: jnp.zeros(_stat_shape(k, d_a, d_out), jnp.float32)
            for k in method.stat_keys}
      st.update(method.init_extra(d_a, d_out))
      layers[tree_utils.path_str(path)] = st
    return LayerwiseState(**counters.zero_counters(), layers=layers)

  def update_fn(updates, state, params=None, *, stats=None, **extra_args):
    del params, extra_args
    layers = tree_utils.find_layers(updates)
    matched = _check_stats(method, stats, layers, state.layers)
    count = state.count
    gamma = jnp.asarray(validation.value_at(damping, count), jnp.float32)

    # 1. Running averages of the statistics.
    names = {tree_utils.path_str(p): p for p, st in matched.items() if st is not None}
    new_obs = {n: {k: getattr(matched[p], k).astype(jnp.float32)
                   for k in method.stat_keys} for n, p in names.items()}
    old_obs = {n: {k: state.layers[n][k] for k in obs} for n, obs in new_obs.items()}
    averages, due, finite = counters.fold_statistics(
        state, old_obs, new_obs, stat_decay, stats_every)
    layer_states = {n: {**s, **averages.get(n, {})} for n, s in state.layers.items()}

    # 2. Periodic refresh (inverses / eigendecompositions).
    if method.refresh is not None and names:
      def refresh_all(ls):
        return {n: (method.refresh(s, gamma) if n in names else s)
                for n, s in ls.items()}
      layer_states = jax.lax.cond((count % refresh_every) == 0, refresh_all,
                                  lambda ls: ls, layer_states)

    # 3. Precondition each captured layer, in float32.
    results, inners = {}, []
    for n, path in names.items():
      node = layers[path]
      d_in, d_out, has_bias = tree_utils.layer_dims(node)
      kernel = node["kernel"].astype(jnp.float32).reshape(d_in, d_out)
      bias = (node["bias"].astype(jnp.float32).reshape(d_out) if has_bias
              else None)
      u_kernel, u_bias, inner = method.solve(layer_states[n], kernel, bias, gamma)
      results[path + ("kernel",)] = u_kernel.reshape(node["kernel"].shape)
      if has_bias:
        results[path + ("bias",)] = u_bias.reshape(node["bias"].shape)
      inners.append(inner)

    # 4. One global scaling over the captured layers.
    total = sum(inners, jnp.zeros((), jnp.float32))
    if scaling == "kl_clip":
      lr = jnp.asarray(validation.value_at(learning_rate, count), jnp.float32)
      scale = kl.kl_clip_scale(total, lr, kl_clip)
    elif scaling == "kl_normalize":
      scale = kl.kl_normalize_scale(total, gamma)
    if scaling != "none":
      results = {k: scale * u for k, u in results.items()}

    # 5. Back into the updates tree, in the gradient dtype.
    def write(kp, leaf):
      key = tuple(tree_utils.key_name(k) for k in kp)
      return results[key].astype(leaf.dtype) if key in results else leaf

    new_updates = jax.tree_util.tree_map_with_path(write, updates)
    new_state = LayerwiseState(
        **counters.advance_counters(state, due, finite),
        layers=layer_states)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
