"""The client zoo: the capture on models nobody here wrote.

transformers' FlaxBertForMaskedLM (tied decoder through ``nn.Dense.apply``),
FlaxGPT2LMHeadModel (``FlaxConv1D`` layers, taught by ``register_dense``; tied
head) and FlaxViTForImageClassification; a linen LM with the hand-written tie
``h @ embed.embedding.T``; models with registered custom layers and Gemma-style
Embed subclasses, in linen and NNX (tests/zoo_models.py). For each:

* the capture reports the layers it must capture as captured, and the tied
  ones as not captured, with a reason naming the other use;
* every layer reported captured has exact rows: the sum over rows of
  ``a g^T`` equals the gradient of ``[W; b]`` read through its view, within
  the float32 rounding bound of that sum (see :func:`_rows_bound`);
* a layer not captured gets the plain gradient from the layer-wise
  optimizers (its update is what the plain chain gives);
* every optimizer trains it: 5 jitted steps, finite, the loss falls.

``python tests/test_zoo.py`` prints the capture summary of every model: the
share of parameters in captured layers and what is not captured, and why.

Time: compiled functions are shared across the parametrized cases (one
gradient function per model and statistics mode, one update per model and
optimizer).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import eva_optax
import eva_optax.nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_models  # pylint: disable=g-import-not-at-top,wrong-import-position
from zoo_models import zoo  # pylint: disable=g-import-not-at-top,wrong-import-position

MODELS = tuple(zoo_models.ZOO)
# The models with layers that must not be captured (zoo_models: not_captured).
WITH_UNCAPTURED = ("bert", "gpt2", "hand_tied_lm", "unregistered", "gemma_hand")
EPS32 = float(np.finfo(np.float32).eps)        # 2^-23
TINY32 = float(np.finfo(np.float32).tiny)      # 2^-126, the smallest normal

# ----------------------------------------------------------------------------
# Trees by path (linen dicts and NNX states alike).


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _pure(tree: Any) -> Any:
  """Nested dicts of arrays (an ``nnx.State`` as ``nnx.to_pure_dict``)."""
  if isinstance(tree, nnx.State):
    return nnx.to_pure_dict(tree)
  return tree


def flat_stats(stats: Any) -> dict[str, eva_optax.LayerStatistics]:
  """``{"a/b/c": LayerStatistics}``."""
  is_st = lambda x: isinstance(x, eva_optax.LayerStatistics)
  if is_st(stats):
    return {"": stats}
  leaves = jax.tree_util.tree_flatten_with_path(stats, is_leaf=is_st)[0]
  return {"/".join(_key(k) for k in kp): v for kp, v in leaves if is_st(v)}


def flat_leaves(tree: Any) -> dict[str, Any]:
  """``{"a/b/leaf": array}`` of a parameter or gradient tree."""
  leaves = jax.tree_util.tree_flatten_with_path(_pure(tree))[0]
  return {"/".join(_key(k) for k in kp): v for kp, v in leaves}


def node_leaves(tree: Any, path: str) -> dict[str, Any]:
  """The arrays directly inside the node at ``path`` (a layer's parameters)."""
  prefix = path + "/" if path else ""
  out = {}
  for p, v in flat_leaves(tree).items():
    if p.startswith(prefix) and "/" not in p[len(prefix):]:
      out[p[len(prefix):]] = v
  return out


# ----------------------------------------------------------------------------
# The capture of each model, computed once per statistics mode (jitted), and
# the plain gradient (the same function Eva-s and Shampoo train with).


@functools.lru_cache(maxsize=None)
def _grad_fn(name: str, mode: str | None):
  """Jitted ``(params_or_model, *batch) -> (loss, grads, stats or None)``."""
  z = zoo(name)
  if z.api == "linen":
    if mode is None:
      plain = jax.value_and_grad(z.loss)
      return jax.jit(lambda p, *b: (*plain(p, *b), None))
    return jax.jit(eva_optax.value_and_grad(z.loss, statistics=mode))
  if mode is None:
    plain = nnx.value_and_grad(z.loss)
    return nnx.jit(lambda m, *b: (*plain(m, *b), None))
  return nnx.jit(eva_optax.nnx.value_and_grad(z.loss, statistics=mode))


@functools.lru_cache(maxsize=None)
def initial(name: str):
  """``(params or model, params as a tree)`` of a model at its initial weights."""
  z = zoo(name)
  made = z.make()
  params = made if z.api == "linen" else nnx.state(made, nnx.Param)
  return made, params


@functools.lru_cache(maxsize=None)
def captured(name: str, mode: str | None):
  """``(loss, grads, stats)`` at the initial weights (``stats`` flat by path)."""
  z = zoo(name)
  made, _ = initial(name)
  loss, grads, stats = _grad_fn(name, mode)(made, *z.batch)
  return float(loss), grads, (None if stats is None else flat_stats(stats))


# ----------------------------------------------------------------------------
# The capture summary (printed by ``python tests/test_zoo.py``).


def capture_summary(name: str) -> tuple[float, str]:
  """``(captured share, report)`` of a zoo model.

  The share is the number of parameters in layers reported captured (every
  array of the layer's node: weight and bias) over all parameters; the report
  lists each layer not captured with the capture's reason, and counts the
  parameters outside any layer (norms, free-standing tensors).
  """
  _, params = initial(name)
  stats = captured(name, "vectors")[2]
  leaves = flat_leaves(params)
  total = sum(int(np.size(v)) for v in leaves.values())
  in_layers, lines = 0, []
  covered = set()
  n_captured = 0
  for path, st in sorted(stats.items()):
    node = node_leaves(params, path)
    size = sum(int(np.size(v)) for v in node.values())
    covered.update(f"{path}/{k}" for k in node)
    if st.captured:
      in_layers += size
      n_captured += 1
    else:
      lines.append(f"  not captured: {path} ({st.kind}, {size:,} parameters): {st.note}")
  outside = {p: v for p, v in leaves.items() if p not in covered}
  share = in_layers / total
  head = (f"{name}: {share:.1%} of {total:,} parameters in captured layers "
          f"({n_captured} of {len(stats)} layers)")
  lines.append(f"  outside any layer (plain gradient): {len(outside)} arrays, "
               f"{sum(int(np.size(v)) for v in outside.values()):,} parameters")
  return share, "\n".join([head] + lines)


# ----------------------------------------------------------------------------
# What the capture reports.


@pytest.mark.parametrize("name", MODELS)
def test_capture_reports_expected_layers(name):
  z = zoo(name)
  assert bool(z.not_captured) == (name in WITH_UNCAPTURED)
  stats = captured(name, "vectors")[2]
  reported = {p for p, st in stats.items() if st.captured}
  missing = sorted(z.captured - reported)
  assert not missing, (f"{name}: layers that must be captured are not: "
                       + "; ".join(f"{p}: {stats[p].note}" if p in stats else
                                   f"{p}: no statistics" for p in missing))
  for path, pattern in z.not_captured.items():
    assert path in stats, f"{name}: no statistics entry for {path}"
    st = stats[path]
    assert not st.captured, (f"{name}: {path} is reported captured ({st.kind}), "
                             "but its parameters have another use")
    assert st.note and re.search(pattern, st.note), (
        f"{name}: {path}'s reason {st.note!r} does not say why")
  unexpected = reported - z.captured
  assert not unexpected, f"{name}: captured layers the zoo does not know: {unexpected}"
  share, report = capture_summary(name)
  print(report)
  assert 0.0 < share <= 1.0


def _rows_bound(a: np.ndarray, g: np.ndarray) -> np.ndarray:
  """The float32 rounding bound of ``sum_rows a g^T``, elementwise.

  The gradient JAX computes for ``[W; b]`` is a float32 sum of the same
  products ``a_r g_r^T`` (the rows are the very operands of the layer's
  backward pass: its input and the cotangent ``dL/dy``), in whatever order
  the dot, the scatter-add or the transposed convolution takes. For a sum of
  ``R`` float32 products the classic bound (Higham, Accuracy and Stability,
  3.1) is ``|fl(s) - s| <= gamma_R * sum_r |a_r| |g_r|`` with
  ``gamma_R = R u / (1 - R u)``, ``u = 2^-24``; ``R * eps32 = 2 R u`` covers
  it for ``R u < 1/2``, and the factor 2 one more rounding per term (a scale
  XLA folds into the products). The float64 sum of the rows is exact to
  ``2^-53`` relative, negligible here. ``R * TINY32`` covers products that
  underflow in float32. A use of the weight the rows miss (a tie) breaks this
  bound by orders of magnitude (54-84% relative errors, issue text).
  """
  rows = a.shape[-2]
  s = np.einsum("sri,srj->sij", np.abs(a), np.abs(g))
  return 2.0 * rows * EPS32 * s + rows * TINY32


def view_matrix(view, node: dict[str, Any]) -> np.ndarray:
  """``[W; b]`` of a layer node read through its view: (slices, d_a, d_out), float64.

  The view's reshapes run on the float32 arrays (exact: they only move
  entries); the result is float64.
  """
  w_hat = np.asarray(view.kernel_matrices(jnp.asarray(node[view.param])), np.float64)
  others = [k for k in node if k != view.param]
  if view.has_bias:
    assert len(others) == 1, f"the bias of a {view.kind} layer among {others}"
    bias = np.asarray(view.bias_vectors(jnp.asarray(node[others[0]])), np.float64)
    w_hat = np.concatenate([w_hat, bias[:, None, :]], axis=1)
  return w_hat


def rows_failures(grads: Any, stats: dict[str, Any], *, l2: float = 0.0,
                  params: Any = None) -> list[str]:
  """Layers reported captured whose rows miss their gradient (one line each).

  With ``l2 > 0`` the loss carries the penalty ``l2 * sum(w^2)`` over every
  parameter (``params``); the rows then reproduce the gradient less the
  penalty's ``2 l2 w``, within one more float32 rounding of each of the two
  terms JAX added.
  """
  failures = []
  for path, st in stats.items():
    if not st.captured:
      continue
    ref = view_matrix(st.view, node_leaves(grads, path))
    slack = 0.0
    if l2:
      decay = 2.0 * l2 * view_matrix(st.view, node_leaves(params, path))
      slack = EPS32 * (np.abs(ref) + np.abs(decay))
      ref = ref - decay
    s = ref.shape[0]
    a = np.asarray(st.a_rows, np.float64)
    g = np.asarray(st.g_rows, np.float64)
    a = a.reshape((s,) + a.shape[-2:])
    g = g.reshape((s,) + g.shape[-2:])
    if a.shape[-1] != ref.shape[1] or g.shape[-1] != ref.shape[2]:
      failures.append(f"{path}: rows {a.shape}, {g.shape} do not fit the view "
                      f"{ref.shape}")
      continue
    total = np.einsum("sri,srj->sij", a, g)
    err = np.abs(total - ref)
    bound = _rows_bound(a, g) + slack
    if not np.all(err <= bound):
      rel = np.linalg.norm(total - ref) / max(np.linalg.norm(ref), 1e-300)
      failures.append(f"{path} ({st.kind}): sum of a g^T is off the gradient by "
                      f"{rel:.2e} (relative, Frobenius); worst excess "
                      f"{float(np.max(err - bound)):.2e}")
  return failures


@pytest.mark.parametrize("name", MODELS)
def test_rows_reproduce_gradients(name):
  _, grads, stats = captured(name, "rows")
  failures = rows_failures(grads, stats)
  assert not failures, f"{name}:\n" + "\n".join(failures)
  assert any(st.captured for st in stats.values())


def test_l2_penalty_keeps_layers_captured():
  """A penalty on the parameters alone is no other use of them that feeds
  the model's output: every layer stays captured, with exact rows."""
  z, l2 = zoo("vit"), 1e-2
  params, _ = initial("vit")

  def loss(p, *batch):
    return z.loss(p, *batch) + l2 * sum(jnp.vdot(w, w) for w in jax.tree.leaves(p))

  _, grads, stats = jax.jit(eva_optax.value_and_grad(loss, statistics="rows"))(
      params, *z.batch)
  stats = flat_stats(stats)
  reported = {p for p, st in stats.items() if st.captured}
  assert reported == z.captured, {p: stats[p].note for p in z.captured - reported}
  failures = rows_failures(grads, stats, l2=l2, params=params)
  assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", MODELS)
def test_capture_keeps_loss_and_gradients(name):
  loss, grads, _ = captured(name, "rows")
  ref_loss, ref_grads, _ = captured(name, None)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  ref = flat_leaves(ref_grads)
  got = flat_leaves(grads)
  assert set(got) == set(ref)
  for p, r in ref.items():
    scale = float(np.max(np.abs(r))) or 1.0
    np.testing.assert_allclose(got[p], r, rtol=1e-4, atol=1e-5 * scale, err_msg=p)


@pytest.mark.parametrize("name", MODELS)
def test_layer_views_match_statistics(name):
  z = zoo(name)
  made, _ = initial(name)
  views = flat_stats_views(eva_optax.layer_views(z.loss, made, *z.batch))
  stats = captured(name, "vectors")[2]
  assert views == {p: st.view for p, st in stats.items() if st.captured}


def flat_stats_views(views: Any) -> dict[str, Any]:
  is_view = lambda x: hasattr(x, "kernel_matrices")
  leaves = jax.tree_util.tree_flatten_with_path(views, is_leaf=is_view)[0]
  return {"/".join(_key(k) for k in kp): v for kp, v in leaves if is_view(v)}


@pytest.mark.parametrize("opt", ("eva", "eva_f", "eva_s", "kfac", "foof", "shampoo"))
@pytest.mark.parametrize("name", MODELS)
def test_init_accepts_the_tree_without_views(name, opt):
  """Uncaptured means untouched: ``init`` takes any parameter tree, with no
  views given (GPT-2's (out, in) kernels, custom parameter names)."""
  _, params = initial(name)
  alias, lr, _ = OPTIMIZERS[opt]
  jax.eval_shape(alias(lr).init, params)      # shapes only: no compilation


# ----------------------------------------------------------------------------
# Training: every optimizer, 5 jitted steps on the fixed batch.

# (alias, learning rate, statistics): rates that lower every zoo model's loss
# on a fixed batch by a clear margin in 5 steps (momentum 0.9, the defaults).
OPTIMIZERS = {
    "eva": (eva_optax.eva, 3e-3, "vectors"),
    "eva_f": (eva_optax.eva_f, 3e-3, "vectors"),
    "eva_s": (eva_optax.eva_s, 0.1, None),
    "kfac": (eva_optax.kfac, 0.1, "factors"),
    "foof": (eva_optax.foof, 0.1, "factors"),
    "shampoo": (eva_optax.shampoo, 0.1, None),
}
LAYERWISE = ("eva", "eva_f", "kfac", "foof")


@functools.lru_cache(maxsize=None)
def _views(name: str):
  z = zoo(name)
  made, _ = initial(name)
  return eva_optax.layer_views(z.loss, made, *z.batch)


@functools.lru_cache(maxsize=None)
def _tx(name: str, opt: str):
  alias, lr, _ = OPTIMIZERS[opt]
  return alias(lr, layer_views=_views(name))


@functools.lru_cache(maxsize=None)
def _linen_init(name: str, opt: str):
  return jax.jit(_tx(name, opt).init)     # one program, not one per eager op


@functools.lru_cache(maxsize=None)
def _nnx_optimizer(name: str, opt: str):
  tx = _tx(name, opt)
  return nnx.jit(lambda model: nnx.Optimizer(model, tx, wrt=nnx.Param))


@functools.lru_cache(maxsize=None)
def _linen_update(name: str, opt: str):
  tx = _tx(name, opt)

  def update(grads, state, params, stats):
    kw = {} if stats is None else {"stats": stats}
    updates, state = tx.update(grads, state, params, **kw)
    return optax.apply_updates(params, updates), updates, state

  return jax.jit(update)


@functools.lru_cache(maxsize=None)
def _nnx_update(name: str, opt: str):
  def update(optimizer, model, grads, stats):
    if stats is None:
      optimizer.update(model, grads)
    else:
      optimizer.update(model, grads, stats=stats)
  return nnx.jit(update)


def train(name: str, opt: str, steps: int = 5) -> tuple[list[float], Any]:
  """Losses before each step and after the last, and the final parameters."""
  z = zoo(name)
  mode = OPTIMIZERS[opt][2]
  grad_fn = _grad_fn(name, mode)
  losses = []
  if z.api == "linen":
    params = z.make()
    state = _linen_init(name, opt)(params)
    update = _linen_update(name, opt)
    for _ in range(steps):
      loss, grads, stats = grad_fn(params, *z.batch)
      params, _, state = update(grads, state, params, stats)
      losses.append(float(loss))
    losses.append(float(grad_fn(params, *z.batch)[0]))
    return losses, params
  model = z.make()
  optimizer = _nnx_optimizer(name, opt)(model)
  update = _nnx_update(name, opt)
  for _ in range(steps):
    loss, grads, stats = grad_fn(model, *z.batch)
    update(optimizer, model, grads, stats)
    losses.append(float(loss))
  losses.append(float(grad_fn(model, *z.batch)[0]))
  return losses, nnx.state(model, nnx.Param)


@pytest.mark.parametrize("opt", tuple(OPTIMIZERS))
@pytest.mark.parametrize("name", MODELS)
def test_every_optimizer_trains(name, opt):
  losses, params = train(name, opt)
  assert all(np.isfinite(losses)), losses
  for p, v in flat_leaves(params).items():
    assert np.all(np.isfinite(np.asarray(v))), f"{name}/{opt}: {p} is not finite"
  assert losses[-1] < losses[0] - 1e-3, f"{name}/{opt}: losses {losses}"


# ----------------------------------------------------------------------------
# A layer not captured passes its gradient through.


def first_update(name: str, opt: str):
  """``(grads, updates)`` of one step from the initial weights and a fresh state."""
  z = zoo(name)
  mode = OPTIMIZERS[opt][2]
  made, params = initial(name)
  _, grads, _ = captured(name, mode)
  stats = _grad_fn(name, mode)(made, *z.batch)[2]
  tx = _tx(name, opt)
  if z.api == "linen":
    _, updates, _ = _linen_update(name, opt)(grads, _linen_init(name, opt)(params),
                                             params, stats)
  else:
    updates, _ = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))(
        grads, tx.init(params), params, stats)
  return grads, updates


