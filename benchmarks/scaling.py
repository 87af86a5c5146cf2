"""Data-parallel scaling on 1, 2, 4 and 8 virtual CPU devices: step time and traffic.

For SGD-momentum, Adam, Eva, Eva-f, K-FAC and Shampoo, the jitted full training
step of the deep autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU, MSE,
global batch 1024, random data: timings do not depend on it), data parallel with
``jax.jit`` shardings: a mesh of N devices over ``"data"``, the batch sharded
(``NamedSharding(mesh, P("data"))``), parameters and optimizer state replicated.
Per device count it reports

* the **step-time ratio against SGD**, measured as benchmarks/step_time.py does
  (``benchlib.timing``: warm-up, then ``--rounds`` interleaved rounds of
  ``--steps`` steps per optimizer, rotating order, paired per-round ratios; K-FAC
  and Shampoo refresh every ``--inverse-every`` steps and report the mean over
  whole periods), on wall time and on process CPU time;
* the **bytes each step all-reduces**, read from the compiled program
  (``jax.jit(step).lower(...).compile().as_text()``): the operand sizes of every
  ``all-reduce``, ``reduce-scatter``, ``all-gather``, ``collective-permute`` and
  ``all-to-all`` (their ``-start`` forms once), per kind, split into the step's
  own (entry) computation and nested ones (a ``lax.cond`` branch such as the
  refresh runs only every k steps), against SGD's.

The paper's claim checked: Eva's extra traffic per step is ``d_in + 1 + d_out``
floats per layer (its Kronecker vectors ``a`` and ``g``), K-FAC's the full factors
(``(d_in + 1)^2 + d_out^2`` floats per layer). The analytic counts are printed
next to the measured ones. Virtual CPU devices share the machine's cores and
their collectives are memory copies, so the times say what the extra work costs
on a shared CPU, not what a network would cost; the bytes are what a real
cluster would move (a ring all-reduce sends about ``2 (N - 1) / N`` times them
per device).

XLA reads ``--xla_force_host_platform_device_count`` only at start, so the script
re-launches itself once per device count (``--child N``) and collects their JSON.

Usage::

  python benchmarks/scaling.py                 # 1, 2, 4, 8 devices (~10 min, 2 cores)
  python benchmarks/scaling.py --quick         # smoke test: tiny model, 1 and 2 devices
  python benchmarks/scaling.py --devices 1,8 --optimizers sgd,eva --rounds 5

Writes ``benchmarks/results/scaling.json`` (with provenance) and ``scaling.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # see benchmarks/README.md

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from benchlib.collectives import analytic_floats, collective_bytes
from benchlib.scaling_report import plot, report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples")   # the `harness` package
DEFAULT_OUT = os.path.join(HERE, "results", "scaling.json")

# name -> (label, statistics mode or None, has a refresh period)
OPTIMIZERS = {
    "sgd": ("SGD", None, False),
    "adam": ("Adam", None, False),
    "eva": ("Eva", "vectors", False),
    "eva_f": ("Eva-f", "vectors", False),
    "kfac": ("K-FAC", "factors", True),
    "shampoo": ("Shampoo", None, True),
}
WIDTHS = (1000, 500, 250, 30, 250, 500, 1000, 784)
QUICK_WIDTHS = (32, 8, 32, 64)     # a 64-pixel autoencoder: small factors, fast compiles


# ----------------------------------------------------------------------------
# One device count (the child process).


def run_child(args) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import eva_optax
  from benchlib import optimizers as bopt
  from benchlib import problems
  from benchlib import timing

  n = args.child
  devices = jax.devices()
  if len(devices) != n:
    raise SystemExit(f"child for {n} devices sees {len(devices)}")
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  timing.set_hang_timeout(args.hang_timeout)
  mesh = Mesh(np.array(devices), ("data",))
  rep = NamedSharding(mesh, P())
  batch_sh = NamedSharding(mesh, P("data"))
  widths = QUICK_WIDTHS if args.quick else WIDTHS
  batch = args.batch
  model = problems.Autoencoder(widths=widths)

  def loss_fn(params, x, y):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  d0 = widths[-1]    # an autoencoder: input and output have the same size
  params0 = model.init(jax.random.PRNGKey(0), jnp.zeros((1, d0)))["params"]
  rng = np.random.default_rng(0)
  xs = [jax.device_put(rng.random((batch, d0), np.float32), batch_sh)
        for _ in range(4)]

  def make_tx(name):
    k = args.inverse_every
    return {"sgd": lambda: optax.sgd(0.01, momentum=0.9),
            "adam": lambda: optax.adam(1e-3),
            "eva": lambda: eva_optax.eva(0.01),
            "eva_f": lambda: eva_optax.eva_f(0.01),
            "kfac": lambda: eva_optax.kfac(0.01, inverse_every=k),
            "shampoo": lambda: eva_optax.shampoo(0.01, inverse_every=k)}[name]()

  class Sharded(timing.Runner):
    """A data-parallel step threading donated, replicated params and state."""

    def __init__(self, name):
      label, mode, periodic = OPTIMIZERS[name]
      self.tx = make_tx(name)
      grad_fn = bopt.gradient_fn(loss_fn, mode)

      def step(params, opt_state, x, y):
        loss, grads, stats = grad_fn(params, x, y)
        if stats is None:
          updates, opt_state = self.tx.update(grads, opt_state, params)
        else:
          updates, opt_state = self.tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

      # Fresh buffers from the host: the step donates them (a device_put of
      # an array already in place could hand back the shared original).
      self.params = jax.device_put(jax.tree.map(np.asarray, params0), rep)
      self.opt_state = jax.jit(self.tx.init, out_shardings=rep)(self.params)
      t0, c0 = time.perf_counter(), time.process_time()
      self.step = jax.jit(step, in_shardings=(rep, rep, batch_sh, batch_sh),
                          out_shardings=rep, donate_argnums=(0, 1)).lower(
                              self.params, self.opt_state, xs[0], xs[0]).compile()
      self.compile_s = time.perf_counter() - t0
      self.compile_cpu_s = time.process_time() - c0
      self.collectives = collective_bytes(self.step.as_text())
      self.i = 0
      log(f"  {n} device(s) {label}: compiled in {self.compile_s:.1f} s "
          f"({self.compile_cpu_s:.1f} s CPU); "
          f"{self.collectives['entry_bytes'] / 1e6:.3f} MB in collectives per step")
      super().__init__(name, self._call, args.inverse_every if periodic else 1)

    def _call(self):
      self.i = (self.i + 1) % len(xs)
      x = xs[self.i]
      self.params, self.opt_state, loss = self.step(self.params, self.opt_state, x, x)
      return loss

  runners = [Sharded(name) for name in args.optimizers]
  timed = timing.time_interleaved(runners, args.rounds, args.steps, log=log)
  sgd = timed["sgd"]
  out = {"devices": n, "batch": batch, "widths": list(widths),
         "device_kind": str(devices[0].device_kind), "optimizers": {}}
  for r in runners:
    t = timed[r.name]
    out["optimizers"][r.name] = {
        "step_s": t["step_s"], "cpu_s": t["cpu_s"], "statistic": t["statistic"],
        "per_round_s": t["per_round_s"], "per_round_cpu_s": t["per_round_cpu_s"],
        "round_spread": t["round_spread"],
        "ratio_vs_sgd": timing.paired_ratio(t, sgd),
        "cpu_ratio_vs_sgd": timing.paired_ratio(t, sgd, key="per_round_cpu_s"),
        "compile_s": r.compile_s, "compile_cpu_s": r.compile_cpu_s,
        "collectives": r.collectives,
        "final_loss": float(jax.device_get(r.call())),
    }
  return out


# ----------------------------------------------------------------------------
# The parent: one child per device count, the report.


def launch(n: int, args, argv_rest: list[str]) -> dict[str, Any]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={n}")
  if args.quick:   # compile time ~5x shorter; only flags this jaxlib accepts
    if EXAMPLES not in sys.path:
      sys.path.insert(0, EXAMPLES)
    from harness import xla_flags  # pylint: disable=g-import-not-at-top
    flags = xla_flags.fast_compile_flags() + flags
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS") or "cpu"
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get(
      "PYTHONPATH", "").split(os.pathsep) if p])
  cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n)] + argv_rest
  print(f"== {n} device(s)", file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True,
                        timeout=args.child_timeout)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    raise SystemExit(f"the {n}-device run failed (exit status {proc.returncode})")
  return json.loads(lines[-1])


def summarize(runs: list[dict[str, Any]], widths) -> dict[str, Any]:
  """Extra bytes against SGD and the analytic counts, per device count."""
  floats = analytic_floats(tuple(widths))
  analytic_bytes = {k: 4 * v for k, v in floats.items() if k != "layers"}
  analytic_bytes["sgd"] = 4 * (floats["gradient"] + floats["loss"])
  rows = []
  for run in runs:
    sgd_bytes = run["optimizers"]["sgd"]["collectives"]["entry_bytes"]
    row = {"devices": run["devices"], "sgd_step_ms": 1e3 * run["optimizers"]["sgd"]["step_s"],
           "sgd_bytes": sgd_bytes, "optimizers": {}}
    for name, r in run["optimizers"].items():
      c = r["collectives"]
      row["optimizers"][name] = {
          "ratio_vs_sgd": r["ratio_vs_sgd"], "cpu_ratio_vs_sgd": r["cpu_ratio_vs_sgd"],
          "bytes": c["entry_bytes"], "nested_bytes": c["nested_bytes"],
          "extra_bytes_vs_sgd": c["entry_bytes"] - sgd_bytes,
          "collectives": {k: v for k, v in c["entry"].items()},
      }
    rows.append(row)
  return {"analytic_floats": floats, "analytic_extra_bytes": analytic_bytes,
          "rows": rows}


def parser() -> argparse.ArgumentParser:
  """The command line (every flag with its help and default)."""
  ap = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--devices", default=None,
                  help="comma-separated device counts (default 1,2,4,8; --quick: 1,2)")
  ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                  help=f"subset of {','.join(OPTIMIZERS)} (sgd is always added)")
  ap.add_argument("--batch", type=int, default=None,
                  help="global batch (default 1024; --quick: 64)")
  ap.add_argument("--rounds", type=int, default=None,
                  help="interleaved timing rounds (default 3; --quick: 1)")
  ap.add_argument("--steps", type=int, default=None,
                  help="steps per optimizer per round (default 10; --quick: 2)")
  ap.add_argument("--inverse-every", type=int, default=10,
                  help="K-FAC's and Shampoo's refresh period")
  ap.add_argument("--quick", action="store_true",
                  help="smoke test: autoencoder 64-32-8-32-64, batch 64, 1 and 2 "
                  "devices, 1 round of 2 steps (the times mean nothing)")
  ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output ('' for none)")
  ap.add_argument("--plot", default=None,
                  help="PNG output (default: next to --out; '' for none)")
  ap.add_argument("--hang-timeout", type=float, default=600.0,
                  help="abort a child if one call runs longer (s; 0 disables)")
  ap.add_argument("--child-timeout", type=float, default=1800.0,
                  help="seconds allowed for one device count's process")
  ap.add_argument("--child", type=int, default=None,
                  help="internal: run one device count in this process")
  return ap


def parse_args(argv=None):
  ap = parser()
  args = ap.parse_args(argv)
  q = args.quick
  args.devices = [int(d) for d in (args.devices or ("1,2" if q else "1,2,4,8")).split(",")]
  args.batch = args.batch or (64 if q else 1024)
  args.rounds = args.rounds or (1 if q else 3)
  args.steps = args.steps or (2 if q else 10)
  names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
  for s in names:
    if s not in OPTIMIZERS:
      ap.error(f"unknown optimizer {s!r}; choose from {list(OPTIMIZERS)}")
  args.optimizers = [s for s in OPTIMIZERS if s in names or s == "sgd"]
  for d in args.devices:
    if d < 1 or args.batch % d:
      ap.error(f"the batch {args.batch} must split evenly over {d} devices")
  if args.rounds < 1 or args.steps < 1 or args.inverse_every < 1:
    ap.error("--rounds, --steps and --inverse-every must be >= 1")
  return args


def _child_argv(args) -> list[str]:
  rest = ["--optimizers", ",".join(args.optimizers), "--batch", str(args.batch),
          "--rounds", str(args.rounds), "--steps", str(args.steps),
          "--inverse-every", str(args.inverse_every),
          "--hang-timeout", str(args.hang_timeout)]
  return rest + (["--quick"] if args.quick else [])


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.child is not None:
    result = run_child(args)
    print(json.dumps(result), flush=True)
    return result
  t0 = time.perf_counter()
  runs = [launch(n, args, _child_argv(args)) for n in args.devices]
  summary = summarize(runs, runs[0]["widths"])
  summary["batch"] = args.batch
  labels = {k: v[0] for k, v in OPTIMIZERS.items()}
  text = report(summary, args.optimizers, labels)
  print(text)
  if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
  from harness import provenance  # pylint: disable=g-import-not-at-top
  record = {"config": {k: v for k, v in vars(args).items() if k != "child"},
            "provenance": provenance.collect(argv),
            "summary": summary, "runs": runs, "table": text,
            "seconds": time.perf_counter() - t0}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
    print(f"\nwrote {args.out}", file=sys.stderr)
    png = args.plot if args.plot is not None else os.path.splitext(args.out)[0] + ".png"
    if png:
      plot(summary, args.optimizers, labels, png)
      print(f"wrote {png}", file=sys.stderr)
  return record


if __name__ == "__main__":
  main()
