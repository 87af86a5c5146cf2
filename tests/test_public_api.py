"""The public surface: __all__ is exact, documented, and its doctests run."""

from __future__ import annotations

import doctest
import inspect
import importlib
import pkgutil

import pytest

import eva_optax
import eva_optax._src

EXPECTED = {
    "layer_views",
    "value_and_grad", "describe", "LayerStatistics", "STATISTICS",
    "LayerwiseState", "training_chain",
    "eva", "scale_by_eva", "eva_f", "scale_by_eva_f",
    "eva_s", "scale_by_eva_s", "kfac", "scale_by_kfac",
    "foof", "scale_by_foof", "shampoo", "scale_by_shampoo",
    "MultiSteps", "TrainState",
    "adaptive", "AdaptiveState", "ADAPTIVE_LOSSES",
}


def test_all_lists_exactly_the_public_names():
  assert set(eva_optax.__all__) >= EXPECTED
  # Public submodules (eva_optax.nnx) appear once imported; they are not names.
  public = {n for n in dir(eva_optax) if not n.startswith("_")
            and not inspect.ismodule(getattr(eva_optax, n))}
  assert set(eva_optax.__all__) == public
  for name in eva_optax.__all__:
    assert getattr(eva_optax, name) is not None


@pytest.mark.parametrize("name", sorted(EXPECTED - {"STATISTICS", "ADAPTIVE_LOSSES"}))
def test_public_names_have_docstrings(name):
  doc = getattr(eva_optax, name).__doc__
  assert doc and len(doc.strip()) > 40, name


def _src_modules():
  for info in pkgutil.walk_packages(eva_optax._src.__path__, "eva_optax._src."):
    yield importlib.import_module(info.name)


@pytest.mark.parametrize("module", list(_src_modules()), ids=lambda m: m.__name__)
def test_doctests(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
  assert result.failed == 0
