"""The JSON records of the comparisons: writing, reading, appending runs."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from . import optimizers


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def write_json(path: str, record: dict[str, Any]) -> str:
  """Writes ``record`` to ``path`` (directories created), returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1, default=_json_default, allow_nan=True)
  return path


def read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
  """``new``'s runs added to (or replacing) those of the ``old`` record.

  The earlier record's configuration and provenance are kept at the top
  level; the new ones are listed in ``appended``. Each run keeps its own
  hyperparameters, ``finished_at`` and load averages, and the sweep results
  are merged per optimizer.
  """
  runs = {**old.get("runs", {}), **new["runs"]}
  runs = {n: runs[n] for n in optimizers.OPTIMIZERS if n in runs}
  merged = dict(old)
  merged["runs"] = runs
  for key in ("learning_rates", "options"):
    merged[key] = {n: {**old.get(key, {}), **new[key]}[n] for n in runs}
  if new.get("sweep"):
    sweep = old.get("sweep") or {k: v for k, v in new["sweep"].items()
                                 if k != "optimizers"}
    sweep = dict(sweep)
    sweep["optimizers"] = {**sweep.get("optimizers", {}),
                           **new["sweep"]["optimizers"]}
    merged["sweep"] = sweep
  merged["appended"] = old.get("appended", []) + [
      {"optimizers": list(new["runs"]), "config": new["config"],
       "provenance": new.get("provenance")}]
  return merged
