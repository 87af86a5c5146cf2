"""Shared pieces of the multi-device scripts: a small model, data, optimizers, steps.

The scripts in this folder run in a fresh interpreter with several (virtual CPU)
devices; they import this module from their own folder. Nothing here depends on
the number of devices: the same code trains on one device or on a mesh, and only
the shardings of the inputs differ.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eva_optax


class ConvDenseNet(nn.Module):
  """Conv(8, 3x3, stride 2) - relu - flatten - Dense(8), both with a bias.

  The conv's d_out (8) and the Dense's d_in (4 * 4 * 8 = 128) and d_out (8) are
  multiples of 8, so kernels can be sharded along d_in or d_out over 8 devices.
  Two layers keep XLA's compile time (which dominates these tests) small.
  """

  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, **kw)(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(8, **kw)(x)


IMAGE = (8, 8, 3)
BATCH = 64          # global batch: 8 examples per device on 8 devices
STEPS = 5


def make_data(steps: int = STEPS, batch: int = BATCH, seed: int = 0):
  """``steps`` batches ``(x, y)`` as NumPy float32: inputs with non-zero mean.

  The inputs of every batch have a different mean, so the statistics change
  from step to step and a running average that mixed them up would show.
  """
  rng = np.random.default_rng(seed)
  w = np.random.default_rng(1234).normal(size=(int(np.prod(IMAGE)), 8)) / 8.0
  xs, ys = [], []
  for t in range(steps):
    x = rng.normal(size=(batch,) + IMAGE) + 0.5 + 0.1 * t
    y = np.tanh(x.reshape(batch, -1) @ w) + 0.2
    xs.append(x.astype(np.float32))
    ys.append(y.astype(np.float32))
  return xs, ys


def init_params(model: nn.Module, seed: int = 0):
  x = jnp.zeros((1,) + IMAGE, jnp.float32)
  return model.init(jax.random.PRNGKey(seed), x)["params"]


def loss_of(model: nn.Module) -> Callable[..., Any]:
  """Mean over the batch of the squared error, accumulated in float32."""

  def loss_fn(params, x, y):
    out = model.apply({"params": params}, x.astype(model.dtype))
    err = out.astype(jnp.float32) - y
    return jnp.mean(jnp.sum(err ** 2, axis=-1))

  return loss_fn


# ----------------------------------------------------------------------------
# Optimizers. Settings (chosen by measurement, see jit_data_parallel.py): each
# method's curvature acts (a statistic 8x off changes the 5-step parameters by
# 1-90% of their change), and float32 round-off in the statistics is not
# amplified beyond ~4e-6 of the change (K-FAC and FOOF at damping 1e-4 amplify a
# 1e-7 round-off of A to 2.5e-4 in one step, so their damping is larger).


@dataclasses.dataclass(frozen=True)
class Opt:
  name: str
  make: Callable[[], Any]
  statistics: str | None     # None: plain jax.value_and_grad, no stats


OPTIMIZERS = (
    Opt("eva", lambda: eva_optax.eva(0.1, damping=1e-4), "vectors"),
    Opt("eva_f", lambda: eva_optax.eva_f(0.1, damping=3e-2), "vectors"),
    Opt("eva_s", lambda: eva_optax.eva_s(0.005, damping=1e-4), None),
    Opt("kfac", lambda: eva_optax.kfac(0.02, damping=1e-3), "factors"),
    Opt("foof", lambda: eva_optax.foof(0.02, damping=1e-1), "factors"),
    Opt("shampoo", lambda: eva_optax.shampoo(0.02, matrix_eps=1e-2), None),
)
BY_NAME = {o.name: o for o in OPTIMIZERS}


def grad_fn(loss_fn, statistics: str | None):
  """``(params, x, y) -> (loss, grads, stats or None)``."""
  if statistics is None:
    vg = jax.value_and_grad(loss_fn)

    def plain(params, x, y):
      loss, grads = vg(params, x, y)
      return loss, grads, None
    return plain
  return eva_optax.value_and_grad(loss_fn, statistics=statistics)


def step_fn(tx, loss_fn, statistics: str | None):
  """The un-jitted training step ``(params, opt_state, x, y) -> (params, opt_state, loss)``."""
  gf = grad_fn(loss_fn, statistics)

  def step(params, opt_state, x, y):
    loss, grads, stats = gf(params, x, y)
    if stats is None:
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def train(opt: Opt, loss_fn, params, xs, ys, *, place_batch=None,
          param_shardings=None):
  """``len(xs)`` jitted steps; returns ``(params, opt_state, losses)`` on the host.

  ``place_batch(x) -> array`` puts each batch where it belongs (default: one
  device). ``param_shardings`` (a tree like ``params``) pins the parameters'
  shardings on input and output (FSDP); the optimizer state is initialised
  under jit and its shardings are left to XLA.
  """
  tx = opt.make()
  step = step_fn(tx, loss_fn, opt.statistics)
  place_batch = place_batch or jnp.asarray
  if param_shardings is None:
    params = jax.tree.map(jnp.asarray, params)
    opt_state = jax.jit(tx.init)(params)
    jstep = jax.jit(step)
  else:
    params = jax.device_put(params, param_shardings)
    opt_state = jax.jit(tx.init)(params)
    jstep = jax.jit(step, out_shardings=(param_shardings, None, None))
  losses = []
  for x, y in zip(xs, ys):
    params, opt_state, loss = jstep(params, opt_state, place_batch(x),
                                    place_batch(y))
    losses.append(float(loss))
  return params, opt_state, losses


# ----------------------------------------------------------------------------
# Comparisons (float64 on the host).


def to_np(tree):
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float64), tree)


def flat(tree) -> np.ndarray:
  leaves = jax.tree.leaves(to_np(tree))
  return np.concatenate([l.reshape(-1) for l in leaves]) if leaves else np.zeros(0)


def change_error(p_test, p_ref, p0) -> float:
  """``|p_test - p_ref| / |p_ref - p0|``: error relative to the parameter change."""
  ref, start = flat(p_ref), flat(p0)
  return float(np.linalg.norm(flat(p_test) - ref) / np.linalg.norm(ref - start))


def rel_error(x, ref) -> float:
  """``|x - ref| / |ref|`` over a whole tree, float64."""
  x, ref = flat(x), flat(ref)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def emit(result: dict) -> None:
  """Prints the result as JSON on the last line of stdout (run_script reads it)."""
  sys.stdout.flush()
  print(json.dumps(result), flush=True)
