"""What the benchmark reports besides step times: the direction's cosine to
the gradient, Eva's state against its analytic size, and a piece-by-piece
timing of the steps (the gradient with and without statistics, every
optimizer's update and apply alone, SGD's, Adam's and Eva's full steps)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import optax

import eva_optax

from . import optimizers
from . import problems
from . import timing


def direction_cosine(spec: optimizers.OptSpec, runner: timing.StepRunner,
                     problem: problems.Problem) -> float | None:
  """cos(direction before momentum and lr, raw gradient) at the final params.

  The direction is the update of the same optimizer built with
  ``momentum=0`` and ``learning_rate=1``, started from the timed run's
  preconditioner state (the chain's first element); None when that state
  does not fit.
  """
  params = runner.params
  grad_fn = optimizers.gradient_fn(problem.loss_fn, spec.statistics,
                                   problem.stats_batch)
  if spec.name == "sgd":
    return 1.0   # the plain gradient by construction
  tx = (spec.factory(1.0, momentum=0.0, **problem.options) if spec.eva_family
        else spec.factory(1.0))
  state = tx.init(params)
  first = runner.opt_state[0]
  if jax.tree.structure(state[0]) != jax.tree.structure(first):
    return None
  state = (first,) + tuple(state[1:])

  @jax.jit
  def fn(params, state, x, y):
    _, grads, stats = grad_fn(params, x, y)
    kw = {} if stats is None else {"stats": stats}
    updates, _ = tx.update(grads, state, params, **kw)
    d = jax.tree.map(lambda u: -u, updates)
    return optax.tree.vdot(d, grads) / (optax.tree.norm(d) *
                                        optax.tree.norm(grads))

  return float(fn(params, state, problem.x, problem.y))


def layer_dims(params) -> list[tuple[str, int, int, bool]]:
  """(path, d_in, d_out, has_bias) of every module with a kernel of rank >= 2,
  in the order of ``flax.traverse_util.flatten_dict``."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  out = []
  for path, kernel in flat.items():
    module, _, leaf = path.rpartition("/")
    if leaf != "kernel" or getattr(kernel, "ndim", 0) < 2:
      continue
    bias = flat.get(f"{module}/bias")
    d_out = bias.size if bias is not None else kernel.shape[-1]
    out.append((module, kernel.size // d_out, d_out, bias is not None))
  return out


def eva_state_report(problem: problems.Problem,
                     runners: dict[str, timing.StepRunner]) -> dict[str, Any]:
  """Eva's and Eva-f's state beyond SGD's momentum buffer, measured and
  analytic: ``sum over layers (d_in + 1 + d_out)`` (Eva) and
  ``(d_in + 1)`` (Eva-f), plus their integer counters."""
  dims = layer_dims(problem.params)
  sgd_numbers = runners["sgd"].state_numbers
  rep = {"layers": [{"path": p, "d_in": i, "d_out": o, "bias": b}
                    for p, i, o, b in dims],
         "n_params": int(optax.tree.size(problem.params)),
         "sgd_state_numbers": sgd_numbers,
         "analytic_eva_extra": sum(i + int(b) + o for _, i, o, b in dims),
         "analytic_eva_f_extra": sum(i + int(b) for _, i, _, b in dims)}
  for name in ("eva", "eva_f"):
    if name in runners:
      rep[f"{name}_extra_numbers"] = runners[name].state_numbers - sgd_numbers
      rep[f"{name}_counters"] = runners[name].state_integer_numbers
  return rep


UPDATE = "update+apply: "   # the breakdown's names of the update pieces


def breakdown(problem: problems.Problem, specs: list[optimizers.OptSpec],
              rounds: int, steps: int, log=print) -> dict[str, Any]:
  """Times the pieces of the steps, interleaved like the steps themselves.

  * the gradient alone (``jax.value_and_grad``) and with each statistics mode
    that ``specs`` use (``eva_optax.value_and_grad``, with the problem's
    ``stats_batch``);
  * ``update+apply: <label>``: each optimizer of ``specs`` alone, its
    ``tx.update`` and ``optax.apply_updates`` on fixed gradients and
    statistics, params and state donated (a refresh period rounds the window
    up, as for the full steps);
  * the full steps of SGD, Adam and Eva (those in ``specs``).
  """
  p = problem
  modes = sorted({s.statistics for s in specs if s.statistics})
  plain = jax.jit(jax.value_and_grad(p.loss_fn))
  grad_fns = {m: jax.jit(optimizers.gradient_fn(p.loss_fn, m, p.stats_batch))
              for m in modes}
  pieces = {}
  for m, fn in grad_fns.items():
    _, grads, stats = jax.block_until_ready(fn(p.params, p.x, p.y))
    pieces[m] = (grads, stats)
  grads = jax.block_until_ready(plain(p.params, p.x, p.y))[1]

  def update_runner(spec):
    tx = spec.factory(spec.lr, **p.options)
    g, stats = pieces[spec.statistics] if spec.statistics else (grads, None)

    def upd(params, opt_state, g, stats):
      kw = {} if stats is None else {"stats": stats}
      updates, opt_state = tx.update(g, opt_state, params, **kw)
      return optax.apply_updates(params, updates), opt_state
    upd = jax.jit(upd, donate_argnums=(0, 1))
    box = {"params": timing.copy_tree(p.params)}
    box["state"] = timing.copy_tree(tx.init(box["params"]))   # distinct buffers

    def call():
      box["params"], box["state"] = upd(box["params"], box["state"], g, stats)
      return box["params"], box["state"]
    return timing.Runner(UPDATE + spec.label, call, spec.period)

  sb = "" if p.stats_batch is None else f", stats_batch={p.stats_batch}"
  runners = [timing.Runner("grad: jax.value_and_grad",
                           lambda: plain(p.params, p.x, p.y))]
  runners += [timing.Runner(f"grad+stats: eva_optax.value_and_grad({m}{sb})",
                            lambda fn=fn: fn(p.params, p.x, p.y))
              for m, fn in grad_fns.items()]
  runners += [update_runner(s) for s in specs]
  for s in specs:
    if s.name in ("sgd", "adam", "eva"):
      r = timing.StepRunner(s, p)
      r.name = f"full step: {s.label}"
      runners.append(r)
  return timing.time_interleaved(runners, rounds, steps, log=log)


def update_ratios(bd: dict[str, Any], specs: list[optimizers.OptSpec],
                  against: str = "adam") -> dict[str, float]:
  """Each optimizer's update+apply over ``against``'s, paired by round."""
  by = {s.name: s for s in specs}
  if against not in by or UPDATE + by[against].label not in bd:
    return {}
  ref = bd[UPDATE + by[against].label]
  return {s.name: timing.paired_ratio(bd[UPDATE + s.label], ref)
          for s in specs if UPDATE + s.label in bd}
