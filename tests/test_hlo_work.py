"""benchmarks/benchlib/hlo_work.py counts known programs right.

The counter reads a compiled program's HLO text: the LAPACK calls (with their
operand shapes and a flop model), the trip counts of the loops around them,
the branch of a ``lax.switch`` on the device index that each device runs, the
heaviest branch of any other conditional, and the bytes of the collectives
inside and outside conditionals. Each test compiles a small program whose
counts are known by construction.
"""

from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from multidevice_util import FAST_COMPILE
from multidevice_util import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from benchlib import hlo_text  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchlib import hlo_work  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZES = (8, 16, 24)          # three Cholesky calls per loop trip
TRIPS = 4
EIGH, CHOL = 12, 32          # branch 0: one 12x12 eigh; branch 1: one 32x32 Cholesky


def chol(n: int) -> float:
  return n ** 3 / 3


def _spd(x, n):
  a = x[:n, :n]
  return a @ a.T + n * jnp.eye(n)


def _known_program(x, i):
  def body(_, c):
    return c + sum(jnp.linalg.cholesky(_spd(c, n)).sum() for n in SIZES)

  y = lax.fori_loop(0, TRIPS, body, x)
  return lax.switch(i, [lambda y: jnp.linalg.eigh(_spd(y, EIGH))[0].sum() * y,
                        lambda y: jnp.linalg.cholesky(_spd(y, CHOL)).sum() * y], y)


@pytest.fixture(scope="module")
def known_hlo() -> str:
  return jax.jit(_known_program).lower(jnp.ones((32, 32)), 0).compile().as_text()


def test_loop_trips_and_heaviest_branch(known_hlo):
  w = hlo_work.count(known_hlo, keep_ops=True)
  assert w["devices"] == 1
  loop = TRIPS * sum(chol(n) for n in SIZES)
  eigh = 9.0 * EIGH ** 3             # the stated model; heavier than chol(32)
  assert eigh > chol(CHOL)
  assert w["lapack_flops_per_device"] == [pytest.approx(loop + eigh)]
  assert w["lapack_by_kind"]["potrf"] == {"flops": pytest.approx(loop),
                                          "matrices": TRIPS * len(SIZES)}
  assert w["lapack_by_kind"]["syevd"] == {"flops": pytest.approx(eigh), "matrices": 1}
  shapes = sorted((o["shape"], o["times"]) for o in w["ops"])
  assert shapes == sorted([(f"{n}x{n}", TRIPS) for n in SIZES] + [(f"{EIGH}x{EIGH}", 1)])
  assert w["notes"] == []
  assert w["step_bytes"] == w["cond_bytes"] == 0


def test_trip_count_read_from_the_condition(known_hlo):
  """Without XLA's known_trip_count, the loop's scalars are run to the bound."""
  stripped = known_hlo.replace('"known_trip_count"', '"x_trip_count"')
  assert stripped != known_hlo
  w = hlo_work.count(stripped)
  assert w["lapack_by_kind"]["potrf"]["matrices"] == TRIPS * len(SIZES)
  assert w["notes"] == []


def test_batched_and_triangular_solves():
  def f(x):
    b = jnp.stack([_spd(x + k, 16) for k in range(3)])     # one batched call of 3
    c = jax.scipy.linalg.cho_factor(_spd(x, 20), lower=True)
    return jnp.linalg.cholesky(b).sum() + jax.scipy.linalg.cho_solve(
        c, jnp.ones((20, 5))).sum()

  w = hlo_work.count(jax.jit(f).lower(jnp.ones((32, 32))).compile().as_text())
  kinds = w["lapack_by_kind"]
  assert kinds["potrf"]["matrices"] == 4
  assert kinds["potrf"]["flops"] == pytest.approx(3 * chol(16) + chol(20))
  assert kinds["trsm"]["matrices"] == 2                       # L then L^T
  assert kinds["trsm"]["flops"] == pytest.approx(2 * 20 * 20 * 5)


def test_hlo_instructions_and_shapes():
  assert hlo_text.shapes("(f32[2,3]{1,0}, s32[])") == [("f32", (2, 3)), ("s32", ())]
  assert hlo_text.nbytes("(f32[2,3]{1,0}, bf16[4])") == 24 + 8
  text = "HloModule m\n\nFileNames\n1 \"f.py\"\n\nENTRY %main (x: f32[]) -> f32[] {\n" \
         "  %x = f32[] parameter(0)\n  ROOT %y = f32[] add(%x, %x)\n}\n"
  assert hlo_text.instructions(text) == 2


