"""Data, reference models, training and the evaluation harnesses of art-purifiers (``python -m benchmarks --help``)."""

from benchmarks.models import load_reference_models

__all__ = ["load_reference_models"]
