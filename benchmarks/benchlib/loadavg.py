"""Timings taken on a quiet machine: the load average before and after, and a
bounded number of re-timings when it was too high.

The 1-minute load average counts this process's own busy threads too: right
after minutes of training on 2 cores it reads about 2 on an otherwise idle
machine, and it decays with a time constant of a minute once the process
waits. :func:`when_quiet` therefore waits (polling) for the 1-minute figure to
fall to ``max_load`` before timing, times, reads it again, and re-times (a
bounded number of times) when either reading was above ``max_load``. It keeps
the timing of the first quiet attempt or, when none was quiet, the attempt
with the lowest load, and says which in its record.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable


def now() -> list[float]:
  """The 1-, 5- and 15-minute load averages, rounded."""
  return [round(x, 2) for x in os.getloadavg()]


def wait_until(max_load: float, max_wait: float, poll: float = 5.0) -> float:
  """Sleeps until the 1-minute load average is at most ``max_load``, at most
  ``max_wait`` seconds; returns the seconds waited."""
  t0 = time.perf_counter()
  while os.getloadavg()[0] > max_load and time.perf_counter() - t0 < max_wait:
    time.sleep(min(poll, max(0.0, max_wait - (time.perf_counter() - t0))))
  return round(time.perf_counter() - t0, 1)


def when_quiet(measure: Callable[[], Any], max_load: float, retries: int,
               max_wait: float, log=print) -> tuple[Any, dict[str, Any]]:
  """``measure()`` timed with the 1-minute load at most ``max_load``.

  Up to ``retries + 1`` attempts; before each, waits up to ``max_wait``
  seconds for the load to fall. Returns the kept result and a record:
  ``max_load``, every attempt's ``load_before``/``load_after`` (1, 5, 15
  minutes), ``waited_s`` and ``result``, ``used`` (the kept attempt's index),
  ``quiet`` (whether it was taken under ``max_load``) and ``note``.
  """
  attempts = []
  for i in range(retries + 1):
    waited = wait_until(max_load, max_wait) if max_wait > 0 else 0.0
    before = now()
    result = measure()
    after = now()
    attempts.append({"load_before": before, "load_after": after,
                     "waited_s": waited, "result": result})
    if max(before[0], after[0]) <= max_load:
      break
    if i < retries and log:
      log(f"    timed under load {before[0]:.1f} / {after[0]:.1f} (1-minute "
          f"average, before / after) > {max_load:g}: re-timing "
          f"({i + 1}/{retries})")
  loud = lambda a: max(a["load_before"][0], a["load_after"][0])
  quiet = [i for i, a in enumerate(attempts) if loud(a) <= max_load]
  used = quiet[0] if quiet else min(range(len(attempts)),
                                    key=lambda i: loud(attempts[i]))
  note = (f"attempt {used + 1} of {len(attempts)}, 1-minute load at most "
          f"{max_load:g} before and after" if quiet else
          f"no attempt of {len(attempts)} had the 1-minute load at most "
          f"{max_load:g}; kept attempt {used + 1}, the least loaded "
          f"({loud(attempts[used]):.2f})")
  return attempts[used]["result"], {
      "max_load": max_load, "attempts": attempts, "used": used,
      "quiet": bool(quiet), "note": note}
