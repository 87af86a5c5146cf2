"""The time-to-quality task on the character-level GPT of ``examples/``.

The model, the data and their sizes are those of ``examples/transformer_lm.py``
at its defaults (read from its parser, so the two stay one setting): the
King James Bible (``make data``), characters as tokens, the last 10% of the
text the validation text (1,024 evenly spaced windows of 64 characters);
3,200 training windows at random positions of the first 90% of the training
text and 256 from its last 10% (the sweep's held-out windows), all 3,456
trained on, in batches of 32 (108 steps per epoch), 4 epochs. Each epoch
visits the windows in a new order, drawn exactly as the example draws them
(``numpy.random.default_rng(seed).permutation`` once per epoch), so that a
fixed-rate row at the example's rate trains on the same batches as the
example's run. The model: 2 pre-LayerNorm blocks under ``nn.scan`` (causal
attention with 4 heads, a GELU MLP 64-256-64), width 64, a bias-free head:
111,744 parameters. The reported loss is the validation cross-entropy in nats
per character, after every half epoch.

The sweep trains on the 3,200 windows alone (in an order of their own, the run's
schedule from step 0) and scores on the 256 held-out windows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import eva_optax

from . import ttq_task

SWEEP_STEPS = 100   # one pass over the 3,200 fitting windows


def _evaluator(loss_fn, chunk: int):
  """``(params, x, y) -> mean loss`` over windows, ``chunk`` at a time."""
  @jax.jit
  def evaluate(params, x, y):
    xs = x.reshape((-1, chunk) + x.shape[1:])
    ys = y.reshape((-1, chunk) + y.shape[1:])
    return jnp.mean(jax.lax.map(lambda b: loss_fn(params, *b), (xs, ys)))
  return evaluate


def _in_order(x, y, orders, batch):
  """``x`` and ``y`` in the concatenated ``orders``, whole batches only."""
  idx = np.concatenate([o[:len(o) // batch * batch] for o in orders])
  return jnp.asarray(x[idx]), jnp.asarray(y[idx])


def make(args) -> ttq_task.Task:
  """The task at the example's defaults (``--quick``: its ``--small``)."""
  # pylint: disable=g-import-not-at-top  (examples/ is on sys.path)
  import text_data
  import transformer_lm
  from char_gpt import CharGPT, loss_and_metrics
  ex = transformer_lm.parser().parse_args([])
  if args.quick:
    for k, v in transformer_lm.SMALL.items():
      setattr(ex, k, v)
  epochs = args.epochs or ex.epochs
  corpus = text_data.load(getattr(args, "text", None))
  splits = text_data.make_splits(
      corpus, context=ex.context, n_train=ex.train_windows,
      n_sweep_val=ex.sweep_validation, n_val=ex.val_windows, seed=args.seed)
  model = CharGPT(vocab=len(splits.vocab), context=ex.context, width=ex.width,
                  layers=ex.layers, heads=ex.heads, tie=ex.tie, scan=ex.scan)

  def outputs_fn(params, x, y=None):
    del y
    return model.apply({"params": params}, x)

  def loss_fn(params, x, y):
    return loss_and_metrics(outputs_fn(params, x), x, y)[0]

  batch = ex.batch_size
  n_train = len(splits.x_train)          # fitting + held-out windows
  steps_per_epoch = n_train // batch
  rng = np.random.default_rng(args.seed)  # as harness.train draws its orders
  data = _in_order(splits.x_train, splits.y_train,
                   [rng.permutation(n_train) for _ in range(epochs)], batch)
  n_fit = ex.train_windows
  sweep_rng = np.random.default_rng(args.seed + 1)
  passes = -(-epochs * steps_per_epoch * batch // (n_fit // batch * batch))
  sx, sy = _in_order(splits.x_train[:n_fit], splits.y_train[:n_fit],
                     [sweep_rng.permutation(n_fit) for _ in range(passes)],
                     batch)
  total = data[0].shape[0]
  sweep_data = (sx[:total], sy[:total])
  x_val, y_val = jnp.asarray(splits.x_val), jnp.asarray(splits.y_val)
  x_held = jnp.asarray(splits.x_train[n_fit:])
  y_held = jnp.asarray(splits.y_train[n_fit:])
  chunk = lambda n: 256 if n % 256 == 0 else n
  val_eval = _evaluator(loss_fn, chunk(len(x_val)))
  held_eval = _evaluator(loss_fn, chunk(len(x_held)))
  x0, y0 = data[0][:batch], data[1][:batch]
  params0 = jax.jit(model.init)(jax.random.PRNGKey(args.seed), x0[:1])["params"]
  views = eva_optax.layer_views(loss_fn, params0, x0, y0)
  n_params = int(optax.tree.size(params0))
  shape = (f"{ex.layers} blocks (nn.scan={ex.scan}), width {ex.width}, "
           f"{ex.heads} heads, context {ex.context}")
  return ttq_task.Task(
      name="transformer",
      description=(f"character-level GPT on {splits.info['corpus']}: {shape}, "
                   f"{n_params:,} parameters; {n_train} windows per epoch in "
                   f"batches of {batch}, {epochs} epochs, validation loss on "
                   f"{len(x_val)} windows every half epoch"),
      title=(f"Character-level GPT on {splits.info['corpus']} ({shape}), "
             f"batch {batch}, {epochs} epochs: time to quality"),
      loss_fn=loss_fn, outputs_fn=outputs_fn,
      adaptive_loss="softmax_cross_entropy", params0=params0, data=data,
      sweep_data=sweep_data, batch=batch, steps_per_epoch=steps_per_epoch,
      epochs=epochs, evaluate=lambda p: val_eval(p, x_val, y_val),
      sweep_evaluate=lambda p: held_eval(p, x_held, y_held),
      metric="val_loss", metric_label="validation loss (nats per character)",
      lr_centers=dict(transformer_lm.DEFAULT_LRS),
      sweep_steps=args.sweep_steps or SWEEP_STEPS,
      inverse_every=transformer_lm.OPTIONS["kfac"]["inverse_every"],
      labels={"adam": "AdamW"}, options={"layer_views": views},
      config={"model": {"layers": ex.layers, "width": ex.width,
                        "heads": ex.heads, "context": ex.context,
                        "tie": ex.tie, "scan": ex.scan,
                        "parameters": n_params},
              "batch": batch, "train_windows": n_train,
              "steps_per_epoch": steps_per_epoch,
              "validation_windows": len(x_val),
              "sweep_held_out_windows": len(x_held),
              "sweep_fit_windows": n_fit, "data": splits.info,
              "adam": "optax.adam = AdamW at the example's weight decay, 0",
              "loss": "softmax cross-entropy, nats per character (mean over "
                      "windows and positions)"})
