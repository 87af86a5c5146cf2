"""Compile time of the full jitted training step, per optimizer, against Adam's.

For SGD-momentum, Adam, Eva, Eva-f, K-FAC, FOOF, Shampoo and Eva-s, the training
step that benchmarks/step_time.py times (gradient function, ``tx.update``,
``optax.apply_updates``; params and state donated) is lowered and compiled
for abstract arguments (``jax.ShapeDtypeStruct``: nothing runs) on two models:

* ``transformer``: a decoder like Flax's lm1b example, the project's
  ``examples/char_gpt.CharGPT`` unscanned: token and position embeddings, 4
  pre-LayerNorm blocks (bias-free ``nn.MultiHeadDotProductAttention``, 8 heads;
  GELU MLP of 4 x the width), a final LayerNorm and a bias-free head; width
  512, vocabulary 4096, context 128, batch 8 (lm1b: width 512, 8 heads, MLP
  2048, 6 layers, 32k vocabulary; compile time hardly depends on the sizes,
  and this fits a 2-core machine). Every preconditioner gets the capture's
  ``eva_optax.layer_views``.
* ``autoencoder``: 784-1000-500-250-30-250-500-1000-784 (ReLU, MSE), batch 1000.

Per model and optimizer: the **median of ``--repeats`` fresh compiles** (JAX's
caches cleared before each, or with ``--isolation process`` each in its own
process), of ``.lower()`` (trace + StableHLO) and ``.compile()`` (XLA), on
process CPU time (XLA compiles on several threads) and wall time, and the
sizes of both programs (instructions). Ratios are against Adam's median. The targets
checked: Eva at most 2x Adam, K-FAC and Shampoo at most 2.5x (on CPU time).

The capture's share: the same measurement for the gradient function alone,
``jax.value_and_grad`` against ``eva_optax.value_and_grad`` with
``statistics="vectors"`` (Eva, Eva-f) and ``"factors"`` (K-FAC, FOOF).

Each (model, optimizer) compiles in its own process (``--child``), after one
small warm-up compile, so that no measurement inherits another's caches.

Usage::

  python benchmarks/compile_time.py              # both models (~10-15 min, 2 quiet cores)
  python benchmarks/compile_time.py --quick      # smoke test: tiny models, 1 compile each
  python benchmarks/compile_time.py --models transformer --optimizers adam,eva,kfac

Writes ``benchmarks/results/compile_time.json`` (with provenance).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # see benchmarks/README.md

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "compile_time.json")

# name -> (label, statistics mode of its gradient function or None)
OPTIMIZERS = {
    "sgd": ("SGD", None),
    "adam": ("Adam", None),
    "eva": ("Eva", "vectors"),
    "eva_f": ("Eva-f", "vectors"),
    "kfac": ("K-FAC", "factors"),
    "foof": ("FOOF", "factors"),
    "shampoo": ("Shampoo", None),
    "eva_s": ("Eva-s", None),
}
# The gradient function alone: name -> (label, statistics mode or None).
CAPTURE = {
    "grad": ("jax.value_and_grad", None),
    "capture_vectors": ("eva_optax.value_and_grad, vectors", "vectors"),
    "capture_factors": ("eva_optax.value_and_grad, factors", "factors"),
}
MODELS = ("transformer", "autoencoder")
TARGETS = {"eva": 2.0, "kfac": 2.5, "shampoo": 2.5}   # step compile / Adam's (CPU)
TRANSFORMER = {"vocab": 4096, "context": 128, "width": 512, "layers": 4, "heads": 8,
               "batch": 8}
QUICK_TRANSFORMER = {"vocab": 64, "context": 16, "width": 32, "layers": 2, "heads": 2,
                     "batch": 4}
AE_WIDTHS = (1000, 500, 250, 30, 250, 500, 1000, 784)
QUICK_AE_WIDTHS = (32, 8, 32, 64)


# ----------------------------------------------------------------------------
# One (model, item) in a child process.


def _problem(model_name: str, quick: bool):
  """``(loss_fn, params, x, y, description)``, params and batch abstract."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  import benchlib  # pylint: disable=g-import-not-at-top
  from benchlib import problems  # pylint: disable=g-import-not-at-top

  if model_name == "transformer":
    benchlib.add_examples_to_path()
    from char_gpt import CharGPT, lm_loss  # pylint: disable=g-import-not-at-top
    c = QUICK_TRANSFORMER if quick else TRANSFORMER
    model = CharGPT(vocab=c["vocab"], context=c["context"], width=c["width"],
                    layers=c["layers"], heads=c["heads"], scan=False)
    x = jax.ShapeDtypeStruct((c["batch"], c["context"]), jnp.int32)
    y = x
    loss_fn = lm_loss(model)
    desc = (f"decoder: {c['layers']} unscanned pre-LN blocks, width {c['width']}, "
            f"{c['heads']} heads, MLP {4 * c['width']}, vocabulary {c['vocab']}, "
            f"context {c['context']}, batch {c['batch']}")
  elif model_name == "autoencoder":
    widths = QUICK_AE_WIDTHS if quick else AE_WIDTHS
    model = problems.Autoencoder(widths=widths)
    batch = 64 if quick else 1000
    x = jax.ShapeDtypeStruct((batch, widths[-1]), jnp.float32)
    y = x

    def loss_fn(params, x, y):
      return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    desc = (f"autoencoder {widths[-1]}-" + "-".join(map(str, widths))
            + f" (ReLU, MSE), batch {batch}")
  else:
    raise ValueError(f"unknown model {model_name!r}; choose from {MODELS}")
  params = jax.eval_shape(
      lambda k, x: model.init(k, x)["params"], jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype))
  return loss_fn, params, x, y, desc


