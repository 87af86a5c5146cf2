"""Shared pieces of the benchmarks in ``benchmarks/``.

* :mod:`benchlib.problems`: the models on random data;
* :mod:`benchlib.optimizers`: the optimizers timed and their gradient functions;
* :mod:`benchlib.timing`: interleaved, paired timing and the hang guard;
* :mod:`benchlib.diagnostics`: direction cosine, Eva's state size, breakdown;
* :mod:`benchlib.report`: the markdown tables;
* :mod:`benchlib.hlo_work`: work (LAPACK flops, loop trips, each device's
  branch) and collective bytes per device, counted from compiled HLO text,
  which :mod:`benchlib.hlo_text` parses and :mod:`benchlib.hlo_eval` evaluates
  (branch indices, loop bounds);
* :mod:`benchlib.collectives`: collective bytes of the entry computation and
  the analytic per-step floats;
* :mod:`benchlib.compile_stats`: lower and compile times, program sizes,
  StableHLO operations by source line;
* :mod:`benchlib.scaling_report`: benchmarks/scaling.py's tables and figure;
* ``benchlib.ttq_*`` (benchmarks/time_to_quality.py): :mod:`benchlib.ttq_task`
  with the tasks :mod:`benchlib.ttq_autoencoder` and
  :mod:`benchlib.ttq_transformer`, the rows and their settings
  (:mod:`benchlib.ttq_rows`), training, sweep and step ratio
  (:mod:`benchlib.ttq_train`), the record and table (:mod:`benchlib.ttq_report`),
  ``--explore`` (:mod:`benchlib.ttq_explore`) and the flags
  (:mod:`benchlib.ttq_cli`); :mod:`benchlib.loadavg`: timings on a quiet machine.

A script in ``benchmarks/`` runs with that directory on ``sys.path``, so
``import benchlib`` works. The provenance record and the plot style live with
the examples' harness; :func:`add_examples_to_path` makes them importable::

    import benchlib
    benchlib.add_examples_to_path()
    from harness import provenance, style  # pylint: disable=g-import-not-at-top
    record["provenance"] = provenance.collect()
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
EXAMPLES = os.path.join(ROOT, "examples")


def add_examples_to_path() -> None:
  """Puts ``examples/`` on ``sys.path`` (for ``import harness``)."""
  if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
