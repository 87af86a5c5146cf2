"""Gradients plus per-layer statistics from unmodified Flax linen models.

``value_and_grad(fun)`` runs ``fun`` under :func:`flax.linen.intercept_methods`.
Every call of an ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``, ``nn.Embed``
(lookup and ``attend``) and ``nn.Einsum`` (or of a subclass that keeps the
parent's method) whose parameters come from the differentiated argument is
captured: its output is wrapped in a statistics tap whose zero probe rides in
the layer's own ``params`` dict (see :mod:`eva_optax._src.tap`), so the
statistics are right under ``jax.jit`` (with shardings), ``nn.remat`` /
``jax.checkpoint``, ``jax.vmap`` / ``nn.vmap``, ``nn.scan`` (stacked layers get
stacked statistics) and ``jax.shard_map``. Anything that cannot be captured
exactly is reported as not captured (with the reason) and its gradient passes
through the optimizers.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from eva_optax._src.capture import audit
from eva_optax._src.capture import flax_layers
from eva_optax._src.capture import registry
from eva_optax._src.vocabulary import statistics as statistics_lib
from eva_optax._src.capture import tap
from eva_optax._src.vocabulary import tree_utils
from eva_optax._src.vocabulary import views

#: The ``statistics=`` modes of :func:`value_and_grad`: ``"vectors"`` (``a``,
#: ``g``), ``"factors"`` (also ``A``, ``G``) and ``"rows"`` (also every row).
STATISTICS = ("vectors", "factors", "rows")

_SESSION: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "eva_optax_linen_session", default=None)

# The captured linen types, and the methods whose calls are captured.
_LINEN = ((nn.Dense, "__call__"), (nn.DenseGeneral, "__call__"),
          (nn.Conv, "__call__"), (nn.Embed, "__call__"), (nn.Embed, "attend"),
          (nn.Einsum, "__call__"))


def _raw(method: Callable[..., Any]) -> Callable[..., Any]:
  """The function Flax wraps into a module method (what an interceptor sees)."""
  return getattr(method, "__wrapped__", method)


_BUILTIN = {_raw(getattr(base, name)): (base, name) for base, name in _LINEN}


def _target(context) -> tuple[type, str, Any] | None:
  """``(class, method, registration or None)`` when the function running is a
  captured one (a Flax layer's own method, or a registered layer's)."""
  fn = getattr(context.orig_method, "func", None)
  if fn in _BUILTIN:
    return (*_BUILTIN[fn], None)
  for spec in registry.REGISTRY.values():
    if issubclass(spec.module_type, nn.Module) and _raw(
        getattr(spec.module_type, spec.method)) is fn:
      return spec.module_type, spec.method, spec
  return None


def _overridden(module: nn.Module, method: str) -> str | None:
  """Why a call of ``module.method`` that is not itself captured may still
  leave the node uncaptured: the class overrides a captured method."""
  for base, name in _LINEN + tuple((sp.module_type, sp.method) for sp in
                                   registry.REGISTRY.values()):
    if name == method and isinstance(module, base):
      return (f"{type(module).__name__} overrides {base.__name__}.{method} "
              "without calling it (only calls of the captured method itself "
              "are read: call super()." + method + " inside, or declare the "
              "layer with eva_optax.register_dense)")
  return None


def _describe(module: nn.Module, base: type, method: str, spec, args, kwargs,
              x, y):
  """``(kind, call, view)`` of one captured linen call, or raises NotCaptured."""
  if spec is not None:
    return flax_layers.registered_dense(
        x, y, spec, module.has_variable("params", spec.bias),
        type(module).__name__)
  if base is nn.Dense:
    return flax_layers.dense(x, y, module.use_bias)
  if base is nn.DenseGeneral:
    if module.batch_dims not in ((), None, []):
      raise flax_layers.NotCaptured("DenseGeneral with batch_dims is not supported")
    return flax_layers.dense_general(x, y, module.axis, module.features,
                                     module.use_bias)
  if base is nn.Conv:
    return flax_layers.conv(
        x, kernel_size=module.kernel_size, strides=module.strides,
        padding=module.padding, input_dilation=module.input_dilation,
        kernel_dilation=module.kernel_dilation, use_bias=module.use_bias,
        features=module.features,
        feature_group_count=module.feature_group_count, mask=module.mask,
        canonicalize_padding=nn.linear.canonicalize_padding)
  if base is nn.Embed:
    return flax_layers.embed(method, module.num_embeddings, module.features)
  equation = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  equation = equation if equation is not None else module.einsum_str
  return flax_layers.einsum(equation, x, module.shape, module.use_bias)


def _on_copies(session: tap.Session, module: nn.Module, base: type,
               method: str, copies: dict[str, Any], args, kwargs) -> Any:
  """The call computed with the copies of the node's parameters (the
  completeness check, :mod:`eva_optax._src.capture.audit`)."""
  variables = {col: dict(v) for col, v in module.variables.items()}
  params = {k: v for k, v in variables.get("params", {}).items()
            if k != tree_utils.PROBE}
  variables["params"] = {**params, **copies}
  session.substituting = True
  try:
    return module.apply(variables, *args, method=getattr(base, method), **kwargs)
  finally:
    session.substituting = False


def _interceptor(next_fun, args, kwargs, context):
  session = _SESSION.get()
  module = context.module
  if (session is None or session.substituting
      or not module.has_variable("params", tree_utils.PROBE)):
    return next_fun(*args, **kwargs)
  record, value = tap.record_of(
      session, module.get_variable("params", tree_utils.PROBE))
  target = _target(context)
  if target is None:
    if session.discovery:
      why = _overridden(module, context.method_name)
      if why:
        record.override = why
      elif context.method_name == "__call__":
        record.reject(f"layer type {type(module).__name__} is not supported "
                      "(if it computes x @ W + b, declare it with "
                      "eva_optax.register_dense)", type(module).__name__)
    return next_fun(*args, **kwargs)
  if id(module) in session.active:
    return next_fun(*args, **kwargs)
  base, method, spec = target
  session.active.add(id(module))
  try:
    y = None
    if session.discovery:
      try:
        y = _on_copies(session, module, base, method, value, args, kwargs)
      except Exception as e:  # pylint: disable=broad-except
        record.reject("the completeness check could not re-run its call "
                      f"({type(e).__name__}: {e})", type(module).__name__)
    if y is None:
      y = next_fun(*args, **kwargs)
  finally:
    session.active.discard(id(module))
  x = args[0] if args else next(iter(kwargs.values()))
  describe = lambda: _describe(module, base, method, spec, args, kwargs, x, y)
  return tap.handle_call(session, record, value, describe, x, y,
                         type(module).__name__)


@contextlib.contextmanager
def _capturing(session: tap.Session):
  token = _SESSION.set(session)
  try:
    with nn.intercept_methods(_interceptor):
      yield
  finally:
    _SESSION.reset(token)


def check_statistics(statistics: str, stats_batch: Any = None) -> None:
  if statistics not in STATISTICS:
    raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}.")
  if stats_batch is not None and (isinstance(stats_batch, bool) or not isinstance(
      stats_batch, int) or stats_batch < 1):
    raise ValueError(f"stats_batch must be None or a whole number of examples "
                     f">= 1, got stats_batch={stats_batch!r}.")


def split_dynamic(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
  """``(array leaves, rebuild)``: the arrays of ``tree`` (the batch) as
  inputs of a traced program, the other leaves kept as they are."""
  leaves, treedef = jax.tree.flatten(tree)
  where = [i for i, x in enumerate(leaves)
           if isinstance(x, (jax.Array, np.ndarray, np.generic))]

  def rebuild(dynamic):
    out = list(leaves)
    for i, x in zip(where, dynamic):
      out[i] = x
    return jax.tree.unflatten(treedef, out)

  return [leaves[i] for i in where], rebuild


def node_records(nodes: dict) -> tuple[dict[int, tap.NodeRecord], dict]:
  """``(records by node id, node id by path)`` for the layer nodes found."""
  ids = {path: i for i, path in enumerate(nodes)}
  records = {}
  for path, node in nodes.items():
    name = views.weight_name(node)
    weight = views.unbox(node[name])
    records[ids[path]] = tap.NodeRecord(path=path, weight_shape=tuple(weight.shape),
                                        weight_name=name, weight_dtype=weight.dtype)
  return records, ids


def masks_and_outputs(tree: Any, ids: dict, in_probe) -> tuple[list[int], dict]:
  """Per leaf of ``tree`` (the differentiated argument, probes included), its
  audit mask (a copy in a probe slot, or an original parameter), and per node
  id the positions of its original parameters."""
  masks, outputs = [], {i: [] for i in ids.values()}
  for pos, (kp, _) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    names = tuple(tree_utils.key_name(k) for k in kp
                  if not isinstance(k, jax.tree_util.GetAttrKey))
    if in_probe(names):
      masks.append(audit.COPIES)
      continue
    masks.append(audit.PARAMS)
    for n in range(len(names) - 1, -1, -1):
      if names[:n] in ids:
        outputs[ids[names[:n]]].append(pos)
        break
  return masks, outputs


def discover(run: Callable[..., Any], params: Any, mode: str, args: tuple = (),
             kwargs: dict | None = None, stats_batch: int | None = None
             ) -> tuple[dict[int, tap.NodeRecord], dict]:
  """The shape-only pass, with the completeness check: ``(records by node id,
  node id by path)``. ``run(params, *args, **kwargs)`` returns the loss."""
  nodes = tree_utils.find_layers(params)
  records, ids = node_records(nodes)
  copies = {path: tap.node_probe(ids[path], {k: v for k, v in node.items()})
            for path, node in nodes.items()}
  augmented = tree_utils.with_probes(params, copies)
  dynamic, rebuild = split_dynamic((args, kwargs or {}))

  def loss(p, dyn):
    a, kw = rebuild(dyn)
    with _capturing(tap.Session(records, mode, discovery=True,
                                stats_batch=stats_batch)), \
        warnings.catch_warnings():
      # A probe in a node that no linen layer reads (an NNX layer inside
      # nnx.bridge.ToLinen) is unknown state to Flax, which warns.
      warnings.filterwarnings("ignore", message=f"(?s).*{tree_utils.PROBE}")
      return run(p, *a, **kw)

  program = jax.make_jaxpr(jax.grad(loss, allow_int=True))(augmented, dynamic)
  tap.close_discovery(records, mode)
  masks, outputs = masks_and_outputs(
      augmented, ids, lambda names: tree_utils.PROBE in names)
  masks += [audit.DATA] * len(dynamic)
  audit.check(records, program, masks, outputs)
  return records, ids


def probes_for(records, ids, mode) -> dict:
  return {path: tap.node_probe(i, tap.zero_probe(records[i], mode))
          for path, i in ids.items() if records[i].captured}


def collect(records, ids, probe_grads, mode, axis_name) -> dict:
  """``{path: LayerStatistics}`` from the probes' cotangents."""
  raw = {path: probe_grads.get(path, {}).get(f"id{i}")
         for path, i in ids.items()}
  if axis_name is not None:
    raw = jax.lax.psum(raw, axis_name)
  stats = {path: tap.finalize(records[ids[path]], value, mode)
           for path, value in raw.items()}
  if axis_name is not None:
    stats = statistics_lib.scale_loss(stats, 1.0 / jax.lax.psum(1, axis_name))
  return stats