# The split refresh's shape: a lax.cond on the step count around a lax.switch
# on the device index, one all-gather of the results inside the cond, one
# psum outside it; on 4 virtual devices (a subprocess: XLA reads the device
# count at start).
_DEVICE_SWITCH = r'''
import json, os, sys
import jax, jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
sys.path.insert(0, "benchmarks")
from benchlib import hlo_work

ASSIGN = [(8, 40), (48,), (16, 24, 32), ()]     # device -> Cholesky orders

def spd(x, n):
  a = x[:n, :n]
  return a @ a.T + n * jnp.eye(n)

def mine(x, d):
  def body(_, acc):
    return acc + sum(jnp.linalg.cholesky(spd(x + acc, n)).sum() for n in ASSIGN[d])
  return lax.fori_loop(0, 3, body, jnp.zeros(()))   # 3 trips

def step(x, count):
  def refresh(x):
    v = lax.switch(lax.axis_index("data"), [lambda x, d=d: mine(x, d) for d in range(4)], x)
    return x + lax.all_gather(v, "data").sum()         # 4 floats gathered per device
  x = lax.cond(count % 10 == 0, refresh, lambda x: x, x)
  return lax.psum(x, "data")                            # 48 x 48 floats every step

mesh = jax.make_mesh((4,), ("data",))
f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P()), out_specs=P(),
                          check_vma=False))
hlo = f.lower(jnp.eye(48), 0).compile().as_text()
w = hlo_work.count(hlo)
print(json.dumps({k: w[k] for k in ("devices", "lapack_flops_per_device", "lapack_imbalance",
                                    "lapack_calls_per_device", "step_bytes", "cond_bytes",
                                    "step_result_bytes", "cond_result_bytes",
                                    "notes")}))
'''


def test_switch_on_the_device_index_counts_each_device_its_branch():
  r = run_script(_DEVICE_SWITCH, devices=4, timeout=120, env=FAST_COMPILE)
  assigned = [(8, 40), (48,), (16, 24, 32), ()]
  want = [3 * sum(chol(n) for n in a) for a in assigned]
  assert r["devices"] == 4
  assert r["lapack_flops_per_device"] == [pytest.approx(v) for v in want]
  assert r["lapack_calls_per_device"] == [3 * len(a) for a in assigned]
  assert r["lapack_imbalance"] == pytest.approx(max(want) / (sum(want) / 4))
  assert r["notes"] == []
  assert r["cond_bytes"] == 4                   # the all-gather's operand: one float
  assert r["cond_result_bytes"] == 4 * 4        # its result: one float per device
  assert r["step_bytes"] == r["step_result_bytes"] == 48 * 48 * 4


def test_unknown_device_dependence_is_assumed_and_flagged():
  """A device-dependent index the evaluator cannot follow: branch d mod n."""
  hlo = """HloModule m, num_partitions=2

%b0 (p: (f32[4,4])) -> f32[4,4] {
  %p = (f32[4,4]{1,0}) parameter(0)
  %g = f32[4,4]{1,0} get-tuple-element(%p), index=0
  %c = (f32[4,4]{1,0}, s32[]) custom-call(%g), custom_call_target="lapack_spotrf_ffi"
  ROOT %r = f32[4,4]{1,0} get-tuple-element(%c), index=0
}

%b1 (q: (f32[4,4])) -> f32[4,4] {
  %q = (f32[4,4]{1,0}) parameter(0)
  ROOT %h = f32[4,4]{1,0} get-tuple-element(%q), index=0
}

ENTRY %main (x: f32[4,4], t: s32[2]) -> f32[4,4] {
  %x = f32[4,4]{1,0} parameter(0)
  %t = s32[2]{0} parameter(1)
  %pid = u32[] partition-id()
  %i = s32[] convert(%pid)
  %k = s32[1]{0} dynamic-slice(%t, %i), dynamic_slice_sizes={1}
  %s = s32[] reshape(%k)
  %tu = (f32[4,4]{1,0}) tuple(%x)
  ROOT %c = f32[4,4]{1,0} conditional(%s, %tu, %tu), branch_computations={%b0, %b1}
}
"""
  w = hlo_work.count(hlo)
  assert w["devices"] == 2
  assert w["lapack_flops_per_device"] == [pytest.approx(chol(4)), 0.0]
  assert w["notes"] == ["assumed_device_branch"]
  assert re.search("Cholesky", w["flop_models"]["potrf"])
