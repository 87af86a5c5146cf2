"""Small problems shared by the tests of eva_optax.adaptive: a tiny MLP and a
linear model whose mean squared error is an exact quadratic."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class TinyMLP(nn.Module):
  out: int = 3

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(4)(x))
    return nn.Dense(self.out)(x)


def tiny_problem(dtype=jnp.float32, batch=5, d_in=3, out=3, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(batch, d_in)), dtype)
  model = TinyMLP(out=out)
  params = jax.tree.map(lambda p: p.astype(dtype),
                        model.init(jax.random.PRNGKey(seed), x)["params"])
  return model, params, x, rng


def linear_problem(n=12, k=4, m=3, seed=0):
  """Outputs ``A w`` (a linear model): the MSE is an exact quadratic with
  Hessian ``2/(n m) sum_j A_j^T A_j``, equal to the GGN."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, k))
  t = rng.normal(size=(n, m))
  outputs_fn = lambda p: jnp.asarray(a, jnp.float32) @ p["w"]
  value_fn = lambda p: jnp.mean((outputs_fn(p) - jnp.asarray(t, jnp.float32)) ** 2)
  hess = np.kron(2.0 * a.T @ a / (n * m), np.eye(m))   # row-major vec of w (k, m)
  return outputs_fn, value_fn, hess, rng
