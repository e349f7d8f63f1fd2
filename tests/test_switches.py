"""The speed switches on the command line reach the purifier that the commands build, and are recorded."""

import argparse

import pytest
import torch

from benchmarks.harness.autoattack import add_defense_arguments, load_defense
from benchmarks.models import load_reference_models


def _load(*options):
    parser = argparse.ArgumentParser()
    add_defense_arguments(parser)
    classifier = load_reference_models("mnist")[0]
    return load_defense(parser.parse_args(["--defense", "diffpure", "--set", "t_star=0.01", *options]), classifier)


def test_switches_off_by_default_and_on_when_asked():
    from purifiers.priors.speed import SpeedOptions

    _, purifier, info = _load()
    assert purifier.speed == SpeedOptions() and "channels_last" not in info["overrides"]
    _, purifier, info = _load("--channels-last", "--compile")
    assert purifier.speed == SpeedOptions(channels_last=True, compile=True)
    assert info["overrides"]["channels_last"] is True and info["overrides"]["compile"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the purifier defaults to CUDA, where amp runs")
def test_mixed_precision_is_refused_on_a_cpu_with_a_named_error():
    with pytest.raises(ValueError, match="amp='fp16' is for CUDA inputs"):
        _load("--amp", "fp16")
