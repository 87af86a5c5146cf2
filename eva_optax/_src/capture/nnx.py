"""Gradients plus per-layer statistics from unmodified Flax NNX models.

The NNX backend of the capture (the linen one is :mod:`eva_optax._src.capture`;
both share the layer math, the taps and the statistics). NNX has no method
interceptor, so the methods of the captured layer classes (``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.Embed`` and its ``attend``,
``nnx.Einsum``) are wrapped once, the first time :func:`value_and_grad` runs;
the wrappers do nothing but call the original unless a capture is active in
the current context. During a capture every layer module of the model gets a
probe variable (a subclass of ``nnx.Param``, so ``nnx.scan`` / ``nnx.vmap`` and
``wrt=nnx.Param`` filters treat it like the weights), and the statistics come
back as the gradient with respect to the probes from
:func:`flax.nnx.value_and_grad`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from typing import Any, Callable

import jax
from flax import nnx

from eva_optax._src.capture import audit
from eva_optax._src.capture import linen as linen_capture
from eva_optax._src.capture import registry
from eva_optax._src.capture import flax_layers
from eva_optax._src.capture import tap
from eva_optax._src.vocabulary import tree_utils
from eva_optax._src.vocabulary import views

_SESSION: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "eva_optax_nnx_session", default=None)
_ATTR = "eva_optax_probe"
_LOCK = threading.Lock()
_WRAPPERS: dict[tuple[type, str], Callable] = {}


class Probe(nnx.Param):
  """The capture's zero probe on a layer module (only while capturing)."""


def _describe(module, base, method, spec, args, kwargs, x, y):
  """``(kind, call, view)`` of one captured NNX call, or raises NotCaptured."""
  if spec is not None:
    return flax_layers.registered_dense(
        x, y, spec, getattr(module, spec.bias, None) is not None,
        type(module).__name__)
  has_bias = getattr(module, "bias", None) is not None
  if base is nnx.Linear:
    return flax_layers.dense(x, y, has_bias)
  if base is nnx.LinearGeneral:
    if len(module.batch_axis):
      raise flax_layers.NotCaptured("LinearGeneral with batch_axis is not supported")
    return flax_layers.dense_general(x, y, module.axis, module.out_features,
                                     has_bias, kind="LinearGeneral")
  if base is nnx.Conv:
    from flax.nnx.nn import linear as nnx_linear  # pylint: disable=g-import-not-at-top
    return flax_layers.conv(
        x, kernel_size=module.kernel_size, strides=module.strides,
        padding=module.padding, input_dilation=module.input_dilation,
        kernel_dilation=module.kernel_dilation, use_bias=has_bias,
        features=module.out_features,
        feature_group_count=module.feature_group_count, mask=module.mask,
        canonicalize_padding=nnx_linear.canonicalize_padding)
  if base is nnx.Embed:
    return flax_layers.embed(method, module.num_embeddings, module.features)
  equation = args[1] if len(args) > 1 else kwargs.get("einsum_str")
  equation = equation if equation is not None else module.einsum_str
  return flax_layers.einsum(equation, x, module.kernel_shape, has_bias)


@contextlib.contextmanager
def _on_copies(module, copies: dict[str, Any]):
  """The module's parameters replaced by ``copies`` for the duration of the
  block (the completeness check, :mod:`eva_optax._src.capture.audit`)."""
  saved = {name: getattr(module, name).get_value() for name in copies}
  try:
    for name, value in copies.items():
      getattr(module, name).set_value(views.unbox(value))
    yield
  finally:
    for name, value in saved.items():
      getattr(module, name).set_value(value)


def _wrap(base: type, method: str) -> Callable:
  """The capturing wrapper of ``base.method`` (a Flax layer's own method, or
  a registered layer's); any subclass's override that calls it goes through
  it, so such a subclass is captured exactly through that inner call."""
  original = getattr(base, method)
  spec = None if (base, method) in _METHODS else registry.REGISTRY[(base, method)]

  @functools.wraps(original)
  def wrapper(self, *args, **kwargs):
    session = _SESSION.get()
    probe = vars(self).get(_ATTR) if session is not None else None
    if probe is None or session.substituting or id(self) in session.active:
      return original(self, *args, **kwargs)
    record, value = tap.record_of(session, probe.get_value())
    session.active.add(id(self))
    try:
      if session.discovery:
        session.substituting = True
        try:
          with _on_copies(self, value):
            y = original(self, *args, **kwargs)
        finally:
          session.substituting = False
      else:
        y = original(self, *args, **kwargs)
    finally:
      session.active.discard(id(self))
    x = args[0] if args else next(iter(kwargs.values()))
    describe = lambda: _describe(self, base, method, spec, args, kwargs, x, y)
    return tap.handle_call(session, record, value, describe, x, y,
                           type(self).__name__)

  return wrapper


