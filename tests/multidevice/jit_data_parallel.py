"""Data parallelism with jax.jit shardings equals one device, for every optimizer.

Run by tests/test_multidevice.py in a fresh interpreter with 8 virtual CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``); prints one JSON
line with the measured errors, which the test checks.

For each of eva, eva_f, eva_s, kfac, foof and shampoo (settings in ``_common.py``),
5 training steps of the Conv + Dense model of ``_common.py`` (both layers with a
bias), a different batch of 64 at every step:

* ``reference``: one device, the whole batch;
* ``replicated``: a mesh of 8 devices, the batch sharded over ``"data"``
  (``NamedSharding(mesh, P("data"))``), parameters replicated;
* ``fsdp``: the same mesh and batch sharding, and each kernel sharded over
  ``"data"``, the conv's along d_out (with its bias), the Dense's along d_in;
  the momentum buffer sharded like the parameters, the preconditioner state
  (Kronecker vectors, factors, counters) replicated (``state_shardings``).

Each configuration is compiled exactly once (``jit(...).lower(...).compile()``,
then called with inputs of exactly those shardings) and uses
``eva_optax.value_and_grad`` as it is: under jit the probes' cotangents, which
carry the statistics, are reduced over the whole sharded batch by XLA like any
other gradient, so the statistics are already global means. The step returns
them; step 1's (``a, g`` for the vector methods, ``a, g, A, G`` for the factor
ones) are compared with one device's.

Two yardsticks, both from the 1-device program (no extra compile):

* ``permuted_rows``: the same steps on batches whose rows are permuted. The
  mean loss and every statistic are invariant, only the order of the float32
  sums changes: this is the round-off floor of each method at its settings.
* ``wrong_stats_x8``: the same steps with ``a, g`` multiplied by 8 and ``A, G``
  by 64 (a psum where a pmean belongs over 8 shards; issue 8's naive per-shard
  average leaves ``g`` 8x off and ``G`` 64x off, and its vmap bug multiplies
  ``a``). The test requires this to be far above the tolerance: the damping is
  small enough that a wrong statistic shows.

bf16: the same model with bf16 parameters and activations (float32 statistics
and preconditioner state), eva and kfac, one device against 8 (batch sharded),
and, as the scale of bf16 round-off, the 1-device bf16 run against float32.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import _common as C

# Which axis of each kernel FSDP shards ("in": d_in, "out": d_out).
FSDP_AXES = {"Conv_0": "out", "Dense_0": "in"}
BF16_OPTIMIZERS = ("eva", "kfac")


def log(*args):
  print(*args, file=sys.stderr, flush=True)


def fsdp_specs(params) -> dict:
  """PartitionSpecs: kernels along d_in (axis -2) or d_out (axis -1) over "data"."""
  specs = {}
  for layer, node in params.items():
    nd = node["kernel"].ndim
    axis = nd - 2 if FSDP_AXES[layer] == "in" else nd - 1
    k = [None] * nd
    k[axis] = "data"
    specs[layer] = {"kernel": P(*k),
                    "bias": P("data") if FSDP_AXES[layer] == "out" else P()}
  return specs


def scale_statistics(stats, s):
  """``a, g`` times ``s``, ``A, G`` times ``s**2``: a psum where a pmean belongs."""
  def one(st):
    return st.replace(**{f: getattr(st, f) * s ** p
                         for f, p in (("a", 1), ("g", 1), ("A", 2), ("G", 2))
                         if getattr(st, f) is not None})
  return jax.tree.map(one, stats, is_leaf=lambda x: hasattr(x, "captured"))


class Runner:
  """One optimizer on one mesh, compiled exactly once; ``train`` runs 5 steps."""

  def __init__(self, opt: C.Opt, model, params0, xs, ys, mesh: Mesh, *,
               fsdp: bool = False):
    self.label = f"{opt.name}: {mesh.devices.size} device(s){' fsdp' if fsdp else ''}"
    loss_fn = C.loss_of(model)
    tx = opt.make()
    gf = C.grad_fn(loss_fn, opt.statistics)

    def step(params, opt_state, x, y, scale):
      loss, grads, stats = gf(params, x, y)
      if stats is None:
        updates, opt_state = tx.update(grads, opt_state, params)
      else:
        updates, opt_state = tx.update(grads, opt_state, params,
                                       stats=scale_statistics(stats, scale))
      return optax.apply_updates(params, updates), opt_state, loss, stats

    self.rep = NamedSharding(mesh, P())
    self.batch_sh = NamedSharding(mesh, P("data"))
    if fsdp:
      self.p_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), fsdp_specs(params0),
                               is_leaf=lambda s: isinstance(s, P))
    else:
      self.p_sh = jax.tree.map(lambda _: self.rep, params0)
    self.params0 = jax.device_put(params0, self.p_sh)
    self.s_sh = state_shardings(tx, params0, self.p_sh, self.rep)
    self.state0 = jax.jit(tx.init, out_shardings=self.s_sh)(self.params0)
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = jax.jit(
        step, in_shardings=(self.p_sh, self.s_sh, self.batch_sh, self.batch_sh,
                            self.rep),
        out_shardings=(self.p_sh, self.s_sh, self.rep, None)).lower(
            self.params0, self.state0, self.batch(xs[0]), self.batch(ys[0]),
            self.scale(1.0))
    c1 = time.process_time()
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - t0
    log(f"{self.label}: traced and compiled in {self.compile_s:.1f} s "
        f"({c1 - c0:.1f} + {time.process_time() - c1:.1f} s CPU)")

  def batch(self, v):
    return jax.device_put(v, self.batch_sh)

  def scale(self, s):
    return jax.device_put(jnp.float32(s), self.rep)

  def train(self, xs, ys, stat_scale: float = 1.0) -> dict:
    """The steps on ``zip(xs, ys)``: final params and state, step 1's stats, losses."""
    params, opt_state, scale = self.params0, self.state0, self.scale(stat_scale)
    losses, first_stats = [], None
    for x, y in zip(xs, ys):
      params, opt_state, loss, stats = self.compiled(
          params, opt_state, self.batch(x), self.batch(y), scale)
      losses.append(float(loss))
      first_stats = stats if first_stats is None else first_stats
    return {"params": params, "opt_state": opt_state, "stats": first_stats,
            "losses": losses, "param_specs": specs(params),
            "state_specs": specs(opt_state)}


