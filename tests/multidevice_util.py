"""Run a Python script in a fresh interpreter with several virtual CPU devices.

The pytest process has one device and XLA reads ``--xla_force_host_platform_device_count``
only when its CPU backend starts, so every multi-device test runs its script in a
subprocess and reads back the JSON object the script prints on its last line.

Usage (scripts live in ``tests/multidevice/``)::

  from multidevice_util import run_script
  result = run_script("jit_data_parallel.py", devices=8, timeout=300)

``run_processes`` starts several cooperating processes (``jax.distributed``) on a
localhost coordinator and returns each one's JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from conftest import FAST_COMPILE_FLAGS  # pylint: disable=g-bad-import-order
from conftest import float32_tol  # pylint: disable=g-bad-import-order

# XLA flags that cut the CPU compile time of the small test programs ~5x
# (measured on the jit script's K-FAC step: 8.8 s -> 1.6 s of CPU), those of
# examples/harness/xla_flags.py that the installed jaxlib accepts. Compilation
# dominates these tests; both sides of every comparison are compiled with the
# same flags.
FAST_COMPILE = {"XLA_FLAGS": FAST_COMPILE_FLAGS}

# The statistics of the multi-device scripts' 64-example batch (the conv's rows:
# 64 examples x 16 positions) are float32 sums that sharding re-associates (8
# partial sums, then an all-reduce); the per-example work is the same on every
# device. Each side is within 64 x 16 + 8 + 3 roundings of the exact statistic,
# relative to the magnitude of its terms, so the two differ by at most twice that
# (norm-relative: assuming the terms do not cancel below the result's norm, as
# for these means of activations and of dL/dy). A statistic 8x off (a psum where
# a pmean belongs) is off by 7, far outside.
SHARDED_STATS_TOL = 2 * float32_tol(1.0, 64 * 16 + 8 + 3)

TESTS_DIR = pathlib.Path(__file__).resolve().parent
SCRIPTS_DIR = TESTS_DIR / "multidevice"
REPO_ROOT = TESTS_DIR.parent


def script_env(devices: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of a script: CPU only, ``devices`` virtual devices.

  ``extra["XLA_FLAGS"]`` is appended to the inherited flags; other entries of
  ``extra`` replace the inherited variables.

  The repository root goes first on ``PYTHONPATH`` so the script imports the
  same ``eva_optax`` as the tests; one OpenBLAS thread (the machine is shared).
  """
  extra = dict(extra or {})
  env = dict(os.environ)
  flags = [f for f in (env.get("XLA_FLAGS", "") + " " + extra.pop("XLA_FLAGS", "")).split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("OPENBLAS_NUM_THREADS", "1")
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env.update(extra)
  return env


def _script_path(path_or_code: str | os.PathLike) -> tuple[pathlib.Path, bool]:
  """``(path, is_temporary)``: a script name in tests/multidevice, a path, or code."""
  text = str(path_or_code)
  if "\n" not in text and text.endswith(".py"):
    path = pathlib.Path(text)
    if not path.is_absolute() and not path.exists():
      path = SCRIPTS_DIR / text
    if not path.exists():
      raise FileNotFoundError(f"no script {text!r} (looked in {SCRIPTS_DIR})")
    return path, False
  fd, name = tempfile.mkstemp(suffix=".py", prefix="eva_md_", dir=SCRIPTS_DIR)
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return pathlib.Path(name), True


def _last_json(stdout: str) -> dict[str, Any] | None:
  for line in reversed(stdout.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        return json.loads(line)
      except json.JSONDecodeError:
        return None
  return None


def _describe(cmd: Sequence[str], proc_rc: Any, stdout: str, stderr: str,
              why: str) -> str:
  tail = lambda s, n=6000: s if len(s) <= n else "...\n" + s[-n:]
  return (f"{why}\ncommand: {' '.join(map(str, cmd))}\nexit status: {proc_rc}\n"
          f"--- stdout ---\n{tail(stdout, 2000)}\n--- stderr ---\n{tail(stderr)}")


def run_script(path_or_code: str | os.PathLike, devices: int = 8, timeout: float = 300,
               args: Sequence[str] = (), env: dict[str, str] | None = None) -> dict[str, Any]:
  """Runs a script with ``devices`` virtual CPU devices; returns its last-line JSON.

  Args:
    path_or_code: a file name in ``tests/multidevice/``, a path, or Python source
      (written to a temporary file in ``tests/multidevice/``, so it can import
      ``_common``).
    devices: the value of ``--xla_force_host_platform_device_count``.
    timeout: seconds before the script is killed (the test then fails).
    args: command-line arguments for the script.
    env: extra environment variables.

  Returns:
    The JSON object on the last line of the script's stdout.

  Raises:
    AssertionError: the script failed, timed out or printed no JSON; the message
      holds its stderr.
  """
  path, temporary = _script_path(path_or_code)
  cmd = [sys.executable, str(path), *map(str, args)]
  try:
    try:
      proc = subprocess.run(cmd, cwd=REPO_ROOT, env=script_env(devices, env),
                            capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
      raise AssertionError(_describe(cmd, "killed", out, err,
                                     f"timed out after {timeout} s")) from None
  finally:
    if temporary:
      path.unlink(missing_ok=True)
  result = _last_json(proc.stdout)
  if proc.returncode != 0 or result is None:
    why = "failed" if proc.returncode != 0 else "printed no JSON on its last line"
    raise AssertionError(_describe(cmd, proc.returncode, proc.stdout, proc.stderr,
                                   f"script {path.name} {why}"))
  return result


def free_port() -> int:
  """A TCP port that is free on localhost right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(script: str | os.PathLike, num_processes: int, devices_per_process: int,
                  timeout: float = 120, args: Sequence[str] = (),
                  env: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """Starts ``num_processes`` copies of a script that join one ``jax.distributed`` job.

  Each copy gets ``--coordinator localhost:PORT --num-processes N --process-id I``
  (then ``args``), ``devices_per_process`` virtual CPU devices and the
  environment of :func:`script_env` (``env`` as there). All are waited for
  (killed together on timeout); returns their JSON results by process id.
  """
  path, _ = _script_path(script)
  port = free_port()
  procs, cmds, files = [], [], []
  # Output goes to files, not pipes: a process blocked on a full pipe that
  # nobody reads would never reach the others' shutdown barrier.
  with contextlib.ExitStack() as stack:
    for i in range(num_processes):
      cmd = [sys.executable, str(path), "--coordinator", f"localhost:{port}",
             "--num-processes", str(num_processes), "--process-id", str(i),
             *map(str, args)]
      out_f = stack.enter_context(tempfile.TemporaryFile("w+"))
      err_f = stack.enter_context(tempfile.TemporaryFile("w+"))
      cmds.append(cmd)
      files.append((out_f, err_f))
      procs.append(subprocess.Popen(
          cmd, cwd=REPO_ROOT, env=script_env(devices_per_process, env),
          stdout=out_f, stderr=err_f, text=True))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        timed_out = True
        break
    if timed_out:
      for p in procs:     # only the processes started here
        if p.poll() is None:
          p.kill()
      for p in procs:
        p.wait()
    outputs = []
    for p, (out_f, err_f) in zip(procs, files):
      out_f.seek(0)
      err_f.seek(0)
      rc = "killed" if p.returncode is not None and p.returncode < 0 else p.returncode
      outputs.append((rc, out_f.read(), err_f.read()))
  results = []
  for i, (rc, out, err) in enumerate(outputs):
    result = _last_json(out)
    if timed_out or rc != 0 or result is None:
      why = (f"timed out after {timeout} s" if timed_out else
             "failed" if rc != 0 else "printed no JSON on its last line")
      others = "\n\n".join(_describe(cmds[j], outputs[j][0], outputs[j][1], outputs[j][2],
                                     f"process {j}") for j in range(num_processes) if j != i)
      raise AssertionError(_describe(cmds[i], rc, out, err, f"process {i} {why}")
                           + "\n\n" + others)
    results.append(result)
  return results
