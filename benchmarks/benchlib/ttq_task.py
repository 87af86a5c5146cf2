"""What a time-to-quality task gives the benchmark.

A :class:`Task` is a model with its mean loss, its data already on the device
in the order every row trains on, the loss it reports (test or validation) and
what the table and the figure call things. The tasks themselves are built in
:mod:`benchlib.ttq_autoencoder` and :mod:`benchlib.ttq_transformer`;
:func:`make` picks one by name.

The data are tuples of arrays (``(x,)`` for the autoencoder, ``(x, y)`` for the
language model) whose leading axis holds ``n_batches`` consecutive batches:
step ``k`` trains on batch ``k % n_batches``. The sweep's data have the same
shapes, so that the sweep and the run share one compiled step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

TASKS = ("autoencoder", "transformer")


@dataclasses.dataclass
class Task:
  """A model, its loss, its data in run order and how its loss is reported.

  Attributes:
    name: ``"autoencoder"`` or ``"transformer"``.
    description: one line for the log and the record.
    title: the figure's title.
    loss_fn: ``(params, *batch) -> mean loss`` (what is trained).
    outputs_fn: ``(params, *batch) -> outputs``: the model on a batch, the
      array the loss is computed from (``adaptive``'s ``outputs_fn``).
    adaptive_loss: the loss in the outputs, as ``eva_optax.adaptive`` names it.
    params0: the initial parameters (every row starts from them).
    data: the run's batches, in order (see the module docstring).
    sweep_data: the sweep's batches, same shapes.
    batch: examples per step.
    steps_per_epoch: steps per epoch.
    epochs: epochs per row.
    evaluate: ``params -> reported loss`` (test or validation set).
    sweep_evaluate: ``params -> loss`` on the sweep's held-out examples.
    metric: the key of the reported loss in each evaluation (``"test_mse"``).
    metric_label: its name in tables and figures (``"test MSE"``).
    lr_centers: each fixed-rate row's sweep centre.
    sweep_steps: steps of each sweep run (default of ``--sweep-steps``).
    inverse_every: the default inverse refresh interval (K-FAC, FOOF, Shampoo).
    labels: row labels that differ from the usual ones (``adam``: ``AdamW``).
    options: extra arguments of every preconditioner (``layer_views``).
    config: what the record says about the model and the data.
    evals_per_epoch: evaluations per epoch.
    targets: fixed losses the table reports a reach for, ``{loss: what}``.
    reference_curve: an outside method's reported losses after epochs 1, 2,
      ...: ``{"label": ..., "losses": [...], "note": ...}`` or None.
  """

  name: str
  description: str
  title: str
  loss_fn: Callable[..., Any]
  outputs_fn: Callable[..., Any]
  adaptive_loss: str
  params0: Any
  data: tuple[jax.Array, ...]
  sweep_data: tuple[jax.Array, ...]
  batch: int
  steps_per_epoch: int
  epochs: int
  evaluate: Callable[[Any], Any]
  sweep_evaluate: Callable[[Any], Any]
  metric: str
  metric_label: str
  lr_centers: dict[str, float]
  sweep_steps: int
  inverse_every: int = 10
  labels: dict[str, str] = dataclasses.field(default_factory=dict)
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  config: dict[str, Any] = dataclasses.field(default_factory=dict)
  evals_per_epoch: int = 2
  targets: dict[float, str] = dataclasses.field(default_factory=dict)
  reference_curve: dict[str, Any] | None = None

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.epochs

  @property
  def n_batches(self) -> int:
    return self.data[0].shape[0] // self.batch

  def batch_index(self, k: int) -> int:
    """Which batch of ``data`` global step ``k`` trains on."""
    return k % self.n_batches

  def batch_at(self, data: tuple[jax.Array, ...], i) -> tuple[jax.Array, ...]:
    """Batch ``i`` of ``data`` (``i`` may be traced: a dynamic slice)."""
    return tuple(jax.lax.dynamic_slice_in_dim(a, i * self.batch, self.batch)
                 for a in data)


def make(name: str, args) -> Task:
  """The task ``name`` (:data:`TASKS`) with the command line's settings."""
  # pylint: disable=g-import-not-at-top
  if name == "autoencoder":
    from . import ttq_autoencoder
    return ttq_autoencoder.make(args)
  if name == "transformer":
    from . import ttq_transformer
    return ttq_transformer.make(args)
  raise ValueError(f"unknown task {name!r}; choose from {TASKS}")
