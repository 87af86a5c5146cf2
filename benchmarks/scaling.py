"""Data-parallel scaling on 1, 2, 4 and 8 virtual CPU devices: time, refresh work, traffic, compile.

The jitted full training step of the deep autoencoder
784-1000-500-250-30-250-500-1000-784 (ReLU, MSE, global batch 1024, random
data: timings do not depend on it), data parallel with ``jax.jit`` shardings:
a mesh of N devices over ``"data"`` (set with ``jax.set_mesh`` around tracing),
the batch sharded (``NamedSharding(mesh, P("data"))``), parameters and
optimizer state replicated. Methods: SGD-momentum, Adam, Eva, Eva-f, and K-FAC,
FOOF and Shampoo at each ``--inverse-every`` (default 1 and 10), each
**replicated** (every device computes the whole refresh) and **split**
(``distribute_over="data"``: the refresh's units spread over the devices, the
results all-gathered on refresh steps). Per device count and method it reports

* the **step-time ratio against SGD**, measured as benchmarks/step_time.py does
  (``benchlib.timing``: warm-up, then ``--rounds`` interleaved rounds of
  ``--steps`` steps per method, rotating order, paired per-round ratios; a
  method that refreshes every k > 1 steps reports the mean over whole periods),
  on process **CPU time** (the N virtual devices share the machine's cores, so
  CPU time measures the total work done) and on wall time;
* the **refresh's work per device**, counted from the compiled program
  (``benchlib.hlo_work``: the LAPACK calls' operand shapes times the trip counts
  of the loops around them, each device's own branch of the switch on the
  device index; ``Compiled.cost_analysis()`` leaves LAPACK out and counts a
  loop body once): flops on the busiest device, and max over mean;
* the **bytes in collectives**, per step (outside every conditional) and per
  refresh (inside the refresh's ``lax.cond``), read from the compiled
  program's ``all-reduce``/``all-gather``/... operands;
* the step's **compile time** (``.lower()`` + ``.compile()``, CPU and wall)
  and HLO line count, against Adam's in the same process;
* for a split method, the largest parameter difference from its replicated
  twin after the same steps on the same batches, relative to the replicated
  run's parameter change (round-off: ~1e-6);
* for a split method, ``eva_optax.refresh_plan``'s estimated load per device
  and bytes per refresh (where the library has it).

The paper's claim checked: Eva's extra traffic per step is ``d_in + 1 + d_out``
floats per layer (its Kronecker vectors ``a`` and ``g``), K-FAC's the full factors
(``(d_in + 1)^2 + d_out^2`` floats per layer). The analytic counts are printed
next to the measured ones. Virtual CPU devices share the machine's cores and
their collectives are memory copies, so the times say what the work costs
on a shared CPU, not what a network would cost; the bytes are what a real
cluster would move.

XLA reads ``--xla_force_host_platform_device_count`` only at start, so the script
re-launches itself once per device count (``--child N``) and collects their JSON.
A device count whose process fails is recorded (its stderr tail) and the others
still run; the script then exits with status 1.

Usage::

  python benchmarks/scaling.py                 # everything (~40-50 min, 2 quiet cores)
  python benchmarks/scaling.py --quick         # smoke test: tiny model, 1 and 2 devices
  python benchmarks/scaling.py --devices 1,8 --optimizers sgd,kfac --inverse-every 10

Writes ``benchmarks/results/scaling.json`` (with provenance) and ``scaling.png``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # see benchmarks/README.md

import argparse
import dataclasses
import inspect
import json
import subprocess
import sys
import time
from typing import Any

from benchlib.collectives import analytic_floats, collective_bytes
from benchlib.scaling_report import SCHEMA, plot, report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples")   # the `harness` package
DEFAULT_OUT = os.path.join(HERE, "results", "scaling.json")

# base name -> (label, statistics mode or None, has a refresh to split)
OPTIMIZERS = {
    "sgd": ("SGD", None, False),
    "adam": ("Adam", None, False),
    "eva": ("Eva", "vectors", False),
    "eva_f": ("Eva-f", "vectors", False),
    "kfac": ("K-FAC", "factors", True),
    "foof": ("FOOF", "factors", True),
    "shampoo": ("Shampoo", None, True),
}
MODES = ("replicated", "split")
WIDTHS = (1000, 500, 250, 30, 250, 500, 1000, 784)
QUICK_WIDTHS = (32, 8, 32, 64)     # a 64-pixel autoencoder: small factors, fast compiles


@dataclasses.dataclass(frozen=True)
class Variant:
  """One timed method: a base optimizer, its refresh period, replicated or split."""
  name: str                 # "kfac_10_split"
  base: str                 # "kfac"
  label: str                # "K-FAC k=10, split"
  statistics: str | None
  k: int = 1                # inverse_every (1 for the first-order methods)
  split: bool = False

  @property
  def twin(self) -> str:
    """The replicated variant a split one is compared with."""
    return f"{self.base}_{self.k}"


def variants(names: list[str], ks: list[int], modes: list[str]) -> list[Variant]:
  out = []
  for base in names:
    label, stats, periodic = OPTIMIZERS[base]
    if not periodic:
      out.append(Variant(base, base, label, stats))
      continue
    for k in ks:
      for mode in modes:
        split = mode == "split"
        out.append(Variant(f"{base}_{k}" + ("_split" if split else ""), base,
                           f"{label} k={k}" + (", split" if split else ""),
                           stats, k, split))
  return out


def library_can_split() -> str | None:
  """None if eva_optax's K-FAC, FOOF and Shampoo take ``distribute_over``; else why not."""
  import eva_optax  # pylint: disable=g-import-not-at-top
  missing = [n for n in ("kfac", "foof", "shampoo")
             if "distribute_over" not in inspect.signature(getattr(eva_optax, n)).parameters]
  if missing:
    return (f"this eva_optax's {', '.join(missing)} take no distribute_over= "
            "(the split refresh has not landed)")
  return None


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
  from benchlib import compile_stats
  from benchlib import hlo_work
  from benchlib import optimizers as bopt
  from benchlib import problems
  from benchlib import timing

  n = args.child
  devices = jax.devices()
  if len(devices) != n:
    raise SystemExit(f"child for {n} devices sees {len(devices)}")
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  timing.set_hang_timeout(args.hang_timeout)
  compile_stats.check_no_persistent_cache()
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
  why_not = library_can_split()
  todo = variants(args.optimizers, args.inverse_every, args.modes)
  skipped = {v.name: why_not for v in todo if v.split and why_not}
  todo = [v for v in todo if v.name not in skipped]
  for name, why in skipped.items():
    log(f"  {n} device(s): skipping {name}: {why}")

  def make_tx(v: Variant):
    split = {"distribute_over": "data"} if v.split else {}
    return {"sgd": lambda: optax.sgd(0.01, momentum=0.9),
            "adam": lambda: optax.adam(1e-3),
            "eva": lambda: eva_optax.eva(0.01),
            "eva_f": lambda: eva_optax.eva_f(0.01),
            "kfac": lambda: eva_optax.kfac(0.01, inverse_every=v.k, **split),
            "foof": lambda: eva_optax.foof(0.01, inverse_every=v.k, **split),
            "shampoo": lambda: eva_optax.shampoo(0.01, inverse_every=v.k, **split),
            }[v.base]()

  def plan_of(v: Variant) -> dict[str, Any] | None:
    """eva_optax.refresh_plan's view of the split (None where it has none)."""
    if not v.split or not hasattr(eva_optax, "refresh_plan"):
      return None
    try:
      plan = eva_optax.refresh_plan(v.base, params0, devices=n, layer_views=None)
    except Exception as e:  # pylint: disable=broad-except
      return {"error": f"{type(e).__name__}: {e}"}
    loads = [float(x) for x in getattr(plan, "loads", [])]
    mean = sum(loads) / len(loads) if loads else 0.0
    return {"text": str(plan), "loads": loads,
            "imbalance": max(loads) / mean if mean else None,
            "bytes_per_refresh": float(getattr(plan, "bytes_per_refresh", float("nan")))}

  class Sharded(timing.Runner):
    """A data-parallel step threading donated, replicated params and state."""

    def __init__(self, v: Variant):
      self.variant = v
      self.tx = make_tx(v)
      grad_fn = bopt.gradient_fn(loss_fn, v.statistics)

      def step(params, opt_state, x, y):
        loss, grads, stats = grad_fn(params, x, y)
        if stats is None:
          updates, opt_state = self.tx.update(grads, opt_state, params)
        else:
          updates, opt_state = self.tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

      # Fresh buffers from the host: the step donates them (a device_put of
      # an array already in place could hand back the shared original).
      with jax.set_mesh(mesh):
        self.params = jax.device_put(jax.tree.map(np.asarray, params0), rep)
        self.opt_state = jax.jit(self.tx.init, out_shardings=rep)(self.params)
        c = compile_stats.measure(
            jax.jit(step, in_shardings=(rep, rep, batch_sh, batch_sh),
                    out_shardings=rep, donate_argnums=(0, 1)),
            self.params, self.opt_state, xs[0], xs[0])
      self.step = c.pop("compiled")
      hlo = c.pop("hlo")
      self.compile = c
      self.collectives = collective_bytes(hlo)
      self.work = hlo_work.count(hlo, devices=n)
      self.plan = plan_of(v)
      self.i = 0
      log(f"  {n} device(s) {v.label}: compiled in {c['total_s']:.1f} s "
          f"({c['total_cpu_s']:.1f} s CPU, {c['hlo_instructions']} HLO instructions); "
          f"{self.work['step_bytes'] / 1e6:.3f} MB in collectives per step, "
          f"{self.work['cond_result_bytes'] / 1e6:.3f} MB per refresh; refresh "
          f"{self.work['lapack_flops_max'] / 1e9:.3f} GFLOP on the busiest device "
          f"(max/mean {self.work['lapack_imbalance']:.2f})")
      super().__init__(v.name, self._call, v.k)

    def _call(self):
      self.i = (self.i + 1) % len(xs)
      x = xs[self.i]
      self.params, self.opt_state, loss = self.step(self.params, self.opt_state, x, x)
      return loss

  compile_stats.warm_up_backend()
  runners = [Sharded(v) for v in todo]
  timed = timing.time_interleaved(runners, args.rounds, args.steps, log=log)
  by_name = {r.name: r for r in runners}
  leaves0 = [np.asarray(l) for l in jax.tree.leaves(params0)]

  def difference(r) -> dict[str, float] | None:
    """Largest |split - replicated| over the largest replicated change."""
    twin = by_name.get(r.variant.twin)
    if not r.variant.split or twin is None:
      return None
    a = [np.asarray(l) for l in jax.tree.leaves(r.params)]
    b = [np.asarray(l) for l in jax.tree.leaves(twin.params)]
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    change = max(float(np.max(np.abs(y - z))) for y, z in zip(b, leaves0))
    return {"max_abs": diff, "replicated_change": change,
            "relative": diff / change if change else float("nan")}

  diffs = {r.name: difference(r) for r in runners}   # before the extra step below
  sgd = timed["sgd"]
  out = {"devices": n, "batch": batch, "widths": list(widths),
         "device_kind": str(devices[0].device_kind), "skipped": skipped,
         "variants": {r.name: dataclasses.asdict(r.variant) for r in runners},
         "optimizers": {}}
  for r in runners:
    t = timed[r.name]
    out["optimizers"][r.name] = {
        "step_s": t["step_s"], "cpu_s": t["cpu_s"], "statistic": t["statistic"],
        "per_round_s": t["per_round_s"], "per_round_cpu_s": t["per_round_cpu_s"],
        "round_spread": t["round_spread"],
        "ratio_vs_sgd": timing.paired_ratio(t, sgd),
        "cpu_ratio_vs_sgd": timing.paired_ratio(t, sgd, key="per_round_cpu_s"),
        "compile_s": r.compile["total_s"], "compile_cpu_s": r.compile["total_cpu_s"],
        "compile": r.compile,
        "collectives": r.collectives,
        "work": r.work,
        "plan": r.plan,
        "vs_replicated": diffs[r.name],
        "final_loss": float(jax.device_get(r.call())),
    }
  return out


