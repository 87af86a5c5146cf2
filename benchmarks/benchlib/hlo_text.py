"""Parsing a compiled program's HLO text: computations, instructions, shapes, bytes.

The optimized HLO (``jax.jit(f).lower(...).compile().as_text()``) read as
:class:`Computation` objects of :class:`Instr` objects (:func:`parse_module`), with the
operand shapes and sizes of a type string (:func:`shapes`, :func:`nbytes`), the
device count of a module (:func:`num_devices`) and the number of instructions
of an HLO or StableHLO text (:func:`instructions`). :mod:`benchlib.hlo_work`
walks what this parses.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2,
                "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                    + r")\[([0-9,]*)\]")



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


_DEFINES = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-#:]+\s*=\s*\S")


def instructions(text: str) -> int:
  """Lines of an HLO (or StableHLO) module that define a value: its instructions
  (operations), not the metadata tables (``FileNames``, ``StackFrames``) or
  the location aliases (``#loc12 = ...``) that the text also holds."""
  return sum(1 for line in text.splitlines()
             if not line.startswith("#") and _DEFINES.match(line))


__all__ = ["Instr", "Computation", "parse_module", "shapes", "nbytes", "num_devices",
           "instructions"]
