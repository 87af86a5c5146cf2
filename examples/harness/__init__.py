"""The training harness shared by the examples: one optimizer per run, same data.

One concept per module:

* :mod:`harness.optimizers`: the eight optimizers compared and what each needs
  from the gradient function;
* :mod:`harness.training`: :class:`Task`, the jitted step, :func:`train` (one
  run and its record) and the SGD reference timer;
* :mod:`harness.sweep`: the short learning-rate sweep;
* :mod:`harness.tables`: load-adjusted times, time to a target, the printed
  markdown table;
* :mod:`harness.plots` and :mod:`harness.style`: the figure, and the one
  colour and marker per optimizer that every figure uses;
* :mod:`harness.provenance` and :mod:`harness.records`: the commit, command,
  versions, device and date of a run, and its JSON;
* :mod:`harness.memory`: the compiled step's memory as XLA accounts it;
* :mod:`harness.cli`: the shared flags;
* :mod:`harness.comparison`: :func:`run_comparison`, all of the above in order;
* :mod:`harness.xla_flags`: the compile-time XLA flags the installed jaxlib
  accepts (standard library only: the tests load it from its file).

Scripts in ``examples/`` run with their directory on ``sys.path``, so
``import harness`` works there; elsewhere (``benchmarks/``, tests) put
``examples/`` on ``sys.path`` first (see :mod:`harness.provenance`).
"""

from __future__ import annotations

from . import cli
from . import memory
from . import optimizers
from . import plots
from . import provenance
from . import records
from . import style
from . import sweep
from . import tables
from . import training
from . import xla_flags
from .cli import add_common_args
from .cli import add_data_args
from .cli import parse_optimizers
from .comparison import run_comparison
from .optimizers import available
from .optimizers import LABELS
from .optimizers import make_optimizer
from .optimizers import OPTIMIZERS
from .optimizers import PRECONDITIONED
from .optimizers import STATISTICS
from .plots import plot
from .plots import replot
from .records import write_json
from .sweep import lr_sweep
from .sweep import sweep_grid
from .tables import adjusted_times
from .tables import common_reference
from .tables import markdown_table
from .tables import time_to_reach
from .training import cosine
from .training import make_reference
from .training import make_train_step
from .training import Task
from .training import train

__all__ = (
    "LABELS", "OPTIMIZERS", "PRECONDITIONED", "STATISTICS", "Task",
    "add_common_args", "add_data_args", "adjusted_times", "available",
    "cli", "common_reference", "cosine", "lr_sweep", "make_optimizer",
    "make_reference", "make_train_step", "markdown_table", "memory",
    "optimizers",
    "parse_optimizers", "plot", "plots", "provenance", "records", "replot",
    "run_comparison", "style", "sweep", "sweep_grid", "tables",
    "time_to_reach", "train", "training", "write_json",
)
