"""Every layer-wise optimizer as one part of optax.partition / multi_transform / masked.

Statistics of layers outside the optimizer's part are ignored; statistics
missing for a layer inside it are an error. The part's updates equal the same
optimizer run alone on those layers (its KL scaling sums over its own layers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eva_optax
from conftest import ConvNet
from conftest import eva_dense_solve
from conftest import mse_loss
from conftest import reference_tol
from conftest import rel_err
from conftest import to64


def _setup():
  model = ConvNet()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(6, 8, 8, 2)) + 0.3, jnp.float32)
  y = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  return params, mse_loss(model), x, y


def _labels(params):
  # Eva on the Dense head, Adam on the convolutions and the LayerNorm.
  return {k: jax.tree.map(lambda _: "eva" if k == "Dense_0" else "adam", v)
          for k, v in params.items()}


def _factories():
  return {
      "eva": (lambda: eva_optax.eva(0.1, damping=1e-4), "vectors"),
      "eva_f": (lambda: eva_optax.eva_f(0.1), "vectors"),
      "kfac": (lambda: eva_optax.kfac(0.05, damping=1e-3), "factors"),
      "foof": (lambda: eva_optax.foof(0.05), "factors"),
  }


@pytest.mark.parametrize("name", ["eva", "eva_f", "kfac", "foof"])
def test_partition_part_equals_the_optimizer_alone(name):
  params, loss_fn, x, y = _setup()
  make, mode = _factories()[name]
  grad_fn = jax.jit(eva_optax.value_and_grad(loss_fn, statistics=mode))
  tx = optax.partition({"eva": make(), "adam": optax.adam(1e-3)},
                       _labels(params))
  alone, adam = make(), optax.adam(1e-3)
  head = {"Dense_0": params["Dense_0"]}
  rest = {k: v for k, v in params.items() if k != "Dense_0"}
  state, s_alone, s_adam = tx.init(params), alone.init(head), adam.init(rest)
  for _ in range(3):
    _, grads, stats = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, stats=stats)
    u_head, s_alone = alone.update({"Dense_0": grads["Dense_0"]}, s_alone, head,
                                   stats={"Dense_0": stats["Dense_0"]})
    u_rest, s_adam = adam.update(
        {k: v for k, v in grads.items() if k != "Dense_0"}, s_adam, rest)
    # The same eager operations on the same numbers: bit for bit.
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(updates["Dense_0"][leaf], u_head["Dense_0"][leaf])
    for k in rest:
      for a, b in zip(jax.tree.leaves(updates[k]), jax.tree.leaves(u_rest[k])):
        np.testing.assert_array_equal(a, b)
    params = optax.apply_updates(params, updates)
    head = {"Dense_0": params["Dense_0"]}
    rest = {k: v for k, v in params.items() if k != "Dense_0"}
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))


def test_multi_transform_and_masked_ignore_statistics_outside_their_part():
  params, loss_fn, x, y = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, x, y)
  mask = {k: jax.tree.map(lambda _: k == "Dense_0", v) for k, v in params.items()}
  for tx in (optax.multi_transform({"eva": eva_optax.scale_by_eva(1e-4),
                                    "adam": optax.adam(1e-3)}, _labels(params)),
             optax.masked(eva_optax.scale_by_eva(1e-4), mask)):
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    # The conv layers are captured (their statistics are in `stats`) but
    # outside Eva's part: their updates are Adam's or the plain gradient.
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  alone = eva_optax.scale_by_eva(1e-4)
  head = {"Dense_0": params["Dense_0"]}
  u_alone, _ = alone.update({"Dense_0": grads["Dense_0"]}, alone.init(head), head,
                            stats={"Dense_0": stats["Dense_0"]})
  np.testing.assert_array_equal(updates["Dense_0"]["kernel"],   # the same operations
                                u_alone["Dense_0"]["kernel"])
  np.testing.assert_array_equal(updates["Conv_0"]["kernel"], grads["Conv_0"]["kernel"])


def test_missing_statistics_inside_the_part_is_an_error():
  params, loss_fn, x, y = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, x, y)
  tx = optax.partition({"eva": eva_optax.scale_by_eva(), "adam": optax.adam(1e-3)},
                       _labels(params))
  partial = {k: v for k, v in stats.items() if k != "Dense_0"}
  with pytest.raises(ValueError, match="Dense_0"):
    tx.update(grads, tx.init(params), params, stats=partial)


def test_kernel_only_part_preconditions_the_bias_free_layer():
  # Eva on the Dense kernel only (its bias in Adam's part): the layer is read
  # without its bias row, a = the input means without the bias entry.
  params, loss_fn, x, y = _setup()
  _, grads, stats = eva_optax.value_and_grad(loss_fn)(params, x, y)
  labels = jax.tree.map(lambda _: "adam", params)
  labels["Dense_0"]["kernel"] = "eva"
  damping = 1e-4
  tx = optax.partition({"eva": eva_optax.scale_by_eva(damping),
                        "adam": optax.adam(1e-3)}, labels)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  st = stats["Dense_0"]
  args = (to64(grads["Dense_0"]["kernel"]), to64(st.a)[:-1], to64(st.g), damping)
  ref = eva_dense_solve(*args)
  assert rel_err(updates["Dense_0"]["kernel"], ref) < reference_tol(
      "eva", {"kernel": args[0]}, {"a": args[1], "g": args[2]}, damping)["kernel"]
