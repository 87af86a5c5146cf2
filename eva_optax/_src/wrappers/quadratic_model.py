"""The exact local quadratic model of a loss along a few directions.

For a loss ``L(theta) = ell(f(theta))`` of model outputs ``f(theta)`` (on one
batch), the generalized Gauss-Newton matrix is ``C = J^T H_ell J``, with ``J``
the Jacobian of the outputs in the parameters and ``H_ell`` the Hessian of the
loss in the outputs. For the losses below ``H_ell`` is positive semi-definite
and ``C`` equals the Fisher matrix of the model's predictive distribution
(Martens & Grosse 2015, section 5; Martens 2020, section 9).

No matrix is formed: for directions ``v_1 .. v_k`` (pytrees like the
parameters), one forward-mode pass through the model with the ``k`` tangents
stacked (``jax.vmap`` of ``jax.jvp``: the primal computation is shared, only
the tangents are batched) gives ``J v_i``, and then

.. math::
  (V^T C V)_{ij} = (J v_i)^T H_\\ell (J v_j),

with ``H_ell`` applied in closed form on the outputs. A loss is declared by name
(:data:`LOSSES`), each a mean, times a ``loss_scale``:

* ``"mse"``: ``mean((y - t)^2)`` over every element of the outputs (batch and
  features, e.g. pixels): ``H = 2 / n_elements``. ``optax.l2_loss`` (which
  halves) is ``loss_scale=0.5``; a sum over features then a mean over the
  batch is ``loss_scale=n_features``.
* ``"softmax_cross_entropy"``: cross-entropy of ``softmax`` over the last axis,
  averaged over all other axes (``optax.softmax_cross_entropy(...).mean()``,
  also with integer labels): per row ``(diag(p) - p p^T) / n_rows``,
  ``p = softmax(y)``.
* ``"sigmoid_cross_entropy"``: ``optax.sigmoid_binary_cross_entropy(y, t).mean()``
  over every element: ``H = s (1 - s) / n_elements``, ``s = sigmoid(y)``.

A callable ``loss(outputs) -> scalar`` (targets closed over) is also accepted:
its Hessian is applied by forward-over-reverse differentiation of that function
(exact for any loss; positive semi-definite only if the loss is convex in the
outputs). None of these needs the targets except the callable.

References:
  Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015;
  Martens, `New Insights and Perspectives on the Natural Gradient Method
  <https://arxiv.org/abs/1412.1193>`_, JMLR 2020.

:mod:`eva_optax._src.wrappers.adaptive` builds the adaptive step on it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
#: The losses :func:`eva_optax.adaptive` knows the output Hessian of:
#: ``"mse"`` (``mean((y - t)^2)`` over all elements), ``"softmax_cross_entropy"``
#: (mean over rows, classes on the last axis) and ``"sigmoid_cross_entropy"``
#: (mean over all elements).
LOSSES = ("mse", "softmax_cross_entropy", "sigmoid_cross_entropy")


def check_loss(loss: Any) -> None:
  """Raises a ValueError/TypeError unless ``loss`` is a known name or a callable."""
  if callable(loss):
    return
  if not isinstance(loss, str):
    raise TypeError(f"loss must be one of {LOSSES} or a callable "
                    f"loss(outputs) -> scalar, got {loss!r}.")
  if loss not in LOSSES:
    raise ValueError(
        f"loss must be one of {LOSSES} (the loss in the model outputs, a mean; "
        "see loss_scale for other normalizations) or a callable "
        f"loss(outputs) -> scalar, got loss={loss!r}.")


def _compute_dtype(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def output_hessian_products(loss: str | Callable[[Array], Array],
                            outputs: Array, tangents: Array,
                            loss_scale: Any = 1.0) -> Array:
  """``H_ell t`` for each tangent ``t`` in ``tangents`` (shape ``(k, *outputs.shape)``).

  ``H_ell`` is the Hessian of ``loss_scale * loss`` in the outputs at
  ``outputs`` (see the module docstring for each loss). Computed in at least
  float32.
  """
  check_loss(loss)
  dtype = _compute_dtype(outputs.dtype)
  y = outputs.astype(dtype)
  t = tangents.astype(dtype)
  scale = jnp.asarray(loss_scale, dtype)
  if callable(loss):
    def hvp(v):
      return jax.jvp(jax.grad(lambda o: loss(o).astype(dtype)), (y,), (v,))[1]
    return scale * jax.vmap(hvp)(t)
  if loss == "mse":
    return (2.0 * scale / y.size) * t
  if loss == "sigmoid_cross_entropy":
    s = jax.nn.sigmoid(y)
    return (scale / y.size) * (s * (1.0 - s)) * t
  # softmax_cross_entropy: rows are all axes but the last.
  p = jax.nn.softmax(y, axis=-1)
  rows = y.size // y.shape[-1] if y.ndim else 1
  pt = jnp.sum(p * t, axis=-1, keepdims=True)
  return (scale / rows) * (p * t - p * pt)


def jacobian_products(outputs_fn: Callable[[Any], Array], params: Any,
                      vectors: Sequence[Any]) -> tuple[Array, Array]:
  """``(f(params), stack_i J v_i)`` from one forward-mode pass.

  The tangents are stacked and pushed through ``jax.jvp`` under ``jax.vmap``:
  the primal computation does not depend on them, so it runs once and only the
  tangent computation is batched. Each tangent leaf is cast to its parameter's
  dtype (``jax.jvp`` requires it).

  Returns:
    ``outputs`` (the model outputs at ``params``) and an array of shape
    ``(len(vectors), *outputs.shape)``.
  """
  def cast(v):
    return jax.tree.map(lambda t, p: jnp.asarray(t).astype(p.dtype), v, params)

  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[cast(v) for v in vectors])

  def push(tangent):
    return jax.jvp(outputs_fn, (params,), (tangent,))

  outputs, jv = jax.vmap(push, out_axes=(None, 0))(stacked)
  if not isinstance(outputs, jax.Array) and not hasattr(outputs, "shape"):
    raise TypeError("outputs_fn must return one array (the model outputs the "
                    f"loss is computed from), got {type(outputs).__name__}.")
  return outputs, jv


def curvature_gram(outputs_fn: Callable[[Any], Array], params: Any,
                   vectors: Sequence[Any], loss: str | Callable[[Array], Array],
                   loss_scale: Any = 1.0) -> Array:
  """The ``k x k`` matrix ``V^T C V`` of the exact GGN ``C = J^T H_ell J``.

  .. math::
    (V^T C V)_{ij} = (J v_i)^T H_\\ell (J v_j)

  with ``J v_i`` from :func:`jacobian_products` (one shared forward pass) and
  ``H_ell`` from :func:`output_hessian_products`. Symmetrized; float32 at least.

  Args:
    outputs_fn: ``params -> outputs`` on the batch (the model's forward pass).
    params: where the curvature is taken.
    vectors: ``k`` pytrees shaped like ``params``.
    loss: a name in :data:`LOSSES` or a callable ``outputs -> scalar``.
    loss_scale: the loss is ``loss_scale`` times the declared mean.

  Returns:
    The ``(k, k)`` Gram matrix.

  Examples:
    >>> import jax.numpy as jnp
    >>> from eva_optax._src.wrappers import quadratic_model
    >>> w = {"w": jnp.ones((3,))}
    >>> f = lambda p: jnp.stack([p["w"].sum(), 2.0 * p["w"][0]])
    >>> v = [{"w": jnp.array([1.0, 0.0, 0.0])}, {"w": jnp.array([0.0, 1.0, 0.0])}]
    >>> quadratic_model.curvature_gram(f, w, v, "mse")   # J v = (1, 2), (1, 0)
    Array([[5., 1.],
           [1., 1.]], dtype=float32)
  """
  outputs, jv = jacobian_products(outputs_fn, params, vectors)
  dtype = _compute_dtype(outputs.dtype)
  hjv = output_hessian_products(loss, outputs, jv, loss_scale)
  k = len(vectors)
  a = jv.astype(dtype).reshape(k, -1)
  b = hjv.reshape(k, -1)
  gram = a @ b.T
  return 0.5 * (gram + gram.T)


def gram_of_vectors(vectors: Sequence[Any], other: Any | None = None) -> Array:
  """``V^T V`` (``k x k``), or ``V^T w`` (``k``) when ``other`` is given; float32+."""
  def vdot(x, y):
    leaves = [jnp.vdot(a.astype(_compute_dtype(a.dtype)).ravel(),
                       b.astype(_compute_dtype(b.dtype)).ravel())
              for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))]
    return sum(leaves[1:], leaves[0]) if leaves else jnp.zeros((), jnp.float32)

  if other is not None:
    return jnp.stack([vdot(v, other) for v in vectors])
  k = len(vectors)
  rows = [[vdot(vectors[i], vectors[j]) for j in range(k)] for i in range(k)]
  return jnp.stack([jnp.stack(r) for r in rows])
