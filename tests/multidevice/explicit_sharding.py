"""Every statistics mode and every optimizer under explicit sharding equals one device.

Run by tests/test_multidevice.py with 8 virtual CPU devices; prints one JSON line.

``jax.set_mesh(jax.make_mesh((8,), ("data",), axis_types=(Explicit,)))``, JAX's
recommended mode, where each array's sharding is part of its type. A model of
Dense and DenseGeneral layers (Flax's Conv and Embed themselves cannot be
differentiated under explicit sharding with a sharded batch in this Flax), 3
training steps of each optimizer with batches of 64:

* ``reference``: one device, no mesh;
* ``floor``: one device on the same batches with their rows permuted (the loss
  and every statistic are invariant, only the order of the float32 sums moves):
  the round-off floor of each method;
* ``data``: the batch sharded over ``"data"``, parameters replicated;
* ``fsdp``: the batch sharded, and every kernel whose input dimension divides
  by 8 sharded along it.

Reported per optimizer and configuration: the largest parameter difference to
the reference relative to the reference's change, the statistics' relative
difference at step 1, and whether the updated parameters keep their shardings.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import _common as C
import eva_optax

BATCH, D_IN, STEPS = 64, 16, 3


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(16)(x))
    h = nn.DenseGeneral((2, 8), use_bias=False)(h)      # bias-free, two output axes
    h = jnp.tanh(h.reshape(h.shape[0], -1))
    return nn.Dense(8)(h)


def data(seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(D_IN, 8)) / 4.0
  out = []
  for t in range(STEPS):
    x = (rng.normal(size=(BATCH, D_IN)) + 0.5 + 0.1 * t).astype(np.float32)
    out.append((x, np.tanh(x @ w).astype(np.float32)))
  return out


def train(opt, params, batches, views):
  model = MLP()
  loss_fn = lambda p, x, y: jnp.mean(jnp.sum((model.apply({"params": p}, x) - y) ** 2, -1))
  tx = _with_views(opt.name, views)
  grad_fn = C.grad_fn(loss_fn, opt.statistics)

  @jax.jit
  def step(p, s, x, y):
    loss, grads, stats = grad_fn(p, x, y)
    u, s = tx.update(grads, s, p, **({} if stats is None else {"stats": stats}))
    return optax.apply_updates(p, u), s, stats

  state, first = tx.init(params), None
  for x, y in batches:
    params, state, stats = step(params, state, x, y)
    first = stats if first is None else first
  return params, first


def _with_views(name, views):
  """The optimizer with _common's settings, and the capture's views (the
  DenseGeneral with two output axes needs them)."""
  settings = {"eva": dict(damping=1e-4), "eva_f": dict(damping=3e-2),
              "eva_s": dict(damping=1e-4), "kfac": dict(damping=1e-3),
              "foof": dict(damping=1e-1), "shampoo": dict(matrix_eps=1e-2)}
  lr = {"eva": 0.1, "eva_f": 0.1, "eva_s": 0.005, "kfac": 0.02, "foof": 0.02,
        "shampoo": 0.02}
  return getattr(eva_optax, name)(lr[name], layer_views=views, **settings[name])


def main():
  model = MLP()
  batches = data()
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, D_IN)))["params"])
  loss_fn = lambda p, x, y: jnp.mean(jnp.sum((model.apply({"params": p}, x) - y) ** 2, -1))
  views = eva_optax.layer_views(loss_fn, params, *batches[0])
  perm = np.random.default_rng(9).permutation(BATCH)
  permuted = [(x[perm], y[perm]) for x, y in batches]
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  fsdp_spec = lambda a: P("data") if a.ndim >= 2 and a.shape[0] % 8 == 0 else P()
  out = {"devices": jax.device_count(), "optimizers": {}}
  for opt in C.OPTIMIZERS:
    ref, ref_stats = train(opt, params, batches, views)
    floor, _ = train(opt, params, permuted, views)
    change = max(float(np.max(np.abs(np.asarray(r) - np.asarray(p))))
                 for r, p in zip(jax.tree.leaves(ref), jax.tree.leaves(params)))
    diff = lambda got: max(float(np.max(np.abs(np.asarray(g) - np.asarray(r))))
                           for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref))) / change
    row = {"change": change, "floor": diff(floor)}
    for kind in ("data", "fsdp"):
      with jax.set_mesh(mesh):
        placed = [(jax.device_put(x, P("data")), jax.device_put(y, P("data")))
                  for x, y in batches]
        p0 = jax.tree.map(lambda a: jax.device_put(
            a, fsdp_spec(a) if kind == "fsdp" else P()), params)
        got, stats = train(opt, p0, placed, views)
        specs_kept = all(
            g.sharding.is_equivalent_to(q.sharding, g.ndim)
            for g, q in zip(jax.tree.leaves(got), jax.tree.leaves(p0)))
      row[kind] = diff(got)
      row[f"{kind}_specs_kept"] = bool(specs_kept)
      if stats is not None:
        errs = []
        for s, r in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
          r = np.asarray(r, np.float64)
          errs.append(float(np.max(np.abs(np.asarray(s) - r)) / (np.max(np.abs(r)) + 1e-30)))
        row[f"{kind}_stats"] = max(errs)
    out["optimizers"][opt.name] = row
  print(json.dumps(out))


if __name__ == "__main__":
  main()
