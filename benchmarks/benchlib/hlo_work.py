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

The flop models are stated, not measured: LAPACK's operation counts for the
usual algorithms (Golub and Van Loan), ``n`` the matrix order, per matrix of a
batch.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2,
                "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")
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
# Parsing.


@dataclasses.dataclass
class Instr:
  name: str
  type_text: str           # the result type: "f32[2,3]{1,0}" or a tuple "(...)"
  opcode: str
  operands: list[str]      # operand instruction names
  operand_text: str        # the text between the opcode's parentheses
  attrs: str               # everything after the operand list
  line: str

  def attr(self, key: str) -> str | None:
    m = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=(%?[\w.\-]+)", self.attrs)
    return m.group(1).lstrip("%") if m else None

  def called(self, key: str) -> list[str]:
    """Computation names of ``key={%a, %b}`` or ``key=%a``."""
    m = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=\{([^}]*)\}", self.attrs)
    if m:
      return [s.strip().lstrip("%") for s in m.group(1).split(",") if s.strip()]
    one = self.attr(key)
    return [one] if one else []

  def backend_config(self) -> dict[str, Any]:
    m = re.search(r"backend_config=(\{.*\})(?:,\s*\w+=|$)", self.attrs)
    if not m:
      return {}
    try:
      return json.loads(m.group(1))
    except ValueError:
      return {}


@dataclasses.dataclass
class Computation:
  name: str
  instrs: list[Instr]
  by_name: dict[str, Instr]
  params: dict[int, Instr]
  root: Instr | None


def _balanced(text: str, start: int, open_c: str = "(", close_c: str = ")") -> int:
  """Index just past the bracket matching ``text[start]``."""
  depth = 0
  quote = False
  for i in range(start, len(text)):
    c = text[i]
    if c == '"' and (i == 0 or text[i - 1] != "\\"):
      quote = not quote
    if quote:
      continue
    if c in "({[":
      depth += 1
    elif c in ")}]":
      depth -= 1
      if depth == 0:
        return i + 1
  return len(text)


_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_NAME = re.compile(r"%([\w.\-]+)")


def _parse_instr(line: str) -> tuple[Instr, bool] | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):
    end = _balanced(rest, 0)
    type_text, rest = rest[:end], rest[end:].lstrip()
  else:
    sp = rest.find(" ")
    type_text, rest = rest[:sp], rest[sp + 1:].lstrip()
  p = rest.find("(")
  if p < 0:
    return None
  opcode = rest[:p].strip()
  end = _balanced(rest, p)
  operand_text = rest[p + 1:end - 1]
  attrs = rest[end:].lstrip(", ")
  operands = _NAME.findall(operand_text)
  return Instr(m.group(2), type_text, opcode, operands, operand_text, attrs,
               line), bool(m.group(1))


def parse_module(hlo: str) -> tuple[dict[str, Computation], str]:
  """``({name: Computation}, entry name)`` of an HLO module's text."""
  comps: dict[str, Computation] = {}
  entry = ""
  cur: Computation | None = None
  for line in hlo.splitlines():
    if not line.strip():
      continue
    if cur is None:
      if line.startswith("HloModule"):
        continue
      h = _HEADER.match(line)
      if h and not line[0].isspace():
        cur = Computation(h.group(2), [], {}, {}, None)
        if h.group(1):
          entry = cur.name
      continue
    if line.strip() == "}":
      if cur.root is None and cur.instrs:
        cur.root = cur.instrs[-1]
      comps[cur.name] = cur
      cur = None
      continue
    parsed = _parse_instr(line)
    if parsed is None:
      continue
    ins, is_root = parsed
    cur.instrs.append(ins)
    cur.by_name[ins.name] = ins
    if ins.opcode == "parameter":
      cur.params[int(ins.operand_text.strip() or 0)] = ins
    if is_root:
      cur.root = ins
  if not entry and comps:
    entry = list(comps)[-1]
  return comps, entry


def shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """``[(dtype, dims), ...]`` of every array type in ``type_text``."""
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in _SHAPE.findall(type_text)]


def nbytes(type_text: str) -> int:
  return sum(_DTYPE_BYTES[dt] * int(np.prod(dims, dtype=np.int64))
             for dt, dims in shapes(type_text))


def num_devices(hlo: str) -> int:
  """``num_partitions`` x ``replica_count`` from the module header (1 if absent)."""
  head = hlo.split("\n", 1)[0]
  n = 1
  for key in ("num_partitions", "replica_count"):
    m = re.search(key + r"=(\d+)", head)
    if m:
      n *= int(m.group(1))
  return n


# ----------------------------------------------------------------------------
# Scalar evaluation of branch indices and loop bounds.