@pytest.mark.parametrize("opt", LAYERWISE)
@pytest.mark.parametrize("name", WITH_UNCAPTURED)
def test_not_captured_layer_gets_the_plain_gradient(name, opt):
  z = zoo(name)
  assert z.not_captured
  lr = OPTIMIZERS[opt][1]
  grads, updates = first_update(name, opt)
  g, u = flat_leaves(grads), flat_leaves(updates)
  # First step of the plain chain (no weight decay): the momentum buffer is
  # the gradient, the update -lr times it.
  for path in z.not_captured:
    for leaf in node_leaves(grads, path):
      p = f"{path}/{leaf}"
      np.testing.assert_allclose(u[p], -lr * np.asarray(g[p]), rtol=1e-6,
                                 atol=1e-12, err_msg=f"{name}/{opt}: {p}")
  # ... while the captured layers are preconditioned (not the plain gradient).
  turned = [p for p in z.captured
            for leaf in node_leaves(grads, p)
            if not np.allclose(u[f"{p}/{leaf}"], -lr * np.asarray(g[f"{p}/{leaf}"]),
                               rtol=1e-3, atol=0)]
  assert turned, f"{name}/{opt}: no captured layer was preconditioned"


if __name__ == "__main__":
  for model_name in MODELS:
    print(capture_summary(model_name)[1])
