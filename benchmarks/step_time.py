"""Step time and optimizer-state memory of the Eva family against SGD and Adam.

Measures, in one process and on whatever device JAX picks, the jitted *full*
training step (forward, backward, statistics, optimizer update, apply) of

  SGD-momentum, Adam, Eva, Eva-f, Eva-s, K-FAC, FOOF and Shampoo
  (K-FAC, FOOF and Shampoo with ``inverse_every`` 1 and 10)

on two models:

  * ``autoencoder``: the deep autoencoder 784-1000-500-250-30-250-500-1000-784
    (ReLU, MSE reconstruction loss), batch 1000;
  * ``cnn``: Conv(32, 3x3) - ReLU - maxpool 2 - Conv(64, 3x3) - ReLU - maxpool 2 -
    Dense(128) - ReLU - Dense(10), softmax cross-entropy, 28x28x1 inputs, batch 128.

Data is random (timings do not depend on it); the steps cycle through 8 fixed
batches. Every number is reported as a ratio against SGD-momentum (and Adam)
measured in the same process, because the machines this runs on are shared and
noisy; absolute milliseconds are printed too but are not comparable across runs.

How it is measured
------------------
* Each optimizer gets its own copy of the parameters; the step is
  ``jax.jit(step, donate_argnums=(0, 1))`` (params and optimizer state are donated,
  so XLA may update them in place), and every call is followed by
  ``jax.block_until_ready`` on its outputs. SGD, Adam, Eva-s and Shampoo use plain
  ``jax.value_and_grad``; Eva and Eva-f ``eva_optax.value_and_grad(...,
  statistics="vectors")``; K-FAC and FOOF ``statistics="factors"``. Defaults of
  every optimizer are the library's (learning rates: SGD and the Eva family 0.01,
  Adam 1e-3; they do not change the cost).
* Warm-up: compile, then run one full refresh period (at least 2 steps).
* The optimizers are interleaved: ``--rounds`` rounds, each running every optimizer
  for a window of ``--steps`` consecutive steps (the order rotates per round). The
  per-round figure is the **median** step time of the window for methods that do
  the same work every step, and the **mean per step over whole refresh periods**
  for ``inverse_every=k > 1`` (the window is rounded up to a multiple of ``k``, at
  least ``k`` steps): a median would hide the one expensive refresh step per
  period, the mean amortizes it as a training run pays it.
* ``step ms`` is the median over rounds of the per-round figures. The ratios are
  *paired*: the median over rounds of (this optimizer's per-round figure / the
  reference's figure in the same round), which cancels slow drifts of the load.
* ``CPU-time ratio vs SGD``: the same paired ratio on the process CPU time
  (``time.process_time``, all threads) instead of wall time. Time slices taken
  by other processes do not count in it, so on a loaded shared machine it is the
  steadier measure of the work a step does (XLA's idle workers sleep rather than
  spin for long, so waiting adds little to it). ``round spread`` is
  (max - min) / median of the per-round wall figures: a quick noise gauge.
* State memory is the sum of ``nbytes`` over the leaves of ``opt_state``; the
  ratio column divides by SGD-momentum's state (its momentum buffer, one copy of
  the parameters). For Eva and Eva-f the extra state beyond that buffer is
  checked against the analytic ``sum over layers of (d_in + 1 + d_out)``
  (``d_in + 1`` for Eva-f) plus three int32 counters.
* Diagnostic ``cos(dir, g)``: after the timed steps, the cosine (over all
  parameters together) between the optimizer's *direction before momentum and
  learning rate* and the raw gradient, at the final parameters. It is computed
  with the same optimizer built with ``momentum=0`` and ``learning_rate=1``,
  starting from the timed run's preconditioner state (the first element of the
  chain); for SGD it is 1 by construction. Near 1 means the curvature only
  rescaled the step; lower means it turned the direction (see README.md, "What
  the curvature does at the paper's scale").
* A breakdown times the pieces of the SGD and Eva steps separately (gradient
  alone, gradient plus statistics, update plus apply alone, full steps), to
  locate any extra time Eva spends.
* ``OPENBLAS_NUM_THREADS`` defaults to 1 (see below) and a watchdog aborts with
  exit status 3 and all thread stacks if one call runs longer than
  ``--hang-timeout`` seconds (a deadlocked XLA call cannot be interrupted).

Usage::

  python benchmarks/step_time.py                    # full run, both models
  python benchmarks/step_time.py --quick            # smoke test (tiny, ~2 min)
  python benchmarks/step_time.py --models cnn --optimizers sgd,adam,eva \\
      --rounds 7 --steps 20 --out results/cnn.json
"""

