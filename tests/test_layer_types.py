"""Which layers are captured: subclasses, and the int forms of Conv's arguments.

A subclass of a captured type that keeps the parent's ``__call__`` is captured
like its parent. One that overrides ``__call__`` is captured exactly through
the parent's method when it calls it (``2 * super().__call__(x)`` has the
statistics of ``2 * nn.Dense(...)(x)``: the scaling is outside the layer); one
that computes its output itself is not (the capture cannot read that map), is
reported with the reason and passes its gradient through. ``nn.Conv`` takes ints where tuples are expected (``kernel_size=3``,
``strides=2``, ``padding=1``, ``kernel_dilation=2``); the statistics then equal
an explicit im2col of the same convolution.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eva_optax
from conftest import assert_float32_twins
from conftest import assert_propagated
from conftest import LayerCase
from conftest import layer_view
from conftest import numpy_init
from conftest import preconditioner
from conftest import rel_err
from conftest import single_layer_problem
from conftest import to64
from conftest import with_one


class MyDense(nn.Dense):
  """Keeps nn.Dense.__call__."""


class MyConv(nn.Conv):
  """Keeps nn.Conv.__call__, adds a field."""

  note: str = "mine"


class MyEmbed(nn.Embed):
  """Keeps nn.Embed.__call__ and attend."""


class Doubled(nn.Dense):
  """Overrides __call__, calling the parent's (twice the Dense map)."""

  def __call__(self, x):
    return 2.0 * super().__call__(x)


