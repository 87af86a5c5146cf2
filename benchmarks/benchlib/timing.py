"""Interleaved, paired timing of jitted steps on a shared, noisy machine.

A :class:`Runner` is one timed thing; :func:`time_interleaved` warms every
runner up, then runs them in turn over rounds (the order rotates) and reports
per-round figures, so that :func:`paired_ratio` can compare two runners round
by round and cancel the slow drift of the machine's load.

A hung XLA execution cannot be interrupted from Python: with
:func:`set_hang_timeout` every call is guarded by
:func:`faulthandler.dump_traceback_later`, which prints every thread's stack and
exits the process with status 1 if one call runs longer than the timeout.
"""

from __future__ import annotations

import faulthandler
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import optimizers
from . import problems

_HANG_TIMEOUT = 0.0


def set_hang_timeout(seconds: float) -> None:
  """Abort (stacks, exit status 1) if one call runs longer; 0 disables."""
  global _HANG_TIMEOUT
  _HANG_TIMEOUT = float(seconds or 0.0)


def copy_tree(tree):
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def aliased_leaves(tree) -> int:
  """How many leaves of ``tree`` are the same array object as an earlier leaf."""
  leaves = jax.tree.leaves(tree)
  return len(leaves) - len({id(l) for l in leaves})


def tree_nbytes(tree) -> int:
  return int(sum(np.asarray(l).nbytes if not hasattr(l, "nbytes") else l.nbytes
                 for l in jax.tree.leaves(tree)))


def integer_numbers(tree) -> int:
  """How many numbers of ``tree`` are integers (the step counters)."""
  return int(sum(np.size(l) for l in jax.tree.leaves(tree)
                 if jnp.issubdtype(jnp.result_type(l), jnp.integer)))


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
      if _HANG_TIMEOUT:
        faulthandler.dump_traceback_later(_HANG_TIMEOUT, exit=True,
                                          file=sys.stderr)
      c0, t0 = time.process_time(), time.perf_counter()
      out = self.call()
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
      if _HANG_TIMEOUT:
        faulthandler.cancel_dump_traceback_later()
    return times, cpu


class StepRunner(Runner):
  """A training step that threads (donated) params and opt_state through."""

  def __init__(self, spec: optimizers.OptSpec, problem: problems.Problem):
    self.spec = spec
    self.problem = problem
    self.tx = spec.factory(spec.lr, **problem.options)
    self.params = copy_tree(problem.params)
    opt_state = self.tx.init(self.params)
    # Donation needs distinct buffers; an init that reuses one array for
    # several leaves (e.g. one zero for several counters) cannot be donated as
    # is. Record it (a finding for the library) and donate a copy.
    self.aliased_leaves = aliased_leaves(opt_state)
    self.opt_state = copy_tree(opt_state)
    self.state_bytes = tree_nbytes(self.opt_state)
    self.state_numbers = int(optax.tree.size(self.opt_state))
    self.state_integer_numbers = integer_numbers(self.opt_state)
    self.step = optimizers.make_step(self.tx, problem.loss_fn,
                                     spec.statistics, problem.stats_batch)
    self.loss = float("nan")
    super().__init__(spec.name, self._call, spec.period)

  def _call(self):
    x, y = self.problem.next_batch()
    self.params, self.opt_state, self.loss = self.step(
        self.params, self.opt_state, x, y)
    return self.params, self.opt_state, self.loss

  def compiled(self) -> jax.stages.Compiled:
    """The step compiled for the current arguments (the jit cache's copy
    once the step has run)."""
    return self.step.lower(self.params, self.opt_state, self.problem.x,
                           self.problem.y).compile()


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
