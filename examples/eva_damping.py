"""Does Eva's curvature act on the deep autoencoder, and does it help if it does?

Eva's Fisher block is ``v v^T + gamma I`` with ``v = a_bar (x) g_bar``. With the
loss averaged over batch x 784 (the authors' scale), ``|v|^2 = |a|^2 |g|^2`` is
about 1e-10, so at the paper's damping 0.03 the rank-one term is ~3e-9 of the
damping and Eva's update is the gradient, KL-normalized (cosine 1.000 in the
comparisons). This script measures both halves of that statement:

* ``scale``: ``|a|^2``, ``|g|^2`` and ``|v|^2`` per layer after 1, 20 and 300
  steps of Eva (lr 0.18, the sweep's choice);
* ``runs``: 20-epoch runs of Eva (linear decay, seed 0) at the given dampings
  and learning rate, with the final test loss and the mean cosine between the
  preconditioned gradient and the gradient.

    python examples/eva_damping.py scale
    python examples/eva_damping.py runs --damping 0.03,1e-9,1e-10,1e-11,1e-12
    python examples/eva_damping.py runs --damping 1e-10 --lr 0.018

Results are merged into ``--out`` (default examples/results/eva_damping_autoencoder.json),
with the provenance of the latest invocation (``provenance``) and, per run, its
commit and date.
"""

from __future__ import annotations

import os

# K-FAC's Cholesky and FOOF's and Shampoo's eigh run in the OpenBLAS bundled
# with scipy, whose results change with its thread count (and whose threads
# slow a small shared machine down): one thread, as `make` sets, unless the
# environment says otherwise. Set before numpy loads, so that running this
# file directly prints what `make demo` prints.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import autoencoder  # pylint: disable=g-import-not-at-top,wrong-import-position
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position

import eva_optax  # pylint: disable=g-import-not-at-top,wrong-import-position


def statistics_scale(task: harness.Task, lr: float, steps=(1, 20, 300)):
  """``|a|^2, |g|^2, |v|^2`` of Eva's running averages, per layer."""
  model = task.model
  params = model.init(jax.random.PRNGKey(0), task.x_train[:1])["params"]
  tx = eva_optax.eva(lr, momentum=0.9)
  state = tx.init(params)

  def loss_fn(p, x):
    out = model.apply({"params": p}, x)
    return jnp.mean((out - x.reshape(x.shape[0], -1)) ** 2)

  grad_fn = eva_optax.value_and_grad(loss_fn)

  @jax.jit
  def step(p, s, x):
    loss, g, stats = grad_fn(p, x)
    u, s = tx.update(g, s, p, stats=stats)
    return optax.apply_updates(p, u), s, loss

  rng = np.random.default_rng(0)
  out = {}
  for t in range(1, max(steps) + 1):
    idx = rng.integers(0, len(task.x_train), task.batch_size)
    params, state, loss = step(params, state, task.x_train[idx])
    if t in steps:
      (lw,) = [s for s in jax.tree.leaves(
          state, is_leaf=lambda z: isinstance(z, eva_optax.LayerwiseState))
               if isinstance(s, eva_optax.LayerwiseState)]
      rows = {}
      for name, ls in lw.layers.items():
        a2, g2 = float(jnp.sum(ls["a"] ** 2)), float(jnp.sum(ls["g"] ** 2))
        rows[name] = {"a2": a2, "g2": g2, "v2": a2 * g2}
      out[str(t)] = {"train_loss": float(loss), "layers": rows}
      print(f"step {t}: loss {float(loss):.4f}; |v|^2 per layer: " + ", ".join(
          f"{k} {v['v2']:.2g}" for k, v in rows.items()), flush=True)
  return out


def parser() -> argparse.ArgumentParser:
  p = harness.cli.parser(__doc__)
  p.add_argument("mode", choices=("scale", "runs"),
                 help="scale: |a|^2, |g|^2, |v|^2 per layer; runs: 20-epoch "
                 "Eva runs at the given dampings")
  p.add_argument("--damping", default="0.03",
                 help="comma-separated dampings (runs)")
  p.add_argument("--lr", type=float, default=autoencoder.DEFAULT_LRS["eva"],
                 help="Eva's learning rate (linear decay to 0)")
  p.add_argument("--epochs", type=int, default=20,
                 help="epochs of each run (runs)")
  p.add_argument("--train-subset", type=int, default=None,
                 help="train on the first N training images only (runs; "
                 "None: all 60,000)")
  p.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      "eva_damping_autoencoder.json"),
                 help="JSON to merge the results into")
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  record = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      record = json.load(f)
  task = autoencoder.make_task()
  origin = harness.provenance.collect()

  def save():
    record["provenance"] = origin
    harness.write_json(args.out, record)

  if args.mode == "scale":
    record["scale"] = statistics_scale(task, args.lr)
    record["scale_provenance"] = origin
    save()
    return record
  runs = record.setdefault("damping_runs", {})
  for d in (float(v) for v in args.damping.split(",")):
    r = harness.train(task.subset(args.train_subset), "eva", args.lr,
                      args.epochs, 0, schedule="linear",
                      options={"damping": d}, desc=f"Eva damping {d:g}")
    losses = [e.get("test_loss") for e in r["epochs"]]
    key = f"damping {d:g}, lr {args.lr:g}" + (
        f", {r['train_examples']} images" if args.train_subset else "")
    runs[key] = {
        "damping": d, "learning_rate": args.lr, "epochs": args.epochs,
        "train_examples": r["train_examples"],
        "final_test_loss": losses[-1], "test_loss": losses,
        "cosine_mean": r.get("cosine_mean"), "nonfinite": r["diverged"],
        "commit": origin["git"]["commit"], "dirty": origin["git"]["dirty"],
        "date": origin["date"]}
    print(f"damping {d:g}, lr {args.lr:g}: final test loss {losses[-1]:.5g}, "
          f"cosine {r.get('cosine_mean')}", flush=True)
    save()
  return record


if __name__ == "__main__":
  main()
