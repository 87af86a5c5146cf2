"""Parameters boxed with sharding metadata (``nn.with_logical_partitioning``,
``nn.with_partitioning``), as Flax's own transformers write them: the capture
sees through the boxes, the statistics equal those of the same model unboxed,
every optimizer's update equals its update on the unboxed model and comes back
boxed like the gradients, and a stacked layer's optimizer state is boxed with
the stack's axis name (so ``nn.get_partition_spec`` shards it like the weight).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import OPTIMIZERS, numpy_init, preconditioner

import eva_optax

D, HEADS, HEAD_DIM, LAYERS = 6, 2, 3, 2


def _init(name, boxed):
  init = nn.initializers.lecun_normal()
  return nn.with_logical_partitioning(init, name) if boxed else init


class Block(nn.Module):
  """Bias-free multi-head self-attention (as Flax's transformers configure it)
  and an MLP, every weight boxed with logical axis names."""
  boxed: bool

  @nn.compact
  def __call__(self, x, _):
    b = self.boxed
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=HEADS, qkv_features=HEADS * HEAD_DIM, use_bias=False, name="attn",
        kernel_init=_init(("embed", "heads", "kv"), b))(x)
    h = nn.Dense(8, name="up", kernel_init=_init(("embed", "mlp"), b),
                 bias_init=(nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",))
                            if b else nn.initializers.zeros))(x)
    return x + nn.Dense(D, name="down", kernel_init=_init(("mlp", "embed"), b))(
        jnp.tanh(h)), None


class Model(nn.Module):
  boxed: bool

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="inp", kernel_init=_init(("in", "embed"), self.boxed))(x)
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=LAYERS, metadata_params={nn.PARTITION_NAME: "layers"})(
                       self.boxed, name="blocks")(x, None)
    return nn.Dense(2, name="out")(x)


def _loss(boxed):
  def loss(p, x, t):
    return jnp.mean((Model(boxed).apply({"params": p}, x) - t) ** 2)
  return loss


@functools.lru_cache(maxsize=None)
def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 4, 4)) + 0.5, jnp.float32)
  t = jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float32)
  boxed = numpy_init(Model(True), x)
  plain = nn.unbox(boxed)
  out = {}
  for name, p in (("boxed", boxed), ("plain", plain)):
    fn = jax.jit(eva_optax.value_and_grad(_loss(name == "boxed"), statistics="factors"))
    out[name] = (p,) + tuple(fn(p, x, t))
  return x, t, out


def test_boxed_params_are_boxed():
  _, _, out = _problem()
  boxed = out["boxed"][0]
  assert isinstance(boxed["blocks"]["attn"]["query"]["kernel"], nn.LogicallyPartitioned)
  assert boxed["blocks"]["attn"]["query"]["kernel"].names == (
      "layers", "embed", "heads", "kv")


def test_statistics_equal_the_unboxed_model():
  _, _, out = _problem()
  _, loss_b, grads_b, stats_b = out["boxed"]
  _, loss_p, grads_p, stats_p = out["plain"]
  # The boxes are metadata: unboxed, the same float32 program runs on the same
  # numbers (XLA compiles it the same way), so every result is bit for bit the
  # plain model's. No tolerance: any difference is a change of computation.
  np.testing.assert_array_equal(loss_b, loss_p)
  np.testing.assert_array_equal(nn.unbox(grads_b)["blocks"]["attn"]["value"]["kernel"],
                                grads_p["blocks"]["attn"]["value"]["kernel"])
  flat_b = eva_optax.describe(stats_b, out["boxed"][0])
  assert "blocks/attn/query" in flat_b and "not captured" not in flat_b, flat_b
  # Every leaf is in a captured layer: neither the boxes' field nor the layer
  # named "value" (as attention's projection) shows as a plain-gradient leaf.
  assert flat_b.endswith("plain gradient: (none)"), flat_b
  for layer in ("attn/query", "attn/key", "attn/value", "attn/out", "up", "down"):
    sb, sp = (stats["blocks"] for stats in (stats_b, stats_p))
    for k in layer.split("/"):
      sb, sp = sb[k], sp[k]
    assert sb.captured and sb.view.stack == (LAYERS,), (layer, sb.note)
    for key in ("a", "g", "A", "G"):   # bit for bit, as above
      np.testing.assert_array_equal(getattr(sb, key), getattr(sp, key),
                                    err_msg=f"{layer}.{key}")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_updates_equal_the_unboxed_model_and_stay_boxed(name):
  x, t, out = _problem()
  p_b, _, grads_b, stats_b = out["boxed"]
  p_p, _, grads_p, stats_p = out["plain"]
  ups = {}
  for kind, p, grads, stats in (("boxed", p_b, grads_b, stats_b),
                                ("plain", p_p, grads_p, stats_p)):
    views = eva_optax.layer_views(_loss(kind == "boxed"), p, x, t)
    tx = preconditioner(name, layer_views=views)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for _ in range(2):
      ups[kind], state = update(grads, state, p, stats=stats)
  kernel = ups["boxed"]["blocks"]["attn"]["query"]["kernel"]
  assert isinstance(kernel, nn.LogicallyPartitioned), type(kernel)
  assert kernel.names == ("layers", "embed", "heads", "kv")
  got, want = jax.tree.leaves(nn.unbox(ups["boxed"])), jax.tree.leaves(ups["plain"])
  assert len(got) == len(want)
  for g, w in zip(got, want):   # the same program on the same numbers: bit for bit
    np.testing.assert_array_equal(g, w)
  assert float(np.abs(want[0]).max()) > 0


def test_stacked_layer_state_is_boxed_along_the_stack():
  """The layer-wise state of a stacked, boxed layer carries the stack's axis
  name: nn.get_partition_spec puts 'layers' on its first axis."""
  x, t, out = _problem()
  p_b = out["boxed"][0]
  views = eva_optax.layer_views(_loss(True), p_b, x, t)
  state = eva_optax.kfac(0.1, layer_views=views).init(p_b)
  specs = nn.get_partition_spec(state)
  layers = [s for s in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(
      s, jax.sharding.PartitionSpec)) if len(s) and s[0] == "layers"]
  # query, key, value, out, up, down: A and G (K-FAC) at least, per stacked layer.
  assert len(layers) >= 12, specs
