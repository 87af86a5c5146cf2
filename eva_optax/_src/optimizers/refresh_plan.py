"""How the refresh of K-FAC, FOOF or Shampoo splits over devices (the plan)."""

from __future__ import annotations

from typing import Any

from eva_optax._src.optimizers import foof
from eva_optax._src.optimizers import kfac
from eva_optax._src.optimizers import shampoo
from eva_optax._src.preconditioner import distribute
from eva_optax._src.preconditioner import layerwise
from eva_optax._src.preconditioner import per_tensor
from eva_optax._src.preconditioner import validation

METHODS = ("kfac", "foof", "shampoo")


def refresh_plan(method: str, params: Any, devices: int, *,
                 layer_views: Any = None,
                 block_size: int | None = None) -> distribute.RefreshPlan:
  """The split of an optimizer's refresh over ``devices`` devices.

  With ``distribute_over=axis``, the refresh's units (a slice of a layer for
  K-FAC, its two factors together, and FOOF; a block of a tensor for Shampoo)
  are assigned greedily, largest estimated cost first, each to the
  least-loaded device, exactly as this function does for the same
  parameters: print the result to see the units and estimated load of each
  device and the bytes each device receives per refresh (one all-gather of
  the packed results).

  Args:
    method: ``"kfac"``, ``"foof"`` or ``"shampoo"``.
    params: the parameters (or their shapes, :func:`jax.eval_shape`).
    devices: the size of the mesh axis.
    layer_views: as given to the optimizer.
    block_size: Shampoo's block size (``None``: its default, 128).

  Returns:
    A ``RefreshPlan`` (``print`` it; ``.loads``, ``.bytes_per_refresh``,
    ``.balance``, ``.owner``, ``.units``).

  Examples:
    >>> import jax, jax.numpy as jnp, eva_optax
    >>> params = {"a": {"kernel": jnp.zeros((64, 64)), "bias": jnp.zeros(64)},
    ...           "b": {"kernel": jnp.zeros((64, 8)), "bias": jnp.zeros(8)}}
    >>> plan = eva_optax.refresh_plan("kfac", params, devices=2)
    >>> plan.owner
    (0, 1)

  References:
    Pauloski et al., `KAISA: An Adaptive Second-Order Optimizer Framework for
    Deep Neural Networks <https://arxiv.org/abs/2107.01739>`_, SC 2021.
  """
  validation.check_choice("method", method, METHODS)
  validation.check_interval("devices", devices)
  if method == "shampoo":
    size = validation.static_int(
        "block_size", shampoo.DEFAULT_BLOCK_SIZE if block_size is None
        else block_size)
    units = per_tensor.units(shampoo.method(size), params, layer_views)
  else:
    chosen = kfac.KFAC if method == "kfac" else foof.method(None)
    units = layerwise.units(chosen, params, layer_views)
  return distribute.plan(units, int(devices))