def _concrete(tree):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


def run_child(args) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import eva_optax  # pylint: disable=g-import-not-at-top
  from benchlib import compile_stats  # pylint: disable=g-import-not-at-top
  from benchlib import optimizers as bopt  # pylint: disable=g-import-not-at-top

  compile_stats.check_no_persistent_cache()
  if jax.config.jax_compilation_cache_dir:
    raise SystemExit("the persistent compilation cache is on (jax_compilation_cache_dir)")
  model_name, item = args.child
  loss_fn, params, x, y, desc = _problem(model_name, args.quick)
  compile_stats.warm_up_backend()

  if item in CAPTURE:
    mode = CAPTURE[item][1]

    def build():
      return jax.jit(bopt.gradient_fn(loss_fn, mode))

    call_args = (params, x, y)
    views = None
  else:
    mode = OPTIMIZERS[item][1]
    views = None
    if item not in ("sgd", "adam"):
      # The capture's shape-only pass (setup, not timed), on concrete zeros
      # where it needs arrays.
      try:
        views = eva_optax.layer_views(loss_fn, params, x, y)
      except Exception:  # pylint: disable=broad-except
        views = eva_optax.layer_views(loss_fn, _concrete(params), _concrete(x),
                                      _concrete(y))
    k = args.inverse_every
    tx = {"sgd": lambda: optax.sgd(0.01, momentum=0.9),
          "adam": lambda: optax.adam(1e-3),
          "eva": lambda: eva_optax.eva(0.01, layer_views=views),
          "eva_f": lambda: eva_optax.eva_f(0.01, layer_views=views),
          "eva_s": lambda: eva_optax.eva_s(0.01, layer_views=views),
          "kfac": lambda: eva_optax.kfac(0.01, inverse_every=k, layer_views=views),
          "foof": lambda: eva_optax.foof(0.01, inverse_every=k, layer_views=views),
          "shampoo": lambda: eva_optax.shampoo(0.01, inverse_every=k, layer_views=views),
          }[item]()
    opt_state = jax.eval_shape(tx.init, params)

    def build():
      return bopt.make_step(tx, loss_fn, mode)

    call_args = (params, opt_state, x, y)
  runs = []
  for i in range(args.repeats):
    m = compile_stats.fresh(build, *call_args)
    runs.append(m)
    print(f"    {model_name} {item} compile {i + 1}/{args.repeats}: "
          f"{m['total_s']:.2f} s ({m['total_cpu_s']:.2f} s CPU; lower "
          f"{m['lower_s']:.2f} s), {m['hlo_instructions']} HLO instructions",
          file=sys.stderr, flush=True)
  sources = None
  if not args.no_sources:   # one more lowering, not timed, with locations
    sources = compile_stats.stablehlo_by_source(
        build().lower(*call_args).as_text(debug_info=True))
  return {"model": model_name, "item": item, "description": desc, "runs": runs,
          "layer_views": views is not None, "sources": sources}


