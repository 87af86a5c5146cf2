"""What crosses the devices in a compiled step: the collectives in its HLO text
(count and operand bytes), and the floats each method must communicate per step
by the analytic count, for benchmarks/scaling.py."""

from __future__ import annotations

import re
from typing import Any

COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather", "collective-permute",
               "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2,
                "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(?P<result>.*?)\s(?P<op>" + "|".join(COLLECTIVES)
                 + r")(?P<start>-start)?\((?P<operands>.*?)\)(?:,|$)")


def shape_bytes(text: str) -> int:
  """Total bytes of every ``dtype[dims]`` in ``text``."""
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES[dtype]
  return total


def collective_bytes(hlo: str) -> dict[str, Any]:
  """Operand bytes of every collective in an HLO module's text.

  Returns ``{"entry": {kind: {"count", "bytes"}}, "nested": {...},
  "entry_bytes": int, "nested_bytes": int, "ops": [...]}``. Operand shapes are
  read from the operand list (the result's when the text omits them); an
  ``-start``/``-done`` pair counts once (the start).
  """
  out: dict[str, Any] = {"entry": {}, "nested": {}, "ops": []}
  computation, is_entry = "", False
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      head = line.split()
      is_entry = head[0] == "ENTRY"
      computation = head[1] if is_entry else head[0]
      continue
    m = _OP.search(line)
    if m is None:
      continue
    nbytes = shape_bytes(m.group("operands")) or shape_bytes(m.group("result"))
    where = "entry" if is_entry else "nested"
    slot = out[where].setdefault(m.group("op"), {"count": 0, "bytes": 0})
    slot["count"] += 1
    slot["bytes"] += nbytes
    out["ops"].append({"op": m.group("op"), "bytes": nbytes,
                       "computation": computation.lstrip("%")})
  for where in ("entry", "nested"):
    out[f"{where}_bytes"] = sum(v["bytes"] for v in out[where].values())
  return out


def analytic_floats(widths: tuple[int, ...]) -> dict[str, int]:
  """Per-step floats: the gradient, and each method's statistics, summed over layers.

  ``widths`` are the autoencoder's layer widths; its input has the last width.
  """
  d0 = widths[-1]
  dims = list(zip((d0,) + tuple(widths[:-1]), widths))
  return {
      "gradient": sum(i * o + o for i, o in dims),
      "loss": 1,
      "eva": sum(i + 1 + o for i, o in dims),          # a (with the bias 1) and g
      "eva_without_bias_entry": sum(i + o for i, o in dims),
      "eva_f": sum(i + 1 for i, o in dims),            # a only
      "eva_f_without_bias_entry": sum(i for i, o in dims),
      "kfac": sum((i + 1) ** 2 + o ** 2 for i, o in dims),   # A and G
      "layers": len(dims),
  }
