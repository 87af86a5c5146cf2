"""A character-level GPT on the King James Bible: seven optimizers compared.

Model (Flax linen, GPT style): token and position embeddings (``nn.Embed``),
``--layers`` pre-LayerNorm blocks under ``nn.scan`` (causal multi-head
attention, ``nn.MultiHeadDotProductAttention(use_bias=False)`` as Flax's own
transformers configure it, then a GELU MLP of width ``4 * --width``), a final
LayerNorm and the output logits: a bias-free ``nn.Dense`` head, or with
``--tie`` the token embedding itself (``Embed.attend``). Loss: cross-entropy in
nats per character, the mean over the batch and the positions of each window.

Data (see ``text_data.py``): the King James Bible from Debian's ``bible-kjv``
(``make data``) or any text file (``--text``); characters as tokens; the last
10% of the text is the validation text; training windows of ``--context``
characters at random positions (fixed seed). The harness counts in epochs: an
epoch is one pass over the ``--train-windows`` windows (plus the sweep's
held-out windows, see below), in batches of ``--batch-size``, and the
validation loss is measured after each one; the figure's left panel is drawn
against steps.

Optimizers: AdamW (optax.adam: weight decay 0 for every optimizer here, so
this is AdamW at zero decay; the cosine diagnostic reads the momentum buffer
and would mix in the decay otherwise), SGD, Eva, Eva-f, Eva-s, K-FAC, Shampoo
(FOOF on request), heavy-ball momentum 0.9 for all but Adam, learning rate
decayed linearly to 0. Every preconditioner gets the capture's layer views
(``eva_optax.layer_views``), which tell Eva, Eva-f, K-FAC and FOOF that the
scanned kernels are stacks of layers and how the bias-free attention
projections are read, and tell Eva-s and Shampoo to precondition each slice
of a stacked kernel as its own tensor.

    python examples/transformer_lm.py --sweep          # sweep, then train
    python examples/transformer_lm.py --small          # the test's setting
    python examples/transformer_lm.py --text my.txt --optimizers adam,eva

On a two-core CPU, K-FAC on the scanned model can hang: jaxlib 0.10.2's
batched Cholesky (the damped inverses of the stacked factors) waits on both
XLA worker threads at once. ``--optimizers kfac --no-scan --append`` trains it
on the unrolled model (the same function and the same layers), which is how
the K-FAC row of docs/results.md was produced.
"""

from __future__ import annotations

import os

# One OpenBLAS thread (see classifier.py): set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import inspect
import sys
from typing import Any

import jax
import numpy as np

import eva_optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
import text_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from char_gpt import Block, CharGPT, JitInit, lm_loss, loss_and_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import

NAME = "transformer_lm"
DEFAULT_OPTIMIZERS = ("sgd", "adam", "eva", "eva_f", "eva_s", "kfac",
                      "shampoo")
# Centres of the sweep's grids: Adam's usual 3e-3 for a small character
# model, 0.3 for SGD-with-momentum and the preconditioners that keep the
# gradient's scale (Eva's and K-FAC's KL scaling, Shampoo's SGD graft).
START_LRS = {"sgd": 0.3, "adam": 0.003, "eva": 0.3, "eva_f": 0.3,
             "eva_s": 0.3, "kfac": 0.3, "foof": 0.3, "shampoo": 0.3}
# Without --sweep: the values the sweep chose (2 epochs on 1,600 windows,
# scored on 256 windows of held-out training text; every value tried and its
# loss are in examples/results/transformer_lm.json). SGD, Eva-s and Shampoo
# chose the lowest value tried after two extensions of the grid (x1/27 of the
# centre). K-FAC's value was swept on the unrolled model (--no-scan; see
# docs/results.md: its batched Cholesky hangs on a 2-core CPU); FOOF was not swept.
DEFAULT_LRS = {**START_LRS, "sgd": 0.0111, "adam": 0.003, "eva": 0.1,
               "eva_f": 0.3, "eva_s": 0.0111, "kfac": 0.3, "shampoo": 0.0111}
# Inverses every 10 steps (the authors' CIFAR K-FAC setting).
OPTIONS = {"kfac": {"inverse_every": 10}, "foof": {"inverse_every": 10},
           "shampoo": {"inverse_every": 10}}
