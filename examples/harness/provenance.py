"""Where a result came from: commit, command line, versions, device, date.

Every JSON written by an example or a benchmark carries
``record["provenance"] = provenance.collect()``, so that two runs of the same
version can be told apart and a table can say which commit produced it::

    {"git": {"commit": "ce9e377...", "dirty": true, "dirty_files": [...],
             "untracked_files": [...], ...},
     "command": "python examples/demo.py --epochs 6", "argv": [...],
     "cwd": "/work/main", "date": "2026-12-02T11:20:20+00:00",
     "versions": {"python": ..., "jax": ..., "jaxlib": ..., "flax": ...,
                  "optax": ..., "eva_optax": ..., "numpy": ...},
     "device": {"platform": "cpu", "kind": "cpu", "count": 1, ...},
     "environment": {"OPENBLAS_NUM_THREADS": "1", "XLA_FLAGS": null, ...}}

``dirty`` is true when tracked files differ from the commit or untracked
files are present (``dirty_files``, ``untracked_files`` list them), so a dirty
run's numbers may come from code that no commit holds. ``command`` is the process's own command line; a run started from
Python (a test calling ``main(argv)``) records that process's command, and the
parsed flags are in the record's ``config``.

Use from ``examples/`` (the directory is on ``sys.path`` when a script there
runs)::

    from harness import provenance
    record["provenance"] = provenance.collect()

and from ``benchmarks/`` (or anywhere in the repository)::

    import os, sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "examples"))
    from harness import provenance  # pylint: disable=g-import-not-at-top

Nothing here imports jax until :func:`collect` runs, so the module is cheap to
import.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex", "numpy")
ENVIRONMENT = ("OPENBLAS_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS",
               "JAX_ENABLE_X64", "CUDA_VISIBLE_DEVICES")


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(("git", "-C", REPO) + args, capture_output=True,
                         text=True, timeout=20, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


MAX_FILES = 100  # longer file lists are cut (the count is kept)


def git_state() -> dict[str, Any]:
  """``{"commit", "dirty", "dirty_files", "untracked_files", ...}`` of the
  repository holding this file.

  ``dirty`` is true when tracked files differ from the commit or files that
  git does not ignore are untracked (an untracked module can be imported, so
  either may make the run's code differ from the commit's). ``commit`` is None
  outside a git checkout (e.g. an unpacked sdist); then ``dirty`` is None too.
  """
  commit = _git("rev-parse", "HEAD")
  if not commit:
    return {"commit": None, "dirty": None, "dirty_files": [],
            "untracked_files": []}
  status = _git("status", "--porcelain", "--untracked-files=all") or ""
  lines = [line for line in status.splitlines() if line.strip()]
  changed = [line[3:] for line in lines if not line.startswith("??")]
  untracked = [line[3:] for line in lines if line.startswith("??")]
  return {"commit": commit, "dirty": bool(changed or untracked),
          "dirty_files": changed[:MAX_FILES], "n_dirty_files": len(changed),
          "untracked_files": untracked[:MAX_FILES],
          "n_untracked_files": len(untracked)}


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def versions() -> dict[str, str | None]:
  """Python and the installed versions of jax, jaxlib, flax, optax, chex,
  numpy and eva_optax (its ``__version__``: an editable install reports the
  checkout's)."""
  import eva_optax  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version()}
  out.update({p: _version(p) for p in PACKAGES})
  out["eva_optax"] = eva_optax.__version__
  return out


def device() -> dict[str, Any]:
  """The default JAX device (platform, kind, count) and the host's CPUs."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return {"platform": dev.platform, "kind": dev.device_kind,
          "count": jax.device_count(), "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "processor": platform.processor(),
          "system": platform.platform()}


def collect(argv: list[str] | None = None) -> dict[str, Any]:
  """The provenance of a run started now (see the module docstring).

  Args:
    argv: the command line to record; default ``sys.argv``.

  Returns:
    A JSON-ready dict.
  """
  argv = list(sys.argv if argv is None else argv)
  return {
      "git": git_state(),
      "command": shlex.join(["python", *argv]),
      "argv": argv,
      "cwd": os.getcwd(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "versions": versions(),
      "device": device(),
      "environment": {k: os.environ.get(k) for k in ENVIRONMENT},
  }


def summary(record: dict[str, Any]) -> dict[str, Any]:
  """``commit`` (or None), ``dirty``, ``command``, ``date``, ``versions`` and
  ``device`` of a record, old or new.

  Records written before provenance existed hold only top-level ``versions``
  and ``device`` (and a per-run ``finished_at``): their commit, command and
  date come back as None (the date falls back to the last ``finished_at``).
  """
  p = record.get("provenance") or {}
  git = p.get("git") or {}
  date = p.get("date")
  if date is None:
    done = [r.get("finished_at") for r in record.get("runs", {}).values()]
    done = [d for d in done if d]
    date = max(done) if done else None
  return {"commit": git.get("commit"), "dirty": git.get("dirty"),
          "command": p.get("command"), "date": date,
          "versions": p.get("versions") or record.get("versions") or {},
          "device": p.get("device") or record.get("device") or {}}
