"""``nn.Einsum`` against the equivalent Dense / DenseGeneral layer.

Every equation that is a linear map of its input (each kernel index either
contracted with the input or an output feature; every other input index kept)
must give the statistics and the layer-wise updates of the Dense or
DenseGeneral layer with the same weights (transposed where the equation
permutes the kernel's or the bias' axes). Equations that are not such a map are
reported as not captured, with the reason, and their gradient passes through.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from conftest import LAYERWISE
from conftest import SMALL_DAMPING
from conftest import assert_float32_twins
from conftest import preconditioner
from conftest import reference_tol
from conftest import reference_update
from conftest import rel_err
from conftest import to64


@dataclasses.dataclass(frozen=True)
class Case:
  """An Einsum layer and its Dense twin (same function given ``to_twin``)."""

  name: str
  equation: str
  shape: tuple[int, ...]
  use_bias: bool
  x_shape: tuple[int, ...]
  twin: Callable[[str], nn.Module]   # name -> the twin layer
  kernel_to_twin: Callable[[np.ndarray], np.ndarray] = lambda k: k
  bias_to_twin: Callable[[np.ndarray], np.ndarray] = lambda b: b
  twin_out: Callable[[Any], Any] = lambda y: y   # the twin's output -> Einsum's


CASES = (
    Case("ellipsis_bias", "...d,df->...f", (4, 3), True, (3, 2, 4),
         lambda n: nn.Dense(3, name=n)),
    Case("heads_bias", "btd,dhk->bthk", (4, 2, 3), True, (3, 2, 4),
         lambda n: nn.DenseGeneral((2, 3), name=n)),
    Case("heads_no_bias", "btd,dhk->bthk", (4, 2, 3), False, (3, 2, 4),
         lambda n: nn.DenseGeneral((2, 3), use_bias=False, name=n)),
    Case("permuted_kernel", "bd,fd->bf", (3, 4), True, (5, 4),
         lambda n: nn.Dense(3, name=n), kernel_to_twin=lambda k: k.T),
    Case("permuted_heads_no_bias", "btd,hkd->bthk", (2, 3, 4), False, (3, 2, 4),
         lambda n: nn.DenseGeneral((2, 3), use_bias=False, name=n),
         kernel_to_twin=lambda k: np.transpose(k, (2, 0, 1))),
    Case("bias_axes_permuted", "bd,dhk->bkh", (4, 2, 3), True, (5, 4),
         lambda n: nn.DenseGeneral((2, 3), name=n), bias_to_twin=lambda b: b.T,
         twin_out=lambda y: jnp.swapaxes(y, -1, -2)),
)


# Float32 roundings on the longest path of the twins' quantities: an output is
# a dot product of d_in = 4 terms plus the bias (TWIN_FORWARD); dL/dy = (y - t)
# / B two more; the statistics add their means (<= 6 rows: 7; A and G: the
# positions' and examples' means and products, <= 8), the gradient its sum
# over the rows (<= 6).
TWIN_FORWARD = 6
TWIN_OPS = TWIN_FORWARD + 2 + 8


class Branches(nn.Module):
  """One layer per case, each on its own input (``twin``: the Dense twins)."""

  twin: bool

  @nn.compact
  def __call__(self, xs):
    out = {}
    for c in CASES:
      if self.twin:
        out[c.name] = c.twin_out(c.twin(c.name)(xs[c.name]))
      else:
        out[c.name] = nn.Einsum(c.shape, c.equation, use_bias=c.use_bias,
                                name=c.name)(xs[c.name])
    return out


def _loss(twin):
  def loss(p, xs, ts):
    ys = Branches(twin).apply({"params": p}, xs)
    return sum(0.5 * jnp.sum((ys[k] - ts[k]) ** 2) / ts[k].shape[0] for k in ys)
  return loss


@functools.lru_cache(maxsize=None)
def _problem():
  rng = np.random.default_rng(11)
  xs = {c.name: jnp.asarray(rng.normal(size=c.x_shape) + 0.5, jnp.float32)
        for c in CASES}
  einsum_params = {}
  for c in CASES:
    node = {"kernel": rng.normal(size=c.shape) / 2}
    if c.use_bias:
      out_letters = c.equation.split("->")[1]
      rhs = c.equation.split("->")[0].split(",")[1]
      node["bias"] = rng.normal(size=tuple(
          c.shape[rhs.index(l)] for l in out_letters if l in rhs)) * 0.3
    einsum_params[c.name] = node
  twin_params = {}
  for c in CASES:
    node = {"kernel": c.kernel_to_twin(einsum_params[c.name]["kernel"])}
    if c.use_bias:
      node["bias"] = c.bias_to_twin(einsum_params[c.name]["bias"])
    twin_params[c.name] = node
  as32 = lambda tree: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), tree)
  einsum_params, twin_params = as32(einsum_params), as32(twin_params)
  ys = Branches(False).apply({"params": einsum_params}, xs)
  ys_twin = Branches(True).apply({"params": twin_params}, xs)
  for k in ys:   # the twins compute the same function: dot products of <= 12 terms
    assert_float32_twins(ys[k], ys_twin[k], TWIN_FORWARD, err_msg=k)
  ts = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in ys.items()}
  out = {}
  for twin, params in ((False, einsum_params), (True, twin_params)):
    fn = jax.jit(eva_optax.value_and_grad(_loss(twin), statistics="factors"))
    _, grads, stats = fn(params, xs, ts)
    views = eva_optax.layer_views(_loss(twin), params, xs, ts)
    out[twin] = (params, grads, stats, views)
  return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_einsum_statistics_equal_the_dense_twin(case):
  out = _problem()
  st, twin = out[False][2][case.name], out[True][2][case.name]
  assert st.captured, st.note
  assert st.kind == "Einsum"
  assert st.view.d_in == twin.view.d_in and st.view.d_out == twin.view.d_out
  for key in ("a", "g", "A", "G"):
    assert_float32_twins(getattr(st, key), getattr(twin, key), TWIN_OPS, err_msg=key)
  grads, twin_grads = out[False][1][case.name], out[True][1][case.name]
  assert_float32_twins(case.kernel_to_twin(np.asarray(grads["kernel"])),
                       twin_grads["kernel"], TWIN_OPS)


@pytest.mark.parametrize("name", LAYERWISE)
def test_einsum_updates_equal_the_dense_twin(name):
  """The Einsum layers' updates (the library, through the capture's views)
  equal the NumPy step on the Dense twins' gradients and statistics."""
  out = _problem()
  params, grads, stats, views = out[False]
  tx = preconditioner(name, layer_views=views)
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  _, twin_grads, twin_stats, _ = out[True]
  for c in CASES:
    want = reference_update(name, twin_grads[c.name], twin_stats[c.name])
    # The library's inputs are the Einsum side's: within 2 TWIN_OPS of the twin's.
    tol = reference_tol(name, twin_grads[c.name], twin_stats[c.name], input_ops=2 * TWIN_OPS)
    got = up[c.name]
    err = rel_err(c.kernel_to_twin(np.asarray(got["kernel"])), want["kernel"])
    assert err < tol["kernel"], (name, c.name, "kernel", err)
    if c.use_bias:
      err = rel_err(c.bias_to_twin(np.asarray(got["bias"])), want["bias"])
      assert err < tol["bias"], (name, c.name, "bias", err)
    damping = SMALL_DAMPING[name]
    assert rel_err(want["kernel"], to64(twin_grads[c.name]["kernel"]) / damping) > 10 * tol["kernel"]