from __future__ import annotations

import os

# LAPACK (K-FAC's Cholesky, FOOF's and Shampoo's eigh) runs through the
# OpenBLAS bundled with scipy. Its own threads busy-wait against XLA's threads
# and, on a small shared machine, make a 128x128 eigh ~150x slower (measured
# here on 2 cores: 116 ms vs 0.7 ms; 1000x1000: 8.4 s vs 72 ms). SGD, Adam and
# the Eva family never call LAPACK. Set before numpy loads; an explicit value in
# the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import dataclasses
import faulthandler
import json
import math
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eva_optax


# ----------------------------------------------------------------------------
# Models.


class Autoencoder(nn.Module):
  """Dense autoencoder; ReLU after every layer but the last."""

  widths: tuple[int, ...] = (1000, 500, 250, 30, 250, 500, 1000, 784)

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.Dense(w)(x)
      if i < len(self.widths) - 1:
        x = nn.relu(x)
    return x


class SmallCNN(nn.Module):
  """Two 3x3 convs (each ReLU + 2x2 max-pool), then two dense layers."""

  channels: tuple[int, int] = (32, 64)
  hidden: int = 128
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.Conv(c, (3, 3), padding="SAME")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.classes)(x)


# Steps cycle through a few fixed random batches (same shapes, no recompiles), so
# the models do not simply memorise one batch before the diagnostic is taken.
N_BATCHES = 8


@dataclasses.dataclass
class Problem:
  name: str
  description: str
  model: nn.Module
  loss_fn: Callable[..., Any]   # (params, x, y) -> scalar mean loss
  params: Any
  xs: list[jax.Array]           # N_BATCHES batches, already on the device
  ys: list[jax.Array]
  batch: int
  i: int = 0

  def next_batch(self):
    self.i = (self.i + 1) % len(self.xs)
    return self.xs[self.i], self.ys[self.i]

  @property
  def x(self):
    return self.xs[0]

  @property
  def y(self):
    return self.ys[0]


def make_problem(name: str, quick: bool, seed: int = 0) -> Problem:
  key_p, key_x, key_y = jax.random.split(jax.random.PRNGKey(seed), 3)
  if name == "autoencoder":
    widths = (64, 32, 16, 8, 16, 32, 64, 784) if quick else Autoencoder.widths
    batch = 64 if quick else 1000
    model = Autoencoder(widths=widths)
    x = jax.random.uniform(key_x, (N_BATCHES, batch, 784), jnp.float32)
    y = x

    def loss_fn(params, x, y):
      return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    desc = ("autoencoder 784-" + "-".join(map(str, widths))
            + f" (ReLU, MSE), batch {batch}")
  elif name == "cnn":
    channels, hidden = ((8, 16), 32) if quick else ((32, 64), 128)
    batch = 16 if quick else 128
    model = SmallCNN(channels=channels, hidden=hidden)
    x = jax.random.normal(key_x, (N_BATCHES, batch, 28, 28, 1), jnp.float32)
    y = jax.random.randint(key_y, (N_BATCHES, batch), 0, 10)

    def loss_fn(params, x, y):
      logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    desc = (f"CNN conv{channels[0]}-pool-conv{channels[1]}-pool-dense{hidden}-"
            f"dense10 on 28x28x1 (softmax CE), batch {batch}")
  else:
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}.")
  params = model.init(key_p, x[0, :1])["params"]
  return Problem(name, desc, model, loss_fn, params,
                 [x[i] for i in range(N_BATCHES)], [y[i] for i in range(N_BATCHES)],
                 batch)