# ----------------------------------------------------------------------------
# The parent.


def _env(args) -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS") or "cpu"
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get(
      "PYTHONPATH", "").split(os.pathsep) if p])
  if args.quick:   # a smoke test: the fast-compile flags this jaxlib accepts
    import benchlib  # pylint: disable=g-import-not-at-top
    benchlib.add_examples_to_path()
    from harness import xla_flags  # pylint: disable=g-import-not-at-top
    env["XLA_FLAGS"] = xla_flags.with_fast_compile(env.get("XLA_FLAGS", ""))
  return env


def launch(model: str, item: str, repeats: int, args) -> dict[str, Any]:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", model, item,
         "--repeats", str(repeats), "--inverse-every", str(args.inverse_every)]
  cmd += ["--quick"] if args.quick else []
  cmd += ["--no-sources"] if args.no_sources else []
  try:
    proc = subprocess.run(cmd, env=_env(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=args.child_timeout)
  except subprocess.TimeoutExpired:
    return {"model": model, "item": item, "failed": f"killed after {args.child_timeout} s"}
  sys.stderr.write(proc.stderr)
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0 or not lines:
    return {"model": model, "item": item, "failed": f"exit status {proc.returncode}",
            "stderr_tail": proc.stderr[-4000:]}
  return json.loads(lines[-1])


def measure_item(model: str, item: str, args) -> dict[str, Any]:
  """All repeats of one (model, item): one process, or one process per repeat."""
  if args.isolation == "cache":
    return launch(model, item, args.repeats, args)
  out: dict[str, Any] | None = None
  for _ in range(args.repeats):
    r = launch(model, item, 1, args)
    if "failed" in r:
      return r
    if out is None:
      out = r
    else:
      out["runs"] += r["runs"]
  return out


COUNTS = ("hlo_instructions", "stablehlo_ops")   # the same every compile
KEYS = ("total_cpu_s", "total_s", "lower_cpu_s", "lower_s", "compile_cpu_s", "compile_s",
        "hlo_instructions", "stablehlo_ops")


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
  """Medians per (model, item); ratios to Adam's and to jax.value_and_grad's."""
  models: dict[str, Any] = {}
  for r in results:
    m = models.setdefault(r["model"], {"items": {}, "description": r.get("description")})
    if "failed" in r:
      m["items"][r["item"]] = {"failed": r["failed"]}
      continue
    m["description"] = r["description"]
    m["items"][r["item"]] = {
        k: (statistics.median_low if k in COUNTS else statistics.median)(
            [x[k] for x in r["runs"]]) for k in KEYS}
    m["items"][r["item"]]["repeats"] = len(r["runs"])
    if r.get("sources"):
      m["items"][r["item"]]["sources"] = r["sources"]
  for m in models.values():
    items = m["items"]
    for ref_name, names in (("adam", OPTIMIZERS), ("grad", CAPTURE)):
      ref = items.get(ref_name)
      if not ref or "failed" in ref:
        continue
      for n in names:
        it = items.get(n)
        if it and "failed" not in it:
          it["vs"] = ref_name
          it["cpu_ratio"] = it["total_cpu_s"] / ref["total_cpu_s"]
          it["wall_ratio"] = it["total_s"] / ref["total_s"]
          it["hlo_ratio"] = it["hlo_instructions"] / ref["hlo_instructions"]
    m["targets"] = {n: {"limit": lim, "ratio": items[n]["cpu_ratio"],
                        "met": items[n]["cpu_ratio"] <= lim}
                    for n, lim in TARGETS.items()
                    if n in items and "cpu_ratio" in items[n]}
    # The capture's share of a step's extra compile time over Adam's.
    share = {}
    for step, cap in (("eva", "capture_vectors"), ("kfac", "capture_factors")):
      s, c, a, g = (items.get(n) for n in (step, cap, "adam", "grad"))
      if all(v and "failed" not in v for v in (s, c, a, g)):
        extra_step = s["total_cpu_s"] - a["total_cpu_s"]
        extra_cap = c["total_cpu_s"] - g["total_cpu_s"]
        share[step] = {"capture_extra_cpu_s": extra_cap, "step_extra_cpu_s": extra_step,
                       "share": extra_cap / extra_step if extra_step > 0 else None}
    m["capture_share"] = share
  return {"models": models, "targets": TARGETS}


def report(summary: dict[str, Any]) -> str:
  out = []
  labels = {**{k: v[0] for k, v in OPTIMIZERS.items()},
            **{k: v[0] for k, v in CAPTURE.items()}}
  for model, m in summary["models"].items():
    items = m["items"]
    out += [f"{model}: {m['description']}. Median of fresh compiles; lower = trace + "
            "StableHLO, compile = XLA; ratios on CPU time (wall in brackets) against "
            "Adam's (the gradient functions against jax.value_and_grad's):", "",
            "| step of | lower + compile s CPU (wall) | lower s CPU | compile s CPU | "
            "/ Adam's | HLO instructions | / Adam's | StableHLO ops |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n in list(OPTIMIZERS) + list(CAPTURE):
      it = items.get(n)
      if it is None:
        continue
      if "failed" in it:
        out.append(f"| {labels[n]} | failed: {it['failed']} | | | | | | |")
        continue
      ratio = "-" if "cpu_ratio" not in it else (
          f"{it['cpu_ratio']:.2f} ({it['wall_ratio']:.2f})")
      hr = "-" if "hlo_ratio" not in it else f"{it['hlo_ratio']:.2f}"
      out.append(f"| {labels[n]} | {it['total_cpu_s']:.2f} ({it['total_s']:.2f}) | "
                 f"{it['lower_cpu_s']:.2f} | {it['compile_cpu_s']:.2f} | {ratio} | "
                 f"{it['hlo_instructions']} | {hr} | {it['stablehlo_ops']} |")
    if m.get("targets"):
      out += ["", "Targets (step compile CPU time / Adam's): " + "; ".join(
          f"{labels[n]} {t['ratio']:.2f} <= {t['limit']:g}: "
          + ("met" if t["met"] else "NOT met") for n, t in m["targets"].items()) + "."]
    for step, s in m.get("capture_share", {}).items():
      share = "-" if s["share"] is None else f"{100 * s['share']:.0f}%"
      out.append(f"The capture ({'vectors' if step == 'eva' else 'factors'}) adds "
                 f"{s['capture_extra_cpu_s']:.2f} s CPU to jax.value_and_grad's compile; "
                 f"{labels[step]}'s step adds {s['step_extra_cpu_s']:.2f} s to Adam's: "
                 f"the capture's share {share}.")
    big = [n for n in ("eva", "kfac", "shampoo") if items.get(n, {}).get("sources")]
    if big:
      out.append("StableHLO operations by eva_optax source file (the largest three; "
                 "the rest of the program under '(elsewhere)'):")
      for n in big:
        src = items[n]["sources"]
        files = [(f, c) for f, c in src["by_file"].items() if f != "(elsewhere)"][:3]
        out.append(f"* {labels[n]}: {src['ops']} ops; " + ", ".join(
            f"{f} {c}" for f, c in files) + f"; elsewhere {src['by_file'].get('(elsewhere)', 0)}.")
    out.append("")
  return "\n".join(out).rstrip()


def parser() -> argparse.ArgumentParser:
  """The command line (every flag with its help and default)."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--models", default=",".join(MODELS),
                  help=f"subset of {','.join(MODELS)}")
  ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                  help=f"subset of {','.join(OPTIMIZERS)} (adam is always added: the "
                  "reference)")
  ap.add_argument("--no-capture", action="store_true",
                  help="skip the gradient functions alone (the capture's share)")
  ap.add_argument("--repeats", type=int, default=None,
                  help="fresh compiles per model and optimizer; the median is "
                  "reported (default 3; --quick: 1)")
  ap.add_argument("--isolation", choices=("cache", "process"), default="cache",
                  help="cache: the repeats in one process, JAX's caches cleared "
                  "before each; process: each repeat in a fresh process")
  ap.add_argument("--inverse-every", type=int, default=10,
                  help="K-FAC's, FOOF's and Shampoo's refresh period (the refresh "
                  "is compiled either way)")
  ap.add_argument("--quick", action="store_true",
                  help="smoke test: tiny models, 1 compile each, fast-compile XLA "
                  "flags (the times mean nothing)")
  ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output ('' for none)")
  ap.add_argument("--no-sources", action="store_true",
                  help="skip charging the StableHLO operations to eva_optax's source "
                  "lines (one extra lowering per optimizer, not timed)")
  ap.add_argument("--child-timeout", type=float, default=1800.0,
                  help="seconds allowed for one (model, optimizer) process")
  ap.add_argument("--child", nargs=2, default=None, metavar=("MODEL", "ITEM"),
                  help="internal: measure one model and optimizer in this process")
  return ap


def parse_args(argv=None):
  ap = parser()
  args = ap.parse_args(argv)
  args.repeats = args.repeats or (1 if args.quick else 3)
  if args.repeats < 1 or args.inverse_every < 1:
    ap.error("--repeats and --inverse-every must be >= 1")
  if args.child is not None:
    return args
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
  for m in models:
    if m not in MODELS:
      ap.error(f"unknown model {m!r}; choose from {list(MODELS)}")
  for s in names:
    if s not in OPTIMIZERS:
      ap.error(f"unknown optimizer {s!r}; choose from {list(OPTIMIZERS)}")
  args.models = [m for m in MODELS if m in models]
  args.optimizers = [s for s in OPTIMIZERS if s in names or s == "adam"]
  args.items = list(args.optimizers)
  if not args.no_capture:
    args.items += [c for c in CAPTURE
                   if c == "grad"
                   or ("vectors" in c and {"eva", "eva_f"} & set(names))
                   or ("factors" in c and {"kfac", "foof"} & set(names))]
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.child is not None:
    result = run_child(args)
    print(json.dumps(result), flush=True)
    return result
  t0 = time.perf_counter()
  results = []
  for model in args.models:
    for item in args.items:
      print(f"== {model}: {item}", file=sys.stderr, flush=True)
      results.append(measure_item(model, item, args))
  summary = summarize(results)
  text = report(summary)
  print(text)
  sys.path.insert(0, os.path.join(ROOT, "examples"))
  from harness import provenance  # pylint: disable=g-import-not-at-top
  record = {"config": {k: v for k, v in vars(args).items() if k != "child"},
            "provenance": provenance.collect(argv), "summary": summary,
            "results": results, "table": text, "seconds": time.perf_counter() - t0}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
    print(f"\nwrote {args.out}", file=sys.stderr)
  failed = [r for r in results if "failed" in r]
  if failed:
    raise SystemExit("failed: " + "; ".join(f"{r['model']} {r['item']}: {r['failed']}"
                                            for r in failed))
  return record


if __name__ == "__main__":
  main()
