"""Sphinx configuration of the art-purifiers documentation (MyST Markdown pages, autodoc API reference).

Build: ``python -m sphinx -W --keep-going -b html docs build/docs`` (``tests/test_docs.py`` builds the same way into a
temporary folder).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the packages import from the checkout even without `pip install -e .`

project = "art-purifiers"
author = "art-purifiers contributors"
copyright = "art-purifiers contributors"  # noqa: A001 (Sphinx's name)

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3  # links such as results.md#measured-on-mnist-held-out-test-split-shipped-models

html_theme = "alabaster"
html_theme_options = {"page_width": "1200px", "sidebar_width": "240px"}
html_title = "art-purifiers"

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_inherit_docstrings = False  # ART's base-class docstrings use their own conventions
