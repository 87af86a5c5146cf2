"""``distribute_over``: the refresh split over 8 devices equals the replicated run.

Run by tests/test_multidevice.py with 8 virtual CPU devices; prints one JSON line.

A model of unequal layers with a stacked (``nn.scan``) block of 3 layers in
the middle, data parallel over a mesh axis ``"data"`` of 8 devices. For K-FAC,
FOOF and Shampoo (and Eva-s, which has nothing to split) with the refresh every
step, 3 training steps with ``distribute_over="data"`` against the same steps
without, in two settings:

* ``jit``: ``jax.jit`` under ``jax.set_mesh`` (axes Explicit), the batch
  sharded over ``"data"``;
* ``shard_map``: the step inside ``jax.shard_map`` over ``"data"`` with
  ``value_and_grad(..., axis_name="data")`` (``check_vma`` on).

K-FAC and FOOF have 6 units (layer slices) here, fewer than the 8 devices; the
plan leaves 2 devices idle. Reported: the largest parameter difference
relative to the change, the plan (units per device), and, from the compiled
``jit`` programs (benchmarks/benchlib/hlo_work.py: LAPACK calls with their
operand shapes, times loop trips, each device only the branch of the switch
on its index that it takes), the refresh's LAPACK flops per device, split and
replicated.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import eva_optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))
from benchlib import hlo_work  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS, BATCH = 3, 64


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(16)(h)), None


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(16)(x))
    h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="blocks")(h, None)
    h = jnp.tanh(nn.Dense(12)(h))
    return nn.Dense(5)(h)


def loss_fn(params, x, y):
  return jnp.mean(jnp.sum((Net().apply({"params": params}, x) - y) ** 2, -1))


def optimizer(name, views, dist):
  kw = dict(layer_views=views, distribute_over=dist)
  return {
      "kfac": lambda: eva_optax.kfac(0.05, damping=1e-3, **kw),
      "foof": lambda: eva_optax.foof(0.05, damping=1e-2, **kw),
      "shampoo": lambda: eva_optax.shampoo(0.05, block_size=8, **kw),
      "eva_s": lambda: eva_optax.eva_s(0.01, **kw),
  }[name]()


STATS = {"kfac": "factors", "foof": "factors", "shampoo": None, "eva_s": None}


def run_jit(name, views, dist, params, batches, mesh):
  tx = optimizer(name, views, dist)
  mode = STATS[name]

  def step(p, s, x, y):
    if mode is None:
      g = jax.grad(loss_fn)(p, x, y)
      u, s = tx.update(g, s, p)
    else:
      _, g, st = eva_optax.value_and_grad(loss_fn, statistics=mode)(p, x, y)
      u, s = tx.update(g, s, p, stats=st)
    return optax.apply_updates(p, u), s

  with jax.set_mesh(mesh):
    f = jax.jit(step)
    p, s = params, tx.init(params)
    placed = [(jax.device_put(x, P("data")), jax.device_put(y, P("data")))
              for x, y in batches]
    for x, y in placed:
      p, s = f(p, s, x, y)
    hlo = f.lower(p, s, *placed[0]).compile().as_text()
  return p, hlo


def run_shard_map(name, views, dist, params, batches, mesh):
  tx = optimizer(name, views, dist)
  mode = STATS[name]

  def step(p, s, x, y):
    if mode is None:
      g = jax.lax.pmean(jax.grad(loss_fn)(p, x, y), "data")
      u, s = tx.update(g, s, p)
    else:
      _, g, st = eva_optax.value_and_grad(loss_fn, statistics=mode,
                                          axis_name="data")(p, x, y)
      u, s = tx.update(g, s, p, stats=st)
    return optax.apply_updates(p, u), s

  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                            out_specs=(P(), P())))
  p, s = params, tx.init(params)
  for x, y in batches:
    p, s = f(p, s, x, y)
  return p


def main():
  rng = np.random.default_rng(0)
  params = jax.tree.map(np.asarray, Net().init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 10)))["params"])
  batches = []
  for t in range(STEPS):
    x = (rng.normal(size=(BATCH, 10)) + 0.3 * t).astype(np.float32)
    batches.append((x, np.tanh(x[:, :5]).astype(np.float32)))
  views = eva_optax.layer_views(loss_fn, params, *batches[0])
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  auto = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  out = {"devices": jax.device_count(), "optimizers": {}}
  for name in ("kfac", "foof", "shampoo", "eva_s"):
    row = {}
    ref, ref_hlo = run_jit(name, views, None, params, batches, mesh)
    got, hlo = run_jit(name, views, "data", params, batches, mesh)
    change = max(float(np.max(np.abs(np.asarray(r) - np.asarray(p))))
                 for r, p in zip(jax.tree.leaves(ref), jax.tree.leaves(params)))
    diff = lambda a, b: max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
                            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    row["change"] = change
    row["jit"] = diff(got, ref) / change
    ref_sm = run_shard_map(name, views, None, params, batches, auto)
    got_sm = run_shard_map(name, views, "data", params, batches, auto)
    row["shard_map"] = diff(got_sm, ref_sm) / change
    if name != "eva_s":
      plan = eva_optax.refresh_plan(name, params, devices=8, layer_views=views,
                                    **({"block_size": 8} if name == "shampoo" else {}))
      row["plan_units_per_device"] = [list(plan.owner).count(d) for d in range(8)]
      row["plan_units"] = len(plan.units)
      row["split_flops"] = hlo_work.count(hlo, 8)["lapack_flops_per_device"]
      row["replicated_flops"] = hlo_work.count(ref_hlo, 8)["lapack_flops_per_device"]
    out["optimizers"][name] = row
  print(json.dumps(out))


if __name__ == "__main__":
  main()
