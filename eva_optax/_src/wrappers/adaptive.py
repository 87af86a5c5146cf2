"""Learning rate, momentum and damping from the exact local quadratic model.

Martens and Grosse's adaptive scheme (2015, sections 6-7), for any direction:
each step, with ``d`` the direction of a preconditioner (or of any optax
transformation) and ``p`` the previous update, the update is
``u = alpha d + mu p`` with ``(alpha, mu)`` minimizing the damped quadratic model
of the loss along the two directions, and the damping ``lambda`` follows the
Levenberg-Marquardt rule. This module holds the rule: the 2x2 solve, the
damping's Levenberg-Marquardt move and the transformation; the
curvature-vector products and the loss Hessians are the quadratic model's
(:mod:`eva_optax._src.wrappers.quadratic_model`).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from eva_optax._src.preconditioner import counters
from eva_optax._src.wrappers import quadratic_model
from eva_optax._src.preconditioner import validation

Array = jax.Array
_INJECT_STATES = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)
_NO_PARAMS = ("adaptive needs params (the model's parameters) in update: "
              "tx.update(grads, state, params, outputs_fn=..., value_fn=...).")


class AdaptiveState(NamedTuple):
  """State of :func:`adaptive` (see it for the math and the references).

  Attributes:
    count: update calls so far (int32).
    damping: ``lambda``, the damping of the quadratic model (float32).
    coefficients: ``(alpha, mu)`` of the last step; zeros for a safe step.
    quad_change: ``q(u)`` of the last step, ``lambda`` included (0 for a safe
      step).
    rho: the last reduction ratio measured (NaN before the first).
    nonfinite_count: zero steps taken because the gradient, the direction, the
      previous update or the model's products were not finite.
    curvature_count: steps with non-positive curvature along ``d``, a
      non-negative ``q``, or an unusable 2x2 system (the 1-D step or a zero step
      was taken instead).
    rejected_count: steps rejected because the loss rose (adaptation steps).
    velocity: the previous update ``p``.
    inner_state: the direction's state.
  """

  count: Array            # shape=(), int32: update calls so far.
  damping: Array          # shape=(), float32: lambda of the quadratic model.
  coefficients: Array     # shape=(2,), float32: (alpha, mu) of the last step.
  quad_change: Array      # shape=(), float32: q(u) of the last step (0 if none).
  rho: Array              # shape=(), float32: last reduction ratio (nan before one).
  nonfinite_count: Array  # shape=(), int32: zero steps for a non-finite g, d, p or model.
  curvature_count: Array  # shape=(), int32: non-positive curvature or q, or a failed 2x2 solve.
  rejected_count: Array   # shape=(), int32: steps rejected because the loss rose.
  velocity: optax.Updates  # the previous update p (zeros at first).
  inner_state: optax.OptState  # the direction's state.


def _is_number(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _scale_direction_damping(tree: Any, factor: Array) -> Any:
  """Multiplies every injected ``damping`` hyperparameter in ``tree`` by ``factor``."""
  is_inject = lambda x: isinstance(x, _INJECT_STATES)

  def scale(x):
    if not (is_inject(x) and "damping" in x.hyperparams):
      return x
    old = x.hyperparams["damping"]
    new = (old * factor).astype(jnp.asarray(old).dtype)
    return x._replace(hyperparams={**x.hyperparams, "damping": new})

  return jax.tree.map(scale, tree, is_leaf=is_inject)


def solve_two_by_two(m: Array, b: Array, has_p: Array,
                     rcond: float = 1e-6) -> tuple[Array, Array, Array]:
  """Minimizes ``c^T b + 1/2 c^T M c`` over ``c = (alpha, mu)``.

  The 2x2 solve ``c = -M^{-1} b`` when ``has_p`` and ``M`` is safely positive
  definite (``det M > rcond M_00 M_11``), otherwise the 1-D solve along the
  first direction, ``c = (-b_0 / M_00, 0)`` (the first step, where ``p = 0``,
  or ``d`` parallel to ``p``), otherwise zeros.

  Returns:
    ``(c, ok1, ok2)``: the coefficients and whether the 1-D and 2-D solves
    were usable.
  """
  m00, m01, m11 = m[0, 0], 0.5 * (m[0, 1] + m[1, 0]), m[1, 1]
  det = m00 * m11 - m01 * m01
  finite = jnp.all(jnp.isfinite(m)) & jnp.all(jnp.isfinite(b))
  ok1 = finite & (m00 > 0)
  ok2 = ok1 & has_p & (m11 > 0) & (det > rcond * m00 * m11)
  safe_det = jnp.where(ok2, det, 1.0)
  c2 = jnp.stack([-(m11 * b[0] - m01 * b[1]), -(m00 * b[1] - m01 * b[0])]) / safe_det
  c1 = jnp.stack([-b[0] / jnp.where(ok1, m00, 1.0), jnp.zeros_like(b[0])])
  ok2 = ok2 & jnp.all(jnp.isfinite(c2))
  c = jnp.where(ok2, c2, jnp.where(ok1, c1, jnp.zeros_like(c1)))
  return c, ok1, ok2


def levenberg_marquardt(damping: Array, rho: Array, factor: Any,
                        lower: Any, upper: Any, minimum: Any,
                        maximum: Any) -> Array:
  """One Levenberg-Marquardt move of ``lambda`` on the reduction ratio ``rho``.

  ``lambda / factor`` if ``rho < lower`` (or ``rho`` is not finite: the model
  was not trusted), ``lambda * factor`` if ``rho > upper``, unchanged in
  between; then clipped to ``[minimum, maximum]``. ``factor < 1``.
  """
  raise_it = ~(rho >= lower)
  lower_it = rho > upper
  move = jnp.where(raise_it, 1.0 / factor, jnp.where(lower_it, factor, 1.0))
  return jnp.clip(damping * move, minimum, maximum).astype(damping.dtype)


def adaptive(
    direction: optax.GradientTransformation,
    loss: str | Callable[[Array], Array] = "mse",
    *,
    loss_scale: Any = 1.0,
    initial_damping: Any = 1e-3,
    min_damping: Any = 1e-8,
    max_damping: Any = 1e4,
    adapt_every: Any = 5,
    damping_decay: Any = 0.95,
    lower_threshold: Any = 0.25,
    upper_threshold: Any = 0.75,
    couple_damping: float | str | None = "auto",
    damping_in_rho: bool = False,
    reject_rising: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""Step size, momentum and damping from the exact quadratic model.

  Martens and Grosse's adaptive scheme (K-FAC, sections 6-7) around any
  direction: ``direction`` maps the gradient ``g`` to ``d`` (a preconditioner
  such as :func:`eva_optax.scale_by_foof`, or any optax transformation; its sign
  and scale do not matter). With ``p`` the previous update, the update is

  .. math::
    u = \alpha d + \mu p, \qquad
    (\alpha, \mu) = \arg\min\; q(u) = g^T u + \tfrac12 u^T (C + \lambda I) u,

  i.e. ``(alpha, mu) = -M^{-1} b`` with ``M = V^T C V + lambda V^T V``,
  ``b = V^T g``, ``V = [d, p]``. ``C = J^T H J`` is the exact generalized
  Gauss-Newton matrix of the loss on the current batch (the Fisher for these
  losses), applied only through curvature-vector products: ``J d`` and ``J p``
  come from one ``jax.jvp`` of ``outputs_fn`` with the two tangents stacked
  (``jax.vmap``; the primal pass is shared) and ``H`` is the Hessian of the
  loss in the outputs, in closed form for the declared ``loss``
  (:data:`eva_optax.ADAPTIVE_LOSSES`). No matrix is formed.

  Every ``adapt_every`` steps the damping follows the Levenberg-Marquardt rule
  on the reduction ratio

  .. math::
    \rho = \frac{L(\theta + u) - L(\theta)}{q(u)},\qquad
    \lambda \leftarrow \lambda / \omega \text{ if } \rho < 1/4,\quad
    \lambda \leftarrow \omega\lambda \text{ if } \rho > 3/4,\quad
    \omega = \text{damping\_decay}^{\text{adapt\_every}},

  clipped to ``[min_damping, max_damping]``. As in Martens and Grosse and
  kfac-jax, ``q`` in ``rho`` leaves out the ``lambda`` term unless
  ``damping_in_rho=True``.

  The direction's own damping ``gamma`` follows ``lambda``:
  ``gamma <- gamma (lambda_new / lambda_old)^e`` with ``e = couple_damping``
  (``e = 0.5`` is Martens and Grosse's ``gamma ~ sqrt(lambda)``, section 6.6;
  ``e = 1`` moves them together, as kfac-jax's ``gamma = lambda``). The
  coupling reaches the direction through ``optax.inject_hyperparams``: build it
  as ``optax.inject_hyperparams(eva_optax.scale_by_foof)(damping=0.03, ...)``.
  The default ``"auto"`` couples with ``e = 0.5`` when the direction has such
  an injected ``damping`` and leaves other directions (``optax.identity()``, a
  direction built without ``inject_hyperparams``) as they are; a number
  requires the injected ``damping`` (ValueError otherwise); ``None`` never
  couples. On the Fashion-MNIST autoencoder (``benchmarks/time_to_quality.py``)
  FOOF with ``e = 0.5`` reached a 3-epoch test MSE of 0.0098, against 0.0109
  with FOOF's damping held at 0.03.

  Safety: a non-finite gradient, direction, previous update or model gives a
  zero step (``nonfinite_count``); non-positive curvature along ``d``
  (``d^T C d <= 0``), a non-negative ``q`` or an unusable 2x2 system gives the
  1-D step along ``d`` when that is sound, a zero step otherwise
  (``curvature_count``); on adaptation steps, a loss that rose (or is not
  finite) after the step rejects it: zero update, ``lambda`` raised
  (``rejected_count``; ``reject_rising=False`` keeps the step). A zero step
  also clears ``p``. Parameters never become NaN through this
  transformation.

  Cost per step, on top of the direction: one forward pass of ``outputs_fn``
  with two tangents (about 1.3 SGD steps on an MLP: a primal pass plus two
  tangent passes, each about a forward pass), a few inner products; and
  every ``adapt_every`` steps one evaluation of ``value_fn`` (a forward pass),
  plus one more when ``value`` is not passed. ``outputs_fn`` may evaluate on a
  sub-batch to cut the first cost (an unbiased estimate of ``C``).

  ``update`` takes, besides the gradient, ``params`` and the direction's own
  extra arguments (``stats=``):

  * ``outputs_fn``: ``params -> outputs``, the model on this batch, returning
    the array the loss is computed from (logits, reconstructions);
  * ``value_fn``: ``params -> loss`` on this batch (for ``rho``; needed unless
    ``adapt_every`` is None);
  * ``value``: the loss at ``params`` (optional, saves a forward pass).

  The result is the final update (it contains the step size): add it to the
  parameters; put transformations that change the gradient (clipping) before
  it in an ``optax.chain``, not after.

  Args:
    direction: the transformation giving ``d`` from the gradient (for example
      ``eva_optax.scale_by_foof(inverse_every=10)`` or ``optax.identity()``).
    loss: the loss in the outputs: ``"mse"`` (``mean((y - t)^2)`` over all
      elements), ``"softmax_cross_entropy"`` (mean over rows, classes on the last
      axis), ``"sigmoid_cross_entropy"`` (mean over all elements), or a
      callable ``outputs -> scalar`` (its Hessian by autodiff).
    loss_scale: the loss is ``loss_scale`` times that mean (``0.5`` for
      ``optax.l2_loss``; ``n_features`` for a sum over features and a mean over
      the batch).
    initial_damping: ``lambda`` at the first step (on the scale of ``C``: it
      scales with the loss).
    min_damping: lower bound of ``lambda``.
    max_damping: upper bound of ``lambda``.
    adapt_every: apply the Levenberg-Marquardt rule every this many steps
      (``None``: keep ``lambda`` fixed; no ``value_fn`` needed).
    damping_decay: per-step factor ``omega_1``; the rule multiplies or divides
      by ``damping_decay ** adapt_every``.
    lower_threshold: raise ``lambda`` when ``rho`` is below this.
    upper_threshold: lower ``lambda`` when ``rho`` is above this.
    couple_damping: exponent ``e`` of the coupling of the direction's damping
      to ``lambda``; ``"auto"``: 0.5 when the direction has an injected
      ``damping``, else none; ``None``: the direction keeps its own damping.
    damping_in_rho: include ``lambda/2 |u|^2`` in the ``q`` of ``rho``.
    reject_rising: on adaptation steps, reject a step after which the loss
      rose.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`AdaptiveState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, eva_optax
    >>> x = jnp.linspace(-1.0, 1.0, 8)[:, None]
    >>> y = 3.0 * x + 1.0
    >>> params = {"w": jnp.zeros((1, 1)), "b": jnp.zeros((1,))}
    >>> outputs_fn = lambda p: x @ p["w"] + p["b"]
    >>> value_fn = lambda p: jnp.mean((outputs_fn(p) - y) ** 2)
    >>> tx = eva_optax.adaptive(optax.identity(), loss="mse", initial_damping=1e-6)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   loss, grads = jax.value_and_grad(value_fn)(params)
    ...   updates, state = tx.update(grads, state, params, outputs_fn=outputs_fn,
    ...                              value_fn=value_fn, value=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{value_fn(params):.6f}")   # a linear model: exact in two steps
    0.000000

  References:
    Martens and Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015,
    sections 6 and 7.
  """
  quadratic_model.check_loss(loss)
  if not isinstance(direction, (optax.GradientTransformation,
                                optax.GradientTransformationExtraArgs)):
    raise TypeError("direction must be an optax GradientTransformation (for "
                    "example eva_optax.scale_by_foof() or optax.identity()), got "
                    f"{direction!r}.")
  validation.check_positive("loss_scale", loss_scale)
  validation.check_positive("initial_damping", initial_damping,
                            fix="It keeps the quadratic model positive definite.")
  validation.check_nonnegative("min_damping", min_damping)
  validation.check_positive("max_damping", max_damping)
  validation.check_unit_interval("damping_decay", damping_decay)
  validation.check_nonnegative("lower_threshold", lower_threshold)
  validation.check_nonnegative("upper_threshold", upper_threshold)
  if all(_is_number(v) for v in (min_damping, max_damping,
                                            initial_damping)):
    if not min_damping <= initial_damping <= max_damping:
      raise ValueError(
          "Need min_damping <= initial_damping <= max_damping, got "
          f"{min_damping=}, {initial_damping=}, {max_damping=}.")
  if all(_is_number(v) for v in (lower_threshold, upper_threshold)):
    if not lower_threshold < upper_threshold:
      raise ValueError("Need lower_threshold < upper_threshold, got "
                       f"{lower_threshold=}, {upper_threshold=}.")
  if _is_number(damping_decay) and damping_decay == 0:
    raise ValueError("damping_decay must be in (0, 1]; 0.95 is Martens and Grosse's.")
  if adapt_every is not None:
    validation.check_interval("adapt_every", adapt_every)
  if isinstance(couple_damping, str):
    if couple_damping != "auto":
      raise ValueError("couple_damping must be a number >= 0, 'auto' or None, "
                       f"got {couple_damping!r}.")
  elif couple_damping is not None:
    validation.check_nonnegative("couple_damping", couple_damping)
  inner = optax.with_extra_args_support(direction)

  def coupling(inner_state) -> float | None:
    """The exponent in use for this direction (see ``couple_damping``)."""
    if couple_damping is None:
      return None
    is_inject = lambda x: isinstance(x, _INJECT_STATES)
    found = [x for x in jax.tree.leaves(inner_state, is_leaf=is_inject)
             if is_inject(x) and "damping" in x.hyperparams]
    scheduled = any("damping" in getattr(x, "hyperparams_states", {})
                    for x in found)
    if isinstance(couple_damping, str):   # "auto"
      return 0.5 if found and not scheduled else None
    if not found:
      raise ValueError(
          "couple_damping needs the direction's damping as a hyperparameter: "
          "build the direction with optax.inject_hyperparams, e.g. "
          "optax.inject_hyperparams(eva_optax.scale_by_foof)(damping=0.03), "
          "or pass couple_damping=None.")
    if scheduled:
      raise ValueError("couple_damping needs a numeric direction damping, not a "
                       "schedule: the schedule would overwrite the coupling.")
    return couple_damping

  def init_fn(params):
    inner_state = inner.init(params)
    coupling(inner_state)   # raises early when the coupling cannot work
    zero_i = lambda: jnp.zeros([], jnp.int32)
    return AdaptiveState(
        count=zero_i(),
        damping=jnp.asarray(initial_damping, jnp.float32),
        coefficients=jnp.zeros((2,), jnp.float32),
        quad_change=jnp.zeros([], jnp.float32),
        rho=jnp.full([], jnp.nan, jnp.float32),
        nonfinite_count=zero_i(), curvature_count=zero_i(),
        rejected_count=zero_i(),
        velocity=optax.tree.zeros_like(params),
        inner_state=inner_state)

  def update_fn(updates, state, params=None, *, outputs_fn=None, value_fn=None,
                value=None, **extra_args):
    if params is None:
      raise ValueError(_NO_PARAMS)
    if outputs_fn is None:
      raise ValueError(
          "adaptive needs outputs_fn=params -> model outputs on this batch (the "
          "curvature products J d and J p are taken through it): "
          "tx.update(grads, state, params, outputs_fn=..., value_fn=...).")
    if adapt_every is not None and value_fn is None:
      raise ValueError(
          "adaptive needs value_fn=params -> loss on this batch for the "
          "Levenberg-Marquardt rule (or build it with adapt_every=None).")
    lam = state.damping
    with jax.named_scope("adaptive_direction"):
      d, inner_state = inner.update(
          updates, state.inner_state, params, outputs_fn=outputs_fn,
          value_fn=value_fn, value=value, **extra_args)
    g, p = updates, state.velocity
    vectors = [d, p]

    with jax.named_scope("adaptive_quadratic_model"):
      inputs_finite = counters.all_finite((g, d, p))
      # Non-finite inputs would poison the products: model zeros instead.
      safe = [counters.zeros_unless(inputs_finite, v) for v in vectors]
      cmat = quadratic_model.curvature_gram(outputs_fn, params, safe, loss,
                                            loss_scale)
      dmat = quadratic_model.gram_of_vectors(safe)
      b = quadratic_model.gram_of_vectors(safe, counters.zeros_unless(inputs_finite, g))
      cmat, dmat, b = (x.astype(jnp.float32) for x in (cmat, dmat, b))
      model_finite = inputs_finite & counters.all_finite((cmat, dmat, b))
      m = cmat + lam * dmat
      has_p = dmat[1, 1] > 0
      c, ok1, ok2 = solve_two_by_two(m, b, has_p)
      q = 0.5 * c @ m @ c + b @ c
      positive = cmat[0, 0] > 0
      step_ok = model_finite & positive & ok1 & (q < 0) & jnp.isfinite(q)
      curvature_bad = model_finite & ~(step_ok & (ok2 | ~has_p))
      c = jnp.where(step_ok, c, jnp.zeros_like(c))
      q = jnp.where(step_ok, q, 0.0)
      q_rho = q if damping_in_rho else jnp.where(
          step_ok, 0.5 * c @ cmat @ c + b @ c, 0.0)

    def combine(dv, pv):
      out = c[0] * dv.astype(jnp.float32) + c[1] * pv.astype(jnp.float32)
      return jnp.where(step_ok, out, 0.0).astype(pv.dtype)

    u = jax.tree.map(combine, safe[0], safe[1])

    count = state.count
    if adapt_every is None:
      new_lam, rho, rejected = lam, state.rho, jnp.asarray(False)
    else:
      with jax.named_scope("adaptive_levenberg_marquardt"):
        due = ((count % adapt_every) == 0) & step_ok

        def measure(_):
          old = value_fn(params) if value is None else value
          new = value_fn(optax.apply_updates(params, u))
          return (jnp.asarray(old, jnp.float32).reshape(()),
                  jnp.asarray(new, jnp.float32).reshape(()))

        nan = jnp.full([], jnp.nan, jnp.float32)
        old, new = jax.lax.cond(due, measure, lambda _: (nan, nan), None)
        rose = due & ~(new <= old)
        rho_now = jnp.where(jnp.isfinite(new), (new - old) / q_rho, -jnp.inf)
        factor = jnp.asarray(damping_decay, jnp.float32) ** adapt_every
        moved = levenberg_marquardt(lam, rho_now, factor, lower_threshold,
                                    upper_threshold, min_damping, max_damping)
        new_lam = jnp.where(due, moved, lam)
        rho = jnp.where(due, rho_now, state.rho).astype(jnp.float32)
        rejected = rose if reject_rising else jnp.asarray(False)
      u = counters.zeros_unless(~rejected, u)

    exponent = coupling(inner_state)
    if exponent is not None:
      inner_state = _scale_direction_damping(inner_state,
                                             (new_lam / lam) ** exponent)

    i32 = lambda x: jnp.asarray(x).astype(jnp.int32)
    new_state = AdaptiveState(
        count=optax.safe_increment(count),
        damping=new_lam.astype(jnp.float32),
        coefficients=jnp.where(rejected, jnp.zeros_like(c), c),
        quad_change=q.astype(jnp.float32),
        rho=rho,
        nonfinite_count=state.nonfinite_count + i32(~model_finite),
        curvature_count=state.curvature_count + i32(curvature_bad),
        rejected_count=state.rejected_count + i32(rejected),
        velocity=u,
        inner_state=inner_state)
    return u, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