# The wrapped methods of Flax's layers; their classes (and subclasses) are the
# captured layers, with the types declared by eva_optax.register_dense.
_METHODS = ((nnx.Linear, "__call__"), (nnx.LinearGeneral, "__call__"),
            (nnx.Conv, "__call__"), (nnx.Embed, "__call__"),
            (nnx.Embed, "attend"), (nnx.Einsum, "__call__"))


def wrap_method(base: type, method: str) -> None:
  """Wraps ``base.method`` once (idempotent, thread safe)."""
  with _LOCK:
    if (base, method) not in _WRAPPERS:
      wrapper = _wrap(base, method)
      _WRAPPERS[(base, method)] = wrapper
      setattr(base, method, wrapper)


def install() -> None:
  """Wraps the captured NNX layer methods (once)."""
  for base, method in _METHODS:
    wrap_method(base, method)


def _captured_types() -> tuple[type, ...]:
  return tuple(dict.fromkeys(base for base, _ in _WRAPPERS))


def _layer_modules(model) -> dict[tuple[str, ...], Any]:
  """``{path: module}`` of the modules that hold a layer's weight."""
  params = nnx.state(model, nnx.Param)
  nodes = tree_utils.find_layers(params)
  modules = {tuple(str(k) for k in path): node
             for path, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Module)}
  return {path: modules[path] for path in nodes if path in modules}


@contextlib.contextmanager
def _attached(modules: dict, probes: dict):
  """Probes attached to the layer modules for the duration of the block."""
  try:
    for path, value in probes.items():
      setattr(modules[path], _ATTR, Probe(value))
    yield
  finally:
    for path in probes:
      if _ATTR in vars(modules[path]):
        delattr(modules[path], _ATTR)


@contextlib.contextmanager
def _capturing(session: tap.Session):
  token = _SESSION.set(session)
  try:
    yield
  finally:
    _SESSION.reset(token)


def _discover(loss_fn, has_aux, statistics, model, args, kwargs):
  """The shape-only pass with the completeness check, on an abstract copy of
  the model whose layer modules carry copies of their parameters."""
  modules = _layer_modules(model)
  params = nnx.state(model, nnx.Param)
  nodes = tree_utils.find_layers(params)
  records, ids = linen_capture.node_records(nodes)
  copies = {}
  for path, node in nodes.items():
    module = modules.get(path)
    if module is None:
      records[ids[path]].reject("its weights are not held by an NNX module")
    elif not isinstance(module, _captured_types()):
      # e.g. nnx.bridge.ToNNX: the linen layers inside it are not intercepted.
      records[ids[path]].reject(
          f"layer type {type(module).__name__} is not supported (the NNX "
          "capture reads nnx.Linear, LinearGeneral, Conv, Embed and Einsum, "
          "and the types declared with eva_optax.register_dense)")
    else:
      copies[path] = tap.node_probe(ids[path], {
          k: views.unbox(v) for k, v in node.items()})
  with _attached(modules, copies):
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  abstract = lambda tree: jax.tree.map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype) if hasattr(v, "shape")
      else v, tree)
  dynamic, rebuild = linen_capture.split_dynamic((args, kwargs))

  def program(p, r, dyn):
    a, kw = rebuild(dyn)
    model = nnx.merge(graphdef, p, r)

    def loss(m):
      with _capturing(tap.Session(records, statistics, discovery=True)):
        out = loss_fn(m, *a, **kw)
      return out[0] if has_aux else out

    return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(model)

  closed, grads = jax.make_jaxpr(program, return_shape=True)(
      abstract(state), abstract(rest), dynamic)
  tap.close_discovery(records, statistics)
  masks, _ = linen_capture.masks_and_outputs(
      state, ids, lambda names: _ATTR in names)
  masks += [audit.DATA] * (len(jax.tree.leaves(rest)) + len(dynamic))
  _, outputs = linen_capture.masks_and_outputs(
      grads, ids, lambda names: _ATTR in names)
  audit.check(records, closed, masks, outputs)
  return records, ids, params