MODELS = ("autoencoder", "cnn")


# ----------------------------------------------------------------------------
# Optimizers.


@dataclasses.dataclass(frozen=True)
class OptSpec:
  name: str
  label: str
  factory: Callable[..., Any]          # (learning_rate, momentum) -> tx
  statistics: str | None               # None: plain jax.value_and_grad
  period: int = 1                      # refresh period (inverse_every)
  eva_family: bool = True              # chain built by eva_optax.training_chain
  lr: float = 0.01
  requires: str = ""                   # eva_optax attribute it needs


def _sgd(lr, momentum=0.9):
  return optax.sgd(lr, momentum=momentum or None)


def _adam(lr, momentum=None):
  del momentum
  return optax.adam(lr)


def _eo(name, **kw):
  def factory(lr, momentum=0.9):
    return getattr(eva_optax, name)(lr, momentum=momentum, **kw)
  return factory


OPTIMIZERS: tuple[OptSpec, ...] = (
    OptSpec("sgd", "SGD-momentum", _sgd, None, eva_family=False),
    OptSpec("adam", "Adam", _adam, None, eva_family=False, lr=1e-3),
    OptSpec("eva", "Eva", _eo("eva"), "vectors", requires="eva"),
    OptSpec("eva_f", "Eva-f", _eo("eva_f"), "vectors", requires="eva_f"),
    OptSpec("eva_s", "Eva-s", _eo("eva_s"), None, requires="eva_s"),
    OptSpec("kfac_1", "K-FAC (k=1)", _eo("kfac", inverse_every=1), "factors",
            requires="kfac"),
    OptSpec("kfac_10", "K-FAC (k=10)", _eo("kfac", inverse_every=10), "factors",
            period=10, requires="kfac"),
    OptSpec("foof_1", "FOOF (k=1)", _eo("foof", inverse_every=1), "factors",
            requires="foof"),
    OptSpec("foof_10", "FOOF (k=10)", _eo("foof", inverse_every=10), "factors",
            period=10, requires="foof"),
    OptSpec("shampoo_1", "Shampoo (k=1)", _eo("shampoo", inverse_every=1), None,
            requires="shampoo"),
    OptSpec("shampoo_10", "Shampoo (k=10)", _eo("shampoo", inverse_every=10),
            None, period=10, requires="shampoo"),
)
BY_NAME = {o.name: o for o in OPTIMIZERS}


def available(spec: OptSpec) -> bool:
  return not spec.requires or hasattr(eva_optax, spec.requires)


# ----------------------------------------------------------------------------
# Steps.


def gradient_fn(loss_fn, statistics_mode):
  """(params, x, y) -> (loss, grads, stats or None)."""
  if statistics_mode is None:
    vg = jax.value_and_grad(loss_fn)

    def fn(params, x, y):
      loss, grads = vg(params, x, y)
      return loss, grads, None
    return fn
  return eva_optax.value_and_grad(loss_fn, statistics=statistics_mode)


