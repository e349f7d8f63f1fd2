"""Data, reference models, the defense registry and the evaluation harnesses of art-purifiers.

The command line is ``python -m benchmarks <command>`` (``python -m benchmarks --help`` lists the commands);
:func:`run_command` runs the same commands from Python. The names below are the package's face: examples and user code
import them from ``benchmarks``, not from the modules behind them. They load lazily on first access.
"""

import importlib

_LAZY = {
    "load_reference_models": "benchmarks.models", "load_classifier": "benchmarks.models",
    "defense": "benchmarks.defenses", "deployed_model": "benchmarks.defenses", "build_purifier": "benchmarks.defenses",
    "REGISTRY": "benchmarks.defenses", "METHODS": "benchmarks.defenses",
    "load_mnist": "benchmarks.data", "load_fashion_mnist": "benchmarks.data", "load_cifar10": "benchmarks.data",
    "read_results": "benchmarks.results", "write_results": "benchmarks.results",
    "AutoAttackConfig": "benchmarks.harness.autoattack", "run_autoattack": "benchmarks.harness.autoattack",
    "result_rows": "benchmarks.harness.autoattack",
    "check_prior": "benchmarks.harness.prior_check",
}

__all__ = [*_LAZY, "run_command"]


def run_command(argv: list[str]) -> None:
    """Run ``python -m benchmarks <argv...>`` in this process, e.g. ``run_command(["robustbench", "--help"])``."""
    from benchmarks.__main__ import main

    main(argv)


def __dir__():
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'benchmarks' has no attribute {name!r}")
