"""Custom linear layers: ``eva_optax.register_dense`` and uncaptured layouts.

A registered layer is read like ``nn.Dense``: a network of registered layers
(kernel stored transposed, or under other names) has exactly the statistics,
and every optimizer exactly the updates, of the same network written with
``nn.Dense`` (kernels transposed back). NNX module types register the same
way. A layer the capture cannot read, whatever its layout, is reported with a
hint, gets the plain gradient and no state, and never breaks ``init``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eva_optax
import eva_optax.nnx
from conftest import OPTIMIZERS
from conftest import numpy_init
from conftest import preconditioner
from conftest import to64

EPS32 = float(np.finfo(np.float32).eps)


class Conv1D(nn.Module):
  """GPT-2's layer: ``x @ W.T + b`` with the kernel stored ``(d_out, d_in)``."""

  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(0.3),
                        (self.features, x.shape[-1]))
    bias = self.param("bias", nn.initializers.normal(0.1), (self.features,))
    return x @ kernel.T + bias


class Named(nn.Module):
  """``x @ w + b`` under other names (and no transposition)."""

  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("named_w", nn.initializers.normal(0.3),
                   (x.shape[-1], self.features))
    return x @ w + self.param("named_b", nn.initializers.normal(0.1),
                              (self.features,))


class Unknown(nn.Module):
  """A linear layer nobody registered, its kernel (d_out, d_in) beside a bias
  that matches no trailing axis."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(0.3), (3, 4, x.shape[-1]))
    bias = self.param("bias", nn.initializers.zeros, (5,))
    return jnp.einsum("bi,jki->bjk", x, kernel).reshape(x.shape[0], -1)[:, :5] + bias


eva_optax.register_dense(Conv1D, transposed=True)
# Registered names are global (a node holding "named_w" is a layer node for
# every model), so the test uses names no other test holds.
eva_optax.register_dense(Named, kernel="named_w", bias="named_b")


class Net(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x):
    layer = {"conv1d": Conv1D, "named": Named, "dense": nn.Dense}[self.kind]
    h = jnp.tanh(layer(6, name="a")(x))
    return layer(3, name="b")(h)


def _to_dense(params, kind):
  """The nn.Dense parameters of the same network."""
  if kind == "conv1d":
    return jax.tree.map(lambda p: p.T if p.ndim == 2 else p, params)
  return {k: {"kernel": v["named_w"], "bias": v["named_b"]}
          for k, v in params.items()}


def _problem(kind, statistics):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(8, 4)) + 0.5, jnp.float32)
  t = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  model = Net(kind)
  params = numpy_init(model, x)
  loss = lambda p, x, t: jnp.mean((Net(kind).apply({"params": p}, x) - t) ** 2)
  out = eva_optax.value_and_grad(loss, statistics=statistics)(params, x, t)
  dense_params = _to_dense(params, kind)
  ref = eva_optax.value_and_grad(
      lambda p, x, t: jnp.mean((Net("dense").apply({"params": p}, x) - t) ** 2),
      statistics=statistics)(dense_params, x, t)
  return params, dense_params, out, ref


@pytest.mark.parametrize("kind", ["conv1d", "named"])
def test_registered_layer_has_the_statistics_of_dense(kind):
  _, _, (_, grads, stats), (_, _, ref) = _problem(kind, "rows")
  for layer in ("a", "b"):
    st, want = stats[layer], ref[layer]
    assert st.captured and st.kind == {"conv1d": "Conv1D", "named": "Named"}[kind]
    for key in ("a", "g", "A", "G", "a_rows", "g_rows"):
      np.testing.assert_allclose(getattr(st, key), getattr(want, key), rtol=1e-6,
                                 atol=1e-7, err_msg=f"{layer}.{key}")
    # The rows reproduce the gradient read through the registered view:
    # |err| <= 2 n eps32 sum |a||g| (float32 summation over n rows).
    v = st.view
    node = grads[layer]
    gm = np.concatenate([to64(v.kernel_matrices(node[v.param]))[0],
                         to64(v.bias_vectors(node[v.bias_param]))])
    a, g = to64(st.a_rows), to64(st.g_rows)
    bound = 2 * a.shape[0] * EPS32 * (np.abs(a).T @ np.abs(g))
    assert np.all(np.abs(a.T @ g - gm) <= bound)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_registered_layer_updates_equal_dense(name):
  """Every optimizer gives the registered network the updates of the Dense one
  (read back through the transposition): it reads the layer exactly."""
  statistics = "factors" if name in ("kfac", "foof") else "vectors"
  params, dense_params, (_, grads, stats), (_, ref_grads, ref_stats) = _problem(
      "conv1d", statistics)
  ups = []
  for p, g, s in ((params, grads, stats), (dense_params, ref_grads, ref_stats)):
    tx = preconditioner(name)
    u, state = tx.update(g, tx.init(p), p, stats=s)
    u, _ = tx.update(g, state, p, stats=s)
    ups.append(u)
  got, want = _to_dense(ups[0], "conv1d"), ups[1]
  for layer in ("a", "b"):
    for leaf in ("kernel", "bias"):
      w = np.asarray(want[layer][leaf])
      np.testing.assert_allclose(got[layer][leaf], w, rtol=2e-4,
                                 atol=2e-6 * np.abs(w).max(), err_msg=f"{layer}.{leaf}")


def test_registration_errors_name_the_argument():
  with pytest.raises(TypeError, match="module_type"):
    eva_optax.register_dense(lambda x: x)
  with pytest.raises(TypeError, match="module_type"):
    eva_optax.register_dense(Conv1D(3))        # an instance, not the class
  with pytest.raises(TypeError, match="kernel"):
    eva_optax.register_dense(Conv1D, kernel=3)
  with pytest.raises(TypeError, match="transposed"):
    eva_optax.register_dense(Conv1D, transposed="yes")
  with pytest.raises(ValueError, match="encode"):
    eva_optax.register_dense(Conv1D, method="encode")


class WithUnknown(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="head")(jnp.tanh(Unknown(name="odd")(x)))


def test_an_unknown_layer_is_untouched_by_every_optimizer():
  """Its layout reads as no layer (kernel (3, 4, 4), bias (5,)): ``init`` gives
  it no state, ``update`` passes its gradient through, and describe says how
  to teach the capture."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  model = WithUnknown()
  params = numpy_init(model, x)
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  _, grads, stats = eva_optax.value_and_grad(loss, statistics="factors")(params, x)
  assert not stats["odd"].captured and "register_dense" in stats["odd"].note
  views = eva_optax.layer_views(loss, params, x)
  for name in OPTIMIZERS:
    for layer_views in (None, views):
      tx = preconditioner(name, layer_views=layer_views)
      state = tx.init(params)
      up, _ = tx.update(grads, state, params, stats=stats)
      if name in ("eva", "eva_f", "kfac", "foof"):
        assert state.layers["odd"] == {}, name
        for leaf in ("kernel", "bias"):
          np.testing.assert_array_equal(up["odd"][leaf], grads["odd"][leaf])
      assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(up))


