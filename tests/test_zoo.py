"""The client zoo: the capture on models nobody here wrote.

transformers' FlaxBertForMaskedLM (tied decoder through ``nn.Dense.apply``),
FlaxGPT2LMHeadModel (``FlaxConv1D`` layers, taught by ``register_dense``; tied
head) and FlaxViTForImageClassification; a linen LM with the hand-written tie
``h @ embed.embedding.T``; models with registered custom layers and Gemma-style
Embed subclasses, in linen and NNX (tests/zoo_models.py, tests/zoo_nnx.py).
For each:

* the capture reports the layers it must capture as captured, and the tied
  (and unregistered) ones as not captured, with a reason naming the other
  use;
* every layer reported captured has exact rows: the sum over rows of
  ``a g^T`` equals the gradient of ``[W; b]`` read through its view, within
  the float32 rounding bound of that sum (see ``zoo_harness.rows_bound``);
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

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eva_optax
import eva_optax.nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
from zoo_harness import LAYERWISE, OPTIMIZERS, ZOO, capture_summary, captured, \
    first_update, flat_leaves, flat_stats, flat_views, initial, node_leaves, \
    rows_failures, train, zoo
# pylint: enable=g-import-not-at-top,wrong-import-position

MODELS = tuple(ZOO)
# The models with layers that must not be captured (zoo_models: not_captured).
WITH_UNCAPTURED = ("bert", "gpt2", "hand_tied_lm", "unregistered", "gemma_hand")


# ----------------------------------------------------------------------------
# What the capture reports.


@pytest.mark.parametrize("name", MODELS)
def test_capture_reports_expected_layers(name):
  """The zoo's captured layers are reported captured, its tied and
  unregistered ones not captured with the reason; every layer node is one or
  the other. The summary prints with ``pytest -s``."""
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
  assert set(stats) == z.captured | set(z.not_captured), (
      f"{name}: the statistics' layers differ from the zoo's: {sorted(stats)}")
  share, report = capture_summary(name)
  print(report)
  assert 0.0 < share <= 1.0


@pytest.mark.parametrize("name", MODELS)
def test_rows_reproduce_gradients(name):
  """Every layer reported captured: sum over rows of a g^T = the gradient of
  [W; b] read through its view, within the float32 bound of that sum."""
  _, grads, stats = captured(name, "rows")
  failures = rows_failures(grads, stats)
  assert not failures, f"{name}:\n" + "\n".join(failures)
  assert any(st.captured for st in stats.values())


@pytest.mark.parametrize("name", ("vit", "gemma_attend"))
def test_l2_penalty_keeps_layers_captured(name):
  """A penalty on the parameters alone is no other use of them that feeds
  the model's output: every layer stays captured, with exact rows."""
  z, l2 = zoo(name), 1e-2
  made, params = initial(name)

  def penalty(p):
    return l2 * sum(jnp.vdot(w, w) for w in jax.tree.leaves(p))

  if z.api == "linen":
    loss = lambda p, *batch: z.loss(p, *batch) + penalty(p)
    grad_fn = jax.jit(eva_optax.value_and_grad(loss, statistics="rows"))
  else:
    loss = lambda m, *batch: z.loss(m, *batch) + penalty(nnx.state(m, nnx.Param))
    grad_fn = nnx.jit(eva_optax.nnx.value_and_grad(loss, statistics="rows"))
  _, grads, stats = grad_fn(made, *z.batch)
  stats = flat_stats(stats)
  reported = {p for p, st in stats.items() if st.captured}
  assert reported == z.captured, {p: stats[p].note for p in z.captured - reported}
  failures = rows_failures(grads, stats, l2=l2, params=params)
  assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", MODELS)
def test_capture_keeps_loss_and_gradients(name):
  """The taps change neither the loss nor the gradients (against
  jax.value_and_grad / nnx.value_and_grad of the same loss)."""
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
  """eva_optax.layer_views (linen parameters or an NNX model) gives the views
  the statistics carry, for exactly the captured layers."""
  z = zoo(name)
  made, _ = initial(name)
  views = flat_views(eva_optax.layer_views(z.loss, made, *z.batch))
  stats = captured(name, "vectors")[2]
  assert views == {p: st.view for p, st in stats.items() if st.captured}


# ----------------------------------------------------------------------------
# Every optimizer on every zoo model.


@pytest.mark.parametrize("opt", tuple(OPTIMIZERS))
@pytest.mark.parametrize("name", MODELS)
def test_init_accepts_the_tree_without_views(name, opt):
  """Uncaptured means untouched: ``init`` takes any parameter tree, with no
  views given (GPT-2's (out, in) kernels, custom parameter names)."""
  _, params = initial(name)
  alias, lr, _ = OPTIMIZERS[opt]
  jax.eval_shape(alias(lr).init, params)      # shapes only: no compilation


@pytest.mark.parametrize("opt", tuple(OPTIMIZERS))
@pytest.mark.parametrize("name", MODELS)
def test_every_optimizer_trains(name, opt):
  """5 jitted steps on the fixed batch (with the capture's layer_views):
  finite parameters, the loss lower at the end."""
  losses, params = train(name, opt)
  assert all(np.isfinite(losses)), losses
  for p, v in flat_leaves(params).items():
    assert np.all(np.isfinite(np.asarray(v))), f"{name}/{opt}: {p} is not finite"
  assert losses[-1] < losses[0] - 1e-3, f"{name}/{opt}: losses {losses}"


# ----------------------------------------------------------------------------
# A layer not captured passes its gradient through.

@pytest.mark.parametrize("opt", LAYERWISE)
@pytest.mark.parametrize("name", WITH_UNCAPTURED)
def test_not_captured_layer_gets_the_plain_gradient(name, opt):
  """The layer-wise optimizers leave a layer not captured to the plain chain."""
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


@pytest.mark.parametrize("opt", ("eva", "kfac"))
@pytest.mark.parametrize("name", ("gpt2", "custom_nnx"))
def test_transposed_layers_without_views_are_right_or_refused(name, opt):
  """A registered transposed layer's (out, in) kernel cannot be read from
  shapes, and a square one reads both ways: without ``layer_views`` the first
  update is the one with them, or a ValueError that asks for them. Never a
  silently transposed preconditioner."""
  _, with_views = first_update(name, opt)
  try:
    _, without = first_update(name, opt, views=False)
  except ValueError as e:
    assert "layer_views" in str(e), str(e)
    return
  ref, got = flat_leaves(with_views), flat_leaves(without)
  for p, r in ref.items():
    np.testing.assert_allclose(got[p], r, rtol=1e-5, atol=1e-7 * float(
        np.max(np.abs(r)) or 1.0), err_msg=f"{name}/{opt}: {p}")


if __name__ == "__main__":
  for model_name in MODELS:
    print(capture_summary(model_name)[1])
