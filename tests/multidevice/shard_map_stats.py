"""value_and_grad(..., axis_name=...) inside jax.shard_map (check_vma on) and pmap.

Run by tests/test_shard_map.py in a fresh interpreter with 8 virtual CPU devices;
prints one JSON line with the measured errors.

* ``stats``: inside ``shard_map`` over a mesh ``("data",)`` of 8 devices, each
  shard holding 8 of the 64 examples and computing the MEAN loss of its own
  shard, ``value_and_grad(loss_fn, statistics="factors", axis_name="data")``
  returns the loss, gradients and statistics ``a, g, A, G`` of the whole batch of
  64 (compared with one device on the whole batch), for the conv and the Dense
  layer; and the same for "vectors" and for ``check_vma=False``.
* ``naive``: the per-shard statistics without ``axis_name`` and ``check_vma=False``,
  averaged over the shards by hand: ``g`` 8x and ``G`` 64x off (the issue's bug),
  which the test requires to be far outside the tolerance.
* ``stats_batch``: the same with ``stats_batch=2``: each shard's statistics
  come from its own first 2 examples, so the result equals one device's
  statistics of those 16 examples under the loss ``(16 / 64) * mean`` (each row
  keeps the whole batch's ``1/64``), while the gradient stays the whole batch's.
* ``train``: 5 steps of every optimizer with the whole training step inside
  ``shard_map`` (gradients, statistics and the update; the parameters and the
  optimizer state replicated) against 5 steps on one device.
* ``pmap``: the same 5 steps of eva and kfac under ``jax.pmap(axis_name="data")``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import _common
import eva_optax

model = _common.ConvDenseNet()
loss_fn = _common.loss_of(model)
xs, ys = _common.make_data()
params0 = _common.init_params(model)
mesh = jax.make_mesh((8,), ("data",))
data = NamedSharding(mesh, P("data"))
rep = NamedSharding(mesh, P())


def stats_errors(statistics, check_vma):
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics=statistics,
                                     axis_name="data")
  sharded = jax.jit(jax.shard_map(
      grad_fn, mesh=mesh, in_specs=(P(), P("data"), P("data")),
      out_specs=P(), check_vma=check_vma))
  x, y = xs[0], ys[0]
  got = sharded(jax.device_put(params0, rep), jax.device_put(x, data),
                jax.device_put(y, data))
  ref = jax.jit(eva_optax.value_and_grad(loss_fn, statistics=statistics))(
      params0, x, y)
  out = {"loss": abs(float(got[0]) - float(ref[0])) / abs(float(ref[0])),
         "grads": _common.rel_error(got[1], ref[1])}
  for layer in ref[2]:
    for k in ("a", "g", "A", "G"):
      if getattr(ref[2][layer], k) is not None:
        out[f"{layer}.{k}"] = _common.rel_error(getattr(got[2][layer], k),
                                                getattr(ref[2][layer], k))
  return out


def stats_batch_errors(m=2, shards=8):
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics="factors",
                                     axis_name="data", stats_batch=m)
  sharded = jax.jit(jax.shard_map(
      grad_fn, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()))
  x, y = xs[0], ys[0]
  got = sharded(jax.device_put(params0, rep), jax.device_put(x, data),
                jax.device_put(y, data))
  per = len(x) // shards
  first = np.concatenate([np.arange(s * per, s * per + m) for s in range(shards)])
  scale = len(first) / len(x)
  sub = lambda p, xb, yb: scale * loss_fn(p, xb, yb)
  _, grads, _ = jax.jit(eva_optax.value_and_grad(loss_fn, statistics="factors"))(
      params0, x, y)
  _, _, ref = jax.jit(eva_optax.value_and_grad(sub, statistics="factors"))(
      params0, x[first], y[first])
  out = {"grads": _common.rel_error(got[1], grads)}
  for layer in ref:
    for k in ("a", "g", "A", "G"):
      if getattr(ref[layer], k) is not None:
        out[f"{layer}.{k}"] = _common.rel_error(getattr(got[2][layer], k),
                                                getattr(ref[layer], k))
  return out


def naive_errors():
  grad_fn = eva_optax.value_and_grad(loss_fn, statistics="factors")

  def per_shard(p, x, y):
    _, _, st = grad_fn(p, x, y)
    return jax.lax.pmean(st, "data")

  sharded = jax.jit(jax.shard_map(per_shard, mesh=mesh,
                                  in_specs=(P(), P("data"), P("data")),
                                  out_specs=P(), check_vma=False))
  got = sharded(jax.device_put(params0, rep), jax.device_put(xs[0], data),
                jax.device_put(ys[0], data))
  _, _, ref = grad_fn(params0, xs[0], ys[0])
  return {f"{l}.{k}": _common.rel_error(getattr(got[l], k), getattr(ref[l], k))
          for l in ref for k in ("g", "G")}


def sharded_step(tx, statistics):
  if statistics is None:
    vg = jax.value_and_grad(loss_fn)

    def gf(p, x, y):
      loss, g = vg(p, x, y)
      return jax.lax.pmean(loss, "data"), jax.lax.pmean(g, "data"), None
  else:
    gf = eva_optax.value_and_grad(loss_fn, statistics=statistics,
                                  axis_name="data")

  def step(p, s, x, y):
    loss, grads, stats = gf(p, x, y)
    kw = {} if stats is None else {"stats": stats}
    updates, s = tx.update(grads, s, p, **kw)
    return optax.apply_updates(p, updates), s, loss

  return step


def train_errors():
  out = {}
  for opt in _common.OPTIMIZERS:
    ref, _, _ = _common.train(opt, loss_fn, params0, xs, ys)
    tx = opt.make()
    step = sharded_step(tx, opt.statistics)
    if opt.statistics is None:   # plain jax.value_and_grad of replicated params
      step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                           out_specs=(P(), P(), P()), check_vma=False)
    else:
      step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                           out_specs=(P(), P(), P()))
    step = jax.jit(step)
    p = jax.device_put(params0, rep)
    s = jax.device_put(tx.init(params0), rep)
    for x, y in zip(xs, ys):
      p, s, _ = step(p, s, jax.device_put(x, data), jax.device_put(y, data))
    out[opt.name] = _common.change_error(p, ref, params0)
  return out


def pmap_errors():
  out = {}
  for name in ("eva", "kfac"):
    opt = _common.BY_NAME[name]
    ref, _, _ = _common.train(opt, loss_fn, params0, xs, ys)
    tx = opt.make()
    step = jax.pmap(sharded_step(tx, opt.statistics), axis_name="data",
                    in_axes=(None, None, 0, 0), out_axes=(None, None, None))
    p, s = params0, tx.init(params0)
    for x, y in zip(xs, ys):
      p, s, _ = step(p, s, x.reshape((8, -1) + x.shape[1:]),
                     y.reshape((8, -1) + y.shape[1:]))
    out[name] = _common.change_error(p, ref, params0)
  return out


_common.emit({
    "stats_factors_vma": stats_errors("factors", True),
    "stats_vectors_vma": stats_errors("vectors", True),
    "stats_factors_novma": stats_errors("factors", False),
    "stats_batch": stats_batch_errors(),
    "naive": naive_errors(),
    "train": train_errors(),
    "pmap": pmap_errors(),
})