LAYERWISE = ("eva", "eva_f", "kfac", "foof")
PER_TENSOR = ("eva_s", "shampoo")


# ----------------------------------------------------------------------------
# What each optimizer preconditions.


def _view_paths(views: Any) -> dict[tuple[str, ...], Any]:
  """``{layer path: LayerView}`` of :func:`eva_optax.layer_views`' tree."""
  if views is None:
    return {}
  flat = jax.tree_util.tree_flatten_with_path(views)[0]
  return {tuple(str(getattr(k, "key", k)) for k in kp): v for kp, v in flat}


def stack_depth(path: tuple[str, ...], views: dict[tuple[str, ...], Any],
                shape: tuple[int, ...] = ()) -> int:
  """How many leading axes of the leaf at ``path`` are a stack of layers, as
  Eva-s and Shampoo read it: ``len(view.stack)`` of the innermost layer in
  ``views`` that holds the leaf; for any other leaf (a scanned LayerNorm's
  ``(layers, width)`` scale) the stack of the nearest enclosing module that
  holds layers, if they all share it and the leaf's leading axes match it."""
  for n in range(len(path), -1, -1):
    if path[:n] in views:
      return len(views[path[:n]].stack)
  for n in range(len(path) - 1, -1, -1):
    inside = {v.stack for p, v in views.items() if p[:n] == path[:n]}
    if inside:
      stack = next(iter(inside))
      ok = len(inside) == 1 and stack and tuple(shape[:len(stack)]) == stack
      return len(stack) if ok else 0
  return 0