@dataclasses.dataclass(frozen=True)
class Unknown:
  """A value the program text does not fix; ``device``: it depends on the device."""
  device: bool = False


@dataclasses.dataclass(frozen=True)
class Val:
  """A value the program text fixes; ``device``: it depends on the device."""
  a: Any                   # a numpy array
  device: bool = False


def _dev(v: Any) -> bool:
  return isinstance(v, (Unknown, Val)) and v.device


def _u(*vals) -> Unknown:
  return Unknown(any(_dev(v) for v in vals))


_CMP = {"EQ": np.equal, "NE": np.not_equal, "LT": np.less, "LE": np.less_equal,
        "GT": np.greater, "GE": np.greater_equal}


def _const(ins: Instr) -> Any:
  text = ins.operand_text.strip()
  dt_dims = shapes(ins.type_text)
  if not dt_dims:
    return Unknown()
  dt, dims = dt_dims[0]
  toks = re.findall(r"true|false|-?inf|nan|-?[0-9.]+(?:e[+-]?\d+)?", text)
  if not toks:
    return Unknown()
  vals = [1 if t == "true" else 0 if t == "false" else float(t) for t in toks]
  size = int(np.prod(dims, dtype=np.int64))
  if len(vals) != size:
    if len(vals) == 1:
      vals = vals * size
    else:
      return Unknown()
  arr = np.array(vals, dtype=np.float64 if dt.startswith(("f", "bf", "c")) else np.int64)
  return arr.reshape(dims)


class LazyTuple:
  """A tuple value whose elements are computed when read."""

  def __init__(self, thunks: list[Callable[[], Any]]):
    self.thunks = thunks
    self.cache: dict[int, Any] = {}

  def __len__(self) -> int:
    return len(self.thunks)

  def __getitem__(self, i: int) -> Any:
    if i not in self.cache:
      self.cache[i] = self.thunks[i]()
    return self.cache[i]


def _known(v: Any) -> bool:
  return isinstance(v, Val)


_DEPTH = 0
MAX_DEPTH = 300


class Frame:
  """One activation of a computation, its parameters' values given lazily."""

  def __init__(self, comps: dict[str, Computation], comp: Computation,
               args: list[Callable[[], Any]], device: int):
    self.comps = comps
    self.comp = comp
    self.args = args
    self.device = device
    self.cache: dict[str, Any] = {}

  def value(self, name: str) -> Any:
    """The value of instruction ``name``: a numpy array, a LazyTuple or Unknown."""
    if name not in self.cache:
      global _DEPTH
      if _DEPTH > MAX_DEPTH:           # a long data chain: not an index computation
        return Unknown()
      self.cache[name] = Unknown()       # a cycle (never in HLO) stays unknown
      ins = self.comp.by_name.get(name)
      _DEPTH += 1
      try:
        self.cache[name] = Unknown() if ins is None else self._eval(ins)
      finally:
        _DEPTH -= 1
    return self.cache[name]

  def root_value(self) -> Any:
    return self.value(self.comp.root.name) if self.comp.root is not None else Unknown()

  def _eval(self, ins: Instr) -> Any:   # pylint: disable=too-many-return-statements
    op = ins.opcode
    if op == "parameter":
      i = int(ins.operand_text.strip() or 0)
      return self.args[i]() if i < len(self.args) else Unknown()
    if op == "constant":
      c = _const(ins)
      return c if isinstance(c, Unknown) else Val(c)
    if op in ("partition-id", "replica-id"):
      return Val(np.array(self.device, dtype=np.int64), True)
    if op == "tuple":
      return LazyTuple([(lambda o=o: self.value(o)) for o in ins.operands])
    if op == "get-tuple-element":
      v = self.value(ins.operands[0])
      idx = int(ins.attr("index") or 0)
      if isinstance(v, LazyTuple) and idx < len(v):
        return v[idx]
      return _u(v)
    if op in ("fusion", "call"):
      called = ins.called("calls") or ins.called("to_apply")
      if not called or called[0] not in self.comps:
        return _u(*[self.value(o) for o in ins.operands])
      return Frame(self.comps, self.comps[called[0]],
                   [(lambda o=o: self.value(o)) for o in ins.operands],
                   self.device).root_value()
    if op not in _ARITH:
      # Anything else (a dot, a reduce, a gather, ...) is data: unknown, and
      # device-dependent if an operand is.
      return _u(*[self.value(o) for o in ins.operands])
    v = [self.value(o) for o in ins.operands]
    if not all(_known(x) for x in v):
      return _u(*v)
    if sum(int(np.size(x.a)) for x in v) > 1 << 16:
      return _u(*v)                     # not a scalar index computation
    dev = any(x.device for x in v)
    try:
      out = _arith(ins, [x.a for x in v])
    except Exception:  # pylint: disable=broad-except
      return Unknown(dev)
    return Unknown(dev) if isinstance(out, Unknown) else Val(np.asarray(out), dev)