def value_and_grad(fun: Callable[..., Any], has_aux: bool = False, *,
                   statistics: str = "vectors",
                   axis_name: str | tuple[str, ...] | None = None,
                   stats_batch: int | None = None,
                   ) -> Callable[..., Any]:
  """Like :func:`jax.value_and_grad`, plus per-layer statistics for Eva & co.

  ``fun(params, *args, **kwargs)`` must return a scalar loss (normally the mean
  over the batch), or ``(loss, aux)`` with ``has_aux=True``. Every Flax linen
  ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` (1-D to 3-D, any stride,
  dilation and padding), ``nn.Embed`` (lookups and ``attend``) and ``nn.Einsum``
  (where its equation is a linear map of its input) that runs inside ``fun``
  with parameters from ``params`` is captured; the model and ``fun`` stay
  unchanged. Subclasses that keep the parent's method are captured too.

  For a captured layer, seen as ``y = [u, 1] W_hat`` with one *row* per example
  and position (a token, a conv output pixel with its input patch):

  .. math::

    \\bar a = \\frac{1}{N}\\sum_{rows}[u, 1], \\qquad
    \\bar g = \\frac{1}{N}\\sum_{rows}\\frac{\\partial L}{\\partial y}, \\qquad
    A = \\frac{1}{B}\\sum_{e}\\hat a_e \\hat a_e^T, \\qquad
    G = \\frac{1}{B}\\sum_{e}\\hat g_e \\hat g_e^T,

  where ``hat a_e`` and ``hat g_e`` are example ``e``'s means over its positions
  (the authors' "reduce" approximation). An embedding is a Dense layer on one-hot
  rows (``a`` = token frequencies, ``A`` its diagonal, never materialized);
  ``Embed.attend`` uses the table transposed, so its rows are
  ``(dL/dlogits, query)`` in the table's ``(vocab, features)`` orientation, and a
  tied embedding pools the rows of both uses. A module called several times
  pools the rows of all its calls. Stacked layers (``nn.scan``, ``nn.vmap`` with
  per-member parameters) get statistics with the stack axes in front. Under
  ``jax.vmap`` the statistics are those of the unbatched computation.

  Args:
    fun: the loss function; its first argument (the parameters) is
      differentiated and must be what the model's ``apply`` receives.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    statistics: ``"vectors"`` (``a``, ``g``: Eva, Eva-f; no per-example memory),
      ``"factors"`` (also ``A``, ``G``: K-FAC, FOOF) or ``"rows"`` (also every
      row, for tests and diagnostics; large).
    axis_name: inside ``jax.shard_map`` or ``jax.pmap`` over the batch, the
      mapped axis name(s). The loss, the gradients and the statistics are then
      those of the global batch: ``fun``'s per-shard mean losses are averaged
      (``pmean``), so the gradients are the ``pmean`` of the per-shard
      gradients and ``g`` (``G``) carries the ``1/S`` (``1/S^2``) of that mean
      over ``S`` shards. Without ``axis_name`` inside ``shard_map``, the
      statistics are those of the loss JAX differentiates (the sum of the
      shards' losses, like JAX's own gradients of replicated parameters).
    stats_batch: compute the statistics from the first ``stats_batch``
      examples only (the first entries along the leading axis of every
      captured layer's input and output gradient: the examples, for
      batch-first models), at the cost of those rows only; the gradient is
      still the whole batch's. The statistics are exactly those of these
      examples, each row keeping the ``1/B`` of the whole batch's mean loss
      (the authors' ``kfac_batch_size``: their statistics come from the first
      16 examples of each batch). Inside ``shard_map`` each shard takes its
      own first ``stats_batch``. ``None``: every example.

  Returns:
    A function ``(params, *args, **kwargs) -> (value, grads, stats)`` where
    ``value`` is ``loss`` or ``(loss, aux)`` and ``stats`` mirrors ``params``:
    one :class:`LayerStatistics` per layer node (a dict with a ``kernel`` or an
    ``embedding``) at its path, captured or not (then with the reason).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, eva_optax
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((4, 2))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
    >>> loss, grads, stats = eva_optax.value_and_grad(loss_fn)(params, x)
    >>> stats.a.shape, stats.g.shape
    ((3,), (3,))

  References:
    Zhang et al., `Eva: Practical Second-order Optimization with
    Kronecker-vectorized Approximation <https://openreview.net/forum?id=_Mic8V96Voy>`_,
    ICLR 2023, and its journal version "Eva: A General Vectorized Approximation
    Framework for Second-order Optimization".
  """
  check_statistics(statistics, stats_batch)

  def run(p, *args, **kwargs):
    out = fun(p, *args, **kwargs)
    if has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("with has_aux=True, fun must return (loss, aux), got "
                        f"{type(out).__name__}.")
      return out
    return out, None

  def grad_fn(params, *args, **kwargs):
    records, ids = discover(lambda p, *a, **kw: run(p, *a, **kw)[0], params,
                            statistics, args, kwargs, stats_batch)
    augmented = tree_utils.with_probes(params, probes_for(records, ids, statistics))
    if axis_name is not None:
      augmented = tap.vary_like(augmented, frozenset(
          axis_name if isinstance(axis_name, tuple) else (axis_name,)))

    def wrapped(p):
      with _capturing(tap.Session(records, statistics, discovery=False,
                                  stats_batch=stats_batch)):
        loss, aux = run(p, *args, **kwargs)
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(wrapped, has_aux=True)(augmented)
    grads, probe_grads = tree_utils.split_probes(grads)
    stats = collect(records, ids, probe_grads, statistics, axis_name)
    if axis_name is not None:
      loss = jax.lax.pmean(loss, axis_name)
      grads = jax.lax.pmean(grads, axis_name)
    stats = tree_utils.nest(stats)
    return ((loss, aux) if has_aux else loss), grads, stats

  return grad_fn


