import pytest
import torch

from tiny import tiny_prior

# Tiny tensors gain nothing from intra-op threads, and on the small shared CI machine spinning OpenMP workers stall
# each other (a 50x slowdown, measured).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def prior64():
    return tiny_prior()


@pytest.fixture(scope="module")
def prior32():
    return tiny_prior(torch.float32)


@pytest.fixture
def toy_defense(monkeypatch):
    """The toy purifier of tiny.py registered under the name 'toy', as the registry's defenses are."""
    from benchmarks.defenses import REGISTRY, DefenseRecord, Paper
    from tiny import make_toy

    monkeypatch.setitem(REGISTRY, "toy", DefenseRecord(name="toy", wrapper=make_toy, needs_classifier=True,
                                                       paper=Paper("toy purifier", "", "", ""), paper_settings={}))
    return "toy"
