"""The benchmark's models on random data: the deep autoencoder, a small CNN and
the character-level GPT of ``examples/transformer_lm.py``.

Data is random (timings do not depend on it); the steps cycle through
:data:`N_BATCHES` fixed batches (same shapes, no recompiles), so that the
models do not simply memorise one batch before the diagnostics are taken.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

N_BATCHES = 8
MODELS = ("autoencoder", "cnn", "transformer")


class Autoencoder(nn.Module):
  """Dense autoencoder; ReLU after every layer but the last."""

  widths: tuple[int, ...] = (1000, 500, 250, 30, 250, 500, 1000, 784)

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      x = nn.Dense(w)(x)
      if i < len(self.widths) - 1:
        x = nn.relu(x)
    return x


class SmallCNN(nn.Module):
  """Two 3x3 convs (each ReLU + 2x2 max-pool), then two dense layers."""

  channels: tuple[int, int] = (32, 64)
  hidden: int = 128
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.Conv(c, (3, 3), padding="SAME")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.classes)(x)


@dataclasses.dataclass
class Problem:
  """A model, its mean loss, initial parameters and a few device batches."""

  name: str
  description: str
  model: nn.Module
  loss_fn: Callable[..., Any]   # (params, x, y) -> scalar mean loss
  params: Any
  xs: list[jax.Array]           # N_BATCHES batches, already on the device
  ys: list[jax.Array]
  batch: int
  # Extra arguments of every preconditioner (the transformer's layer views).
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Whether Eva's state can be checked against sum over layers of
  # (d_in + 1 + d_out) read off the kernels (dense and conv layers only).
  analytic_state: bool = True
  # The statistics from the first stats_batch examples (None: all).
  stats_batch: int | None = None
  i: int = 0

  def next_batch(self):
    self.i = (self.i + 1) % len(self.xs)
    return self.xs[self.i], self.ys[self.i]

  @property
  def x(self):
    return self.xs[0]

  @property
  def y(self):
    return self.ys[0]


def make_problem(name: str, quick: bool, seed: int = 0) -> Problem:
  """Model ``name`` (:data:`MODELS`); ``quick``: tiny widths and batches."""
  key_p, key_x, key_y = jax.random.split(jax.random.PRNGKey(seed), 3)
  if name == "autoencoder":
    widths = (64, 32, 16, 8, 16, 32, 64, 784) if quick else Autoencoder.widths
    batch = 64 if quick else 1000
    model = Autoencoder(widths=widths)
    x = jax.random.uniform(key_x, (N_BATCHES, batch, 784), jnp.float32)
    y = x

    def loss_fn(params, x, y):
      return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    desc = ("autoencoder 784-" + "-".join(map(str, widths))
            + f" (ReLU, MSE), batch {batch}")
  elif name == "cnn":
    channels, hidden = ((8, 16), 32) if quick else ((32, 64), 128)
    batch = 16 if quick else 128
    model = SmallCNN(channels=channels, hidden=hidden)
    x = jax.random.normal(key_x, (N_BATCHES, batch, 28, 28, 1), jnp.float32)
    y = jax.random.randint(key_y, (N_BATCHES, batch), 0, 10)

    def loss_fn(params, x, y):
      logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    desc = (f"CNN conv{channels[0]}-pool-conv{channels[1]}-pool-dense{hidden}-"
            f"dense10 on 28x28x1 (softmax CE), batch {batch}")
  elif name == "transformer":
    return _transformer(quick, key_p, key_x, key_y)
  else:
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}.")
  params = model.init(key_p, x[0, :1])["params"]
  return Problem(name, desc, model, loss_fn, params,
                 [x[i] for i in range(N_BATCHES)], [y[i] for i in range(N_BATCHES)],
                 batch)


def _transformer(quick: bool, key_p, key_x, key_y) -> Problem:
  """The char GPT at ``examples/transformer_lm.py``'s defaults (``quick``: its
  ``--small``) on random characters of its 63-letter vocabulary, with the
  capture's layer views (the scanned blocks and bias-free attention need
  them)."""
  import eva_optax  # pylint: disable=g-import-not-at-top
  from . import add_examples_to_path  # pylint: disable=g-import-not-at-top
  add_examples_to_path()
  import transformer_lm  # pylint: disable=g-import-not-at-top
  from char_gpt import CharGPT, lm_loss  # pylint: disable=g-import-not-at-top
  ex = transformer_lm.parser().parse_args([])
  if quick:
    for k, v in transformer_lm.SMALL.items():
      setattr(ex, k, v)
  vocab = 63   # the King James Bible's characters
  model = CharGPT(vocab=vocab, context=ex.context, width=ex.width,
                  layers=ex.layers, heads=ex.heads, tie=ex.tie, scan=ex.scan)
  batch = ex.batch_size
  x = jax.random.randint(key_x, (N_BATCHES, batch, ex.context), 0, vocab)
  y = jax.random.randint(key_y, (N_BATCHES, batch, ex.context), 0, vocab)
  loss_fn = lm_loss(model)
  params = jax.jit(model.init)(key_p, x[0, :1])["params"]
  views = eva_optax.layer_views(loss_fn, params, x[0], y[0])
  desc = (f"char GPT, {ex.layers} blocks (nn.scan={ex.scan}), width "
          f"{ex.width}, {ex.heads} heads, context {ex.context}, vocabulary "
          f"{vocab} (softmax CE), batch {batch}")
  return Problem("transformer", desc, model, loss_fn, params,
                 [x[i] for i in range(N_BATCHES)],
                 [y[i] for i in range(N_BATCHES)], batch,
                 options={"layer_views": views}, analytic_state=False)
