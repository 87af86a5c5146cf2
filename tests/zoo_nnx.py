"""The client zoo's NNX models: a registered custom layer storing its weight
(d_out, d_in), and a Gemma-style model (an Embed subclass scaling its
lookup, bias-free attention, a head tied by ``attend`` or by hand)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import eva_optax
from zoo_models import B, D, OTHER_USE, T, V, ZooModel, _ids, _next_token_loss


class TLinear(nnx.Module):
  """A client's own NNX layer storing its weight (d_out, d_in), like torch."""

  def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs):
    self.weight = nnx.Param(jax.random.normal(rngs.params(), (d_out, d_in))
                            / math.sqrt(d_in))
    self.b = nnx.Param(0.1 * jax.random.normal(rngs.params(), (d_out,)))

  def __call__(self, x):
    return x @ self.weight[...].T + self.b[...]


def register_tlinear() -> None:
  eva_optax.register_dense(TLinear, kernel="weight", bias="b", transposed=True)


class CustomNNX(nnx.Module):
  """TLinear(6, 6) (square: only the view tells its axes apart) -> TLinear(6,
  12) -> nnx.Linear(12, 3), on token sequences."""

  def __init__(self, rngs: nnx.Rngs):
    self.square = TLinear(6, 6, rngs=rngs)
    self.wide = TLinear(6, 12, rngs=rngs)
    self.head = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.wide(jnp.tanh(self.square(x)))))


def custom_nnx() -> ZooModel:
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(B, T, 6)) + 0.5, jnp.float32)
  y = jnp.asarray(np.tanh(rng.normal(size=(B, T, 3))), jnp.float32)

  def loss(model, x, y):
    return jnp.mean(jnp.sum((model(x) - y) ** 2, axis=-1))

  def make():
    register_tlinear()
    return CustomNNX(nnx.Rngs(0))

  return ZooModel("custom_nnx", "nnx", make, loss, (x, y),
                  frozenset({"square", "wide", "head"}), {})


class Embedder(nnx.Embed):
  """Gemma's embedder: the parent's lookup scaled by sqrt(features)."""

  def __call__(self, inputs):
    return super().__call__(inputs) * jnp.sqrt(jnp.float32(self.features))


class GemmaLike(nnx.Module):
  """A Gemma-style block: RMSNorm, bias-free attention and gated MLP, and a
  head tied to the embedder by ``attend`` or by hand."""

  def __init__(self, tie: str, rngs: nnx.Rngs):
    self.tie = tie
    self.embedder = Embedder(V, D, rngs=rngs)
    self.norm_1 = nnx.RMSNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, use_bias=False,
                                       decode=False, rngs=rngs)
    self.norm_2 = nnx.RMSNorm(D, rngs=rngs)
    self.gate = nnx.Linear(D, 2 * D, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(D, 2 * D, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(2 * D, D, use_bias=False, rngs=rngs)
    self.norm_f = nnx.RMSNorm(D, rngs=rngs)

  def __call__(self, ids):
    x = self.embedder(ids)
    h = self.norm_1(x)
    x = x + self.attn(h, mask=nnx.make_causal_mask(ids))
    h = self.norm_2(x)
    x = x + self.down(nnx.gelu(self.gate(h)) * self.up(h))
    h = self.norm_f(x)
    if self.tie == "attend":
      return self.embedder.attend(h)
    return h @ self.embedder.embedding[...].T     # the hand-written tie


def gemma(tie: str) -> ZooModel:
  ids = _ids(8)

  def loss(model, ids):
    return _next_token_loss(model(ids), ids)

  layers = {f"attn/{p}" for p in ("query", "key", "value", "out")} | {
      "gate", "up", "down"}
  if tie == "attend":
    return ZooModel("gemma_attend", "nnx", lambda: GemmaLike("attend", nnx.Rngs(0)),
                    loss, (ids,), frozenset(layers | {"embedder"}), {})
  return ZooModel("gemma_hand", "nnx", lambda: GemmaLike("hand", nnx.Rngs(0)),
                  loss, (ids,), frozenset(layers), {"embedder": OTHER_USE})
