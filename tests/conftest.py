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
