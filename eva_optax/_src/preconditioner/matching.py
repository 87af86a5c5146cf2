"""Pairing gradients, statistics and optimizer state layer by layer.

The layer-wise optimizers read each layer through its view
(:class:`eva_optax._src.views.LayerView`): the one the statistics carry, or, at
``init`` (where only the parameters are known), the one given in
``layer_views=`` or inferred from the shapes. Every mismatch between the three
is a ``ValueError`` that names the layer and says what to do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from eva_optax._src.vocabulary import tree_utils
from eva_optax._src.vocabulary import views as views_lib
from eva_optax._src.vocabulary.statistics import LayerStatistics
from eva_optax._src.vocabulary.statistics import is_layer_statistics

Array = jax.Array
_F32 = jnp.float32
def views_call(updates: Any) -> str:
  """How to get the capture's views, for the model the updates come from."""
  nnx_model = type(updates).__module__.startswith("flax.nnx")
  args = "model" if nnx_model else "params"
  return ("give the optimizer the capture's views: tx = eva_optax.eva(..., "
          f"layer_views=eva_optax.layer_views(loss_fn, {args}, *batch)) with "
          "the same arguments as the gradient function's, then "
          "tx.init(params)")


def views_hint(updates: Any) -> str:
  return ("For stacked layers (nn.scan, nn.vmap), bias-free layers with "
          "several output axes, Einsum kernels and registered custom layers "
          "the shapes alone can be ambiguous: " + views_call(updates) + ".")


layer_nodes = tree_utils.find_layers
name = tree_utils.path_str


def stat_shape(key: str, view: views_lib.LayerView) -> tuple[int, ...]:
  """Per-slice shape of a statistic in a layer's view."""
  d_a, d_out = view.d_a, view.d_out
  return {"a": (d_a,), "g": (d_out,),
          "A": (d_a,) if view.diagonal else (d_a, d_a),
          "G": (d_out, d_out)}[key]


def views_from(layer_views: Any) -> dict[tuple[str, ...], views_lib.LayerView]:
  """``{path: view}`` from a stats tree, a LayerStatistics or a mapping of views."""
  if layer_views is None:
    return {}
  if isinstance(layer_views, views_lib.LayerView):
    return {(): layer_views}
  leaves = jax.tree_util.tree_flatten_with_path(
      layer_views, is_leaf=lambda x: isinstance(x, views_lib.LayerView))[0]
  if leaves and all(isinstance(v, views_lib.LayerView) for _, v in leaves):
    return {tuple(tree_utils.key_name(k) for k in kp): v for kp, v in leaves}
  out = {}
  for path, st in tree_utils.flatten_stats(layer_views).items():
    if isinstance(st, LayerStatistics) and st.view is not None:
      out[path] = st.view
  if not out and not is_layer_statistics(layer_views):
    raise TypeError(
        "layer_views must be the statistics from eva_optax.value_and_grad (or "
        "their jax.eval_shape, or eva_optax.layer_views(...)), or a mapping "
        f"{{path: LayerView}}; got {type(layer_views).__name__}.")
  return out


def _fit_bias(view: views_lib.LayerView, node: Mapping) -> views_lib.LayerView:
  """The view for the leaves present (a masked-out bias drops the bias row)."""
  if view.has_bias and views_lib.bias_of(node, view.bias_param) is None:
    return view.without_bias()
  return view


def initial_view(path, node: Mapping, given: dict) -> views_lib.LayerView | None:
  """The view ``init`` sizes a layer's state for: the given one (the
  capture's), else the shapes' (:func:`views_lib.infer`). ``None`` (no state:
  the layer gets the plain gradient) when views are given without this layer
  (the capture does not read it) or when its shapes read as no layer."""
  if given:
    return _fit_bias(given[path], node) if path in given else None
  try:
    return views_lib.infer(node)
  except ValueError:
    return None


