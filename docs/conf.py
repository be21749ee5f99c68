"""Sphinx configuration of the optax_mtl documentation.

Build (warnings are errors, no network needed):

  sphinx-build -W --keep-going -b html docs docs/_build/html

The API pages document the checkout this file sits in, not an installed copy,
and every page is written by hand with explicit lists of names
(tests/test_docs.py checks that they cover ``optax_mtl.__all__``).
"""

from __future__ import annotations

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs" / "_ext"))
# Importing the package imports JAX; the docs never need an accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import optax_mtl  # noqa: E402  (after the path and platform are set)

project = "optax_mtl"
author = "The optax_mtl authors"
copyright = "2026, the optax_mtl authors"  # noqa: A001  (Sphinx's name)
release = optax_mtl.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
    # Formulas as MathML written into the pages: they render offline.
    "mathml_math",
]
html_math_renderer = "mathml"

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# Docstrings are Google style (Args, Returns, Raises, Example, References).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
# Attribute types come from the docstrings' own words, not the annotations
# (which would print private module paths such as jax.jaxlib._jax.Array).
napoleon_attr_annotations = False

# The API pages list every name explicitly: autosummary makes the tables on
# each page and generates no stub files.
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"

myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"optax_mtl {release}"
html_static_path = ["_static"]
html_theme_options = {"navigation_with_keys": True}