def preconditioned(stats: Any, params: Any, views: Any = None
                   ) -> dict[str, Any]:
  """Which parameters each family of optimizers preconditions.

  Layer-wise (Eva, Eva-f, K-FAC, FOOF): the weights (and biases) of the
  layers the capture captured (``stats[...].captured``); everything else gets
  the plain gradient. Per tensor (Eva-s, Shampoo): every tensor of rank >= 2
  once the stack axes its layer view names (``views``, from
  :func:`eva_optax.layer_views`) are taken off: embeddings and kernels,
  stacked or not; vectors (biases, the LayerNorms, also the ``(layers,
  width)`` stacks of the scanned ones, one vector per block) get the gradient (Eva-s) or the SGD graft (Shampoo, which is the
  gradient's step too).

  Returns:
    ``{"total": n, "layerwise": {...}, "per_tensor": {...},
    "plain_gradient": {...}}`` with, per family, the parameter count, the
    fraction and the leaves.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = {"/".join(str(getattr(k, "key", k)) for k in kp):
           tuple(str(getattr(k, "key", k)) for k in kp) for kp, _ in flat_params}
  sizes = {p: int(np.size(v)) for p, (_, v) in zip(paths, flat_params)}
  shapes = {p: tuple(np.shape(v)) for p, (_, v) in zip(paths, flat_params)}
  total = sum(sizes.values())
  captured = set()
  flat = jax.tree_util.tree_flatten_with_path(
      stats, is_leaf=lambda s: isinstance(s, eva_optax.LayerStatistics))[0]
  for kp, st in flat:
    if isinstance(st, eva_optax.LayerStatistics) and st.captured:
      prefix = "/".join(str(getattr(k, "key", k)) for k in kp)
      captured.update(p for p in sizes if p.rsplit("/", 1)[0] == prefix)
  by_path = _view_paths(views)
  tensors = {p for p in sizes
             if len(shapes[p]) - stack_depth(paths[p], by_path, shapes[p]) >= 2}

  def part(leaves):
    n = sum(sizes[p] for p in leaves)
    return {"parameters": n, "fraction": n / total, "leaves": sorted(leaves)}

  return {"total": total, "layerwise": part(captured),
          "per_tensor": part(tensors),
          "plain_gradient": {"layerwise": sorted(set(sizes) - captured),
                             "per_tensor": sorted(set(sizes) - tensors)}}


def fraction_of(name: str, info: dict[str, Any]) -> float:
  """The fraction of the parameters optimizer ``name`` preconditions."""
  if name in LAYERWISE:
    return info["layerwise"]["fraction"]
  if name in PER_TENSOR:
    return info["per_tensor"]["fraction"]
  return 0.0 if name == "sgd" else 1.0   # Adam scales every coordinate


# ----------------------------------------------------------------------------
# The task and the optimizers' options.


def make_task(args) -> tuple[harness.Task, text_data.Splits, CharGPT]:
  corpus = text_data.load(args.text)
  splits = text_data.make_splits(
      corpus, context=args.context, n_train=args.train_windows,
      n_sweep_val=args.sweep_validation, n_val=args.val_windows,
      seed=args.seed)
  model = CharGPT(vocab=len(splits.vocab), context=args.context,
                  width=args.width, layers=args.layers, heads=args.heads,
                  tie=args.tie, scan=args.scan)
  task = harness.Task(
      name=NAME, model=JitInit(model), loss_and_metrics=loss_and_metrics,
      x_train=splits.x_train, y_train=splits.y_train, x_test=splits.x_val,
      y_test=splits.y_val, batch_size=args.batch_size, eval_batch_size=256,
      loss_name="cross-entropy (nats per character)")
  return task, splits, model


def accepts_layer_views(name: str) -> bool:
  """Whether ``eva_optax.<name>`` takes ``layer_views=``."""
  fn = getattr(eva_optax, name, None)
  return fn is not None and "layer_views" in inspect.signature(fn).parameters


def optimizer_options(names, views) -> dict[str, dict[str, Any]]:
  """``OPTIONS`` plus the capture's layer views for the preconditioners.

  The layer-wise methods need them for a scanned model (their state is sized
  at ``init`` from shapes alone, which cannot tell a stack of layers from a
  tensor); Eva-s and Shampoo take them to precondition each slice of a
  stacked kernel as its own tensor (without them a ``(layers, d_in, d_out)``
  kernel would be one 3-way tensor), where this version accepts them.

  Raises:
    SystemExit: a layer-wise alias does not accept ``layer_views`` (this
      model cannot be trained with it then).
  """
  options = {n: dict(OPTIONS.get(n, {})) for n in names}
  for n in names:
    if views is None or n not in LAYERWISE + PER_TENSOR:
      continue
    if accepts_layer_views(n):
      options[n]["layer_views"] = views
    elif n in LAYERWISE:
      raise SystemExit(
          f"eva_optax.{n} does not accept layer_views= in this version, and "
          "this model needs it (scanned blocks, bias-free attention).")
  return options


# ----------------------------------------------------------------------------
# The figure: validation loss against steps and against time.


def figure(record: dict[str, Any], path: str) -> str:
  """Validation loss against optimizer steps and against the load-adjusted
  training time, one colour and marker per optimizer (``harness.style``)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = record["runs"]
  ref = harness.tables.common_reference(runs)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
  for name, rec in runs.items():
    times = harness.tables.adjusted_times(rec, ref)
    pts = [(e["epoch"] * rec["steps_per_epoch"], t, e["test_loss"])
           for e, t in zip(rec["epochs"], times) if "test_loss" in e]
    if not pts:
      continue
    kw = dict(label=rec["label"], markersize=4, **harness.style.of(name))
    axes[0].plot([p[0] for p in pts], [p[2] for p in pts], **kw)
    axes[1].plot([p[1] for p in pts], [p[2] for p in pts], **kw)
  target = harness.tables.final_loss(runs.get("adam"))
  if target is not None and len(runs) > 1:
    for ax in axes:
      harness.style.target_line(ax, target,
                                f"AdamW's final loss ({target:.4g})")
  axes[0].set_xlabel("optimizer steps")
  axes[1].set_xlabel("training wall-clock time (s)" + (
      ", load-adjusted" if ref else ""))
  for ax in axes:
    ax.set_ylabel("validation cross-entropy (nats per character)")
    ax.grid(True, alpha=0.3)
  if any(ax.get_lines() for ax in axes):
    axes[1].legend(fontsize=8)
  fig.suptitle(harness.plots.figure_title(record), fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------
# Flags and main.

SMALL = dict(layers=1, width=32, heads=2, context=32, batch_size=16,
             train_windows=96, sweep_validation=32, val_windows=32, epochs=2,
             sweep_subset=96)


def parser() -> argparse.ArgumentParser:
  p = harness.cli.parser(__doc__)
  harness.add_common_args(p, NAME, DEFAULT_LRS)
  p.set_defaults(optimizers=",".join(DEFAULT_OPTIMIZERS), epochs=4,
                 sweep_epochs=2, sweep_subset=1600, sweep_validation=256)
  p.add_argument("--text", default=None,
                 help="a UTF-8 text file (or a directory of .txt files) to "
                 "train on instead of the King James Bible")
  p.add_argument("--context", type=int, default=64,
                 help="characters per window (the model's context)")
  p.add_argument("--layers", type=int, default=2, help="transformer blocks")
  p.add_argument("--width", type=int, default=64, help="model width")
  p.add_argument("--heads", type=int, default=4, help="attention heads")
  p.add_argument("--tie", action=argparse.BooleanOptionalAction,
                 default=False,
                 help="output logits through the token embedding "
                 "(Embed.attend) instead of a Dense head")
  p.add_argument("--scan", action=argparse.BooleanOptionalAction,
                 default=True, help="blocks under nn.scan (stacked "
                 "parameters) instead of unrolled")
  p.add_argument("--batch-size", type=int, default=32,
                 help="windows per step")
  p.add_argument("--train-windows", type=int, default=3200,
                 help="training windows (random positions of the first 90%% "
                 "of the training text); an epoch passes over them and the "
                 "--sweep-validation windows")
  p.add_argument("--val-windows", type=int, default=1024,
                 help="validation windows (evenly spaced over the last 10%% "
                 "of the text)")
  p.add_argument("--small", action="store_true",
                 help="a tiny model and a few steps (the test suite): "
                 + ", ".join(f"{k}={v}" for k, v in SMALL.items()))
  return p


def main(argv=None) -> dict[str, Any]:
  args = parser().parse_args(argv)
  if args.small:
    for k, v in SMALL.items():
      setattr(args, k, v)
  task, splits, model = make_task(args)
  names = harness.parse_optimizers(args.optimizers)
  x, y = task.x_train[:args.batch_size], task.y_train[:args.batch_size]
  # Shapes are all describe() and the fractions need: no compilation here.
  params = jax.eval_shape(model.init, jax.random.PRNGKey(args.seed),
                          x[:1])["params"]
  loss_fn = lm_loss(model)
  stats = jax.eval_shape(eva_optax.value_and_grad(loss_fn), params, x, y)[2]
  # Needed scanned or not: the bias-free attention projections have several
  # output axes, which shapes alone cannot tell from several input axes.
  views = eva_optax.layer_views(loss_fn, params, x, y)
  description = eva_optax.describe(stats, params)
  print(f"Corpus: {splits.info['source']}: {splits.info['characters']:,} "
        f"characters, vocabulary {splits.info['vocabulary']}.")
  print("What the capture sees (eva_optax.describe):")
  print(description)
  info = preconditioned(stats, params, views)
  fractions = {n: fraction_of(n, info) for n in names}
  print(f"Parameters: {info['total']:,}; preconditioned: " + ", ".join(
      f"{harness.LABELS[n]} {100 * f:.1f}%" for n, f in fractions.items()))
  options = optimizer_options(names, views)
  record = harness.run_comparison(
      task, args, options=options, sweep_centers=START_LRS,
      title=(f"Character-level GPT on {splits.info['corpus']}: "
             f"{args.layers} blocks (nn.scan={args.scan}), width "
             f"{args.width}, {args.heads} heads, context {args.context}"
             + (", tied output" if args.tie else "")),
      notes={"model": {"layers": args.layers, "width": args.width,
                       "heads": args.heads, "context": args.context,
                       "tie": args.tie, "scan": args.scan,
                       "parameters": info["total"]},
             "data": splits.info,
             "loss": "softmax cross-entropy, nats per character (mean over "
                     "batch and positions)",
             "adam": "optax.adam = AdamW with weight decay 0 (no optimizer "
                     "here uses weight decay)",
             "describe": description.splitlines(),
             "preconditioned": info, "preconditioned_fraction": fractions,
             "start_learning_rates": START_LRS})
  figure(record, record["paths"]["png"])
  return record


if __name__ == "__main__":
  main()