def zero_state(method, view: views_lib.LayerView,
               weight: Any = None) -> dict[str, Array]:
  """A layer's initial state; boxed like ``weight`` when it is an
  ``nn.Partitioned`` box, with the stack axes' names (so that
  ``nn.get_partition_spec(opt_state)`` shards a stacked layer's state along its
  stack like the weight) and ``None`` for the other axes."""
  st = {k: jnp.zeros(view.stack + stat_shape(k, view), _F32)
        for k in method.stat_keys}
  for k, v in method.init_extra(view).items():
    st[k] = jnp.broadcast_to(v, view.stack + v.shape)
  names = getattr(weight, "names", None)
  if names is not None and hasattr(weight, "replace"):
    stack_names = tuple(names[:len(view.stack)])
    st = {k: weight.replace(value=v, names=stack_names + (None,) * (
        v.ndim - len(view.stack))) for k, v in st.items()}
  return st


@dataclasses.dataclass
class Matched:
  """One layer of the updates, with its view and this step's observation."""

  name: str
  path: tuple[str, ...]
  node: Mapping
  view: views_lib.LayerView | None
  observation: dict[str, Array] | None   # None: not captured, passes through

  def pieces(self) -> tuple[Array, Array | None]:
    """``(kernels (S, d_in, d_out), biases (S, d_out) or None)``, float32."""
    v = self.view
    w = views_lib.unbox(self.node[v.param]).astype(_F32)
    kernel = v.kernel_matrices(w)
    bias = None
    if v.has_bias:
      bias = v.bias_vectors(
          views_lib.unbox(self.node[v.bias_param]).astype(_F32))
    return kernel, bias


def _observation(method, st: LayerStatistics, view, fitted, where) -> dict:
  obs = {}
  for key in method.stat_keys:
    value = getattr(st, key, None)
    if value is None:
      raise ValueError(
          f"{where}: the statistics have no {key!r}; compute them with "
          f"eva_optax.value_and_grad(..., statistics={method.statistics!r}).")
    value = jnp.asarray(value, _F32)
    if fitted is not view:   # the bias row is masked out of this part
      if key == "a" or (key == "A" and view.diagonal):
        value = value[..., :-1]
      elif key == "A":
        value = value[..., :-1, :-1]
    want = fitted.stack + stat_shape(key, fitted)
    if tuple(value.shape) != want:
      raise ValueError(
          f"{where}: statistic {key!r} has shape {tuple(value.shape)}, but the "
          f"layer seen as {fitted.describe()} needs {want}. The statistics do not "
          "belong to these parameters.")
    obs[key] = value
  return obs


