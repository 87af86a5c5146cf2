"""Work per device counted from a compiled program's HLO text.

``jax.stages.Compiled.cost_analysis()`` is no help for the refresh of K-FAC,
FOOF and Shampoo: it leaves the LAPACK custom calls (Cholesky, ``eigh``,
triangular solves) out entirely and counts a loop body once. This module reads
the optimized HLO instead (``jax.jit(f).lower(...).compile().as_text()``), walks
it from the entry computation and counts, per device:

* every **LAPACK call** (CPU custom-call targets such as ``lapack_spotrf_ffi``,
  ``lapack_ssyevd_ffi``, ``lapack_strsm_ffi``, ``lapack_sgetrf_ffi``; the GPU
  solvers' ``cusolver_*``/``hipsolver_*`` names; the HLO ops ``cholesky`` and
  ``triangular-solve`` where a backend keeps them), with its operand shape and
  a flop model (:data:`FLOP_MODELS`), times the trip counts of the ``while``
  loops around it (the loop's ``known_trip_count``, else its condition
  ``i < N`` against the loop's initial ``i``);
* every ``dot`` (2 x result size x contracted size; inside fusions too);
* the operand bytes of every **collective** (``all-reduce``, ``all-gather``,
  ``reduce-scatter``, ``collective-permute``, ``all-to-all``; an ``-start``/
  ``-done`` pair once), as :mod:`benchlib.collectives` reads them, but times the
  loop trip counts, and split into *per-step* (outside every ``conditional``)
  and *conditional* (inside one: the refresh's ``lax.cond`` runs only on
  refresh steps).

A ``conditional`` whose branch index can be evaluated from the program text
for a given device (a function of ``partition-id()`` / ``replica-id()`` and
constants, through fusions, tuples, and the parameters of the computations
that enclose it) contributes only the branch that device takes: the
``lax.switch`` on the device index of a split refresh. One whose index depends
on the device in a way this evaluator cannot follow (a gather from a runtime
array, say) is assumed to give branch ``d mod n`` to device ``d`` and is
flagged (``"assumed_device_branch"``). One whose index does not depend on the
device (the refresh's ``count % k == 0``) contributes its heaviest branch (the
most LAPACK flops, then dot flops, then bytes): the figures are those of a
**refresh step**. Reductions' and sorts' scalar ``to_apply`` computations are
not walked.

Typical use::

    from benchlib import hlo_work
    work = hlo_work.count(jax.jit(step).lower(*args).compile().as_text())
    work["lapack_flops_per_device"]      # [flops of device 0, 1, ...]
    work["lapack_flops_max"], work["lapack_flops_mean"]

The HLO text is parsed by :mod:`benchlib.hlo_text`, and branch indices and loop
bounds are evaluated by :mod:`benchlib.hlo_eval`; this module is the walk and the
flop models. The flop models are stated, not measured: LAPACK's operation counts for the
usual algorithms (Golub and Van Loan), ``n`` the matrix order, per matrix of a
batch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import numpy as np

from .hlo_eval import Frame, Unknown, depends_on_device, is_known
from .hlo_text import Computation, Instr, nbytes, num_devices, parse_module, shapes

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "collective-permute",
               "all-to-all")

# Flop models, per matrix (m x n operand, m >= n where it matters; n x n if
# square). Keys are the LAPACK routine families found in custom-call targets.
FLOP_MODELS: dict[str, tuple[str, Callable[[int, int], float]]] = {
    "potrf": ("Cholesky: n^3/3", lambda m, n: n ** 3 / 3),
    "syevd": ("symmetric eigh with vectors: 9 n^3 (4/3 n^3 values only)",
              lambda m, n: 9.0 * n ** 3),
    "getrf": ("LU: m n^2 - n^3/3", lambda m, n: m * n * n - n ** 3 / 3),
    "geqrf": ("QR: 2 m n^2 - 2/3 n^3", lambda m, n: 2 * m * n * n - 2 * n ** 3 / 3),
    "orgqr": ("Q of QR: 4 m n^2 - 4/3 n^3 ... (4/3 n^3 square)",
              lambda m, n: 4 * m * n * n - 4 * n ** 3 / 3 if m > n else 4 * n ** 3 / 3),
    "gesvd": ("SVD with U and V: 4 m^2 n + 8 m n^2 + 9 n^3",
              lambda m, n: 4 * m * m * n + 8 * m * n * n + 9 * n ** 3),
    "geev": ("non-symmetric eig with vectors: 25 n^3", lambda m, n: 25.0 * n ** 3),
    "sytrd": ("tridiagonal reduction: 4/3 n^3", lambda m, n: 4 * n ** 3 / 3),
    "gehrd": ("Hessenberg reduction: 10/3 n^3", lambda m, n: 10 * n ** 3 / 3),
    # trsm is counted from both operands (see _lapack_flops): k^2 r for a k x k
    # triangle applied to r right-hand-side columns.
    "trsm": ("triangular solve: k^2 r (k x k triangle, r right-hand sides)",
             lambda m, n: float(n ** 3)),
    "other": ("unknown routine: n^3", lambda m, n: float(n ** 3)),
}
# Custom-call target (lower case) -> family. The first pattern found wins.
_FAMILIES = (("potrf", "potrf"), ("cholesky", "potrf"), ("syevd", "syevd"),
             ("heevd", "syevd"), ("syevj", "syevd"), ("heevj", "syevd"),
             ("eigh", "syevd"), ("trsm", "trsm"), ("triangular", "trsm"),
             ("getrf", "getrf"), ("geqrf", "geqrf"), ("orgqr", "orgqr"),
             ("ungqr", "orgqr"), ("householder_product", "orgqr"),
             ("gesdd", "gesvd"), ("gesvd", "gesvd"), ("geev", "geev"),
             ("gees", "geev"), ("sytrd", "sytrd"), ("hetrd", "sytrd"),
             ("gehrd", "gehrd"))
_SOLVER_TARGET = re.compile(r"lapack|solver|cusolver|hipsolver|eigh|potrf|"
                            r"getrf|geqrf|syev|trsm|gesvd|gesdd")



# ----------------------------------------------------------------------------
# The walk.


@dataclasses.dataclass
class Tally:
  """What one device executes (on a refresh step), split by where it sits."""
  lapack_flops: float = 0.0
  lapack_calls: float = 0.0
  dot_flops: float = 0.0
  step_bytes: float = 0.0        # collectives outside every conditional
  cond_bytes: float = 0.0        # collectives inside a (device-independent) conditional
  step_result_bytes: float = 0.0  # the same, by their results (an all-gather's is D x)
  cond_result_bytes: float = 0.0
  lapack: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  notes: set[str] = dataclasses.field(default_factory=set)

  def add(self, other: "Tally") -> None:
    self.lapack_flops += other.lapack_flops
    self.lapack_calls += other.lapack_calls
    self.dot_flops += other.dot_flops
    self.step_bytes += other.step_bytes
    self.cond_bytes += other.cond_bytes
    self.step_result_bytes += other.step_result_bytes
    self.cond_result_bytes += other.cond_result_bytes
    for mine, theirs in ((self.lapack, other.lapack),
                         (self.collectives, other.collectives)):
      for k, d in theirs.items():
        slot = mine.setdefault(k, {})
        for kk, vv in d.items():
          slot[kk] = slot.get(kk, 0.0) + vv
    self.notes |= other.notes

  def key(self) -> tuple[float, float, float]:
    return (self.lapack_flops, self.dot_flops, self.step_bytes + self.cond_bytes)


def _family(target: str) -> str:
  t = target.lower()
  for pat, fam in _FAMILIES:
    if pat in t:
      return fam
  return "other"


def _is_solver(ins: Instr) -> str | None:
  """The LAPACK family of a solver call, or None."""
  if ins.opcode == "cholesky":
    return "potrf"
  if ins.opcode == "triangular-solve":
    return "trsm"
  if ins.opcode != "custom-call":
    return None
  m = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
  if not m or not _SOLVER_TARGET.search(m.group(1).lower()):
    return None
  if "pivots_to_permutation" in m.group(1).lower():
    return None
  return _family(m.group(1))


def _operand_types(comp: Computation, ins: Instr) -> list[str]:
  out = []
  for o in ins.operands:
    src = comp.by_name.get(o)
    out.append(src.type_text if src is not None else "")
  if not any(out):
    m = re.search(r"operand_layout_constraints=\{(.*?)\}(?:,\s*\w+=|$)", ins.attrs)
    if m:
      out = [f"{dt}[{','.join(map(str, dims))}]" for dt, dims in shapes(m.group(1))]
  return out


def _lapack_flops(comp: Computation, ins: Instr, fam: str) -> tuple[float, float, str]:
  """``(flops, matrices, shape text)`` of one solver call (its batch included)."""
  types = _operand_types(comp, ins)
  first = shapes(types[0]) if types else shapes(ins.type_text)
  if not first:
    return 0.0, 0.0, "?"
  dims = first[0][1]
  if len(dims) < 2:
    return 0.0, 0.0, str(dims)
  batch = float(np.prod(dims[:-2], dtype=np.float64)) if len(dims) > 2 else 1.0
  r, c = dims[-2], dims[-1]
  if fam == "trsm":
    k = r                                   # the triangle is square
    b = shapes(types[1])[0][1] if len(types) > 1 and shapes(types[1]) else dims
    # LAPACK's backend config says side = 76 ('L') or 82 ('R'); the HLO op,
    # left_side=true/false.
    side_left = True
    m = re.search(r"side\s*=\s*(\d+)", ins.attrs)
    if m:
      side_left = int(m.group(1)) == ord("L")
    elif "left_side=false" in ins.attrs:
      side_left = False
    rhs = b[-1] if side_left else b[-2]
    flops = float(k) * k * rhs
  else:
    big, small = max(r, c), min(r, c)
    flops = float(FLOP_MODELS[fam][1](big, small))
    if fam == "syevd":
      m = re.search(r"mode\s*=\s*(\d+)", ins.attrs)
      if m and int(m.group(1)) == ord("N"):
        flops = 4.0 * small ** 3 / 3
  return batch * flops, batch, "x".join(map(str, dims))


def _dot_flops(comp: Computation, ins: Instr) -> float:
  out = shapes(ins.type_text)
  types = _operand_types(comp, ins)
  if not out or not types or not shapes(types[0]):
    return 0.0
  lhs = shapes(types[0])[0][1]
  m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
  contracted = 1
  if m:
    for d in filter(None, m.group(1).split(",")):
      contracted *= lhs[int(d)]
  return 2.0 * float(np.prod(out[0][1], dtype=np.float64)) * contracted


MAX_SIMULATED_TRIPS = 100_000


def _trip_count(frame: Frame, ins: Instr) -> tuple[float | None, str]:
  """The trip count of a ``while``: XLA's ``known_trip_count``, else the loop
  run on its scalars (the condition evaluated on the loop state, the body's
  next state computed lazily: only what the condition reads)."""
  n = ins.backend_config().get("known_trip_count", {}).get("n")
  if n is not None:
    return float(n), "known_trip_count"
  cond = frame.comps.get((ins.called("condition") or [""])[0])
  body = frame.comps.get((ins.called("body") or [""])[0])
  if cond is None or body is None or not ins.operands:
    return None, "no condition or body"
  state = frame.value(ins.operands[0])
  for trips in range(MAX_SIMULATED_TRIPS + 1):
    go = Frame(frame.comps, cond, [lambda s=state: s], frame.device).root_value()
    if not is_known(go):
      return None, "condition not computable from the program text"
    if not int(np.asarray(go.a).reshape(-1)[0]):
      return float(trips), "simulated"
    state = Frame(frame.comps, body, [lambda s=state: s], frame.device).root_value()
  return None, f"more than {MAX_SIMULATED_TRIPS} trips"


class Walker:
  """Walks a parsed module for one device; see :func:`count`."""

  def __init__(self, comps: dict[str, Computation], device: int, ndev: int):
    self.comps = comps
    self.device = device
    self.ndev = ndev
    self.ops: list[dict[str, Any]] = []

  def walk(self, frame: Frame, mult: float, in_cond: bool, path: str) -> Tally:
    t = Tally()
    comp = frame.comp
    for ins in comp.instrs:
      op = ins.opcode
      fam = _is_solver(ins)
      if fam is not None:
        flops, mats, shape = _lapack_flops(comp, ins, fam)
        t.lapack_flops += mult * flops
        t.lapack_calls += mult * mats
        slot = t.lapack.setdefault(fam, {"flops": 0.0, "matrices": 0.0})
        slot["flops"] += mult * flops
        slot["matrices"] += mult * mats
        self.ops.append({"device": self.device, "kind": fam, "shape": shape,
                         "times": mult, "flops": mult * flops, "path": path})
        continue
      base = op[:-6] if op.endswith("-start") else op
      if base in COLLECTIVES and not op.endswith("-done"):
        b = sum(nbytes(tt) for tt in _operand_types(comp, ins)) or nbytes(ins.type_text)
        rb = nbytes(ins.type_text) if not op.endswith("-start") else b
        if base == "all-gather" and op.endswith("-start"):
          rb = b * self.ndev       # the -start's type also holds the operand
        if in_cond:
          t.cond_bytes += mult * b
          t.cond_result_bytes += mult * rb
        else:
          t.step_bytes += mult * b
          t.step_result_bytes += mult * rb
        slot = t.collectives.setdefault(("cond:" if in_cond else "step:") + base,
                                        {"count": 0.0, "bytes": 0.0, "result_bytes": 0.0})
        slot["count"] += mult
        slot["bytes"] += mult * b
        slot["result_bytes"] += mult * rb
        continue
      if op == "dot":
        t.dot_flops += mult * _dot_flops(comp, ins)
        continue
      if op == "while":
        trips, how = _trip_count(frame, ins)
        if trips is None:
          t.notes.add(f"while {ins.name}: trip count unknown ({how}); counted once")
          trips = 1.0
        body = ins.called("body")
        if body and body[0] in self.comps:
          sub = Frame(self.comps, self.comps[body[0]], [lambda: Unknown()], self.device)
          t.add(self.walk(sub, mult * trips, in_cond, f"{path}/{ins.name}[x{trips:g}]"))
        continue
      if op == "conditional":
        t.add(self._conditional(frame, ins, mult, in_cond, path))
        continue
      called = ins.called("calls")
      if op == "call":
        called = called or ins.called("to_apply")
      for c in called:
        if c in self.comps:
          sub = Frame(self.comps, self.comps[c],
                      [(lambda o=o: frame.value(o)) for o in ins.operands], self.device)
          t.add(self.walk(sub, mult, in_cond, path))
    return t

  def _conditional(self, frame: Frame, ins: Instr, mult: float, in_cond: bool,
                   path: str) -> Tally:
    branches = ins.called("branch_computations")
    pred = False
    if not branches:
      branches = ins.called("true_computation") + ins.called("false_computation")
      pred = True
    n = len(branches)
    idx = frame.value(ins.operands[0])

    def branch_frame(b: int) -> Frame:
      operand = ins.operands[1 + b] if 1 + b < len(ins.operands) else None
      args = [(lambda: frame.value(operand))] if operand else []
      return Frame(self.comps, self.comps[branches[b]], args, self.device)

    if is_known(idx):
      k = int(np.asarray(idx.a).reshape(-1)[0])
      b = (0 if k else 1) if pred else (k if 0 <= k < n else n - 1)
      how = "device branch" if idx.device else "fixed branch"
      return self.walk(branch_frame(b), mult, in_cond, f"{path}/{ins.name}[{how} {b}]")
    if depends_on_device(idx):
      b = self.device % n
      t = self.walk(branch_frame(b), mult, in_cond,
                    f"{path}/{ins.name}[assumed branch {b}]")
      t.notes.add("assumed_device_branch")
      return t
    best: Tally | None = None
    saved = len(self.ops)
    best_ops: list[dict[str, Any]] = []
    for b in range(n):
      before = len(self.ops)
      t = self.walk(branch_frame(b), mult, True, f"{path}/{ins.name}[branch {b}]")
      ops = self.ops[before:]
      del self.ops[before:]
      if best is None or t.key() > best.key():
        best, best_ops = t, ops
    del self.ops[saved:]
    self.ops.extend(best_ops)
    return best or Tally()


def count(hlo: str, devices: int | None = None, keep_ops: bool = False) -> dict[str, Any]:
  """Per-device work of a compiled program (on a refresh step).

  Args:
    hlo: the optimized HLO module's text (``Compiled.as_text()``).
    devices: how many devices run it (default: from the module header's
      ``num_partitions`` and ``replica_count``).
    keep_ops: also return every counted LAPACK call (``"ops"``).

  Returns:
    ``lapack_flops_per_device`` (list), ``lapack_flops_max`` / ``_mean`` /
    ``_imbalance`` (max over mean), ``lapack_calls_per_device`` (matrices
    factored, batches and loop trips included), ``lapack_by_kind`` (device
    0's ``{family: {"flops", "matrices"}}``; per device under
    ``lapack_by_kind_per_device``), ``dot_flops_per_device``,
    ``step_bytes`` (collectives outside every conditional, loops counted),
    ``cond_bytes`` (inside conditionals: the refresh's), ``collectives``
    (device 0's ``{"step:kind" or "cond:kind": {"count", "bytes"}}``),
    ``notes`` (unknown trip counts, assumed device branches), ``flop_models``.
  """
  comps, entry = parse_module(hlo)
  ndev = devices or num_devices(hlo)
  tallies, ops = [], []
  for d in range(ndev):
    w = Walker(comps, d, ndev)
    tallies.append(w.walk(Frame(comps, comps[entry], [], d), 1.0, False, entry))
    ops.extend(w.ops)
  flops = [t.lapack_flops for t in tallies]
  mean = sum(flops) / len(flops) if flops else 0.0
  out = {
      "devices": ndev,
      "lapack_flops_per_device": flops,
      "lapack_flops_max": max(flops) if flops else 0.0,
      "lapack_flops_mean": mean,
      "lapack_flops_total": sum(flops),
      "lapack_imbalance": (max(flops) / mean) if mean else 1.0,
      "lapack_calls_per_device": [t.lapack_calls for t in tallies],
      "lapack_by_kind": tallies[0].lapack if tallies else {},
      "lapack_by_kind_per_device": [t.lapack for t in tallies],
      "dot_flops_per_device": [t.dot_flops for t in tallies],
      "step_bytes": tallies[0].step_bytes if tallies else 0.0,
      "cond_bytes": max((t.cond_bytes for t in tallies), default=0.0),
      "step_result_bytes": tallies[0].step_result_bytes if tallies else 0.0,
      "cond_result_bytes": max((t.cond_result_bytes for t in tallies), default=0.0),
      "collectives": tallies[0].collectives if tallies else {},
      "notes": sorted(set().union(*(t.notes for t in tallies))) if tallies else [],
      "flop_models": {k: v[0] for k, v in FLOP_MODELS.items()},
  }
  if keep_ops:
    out["ops"] = ops
  return out


__all__ = ["count", "FLOP_MODELS"]