def path_name(kp) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in kp)


def specs(tree) -> dict[str, list]:
  """``{"path/to/leaf": [None, "data"]}``: the PartitionSpec of every leaf."""
  return {path_name(kp): [list(e) if isinstance(e, tuple) else e
                          for e in leaf.sharding.spec]
          for kp, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def state_shardings(tx, params, p_sh, rep):
  """Optimizer-state shardings: a leaf shaped like a parameter, at a path that
  ends with that parameter's path (the momentum buffer), is sharded like it
  (ZeRO / FSDP); the rest (counters, Kronecker vectors and factors) replicated."""
  by_name = {path_name(kp): (leaf.shape, sh) for (kp, leaf), sh in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(p_sh))}

  def choose(kp, leaf):
    name = path_name(kp)
    for pname, (shape, sh) in by_name.items():
      if name.endswith("/" + pname) and leaf.shape == shape:
        return sh
    return rep

  return jax.tree_util.tree_map_with_path(choose, jax.eval_shape(tx.init, params))


def stats_errors(stats, ref) -> dict:
  """Per layer and field, ``|s - s_ref| / |s_ref|``."""
  out = {}
  for layer, st in ref.items():
    out[layer] = {f: C.rel_error(getattr(stats[layer], f), getattr(st, f))
                  for f in ("a", "g", "A", "G") if getattr(st, f) is not None}
  return out


def dtypes(tree) -> list[str]:
  return sorted({str(l.dtype) for l in jax.tree.leaves(tree)})


def main():
  t_start = time.perf_counter()
  devices = jax.devices()
  if len(devices) != 8:
    raise SystemExit(f"needs 8 devices, got {len(devices)}: run with "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh1 = Mesh(np.array(devices[:1]), ("data",))
  mesh8 = Mesh(np.array(devices), ("data",))
  xs, ys = C.make_data()
  model = C.ConvDenseNet()
  p0 = C.init_params(model)
  result = {"devices": len(devices), "jax": jax.__version__,
            "batch": C.BATCH, "steps": C.STEPS,
            "optimizers": {}, "bf16": {}}

  # The round-off floor: the same 1-device program on batches whose rows are
  # permuted (the mean loss and every statistic are invariant; only the order
  # of the floating-point sums changes).
  perm = np.random.default_rng(1).permutation(C.BATCH)
  xs_p, ys_p = [x[perm] for x in xs], [y[perm] for y in ys]

  f32_refs = {}
  for opt in C.OPTIMIZERS:
    t0 = time.perf_counter()
    one = Runner(opt, model, p0, xs, ys, mesh1)
    ref = one.train(xs, ys)
    f32_refs[opt.name] = ref
    rep = Runner(opt, model, p0, xs, ys, mesh8).train(xs, ys)
    fsdp = Runner(opt, model, p0, xs, ys, mesh8, fsdp=True).train(xs, ys)
    r = {"replicated": C.change_error(rep["params"], ref["params"], p0),
         "fsdp": C.change_error(fsdp["params"], ref["params"], p0),
         "permuted_rows": C.change_error(one.train(xs_p, ys_p)["params"],
                                         ref["params"], p0),
         "change": C.rel_error(ref["params"], p0),
         "losses": ref["losses"],
         "loss_diff": float(np.max(np.abs(np.subtract(rep["losses"], ref["losses"])))),
         "fsdp_param_specs": fsdp["param_specs"],
         "fsdp_state_specs": fsdp["state_specs"],
         "replicated_param_specs": rep["param_specs"]}
    if opt.statistics is not None:
      r["stats_replicated"] = stats_errors(rep["stats"], ref["stats"])
      r["stats_fsdp"] = stats_errors(fsdp["stats"], ref["stats"])
      r["wrong_stats_x8"] = C.change_error(one.train(xs, ys, 8.0)["params"],
                                           ref["params"], p0)
    r["seconds"] = time.perf_counter() - t0
    result["optimizers"][opt.name] = r

  model16 = C.ConvDenseNet(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p0)
  for name in BF16_OPTIMIZERS:
    t0 = time.perf_counter()
    opt = C.BY_NAME[name]
    ref = Runner(opt, model16, p16, xs, ys, mesh1).train(xs, ys)
    rep = Runner(opt, model16, p16, xs, ys, mesh8).train(xs, ys)
    result["bf16"][name] = {
        "replicated": C.change_error(rep["params"], ref["params"], p16),
        "bf16_vs_f32": C.change_error(ref["params"], f32_refs[name]["params"], p0),
        "change": C.rel_error(ref["params"], p16),
        "param_dtypes": dtypes(rep["params"]),
        "stats_dtypes": dtypes(rep["stats"]),
        "precond_state_dtypes": dtypes(rep["opt_state"][0].layers),
        "opt_state_dtypes": dtypes(rep["opt_state"]),
        "stats_replicated": stats_errors(rep["stats"], ref["stats"]),
        "losses": [ref["losses"], rep["losses"]],
        "seconds": time.perf_counter() - t0,
    }
  result["seconds"] = time.perf_counter() - t_start
  C.emit(result)


if __name__ == "__main__":
  main()
