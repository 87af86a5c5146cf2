"""The completeness check: did the capture see every use of a layer's parameters?

A layer's statistics describe the calls the capture taps. If its parameters
also reach the loss some other way (a hand-written tie ``h @ embed.T``, another
layer applied to them, a custom computation), the statistics miss that part of
the gradient, and preconditioning with them would be wrong while training on.
The check runs in the capture's shape-only pass, at trace time only:

1. every captured call is computed with a *copy* of its node's parameters
   (the copy rides in the probe slot next to the weight, so Flax's transforms
   slice and broadcast it like the weight), so the original parameters carry
   only the uses the capture did not see;
2. the gradient of the loss with respect to the originals is traced
   (:func:`jax.make_jaxpr`, no computation) and, for each layer, the inputs
   that its gradient depends on are read off the program, through every
   sub-program (``pjit``, ``scan``, ``while``, ``cond``, remat, ``shard_map``):

   * nothing: the capture saw every use; the layer is captured;
   * only parameters (never the copies, the data or array constants): a term
     of the loss in the parameters alone, such as an L2 penalty. Its gradient
     is added to the data term's and preconditioned with it, but its
     curvature is not in the statistics (as weight decay's is not); the layer
     stays captured and :func:`eva_optax.describe` says so. Prefer the
     optimizers' ``weight_decay=``;
   * anything else (the data, or the copies, i.e. the model's activations):
     an other use; the layer is reported not captured, with the reason, and
     its gradient passes through the optimizers.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

# What a value in the traced gradient program can depend on (bit flags).
PARAMS = 1   # the original parameters
COPIES = 2   # the copies that the captured calls used (the model's activations)
DATA = 4     # the batch, closed-over arrays and other state


def _is_jaxpr(x: Any) -> bool:
  return isinstance(x, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))


def _open(x: Any) -> tuple[Any, Sequence[Any]]:
  """``(jaxpr, consts)`` of a Jaxpr or a ClosedJaxpr."""
  if isinstance(x, jax.extend.core.ClosedJaxpr):
    return x.jaxpr, x.consts
  return x, ()


def _const_mask(value: Any) -> int:
  """An array constant counts as data; a scalar (a coefficient) does not."""
  return DATA if np.ndim(value) > 0 else 0


def dependence(program: Any, in_masks: Sequence[int]) -> list[int]:
  """The mask of what each output of ``program`` depends on.

  Args:
    program: a ``Jaxpr`` or ``ClosedJaxpr``.
    in_masks: one mask per input variable.

  Returns:
    One mask per output.
  """
  jaxpr, consts = _open(program)
  env: dict[Any, int] = {}
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = _const_mask(c)
  for v in jaxpr.constvars[len(consts):]:
    env[v] = DATA
  for v, m in zip(jaxpr.invars, in_masks):
    env[v] = m

  def read(x):
    if isinstance(x, jax.extend.core.Literal):
      return _const_mask(x.val)
    return env.get(x, 0)

  for eqn in jaxpr.eqns:
    outs = _equation(eqn, [read(x) for x in eqn.invars])
    for v, m in zip(eqn.outvars, outs):
      env[v] = m
  return [read(v) for v in jaxpr.outvars]


def _union(masks: Sequence[int]) -> int:
  out = 0
  for m in masks:
    out |= m
  return out


def _fixed_point(step, carry: list[int]) -> tuple[list[int], list[int]]:
  """Iterates ``carry <- carry | step(carry)[:len(carry)]`` to its fixed point."""
  while True:
    outs = step(carry)
    new = [c | o for c, o in zip(carry, outs)]
    if new == carry:
      return carry, outs
    carry = new


def _scan_counts(params: dict) -> tuple[int, int]:
  """A scan's numbers of constants and carries: ``num_consts``/``num_carry``
  (jax <= 0.11), or the lengths of the first two groups of ``ft_in`` (jax 0.12:
  the flat inputs grouped as constants, carries and scanned inputs)."""
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  groups = params["ft_in"].unpack()     # a FlatTree: len() counts its leaves
  return len(groups[0]), len(groups[1])


def _equation(eqn: Any, ins: list[int]) -> list[int]:
  """The output masks of one equation, recursing into its sub-programs."""
  name, params, n_out = eqn.primitive.name, eqn.params, len(eqn.outvars)
  if name == "scan":
    nc, nk = _scan_counts(params)
    if nc + nk > len(ins):              # a layout this code does not know: every
      return [_union(ins)] * n_out      # output may depend on every input
    body = params["jaxpr"]
    consts, xs = ins[:nc], ins[nc + nk:]
    carry, outs = _fixed_point(
        lambda c: dependence(body, consts + c + xs), list(ins[nc:nc + nk]))
    return carry + outs[nk:]
  if name == "while":
    cn, bn = params["cond_nconsts"], params["body_nconsts"]
    cond_c, body_c, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    carry, _ = _fixed_point(
        lambda c: dependence(params["body_jaxpr"], body_c + c), list(init))
    pred = dependence(params["cond_jaxpr"], cond_c + carry)[0]
    # The trip count depends on ``pred``: every output that depends on
    # anything at all depends on it too.
    return [c | pred if c else 0 for c in carry]
  if name == "cond":
    index, ops = ins[0], ins[1:]
    outs = [_union(ms) for ms in zip(*[dependence(b, ops)
                                       for b in params["branches"]])]
    return [m | index if m else 0 for m in outs]
  subs = [v for v in params.values() if _is_jaxpr(v)]
  if len(subs) == 1:    # a call: pjit, remat, custom_jvp/vjp, shard_map, ...
    jaxpr, _ = _open(subs[0])
    if len(jaxpr.invars) == len(ins) and len(jaxpr.outvars) == n_out:
      return dependence(subs[0], ins)
  return [_union(ins)] * n_out


def classify(program: Any, in_masks: Sequence[int],
             outputs: dict[Any, Sequence[int]]) -> dict[Any, int]:
  """For each key of ``outputs`` (a list of output positions), the union of
  the masks of those outputs of ``program``."""
  masks = dependence(program, in_masks)
  return {key: _union([masks[i] for i in positions])
          for key, positions in outputs.items()}


REASON = ("its parameters are also used outside its layer calls, where the "
          "capture cannot see them (e.g. a hand-written tie h @ embedding.T, "
          "or another layer applied to its weight), so its statistics would "
          "miss part of its gradient; for a tied embedding use nn.Embed.attend "
          "(or nnx.Embed.attend), which the capture pools with the lookup")
PENALTY_NOTE = ("the loss also has a term in its parameters alone (e.g. an L2 "
                "penalty): its gradient is preconditioned with the rest, its "
                "curvature is not in the statistics")


def check(records: dict[int, Any], program: Any, in_masks: Sequence[int],
          outputs: dict[int, Sequence[int]]) -> None:
  """Rejects the captured records whose parameters have another use, and
  marks those with a penalty term (see the module docstring).

  Args:
    records: the capture's records (``tap.NodeRecord``), by node id.
    program: the traced gradient with respect to the original parameters.
    in_masks: the mask of each of its inputs (:data:`PARAMS`, :data:`COPIES`
      or :data:`DATA`).
    outputs: by node id, the output positions of the node's original
      parameters' gradients.
  """
  found = classify(program, in_masks, outputs)
  for node_id, mask in found.items():
    record = records[node_id]
    if not record.captured:
      continue
    if mask & (COPIES | DATA):
      record.reject(REASON)
    elif mask & PARAMS:
      record.penalty = True
