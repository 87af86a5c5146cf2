"""Sphinx configuration of the eva_optax docs (``make docs``)."""

from __future__ import annotations

import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))          # eva_optax from this checkout
sys.path.insert(0, os.path.join(DOCS, "_ext"))

import eva_optax  # pylint: disable=wrong-import-position

project = "eva_optax"
author = "eva_optax contributors"
copyright = "eva_optax contributors"  # pylint: disable=redefined-builtin
version = release = eva_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "eva_api",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# Google-style docstrings (Args, Returns, References, ...).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Keep optax's and chex's type aliases by name in signatures (not expanded into unions).
autodoc_type_aliases = {
    name: name for name in (
        "optax.ScalarOrSchedule", "optax.Schedule", "optax.Params", "optax.Updates",
        "optax.OptState", "optax.MaskOrFn", "MaskOrFn", "chex.Numeric", "chex.Array",
        "chex.ArrayTree", "chex.PRNGKey", "jax.typing.ArrayLike", "ArrayLike")
}

# The guides are Markdown that GitHub renders too: "## Heading" anchors resolve like GitHub's,
# and math is written as $...$ and $$...$$ (amsmath for aligned environments).
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath", "amsmath"]

html_theme = "alabaster"
html_title = f"eva_optax {release}"
