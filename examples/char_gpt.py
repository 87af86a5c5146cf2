"""The character-level GPT of examples/transformer_lm.py: token and position
embeddings, pre-LayerNorm blocks of causal multi-head attention and a GELU MLP
under ``nn.scan``, optional weight tying, and its loss in nats per character."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class Block(nn.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP.

  Called as ``(x, mask) -> (x, None)`` so that it is its own ``nn.scan`` body.
  """

  heads: int
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x, mask):
    width = x.shape[-1]
    h = nn.LayerNorm(name="ln_attn")(x)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, use_bias=False, deterministic=True,
        name="attn")(h, h, mask=mask)
    x = x + h
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * width, name="mlp_in")(h))
    return x + nn.Dense(width, name="mlp_out")(h), None


class CharGPT(nn.Module):
  """A GPT-style decoder over characters; returns ``(batch, T, vocab)`` logits."""

  vocab: int
  context: int
  width: int = 64
  layers: int = 2
  heads: int = 4
  tie: bool = False
  scan: bool = True

  @nn.compact
  def __call__(self, tokens):
    t = tokens.shape[-1]
    if t > self.context:
      raise ValueError(f"{t} tokens > context {self.context}.")
    init = nn.initializers.normal(0.02)   # GPT-2's embedding initialisation
    tok = nn.Embed(self.vocab, self.width, embedding_init=init,
                   name="tok_embed")
    x = tok(tokens) + nn.Embed(self.context, self.width, embedding_init=init,
                               name="pos_embed")(jnp.arange(t))
    mask = nn.make_causal_mask(tokens)
    if self.scan:
      blocks = nn.scan(Block, variable_axes={"params": 0},
                       split_rngs={"params": True}, in_axes=nn.broadcast,
                       length=self.layers)
      x, _ = blocks(self.heads, name="blocks")(x, mask)
    else:
      for i in range(self.layers):
        x, _ = Block(self.heads, name=f"block_{i}")(x, mask)
    x = nn.LayerNorm(name="ln_out")(x)
    if self.tie:
      return tok.attend(x)
    return nn.Dense(self.vocab, use_bias=False, name="head")(x)


class JitInit:
  """``model`` with its ``init`` compiled once by ``jax.jit``.

  The harness initialises the model for every run; Flax's ``init`` runs
  eagerly, and for the scanned attention blocks that is about a hundred small
  XLA programs, each compiled the first time (seconds on a small CPU, more
  than the training steps of ``--small``). The jitted ``init`` draws the same
  parameters; ``apply`` is the model's own.
  """

  def __init__(self, model: nn.Module):
    self.module = model
    self.init = jax.jit(model.init)
    self.apply = model.apply


def loss_and_metrics(logits, x, y):
  """Cross-entropy in nats per character and next-character accuracy."""
  del x
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y).mean()
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def lm_loss(model: nn.Module):
  def loss_fn(params, x, y):
    return loss_and_metrics(model.apply({"params": params}, x), x, y)[0]
  return loss_fn