class OwnMap(nn.Dense):
  """Overrides __call__ without calling the parent's (its own map)."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    return 2.0 * (x @ kernel + bias)


class Net(nn.Module):
  sub: bool
  own: bool = False

  @nn.compact
  def __call__(self, ids, img):
    dense, conv, embed = (MyDense, MyConv, MyEmbed) if self.sub else (
        nn.Dense, nn.Conv, nn.Embed)
    e = embed(5, 3, name="embed")(ids)                       # (B, T, 3)
    h = jnp.tanh(conv(3, (2, 2), name="conv")(img))          # (B, 3, 3, 3)
    h = h.reshape(h.shape[0], -1) + e.mean(axis=1).repeat(9, axis=-1)
    h = jnp.tanh(dense(4, name="dense")(h))
    if self.sub:
      return (OwnMap if self.own else Doubled)(2, name="doubled")(h)
    return 2.0 * nn.Dense(2, name="doubled")(h)


@functools.lru_cache(maxsize=None)
def _problem():
  rng = np.random.default_rng(14)
  ids = jnp.asarray(rng.integers(0, 5, size=(4, 3)))
  img = jnp.asarray(rng.normal(size=(4, 3, 3, 2)) + 0.5, jnp.float32)
  t = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
  params = numpy_init(Net(sub=False), ids, img)
  out = {}
  for sub in (False, True, "own"):
    def loss(p, ids, img, t, sub=sub):
      net = Net(sub=bool(sub), own=sub == "own")
      return jnp.mean((net.apply({"params": p}, ids, img) - t) ** 2)
    fn = jax.jit(eva_optax.value_and_grad(loss, statistics="factors"))
    out[sub] = fn(params, ids, img, t)
  return params, out


@pytest.mark.parametrize("layer", ["embed", "conv", "dense"])
def test_subclass_that_keeps_the_parent_call_is_captured(layer):
  _, out = _problem()
  st, ref = out[True][2][layer], out[False][2][layer]
  assert st.captured, st.note
  assert ref.captured, ref.note
  # The same float32 program with other module classes: the path to the
  # deepest statistic is the embedding's mean over 3 tokens, the conv's fan-in
  # (9), the dense fan-in (28), the head (5) and the loss (9), backward as much,
  # then the batch sums (4 rows, A and G + 3).
  ops = 2 * (3 + 9 + 28 + 5 + 9) + 4 + 3
  for key in ("a", "g", "A", "G"):
    assert_float32_twins(getattr(st, key), getattr(ref, key), ops, err_msg=key)


def test_override_that_calls_the_parent_is_captured_through_it():
  """``2 * super().__call__(x)`` has exactly the statistics of the explicit
  ``2 * nn.Dense(...)(x)``: the capture reads the inner call."""
  _, out = _problem()
  st, ref = out[True][2]["doubled"], out[False][2]["doubled"]
  assert st.captured and ref.captured, (st.note, ref.note)
  ops = 2 * (3 + 9 + 28 + 5 + 9) + 4 + 3      # as above
  for key in ("a", "g", "A", "G"):
    assert_float32_twins(getattr(st, key), getattr(ref, key), ops, err_msg=key)
  assert float(np.abs(np.asarray(st.g)).max()) > 0   # not a trivial equality


def test_override_with_its_own_map_is_not_captured_and_passes_through():
  params, out = _problem()
  _, grads, stats = out["own"]
  st = stats["doubled"]
  assert not st.captured
  assert "overrides" in st.note and "OwnMap" in st.note, st.note
  assert_float32_twins(grads["doubled"]["kernel"], out[False][1]["doubled"]["kernel"],
                       2 * (3 + 9 + 28 + 5 + 9) + 4)   # as above
  tx = preconditioner("eva")
  up, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
  np.testing.assert_array_equal(up["doubled"]["kernel"], grads["doubled"]["kernel"])
  np.testing.assert_array_equal(up["doubled"]["bias"], grads["doubled"]["bias"])
  assert rel_err(up["dense"]["kernel"], grads["dense"]["kernel"]) > 0.5


def test_attend_override_that_calls_the_parent_is_pooled():
  """A tied embedding whose ``attend`` halves the parent's: captured through
  the inner calls, with the statistics of the explicit form."""
  class HalfAttend(nn.Embed):
    def attend(self, query):
      return super().attend(query) / 2.0

  class Model(nn.Module):
    half: bool

    @nn.compact
    def __call__(self, ids):
      embed = (HalfAttend if self.half else nn.Embed)(5, 3, name="embed")
      out = embed.attend(embed(ids))
      return out if self.half else out / 2.0

  ids = jnp.asarray([[0, 1, 2], [3, 4, 4]])
  params = numpy_init(Model(half=False), ids)
  stats = {}
  for half in (True, False):
    loss = lambda p, ids, half=half: jnp.mean(
        Model(half=half).apply({"params": p}, ids) ** 2)
    _, _, stats[half] = eva_optax.value_and_grad(loss, statistics="factors")(
        params, ids)
  st, ref = stats[True]["embed"], stats[False]["embed"]
  assert st.captured and st.kind == "Embed+Embed.attend", st.note
  # The same float32 program but for where the exact halving happens: the
  # attend's dot over 3 features, the loss over 2 x 3 x 5 logits, backward as
  # much, then the sums over 6 rows.
  ops = 2 * (3 + 30) + 6 + 3
  for key in ("a", "g", "A", "G"):
    assert_float32_twins(getattr(st, key), getattr(ref, key), ops, err_msg=key)


# ----------------------------------------------------------------------------
# Int forms of nn.Conv's arguments.

INT_CASES = (
    LayerCase("kernel_size_int_1d", lambda: nn.Conv(4, kernel_size=3), (3, 7, 2),
              conv=dict(kernel_size=(3,), padding="SAME")),
    LayerCase("all_ints_2d",
              lambda: nn.Conv(3, kernel_size=(2, 3), strides=2, padding=1,
                              kernel_dilation=2),
              (2, 7, 6, 2),
              conv=dict(kernel_size=(2, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                        dilation=(2, 2))),
    LayerCase("all_ints_1d",
              lambda: nn.Conv(2, kernel_size=3, strides=2, padding=1, kernel_dilation=2),
              (3, 9, 2),
              conv=dict(kernel_size=(3,), strides=(2,), padding=((1, 1),), dilation=(2,))),
)


@pytest.mark.parametrize("case", INT_CASES, ids=[c.name for c in INT_CASES])
def test_conv_int_arguments_match_im2col(case):
  pb = single_layer_problem(case)   # checks its own im2col against the layer
  fn = jax.jit(eva_optax.value_and_grad(pb.loss, statistics="rows"))
  _, grads, stats = fn(pb.params)
  assert stats.captured, stats.note
  d_in = pb.rows.shape[-1]
  examples, positions = pb.rows.shape[:2]
  n_rows = examples * positions
  # As in test_capture.py: patches are copies (one rounding at most), dy the
  # forward's roundings, means n + 1, A the positions' and examples' means + 3,
  # the gradient a sum over the rows.
  assert_propagated(stats.a_rows, lambda r: with_one(r).reshape(-1, d_in + 1), (pb.rows, 1.0))
  assert_propagated(stats.g_rows, lambda dy: dy.reshape(-1, dy.shape[-1]),
                    (pb.dy, pb.dy_ops()))
  assert_propagated(stats.a, lambda r: with_one(r).reshape(-1, d_in + 1).mean(axis=0),
                    (pb.rows, n_rows + 1))
  factor = lambda r: with_one(r.mean(axis=1)).T @ with_one(r.mean(axis=1)) / len(r)
  assert_propagated(stats.A, factor, (pb.rows, positions + examples + 3))
  assert_propagated(layer_view(grads), lambda a, g: a.T @ g, (stats.a_rows, 0.0),
                    (stats.g_rows, n_rows + 1))
