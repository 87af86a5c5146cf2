"""The jit data-parallel training step across several processes (jax.distributed).

Run by tests/test_multiprocess.py: twice as 2 processes with 4 virtual CPU devices
each on a localhost coordinator, and once as 1 process with 8 devices (the
reference). Both build one global mesh of 8 devices over ``"data"``; each process
holds only its own rows of every batch and turns them into the global batch
with ``jax.make_array_from_process_local_data``. Parameters are replicated
(every process initialises the same ones). 5 steps of eva and kfac; prints the
final parameters, the losses and step 1's statistics as JSON (the same on every
process: replicated arrays are read from a local copy).

CPU collectives across processes: jax 0.10.2 uses gloo by default
(``jax_cpu_collectives_implementation``, choices "gloo", "mpi", "megascale");
it is set explicitly here. ``jax.distributed.initialize`` must run before any
other JAX call touches the backend.

Usage::

  python multiprocess_train.py --coordinator localhost:PORT --num-processes 2 --process-id 0
  python multiprocess_train.py --num-processes 1          # reference, 8 devices
"""

from __future__ import annotations

import argparse
import time

import jax

OPTIMIZERS = ("eva", "kfac")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--coordinator", default=None)
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  return ap.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id,
                               initialization_timeout=60)
  import numpy as np
  import optax
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import _common as C

  devices = jax.devices()
  mesh = Mesh(np.array(devices), ("data",))
  rep = NamedSharding(mesh, P())
  batch_sh = NamedSharding(mesh, P("data"))
  xs, ys = C.make_data()      # every process could load only its rows; see below

  def local_rows(global_shape) -> slice:
    """The rows of the global batch that this process's devices hold."""
    idx = batch_sh.addressable_devices_indices_map(global_shape).values()
    starts = [i[0].start or 0 for i in idx]
    stops = [global_shape[0] if i[0].stop is None else i[0].stop for i in idx]
    return slice(min(starts), max(stops))

  def to_global(v):
    rows = local_rows(v.shape)
    return jax.make_array_from_process_local_data(batch_sh, v[rows], v.shape)

  def replicate(tree):
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(
            np.shape(a), rep, lambda i, a=np.asarray(a): a[i]), tree)

  def local_copy(tree):
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)).tolist(), tree)

  model = C.ConvDenseNet()
  p0 = C.init_params(model)
  loss_fn = C.loss_of(model)
  out = {"process_id": jax.process_index(), "process_count": jax.process_count(),
         "devices": jax.device_count(), "local_devices": jax.local_device_count(),
         "local_rows": [local_rows(xs[0].shape).start, local_rows(xs[0].shape).stop],
         "initial_params": local_copy(replicate(p0)), "optimizers": {}}
  for name in OPTIMIZERS:
    opt = C.BY_NAME[name]
    tx = opt.make()
    gf = C.grad_fn(loss_fn, opt.statistics)

    def step(params, opt_state, x, y, tx=tx, gf=gf):
      loss, grads, stats = gf(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      return optax.apply_updates(params, updates), opt_state, loss, stats

    params = replicate(p0)
    opt_state = jax.jit(tx.init, out_shardings=rep)(params)
    x0, y0 = to_global(xs[0]), to_global(ys[0])
    compiled = jax.jit(step, out_shardings=rep).lower(
        params, opt_state, x0, y0).compile()
    losses, first = [], None
    for x, y in zip(xs, ys):
      params, opt_state, loss, stats = compiled(params, opt_state, to_global(x),
                                                to_global(y))
      losses.append(float(np.asarray(loss.addressable_data(0))))
      first = stats if first is None else first
    out["optimizers"][name] = {
        "params": local_copy(params), "losses": losses,
        "stats": {layer: {f: np.asarray(getattr(st, f).addressable_data(0)).tolist()
                          for f in ("a", "g", "A", "G") if getattr(st, f) is not None}
                  for layer, st in first.items()}}
  out["seconds"] = time.perf_counter() - t_start
  C.emit(out)
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