# ----------------------------------------------------------------------------
# The parent: one child per device count, the report.


def launch(n: int, args, argv_rest: list[str]) -> dict[str, Any]:
  """The JSON of the ``n``-device child, or ``{"devices": n, "failed": ...}``."""
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
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=args.child_timeout)
  except subprocess.TimeoutExpired as e:
    err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    sys.stderr.write(err[-3000:])
    return {"devices": n, "failed": f"killed after {args.child_timeout} s",
            "stderr_tail": err[-5000:]}
  sys.stderr.write(proc.stderr)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    return {"devices": n, "failed": f"exit status {proc.returncode}",
            "stderr_tail": proc.stderr[-5000:]}
  run = json.loads(lines[-1])
  run["seconds"] = time.perf_counter() - t0
  return run


def summarize(runs: list[dict[str, Any]], widths, args) -> dict[str, Any]:
  """Per device count and method: ratios, work, bytes, compile; analytic counts."""
  floats = analytic_floats(tuple(widths))
  analytic_bytes = {k: 4 * v for k, v in floats.items() if k != "layers"}
  analytic_bytes["sgd"] = 4 * (floats["gradient"] + floats["loss"])
  rows, failed = [], []
  labels: dict[str, str] = {}
  for run in runs:
    if "failed" in run:
      failed.append({"devices": run["devices"], "why": run["failed"]})
      continue
    sgd_bytes = run["optimizers"]["sgd"]["collectives"]["entry_bytes"]
    adam = run["optimizers"].get("adam")
    row = {"devices": run["devices"], "sgd_step_ms": 1e3 * run["optimizers"]["sgd"]["step_s"],
           "sgd_cpu_ms": 1e3 * run["optimizers"]["sgd"]["cpu_s"],
           "sgd_bytes": sgd_bytes, "optimizers": {}}
    for name, r in run["optimizers"].items():
      v = run["variants"][name]
      labels[name] = v["label"]
      c, w, comp = r["collectives"], r["work"], r["compile"]
      row["optimizers"][name] = {
          "base": v["base"], "k": v["k"], "split": v["split"],
          "ratio_vs_sgd": r["ratio_vs_sgd"], "cpu_ratio_vs_sgd": r["cpu_ratio_vs_sgd"],
          "bytes": c["entry_bytes"], "nested_bytes": c["nested_bytes"],
          "extra_bytes_vs_sgd": c["entry_bytes"] - sgd_bytes,
          "collectives": {k: v for k, v in c["entry"].items()},
          "step_bytes": w["step_bytes"], "refresh_bytes": w["cond_bytes"],
          "refresh_gathered_bytes": w["cond_result_bytes"],
          "refresh_flops_max": w["lapack_flops_max"],
          "refresh_flops_mean": w["lapack_flops_mean"],
          "refresh_flops_per_device": w["lapack_flops_per_device"],
          "refresh_imbalance": w["lapack_imbalance"],
          "refresh_matrices_per_device": w["lapack_calls_per_device"],
          "work_notes": w["notes"],
          "compile_s": comp["total_s"], "compile_cpu_s": comp["total_cpu_s"],
          "hlo_instructions": comp["hlo_instructions"],
          "compile_cpu_vs_adam": (comp["total_cpu_s"] / adam["compile"]["total_cpu_s"]
                                  if adam else None),
          "hlo_instructions_vs_adam": (comp["hlo_instructions"] / adam["compile"]["hlo_instructions"]
                                if adam else None),
          "vs_replicated": r["vs_replicated"],
          "plan_imbalance": (r["plan"] or {}).get("imbalance"),
          "plan_bytes_per_refresh": (r["plan"] or {}).get("bytes_per_refresh"),
      }
    rows.append(row)
  skipped = sorted({k for run in runs for k in run.get("skipped", {})})
  return {"schema": SCHEMA, "analytic_floats": floats, "analytic_extra_bytes": analytic_bytes,
          "rows": rows, "labels": labels, "failed": failed, "skipped": skipped,
          "batch": args.batch, "widths": list(widths), "inverse_every": args.inverse_every,
          "rounds": args.rounds, "steps": args.steps}


