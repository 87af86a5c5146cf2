"""The client zoo: models nobody here wrote (transformers' Flax models) and
models written the way clients write them (hand-written ties, custom layers,
an Embed subclass) in linen, for tests/test_zoo.py; the NNX ones are in
tests/zoo_nnx.py, and zoo_harness.ZOO lists them all.

Every model is tiny (width 16, one block, vocabulary < 100, sequences of 8) and
built from a fixed seed; transformers' models from random configs, never
downloaded. Each :class:`ZooModel` says what the capture must report: which
layers are captured, and which are not (with a pattern their reason matches).
Every layer node of a model is in one of the two sets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import eva_optax

V, D, T, B = 48, 16, 8, 4          # vocabulary, width, sequence, batch
# A tied layer is reported not captured because its parameters have another
# use than the captured call; the reason names that use (the wording is the
# library's, so the pattern only asks for what any such reason must say).
OTHER_USE = r"(?i)\b(outside|elsewhere|another use|other uses?)\b"


@dataclasses.dataclass(frozen=True)
class ZooModel:
  """One zoo model and what the capture must make of it.

  Attributes:
    name: the test id.
    api: ``"linen"`` (``make()`` returns the parameters, ``loss(params,
      *batch)``) or ``"nnx"`` (``make()`` returns a fresh model, ``loss(model,
      *batch)``).
    make: builds the parameters or the model (deterministic).
    loss: the scalar loss, a batch mean.
    batch: the fixed batch (the remaining arguments of ``loss``).
    captured: the layer paths (``"a/b/c"``) that must be reported captured.
    not_captured: layer path -> regex its reason must match.
  """

  name: str
  api: str
  make: Callable[[], Any]
  loss: Callable[..., Any]
  batch: tuple[Any, ...]
  captured: frozenset[str]
  not_captured: dict[str, str]


def _ids(seed: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


def _next_token_loss(logits, ids):
  """Mean cross-entropy of predicting token t + 1 from the prefix up to t."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], ids[:, 1:]).mean()


# ----------------------------------------------------------------------------
# transformers' Flax models (random tiny configs).


def _quiet_transformers():
  """transformers, with its deprecation notices for the Flax models silenced."""
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
      import transformers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("the client zoo needs transformers<5 (its Flax models): "
                        "pip install -e '.[test]'") from e
  transformers.logging.set_verbosity_error()
  return transformers


@functools.lru_cache(maxsize=None)
def _hf(name: str):
  """``(model, params)`` of a tiny transformers Flax model (cached)."""
  tf = _quiet_transformers()
  if name == "bert":
    config = tf.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=2 * D,
                           max_position_embeddings=T, type_vocab_size=2)
    model, shape = tf.FlaxBertForMaskedLM(config, _do_init=False), (1, T)
  elif name == "gpt2":
    config = tf.GPT2Config(vocab_size=V, n_positions=T, n_embd=D, n_layer=1,
                           n_head=2, n_inner=2 * D)
    model, shape = tf.FlaxGPT2LMHeadModel(config, _do_init=False), (1, T)
  else:
    config = tf.ViTConfig(image_size=8, patch_size=4, num_channels=3,
                          hidden_size=D, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=2 * D,
                          num_labels=5)
    model, shape = tf.FlaxViTForImageClassification(config, _do_init=False), (1, 8, 8, 3)
  # The random weights in one jitted program (transformers' own eager
  # initialization compiles every op on its own: twice the time).
  params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(0), shape)
  return model, dict(params)


def bert() -> ZooModel:
  """FlaxBertForMaskedLM: its decoder reads the word embeddings transposed
  through ``nn.Dense(...).apply({"params": {"kernel": embedding.T}}, h)``."""
  ids, labels = _ids(1), _ids(2)

  def loss(params, ids, labels):
    model, _ = _hf("bert")
    logits = model(ids, params=params, train=False).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  layer = "bert/encoder/layer/0/"
  captured = {"bert/embeddings/position_embeddings",
              "bert/embeddings/token_type_embeddings",
              "cls/predictions/transform/dense"} | {
                  layer + p for p in ("attention/self/query", "attention/self/key",
                                      "attention/self/value", "attention/output/dense",
                                      "intermediate/dense", "output/dense")}
  return ZooModel("bert", "linen", lambda: _hf("bert")[1], loss, (ids, labels),
                  frozenset(captured),
                  {"bert/embeddings/word_embeddings": OTHER_USE})


def register_gpt2() -> None:
  """GPT-2's attention and MLP are ``FlaxConv1D``: ``x @ kernel.T + bias``."""
  from transformers.models.gpt2 import modeling_flax_gpt2  # pylint: disable=g-import-not-at-top
  eva_optax.register_dense(modeling_flax_gpt2.FlaxConv1D, transposed=True)


def gpt2() -> ZooModel:
  """FlaxGPT2LMHeadModel (with ``register_dense(FlaxConv1D, transposed=True)``):
  its LM head reads ``wte`` transposed through ``lm_head.apply``."""
  ids = _ids(3)

  def loss(params, ids):
    model, _ = _hf("gpt2")
    return _next_token_loss(model(ids, params=params, train=False).logits, ids)

  def make():
    register_gpt2()
    return _hf("gpt2")[1]

  captured = {"transformer/wpe"} | {
      f"transformer/h/0/{p}" for p in ("attn/c_attn", "attn/c_proj", "mlp/c_fc",
                                      "mlp/c_proj")}
  return ZooModel("gpt2", "linen", make, loss, (ids,), frozenset(captured),
                  {"transformer/wte": OTHER_USE})


