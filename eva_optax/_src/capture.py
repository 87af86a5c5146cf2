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

from eva_optax._src import flax_layers
from eva_optax._src import statistics as statistics_lib
from eva_optax._src import tap
from eva_optax._src import tree_utils
from eva_optax._src import views

#: The ``statistics=`` modes of :func:`value_and_grad`: ``"vectors"`` (``a``,
#: ``g``), ``"factors"`` (also ``A``, ``G``) and ``"rows"`` (also every row).
STATISTICS = ("vectors", "factors", "rows")

_SESSION: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "eva_optax_linen_session", default=None)

# The captured linen types, and the methods whose calls are captured.
_LINEN = ((nn.Dense, "__call__"), (nn.DenseGeneral, "__call__"),
          (nn.Conv, "__call__"), (nn.Embed, "__call__"), (nn.Embed, "attend"),
          (nn.Einsum, "__call__"))


def _describe(module: nn.Module, method: str, args, kwargs, x, y):
  """``(kind, call, view)`` of one linen call, or raises NotCaptured."""
  for base, name in _LINEN:
    if isinstance(module, base) and name == method:
      break
  else:
    raise flax_layers.NotCaptured(
        f"layer type {type(module).__name__} is not supported")
  if getattr(type(module), method) is not getattr(base, method):
    raise flax_layers.NotCaptured(
        f"{type(module).__name__} overrides {base.__name__}.{method}")
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


def _interceptor(next_fun, args, kwargs, context):
  session = _SESSION.get()
  module = context.module
  if (session is None or context.method_name not in ("__call__", "attend")
      or id(module) in session.active
      or not module.has_variable("params", tree_utils.PROBE)):
    return next_fun(*args, **kwargs)
  session.active.add(id(module))
  try:
    y = next_fun(*args, **kwargs)
  finally:
    session.active.discard(id(module))
  x = args[0] if args else next(iter(kwargs.values()))
  probe = module.get_variable("params", tree_utils.PROBE)
  describe = lambda: _describe(module, context.method_name, args, kwargs, x, y)
  return tap.handle_call(session, probe, describe, x, y, type(module).__name__)


@contextlib.contextmanager
def _capturing(session: tap.Session):
  token = _SESSION.set(session)
  try:
    with nn.intercept_methods(_interceptor):
      yield
  finally:
    _SESSION.reset(token)


def check_statistics(statistics: str) -> None:
  if statistics not in STATISTICS:
    raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}.")


def discover(run: Callable[[Any], Any], params: Any, mode: str,
             capturing) -> tuple[dict[int, tap.NodeRecord], dict]:
  """The shape-only pass: ``(records by node id, node id by path)``."""
  nodes = tree_utils.find_layers(params)
  ids = {path: i for i, path in enumerate(nodes)}
  records = {}
  markers = {}
  for path, node in nodes.items():
    name = views.weight_name(node)
    shape = tuple(views.unbox(node[name]).shape)
    records[ids[path]] = tap.NodeRecord(path=path, weight_shape=shape)
    markers[path] = tap.marker(ids[path], shape)
  with capturing(tap.Session(records, mode, discovery=True)), \
      warnings.catch_warnings():
    # A marker in a node that no linen layer reads (an NNX layer inside
    # nnx.bridge.ToLinen) is unknown state to Flax, which warns; the real pass
    # only adds probes to the nodes found here.
    warnings.filterwarnings("ignore", message=f"(?s).*{tree_utils.PROBE}")
    jax.eval_shape(run, tree_utils.with_probes(params, markers))
  tap.close_discovery(records, mode)
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
                   axis_name: str | tuple[str, ...] | None = None
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
  check_statistics(statistics)

  def run(p, *args, **kwargs):
    out = fun(p, *args, **kwargs)
    if has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError("with has_aux=True, fun must return (loss, aux), got "
                        f"{type(out).__name__}.")
      return out
    return out, None

  def grad_fn(params, *args, **kwargs):
    records, ids = discover(lambda p: run(p, *args, **kwargs)[0], params,
                            statistics, _capturing)
    augmented = tree_utils.with_probes(params, probes_for(records, ids, statistics))
    if axis_name is not None:
      augmented = tap.vary_like(augmented, frozenset(
          axis_name if isinstance(axis_name, tuple) else (axis_name,)))

    def wrapped(p):
      with _capturing(tap.Session(records, statistics, discovery=False)):
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


def layer_views(loss_fn: Callable[..., Any], params: Any, *args,
                **kwargs) -> Any:
  """The views of every captured layer, for the optimizers' ``layer_views=``.

  The layer-wise optimizers (Eva, Eva-f, K-FAC, FOOF) size their state at
  ``init`` from the parameters alone, and shapes alone are ambiguous for
  stacked layers (``nn.scan``, ``nn.vmap``: is ``(4, 64, 64)`` four layers or a
  conv kernel?), bias-free ``DenseGeneral`` layers with several output axes and
  Einsum kernels. This runs the capture's shape-only pass over
  ``loss_fn(params, *args, **kwargs)`` (no computation) and returns how the
  capture reads each layer; pass it on::

    views = eva_optax.layer_views(loss_fn, params, x, y)
    tx = eva_optax.eva(0.1, layer_views=views)

  Without it, an ambiguous layer raises a ValueError at the first update that
  says so; with it, the state is laid out as the statistics will be.

  Args:
    loss_fn: the loss function, as given to :func:`eva_optax.value_and_grad`.
    params: its first argument.
    *args: the rest of its arguments (a batch; only shapes matter).
    **kwargs: its keyword arguments.

  Returns:
    A tree keyed like ``params`` with one ``LayerView`` per captured layer.
  """
  records, ids = discover(lambda p: loss_fn(p, *args, **kwargs), params,
                          "vectors", _capturing)
  return views_tree(records, ids, params)