def make_step(tx, loss_fn, statistics_mode):
  """The jitted full step; params and opt_state are donated."""
  grad_fn = gradient_fn(loss_fn, statistics_mode)

  def step(params, opt_state, x, y):
    loss, grads, stats = grad_fn(params, x, y)
    if stats is None:
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def copy_tree(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def aliased_leaves(tree) -> int:
  """How many leaves of ``tree`` are the same array object as an earlier leaf."""
  leaves = jax.tree.leaves(tree)
  return len(leaves) - len({id(l) for l in leaves})


def tree_nbytes(tree) -> int:
  return int(sum(np.asarray(l).nbytes if not hasattr(l, "nbytes") else l.nbytes
                 for l in jax.tree.leaves(tree)))


def tree_size(tree) -> int:
  return int(sum(np.size(l) for l in jax.tree.leaves(tree)))


class Watchdog:
  """Exits loudly if one call runs longer than ``timeout`` seconds.

  A hung XLA execution cannot be interrupted from Python; without this a
  deadlocked step (see the README: jaxlib's batched eigh on a 2-core CPU) would
  hang the benchmark silently.
  """

  def __init__(self):
    self.timeout = 0.0
    self.current: tuple[str, float] | None = None
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()

  def _loop(self):
    while True:
      time.sleep(1.0)
      cur = self.current
      if cur and self.timeout and time.perf_counter() - cur[1] > self.timeout:
        print(f"\nWATCHDOG: one call of {cur[0]!r} has run for more than "
              f"{self.timeout:.0f} s; it is most likely deadlocked (the CPU is "
              "idle). Stacks follow; exiting with status 3.", file=sys.stderr,
              flush=True)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(3)


WATCHDOG = Watchdog()


class Runner:
  """One timed thing: ``window(n)`` runs n blocking calls, returns their times."""

  def __init__(self, name: str, call: Callable[[], Any], period: int = 1):
    self.name = name
    self.call = call
    self.period = period

  def window(self, n: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU seconds of n consecutive blocking calls."""
    times, cpu = [], []
    for _ in range(n):
      c0, t0 = time.process_time(), time.perf_counter()
      WATCHDOG.current = (self.name, t0)
      out = self.call()
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
      WATCHDOG.current = None
      cpu.append(time.process_time() - c0)
    return times, cpu


class StepRunner(Runner):
  """A training step that threads (donated) params and opt_state through."""

  def __init__(self, spec: OptSpec, problem: Problem):
    self.spec = spec
    self.problem = problem
    self.tx = spec.factory(spec.lr)
    self.params = copy_tree(problem.params)
    opt_state = self.tx.init(self.params)
    # Donation needs distinct buffers; an init that reuses one array for
    # several leaves (e.g. one zero for several counters) cannot be donated as
    # is. Record it (a finding for the library) and donate a copy.
    self.aliased_leaves = aliased_leaves(opt_state)
    self.opt_state = copy_tree(opt_state)
    self.state_bytes = tree_nbytes(self.opt_state)
    self.state_numbers = tree_size(self.opt_state)
    self.step = make_step(self.tx, problem.loss_fn, spec.statistics)
    self.loss = float("nan")
    super().__init__(spec.name, self._call, spec.period)

  def _call(self):
    x, y = self.problem.next_batch()
    self.params, self.opt_state, self.loss = self.step(
        self.params, self.opt_state, x, y)
    return self.params, self.opt_state, self.loss


def paired_ratio(t: dict[str, Any], ref: dict[str, Any],
                 key: str = "per_round_s") -> float:
  """Median over rounds of the per-round ratio ``t / ref`` (paired by round).

  Pairing by round cancels most of the slow drift of a shared machine's load:
  the two windows of a round run back to back.
  """
  return statistics.median(a / b for a, b in zip(t[key], ref[key]))


def per_round_figure(times: list[float], period: int) -> float:
  """Median of the window (period 1) or mean per step over whole periods."""
  if period == 1:
    return statistics.median(times)
  return sum(times) / len(times)


def window_length(steps: int, period: int) -> int:
  return max(period, int(math.ceil(steps / period)) * period)


def time_interleaved(runners: list[Runner], rounds: int, steps: int,
                     log=print) -> dict[str, dict[str, Any]]:
  """Warm up every runner, then interleave them over rounds (rotating order)."""
  for r in runners:
    t0 = time.perf_counter()
    r.window(window_length(2, r.period))   # compile + one full period
    log(f"    warm-up {r.name}: {time.perf_counter() - t0:.1f}s")
  per_round: dict[str, list[float]] = {r.name: [] for r in runners}
  per_round_cpu: dict[str, list[float]] = {r.name: [] for r in runners}
  all_times: dict[str, list[float]] = {r.name: [] for r in runners}
  for i in range(rounds):
    k = i % len(runners)
    for r in runners[k:] + runners[:k]:
      times, cpu = r.window(window_length(steps, r.period))
      per_round[r.name].append(per_round_figure(times, r.period))
      per_round_cpu[r.name].append(per_round_figure(cpu, r.period))
      all_times[r.name].extend(times)
    log(f"    round {i + 1}/{rounds} done (load {os.getloadavg()[0]:.1f})")
  out = {}
  for r in runners:
    pr = per_round[r.name]
    out[r.name] = {
        "step_s": statistics.median(pr),
        "statistic": "median" if r.period == 1 else f"mean over periods of {r.period}",
        "per_round_s": pr,
        "round_spread": (max(pr) - min(pr)) / statistics.median(pr),
        "cpu_s": statistics.median(per_round_cpu[r.name]),
        "per_round_cpu_s": per_round_cpu[r.name],
        "all_steps_mean_s": statistics.fmean(all_times[r.name]),
        "all_steps_median_s": statistics.median(all_times[r.name]),
        "steps_timed": len(all_times[r.name]),
    }
  return out


# ----------------------------------------------------------------------------
# Diagnostics.


def direction_cosine(spec: OptSpec, runner: StepRunner, problem: Problem) -> float | None:
  """cos(direction before momentum and lr, raw gradient) at the final params."""
  params = runner.params
  grad_fn = gradient_fn(problem.loss_fn, spec.statistics)
  if spec.name == "sgd":
    return 1.0   # the plain gradient by construction
  tx = spec.factory(1.0, momentum=0.0) if spec.eva_family else spec.factory(1.0)
  state = tx.init(params)
  first = runner.opt_state[0]
  if (jax.tree.structure(state[0]) != jax.tree.structure(first)):
    return None
  state = (first,) + tuple(state[1:])

  @jax.jit
  def fn(params, state, x, y):
    _, grads, stats = grad_fn(params, x, y)
    kw = {} if stats is None else {"stats": stats}
    updates, _ = tx.update(grads, state, params, **kw)
    g = jnp.concatenate([l.ravel() for l in jax.tree.leaves(grads)])
    d = -jnp.concatenate([l.ravel() for l in jax.tree.leaves(updates)])
    return jnp.vdot(d, g) / (jnp.linalg.norm(d) * jnp.linalg.norm(g))

  return float(fn(params, state, problem.x, problem.y))


def layer_dims(params) -> list[tuple[str, int, int, bool]]:
  """(path, d_in, d_out, has_bias) of every module with a kernel."""
  out = []

  def walk(node, path):
    if isinstance(node, dict) or hasattr(node, "keys"):
      if "kernel" in node and getattr(node["kernel"], "ndim", 0) >= 2:
        k = node["kernel"]
        has_bias = "bias" in node
        d_out = node["bias"].size if has_bias else k.shape[-1]
        out.append(("/".join(path), k.size // d_out, d_out, has_bias))
        return
      for key in node:
        walk(node[key], path + (str(key),))

  walk(params, ())
  return out


def eva_state_report(problem: Problem, sgd_numbers: int, eva_numbers: int | None,
                     eva_f_numbers: int | None) -> dict[str, Any]:
  dims = layer_dims(problem.params)
  analytic_eva = sum(d_in + int(b) + d_out for _, d_in, d_out, b in dims)
  analytic_eva_f = sum(d_in + int(b) for _, d_in, _, b in dims)
  rep = {"layers": [{"path": p, "d_in": i, "d_out": o, "bias": b}
                    for p, i, o, b in dims],
         "n_params": tree_size(problem.params),
         "sgd_state_numbers": sgd_numbers,
         "analytic_eva_extra": analytic_eva,
         "analytic_eva_f_extra": analytic_eva_f,
         "counters": 3}
  if eva_numbers is not None:
    rep["eva_extra_numbers"] = eva_numbers - sgd_numbers
  if eva_f_numbers is not None:
    rep["eva_f_extra_numbers"] = eva_f_numbers - sgd_numbers
  return rep


def breakdown(problem: Problem, rounds: int, steps: int, log=print) -> dict[str, Any]:
  """Times the pieces of the SGD and Eva steps (same interleaving)."""
  p = problem
  plain = jax.jit(jax.value_and_grad(p.loss_fn))
  vec = jax.jit(eva_optax.value_and_grad(p.loss_fn, statistics="vectors"))
  _, grads, stats = vec(p.params, p.x, p.y)
  grads, stats = jax.block_until_ready((grads, stats))

  def update_runner(name, tx, with_stats):
    def upd(params, opt_state, grads, stats):
      kw = {"stats": stats} if with_stats else {}
      updates, opt_state = tx.update(grads, opt_state, params, **kw)
      return optax.apply_updates(params, updates), opt_state
    upd = jax.jit(upd, donate_argnums=(0, 1))
    box = {"params": copy_tree(p.params)}
    box["state"] = copy_tree(tx.init(box["params"]))   # distinct buffers

    def call():
      box["params"], box["state"] = upd(box["params"], box["state"], grads, stats)
      return box["params"], box["state"]
    return Runner(name, call)

  runners = [
      Runner("grad: jax.value_and_grad", lambda: plain(p.params, p.x, p.y)),
      Runner("grad+stats: eva_optax.value_and_grad(vectors)",
             lambda: vec(p.params, p.x, p.y)),
      update_runner("update+apply: SGD-momentum", _sgd(0.01), False),
      update_runner("update+apply: Eva", eva_optax.eva(0.01), True),
      StepRunner(BY_NAME["sgd"], p),
      StepRunner(BY_NAME["eva"], p),
  ]
  runners[-2].name = "full step: SGD-momentum"
  runners[-1].name = "full step: Eva"
  return time_interleaved(runners, rounds, steps, log=log)


# ----------------------------------------------------------------------------
# Reporting.


def fmt_ratio(x):
  return "-" if x is None else f"{x:.3f}"


def model_table(res: dict[str, Any]) -> str:
  rows = ["| optimizer | step ms | ratio vs SGD | ratio vs Adam | state MB | "
          "state / SGD momentum buffer | cos(dir, g) | CPU-time ratio vs SGD | "
          "round spread |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in res["optimizers"].items():
    star = " *" if r["period"] > 1 else ""
    cos = "-" if r["cosine"] is None else f"{r['cosine']:.4f}"
    rows.append(
        f"| {r['label']}{star} | {1e3 * r['step_s']:.2f} | "
        f"{fmt_ratio(r.get('ratio_vs_sgd'))} | {fmt_ratio(r.get('ratio_vs_adam'))} | "
        f"{r['state_bytes'] / 2**20:.3f} | {fmt_ratio(r.get('state_ratio_vs_sgd'))} | "
        f"{cos} | {fmt_ratio(r.get('cpu_ratio_vs_sgd'))} | "
        f"{100 * r['round_spread']:.0f}% |")
  return "\n".join(rows)


def breakdown_table(bd: dict[str, Any], ref: dict[str, Any]) -> str:
  rows = ["| piece | ms (median over rounds) | / SGD full step | CPU ms | "
          "round spread |", "|---|---:|---:|---:|---:|"]
  for name, r in bd.items():
    rows.append(f"| {name} | {1e3 * r['step_s']:.2f} | {paired_ratio(r, ref):.3f} | "
                f"{1e3 * r['cpu_s']:.2f} | {100 * r['round_spread']:.0f}% |")
  return "\n".join(rows)


def run_model(name: str, specs: list[OptSpec], args, log=print) -> dict[str, Any]:
  problem = make_problem(name, args.quick)
  log(f"\n## {problem.description}")
  log(f"  parameters: {tree_size(problem.params):,}")
  runners = [StepRunner(s, problem) for s in specs]
  timings = time_interleaved(runners, args.rounds, args.steps, log=log)
  res: dict[str, Any] = {"description": problem.description,
                         "batch": problem.batch,
                         "n_params": tree_size(problem.params),
                         "optimizers": {}}
  by = {r.name: r for r in runners}
  sgd_t = timings.get("sgd", {}).get("step_s")
  adam_t = timings.get("adam", {}).get("step_s")
  sgd_bytes = by["sgd"].state_bytes if "sgd" in by else None
  for r in runners:
    t = timings[r.name]
    entry = {"label": r.spec.label, "period": r.spec.period,
             "statistics": r.spec.statistics or "none (jax.value_and_grad)",
             **t,
             "state_bytes": r.state_bytes, "state_numbers": r.state_numbers,
             "final_loss": float(r.loss),
             "init_state_aliased_leaves": r.aliased_leaves}
    if sgd_t:
      entry["ratio_vs_sgd"] = paired_ratio(t, timings["sgd"])
      entry["cpu_ratio_vs_sgd"] = paired_ratio(t, timings["sgd"], "per_round_cpu_s")
      entry["ratio_of_medians_vs_sgd"] = t["step_s"] / sgd_t
      entry["ratio_of_minima_vs_sgd"] = (min(t["per_round_s"])
                                         / min(timings["sgd"]["per_round_s"]))
    if adam_t:
      entry["ratio_vs_adam"] = paired_ratio(t, timings["adam"])
    if sgd_bytes:
      entry["state_ratio_vs_sgd"] = r.state_bytes / sgd_bytes
    try:
      entry["cosine"] = direction_cosine(r.spec, r, problem)
    except Exception as e:  # a diagnostic must not kill the benchmark
      entry["cosine"] = None
      entry["cosine_error"] = f"{type(e).__name__}: {e}"
    res["optimizers"][r.name] = entry
  if "sgd" in by:
    res["eva_state"] = eva_state_report(
        problem, by["sgd"].state_numbers,
        by["eva"].state_numbers if "eva" in by else None,
        by["eva_f"].state_numbers if "eva_f" in by else None)
  if args.breakdown and hasattr(eva_optax, "eva"):
    log("  breakdown (SGD vs Eva pieces):")
    res["breakdown"] = breakdown(problem, args.rounds, args.steps, log=log)
  return res


def print_report(all_res: dict[str, Any], args) -> None:
  for name, res in all_res["models"].items():
    print(f"\n### {res['description']}  ({res['n_params']:,} parameters)\n")
    print(model_table(res))
    if any(r["period"] > 1 for r in res["optimizers"].values()):
      print("\n\\* inverse_every=10: mean step time over whole periods of 10 "
            "(includes the refresh); the others: median step.")
    es = res.get("eva_state")
    if es:
      print()
      if "eva_extra_numbers" in es:
        print(f"Eva state beyond SGD's momentum buffer: {es['eva_extra_numbers']:,} "
              f"numbers (float32 averages + int32 counters); analytic "
              f"sum over {len(es['layers'])} layers of (d_in + 1 + d_out) = "
              f"{es['analytic_eva_extra']:,} (+ {es['counters']} counters = "
              f"{es['analytic_eva_extra'] + es['counters']:,}); that is "
              f"{100 * es['eva_extra_numbers'] / es['sgd_state_numbers']:.3f}% of "
              f"the momentum buffer ({es['sgd_state_numbers']:,}).")
      if "eva_f_extra_numbers" in es:
        print(f"Eva-f state beyond SGD's momentum buffer: {es['eva_f_extra_numbers']:,} "
              f"numbers; analytic sum of (d_in + 1) = {es['analytic_eva_f_extra']:,} "
              f"(+ {es['counters']} counters).")
    if "breakdown" in res:
      sgd_full = res["breakdown"]["full step: SGD-momentum"]
      print("\nBreakdown (same process, interleaved):\n")
      print(breakdown_table(res["breakdown"], sgd_full))
  aliased = sorted({n for res in all_res["models"].values()
                    for n, r in res["optimizers"].items()
                    if r["init_state_aliased_leaves"]})
  if aliased:
    print(f"\nNote: tx.init of {', '.join(aliased)} returns a state whose leaves "
          "share buffers, which jax.jit(..., donate_argnums=...) rejects "
          "('donate the same buffer twice'); the benchmark donates a copy.")
  missing = all_res["missing_optimizers"]
  if missing:
    print(f"\nNot in this eva_optax (skipped): {', '.join(missing)}")


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default=",".join(MODELS),
                  help=f"comma-separated subset of {MODELS}")
  ap.add_argument("--optimizers", default=",".join(o.name for o in OPTIMIZERS),
                  help="comma-separated subset of "
                  + ", ".join(o.name for o in OPTIMIZERS)
                  + " (sgd is always added: everything is a ratio against it)")
  ap.add_argument("--rounds", type=int, default=5,
                  help="interleaved rounds (median over rounds is reported)")
  ap.add_argument("--steps", type=int, default=10,
                  help="consecutive steps per optimizer per round (rounded up to "
                  "whole refresh periods for inverse_every > 1)")
  ap.add_argument("--quick", action="store_true",
                  help="smoke test: tiny models and batches, 1 round of 2 steps "
                  "(numbers are meaningless)")
  ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                  help="skip the SGD-vs-Eva piece-by-piece timing")
  ap.add_argument("--out", default="results/step_time.json", help="JSON output path")
  ap.add_argument("--hang-timeout", type=float, default=None,
                  help="abort (exit status 3) if one call runs longer than this "
                  "many seconds, compilation included (default 600, 120 with "
                  "--quick); 0 disables")
  args = ap.parse_args(argv)
  if args.hang_timeout is None:
    args.hang_timeout = 120.0 if args.quick else 600.0
  WATCHDOG.timeout = args.hang_timeout
  if args.quick:
    args.rounds, args.steps = 1, 2
  if args.rounds < 1 or args.steps < 1:
    ap.error("--rounds and --steps must be >= 1")
  return args


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  for m in models:
    if m not in MODELS:
      raise SystemExit(f"unknown model {m!r}; choose from {MODELS}")
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  for n in names:
    if n not in BY_NAME:
      raise SystemExit(f"unknown optimizer {n!r}; choose from {list(BY_NAME)}")
  if "sgd" not in names:
    names = ["sgd"] + names
  specs = [BY_NAME[n] for n in BY_NAME if n in names]   # canonical order
  missing = [s.name for s in specs if not available(s)]
  specs = [s for s in specs if available(s)]
  log = lambda *a: print(*a, file=sys.stderr, flush=True)
  log(f"jax {jax.__version__} on {jax.devices()}; rounds={args.rounds}, "
      f"steps={args.steps}{' (quick)' if args.quick else ''}")
  if missing:
    log(f"not in this eva_optax, skipped: {missing}")
  all_res = {
      "meta": {"jax": jax.__version__, "optax": optax.__version__,
               "eva_optax": eva_optax.__version__,
               "device": str(jax.devices()[0]), "platform": platform.platform(),
               "cpu_count": os.cpu_count(), "rounds": args.rounds,
               "steps": args.steps, "quick": args.quick,
               "time": time.strftime("%Y-%m-%d %H:%M:%S"),
               "loadavg_start": os.getloadavg(),
               "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
               "XLA_FLAGS": os.environ.get("XLA_FLAGS")},
      "missing_optimizers": missing,
      "models": {m: run_model(m, specs, args, log=log) for m in models},
  }
  all_res["meta"]["loadavg_end"] = os.getloadavg()
  print_report(all_res, args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(all_res, f, indent=1)
  log(f"\nwrote {args.out}")
  return all_res


if __name__ == "__main__":
  main()
