"""A user's own code named on the command line as ``"module:function"`` (a defense factory, a classifier factory)."""

from __future__ import annotations

import importlib


def import_spec(spec: str):
    """The object a ``"module:name"`` string names."""
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"expected 'module:function', got {spec!r}.")
    return getattr(importlib.import_module(module_name), attribute)
