"""Sphinx configuration for the atlasfit docs (myst markdown pages + numpydoc-style API)."""

project = "atlasfit"
author = "atlasfit developers"
copyright = "2026, atlasfit developers"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.autosummary",
]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_typehints = "description"
suppress_warnings = ["myst.header"]
html_theme = "alabaster"
html_title = "atlasfit"
