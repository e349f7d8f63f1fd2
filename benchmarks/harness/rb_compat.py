"""The single module through which this package imports robustbench 1.1.1.

robustbench 1.1.1 cannot be imported as installed from the registry:

* ``robustbench/loaders.py`` imports ``pkg_resources``, which setuptools >= 82 no longer ships: we provide the one
  function it uses, ``resource_filename``, when the real module is missing;
* ``robustbench/eval.py`` imports ``autoattack`` (the GitHub name) while the registry ships AutoAttack as
  ``pyautoattack``: we alias ``autoattack`` and ``autoattack.state`` to it. robustbench's ``benchmark()`` still cannot
  run with pyautoattack (its API differs) and hard-codes ``version='standard'``: our harness
  (:mod:`benchmarks.harness.autoattack`) reimplements its steps instead;
* torchattacks 3.5.1 ships an old top-level ``robustbench`` copy; whichever package pip installs last owns those
  files. The README's install re-installs robustbench last; :func:`import_robustbench` refuses the vendored copy with
  an error that says how to fix it.
"""

from __future__ import annotations

import importlib
import importlib.resources
import sys
import types


def _ensure_pkg_resources() -> None:
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)
        sys.modules["pkg_resources"] = shim


def _alias_autoattack() -> None:
    import pyautoattack
    import pyautoattack.state

    sys.modules.setdefault("autoattack", pyautoattack)
    sys.modules.setdefault("autoattack.state", pyautoattack.state)


def import_robustbench():
    """Import and return the real robustbench 1.1.1 package, with ``robustbench.utils`` and ``robustbench.data`` loaded."""
    _ensure_pkg_resources()
    _alias_autoattack()
    robustbench = importlib.import_module("robustbench")
    if not hasattr(robustbench, "benchmark"):
        raise ImportError(
            f"the 'robustbench' package at {robustbench.__file__} is the old copy vendored by torchattacks, not "
            "robustbench 1.1.1; reinstall it last: pip install --no-deps --force-reinstall robustbench==1.1.1")
    importlib.import_module("robustbench.utils")
    importlib.import_module("robustbench.data")
    return robustbench
