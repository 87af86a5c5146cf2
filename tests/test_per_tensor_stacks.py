"""Eva-s and Shampoo read stacks as the layer-wise optimizers do, never mixing
the layers of a stack silently, and trace once under NNX.

Without ``layer_views`` a scanned layer with a bias reveals its stack through
the bias: each slice is its own tensor, so the updates equal the unrolled
model's. A bias-free scanned kernel looks like one tensor; where the statistics
are passed (harmless to these optimizers) they say it is stacked, and the
optimizer asks for the views instead of mixing the layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eva_optax
import eva_optax.nnx
from conftest import preconditioner
from test_stacked import LAYERS
from test_stacked import _problem


@pytest.mark.parametrize("name", ["eva_s", "shampoo"])
def test_biased_stacks_are_read_per_slice_without_views(name):
  """Without views, the scanned layers with a bias (conv, dense) get exactly
  the updates that the capture's views give them (read per slice; the views'
  per-slice reading equals the unrolled model's, tests/test_stacked.py); the
  bias-free ones (heads, proj) read as one tensor and differ."""
  out, x, t = _problem()
  loss, params, _, grads, _ = out["scanned"]
  views = eva_optax.layer_views(loss, params, x, t)
  ups = {}
  for kind, layer_views in (("shapes", None), ("views", views)):
    tx = preconditioner(name, layer_views=layer_views)
    ups[kind], _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for layer in ("conv", "dense"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(ups["shapes"]["blocks"][layer][leaf],
                                    ups["views"]["blocks"][layer][leaf])
  assert not np.allclose(ups["shapes"]["blocks"]["heads"]["kernel"],
                         ups["views"]["blocks"]["heads"]["kernel"])


@pytest.mark.parametrize("name", ["eva_s", "shampoo"])
def test_bias_free_stacks_ask_for_views_when_the_statistics_know(name):
  out, x, t = _problem()
  loss, params, _, grads, stats = out["scanned"]
  tx = preconditioner(name)
  with pytest.raises(ValueError, match=r"blocks/heads/kernel.*stacked.*layer_views"):
    tx.update(grads, tx.init(params), params, stats=stats)
  views = eva_optax.layer_views(loss, params, x, t)
  tx = preconditioner(name, layer_views=views)
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  assert np.asarray(up["blocks"]["heads"]["kernel"]).shape[0] == LAYERS


@pytest.mark.parametrize("name", ["eva_s", "shampoo", "eva", "kfac"])
def test_nnx_optimizer_step_traces_once(name):
  """The state has one structure for the dict nnx.Optimizer gives ``init``
  and the nnx.State it gives ``update``: the jitted step traces once."""
  model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
                         nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
  optimizer = nnx.Optimizer(model, getattr(eva_optax, name)(0.05), wrt=nnx.Param)
  statistics = "factors" if name == "kfac" else "vectors"
  traces = []

  @nnx.jit
  def step(model, optimizer, x, y):
    traces.append(1)
    loss = lambda m: jnp.mean((m(x) - y) ** 2)
    value, grads, stats = eva_optax.nnx.value_and_grad(
        loss, statistics=statistics)(model)
    optimizer.update(model, grads, stats=stats)
    return value

  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
  losses = [float(step(model, optimizer, x, y)) for _ in range(4)]
  assert len(traces) == 1, len(traces)
  assert losses[-1] < losses[0], losses