def value_and_grad(loss_fn: Callable[..., Any], has_aux: bool = False, *,
                   statistics: str = "vectors") -> Callable[..., Any]:
  """Like :func:`flax.nnx.value_and_grad`, plus per-layer statistics for Eva & co.

  ``loss_fn(model, *args, **kwargs)`` returns a scalar loss (or ``(loss, aux)``
  with ``has_aux=True``). Every ``nnx.Linear``, ``nnx.LinearGeneral``,
  ``nnx.Conv``, ``nnx.Embed`` (lookups and ``attend``) and ``nnx.Einsum`` that runs
  inside ``loss_fn`` is captured, with no change to the model, also under
  ``nnx.jit``, ``nnx.remat``, ``nnx.vmap`` and ``nnx.scan`` (stacked layers get
  stacked statistics). The statistics are exactly those of
  :func:`eva_optax.value_and_grad` for the same network written in linen (see
  there for their definition).

  Args:
    loss_fn: the loss function; its first argument is the model.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    statistics: ``"vectors"``, ``"factors"`` or ``"rows"`` (as
      :func:`eva_optax.value_and_grad`).

  Returns:
    A function ``(model, *args, **kwargs) -> (value, grads, stats)``: ``value``
    and ``grads`` as :func:`flax.nnx.value_and_grad` gives them (gradients of
    the ``nnx.Param`` variables), and ``stats`` keyed like
    ``nnx.state(model, nnx.Param)``, one :class:`eva_optax.LayerStatistics` per
    layer. Pass them on with
    ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, stats=stats)``.

  Examples:
    >>> import jax.numpy as jnp, optax, eva_optax, eva_optax.nnx
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> x, y = jnp.ones((16, 4)), jnp.zeros((16, 2))
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> optimizer = nnx.Optimizer(model, eva_optax.eva(0.1), wrt=nnx.Param)
    >>> loss, grads, stats = eva_optax.nnx.value_and_grad(loss_fn)(model, x, y)
    >>> _ = optimizer.update(model, grads, stats=stats)

  References:
    Zhang et al., `Eva: Practical Second-order Optimization with
    Kronecker-vectorized Approximation <https://openreview.net/forum?id=_Mic8V96Voy>`_,
    ICLR 2023.
  """
  linen_capture.check_statistics(statistics)
  install()

  def grad_fn(model, *args, **kwargs):
    records, ids, params = _discover(loss_fn, has_aux, statistics, model, args,
                                     kwargs)
    modules = _layer_modules(model)
    nodes = tree_utils.find_layers(params)

    # 2. The real pass: probes attached, nnx.value_and_grad over nnx.Param.
    probes = {path: tap.node_probe(ids[path], tap.zero_probe(records[ids[path]],
                                                             statistics))
              for path in nodes if records[ids[path]].captured}
    with _attached(modules, probes), _capturing(
        tap.Session(records, statistics, discovery=False)):
      value, grads = nnx.value_and_grad(loss_fn, has_aux=has_aux)(
          model, *args, **kwargs)
    grads, probe_grads = _split_probes(grads)
    stats = linen_capture.collect(records, ids, probe_grads, statistics, None)
    return value, grads, tree_utils.nest(stats, like=params)

  return grad_fn


def _split_probes(grads) -> tuple[Any, dict]:
  """``(grads without the probes, {layer path: probe gradient})``."""
  probes, rest = nnx.split_state(grads, Probe, ...)
  found = {tuple(str(k) for k in path[:-1]): var.get_value()
           for path, var in nnx.to_flat_state(probes)}
  return rest, found


def layer_views(loss_fn: Callable[..., Any], model: Any, *args, **kwargs) -> Any:
  """:func:`eva_optax.layer_views` for an NNX model (the same function).

  Runs the capture's shape-only pass over ``loss_fn(model, *args, **kwargs)``
  and returns one ``LayerView`` per captured layer, keyed like
  ``nnx.state(model, nnx.Param)``, for the optimizers' ``layer_views=``.

  Args:
    loss_fn: the loss function, as given to :func:`value_and_grad`.
    model: the NNX model.
    *args: the rest of its arguments (a batch; only shapes matter).
    **kwargs: its keyword arguments.

  Returns:
    A tree keyed like ``nnx.state(model, nnx.Param)``.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        "eva_optax.nnx.layer_views takes an NNX model; for linen parameters "
        "call eva_optax.layer_views(loss_fn, params, *batch).")
  install()
  records, ids, params = _discover(loss_fn, False, "vectors", model, args, kwargs)
  return linen_capture.views_tree(records, ids, params)