# ----------------------------------------------------------------------------
# Equations that are not a linear map of the input with a shared kernel.


class NotLinear(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, name="dense")(x)                                   # captured
    h = nn.Einsum((5, 4), "bd,bd->bd", use_bias=False, name="gate")(h)  # b in kernel
    s = nn.Einsum((4, 3), "bd,de->e", use_bias=False, name="pool")(h)   # sums over b
    return h, s


@functools.lru_cache(maxsize=None)
def _not_linear():
  x = jnp.asarray(np.random.default_rng(12).normal(size=(5, 3)), jnp.float32)
  params = jax.tree.map(
      lambda s: jnp.asarray(np.random.default_rng(13).normal(size=s.shape), jnp.float32),
      jax.eval_shape(NotLinear().init, jax.random.PRNGKey(0), x)["params"])

  def loss(p, x):
    h, s = NotLinear().apply({"params": p}, x)
    return jnp.mean(h ** 2) + jnp.mean(s ** 2)

  _, grads, stats = jax.jit(eva_optax.value_and_grad(loss))(params, x)
  tx = preconditioner("eva", 1e-3)
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  return params, grads, stats, up, jax.grad(loss)(params, x)


@pytest.mark.parametrize("layer,reason", [("gate", "kernel index"),
                                          ("pool", "sums over an input index")])
def test_not_linear_einsum_is_reported_and_passes_its_gradient(layer, reason):
  params, grads, stats, up, plain_grads = _not_linear()
  st = stats[layer]
  assert not st.captured
  assert reason in st.note, st.note
  lines = [l for l in eva_optax.describe(stats, params).splitlines()
           if l.startswith(layer + " ")]
  assert len(lines) == 1 and "not captured" in lines[0], lines
  assert stats["dense"].captured
  # The jitted capture and eager jax.grad: Dense fan-in 3 + 1, the gate's
  # product, the pool's sum over 5 x 4 and the means (<= 20 + 1), as long
  # backward, the batch sum of 5.
  ops = 2 * (4 + 1 + 21) + 5
  assert_float32_twins(grads[layer]["kernel"], plain_grads[layer]["kernel"], ops)
  np.testing.assert_array_equal(up[layer]["kernel"], grads[layer]["kernel"])
  assert rel_err(up["dense"]["kernel"], grads["dense"]["kernel"]) > 0.5