_BINARY = {"add": np.add, "subtract": np.subtract, "multiply": np.multiply,
           "maximum": np.maximum, "minimum": np.minimum, "and": np.logical_and,
           "or": np.logical_or, "xor": np.logical_xor}
_BITWISE = {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
            "shift-left": np.left_shift, "shift-right-logical": np.right_shift,
            "shift-right-arithmetic": np.right_shift}
_ARITH = set(_BINARY) | set(_BITWISE) | {
    "convert", "copy", "bitcast", "reshape", "broadcast", "divide", "remainder",
    "negate", "not", "abs", "clamp", "select", "compare", "dynamic-slice", "slice"}


def _arith(ins: Instr, v: list[Any]) -> Any:  # pylint: disable=too-many-return-statements
  op = ins.opcode
  sh = shapes(ins.type_text)
  dims = sh[0][1] if sh else ()
  integer = not re.match(r"^(f|bf|c)", ins.type_text)
  if op in ("convert", "copy", "bitcast", "reshape"):
    out = np.asarray(v[0])
    if op in ("bitcast", "reshape"):
      out = out.reshape(dims)
    if ins.type_text.startswith("pred"):
      return (out != 0).astype(np.int64)
    if op == "convert" and integer:
      return np.trunc(out.astype(np.float64)).astype(np.int64)
    return out
  if op == "broadcast":
    return np.broadcast_to(np.asarray(v[0]), dims).copy() if np.ndim(v[0]) == 0 else Unknown()
  if op in _BITWISE and not ins.type_text.startswith("pred"):
    return np.asarray(_BITWISE[op](np.asarray(v[0], np.int64), np.asarray(v[1], np.int64)))
  if op in _BINARY:
    out = np.asarray(_BINARY[op](v[0], v[1]))
    return out.astype(np.int64) if out.dtype == bool else out
  if op == "divide":
    if integer:
      return np.trunc(np.asarray(v[0], np.float64) / v[1]).astype(np.int64)
    return np.divide(v[0], v[1])
  if op == "remainder":
    return np.fmod(v[0], v[1])
  if op == "negate":
    return -np.asarray(v[0])
  if op == "not":
    return np.logical_not(v[0]).astype(np.int64)
  if op == "abs":
    return np.abs(v[0])
  if op == "clamp":
    return np.clip(v[1], v[0], v[2])
  if op == "select":
    return np.where(np.asarray(v[0]) != 0, v[1], v[2])
  if op == "compare":
    m = re.search(r"direction=(\w+)", ins.attrs)
    return _CMP[m.group(1)](v[0], v[1]).astype(np.int64)
  if op == "dynamic-slice":
    sizes = [int(s) for s in re.search(r"dynamic_slice_sizes=\{([\d,]*)\}",
                                       ins.attrs).group(1).split(",") if s]
    arr = np.asarray(v[0])
    starts = [int(np.clip(int(np.asarray(s).reshape(-1)[0]), 0, arr.shape[k] - sizes[k]))
              for k, s in enumerate(v[1:])]
    sl = tuple(slice(s, s + n) for s, n in zip(starts, sizes))
    return arr[sl].reshape(dims)
  if op == "slice":
    spec = re.search(r"slice=\{(.*?)\}", ins.attrs).group(1)
    parts = re.findall(r"\[(\d+):(\d+)(?::(\d+))?\]", spec)
    sl = tuple(slice(int(a), int(b), int(c or 1)) for a, b, c in parts)
    return np.asarray(v[0])[sl]
  return Unknown()


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
    if not _known(go):
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

    if _known(idx):
      k = int(np.asarray(idx.a).reshape(-1)[0])
      b = (0 if k else 1) if pred else (k if 0 <= k < n else n - 1)
      how = "device branch" if idx.device else "fixed branch"
      return self.walk(branch_frame(b), mult, in_cond, f"{path}/{ins.name}[{how} {b}]")
    if _dev(idx):
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


_DEFINES = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-#:]+\s*=\s*\S")


def instructions(text: str) -> int:
  """Lines of an HLO (or StableHLO) module that define a value: its instructions
  (operations), not the metadata tables (``FileNames``, ``StackFrames``) or
  the location aliases (``#loc12 = ...``) that the text also holds."""
  return sum(1 for line in text.splitlines()
             if not line.startswith("#") and _DEFINES.match(line))


__all__ = ["count", "parse_module", "shapes", "nbytes", "num_devices", "instructions",
           "FLOP_MODELS", "Unknown"]
