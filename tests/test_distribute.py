"""``distribute_over`` on one device: its plan and its errors.

The split itself (8 devices, equal to the replicated run, each device only its
share in the compiled program) is tested in tests/test_multidevice.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from eva_optax._src.preconditioner import distribute


def test_greedy_assignment_largest_first_to_the_least_loaded():
  # 8 -> d0, 7 -> d1, 6 -> d1 (7 < 8), 5 -> d0 (8 < 13), 4 -> d0 (13 = 13: lower index).
  assert distribute.assign([8, 7, 6, 5, 4], 2) == [0, 1, 1, 0, 0]
  assert distribute.assign([1, 1], 4) == [0, 1]            # more devices than units
  units = [distribute.Unit(str(i), c, s) for i, (c, s) in enumerate(
      [(8, 10), (7, 20), (6, 5), (5, 1), (4, 1)])]
  plan = distribute.plan(units, 2)
  assert plan.loads == [17.0, 13.0]
  assert plan.buffer_floats == 25 and plan.bytes_per_refresh == 4 * 25
  assert "2 devices" in str(plan)


def _params():
  return {"a": {"kernel": jnp.zeros((64, 64)), "bias": jnp.zeros((64,))},
          "b": {"kernel": jnp.zeros((64, 8)), "bias": jnp.zeros((8,))},
          "norm": {"scale": jnp.zeros((64,))}}


def test_refresh_plan_units_follow_the_optimizer():
  kfac = eva_optax.refresh_plan("kfac", _params(), devices=4)
  assert [u.name for u in kfac.units] == ["a", "b"]
  assert kfac.units[0].cost == 65 ** 3 + 64 ** 3      # A (65) and G (64)
  assert kfac.owner == (0, 1)
  foof = eva_optax.refresh_plan("foof", _params(), devices=4)
  assert foof.units[0].size == 65 * 65 + 65            # Q and d
  shampoo = eva_optax.refresh_plan("shampoo", {"w": jnp.zeros((300, 200))},
                                   devices=4)
  assert len(shampoo.units) == 6                        # 3 x 2 blocks of 128
  assert shampoo.balance == pytest.approx(4 * 2 / 6)
  with pytest.raises(ValueError, match="method"):
    eva_optax.refresh_plan("eva", _params(), devices=2)


def _update(tx):
  model = nn.Dense(2)
  x = jnp.ones((4, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  _, grads, stats = eva_optax.value_and_grad(loss, statistics="factors")(params, x)
  return jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)


@pytest.mark.parametrize("name", ["kfac", "foof", "shampoo", "eva_s"])
def test_distribute_over_must_name_an_axis(name):
  with pytest.raises(TypeError, match="distribute_over"):
    getattr(eva_optax, name)(0.1, distribute_over=3)


@pytest.mark.parametrize("name", ["kfac", "foof", "shampoo"])
def test_distribute_over_outside_any_mesh_is_a_clear_error(name):
  with pytest.raises(ValueError, match=r"'data' names no mesh axis.*set_mesh"):
    _update(getattr(eva_optax, name)(0.1, distribute_over="data"))


def test_distribute_over_a_missing_axis_names_the_mesh_axes():
  mesh = jax.make_mesh((1,), ("batch",))
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match=r"axes \('batch',\)"):
      _update(eva_optax.kfac(0.1, distribute_over="data"))


def test_one_device_mesh_equals_the_replicated_update():
  """On a mesh of one device the split is the whole refresh on that device."""
  mesh = jax.make_mesh((1,), ("data",))
  with jax.set_mesh(mesh):
    got = _update(eva_optax.kfac(0.1, inverse_every=1, distribute_over="data"))
  want = _update(eva_optax.kfac(0.1, inverse_every=1))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
