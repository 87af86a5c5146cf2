"""Scalar evaluation over HLO text: branch indices and loop bounds, per device.

A ``conditional``'s branch index or a ``while`` loop's bound, evaluated from
the program text for one device: constants, ``partition-id()`` /
``replica-id()``, element-wise arithmetic, tuples and the parameters of the
enclosing computations (:class:`Frame`). What the text does not fix is
:class:`Unknown` (``device=True`` where it depends on the device).
:mod:`benchlib.hlo_work` uses it to charge each device its own branch.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import numpy as np

from .hlo_text import Computation, Instr, shapes



@dataclasses.dataclass(frozen=True)
class Unknown:
  """A value the program text does not fix; ``device``: it depends on the device."""
  device: bool = False


@dataclasses.dataclass(frozen=True)
class Val:
  """A value the program text fixes; ``device``: it depends on the device."""
  a: Any                   # a numpy array
  device: bool = False


def depends_on_device(v: Any) -> bool:
  return isinstance(v, (Unknown, Val)) and v.device


def _u(*vals) -> Unknown:
  return Unknown(any(depends_on_device(v) for v in vals))


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


def is_known(v: Any) -> bool:
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
    if not all(is_known(x) for x in v):
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