def vit() -> ZooModel:
  """FlaxViTForImageClassification: a patch Conv, Dense attention and MLP."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(B, 3, 8, 8)), jnp.float32)   # NCHW, as HF
  y = jnp.asarray(rng.integers(0, 5, (B,)), jnp.int32)

  def loss(params, x, y):
    model, _ = _hf("vit")
    logits = model(x, params=params, train=False).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  layer = "vit/encoder/layer/0/"
  captured = {"vit/embeddings/patch_embeddings/projection", "classifier"} | {
      layer + p for p in ("attention/attention/query", "attention/attention/key",
                          "attention/attention/value", "attention/output/dense",
                          "intermediate/dense", "output/dense")}
  return ZooModel("vit", "linen", lambda: _hf("vit")[1], loss, (x, y),
                  frozenset(captured), {})


# ----------------------------------------------------------------------------
# Linen models written as clients write them.


class HandTiedLM(nn.Module):
  """A pre-LayerNorm block whose logits are ``h @ embed.embedding.T``."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(V, D, name="embed")
    pos = self.param("pos", nn.initializers.normal(0.02), (T, D))
    x = embed(ids) + pos[:ids.shape[-1]]
    h = nn.LayerNorm(name="ln_1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(
        h, mask=nn.make_causal_mask(ids))
    h = nn.LayerNorm(name="ln_2")(x)
    x = x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(2 * D, name="up")(h)))
    h = nn.LayerNorm(name="ln_f")(x)
    return h @ embed.embedding.T            # the hand-written tie


def hand_tied_lm() -> ZooModel:
  ids = _ids(5)
  model = HandTiedLM()

  def loss(params, ids):
    return _next_token_loss(model.apply({"params": params}, ids), ids)

  make = lambda: model.init(jax.random.PRNGKey(0), ids)["params"]
  captured = {f"attn/{p}" for p in ("query", "key", "value", "out")} | {"up", "down"}
  return ZooModel("hand_tied_lm", "linen", make, loss, (ids,),
                  frozenset(captured), {"embed": OTHER_USE})


class Affine(nn.Module):
  """A client's own linear layer: ``project(x) = x @ proj_w + proj_b``
  (registered). The names are the zoo's own: ``register_dense`` makes its
  weight name a layer name in every parameter tree of the process, and
  tests/test_conventions.py reads a ``w`` leaf as no layer."""

  features: int

  @nn.compact
  def project(self, x):
    w = self.param("proj_w", nn.initializers.lecun_normal(),
                   (x.shape[-1], self.features))
    b = self.param("proj_b", nn.initializers.normal(0.1), (self.features,))
    return jnp.dot(x, w) + b


class ScaledEmbed(nn.Embed):
  """Gemma's embedder in linen: the parent's lookup, scaled by sqrt(features)."""

  def __call__(self, inputs):
    return super().__call__(inputs) * jnp.sqrt(jnp.float32(self.features))


class CustomLM(nn.Module):
  """ScaledEmbed -> Affine.project -> gelu -> Dense -> logits by ``attend``."""

  @nn.compact
  def __call__(self, ids):
    embed = ScaledEmbed(V, D, name="embed")
    x = embed(ids)
    x = nn.gelu(Affine(2 * D, name="affine").project(x))
    h = nn.LayerNorm(name="ln")(nn.Dense(D, name="dense")(x))
    return embed.attend(h)


def register_affine() -> None:
  eva_optax.register_dense(Affine, kernel="proj_w", bias="proj_b", method="project")


def custom_linen() -> ZooModel:
  ids = _ids(6)
  model = CustomLM()

  def loss(params, ids):
    return _next_token_loss(model.apply({"params": params}, ids), ids)

  def make():
    register_affine()
    return model.init(jax.random.PRNGKey(1), ids)["params"]

  return ZooModel("custom_linen", "linen", make, loss, (ids,),
                  frozenset({"embed", "affine", "dense"}), {})


class TorchDense(nn.Module):
  """``x @ kernel.T + bias`` with the kernel stored (out, in): never registered."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.features, x.shape[-1]))
    bias = self.param("bias", nn.initializers.normal(0.1), (self.features,))
    return x @ kernel.T + bias


class Unregistered(nn.Module):
  """TorchDense(6 -> 12), unregistered (its (12, 6) kernel and (12,) bias fit
  no view from shapes) -> tanh -> Dense(3)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="head")(jnp.tanh(TorchDense(12, name="torch")(x)))


def unregistered() -> ZooModel:
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(B, T, 6)) + 0.5, jnp.float32)
  y = jnp.asarray(np.tanh(rng.normal(size=(B, T, 3))), jnp.float32)
  model = Unregistered()

  def loss(params, x, y):
    return jnp.mean(jnp.sum((model.apply({"params": params}, x) - y) ** 2, axis=-1))

  make = lambda: model.init(jax.random.PRNGKey(2), x)["params"]
  return ZooModel("unregistered", "linen", make, loss, (x, y),
                  frozenset({"head"}), {"torch": r"(?i)not supported|regist"})