def test_transposed_kernel_needs_no_views():
  """A 2-D kernel ``(a, b)`` whose bias ``(a,)`` matches only its leading axis
  reads as stored ``(d_out, d_in)``: the registered layer trains without
  ``layer_views``, with the state of the views'."""
  params, _, (_, grads, stats), _ = _problem("conv1d", "vectors")
  views = eva_optax.layer_views(
      lambda p, x, t: jnp.mean((Net("conv1d").apply({"params": p}, x) - t) ** 2),
      params, jnp.zeros((8, 4)), jnp.zeros((8, 3)))
  shapes = [jax.tree.map(jnp.shape, eva_optax.scale_by_eva(
      layer_views=v).init(params).layers) for v in (None, views)]
  assert shapes[0] == shapes[1]


class NNXConv1D(nnx.Module):
  def __init__(self, d_in, d_out, rngs):
    self.kernel = nnx.Param(0.3 * jax.random.normal(rngs.params(), (d_out, d_in)))
    self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (d_out,)))

  def __call__(self, x):
    return x @ self.kernel[...].T + self.bias[...]


eva_optax.register_dense(NNXConv1D, transposed=True)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.a = NNXConv1D(4, 6, rngs)
    self.b = NNXConv1D(6, 3, rngs)

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


def test_nnx_registered_layer_equals_linen():
  model = NNXNet(nnx.Rngs(0))
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(8, 4)) + 0.5, jnp.float32)
  t = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  loss = lambda m, x, t: jnp.mean((m(x) - t) ** 2)
  _, _, stats = eva_optax.nnx.value_and_grad(loss, statistics="factors")(model, x, t)
  params = {k: {"kernel": getattr(model, k).kernel[...],
                "bias": getattr(model, k).bias[...]} for k in ("a", "b")}
  linen_loss = lambda p, x, t: jnp.mean((Net("conv1d").apply({"params": p}, x) - t) ** 2)
  _, _, ref = eva_optax.value_and_grad(linen_loss, statistics="factors")(params, x, t)
  for layer in ("a", "b"):
    assert stats[layer].captured, stats[layer].note
    for key in ("a", "g", "A", "G"):
      np.testing.assert_allclose(getattr(stats[layer], key), getattr(ref[layer], key),
                                 rtol=1e-6, atol=1e-8, err_msg=f"{layer}.{key}")
  views = eva_optax.layer_views(loss, model, x, t)
  assert views["a"].shape == (6, 4) and views["a"].in_axes == (1,)