def parser() -> argparse.ArgumentParser:
  """The command line (every flag with its help and default)."""
  ap = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--devices", default=None,
                  help="comma-separated device counts (default 1,2,4,8; --quick: 1,2)")
  ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                  help=f"subset of {','.join(OPTIMIZERS)} (sgd is always added)")
  ap.add_argument("--inverse-every", default="1,10",
                  help="comma-separated refresh periods of K-FAC, FOOF and Shampoo")
  ap.add_argument("--modes", default=",".join(MODES),
                  help="replicated (every device refreshes everything) and/or split "
                  "(distribute_over='data'); split rows are skipped, and say why, "
                  "when the library has no distribute_over")
  ap.add_argument("--batch", type=int, default=None,
                  help="global batch (default 1024; --quick: 64)")
  ap.add_argument("--rounds", type=int, default=None,
                  help="interleaved timing rounds (default 3; --quick: 1)")
  ap.add_argument("--steps", type=int, default=None,
                  help="steps per method per round, rounded up to whole refresh "
                  "periods (default 10; --quick: 2)")
  ap.add_argument("--quick", action="store_true",
                  help="smoke test: autoencoder 64-32-8-32-64, batch 64, 1 and 2 "
                  "devices, 1 round of 2 steps, fast-compile XLA flags (the times "
                  "mean nothing)")
  ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output ('' for none)")
  ap.add_argument("--plot", default=None,
                  help="PNG output (default: next to --out; '' for none)")
  ap.add_argument("--hang-timeout", type=float, default=600.0,
                  help="abort a child if one call runs longer (s; 0 disables)")
  ap.add_argument("--child-timeout", type=float, default=7200.0,
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
  try:
    args.inverse_every = sorted({int(k) for k in str(args.inverse_every).split(",") if k})
  except ValueError:
    ap.error("--inverse-every takes comma-separated integers")
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  for m in modes:
    if m not in MODES:
      ap.error(f"unknown mode {m!r}; choose from {list(MODES)}")
  args.modes = [m for m in MODES if m in modes]
  if not args.modes:
    ap.error("--modes: name at least one of replicated, split")
  for d in args.devices:
    if d < 1 or args.batch % d:
      ap.error(f"the batch {args.batch} must split evenly over {d} devices")
  if args.rounds < 1 or args.steps < 1 or not args.inverse_every or min(args.inverse_every) < 1:
    ap.error("--rounds, --steps and --inverse-every must be >= 1")
  return args


def _child_argv(args) -> list[str]:
  rest = ["--optimizers", ",".join(args.optimizers), "--batch", str(args.batch),
          "--rounds", str(args.rounds), "--steps", str(args.steps),
          "--inverse-every", ",".join(map(str, args.inverse_every)),
          "--modes", ",".join(args.modes),
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
  ok = [r for r in runs if "failed" not in r]
  widths = ok[0]["widths"] if ok else list(QUICK_WIDTHS if args.quick else WIDTHS)
  summary = summarize(runs, widths, args)
  text = report(summary) if ok else "every device count failed"
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
    if png and ok:
      plot(summary, png)
      print(f"wrote {png}", file=sys.stderr)
  if summary["failed"]:
    raise SystemExit("failed: " + "; ".join(f"{f['devices']} device(s): {f['why']}"
                                            for f in summary["failed"]))
  return record


if __name__ == "__main__":
  main()
