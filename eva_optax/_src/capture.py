"""Gradients plus per-layer statistics from unmodified Flax linen models.

``value_and_grad(fun)`` runs ``fun`` under :func:`flax.linen.intercept_methods`.
Every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Conv`` call inside ``fun`` gets
its output wrapped in an identity "tap" with a custom VJP. The tap takes a small
zero *probe* per layer as an extra differentiated input; in the backward pass the
tap hands the probe, as its cotangent, the layer's statistics:

* the input-side sums (``a``, ``A``), computed in the forward pass from the layer
  input and kept as residuals;
* the output-side sums (``g``, ``G``), reduced from the layer's output cotangent
  ``dL/dy`` as soon as it exists.

So the statistics travel through JAX's own gradient channel: nothing is stored
on the side, which keeps the capture correct under ``jax.jit``, ``nn.remat``
(``jax.checkpoint``), ``jax.vmap`` and sharding, and costs no per-example memory in
the default ``"vectors"`` mode (the probe of ``g`` is ``(d_out,)``, the reduction
happens inside the backward pass). Probe cotangents add up over calls, so a
module called several times in one forward pass pools the rows of all its calls.

A shape-only pass (:func:`jax.eval_shape`) first finds which layers run and the
probe shapes; under ``jax.jit`` it costs tracing time only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from eva_optax._src import layers
from eva_optax._src import tree_utils
from eva_optax._src.statistics import LayerStatistics

STATISTICS = ("vectors", "factors", "rows")

_STATE: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "eva_optax_capture", default=None)


class _Discovery:
  """Shape-only pass: which layers run, how often, with which shapes."""

  def __init__(self):
    self.calls: dict[tuple[str, ...], list[layers.LayerSpec]] = {}
    self.skipped: dict[tuple[str, ...], tuple[str, str]] = {}


class _Tapping:
  """Real pass: wraps each captured layer output in a statistics tap."""

  def __init__(self, probes: dict[str, Any], mode: str):
    self.probes = probes
    self.mode = mode


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tap(spec, mode, y, probe, forward_stats):
  del spec, mode, probe, forward_stats
  return y


def _tap_fwd(spec, mode, y, probe, forward_stats):
  del spec, mode, probe
  return y, forward_stats


def _tap_bwd(spec, mode, forward_stats, ct):
  backward_stats = layers.output_statistics(spec, ct, mode)
  probe_ct = {**forward_stats, **backward_stats}
  return ct, probe_ct, jax.tree.map(jnp.zeros_like, forward_stats)


_tap.defvjp(_tap_fwd, _tap_bwd)


@contextlib.contextmanager
def _suspended():
  token = _STATE.set(None)
  try:
    yield
  finally:
    _STATE.reset(token)


def _module_path(module: nn.Module) -> tuple[str, ...] | None:
  scope = getattr(module, "scope", None)
  if scope is None:
    return None
  return tuple(str(p) for p in scope.path)


def _interceptor(next_fun, args, kwargs, context):
  state = _STATE.get()
  if state is None or context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  module = context.module
  path = _module_path(module)
  if path is None:
    return next_fun(*args, **kwargs)
  if not layers.is_supported(module):
    y = next_fun(*args, **kwargs)
    if isinstance(state, _Discovery) and module.has_variable("params", "kernel"):
      reason = layers.unsupported_reason(module) or "not supported"
      state.skipped[path] = (type(module).__name__, reason)
    return y
  x = args[0] if args else kwargs.get("inputs")
  with _suspended():
    y = next_fun(*args, **kwargs)
    spec = layers.make_spec(module, x, y)
    if isinstance(state, _Discovery):
      state.calls.setdefault(path, []).append(spec)
      return y
    forward_stats = layers.input_statistics(module, x, spec, state.mode)
    probe = state.probes["/".join(path)]
    return _tap(spec, state.mode, y, probe, forward_stats)


@contextlib.contextmanager
def _capturing(state):
  token = _STATE.set(state)
  try:
    with nn.intercept_methods(_interceptor):
      yield
  finally:
    _STATE.reset(token)


def _zero_probes(calls, mode):
  probes = {}
  for path, specs in calls.items():
    if mode == "rows" and len(specs) > 1:
      raise ValueError(
          f"statistics='rows' cannot pool the rows of layer {'/'.join(path)!r}, "
          f"which runs {len(specs)} times in one forward pass; use "
          "statistics='vectors' or 'factors' (they pool the calls).")
    shapes = layers.probe_shapes(specs[0], mode)
    probes["/".join(path)] = {k: jnp.zeros(s, jnp.float32)
                              for k, s in shapes.items()}
  return probes


def _finalize(probe_grads, calls, skipped, mode) -> dict[tuple[str, ...], Any]:
  out: dict[tuple[str, ...], Any] = {}
  for path, specs in calls.items():
    ct = probe_grads["/".join(path)]
    n = ct["n"]
    inv_n = jnp.where(n > 0, 1.0 / jnp.maximum(n, 1.0), 0.0)
    fields = {"a": ct["a"] * inv_n, "g": ct["g"] * inv_n}
    if mode in ("factors", "rows"):
      m = ct["m"]
      inv_m = jnp.where(m > 0, 1.0 / jnp.maximum(m, 1.0), 0.0)
      fields.update(A=ct["A"] * inv_m, G=ct["G"] * inv_m)
    if mode == "rows":
      fields.update(a_rows=ct["a_rows"], g_rows=ct["g_rows"])
    out[path] = LayerStatistics(kind=specs[0].kind, **fields)
  for path, (kind, reason) in skipped.items():
    if path not in out:
      out[path] = LayerStatistics(kind=kind, note=reason)
  return out


def value_and_grad(fun: Callable[..., Any], has_aux: bool = False, *,
                   statistics: str = "vectors") -> Callable[..., Any]:
  """Like :func:`jax.value_and_grad`, plus per-layer statistics for Eva & co.

  ``fun(params, *args, **kwargs)`` must return a scalar loss (normally the mean
  over the batch), or ``(loss, aux)`` with ``has_aux=True``. Every Flax linen
  ``nn.Dense``, ``nn.DenseGeneral`` (any ``axis`` and ``features``) and ``nn.Conv``
  (1-D, 2-D, 3-D; any stride, dilation and padding) that runs inside ``fun`` is
  captured, also under ``nn.remat``; the model and ``fun`` stay unchanged.

  For a captured layer, seen as ``y = [x, 1] W_hat`` with one *row* per example
  and position (token, conv output pixel with its input patch):

  .. math::

    \\bar a = \\frac{1}{N}\\sum_{rows}[x, 1], \\qquad
    \\bar g = \\frac{1}{N}\\sum_{rows}\\frac{\\partial L}{\\partial y}, \\qquad
    A = \\frac{1}{B}\\sum_{e}\\hat a_e \\hat a_e^T, \\qquad
    G = \\frac{1}{B}\\sum_{e}\\hat g_e \\hat g_e^T,

  where ``hat a_e`` and ``hat g_e`` are example ``e``'s means over its positions
  (the authors' "reduce" approximation). A module called several times in one
  forward pass pools the rows (and examples) of all its calls, as if it had been
  called once on their concatenation. Conv padding zeros count in ``a_bar``.

  Args:
    fun: the loss function; its first argument is differentiated.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    statistics: ``"vectors"`` (``a``, ``g``: Eva, Eva-f; no per-example memory),
      ``"factors"`` (also ``A``, ``G``: K-FAC, FOOF) or ``"rows"`` (also every
      row's ``[x, 1]`` and ``dL/dy``, for tests and diagnostics; large).

  Returns:
    A function ``(params, *args, **kwargs) -> (value, grads, stats)`` where
    ``value`` is ``loss`` or ``(loss, aux)`` and ``stats`` mirrors ``params``: one
    :class:`LayerStatistics` per module that has a kernel, at the module's path
    (``stats["Dense_0"]`` pairs with ``params["Dense_0"]``).

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
  if statistics not in STATISTICS:
    raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}.")

  def grad_fn(params, *args, **kwargs):
    discovery = _Discovery()
    with _capturing(discovery):
      jax.eval_shape(lambda p: fun(p, *args, **kwargs), params)
    probes = _zero_probes(discovery.calls, statistics)

    def wrapped(p, pr):
      with _capturing(_Tapping(pr, statistics)):
        out = fun(p, *args, **kwargs)
      if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
          raise TypeError("with has_aux=True, fun must return (loss, aux), got "
                          f"{type(out).__name__}.")
        return out
      return out, None

    (loss, aux), (grads, probe_grads) = jax.value_and_grad(
        wrapped, argnums=(0, 1), has_aux=True)(params, probes)
    by_path = _finalize(probe_grads, discovery.calls, discovery.skipped,
                        statistics)
    stats = tree_utils.nest_like_params(by_path, params)
    return ((loss, aux) if has_aux else loss), grads, stats

  return grad_fn
