"""Custom linear layers: :func:`register_dense` teaches the capture a layer type.

The capture reads Flax's own layers (``Dense``, ``DenseGeneral``, ``Conv``,
``Embed``, ``Einsum`` and their NNX counterparts). A model's own linear layer,
such as transformers' ``FlaxConv1D`` (GPT-2: the kernel stored ``(d_out,
d_in)``), is declared once with :func:`register_dense`; from then on its calls
are captured like ``nn.Dense``'s, in linen and NNX models alike.

An embedding whose call scales its output (Gemma's embedder,
``super().__call__(ids) * sqrt(d)``) needs no registration: a subclass that
overrides a captured method but calls the parent's method inside is captured
exactly through that inner call (the scaling is outside the layer, in the
chain rule of the model). One that computes the lookup itself is not captured.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from eva_optax._src.vocabulary import views


@dataclasses.dataclass(frozen=True)
class DenseSpec:
  """A registered linear layer type: ``module_type.method(x) = x @ W + b``."""

  module_type: type
  kernel: str
  bias: str
  transposed: bool
  method: str


# (module type, method name) -> DenseSpec, in registration order.
REGISTRY: dict[tuple[type, str], DenseSpec] = {}


def _flax_kind(module_type: Any) -> str | None:
  """``"linen"``, ``"nnx"`` or ``None`` for a class that is neither."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if not inspect.isclass(module_type):
    return None
  if issubclass(module_type, nn.Module):
    return "linen"
  if issubclass(module_type, nnx.Module):
    return "nnx"
  return None


def register_dense(module_type: type, *, kernel: str = "kernel",
                   bias: str = "bias", transposed: bool = False,
                   method: str = "__call__") -> type:
  """Declares a custom linear layer type, so that the capture reads its calls.

  After ``register_dense(M)``, every call of ``M.method(x)`` inside a loss
  function given to :func:`eva_optax.value_and_grad` (linen) or
  :func:`eva_optax.nnx.value_and_grad` (NNX) is captured as a Dense layer:

  .. math::
    y = x\\,W + b \\quad\\text{over the last axis of } x,

  with ``W`` the parameter named ``kernel`` (shape ``(d_in, d_out)``, or
  ``(d_out, d_in)`` with ``transposed=True``) and ``b`` the one named ``bias``
  when the layer has it. The declaration is a promise about the layer's math
  that the capture cannot check; the completeness check still applies (a
  layer whose parameters are also used outside its calls is reported not
  captured). Subclasses of ``M`` that keep ``M.method`` are captured too. The
  registration is global: from then on a parameter node holding a rank >= 2
  leaf named ``kernel`` is read as a layer node in every model (the names
  ``"kernel"`` and ``"embedding"`` are always).

  Args:
    module_type: a ``flax.linen.Module`` or ``flax.nnx.Module`` subclass.
    kernel: the name of its weight.
    bias: the name of its bias (the layer may have none).
    transposed: the weight is stored ``(d_out, d_in)`` (PyTorch's and GPT-2's
      ``Conv1D`` layout).
    method: the method that computes ``x @ W + b`` (``"__call__"``).

  Returns:
    ``module_type`` (so the call can decorate a class definition).

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, eva_optax
    >>> class Conv1D(nn.Module):     # GPT-2's layer: kernel stored (out, in)
    ...   features: int
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     w = self.param("kernel", nn.initializers.normal(0.02),
    ...                    (self.features, x.shape[-1]))
    ...     return x @ w.T + self.param("bias", nn.initializers.zeros,
    ...                                 (self.features,))
    >>> _ = eva_optax.register_dense(Conv1D, transposed=True)
    >>> model = Conv1D(3)
    >>> x = jnp.ones((4, 2))
    >>> params = model.init(jax.random.PRNGKey(0), x)["params"]
    >>> loss_fn = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
    >>> _, _, stats = eva_optax.value_and_grad(loss_fn)(params)
    >>> stats.kind, stats.a.shape, stats.g.shape
    ('Conv1D', (3,), (3,))

  References:
    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015 (the
    layer statistics); kfac-jax's ``register_dense`` plays the same part for
    models written with its tags.
  """
  flavour = _flax_kind(module_type)
  if flavour is None:
    raise TypeError(
        "register_dense: module_type must be a flax.linen.Module or "
        f"flax.nnx.Module subclass (the class itself), got {module_type!r}.")
  for arg, value in (("kernel", kernel), ("bias", bias), ("method", method)):
    if not isinstance(value, str) or not value.isidentifier():
      raise TypeError(f"register_dense: {arg} must be a name (a str), got "
                      f"{arg}={value!r}.")
  if not isinstance(transposed, bool):
    raise TypeError(f"register_dense: transposed must be True or False, got "
                    f"transposed={transposed!r}.")
  if not callable(getattr(module_type, method, None)):
    raise ValueError(
        f"register_dense: {module_type.__name__} has no method {method!r}; "
        "pass method= the name of the method that computes x @ W + b.")
  spec = DenseSpec(module_type, kernel, bias, transposed, method)
  REGISTRY[(module_type, method)] = spec
  views.add_weight_name(kernel)
  if flavour == "nnx":
    from eva_optax._src.capture import nnx as nnx_capture  # pylint: disable=g-import-not-at-top
    nnx_capture.wrap_method(module_type, method)
  return module_type


def spec_of(module_type: type, method: str) -> DenseSpec | None:
  """The registration covering ``module_type.method`` (its own, or a parent's)."""
  for cls in module_type.__mro__:
    spec = REGISTRY.get((cls, method))
    if spec is not None:
      return spec
  return None