def views_tree(records, ids, like) -> Any:
  """Nested ``{path: LayerView}`` of the captured nodes (for ``layer_views=``)."""
  return tree_utils.nest({path: records[i].view for path, i in ids.items()
                          if records[i].captured}, like=like)


def layer_views(loss_fn: Callable[..., Any], params_or_model: Any, *args,
                **kwargs) -> Any:
  """The views of every captured layer, for the optimizers' ``layer_views=``.

  The optimizers size their state at ``init`` from the parameters alone, and
  shapes alone are ambiguous for stacked layers (``nn.scan``, ``nn.vmap``: is
  ``(4, 64, 64)`` four layers or a conv kernel?), bias-free ``DenseGeneral``
  layers with several output axes, Einsum kernels and registered custom
  layers. This runs the capture's shape-only pass over
  ``loss_fn(params_or_model, *args, **kwargs)`` (no computation) and returns
  how the capture reads each layer; pass it on::

    views = eva_optax.layer_views(loss_fn, params, x, y)     # linen
    views = eva_optax.layer_views(loss_fn, model, x, y)      # Flax NNX
    tx = eva_optax.eva(0.1, layer_views=views)

  With views, ``init`` gives state to exactly the captured layers (the others
  get the plain gradient and no state); without, it reads every layer node
  from its shapes, and an ambiguous layer raises a ValueError at the first
  update that names this call.

  Args:
    loss_fn: the loss function, as given to :func:`eva_optax.value_and_grad`
      (linen) or :func:`eva_optax.nnx.value_and_grad` (NNX).
    params_or_model: its first argument: the linen parameters, or the NNX
      model.
    *args: the rest of its arguments (a batch; only shapes matter).
    **kwargs: its keyword arguments.

  Returns:
    A tree keyed like the parameters (``nnx.state(model, nnx.Param)`` for a
    model) with one ``LayerView`` per captured layer.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, eva_optax
    >>> model = nn.DenseGeneral((2, 3), use_bias=False)
    >>> x = jnp.ones((4, 5))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
    >>> views = eva_optax.layer_views(loss_fn, params, x)
    >>> views.describe()
    '(5, 6)'
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if isinstance(params_or_model, nnx.Module):
    from eva_optax._src.capture import nnx as nnx_capture  # pylint: disable=g-import-not-at-top
    return nnx_capture.layer_views(loss_fn, params_or_model, *args, **kwargs)
  records, ids = discover(loss_fn, params_or_model, "vectors", args, kwargs)
  return views_tree(records, ids, params_or_model)