def match(method, updates: Any, state_layers: dict, stats: Any,
          given_views: dict | None = None) -> list[Matched]:
  """The layers of ``updates`` paired with their statistics and state."""
  if stats is None:
    raise ValueError(
        f"{method.name} needs layer statistics: compute them with "
        f"eva_optax.value_and_grad(loss_fn, statistics={method.statistics!r}) "
        "and call tx.update(grads, opt_state, params, stats=stats).")
  by_path = tree_utils.flatten_stats(stats)
  nodes = layer_nodes(updates)
  # Statistics of layers that another part of an optax.partition / masked
  # handles are ignored (their node is there, its leaves masked out); those of
  # layers that are nowhere in the gradients belong to another model.
  known = tree_utils.node_paths(updates)
  extra = sorted(name(p) for p in by_path if p not in known)
  if extra:
    raise ValueError(
        f"{method.name}: the stats tree does not match the gradients: it has "
        f"layers {extra} that the gradients have not. Pass the stats computed "
        "for the same model and params (and the same nesting) as the gradients.")
  out = []
  for path, node in nodes.items():
    n = name(path)
    where = f"{method.name}: layer {n!r}"
    if n not in state_layers:
      raise ValueError(
          f"{where} is in the gradients but was not in the params given to init; "
          "re-initialise the optimizer for this model.")
    st = by_path.get(path)
    if st is None and views_lib.weight_name(node) not in ("kernel", "embedding"):
      # Found only by a name a custom layer registered (register_dense makes it
      # a layer-node name in every tree): without statistics it is no layer.
      out.append(Matched(n, path, node, None, None))
      continue
    if st is None:
      raise ValueError(
          f"{where} has no statistics. Compute grads and stats together with "
          "eva_optax.value_and_grad (the stats mirror the differentiated "
          "argument: pass the same tree, e.g. both with or both without the "
          "'params' level), and make sure the layer runs inside the loss "
          "function. Layers the capture cannot handle are reported as not "
          "captured and pass through.")
    if not st.captured:
      out.append(Matched(n, path, node, None, None))
      continue
    view = st.view or views_lib.infer(node)
    views_lib.check_view(view, node, where)
    fitted = _fit_bias(view, node)
    if views_lib.bias_of(node, view.bias_param) is not None and not view.has_bias:
      raise ValueError(f"{where} has a bias that its statistics do not know; "
                       "the statistics do not belong to these parameters.")
    obs = _observation(method, st, view, fitted, where)
    if not state_layers[n]:
      raise ValueError(
          f"{where}: the optimizer has no state for this {st.kind} layer, "
          f"which the capture reads as {fitted.describe()}: at init, "
          + ("the layer_views given did not include it" if given_views else
             "its shapes could not be read as a layer") + "; "
          + views_call(updates) + ".")
    for key, value in obs.items():
      have = tuple(state_layers[n][key].shape)
      if have != tuple(value.shape):
        try:
          inferred = _fit_bias(views_lib.infer(node), node)
        except ValueError:
          inferred = None
        if given_views or inferred is None or (
            have != inferred.stack + stat_shape(key, inferred)):
          raise ValueError(
              f"{where}: the optimizer state holds {key!r} of shape {have}, "
              "which fits neither these gradients nor their statistics: the "
              "optimizer was initialised for other parameters (another model, "
              "or other layer shapes). Re-initialise it with tx.init(params) "
              "for these parameters.")
        raise ValueError(
            f"{where}: the optimizer state holds {key!r} of shape {have}, "
            f"initialised from the parameters' shapes alone, but the layer is a "
            f"{st.kind} seen as {fitted.describe()}. " + views_hint(updates))
    out.append(Matched(n, path, node, fitted, obs))
  missing = sorted(set(state_layers) - {name(p) for p in nodes})
  if missing:
    raise ValueError(
        f"{method.name}: the gradients lack layers {missing} that were in the "
        "params given to init; the updates tree does not match the optimizer state.")
  return out


def rebox(old: Any, new: Array) -> Any:
  """``new`` in the box (Flax metadata, NNX variable) that ``old`` came in."""
  from flax.core import meta  # pylint: disable=g-import-not-at-top
  if isinstance(old, meta.AxisMetadata):
    return old.replace_boxed(new)
  if views_lib.is_box(old) and hasattr(old, "replace"):
    return old.replace(new)
  return new


def write_back(updates: Any, matched: list[Matched], results: dict) -> Any:
  """``updates`` with each captured layer's kernel and bias replaced (every
  container and box of ``updates`` kept as it is)."""
  new: dict[tuple[str, ...], Array] = {}
  for m in matched:
    if m.observation is None:
      continue
    uk, ub = results[m.name]
    v = m.view
    w = views_lib.unbox(m.node[v.param])
    new[m.path + (v.param,)] = v.kernel_from_matrices(uk).astype(w.dtype)
    if v.has_bias:
      b = views_lib.unbox(m.node[v.bias_param])
      new[m.path + (v.bias_param,)] = v.bias_from_vectors(
          ub, tuple(b.shape)).astype(b.dtype)

  def put(kp, leaf):
    key = tuple(tree_utils.key_name(k) for k in kp)
    return rebox(leaf, new[key]) if key in new else leaf

  return jax.tree_util.tree_map_with_path(put, updates, is_leaf=views_lib.is_box)
